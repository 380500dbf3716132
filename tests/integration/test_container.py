"""The container image, built and run for real with podman, as a Docker user would run it.

The image is built once per session by scripts/build-image.sh (debootstrapped base, podman build; the
fixtures are in conftest.py, the runner in tests/support/podman.py). Each test runs containers with unique
names on podman volumes, the public port published on a free loopback port, and removes them (and their
volumes) whatever happens.

- new install from the environment only (workers, embedded PostgreSQL): a Matrix client registers, chats and
  uploads media; the HEALTHCHECK turns healthy; `podman stop` is clean and fast; a new container on the same
  volume still has the messages;
- the move from the official image: homeserver.yaml and signing key made by Synapse's own --generate-config
  (SQLite, port 8008): the container serves it as it is and the file is byte-identical afterwards; workers on
  that SQLite database are refused with a clear error.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import yaml

from tests.support.matrix import check_still_works, login, register, scenario
from tests.support.podman import IMAGE, TIMINGS

from ..conftest import free_port

SERVER = "localhost"
WORKERS = "synchrotron, media_repository, event_persister, stream_writers=typing+to_device+receipts"

pytestmark = pytest.mark.integration


def test_image_metadata(podman):
    inspect = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    config = inspect["Config"]
    assert config["Entrypoint"][0] == "/usr/bin/tini"
    assert config["Cmd"] == ["run"]
    assert "8008/tcp" in config["ExposedPorts"] and "8448/tcp" in config["ExposedPorts"]
    assert "/data" in config["Volumes"]
    assert "/var/lib/prometheus" in config["Volumes"]  # the built-in Prometheus's database, a volume of its own
    assert "/backups" in config["Volumes"] and "SYNAPSE_BACKUP_DIR=/backups" in config["Env"]  # backups' own volume
    assert inspect["Healthcheck"]["Test"] == ["CMD", "synapse-workers", "health"]  # kept by --format docker
    # No compilers, headers or package lists in the final stage.
    probe = podman(
        "run", "--rm", "--entrypoint", "bash", IMAGE, "-c",
        "command -v gcc cc make || true; ls /usr/include/python3.11 /var/lib/apt/lists/*_Packages* 2>/dev/null || true;"
        " ls /root/.cache/pip 2>/dev/null || true",
    )
    assert probe.stdout.strip() == "", probe.stdout
    # Prometheus's storage default in the image: a directory its own user (Debian's `prometheus`) owns.
    storage = podman("run", "--rm", "--entrypoint", "bash", IMAGE, "-c",
                     'echo "$PROMETHEUS_STORAGE_PATH"; stat -c %U "$PROMETHEUS_STORAGE_PATH"').stdout.split()
    assert storage == ["/var/lib/prometheus", "prometheus"]
    # `docker run IMAGE env` works through the entrypoint (secrets masked).
    out = podman("run", "--rm", "-e", "POSTGRES_PASSWORD=hunter2", IMAGE, "env").stdout
    assert "POSTGRES_PASSWORD=<hidden>" in out and "hunter2" not in out and "#SYNAPSE_WORKER_TYPES=" in out


def test_new_install_with_workers_chat_media_stop_restart(podman):
    volume = podman.volume()
    port = free_port()
    env = {"SYNAPSE_SERVER_NAME": SERVER, "SYNAPSE_REPORT_STATS": "no", "SYNAPSE_WORKER_TYPES": WORKERS}
    name = podman.run(volume, port, env)
    TIMINGS["first start to healthy (s)"] = round(podman.wait_healthy(name), 1)
    status = podman("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
    assert status == "healthy", status
    base_url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base_url}/health", timeout=10).text == "OK"

    data = podman.mountpoint(volume)
    result = asyncio.run(scenario(base_url, data, SERVER))  # register, room, messages, media, ...
    assert result.room_id and result.event_ids
    # Synapse runs as 991 (the default UID/GID), the data dir is theirs.
    assert (data / "homeserver.yaml").stat().st_uid == 991
    top = podman("top", name, "huser", "args").stdout.splitlines()[1:]
    synapse_users = {line.split()[0] for line in top if "synapse.app" in line}
    assert synapse_users == {"991"}, top

    TIMINGS["stop, workers (s)"] = round(podman.stop(name), 2)
    assert TIMINGS["stop, workers (s)"] < 8
    assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    assert "stopped (exit code 0)" in podman.logs(name)
    podman("rm", name)

    # A new container on the same volume (an upgrade): the users, the room and every message are there.
    port = free_port()
    name = podman.run(volume, port, env)
    TIMINGS["restart to healthy (s)"] = round(podman.wait_healthy(name), 1)
    base_url = f"http://127.0.0.1:{port}"
    asyncio.run(_messages_are_there(base_url, result.room_id, result.event_ids))
    asyncio.run(check_still_works(base_url, result.room_id, SERVER, label="restarted"))
    TIMINGS["stop after restart (s)"] = round(podman.stop(name), 2)
    assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"


async def _messages_are_there(base_url: str, room_id: str, event_ids: list[str]) -> None:
    client = await login(base_url, "bob", server_name=SERVER, device_name="bob-after-restart")
    try:
        path = f"/_matrix/client/v3/rooms/{quote(room_id)}/messages?dir=b&limit=500"
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.get(base_url + path, headers={"Authorization": f"Bearer {client.access_token}"})
        assert response.status_code == 200, response.text
        stored = {event["event_id"] for event in response.json()["chunk"]}
        assert set(event_ids) <= stored, set(event_ids) - stored
    finally:
        await client.close()


def test_move_from_the_official_image(podman):
    """/data as the official matrixdotorg/synapse image leaves it: Synapse's own --generate-config."""
    volume = podman.volume()
    podman(
        "run", "--rm", "--user", "991:991", "-v", f"{volume}:/data", "--entrypoint", "python", IMAGE,
        "-m", "synapse.app.homeserver", "--generate-config", "--server-name", SERVER,
        "--config-path", "/data/homeserver.yaml", "--data-directory", "/data", "--report-stats=no",
    )  # fmt: skip
    data = podman.mountpoint(volume)
    homeserver = data / "homeserver.yaml"
    before = hashlib.sha256(homeserver.read_bytes()).hexdigest()
    config = yaml.safe_load(homeserver.read_text())
    assert config["database"]["name"] == "sqlite3" and config["listeners"][0]["port"] == 8008
    assert (data / f"{SERVER}.signing.key").exists()

    # Workers on its SQLite database: refused before anything starts, with what to do.
    port = free_port()
    name = podman.run(volume, port, {"SYNAPSE_WORKER_TYPES": "synchrotron"})
    podman("wait", name, timeout=120)
    assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "2"
    assert "SQLite" in podman.logs(name) or "sqlite" in podman.logs(name)

    # As a monolith, no variable at all: the old port 8008 serves it (through nginx).
    name = podman.run(volume, port, {})
    TIMINGS["official /data to healthy (s)"] = round(podman.wait_healthy(name), 1)
    base_url = f"http://127.0.0.1:{port}"
    secret = config["registration_shared_secret"]
    register(base_url, secret, "alice", admin=True)
    register(base_url, secret, "bob")
    result = asyncio.run(_room_with_messages(base_url))
    TIMINGS["stop, monolith (s)"] = round(podman.stop(name), 2)
    assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    assert hashlib.sha256(homeserver.read_bytes()).hexdigest() == before, "homeserver.yaml was modified"
    assert result


