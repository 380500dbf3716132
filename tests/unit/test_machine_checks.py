"""What `run` refuses about this machine before it starts anything, `check` and `generate` refuse too: exit 2,
the variable named, nothing written (so an "OK" is never followed by a refusal at `run`)."""

from __future__ import annotations

import contextlib
import io
import subprocess

import pytest

from synapse_workers.cli import main as cli_main
from synapse_workers.run import binaries

from .test_cli_errors import SCRIPT, snapshot


def _turnserver_has_prometheus() -> bool:
    result = subprocess.run([binaries.find("turnserver"), "-h"], capture_output=True, text=True, timeout=30)
    return "--prometheus-address" in result.stdout + result.stderr


@pytest.fixture
def env(base_env):
    return {**base_env, "SYNAPSE_HTTP_PORT": "8008", "SYNAPSE_ENABLE_BUILTIN_COTURN": "1", "COTURN_METRICS": "on"}


@pytest.mark.parametrize("command", ["check", "generate"])
def test_coturn_metrics_without_prometheus_support_is_refused(env, tmp_root, command):
    """Debian's coturn 4.6.1 has no Prometheus: `check` used to say OK and `run` then refused COTURN_METRICS."""
    if _turnserver_has_prometheus():
        pytest.skip("this turnserver serves Prometheus on loopback: nothing to refuse")
    (tmp_root / "data").mkdir()
    before = snapshot(tmp_root)
    result = subprocess.run([SCRIPT, command], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "COTURN_METRICS is on" in result.stderr and "Prometheus" in result.stderr
    assert "Traceback" not in result.stderr and "OK" not in result.stdout
    assert snapshot(tmp_root) == before  # no homeserver.yaml, no secrets, no runtime dir


@pytest.mark.parametrize("command", ["check", "generate"])
def test_a_missing_binary_is_refused(env, tmp_root, monkeypatch, command):
    """The lookup `run` does, on a machine without prometheus (PATH without it, and no file at the fallback)."""
    empty = tmp_root / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setitem(binaries.KNOWN, "prometheus", (str(tmp_root / "no-prometheus"), "prometheus"))
    env = {k: v for k, v in env.items() if not k.startswith("COTURN")}
    env.pop("SYNAPSE_ENABLE_BUILTIN_COTURN")
    before = snapshot(tmp_root)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main([command], env={**env, "SYNAPSE_METRICS": "yes"})
    assert code == 2
    assert "`prometheus` is not installed" in err.getvalue() and "Debian package prometheus" in err.getvalue()
    assert snapshot(tmp_root) == before


def test_generate_still_writes_when_the_machine_has_everything(env, tmp_root):
    env = {k: v for k, v in env.items() if k != "COTURN_METRICS"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["generate"], env=env) == 0
    assert (tmp_root / "run" / "nginx" / "nginx.conf").exists()
