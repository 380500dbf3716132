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
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import yaml

from tests.support.matrix import PASSWORD, register, unlimited
from tests.support.stack import SW, Stack, make_root, process_table, stack_env, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the official image's data dir is Synapse's user's (991)")

PYTHON = sys.executable
SERVER = "localhost"
WORKERS = "synchrotron,event_persister"
MARKER = "synapse-workers-postgres.json"
AS_TOKEN = "as-token-0123456789abcdef"
N_MESSAGES = 40


@dataclass
class Populated:
    """The official-image data dir after a life on SQLite, and what the server acknowledged."""

    data: Path
    room_id: str = ""
    bodies: list[str] = field(default_factory=list)  # m.room.message bodies, in sending order
    media: dict[str, bytes] = field(default_factory=dict)  # mxc media id → content


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _chown_tree(path: Path, uid: int = 991) -> None:
    os.chown(path, uid, uid)
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, uid, follow_symlinks=False)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _login(base_url: str, user: str, password: str = PASSWORD) -> str:
    body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password}
    response = httpx.post(f"{base_url}/_matrix/client/v3/login", json=body, timeout=30)
    assert response.status_code == 200, f"login {user}: {response.status_code} {response.text}"
    return response.json()["access_token"]


def _official_data_dir(root: Path) -> Path:
    """What the official image's `generate` leaves: Synapse's own --generate-config, as Synapse's user (991), plus an
    application service registration listed in homeserver.yaml (as a bridge's instructions have the admin add)."""
    data = root / "data"
    data.mkdir()
    os.chown(data, 991, 991)
    result = subprocess.run(
        [PYTHON, "-m", "synapse.app.homeserver", "--generate-config", "--server-name", SERVER, "--report-stats=no",
         "--config-path", str(data / "homeserver.yaml"), "--data-directory", str(data)],
        capture_output=True, text=True, timeout=120, cwd=data, user=991, group=991, extra_groups=[],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    registration = {
        "id": "bridge", "url": None, "as_token": AS_TOKEN, "hs_token": "hs-token-0123456789abcdef",
        "sender_localpart": "bridgebot", "rate_limited": False,
        "namespaces": {"users": [{"exclusive": True, "regex": f"@bridge_.*:{SERVER}"}], "aliases": [], "rooms": []},
    }  # fmt: skip
    (data / "appservice-bridge.yaml").write_text(yaml.safe_dump(registration))
    with open(data / "homeserver.yaml", "a") as handle:
        handle.write(f"\napp_service_config_files:\n  - {data}/appservice-bridge.yaml\n")
    _chown_tree(data)
    return data


def _populate(stack: Stack, populated: Populated) -> None:
    """Users (shared-secret registration), a room, messages, media, an appservice user: through the public port."""
    base = stack.base_url
    config = yaml.safe_load((populated.data / "homeserver.yaml").read_text())
    secret = config["registration_shared_secret"]
    alice = register(base, secret, "alice", admin=True)
    bob = register(base, secret, "bob")
    for user in (alice, bob):
        unlimited(base, alice["access_token"], user["user_id"])
    a, b = alice["access_token"], bob["access_token"]
    with httpx.Client(base_url=base, timeout=30) as http:
        room = http.post("/_matrix/client/v3/createRoom", json={"name": "ported", "invite": [bob["user_id"]]},
                         headers=_auth(a))  # fmt: skip
        assert room.status_code == 200, room.text
        populated.room_id = room.json()["room_id"]
        assert http.post(f"/_matrix/client/v3/join/{quote(populated.room_id)}", json={}, headers=_auth(b)).is_success
        for i in range(N_MESSAGES):
            token, who = (a, "alice") if i % 3 else (b, "bob")
            body = f"message {i:03d} from {who} before the port"
            sent = http.put(f"/_matrix/client/v3/rooms/{quote(populated.room_id)}/send/m.room.message/txn-{i}",
                            json={"msgtype": "m.text", "body": body}, headers=_auth(token))  # fmt: skip
            assert sent.status_code == 200, sent.text
            populated.bodies.append(body)
            if i % 13 == 5:  # media: uploaded, then sent as an image
                content = os.urandom(50_000 + i)
                upload = http.post("/_matrix/media/v3/upload", params={"filename": f"f{i}.bin"}, content=content,
                                   headers={**_auth(token), "Content-Type": "application/octet-stream"})  # fmt: skip
                assert upload.status_code == 200, upload.text
                mxc = upload.json()["content_uri"]
                populated.media[mxc.rsplit("/", 1)[1]] = content
                body = f"image {i:03d}"
                content_ = {"msgtype": "m.image", "body": body, "url": mxc}
                sent = http.put(f"/_matrix/client/v3/rooms/{quote(populated.room_id)}/send/m.room.message/img-{i}",
                                json=content_, headers=_auth(token))  # fmt: skip
                assert sent.status_code == 200, sent.text
                populated.bodies.append(body)
        # The appservice registers a user in its namespace (stored with its appservice_id).
        registered = http.post("/_matrix/client/v3/register", headers=_auth(AS_TOKEN),
                               json={"type": "m.login.application_service", "username": "bridge_alpha"})  # fmt: skip
        assert registered.status_code == 200, registered.text
    # synapse_port_db refuses a database with background updates pending: a new server runs its own first.
    database = populated.data / "homeserver.db"
    assert wait_for(lambda: _pending_background_updates(database) == 0, timeout=120), "background updates pending"


def _pending_background_updates(database: Path) -> int:
    import sqlite3

    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return connection.execute("SELECT count(*) FROM background_updates").fetchone()[0]
    finally:
        connection.close()


def _check_served(base_url: str, populated: Populated) -> None:
    """Every message back through /messages, in order, once; logins with the passwords; media byte-identical; the
    appservice's sender and its registered user known."""
    alice, bob = _login(base_url, "alice"), _login(base_url, "bob")
    with httpx.Client(base_url=base_url, timeout=30) as http:
        events: list[dict] = []
        start = None
        while True:
            params = {"dir": "f", "limit": "100", **({"from": start} if start else {})}
            page = http.get(f"/_matrix/client/v3/rooms/{quote(populated.room_id)}/messages", params=params,
                            headers=_auth(bob))  # fmt: skip
            assert page.status_code == 200, page.text
            chunk = page.json()
            events += chunk["chunk"]
            if not chunk["chunk"] or "end" not in chunk:
                break
            start = chunk["end"]
        bodies = [e["content"]["body"] for e in events if e["type"] == "m.room.message"]
        assert bodies == populated.bodies
        for media_id, content in populated.media.items():
            got = http.get(f"/_matrix/client/v1/media/download/{SERVER}/{media_id}", headers=_auth(alice))
            assert got.status_code == 200 and got.content == content, (media_id, got.status_code)
        me = http.get("/_matrix/client/v3/account/whoami", headers=_auth(AS_TOKEN))
        assert me.status_code == 200 and me.json()["user_id"] == f"@bridgebot:{SERVER}", me.text
        puppet = http.get("/_matrix/client/v3/account/whoami", params={"user_id": f"@bridge_alpha:{SERVER}"},
                          headers=_auth(AS_TOKEN))  # fmt: skip
        assert puppet.status_code == 200 and puppet.json()["user_id"] == f"@bridge_alpha:{SERVER}", puppet.text
        known = http.get(f"/_synapse/admin/v2/users/@bridge_alpha:{SERVER}", headers=_auth(alice))
        assert known.status_code == 200 and known.json()["appservice_id"] == "bridge", known.text


@pytest.fixture(scope="module")
def official():
    """A populated official-image data dir (monolith on SQLite, stopped), built once; tests port clones of it."""
    root = make_root("sw-port-")
    stack = None
    try:
        populated = Populated(_official_data_dir(root))
        env = stack_env(root, "", SYNAPSE_CONFIG_PATH=str(populated.data / "homeserver.yaml"),
                        SYNAPSE_LAUNCH_MODE="fork")  # fmt: skip
        stack = Stack(env).start()
        _populate(stack, populated)
        # While the stack runs on it, the port is refused (exit 2) and nothing is written.
        refused = stack.cli("port-sqlite")
        assert refused.returncode == 2, refused.stderr
        assert "a stack is running on this data dir" in refused.stderr and "Traceback" not in refused.stderr
        assert not (populated.data / MARKER).exists()
        code, _ = stack.stop()
        assert code == 0, stack.tail()
        yield populated
    finally:
        if stack is not None:
            stack.close()
        shutil.rmtree(root, ignore_errors=True)


def _clone(official: Populated, prefix: str, workers: str = "", **extra: str) -> tuple[Path, Populated, dict]:
    """The data dir copied under a new root (its paths in homeserver.yaml and the registration moved with it)."""
    root = make_root(prefix)
    data = root / "data"
    shutil.copytree(official.data, data, symlinks=True)
    for name in ("homeserver.yaml",):
        text = (data / name).read_text().replace(str(official.data), str(data))
        (data / name).write_text(text)
    _chown_tree(data)
    clone = Populated(data, official.room_id, list(official.bodies), dict(official.media))
    env = stack_env(root, workers, SYNAPSE_CONFIG_PATH=str(data / "homeserver.yaml"), SYNAPSE_LAUNCH_MODE="fork",
                    **extra)  # fmt: skip
    return root, clone, env


def _fingerprint(data: Path) -> dict[str, str]:
    """The user's files: homeserver.yaml, the SQLite database, the registration, the signing key, the media."""
    files = [data / "homeserver.yaml", data / "homeserver.db", data / "appservice-bridge.yaml",
             data / f"{SERVER}.signing.key", *sorted((data / "media_store").rglob("*"))]  # fmt: skip
    return {str(p.relative_to(data)): _sha256(p) for p in files if p.is_file()}


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
    root, clone, env = _clone(official, "sw-port-a-")
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
        _check_served(stack.base_url, clone)
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
        _check_served(stack.base_url, clone)
        # New messages go to PostgreSQL (through the event persister): the SQLite file stays as it was ported.
        token = _login(stack.base_url, "alice")
        sent = httpx.put(f"{stack.base_url}/_matrix/client/v3/rooms/{quote(clone.room_id)}/send/m.room.message/new",
                         json={"msgtype": "m.text", "body": "after the port"}, headers=_auth(token), timeout=30)
        assert sent.status_code == 200, sent.text
        clone.bodies.append("after the port")
        _check_served(stack.base_url, clone)
        assert stack.stop()[0] == 0, stack.tail()
        assert _sha256(data / "homeserver.db") == before["homeserver.db"]
        assert (data / "homeserver.yaml").read_bytes() == homeserver_bytes
    finally:
        if stack is not None:
            stack.close()
        shutil.rmtree(root, ignore_errors=True)


def test_the_start_switch_ports_before_anything_starts(official):
    """SYNAPSE_PORT_SQLITE=on with workers set: `run` ports first (instead of refusing SQLite), then starts."""
    root, clone, env = _clone(official, "sw-port-b-", WORKERS, SYNAPSE_PORT_SQLITE="on")
    stack = None
    try:
        data = clone.data
        before = _fingerprint(data)
        stack = Stack(env).start(timeout=600)
        log = stack.log_path.read_text(errors="replace")
        assert "SYNAPSE_PORT_SQLITE is on" in log and "synapse-workers: port-sqlite: done in" in log, log
        assert (data / MARKER).exists()
        _check_served(stack.base_url, clone)
        assert stack.stop()[0] == 0, stack.tail()
        assert _fingerprint(data)["homeserver.yaml"] == before["homeserver.yaml"]
        assert _fingerprint(data)["homeserver.db"] == before["homeserver.db"]
        # Started again with the switch still on: ported already, nothing is ported twice.
        stack = Stack(env).start()
        log = stack.log_path.read_text(errors="replace")  # both starts
        assert log.count("port-sqlite: done in") == 1 and log.count("SYNAPSE_PORT_SQLITE is on") == 1
        _check_served(stack.base_url, clone)
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
