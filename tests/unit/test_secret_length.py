"""A secret variable too short to be a secret, or one that is text of the configuration itself: exit 2 naming the
variable (never its value), no traceback, nothing written; `export kubernetes` never reaches its AssertionError."""

from __future__ import annotations

import contextlib
import functools
import io
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_workers.cli import main as cli_main

from .test_cli_errors import SCRIPT, snapshot

KEY_SECRETS = (
    "SYNAPSE_REGISTRATION_SHARED_SECRET",
    "SYNAPSE_MACAROON_SECRET_KEY",
    "SYNAPSE_FORM_SECRET",
    "SYNAPSE_TURN_SECRET",
)
MINIMUM = 16  # README: "at least 16 characters"


@pytest.fixture
def env(base_env):
    return {
        **base_env,
        "SYNAPSE_HTTP_PORT": "8008",
        "SYNAPSE_WORKER_TYPES": "synchrotron",
        "POSTGRES_HOST": "pg.example",
        "SYNAPSE_ENABLE_BUILTIN_COTURN": "1",  # the TURN secret is used
    }


@pytest.fixture
def export_env(env):
    """coturn is not exported: a TURN server of one's own, whose secret Synapse is given."""
    env = {k: v for k, v in env.items() if k != "SYNAPSE_ENABLE_BUILTIN_COTURN"}
    return {**env, "SYNAPSE_TURN_URIS": "turn:turn.example:3478"}


def _cli(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(argv), env=env)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("variable", KEY_SECRETS)
@pytest.mark.parametrize("command", ["generate", "check", "plan"])
def test_a_short_secret_is_refused(env, tmp_root, variable, command):
    value = "s3cr3t-0123456"[: MINIMUM - 1] + "x" * max(0, MINIMUM - 1 - 14)
    assert len(value) == MINIMUM - 1
    before = snapshot(tmp_root)
    code, out, err = _cli({**env, variable: value}, command)
    assert code == 2
    assert f"{variable}=<hidden> is invalid: expected a secret of at least {MINIMUM} characters" in err
    assert value not in out + err and "Traceback" not in err
    assert snapshot(tmp_root) == before


@pytest.mark.parametrize("variable", KEY_SECRETS)
def test_a_secret_of_the_minimum_length_is_used(env, tmp_root, variable):
    value = "0123456789abcdef"
    assert _cli({**env, variable: value}, "generate")[0] == 0
    key_files = [p for p in (tmp_root / "data").iterdir() if p.suffix == ".key"]
    assert value + "\n" in [p.read_text() for p in key_files]


def test_a_short_database_password_is_the_users_own_and_is_used(env, tmp_root):
    """POSTGRES_PASSWORD is the password of an existing database: no minimum (README)."""
    assert _cli({**env, "POSTGRES_PASSWORD": "pw"}, "generate")[0] == 0


@pytest.mark.parametrize(
    "extra, variable",
    [
        ({"SYNAPSE_FORM_SECRET": "c"}, "SYNAPSE_FORM_SECRET=<hidden> is invalid"),  # was an AssertionError traceback
        ({"SYNAPSE_FORM_SECRET": "worker_replication_secret_path"}, "SYNAPSE_FORM_SECRET: its value is also text"),
        ({"POSTGRES_PASSWORD": "synapse-workers"}, "POSTGRES_PASSWORD: its value is also text"),
    ],
)
def test_export_kubernetes_refuses_a_secret_it_cannot_keep_apart(export_env, tmp_root, extra, variable):
    out = tmp_root / "k8s"
    before = snapshot(tmp_root)
    result = subprocess.run(
        [SCRIPT, "export", "kubernetes", "-o", str(out)],
        env={**export_env, **extra},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("synapse-workers: error: ") and variable in result.stderr
    assert "Traceback" not in result.stderr and "AssertionError" not in result.stderr
    assert not out.exists() and snapshot(tmp_root) == before


@functools.cache
def _configuration_texts(items: frozenset[tuple[str, str]]) -> list[str]:
    """The ConfigMaps' texts of a good export: where a user-given secret could coincide with the configuration."""
    env = dict(items)
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:
        out = Path(scratch) / "k8s"
        code, _out, err = _cli(env, "export", "kubernetes", "-o", str(out))
        assert code == 0, err
        docs = yaml.safe_load_all((out / "synapse-workers.yaml").read_text())
        return [text for doc in docs if doc and doc["kind"] == "ConfigMap" for text in doc["data"].values()]


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_secret_value_reaches_the_assertion(export_env, data):
    """Any slice of the configuration's own text as a secret (or database password): exit 0 or 2, never a
    traceback. (A slice of at least 16 characters: shorter ones are refused before the export is rendered.)"""
    env = export_env
    texts = _configuration_texts(frozenset(env.items()))
    text = data.draw(st.sampled_from([t for t in texts if len(t) > 40]))
    start = data.draw(st.integers(0, len(text) - 20))
    value = text[start : start + data.draw(st.integers(MINIMUM, 40))]
    if "\n" in value or not value.strip() or value != value.strip():
        value = "worker_replication_secret_path"  # secrets are one line; keep the example meaningful
    variable = data.draw(st.sampled_from([*KEY_SECRETS, "POSTGRES_PASSWORD"]))
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:
        code, _out, err = _cli({**env, variable: value}, "export", "kubernetes", "-o", f"{scratch}/k8s")
    assert code in (0, 2), err
    if code == 2:
        assert f"{variable}: its value is also text of the exported configuration" in err
