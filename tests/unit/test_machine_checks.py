"""What `run` refuses about this machine before it starts anything, `check` and `generate` refuse too: exit 2,
the variable named, nothing written (so an "OK" is never followed by a refusal at `run`)."""

from __future__ import annotations

import contextlib
import io
import os
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


@pytest.fixture
def hidden(base_env, tmp_root):
    """As root: a runtime dir under a 0700 directory, and a 0700 Prometheus storage dir of root's."""
    if os.geteuid() != 0:
        pytest.skip("the start-up directory checks are made as root (for UID/GID, nginx's and Prometheus's users)")
    (tmp_root / "hidden").mkdir(mode=0o700)
    (tmp_root / "prom").mkdir(mode=0o700)
    (tmp_root / "data").mkdir()
    os.chown(tmp_root / "data", 991, 991)
    env = {**base_env, "SYNAPSE_HTTP_PORT": "8008", "SYNAPSE_RUNTIME_DIR": str(tmp_root / "hidden" / "run")}
    return env, tmp_root


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_runtime_dir_synapse_and_nginx_cannot_enter_is_refused(hidden, command):
    """`run` used to write its files and then refuse (unix sockets) or start Synapse into a crash loop
    (PermissionError on shared.yaml); `check` said FAILED after Synapse's loader. Now both: exit 2, before."""
    env, root = hidden
    env = {**env, "SYNAPSE_PUBLIC_UNIX_SOCKETS": "1"}
    result = subprocess.run([SCRIPT, command], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "nginx: OK" not in result.stdout
    hidden_dir = str(root / "hidden")
    assert f"SYNAPSE_RUNTIME_DIR='{hidden_dir}/run' is under '{hidden_dir}', which Synapse's user" in result.stderr
    assert (
        "which nginx's worker user (nobody) cannot enter: it connects" in result.stderr
        and f"`chmod o+x {hidden_dir}`" in result.stderr
    )
    assert not (root / "data" / "homeserver.yaml").exists()


def test_a_prometheus_storage_its_user_cannot_use_is_refused_by_check(hidden):
    env, root = hidden
    env = {**env, "SYNAPSE_METRICS": "yes", "PROMETHEUS_STORAGE_PATH": str(root / "prom")}
    env.pop("SYNAPSE_RUNTIME_DIR")
    env["SYNAPSE_RUNTIME_DIR"] = str(root / "run")
    result = subprocess.run([SCRIPT, "check"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot use its storage PROMETHEUS_STORAGE_PATH='{root / 'prom'}'" in result.stderr
    assert "does not let it write and enter" in result.stderr and "Traceback" not in result.stderr
    assert not (root / "run").exists()


def test_the_directory_refusals_name_their_variables_as_data(hidden):
    """`check --json`: the runtime dir Synapse's user and nginx's workers cannot enter, and Prometheus's storage,
    each with its variable as the subject and the variables that made the user need it as related."""
    import json

    env, root = hidden
    env = {
        **env,
        "SYNAPSE_PUBLIC_UNIX_SOCKETS": "1",
        "SYNAPSE_METRICS": "yes",
        "PROMETHEUS_STORAGE_PATH": str(root / "prom"),
    }
    result = subprocess.run([SCRIPT, "check", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    problems = json.loads(result.stdout)["problems"]
    got = [(p["subject"], p["related"]) for p in problems if "cannot" in p["message"]]
    assert got == [
        ({"variable": "SYNAPSE_RUNTIME_DIR"}, ["UID", "GID"]),
        ({"variable": "SYNAPSE_RUNTIME_DIR"}, ["SYNAPSE_PUBLIC_UNIX_SOCKETS", "SYNAPSE_METRICS_UNIX_SOCKETS"]),
        ({"variable": "PROMETHEUS_STORAGE_PATH"}, []),
    ], problems
    assert all(p["found"].startswith(f"'{root}") for p in problems if "cannot" in p["message"])
