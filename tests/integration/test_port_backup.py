"""The seam between port-sqlite and backup/restore: a server of the official image ported with `port-sqlite` (its
homeserver.yaml still says sqlite3; the marker makes the embedded cluster its database) running with workers is
backed up, restored into an empty data dir under another root (the original removed), and started with workers.
The backup holds the embedded cluster's dump, not a copy of the stale SQLite file as the database (that file is
kept as a plain data file, unchanged since the port, and the manifest says what it is); restore brings the marker
back with its paths moved and recreates the cluster from the dump; the restored server serves the same users
(logins with passwords), every message in order (one sent after the port, which only PostgreSQL holds, included),
media byte-identical and the same signing key. The oracle is the original server's own answers. One launch mode
(fork): the seam, not the launcher, is tested here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from urllib.parse import quote

import httpx
import pytest

from tests.integration.test_backup import sw
from tests.support.official import MARKER, SERVER, auth, check_served, clone_data_dir, login, official_server, sha256
from tests.support.stack import SW, Stack, make_root, stack_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the official image's data dir is Synapse's user's (991)")

WORKERS = "synchrotron,event_persister"
AFTER = "after the port: only in PostgreSQL"


def test_a_ported_server_with_workers_backs_up_and_restores_elsewhere():
    backups, new_root, root, stack, restored = make_root("sw-pbk-out-"), make_root("sw-pbk-new-"), None, None, None
    try:
        with official_server("sw-pbk-", messages=20) as official:
            root, server, env = clone_data_dir(official, "sw-pbk-a-", WORKERS)
        data = server.data
        ported = sw(env, "port-sqlite")
        assert ported.returncode == 0, ported.stderr
        stale = sha256(data / "homeserver.db")

        # The ported server with workers: a message only PostgreSQL holds, then the backup.
        stack = Stack(env).start()
        token = login(stack.base_url, "alice")
        sent = httpx.put(
            f"{stack.base_url}/_matrix/client/v3/rooms/{quote(server.room_id)}/send/m.room.message/after-port",
            json={"msgtype": "m.text", "body": AFTER}, headers=auth(token), timeout=30,
        )  # fmt: skip
        assert sent.status_code == 200, sent.text
        server.bodies.append(AFTER)
        key_before = httpx.get(f"{stack.base_url}/_matrix/key/v2/server", timeout=30).raise_for_status().json()
        made = sw(env, "backup", "-o", str(backups))
        assert made.returncode == 0, made.stderr
        assert "database: pg_dump" in made.stderr and "of the PostgreSQL" in made.stderr, made.stderr
        assert stack.stop()[0] == 0, stack.tail()
        stack = None

        (backup,) = [p for p in backups.iterdir() if not p.name.startswith(".")]
        manifest = json.loads((backup / "manifest.json").read_text())
        files = {f["path"]: f for f in manifest["files"]}
        database = manifest["database"]
        assert database["kind"] == "postgres" and database["embedded"] is True and database["file"] == "database.dump"
        assert "database.dump" in files and "database.sqlite" not in files
        # The stale SQLite file: a plain data file, as it was when it was ported; the manifest says what it is.
        assert files["data/homeserver.db"]["sha256"] == stale
        assert f"data/{MARKER}" in files
        ported_from = database["ported_from_sqlite"]
        assert ported_from["stale_copy"] == "data/homeserver.db"
        assert ported_from["sqlite_database"] == str(data / "homeserver.db") and ported_from["ported_at"].endswith("Z")
        assert sw(env, "backup", "--verify", str(backup)).returncode == 0

        # Restore into an empty data dir under another root; the original is gone before the restored one starts.
        new_data = new_root / "data"
        new_env = stack_env(new_root, WORKERS, SYNAPSE_CONFIG_PATH=str(new_data / "homeserver.yaml"),
                            SYNAPSE_LAUNCH_MODE="fork")  # fmt: skip
        result = sw(new_env, "restore", str(backup))
        assert result.returncode == 0, result.stdout + result.stderr
        shutil.rmtree(root)
        marker = json.loads((new_data / MARKER).read_text())
        assert marker["sqlite_database"] == str(new_data / "homeserver.db")
        assert marker["homeserver_yaml"] == str(new_data / "homeserver.yaml")
        assert marker["postgres_data_dir"] == str(new_data / "postgres")
        assert (new_data / "postgres" / "PG_VERSION").is_file()
        assert sha256(new_data / "homeserver.db") == stale
        plan = json.loads(subprocess.run([SW, "plan", "--json"], env=new_env, capture_output=True, text=True).stdout)
        assert plan["postgres"] is not None, plan
        assert plan["sqlite_port"]["sqlite_database"] == str(new_data / "homeserver.db")

        restored = Stack(new_env).start()
        check_served(restored.base_url, server)  # logins, every message in order (AFTER too), media, the appservice
        key_after = httpx.get(f"{restored.base_url}/_matrix/key/v2/server", timeout=30).raise_for_status().json()
        assert key_after["verify_keys"] == key_before["verify_keys"] and key_after["server_name"] == SERVER
        assert restored.stop()[0] == 0, restored.tail()
        assert sha256(new_data / "homeserver.db") == stale  # the restored server ran on PostgreSQL
    finally:
        for running in (stack, restored):
            if running is not None:
                running.close()
        for path in (backups, new_root, root):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
