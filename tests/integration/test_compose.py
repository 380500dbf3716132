"""contrib/docker-compose*.yml, validated by a real Compose v2 (`docker-compose config`, installed by
scripts/container-tools.sh), and their synapse environment accepted by `synapse-workers plan`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from synapse_workers.settings import VARIABLES

from ..conftest import isolated_env

REPO = Path(__file__).resolve().parents[2]
FILES = ["contrib/docker-compose.yml", "contrib/docker-compose.workers.yml"]
ENV = {"SYNAPSE_SERVER_NAME": "matrix.example.test", "POSTGRES_PASSWORD": "compose-pw"}

pytestmark = pytest.mark.integration


def compose_binary() -> str:
    found = shutil.which("docker-compose", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if not found:
        message = "docker-compose v2 is not installed: run scripts/container-tools.sh"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def compose(path: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SYNAPSE_", "POSTGRES_"))}
    return subprocess.run(
        [compose_binary(), "-f", str(REPO / path), *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("path", FILES)
def test_compose_file_is_valid(path):
    result = compose(path, "config", "-q", env=ENV)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", FILES)
def test_compose_file_needs_server_name_and_password(path):
    result = compose(path, "config", "-q", env={"POSTGRES_PASSWORD": "x"})
    assert result.returncode != 0 and "SYNAPSE_SERVER_NAME" in result.stderr
    result = compose(path, "config", "-q", env={"SYNAPSE_SERVER_NAME": "x.test"})
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr


@pytest.mark.parametrize("path", FILES)
def test_compose_file_shape_and_environment(path, tmp_root):
    result = compose(path, "config", "--format", "json", env=ENV)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    synapse, db = config["services"]["synapse"], config["services"]["db"]
    environment = synapse["environment"]
    assert set(environment) <= set(VARIABLES), set(environment) - set(VARIABLES)
    # The external PostgreSQL service is the one synapse talks to, with the same credentials.
    assert environment["POSTGRES_HOST"] == "db"
    assert environment["POSTGRES_PASSWORD"] == db["environment"]["POSTGRES_PASSWORD"] == "compose-pw"
    assert environment["POSTGRES_USER"] == db["environment"]["POSTGRES_USER"]
    assert environment["POSTGRES_DB"] == db["environment"]["POSTGRES_DB"]
    assert synapse["depends_on"]["db"]["condition"] == "service_healthy"
    # Named volumes only (no host paths), /data for synapse.
    mounts = {v["target"]: v for v in synapse["volumes"]}
    assert mounts["/data"]["type"] == "volume" and mounts["/data"]["source"] in config["volumes"]
    assert all(v["type"] == "volume" for s in config["services"].values() for v in s.get("volumes", []))
    assert [p["target"] for p in synapse["ports"]] == [8008]
    assert synapse["build"]["context"] == str(REPO)
    # What the container would get is a valid deployment (plan needs no database).
    env = {**isolated_env(tmp_root, "matrix.example.test"), **environment}
    run = subprocess.run(
        [str(Path(sys.executable).parent / "synapse-workers"), "plan", "--json"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert plan["postgres"] is None  # the external one, not the embedded cluster
    assert bool(plan["workers"]) == ("workers" in path), [w["name"] for w in plan["workers"]]
