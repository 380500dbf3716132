"""Golden files: the exact rendered output for two fixed topologies.

A diff here means the generated configuration changed. If the change is intended, regenerate with

    SW_UPDATE_GOLDEN=1 /opt/synapse-workers/venv/bin/python -m pytest -q tests/unit/test_golden.py

and review `git diff tests/unit/golden/` before committing.
"""

from __future__ import annotations

import difflib
import os
import shutil
from pathlib import Path

import pytest

from synapse_workers.load import load_plan
from synapse_workers.render import render_all

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path("/tmp/sw-golden")  # fixed, never written to by these tests: rendering is pure
UPDATE = os.environ.get("SW_UPDATE_GOLDEN") == "1"

TOPOLOGIES = {
    "monolith": "",
    "workers": "synchrotron:2, event_persister:2, media_repository, stream_writers=typing+to_device+receipts",
}


def _env(base_env, name: str) -> dict[str, str]:
    root = ROOT / name
    return {
        **base_env,
        "SYNAPSE_SERVER_NAME": "example.test",
        "SYNAPSE_REPORT_STATS": "no",
        "POSTGRES_PASSWORD": "golden-password",
        "SYNAPSE_CONFIG_DIR": f"{root}/data",
        "SYNAPSE_DATA_DIR": f"{root}/data",
        "SYNAPSE_RUNTIME_DIR": f"{root}/run",
        "SYNAPSE_INTERNAL_PORT_BASE": "30000",
        "SYNAPSE_HTTP_PORT": "8008",
        "SYNAPSE_HTTP_BIND_ADDRESS": "0.0.0.0",
        "SYNAPSE_WORKER_TYPES": TOPOLOGIES[name],
    }


def _render(base_env, name: str) -> dict[str, str]:
    env = _env(base_env, name)
    if (ROOT / name).exists():
        # A leftover homeserver.yaml (e.g. from a manual `generate`) would change the output.
        shutil.rmtree(ROOT / name)
    plan = load_plan(env)
    assert not plan.homeserver.exists
    managed = render_all(plan).managed
    files = {
        "shared.yaml": managed[plan.files["shared_config"]],
        "main.yaml": managed[plan.files["main_config"]],
        "nginx.conf": managed[plan.files["nginx"]],
    }
    if plan.workers:
        files["stream_writers1.yaml"] = managed[plan.process("stream_writers1").config_files[-1]]
    return files


CASES = [
    ("monolith", "shared.yaml"),
    ("monolith", "main.yaml"),
    ("monolith", "nginx.conf"),
    ("workers", "shared.yaml"),
    ("workers", "main.yaml"),
    ("workers", "stream_writers1.yaml"),
    ("workers", "nginx.conf"),
]


@pytest.mark.parametrize("topology, filename", CASES)
def test_golden(base_env, topology, filename):
    actual = _render(base_env, topology)[filename]
    golden = GOLDEN / topology / filename
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual, encoding="utf-8")
        return
    assert golden.exists(), f"{golden} is missing: run with SW_UPDATE_GOLDEN=1 to create it"
    expected = golden.read_text(encoding="utf-8")
    if actual != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), actual.splitlines(keepends=True),
            fromfile=f"golden/{topology}/{filename}", tofile="rendered", n=2))
        pytest.fail(f"rendered {filename} differs from the golden file (SW_UPDATE_GOLDEN=1 to accept):\n{diff[:6000]}")


def test_golden_env_ignores_base_env_randomness(base_env):
    """The golden environment overrides every path and port base_env randomises."""
    env = _env(base_env, "workers")
    for key, value in base_env.items():
        if key not in ("SYNAPSE_SERVER_NAME", "SYNAPSE_REPORT_STATS"):
            assert env[key] != value, f"{key} from base_env leaks into the golden environment"


def test_golden_files_are_all_used():
    if UPDATE:
        pytest.skip("regenerating")
    on_disk = {(p.parent.name, p.name) for p in GOLDEN.rglob("*") if p.is_file()}
    assert on_disk == set(CASES)
