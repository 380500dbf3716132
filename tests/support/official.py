"""An official-image Synapse data dir after a life on SQLite, for the port-sqlite tests (and the backup of a ported
server): homeserver.yaml and signing key from Synapse's own --generate-config (as Synapse's user, 991), an
application service registration, run as a monolith on SQLite through `synapse-workers run` and populated through
the public port (users, a room with messages, media, an appservice user); and the check that a server serves all of
it back (the server itself is the oracle: /messages in order, logins with the passwords, media byte-identical, the
appservice's users known)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
import yaml

from tests.support.matrix import PASSWORD, register, unlimited
from tests.support.stack import Stack, make_root, stack_env, wait_for

PYTHON = sys.executable
SERVER = "localhost"
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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def chown_tree(path: Path, uid: int = 991) -> None:
    os.chown(path, uid, uid)
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, uid, follow_symlinks=False)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def login(base_url: str, user: str, password: str = PASSWORD) -> str:
    body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password}
    response = httpx.post(f"{base_url}/_matrix/client/v3/login", json=body, timeout=30)
    assert response.status_code == 200, f"login {user}: {response.status_code} {response.text}"
    return response.json()["access_token"]


def official_data_dir(root: Path) -> Path:
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
    chown_tree(data)
    return data


def populate(stack: Stack, populated: Populated, messages: int = N_MESSAGES) -> None:
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
                         headers=auth(a))  # fmt: skip
        assert room.status_code == 200, room.text
        populated.room_id = room.json()["room_id"]
        assert http.post(f"/_matrix/client/v3/join/{quote(populated.room_id)}", json={}, headers=auth(b)).is_success
        for i in range(messages):
            token, who = (a, "alice") if i % 3 else (b, "bob")
            body = f"message {i:03d} from {who} before the port"
            sent = http.put(f"/_matrix/client/v3/rooms/{quote(populated.room_id)}/send/m.room.message/txn-{i}",
                            json={"msgtype": "m.text", "body": body}, headers=auth(token))  # fmt: skip
            assert sent.status_code == 200, sent.text
            populated.bodies.append(body)
            if i % 13 == 5:  # media: uploaded, then sent as an image
                content = os.urandom(50_000 + i)
                upload = http.post("/_matrix/media/v3/upload", params={"filename": f"f{i}.bin"}, content=content,
                                   headers={**auth(token), "Content-Type": "application/octet-stream"})  # fmt: skip
                assert upload.status_code == 200, upload.text
                mxc = upload.json()["content_uri"]
                populated.media[mxc.rsplit("/", 1)[1]] = content
                body = f"image {i:03d}"
                content_ = {"msgtype": "m.image", "body": body, "url": mxc}
                sent = http.put(f"/_matrix/client/v3/rooms/{quote(populated.room_id)}/send/m.room.message/img-{i}",
                                json=content_, headers=auth(token))  # fmt: skip
                assert sent.status_code == 200, sent.text
                populated.bodies.append(body)
        # The appservice registers a user in its namespace (stored with its appservice_id).
        registered = http.post("/_matrix/client/v3/register", headers=auth(AS_TOKEN),
                               json={"type": "m.login.application_service", "username": "bridge_alpha"})  # fmt: skip
        assert registered.status_code == 200, registered.text
    # synapse_port_db refuses a database with background updates pending: a new server runs its own first.
    database = populated.data / "homeserver.db"
    assert wait_for(lambda: pending_background_updates(database) == 0, timeout=120), "background updates pending"


def pending_background_updates(database: Path) -> int:
    import sqlite3

    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return connection.execute("SELECT count(*) FROM background_updates").fetchone()[0]
    finally:
        connection.close()


def check_served(base_url: str, populated: Populated) -> None:
    """Every message back through /messages, in order, once; logins with the passwords; media byte-identical; the
    appservice's sender and its registered user known."""
    alice, bob = login(base_url, "alice"), login(base_url, "bob")
    with httpx.Client(base_url=base_url, timeout=30) as http:
        events: list[dict] = []
        start = None
        while True:
            params = {"dir": "f", "limit": "100", **({"from": start} if start else {})}
            page = http.get(f"/_matrix/client/v3/rooms/{quote(populated.room_id)}/messages", params=params,
                            headers=auth(bob))  # fmt: skip
            assert page.status_code == 200, page.text
            chunk = page.json()
            events += chunk["chunk"]
            if not chunk["chunk"] or "end" not in chunk:
                break
            start = chunk["end"]
        bodies = [e["content"]["body"] for e in events if e["type"] == "m.room.message"]
        assert bodies == populated.bodies
        for media_id, content in populated.media.items():
            got = http.get(f"/_matrix/client/v1/media/download/{SERVER}/{media_id}", headers=auth(alice))
            assert got.status_code == 200 and got.content == content, (media_id, got.status_code)
        me = http.get("/_matrix/client/v3/account/whoami", headers=auth(AS_TOKEN))
        assert me.status_code == 200 and me.json()["user_id"] == f"@bridgebot:{SERVER}", me.text
        puppet = http.get("/_matrix/client/v3/account/whoami", params={"user_id": f"@bridge_alpha:{SERVER}"},
                          headers=auth(AS_TOKEN))  # fmt: skip
        assert puppet.status_code == 200 and puppet.json()["user_id"] == f"@bridge_alpha:{SERVER}", puppet.text
        known = http.get(f"/_synapse/admin/v2/users/@bridge_alpha:{SERVER}", headers=auth(alice))
        assert known.status_code == 200 and known.json()["appservice_id"] == "bridge", known.text


@contextmanager
def official_server(
    prefix: str, while_running: Callable[[Stack, Populated], None] | None = None, messages: int = N_MESSAGES
) -> Iterator[Populated]:
    """A populated official-image data dir (run as a monolith on SQLite, populated, stopped again) under a new root
    (removed afterwards). while_running(stack, populated): a look at the running SQLite server before it stops."""
    root = make_root(prefix)
    stack = None
    try:
        populated = Populated(official_data_dir(root))
        env = stack_env(root, "", SYNAPSE_CONFIG_PATH=str(populated.data / "homeserver.yaml"),
                        SYNAPSE_LAUNCH_MODE="fork")  # fmt: skip
        stack = Stack(env).start()
        populate(stack, populated, messages)
        if while_running is not None:
            while_running(stack, populated)
        code, _ = stack.stop()
        assert code == 0, stack.tail()
        yield populated
    finally:
        if stack is not None:
            stack.close()
        shutil.rmtree(root, ignore_errors=True)


def clone_data_dir(official: Populated, prefix: str, workers: str = "", **extra: str) -> tuple[Path, Populated, dict]:
    """The data dir copied under a new root (its paths in homeserver.yaml and the registration moved with it)."""
    root = make_root(prefix)
    data = root / "data"
    shutil.copytree(official.data, data, symlinks=True)
    for name in ("homeserver.yaml",):
        text = (data / name).read_text().replace(str(official.data), str(data))
        (data / name).write_text(text)
    chown_tree(data)
    copy = Populated(data, official.room_id, list(official.bodies), dict(official.media))
    env = stack_env(root, workers, SYNAPSE_CONFIG_PATH=str(data / "homeserver.yaml"), SYNAPSE_LAUNCH_MODE="fork",
                    **extra)  # fmt: skip
    return root, copy, env
