"""The table of secret files (`synapse_workers.secrets.SECRETS`) and its consumers.

Expectations are written out literally: for this environment, these files in the data dir, these modes, this
content (libpq's passfile line `host:port:database:user:password` with ':' and '\\' escaped; Redis's
`requirepass <password>`; Synapse's signing key `ed25519 a_XXXX <unpadded base64 of 32 bytes>`).
"""

from __future__ import annotations

import dataclasses
import re
import stat
from pathlib import Path

import pytest

from synapse_workers import files, secrets
from synapse_workers.layout import SecretPaths
from synapse_workers.load import load_plan
from synapse_workers.render.export import make_export
from synapse_workers.secrets import PASSFILE, PASSFILE_SYNAPSE, PASSWORD, REQUIREPASS, SECRETS, SIGNING_KEY, TOKEN
from synapse_workers.settings import SECRET_MIN_LENGTH, VARIABLES
from tests.unit.test_cli_errors import run

HEX64 = r"[0-9a-f]{64}\n"
SIGNING = r"ed25519 a_[0-9a-f]{4} [A-Za-z0-9+/]{43}\n"


def _data_files(env: dict[str, str]) -> dict[str, tuple[int, str]]:
    """Regular files directly in the data dir but homeserver.yaml and its log config: name → (mode, text)."""
    data = Path(env["SYNAPSE_DATA_DIR"])
    return {
        p.name: (stat.S_IMODE(p.stat().st_mode), p.read_text())
        for p in data.iterdir()
        if p.is_file() and p.name not in ("homeserver.yaml", "example.test.log.config")
    }


def _assert_files(actual: dict[str, tuple[int, str]], expected: dict[str, str]) -> None:
    """expected: name → a regular expression the whole text matches; every file 0600."""
    assert sorted(actual) == sorted(expected)
    for name, pattern in expected.items():
        mode, text = actual[name]
        assert mode == 0o600, name
        assert re.fullmatch(pattern, text), (name, text)


# ---- the forms --------------------------------------------------------------------------------------------


def test_each_form_writes_what_its_reader_expects():
    assert TOKEN.text("abc") == "abc\n"
    assert SIGNING_KEY.text("ed25519 a_0a1b AAAA") == "ed25519 a_0a1b AAAA\n"
    assert PASSFILE_SYNAPSE.text("0123abcd") == "*:*:*:synapse:0123abcd\n"
    # libpq: "If an entry needs to contain : or \, escape this character with \."
    assert PASSFILE.text("pa:ss\\word") == "*:*:*:*:pa\\:ss\\\\word\n"
    assert PASSFILE.text("plain") == "*:*:*:*:plain\n"
    assert PASSWORD.text("pw") == "pw"  # DATA_SOURCE_PASS_FILE: the file's whole content is the password
    assert REQUIREPASS.text("0123") == "requirepass 0123\n"


def test_each_form_reads_the_secret_back_from_a_file_written_by_hand():
    assert TOKEN.value("  abc \n") == "abc"
    assert PASSFILE_SYNAPSE.value("*:*:*:synapse:0123abcd\n") == "0123abcd"
    assert PASSFILE.value("*:*:*:*:pa\\:ss\\\\word\n") == "pa:ss\\word"
    assert PASSFILE.value("db.example:5432:synapse:synapse:secret with space\n") == "secret with space"
    assert REQUIREPASS.value("requirepass 0123\n") == "0123"
    with pytest.raises(ValueError):
        PASSFILE.value("no colons here\n")


def test_new_secrets_have_the_documented_shape():
    assert re.fullmatch(HEX64, TOKEN.text(TOKEN.make()))
    assert re.fullmatch(SIGNING, SIGNING_KEY.text(SIGNING_KEY.make()))
    assert re.fullmatch(r"\*:\*:\*:synapse:[0-9a-f]{48}\n", PASSFILE_SYNAPSE.text(PASSFILE_SYNAPSE.make()))
    assert TOKEN.make() != TOKEN.make()
    with pytest.raises(ValueError):
        REQUIREPASS.make()  # always derived from the Redis key file


