"""Backup under chat load and restore elsewhere, through the real commands and a real stack (embedded PostgreSQL).

Several clients send with their own transaction ids while `synapse-workers backup` runs; the backup is restored
into an empty data dir under a new root and started: every message acknowledged before the backup began is there,
once, in the original order (and a client retrying its transaction id gets the same event back), uploaded media
download byte-identical, the server signs with the same key, users log in with their passwords. A second backup
hard-links the unchanged media and verifies; a tampered file fails verification; restore into a non-empty data dir
is exit 2 with nothing changed. The oracle is the original server's own answers, recorded before it stopped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.support.matrix import PASSWORD, register, registration_secret, unlimited, upload_media
from tests.support.stack import SW, Stack, make_root, stack_env
from tests.unit.test_cli_errors import snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the embedded cluster runs as postgres: needs root")

SENDERS = 3
MEDIA = {"a.png": os.urandom(300_000), "b.bin": os.urandom(70_000), "c.txt": b"plain text media\n"}


class Sender(threading.Thread):
    """One client sending messages with its own transaction ids; records what was acknowledged, and when."""

    def __init__(self, base: str, token: str, room: str, index: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.base, self.token, self.room, self.index, self.stop = base, token, room, index, stop
        self.acked: list[tuple[str, str, str, float]] = []  # (txn id, body, event id, acknowledged at)
        self.errors: list[str] = []

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.base, headers=headers, timeout=30) as http:
            n = 0
            while not self.stop.is_set():
                txn, body = f"load-{self.index}-{n}", f"sender {self.index} message {n}"
                path = f"/_matrix/client/v3/rooms/{quote(self.room)}/send/m.room.message/{txn}"
                try:
                    response = http.put(path, json={"msgtype": "m.text", "body": body})
                except httpx.HTTPError as exc:
                    self.errors.append(f"{txn}: {exc!r}")
                    continue
                if response.status_code != 200:
                    self.errors.append(f"{txn}: HTTP {response.status_code} {response.text[:200]}")
                    continue
                self.acked.append((txn, body, response.json()["event_id"], time.monotonic()))
                n += 1


def room_messages(base: str, token: str, room: str) -> list[tuple[str, str]]:
    """(event id, body) of every m.room.message in the room, oldest first (/messages, forwards from the start)."""
    found, since = [], None
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        while True:
            params = {"dir": "f", "limit": "500", **({"from": since} if since else {})}
            page = http.get(f"/_matrix/client/v3/rooms/{quote(room)}/messages", params=params).raise_for_status().json()
            found += [(e["event_id"], e["content"].get("body")) for e in page["chunk"] if e["type"] == "m.room.message"]
            if not page["chunk"] or "end" not in page:
                return found
            since = page["end"]


def login(base: str, localpart: str) -> httpx.Response:
    body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": localpart}, "password": PASSWORD}
    return httpx.post(f"{base}/_matrix/client/v3/login", json=body, timeout=30)


def sw(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([SW, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_backup_under_load_restores_elsewhere_with_every_acknowledged_message():
    root, new_root, busy_root = make_root("sw-bk-"), make_root("sw-rs-"), make_root("sw-rsbusy-")
    env = stack_env(root, "", SYNAPSE_LAUNCH_MODE="fork")
    stack, restored = Stack(env), None
    try:
        stack.start()
        base = stack.base_url
        secret = registration_secret(root / "data")
        admin = register(base, secret, "admin", admin=True)
        users = [register(base, secret, f"user{i}") for i in range(SENDERS)]
        for user in users:
            unlimited(base, admin["access_token"], user["user_id"])
        auth = {"Authorization": f"Bearer {users[0]['access_token']}"}
        room = httpx.post(f"{base}/_matrix/client/v3/createRoom", headers=auth, json={"preset": "public_chat"},
                          timeout=30).raise_for_status().json()["room_id"]
        for user in users[1:]:
            httpx.post(f"{base}/_matrix/client/v3/join/{quote(room)}", timeout=30,
                       headers={"Authorization": f"Bearer {user['access_token']}"}).raise_for_status()
        uploaded = upload_media(base, users[0]["access_token"], MEDIA)
        key_before = httpx.get(f"{base}/_matrix/key/v2/server", timeout=30).raise_for_status().json()

        # Chat under load; the backup starts once every sender has been acknowledged a few times.
        stop = threading.Event()
        senders = [Sender(base, u["access_token"], room, i, stop) for i, u in enumerate(users)]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 60
        while min(len(s.acked) for s in senders) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        began = time.monotonic()
        first = sw(env, "backup", "-o", str(root / "backups"))
        ended = time.monotonic()
        time.sleep(1)  # and the load goes on after it
        stop.set()
        for sender in senders:
            sender.join(60)
        assert first.returncode == 0, first.stderr
        assert "database: pg_dump" in first.stderr and "done: " in first.stderr, first.stderr
        assert not any(s.errors for s in senders), [s.errors for s in senders]
        before = {s.index: [a for a in s.acked if a[3] < began] for s in senders}
        during = sum(1 for s in senders for a in s.acked if began <= a[3] < ended)
        assert all(len(b) >= 5 for b in before.values()), before
        assert during > 0, "no message was acknowledged while the backup ran: it did not run under load"
        original = room_messages(base, users[0]["access_token"], room)
        status = json.loads((root / "run" / "state" / "backup.json").read_text())
        backups = sorted(p for p in (root / "backups").iterdir())
        assert [p.name for p in backups] == [Path(status["path"]).name] and status["ok"] is True
        assert status["media_copied"] == len(MEDIA) and status["media_linked"] == 0
        first_dir = backups[0]
        assert sw(env, "backup", "--verify", str(first_dir)).returncode == 0

        # A second backup: unchanged media are hard links to the first's; it verifies; tampering is caught.
        second = sw(env, "backup", "-o", str(root / "backups"))
        assert second.returncode == 0, second.stderr
        second_dir = sorted((root / "backups").iterdir())[-1]
        assert second_dir != first_dir
        first_media = sorted((first_dir / "media").rglob("*"))
        media_files = [p for p in first_media if p.is_file()]
        assert len(media_files) >= len(MEDIA)
        for path in media_files:
            twin = second_dir / path.relative_to(first_dir)
            assert os.stat(path).st_ino == os.stat(twin).st_ino, twin
        assert sw(env, "backup", "--verify", str(second_dir)).returncode == 0
        key_file = next(p for p in (second_dir / "data").iterdir() if p.name.endswith(".signing.key"))
        key_file.write_text(key_file.read_text()[:-3] + "xx\n")
        tampered = sw(env, "backup", "--verify", str(second_dir))
        assert tampered.returncode == 1 and f"data/{key_file.name}" in tampered.stderr, tampered.stderr
        stack.stop()

        # Restore into a non-empty data dir: refused, nothing changed.
        busy_env = stack_env(busy_root, "")
        (busy_root / "data").mkdir()
        (busy_root / "data" / "notes.txt").write_text("someone's file\n")
        kept = snapshot(busy_root)
        refused = sw(busy_env, "restore", str(first_dir))
        assert refused.returncode == 2 and "is not empty" in refused.stderr, refused.stderr
        assert snapshot(busy_root) == kept

        # Restore into an empty data dir elsewhere, and start it.
        new_env = stack_env(new_root, "", SYNAPSE_LAUNCH_MODE="fork")
        result = sw(new_env, "restore", str(first_dir))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "statistics rebuilt" in result.stderr, result.stderr
        restored = Stack(new_env).start()
        new = restored.base_url
        # PostgreSQL itself says the restored tables were analyzed (a dump carries no planner statistics).
        analyzed = subprocess.run(
            ["runuser", "-u", "postgres", "--", "psql", "-X", "-At", "-h",
             f"{new_env['SYNAPSE_RUNTIME_DIR']}/postgresql", "-d", "synapse", "-c",
             "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'events'"],
            capture_output=True, text=True, check=False, cwd="/")
        assert analyzed.stdout.strip() == "t", analyzed.stdout + analyzed.stderr
        for user in [admin, *users]:
            response = login(new, user["user_id"].split(":")[0][1:])
            assert response.status_code == 200, response.text
        messages = room_messages(new, users[0]["access_token"], room)
        ids = [event_id for event_id, _ in messages]
        for index, acked in before.items():
            for _, body, event_id, _ in acked:
                assert ids.count(event_id) == 1, (index, body)
                assert [b for e, b in messages if e == event_id] == [body]
        wanted = {a[2] for acked in before.values() for a in acked}
        assert [e for e in ids if e in wanted] == [e for e, _ in original if e in wanted]  # the original order
        # A client that never saw its acknowledgement retries the same transaction id: the same event, once.
        txn, body, event_id, _ = before[1][-1]
        retry = httpx.put(f"{new}/_matrix/client/v3/rooms/{quote(room)}/send/m.room.message/{txn}",
                          json={"msgtype": "m.text", "body": body}, timeout=30,
                          headers={"Authorization": f"Bearer {users[1]['access_token']}"})
        assert retry.status_code == 200 and retry.json()["event_id"] == event_id, retry.text
        assert [e for e, _ in room_messages(new, users[0]["access_token"], room)].count(event_id) == 1
        for uri, data in uploaded.items():
            server, media_id = uri[len("mxc://"):].split("/")
            response = httpx.get(f"{new}/_matrix/client/v1/media/download/{server}/{media_id}", headers=auth,
                                 timeout=60)
            assert response.status_code == 200 and response.content == data, uri
        key_after = httpx.get(f"{new}/_matrix/key/v2/server", timeout=30).raise_for_status().json()
        assert key_after["verify_keys"] == key_before["verify_keys"]
    finally:
        stack.close()
        if restored is not None:
            restored.close()
        for path in (root, new_root, busy_root):
            shutil.rmtree(path, ignore_errors=True)


def test_an_external_database_is_dumped_and_restored_only_into_an_empty_one():
    """POSTGRES_*: backup dumps the database homeserver.yaml names (no stack needed); restore refuses it while it
    holds tables (exit 2, naming it, nothing written) and fills it once it is empty again."""
    import psycopg2

    from tests.support.pgcluster import BIN, PgCluster

    root, new_root = make_root("sw-bkx-"), make_root("sw-rsx-")
    try:
        with PgCluster() as pg:
            env = stack_env(root, "", **pg.env())
            assert sw(env, "generate").returncode == 0
            with psycopg2.connect(**pg.dsn()) as conn, conn.cursor() as cur:
                cur.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)")
                cur.execute("INSERT INTO notes (body) SELECT 'note ' || n FROM generate_series(1, 1000) AS n")
            conn.close()
            made = sw(env, "backup", "-o", str(root / "backups"))
            assert made.returncode == 0, made.stderr
            assert f"database 'synapse' on 127.0.0.1:{pg.port}" in made.stderr
            backup = next((root / "backups").iterdir())
            manifest = json.loads((backup / "manifest.json").read_text())
            assert manifest["database"]["kind"] == "postgres" and manifest["database"]["embedded"] is False
            assert manifest["database"]["postgres_major"] == int(BIN.split("/")[-2])

            new_env = stack_env(new_root, "", **pg.env())
            refused = sw(new_env, "restore", str(backup))
            assert refused.returncode == 2, refused.stderr
            assert f"database 'synapse' on 127.0.0.1:{pg.port} (user 'synapse') is not empty" in refused.stderr
            assert list(new_root.iterdir()) == []

            recreate = "DROP DATABASE synapse;\nCREATE DATABASE synapse OWNER synapse TEMPLATE template0;\n"
            dropped = pg._run([f"{BIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(pg.socket_dir), "-p",
                               str(pg.port), "-U", pg.owner.pw_name, "-d", "postgres"], input=recreate)
            assert dropped.returncode == 0, dropped.stderr
            restored = sw(new_env, "restore", str(backup))
            assert restored.returncode == 0, restored.stderr
            with psycopg2.connect(**pg.dsn()) as conn, conn.cursor() as cur:
                cur.execute("SELECT count(*), min(body), max(id) FROM notes")
                assert cur.fetchone() == (1000, "note 1", 1000)
                cur.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'notes'")
                assert cur.fetchone() == ("synapse",)
            conn.close()
            assert (new_root / "data" / "homeserver.yaml").exists()
    finally:
        for path in (root, new_root):
            shutil.rmtree(path, ignore_errors=True)
