"""SQLite to PostgreSQL in one step: a populated data dir of the official image (homeserver.yaml and signing key from
Synapse's own --generate-config, run as a monolith on SQLite through `synapse-workers run`: users, a room with
messages, media, an appservice) ported by `synapse-workers port-sqlite` (and, separately, by SYNAPSE_PORT_SQLITE=on
at start) and started with workers. The oracle is the server itself: every message back through /messages in
order, logins with the passwords, media byte-identical, the appservice's users still known; and the user's files
byte-identical (sha256). An interrupted port (synapse_port_db killed half-way) changes nothing: no marker, the
SQLite server starts as before and serves every message. One launch mode (fork): the port, not the launcher, is
tested here."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.support.official import (
    MARKER,
    SERVER,
    Populated,
    auth,
    check_served,
    clone_data_dir,
    login,
    official_server,
    sha256,
)
from tests.support.stack import SW, Stack, process_table

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the official image's data dir is Synapse's user's (991)")

WORKERS = "synchrotron,event_persister"


def _refused_while_running(stack: Stack, populated: Populated) -> None:
    """While the stack runs on it, the port is refused (exit 2) and nothing is written."""
    refused = stack.cli("port-sqlite")
    assert refused.returncode == 2, refused.stderr
    assert "a stack is running on this data dir" in refused.stderr and "Traceback" not in refused.stderr
    assert not (populated.data / MARKER).exists()


@pytest.fixture(scope="module")
def official():
    """A populated official-image data dir (monolith on SQLite, stopped), built once; tests port clones of it."""
    with official_server("sw-port-", _refused_while_running) as populated:
        yield populated


def _fingerprint(data: Path) -> dict[str, str]:
    """The user's files: homeserver.yaml, the SQLite database, the registration, the signing key, the media."""
    files = [data / "homeserver.yaml", data / "homeserver.db", data / "appservice-bridge.yaml",
             data / f"{SERVER}.signing.key", *sorted((data / "media_store").rglob("*"))]  # fmt: skip
    return {str(p.relative_to(data)): sha256(p) for p in files if p.is_file()}


def _port_db_child(data: Path) -> int | None:
    for pid, proc in process_table().items():
        if b"synapse_port_db" in proc.cmdline and str(data).encode() in proc.cmdline:
            return pid
    return None


