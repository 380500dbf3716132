"""`export compose` checked by a real Compose v2 (`docker-compose config`, no engine needed; scripts/container-tools.sh
installs it) and by Synapse's own config loader on the files each service mounts. Not started here: there is no
Docker engine on these machines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synapse_workers.cli import main as cli_main
from synapse_workers.load import load_plan
from synapse_workers.render.export import COMPOSE, make_export

from ..unit.test_export_kubernetes import _normalise
from .test_compose import compose_binary

pytestmark = pytest.mark.integration

SCRIPT = str(Path(sys.executable).with_name("synapse-workers"))
COMPLEMENT = (
    "event_persister:2, background_worker, event_creator, user_dir, media_repository, federation_inbound, "
    "federation_reader, federation_sender, synchrotron, client_reader, appservice, pusher, device_lists:2, "
    "stream_writers=account_data+presence+receipts+to_device+typing"
)
SETS = {"monolith": "", "complement": COMPLEMENT, "full": "full", "persisters": "event_persister:4, synchrotron:3"}
OURS = {"synapse-init", "synapse-nginx", "synapse-postgres", "synapse-redis"}


@pytest.fixture
def env(base_env):
    return {**base_env, "SYNAPSE_HTTP_PORT": "8008"}


def export(env: dict[str, str], out: Path, spec: str) -> None:
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **env, "SYNAPSE_WORKER_TYPES": spec}
    result = subprocess.run(
        [SCRIPT, "export", "compose", "-o", str(out)], env=clean, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def compose(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNAPSE_", "POSTGRES_"))}
    return subprocess.run(
        [compose_binary(), "-f", str(out / "compose.yaml"), *args], env=env, capture_output=True, text=True, timeout=120
    )


def normalised(out: Path) -> dict:
    result = compose(out, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", SETS)
def test_compose_config_is_valid(env, tmp_root, name):
    out = tmp_root / "compose"
    export(env, out, SETS[name])
    result = compose(out, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_v2_catches_a_dangling_reference(env, tmp_root):
    out = tmp_root / "compose"
    export(env, out, "synchrotron")
    doc = yaml.safe_load((out / "compose.yaml").read_text())
    doc["services"]["synapse-nginx"]["depends_on"]["synapse-nope"] = {"condition": "service_healthy"}
    (out / "compose.yaml").write_text(yaml.safe_dump(doc))
    result = compose(out, "config", "-q")
    assert result.returncode != 0 and "synapse-nope" in result.stderr


@pytest.mark.parametrize("name", ["monolith", "complement"])
def test_compose_shape(env, tmp_root, name):
    out = tmp_root / "compose"
    export(env, out, SETS[name])
    config = normalised(out)
    services = config["services"]
    plan = load_plan({**env, "SYNAPSE_WORKER_TYPES": SETS[name]})
    synapse = {n: s for n, s in services.items() if n not in OURS}
    # One service per Synapse process, all from the same image, each running one Synapse app.
    assert len(synapse) == len(plan.processes)
    assert {s["image"] for s in synapse.values()} == {services["synapse-nginx"]["image"]} == {"synapse-workers:latest"}
    apps = sorted(s["entrypoint"][2] for s in synapse.values())
    assert apps == sorted(p.app for p in plan.processes)
    # Only nginx publishes a port: the public one. Replication, health and metrics stay on the project network.
    published = {n: s["ports"] for n, s in services.items() if s.get("ports")}
    assert list(published) == ["synapse-nginx"]
    assert [(p["target"], p["published"]) for p in published["synapse-nginx"]] == [(8008, "8008")]
    # Healthchecks on every long-running service; PostgreSQL and Redis from official images pinned by tag.
    for service_name, service in services.items():
        if service_name != "synapse-init":
            assert service["healthcheck"]["test"][0] == "CMD", service_name
    for service_name in ("synapse-postgres", "synapse-redis"):
        assert re.fullmatch(r"docker\.io/library/(postgres|redis):[0-9.]+", services[service_name]["image"])
    # Named volumes only (nginx's scratch space is tmpfs), shared by every Synapse process: data and media.
    for service in services.values():
        for volume in service.get("volumes", []):
            assert volume["type"] in ("volume", "tmpfs") and (
                volume["type"] == "tmpfs" or volume["source"] in config["volumes"]
            ), volume
    for service in synapse.values():
        assert {v["source"] for v in service["volumes"]} == {"synapse-data", "synapse-media"}
        assert service["user"] == "991:991"
        assert service["depends_on"]["synapse-init"]["condition"] == "service_completed_successfully"
        assert service["depends_on"]["synapse-postgres"]["condition"] == "service_healthy"
    # Secrets reach Synapse only through the init service, never as environment or config.
    for service_name, service in services.items():
        assert not service.get("secrets") or service_name == "synapse-init"
        for value in (service.get("environment") or {}).values():
            assert env["POSTGRES_PASSWORD"] not in value
    for config_file in (out / "config").rglob("*"):
        if config_file.is_file():
            assert env["POSTGRES_PASSWORD"] not in config_file.read_text()


def materialise(out: Path, config: dict) -> list[dict]:
    """Put each Synapse service's configs at their targets and the secrets where synapse-init copies them; return
    the app and --config-path files of each service's command."""
    services = config["services"]
    init = services["synapse-init"]
    data_dir = next(v["target"] for v in init["volumes"] if v["source"] == "synapse-data")
    for secret in init["secrets"]:
        source = Path(config["secrets"][secret["source"]]["file"])
        if secret["target"].startswith("/run/secrets/synapse-workers/"):
            path = Path(data_dir) / os.path.basename(secret["target"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(source.read_text())
            path.chmod(0o600)
    processes = []
    for name, service in services.items():
        if name in OURS:
            continue
        for mount in service["configs"]:
            target = Path(mount["target"])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(Path(config["configs"][mount["source"]]["file"]).read_text())
        command = service["command"]
        files = [command[i + 1] for i, arg in enumerate(command) if arg == "--config-path"]
        processes.append({"name": name, "app": service["entrypoint"][2], "config_files": files})
    return processes


def test_synapse_loads_every_services_config(env, tmp_root):
    out = tmp_root / "compose"
    export(env, out, COMPLEMENT)
    processes = materialise(out, normalised(out))
    result = subprocess.run(
        [sys.executable, "-m", "synapse_workers.synapse_check"],
        input=json.dumps(processes),
        capture_output=True,
        text=True,
        timeout=600,
    )
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(reports) == len(processes) > 1, result.stderr[-2000:]
    assert all(r["ok"] for r in reports), [r for r in reports if not r["ok"]]


def test_service_config_equals_generate_apart_from_names_and_addresses(env, tmp_root):
    out = tmp_root / "compose"
    spec = "synchrotron:2, event_persister:2, media_repository, stream_writers=typing+to_device"
    plan = load_plan({**env, "SYNAPSE_WORKER_TYPES": spec})
    export(env, out, spec)
    config = normalised(out)
    assert cli_main(["generate"], {**env, "SYNAPSE_WORKER_TYPES": spec}) == 0
    names = {m.plan_name: m.name for m in make_export(plan, COMPOSE).members}
    mounted = {}
    for service in config["services"].values():
        for mount in service.get("configs", []):
            mounted[mount["target"]] = Path(config["configs"][mount["source"]]["file"]).read_text()
    compared = 0
    for proc in plan.processes:
        member = names[proc.name]
        exported = make_export(plan, COMPOSE).member(member).process
        for generated_path, exported_path in zip(
            (*proc.config_files, proc.log_config), (*exported.config_files, exported.log_config), strict=True
        ):
            generated = yaml.safe_load(Path(generated_path).read_text())
            ours = yaml.safe_load(mounted[exported_path])
            if isinstance(generated, dict) and "redis" in generated:
                assert ours.pop("redis") == {"enabled": True, "host": "synapse-redis", "port": 6379}
                generated.pop("redis")
            assert _normalise(generated, names) == _normalise(ours, {}), exported_path
            compared += 1
    assert compared == 4 * len(plan.processes)


def test_logs_on_disk(env, tmp_root):
    out = tmp_root / "compose"
    export({**env, "SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK": "1"}, out, "synchrotron")
    config = normalised(out)
    logs = load_plan({**env, "SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK": "1"}).layout.logs_on_disk
    nginx = config["services"]["synapse-nginx"]
    assert logs in nginx["tmpfs"]
    assert f"install -d -o 991 -g 991 {logs}" in config["services"]["synapse-init"]["entrypoint"][-1]
