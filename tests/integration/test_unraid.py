"""The Unraid template, installed as Unraid installs it: the container dockerMan's xmlToCommand builds from
contrib/unraid/synapse-workers.xml (tests/support/unraid.py), run with podman against the image built from
this tree, as a new user who filled in only the fields the form requires (server name, report stats), the Data
path pointed at a temp dir and the public port at a free loopback port.

- on the bridge network (the template's): healthy; the registration, macaroon and form secrets random, 0600,
  not the word "generated"; a client registers with the shared secret read from the data dir and chats;
  Unraid's own variables (TZ, HOST_OS) give no warning;
- on the host network: Unraid publishes nothing and passes TCP_PORT_8008=<the form's host port> instead;
  nginx listens there (bound to loopback here, internal ports from a free range: the test shares the host's
  network).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.matrix import RoomCreateResponse, expect, login, register, registration_secret, send_and_receive
from tests.support.podman import IMAGE, TIMINGS, Podman
from tests.support.unraid import UNRAID_TZ, UnraidCommand, xml_to_command

from ..conftest import free_port, free_port_range

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "contrib/unraid/synapse-workers.xml"
SERVER = "localhost"
# A new user fills in the form's required fields only.
NEW_USER = {"SYNAPSE_SERVER_NAME": SERVER, "SYNAPSE_REPORT_STATS": "no"}
SECRET_FILES = ("registration", "macaroon", "form")

pytestmark = pytest.mark.integration


@pytest.fixture
def appdata() -> Iterator[Path]:
    """The user's appdata share, stood in for by a temp dir (removed afterwards, whoever owns what is in it)."""
    root = Path(tempfile.mkdtemp(prefix="sw-unraid-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def start(podman: Podman, appdata: Path, filled: dict[str, str], network: str = "bridge") -> UnraidCommand:
    """What Unraid does on Apply: the command from the template, the missing host paths made, create, start."""
    form = {**filled, "Data": str(appdata / "synapse-workers"), "Prometheus data": str(appdata / "prometheus"),
            "Backups": str(appdata / "backups")}
    command = xml_to_command(TEMPLATE, form, network=network, name=f"sw-test-{secrets.token_hex(4)}", image=IMAGE)
    command.create_paths()
    podman.created.append(("container", command.name))
    podman(*command.argv("create"))
    podman("start", command.name)
    return command


def check_secrets(data: Path) -> None:
    values = []
    for kind in SECRET_FILES:
        path = data / f"{SERVER}.{kind}.key"
        assert path.stat().st_mode & 0o777 == 0o600, (path, oct(path.stat().st_mode))
        value = path.read_text().strip()
        assert value != "generated" and len(value) >= 32 and re.fullmatch(r"[\x21-\x7e]+", value), (kind, len(value))
        values.append(value)
    assert len(set(values)) == len(values), "two secrets are the same"
    turn = data / f"{SERVER}.turn.key"
    assert not turn.exists() or turn.stat().st_mode & 0o777 == 0o600
    assert "generated" not in (data / "homeserver.yaml").read_text()


def check_no_warning_about_unraids_variables(podman: Podman, name: str) -> None:
    logs = podman.logs(name)
    # Our own lines only: Synapse's log quotes event and room IDs, whose base64 may hold "-TZ" by chance.
    ours = "\n".join(line for line in logs.splitlines() if line.startswith("synapse-workers"))
    for word in ("TZ", "HOST_OS", "TCP_PORT_"):
        assert not re.search(rf"\b{word}", ours), f"{word} in our lines:\n{ours[-3000:]}"
    assert "Traceback" not in logs, logs[-3000:]


async def chat(base_url: str, room_name: str) -> None:
    alice = await login(base_url, "alice", server_name=SERVER, device_name="unraid")
    bob = await login(base_url, "bob", server_name=SERVER, device_name="unraid")
    try:
        room_id = expect(await alice.room_create(name=room_name, invite=[bob.user_id]), RoomCreateResponse).room_id
        await bob.join(room_id)
        await send_and_receive(alice, bob, room_id, [f"hello from Unraid {secrets.token_hex(4)}"])
        await send_and_receive(bob, alice, room_id, [f"hello back {secrets.token_hex(4)}"])
    finally:
        await alice.close()
        await bob.close()


def register_and_chat(base_url: str, data: Path, room_name: str) -> None:
    secret = registration_secret(data, SERVER)  # read from the data dir, as an admin would
    register(base_url, secret, "alice", admin=True)
    register(base_url, secret, "bob")
    asyncio.run(chat(base_url, room_name))


def test_new_user_on_the_bridge_network(podman, appdata):
    port = free_port()
    # The Port field's host side: a loopback address and a free port (on Unraid: the server's port 8008).
    command = start(podman, appdata, {**NEW_USER, "Public port": f"127.0.0.1:{port}"})
    assert command.ports == [(f"127.0.0.1:{port}", "8008", "tcp")]  # no 8448, no TURN ports
    assert command.env["SYNAPSE_REGISTRATION_SHARED_SECRET"] == "" and command.env["TZ"] == UNRAID_TZ
    TIMINGS["unraid: first start to healthy (s)"] = round(podman.wait_healthy(command.name), 1)
    base_url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base_url}/health", timeout=10).text == "OK"
    data = appdata / "synapse-workers"
    check_secrets(data)
    register_and_chat(base_url, data, "unraid bridge")
    # The WebUI link of the template answers.
    webui = httpx.get(f"{base_url}/_matrix/static/", timeout=10)
    assert webui.status_code == 200, webui.status_code
    # Unraid's time zone reaches the processes (the compressor's schedule is in local time).
    assert podman("exec", command.name, "date", "+%Z").stdout.strip() in ("CET", "CEST")
    # Prometheus's and the backups' volumes are the template's Paths, not anonymous volumes.
    mounts = podman("inspect", "--format", "{{range .Mounts}}{{.Destination}}={{.Type}} {{end}}", command.name)
    assert set(mounts.stdout.split()) == {"/data=bind", "/var/lib/prometheus=bind", "/backups=bind"}, mounts.stdout
    check_no_warning_about_unraids_variables(podman, command.name)
    TIMINGS["unraid: stop (s)"] = round(podman.stop(command.name), 2)
    assert podman("inspect", "--format", "{{.State.ExitCode}}", command.name).stdout.strip() == "0"


def test_new_user_on_the_host_network(podman, appdata):
    port = free_port()
    base = free_port_range(40)
    # On the host network the stack shares the host's ports: nginx bound to loopback and internal ports from a
    # free range here (advanced fields a user on a busy host fills in too).
    filled = {**NEW_USER, "Public port": str(port), "SYNAPSE_HTTP_BIND_ADDRESS": "127.0.0.1",
              "SYNAPSE_INTERNAL_PORT_BASE": str(base)}  # fmt: skip
    command = start(podman, appdata, filled, network="host")
    assert command.ports == [] and command.env["TCP_PORT_8008"] == str(port)
    TIMINGS["unraid host network: first start to healthy (s)"] = round(podman.wait_healthy(command.name), 1)
    base_url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base_url}/health", timeout=10).text == "OK"
    data = appdata / "synapse-workers"
    check_secrets(data)
    register_and_chat(base_url, data, "unraid host")
    check_no_warning_about_unraids_variables(podman, command.name)
    podman.stop(command.name)
    assert podman("inspect", "--format", "{{.State.ExitCode}}", command.name).stdout.strip() == "0"