# ---- the table is sound -------------------------------------------------------------------------------------


def test_one_row_per_secret_path():
    assert [row.key for row in SECRETS] == [
        "signing_key", "registration", "macaroon", "form", "replication", "postgres", "postgres_password",
        "redis", "redis_conf", "turn", "external_postgres", "external_postgres_password",
    ]  # fmt: skip
    assert {row.key for row in SECRETS} == {f.name for f in dataclasses.fields(SecretPaths)}


def test_rows_are_consistent():
    keys = [row.key for row in SECRETS]
    for row in SECRETS:
        if row.derived_from is not None:
            assert not row.stored and keys.index(row.derived_from) < keys.index(row.key), row.key
        if not row.stored:
            assert (row.variable is None) != (row.derived_from is None), row.key  # exactly one source
        else:
            assert row.form.new is not None, row.key  # a stored secret can be made
        if row.variable is not None:
            assert VARIABLES[row.variable.name].secret, row.key  # masked everywhere, as the variable's type says
        if row.generation_only:
            assert row.variable is not None and row.homeserver_yaml, row.key
        if row.weak_checked:
            assert row.stored and row.form is TOKEN, row.key


# ---- consumers, for literal environments ----------------------------------------------------------------------


def test_external_database_workers_exporter_and_turn(base_env):
    env = {
        **base_env,
        "SYNAPSE_WORKER_TYPES": "synchrotron",
        "SYNAPSE_METRICS": "1",
        "SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT": "1",
        "SYNAPSE_TURN_URIS": "turn:turn.example.test",
        "SYNAPSE_TURN_SECRET": "t" * 20,
        "POSTGRES_PASSWORD": "pa:ss\\word-long-enough",
    }
    assert run(env, "generate").returncode == 0
    _assert_files(
        _data_files(env),
        {
            "example.test.signing.key": SIGNING,
            "example.test.registration.key": HEX64,
            "example.test.macaroon.key": HEX64,
            "example.test.form.key": HEX64,
            "worker_replication.key": HEX64,
            "example.test.turn.key": "t{20}\n",
            "external_postgres.pgpass": re.escape("*:*:*:*:pa\\:ss\\\\word-long-enough\n"),
            "external_postgres.password": re.escape("pa:ss\\word-long-enough"),
        },
    )


def test_embedded_database_with_its_exporter(base_env):
    env = {k: v for k, v in base_env.items() if k != "POSTGRES_PASSWORD"}
    env.update(SYNAPSE_METRICS="1", SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT="1")
    assert run(env, "generate").returncode == 0
    found = _data_files(env)
    _assert_files(
        found,
        {
            "example.test.signing.key": SIGNING,
            "example.test.registration.key": HEX64,
            "example.test.macaroon.key": HEX64,
            "example.test.form.key": HEX64,
            "embedded_postgres.pgpass": r"\*:\*:\*:synapse:[0-9a-f]{48}\n",
            "embedded_postgres.password": "[0-9a-f]{48}",
        },
    )
    assert found["embedded_postgres.pgpass"][1] == f"*:*:*:synapse:{found['embedded_postgres.password'][1]}\n"


SEVERAL_HOSTS = {
    "SYNAPSE_LAUNCH_MODE": "process",
    "SYNAPSE_HTTP_PORT": "8008",
    "SYNAPSE_WORKER_TYPES": "synchrotron, client_reader",
    "SYNAPSE_HOSTS": "db=10.0.0.11, front=10.0.0.12, w1=10.0.0.13",
    "SYNAPSE_PLACEMENT": "main=front, nginx=front, synchrotron=w1, postgres=db, redis=db",
}


