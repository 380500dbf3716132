"""A data dir started from the Unraid template before 0.2 holds the word `generated` as its secrets.

The template sent `SYNAPSE_REGISTRATION_SHARED_SECRET=generated` (and the macaroon, form and TURN secrets alike);
the new template sends them empty, which keeps the stored files as they are. Such a file must not stay: anyone who
read the template could register an admin through the shared-secret API. The oracle is Synapse's own config
loader: the secret it reads through homeserver.yaml's `*_path` options.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from tests.unit.test_cli_errors import run

PLACEHOLDER = "generated"


def _synapse_secrets(env: dict[str, str]) -> dict[str, str | None]:
    """What Synapse 1.163.2 reads as main, from the files `generate` wrote (homeserver.yaml first)."""
    from synapse.config.homeserver import HomeServerConfig

    runtime = Path(env["SYNAPSE_RUNTIME_DIR"]) / "synapse"
    paths = [Path(env["SYNAPSE_CONFIG_DIR"]) / "homeserver.yaml", runtime / "shared.yaml", runtime / "main.yaml"]
    config = HomeServerConfig.load_config("weak-secrets", [arg for p in paths for arg in ("-c", str(p))])
    return {
        "registration": config.registration.registration_shared_secret,
        "macaroon": config.key.macaroon_secret_key.decode() if config.key.macaroon_secret_key else None,
        "form": config.key.form_secret,
        "turn": config.voip.turn_shared_secret,
    }


@pytest.fixture
def started_with_old_template(base_env):
    """`generate` once, then the key files as the old template's first start left them."""
    env = {**base_env, "SYNAPSE_ENABLE_BUILTIN_COTURN": "on"}
    assert run(env, "generate").returncode == 0
    data = Path(env["SYNAPSE_DATA_DIR"])
    name = env["SYNAPSE_SERVER_NAME"]
    for kind in ("registration", "macaroon", "form", "turn"):
        (data / f"{name}.{kind}.key").write_text(PLACEHOLDER + "\n")
    before = _synapse_secrets(env)
    assert set(before.values()) == {PLACEHOLDER}  # the hole the fix closes, as Synapse sees it
    return env


def test_placeholder_secrets_are_replaced_with_a_warning(started_with_old_template):
    env = started_with_old_template
    homeserver = Path(env["SYNAPSE_CONFIG_DIR"]) / "homeserver.yaml"
    text_before = homeserver.read_bytes()
    result = run(env, "generate")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    data = Path(env["SYNAPSE_DATA_DIR"])
    for kind in ("registration", "macaroon", "form", "turn"):
        key = data / f"{env['SYNAPSE_SERVER_NAME']}.{kind}.key"
        assert f"{key} holds a secret shorter than 16 characters" in result.stderr
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    after = _synapse_secrets(env)
    assert PLACEHOLDER not in after.values()
    assert all(value is not None and len(value) >= 32 for value in after.values()), after
    assert len(set(after.values())) == 4  # each its own random value
    assert homeserver.read_bytes() == text_before  # the user's (here: our generated) homeserver.yaml untouched
    # coturn's config carries the TURN secret Synapse now reads.
    coturn_conf = Path(env["SYNAPSE_RUNTIME_DIR"]) / "coturn" / "turnserver.conf"
    assert f"static-auth-secret={after['turn']}\n" in coturn_conf.read_text()
    # Once replaced, nothing more to say, and the new secrets stay.
    again = run(env, "generate")
    assert "holds a secret shorter" not in again.stderr
    assert _synapse_secrets(env) == after


def test_a_long_stored_secret_is_kept(base_env):
    assert run(base_env, "generate").returncode == 0
    key = Path(base_env["SYNAPSE_DATA_DIR"]) / f"{base_env['SYNAPSE_SERVER_NAME']}.registration.key"
    key.write_text("a" * 16 + "\n")  # exactly the minimum: a secret someone chose, not a placeholder
    result = run(base_env, "generate")
    assert result.returncode == 0 and "holds a secret shorter" not in result.stderr
    assert key.read_text() == "a" * 16 + "\n"


def test_a_file_the_users_homeserver_yaml_names_is_not_ours(base_env, tmp_root):
    """Only our key files are replaced; a short secret in a file of the user's own choosing stays as it is."""
    own = tmp_root / "my-secret"
    own.write_text("short\n")
    hs = Path(base_env["SYNAPSE_CONFIG_DIR"])
    hs.mkdir(parents=True, exist_ok=True)
    (hs / "homeserver.yaml").write_text(yaml.safe_dump({
        "server_name": base_env["SYNAPSE_SERVER_NAME"],
        "database": {"name": "psycopg2", "args": {"user": "synapse", "host": "db"}},
        "registration_shared_secret_path": str(own),
    }))
    result = run(base_env, "generate")
    assert result.returncode == 0, result.stderr
    assert "holds a secret shorter" not in result.stderr
    assert own.read_text() == "short\n"
    assert not os.path.exists(Path(base_env["SYNAPSE_DATA_DIR"]) / "example.test.registration.key")