def _rows_so_far(data: Path) -> int:
    """Rows of schema_version in the `synapse` database the port is filling, through the temporary postmaster's
    private socket (found on its command line), as the cluster's owner (peer authentication)."""
    for proc in process_table().values():
        words = proc.cmdline.decode().split()
        if str(data / "postgres") not in words:
            continue
        sockets = [w.split("=", 1)[1] for w in words if w.startswith("unix_socket_directories=")]
        if sockets and sockets[0].startswith(tempfile.gettempdir()):
            psql = sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))[-1]
            result = subprocess.run(
                ["runuser", "-u", "postgres", "--", psql, "-X", "-h", sockets[0], "-d", "synapse", "-tAc",
                 "SELECT count(*) FROM schema_version"],
                capture_output=True, text=True, timeout=30, cwd="/",
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            return int(result.stdout.strip())
    raise AssertionError("the temporary postmaster is not running")


def test_an_interrupted_port_changes_nothing_and_the_next_port_starts_with_workers(official):
    root, clone, env = clone_data_dir(official, "sw-port-a-")
    stack = None
    try:
        data = clone.data
        before = _fingerprint(data)
        homeserver_bytes = (data / "homeserver.yaml").read_bytes()
        assert (data / "homeserver.db-wal").exists() is False or (data / "homeserver.db-wal").stat().st_size == 0

        # 1. synapse_port_db killed half-way (the PostgreSQL schema made, rows in it, no table copied yet).
        port = subprocess.Popen([SW, "port-sqlite"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        said: list[str] = []
        assert port.stderr is not None
        for line in port.stderr:
            said.append(line)
            if "Running background updates on PostgreSQL" in line or "Creating port tables" in line:
                pid = _port_db_child(data)
                assert pid is not None, "synapse_port_db is not running"
                os.kill(pid, signal.SIGSTOP)  # held where it is while we look at the database
                rows = _rows_so_far(data)
                os.kill(pid, signal.SIGKILL)
                break
        said += port.stderr.readlines()
        assert port.wait(timeout=120) == 1, "".join(said)
        assert rows > 0  # killed half-way: Synapse's schema was in PostgreSQL, the port not finished
        text = "".join(said)
        failed = "synapse-workers: port-sqlite: FAILED: synapse_port_db was killed (SIGKILL). Nothing changed: "
        assert failed in text, text
        assert "the partly filled PostgreSQL database was dropped" in text and "Traceback" not in text
        assert _fingerprint(data) == before  # the SQLite file (sha256), homeserver.yaml, media: untouched
        assert not (data / MARKER).exists() and not (data / ".synapse-workers-port-sqlite").exists()
        plan = json.loads(subprocess.run([SW, "plan", "--json"], env=env, capture_output=True, text=True).stdout)
        assert plan["sqlite_port"] is None and plan["postgres"] is None

        # 1b. The command itself stopped (`docker stop`: SIGTERM) while synapse_port_db runs: the same.
        port = subprocess.Popen([SW, "port-sqlite"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        said = []
        for line in port.stderr:
            said.append(line)
            if "Running background updates on PostgreSQL" in line or "Creating port tables" in line:
                port.send_signal(signal.SIGTERM)
                break
        said += port.stderr.readlines()
        assert port.wait(timeout=30) == 128 + signal.SIGTERM, "".join(said)
        assert "FAILED: the port was interrupted (SIGTERM). Nothing changed: " in "".join(said), "".join(said)
        assert _fingerprint(data) == before and not (data / MARKER).exists()
        assert _port_db_child(data) is None and not (data / ".synapse-workers-port-sqlite").exists()
        assert not any(str(data / "postgres").encode() in p.cmdline for p in process_table().values())

        # 2. The SQLite server starts as before and serves every message.
        stack = Stack(env).start()
        check_served(stack.base_url, clone)
        assert stack.stop()[0] == 0, stack.tail()
        before = _fingerprint(data)  # Synapse wrote to its database meanwhile (logins): the new state is the baseline

        # 3. The port again (from an empty database), then workers.
        started = time.monotonic()
        ported = subprocess.run([SW, "port-sqlite"], env=env, capture_output=True, text=True, timeout=600)
        seconds = time.monotonic() - started
        assert ported.returncode == 0, ported.stderr
        assert "synapse-workers: port-sqlite: Copying to postgres" in ported.stderr  # its own progress, summarised
        assert "synapse-workers: port-sqlite: done in" in ported.stderr
        assert _fingerprint(data) == before and (data / "homeserver.yaml").read_bytes() == homeserver_bytes
        marker = json.loads((data / MARKER).read_text())
        assert marker["sqlite_database"] == str(data / "homeserver.db")
        assert marker["sqlite_sha256"] == before["homeserver.db"]
        assert marker["homeserver_yaml"] == str(data / "homeserver.yaml") and marker["ported_at"].endswith("Z")
        print(f"port of {len(clone.bodies)} messages: {seconds:.1f} s")

        again = subprocess.run([SW, "port-sqlite"], env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and "already ported" in again.stderr, again.stderr
        assert (data / MARKER).read_text() == json.dumps(marker, indent=2) + "\n"

        env = {**env, "SYNAPSE_WORKER_TYPES": WORKERS}
        plan = json.loads(subprocess.run([SW, "plan", "--json"], env=env, capture_output=True, text=True).stdout)
        assert plan["sqlite_port"]["sqlite_database"] == str(data / "homeserver.db") and plan["postgres"] is not None
        assert [w["name"] for w in plan["workers"]] == ["synchrotron1", "event_persister1"]
        stack = Stack(env).start()
        check_served(stack.base_url, clone)
        # New messages go to PostgreSQL (through the event persister): the SQLite file stays as it was ported.
        token = login(stack.base_url, "alice")
        sent = httpx.put(f"{stack.base_url}/_matrix/client/v3/rooms/{quote(clone.room_id)}/send/m.room.message/new",
                         json={"msgtype": "m.text", "body": "after the port"}, headers=auth(token), timeout=30)
        assert sent.status_code == 200, sent.text
        clone.bodies.append("after the port")
        check_served(stack.base_url, clone)
        assert stack.stop()[0] == 0, stack.tail()
        assert sha256(data / "homeserver.db") == before["homeserver.db"]
        assert (data / "homeserver.yaml").read_bytes() == homeserver_bytes
    finally:
        if stack is not None:
            stack.close()
        shutil.rmtree(root, ignore_errors=True)


def test_the_start_switch_ports_before_anything_starts(official):
    """SYNAPSE_PORT_SQLITE=on with workers set: `run` ports first (instead of refusing SQLite), then starts."""
    root, clone, env = clone_data_dir(official, "sw-port-b-", WORKERS, SYNAPSE_PORT_SQLITE="on")
    stack = None
    try:
        data = clone.data
        before = _fingerprint(data)
        stack = Stack(env).start(timeout=600)
        log = stack.log_path.read_text(errors="replace")
        assert "SYNAPSE_PORT_SQLITE is on" in log and "synapse-workers: port-sqlite: done in" in log, log
        assert (data / MARKER).exists()
        check_served(stack.base_url, clone)
        assert stack.stop()[0] == 0, stack.tail()
        assert _fingerprint(data)["homeserver.yaml"] == before["homeserver.yaml"]
        assert _fingerprint(data)["homeserver.db"] == before["homeserver.db"]
        # Started again with the switch still on: ported already, nothing is ported twice.
        stack = Stack(env).start()
        log = stack.log_path.read_text(errors="replace")  # both starts
        assert log.count("port-sqlite: done in") == 1 and log.count("SYNAPSE_PORT_SQLITE is on") == 1
        check_served(stack.base_url, clone)
        assert stack.stop()[0] == 0, stack.tail()
        # --force starts over from the SQLite file (the marker is written again).
        first = json.loads((data / MARKER).read_text())
        forced = subprocess.run([SW, "port-sqlite", "--force"], env=env, capture_output=True, text=True, timeout=600)
        assert forced.returncode == 0, forced.stderr
        assert f"--force: removed {data / MARKER}" in forced.stderr
        again = json.loads((data / MARKER).read_text())
        assert again["sqlite_sha256"] == first["sqlite_sha256"] == before["homeserver.db"]
    finally:
        if stack is not None:
            stack.close()
        shutil.rmtree(root, ignore_errors=True)