def test_several_hosts_main_makes_every_secret_and_redis_has_its_line(base_env):
    env = {**{k: v for k, v in base_env.items() if k != "POSTGRES_PASSWORD"}, **SEVERAL_HOSTS}
    assert run(env, "generate", "--host", "front").returncode == 0
    found = _data_files(env)
    _assert_files(
        found,
        {
            "example.test.signing.key": SIGNING,
            "example.test.registration.key": HEX64,
            "example.test.macaroon.key": HEX64,
            "example.test.form.key": HEX64,
            "worker_replication.key": HEX64,
            "embedded_postgres.pgpass": r"\*:\*:\*:synapse:[0-9a-f]{48}\n",
            "redis.key": HEX64,
            "redis.auth.conf": r"requirepass [0-9a-f]{64}\n",
        },
    )
    assert found["redis.auth.conf"][1] == f"requirepass {found['redis.key'][1]}"


@pytest.mark.parametrize(
    ("host", "missing"),
    [
        ("db", ["embedded_postgres.pgpass", "redis.key"]),
        ("w1", ["homeserver.yaml", "example.test.signing.key", "worker_replication.key", "embedded_postgres.pgpass",
                "redis.key"]),
    ],
)  # fmt: skip
def test_another_host_names_the_copies_it_needs(base_env, host, missing):
    env = {**{k: v for k, v in base_env.items() if k != "POSTGRES_PASSWORD"}, **SEVERAL_HOSTS}
    result = run(env, "generate", "--host", host)
    assert result.returncode == 2
    data = env["SYNAPSE_DATA_DIR"]
    assert f"--host {host}: {', '.join(f'{data}/{name}' for name in missing)} missing" in result.stderr


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({}, ["example.test.signing.key", "example.test.registration.key", "example.test.macaroon.key",
              "example.test.form.key", "external_postgres.pgpass"]),
        ({"SYNAPSE_WORKER_TYPES": "synchrotron", "SYNAPSE_TURN_URIS": "turn:turn.example.test"},
         ["example.test.signing.key", "example.test.registration.key", "example.test.macaroon.key",
          "example.test.form.key", "worker_replication.key", "example.test.turn.key", "external_postgres.pgpass"]),
    ],
)  # fmt: skip
def test_what_an_export_carries(base_env, tmp_root, extra, names):
    env = {**base_env, **extra, "SYNAPSE_CONFIG_PATH": str(tmp_root / "new" / "homeserver.yaml")}
    plan = load_plan(env)
    paths = make_export(plan, "kubernetes").secret_files()
    assert [Path(p).name for p in paths] == names
    assert all(str(Path(p).parent) == env["SYNAPSE_DATA_DIR"] for p in paths)


# ---- adding a secret is one row ------------------------------------------------------------------------------


def test_a_new_row_reaches_every_consumer(base_env, tmp_root, monkeypatch):
    """A secret the next feature needs (a backup's key, say): its path and its row, nothing else."""
    paths_type = dataclasses.make_dataclass("Paths", [("backup", str)], bases=(SecretPaths,), frozen=True)
    plan = load_plan({**base_env, "SYNAPSE_CONFIG_PATH": str(tmp_root / "new" / "homeserver.yaml")})
    backup = f"{base_env['SYNAPSE_DATA_DIR']}/backup.key"
    plan = dataclasses.replace(plan, secrets=paths_type(**dataclasses.asdict(plan.secrets), backup=backup))
    row = secrets.SecretFile(
        "backup", TOKEN, lambda p: True, weak_checked=True, copied=lambda p: True, exported=lambda p: True
    )
    monkeypatch.setattr(secrets, "SECRETS", (*SECRETS, row))

    assert backup in files.ensure_secrets(plan)
    assert re.fullmatch(HEX64, Path(backup).read_text())
    assert stat.S_IMODE(Path(backup).stat().st_mode) == 0o600
    Path(backup).write_text("generated\n")
    assert files.weak_secret_files(plan) == [backup]
    assert len("generated") < SECRET_MIN_LENGTH
    assert backup in files.ensure_secrets(plan)  # replaced
    replaced = Path(backup).read_text()
    assert re.fullmatch(HEX64, replaced)
    assert backup in secrets.copies_needed(plan)
    carried, _password = files.export_secrets(plan, {}, None)
    assert carried[backup] == replaced  # the data dir's key file, as for every other secret
    assert backup in make_export(plan, "compose").secret_files()