async def _room_with_messages(base_url: str) -> bool:
    from tests.support.matrix import RoomCreateResponse, expect, send_and_receive

    alice = await login(base_url, "alice", server_name=SERVER, device_name="alice-migrated")
    bob = await login(base_url, "bob", server_name=SERVER, device_name="bob-migrated")
    try:
        room_id = expect(await alice.room_create(name="migrated", invite=[bob.user_id]), RoomCreateResponse).room_id
        await bob.join(room_id)
        await send_and_receive(alice, bob, room_id, [f"after the move {secrets.token_hex(4)}"])
        return True
    finally:
        await alice.close()
        await bob.close()



def test_post_arguments_of_an_official_template_start_the_stack(podman):
    """Unraid pastes a template's Post Arguments after the image name, so they replace CMD `run`: an official
    image's template carries `-m synapse.app.homeserver --config-path /data/homeserver.yaml`. The stack starts
    (healthy, serving the published port) and says what it ignored; the entrypoint's first-start step for `run`
    (an empty bind-mounted data dir, root's, given to 991:991) follows the same decision."""
    host = Path(tempfile.mkdtemp(prefix="sw-post-", dir="/tmp"))
    os.chmod(host, 0o755)  # root's and empty, as a runtime creates a missing bind-mount source
    try:
        port = free_port()
        name = f"sw-test-{secrets.token_hex(4)}"
        podman.created.append(("container", name))
        podman(
            "run", "-d", "--name", name, "-v", f"{host}:/data", "-p", f"127.0.0.1:{port}:8008",
            "-e", f"SYNAPSE_SERVER_NAME={SERVER}", "-e", "SYNAPSE_REPORT_STATS=no",
            IMAGE, "-m", "synapse.app.homeserver", "--config-path", "/data/homeserver.yaml",
        )  # fmt: skip
        TIMINGS["post arguments to healthy (s)"] = round(podman.wait_healthy(name), 1)
        logs = podman.logs(name)
        assert (
            "synapse-workers: warning: ignored the arguments `-m synapse.app.homeserver --config-path "
            "/data/homeserver.yaml`, written for the official Synapse image" in logs
        ), logs[-3000:]
        assert "/data is an empty mount point: giving it to 991:991" in logs
        assert (host.stat().st_uid, (host / "homeserver.yaml").stat().st_uid) == (991, 991)
        versions = httpx.get(f"http://127.0.0.1:{port}/_matrix/client/versions", timeout=10)
        assert versions.status_code == 200 and "versions" in versions.json()
        assert podman.stop(name) < 10
        assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    finally:
        shutil.rmtree(host, ignore_errors=True)
