"""`synapse-workers export {kubernetes,compose} -o DIR` through the console script's main() in a child process:
deterministic bytes, secrets kept across exports and taken from the data dir, bad input refused with exit 2 and
nothing written."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.unit.test_cli_errors import run as run_forked

SCRIPT = str(Path(sys.executable).with_name("synapse-workers"))
WORKERS = "synchrotron:2, event_persister:2, media_repository"


@pytest.fixture
def env(base_env):
    return {**base_env, "SYNAPSE_HTTP_PORT": "8008", "SYNAPSE_WORKER_TYPES": WORKERS, "POSTGRES_HOST": "pg.example"}


def run(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    """The console script's main() in a child forked after the imports (test_cli_errors.run: same exit status,
    output and environment as the exec'd script, which test_the_forked_run_answers_as_the_exec_d_script checks)."""
    return run_forked(env, *argv, timeout=120)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def secret_data(root: Path) -> dict[str, str]:
    return yaml.safe_load((root / "secret.yaml").read_text())["stringData"]


@pytest.mark.parametrize("target", ["kubernetes", "compose"])
def test_export_is_deterministic_and_keeps_its_secrets(env, tmp_root, target):
    a, b = tmp_root / "a", tmp_root / "b"
    assert run(env, "export", target, "-o", str(a)).returncode == 0
    assert run(env, "export", target, "-o", str(b)).returncode == 0
    first, second = tree(a), tree(b)
    assert set(first) == set(second)
    secret_names = {n for n in first if n == "secret.yaml" or n.startswith("secrets/")}
    assert secret_names
    # Everything but the (new, random) secrets is byte-identical between two directories.
    for name in set(first) - secret_names:
        assert first[name] == second[name], name
    # Exporting again into the same directory changes nothing at all, secrets included.
    result = run(env, "export", target, "-o", str(a))
    assert result.returncode == 0, result.stderr
    assert tree(a) == first
    # Secret files are 0600, in a 0700 directory when they have one of their own.
    for name in secret_names:
        assert stat.S_IMODE((a / name).stat().st_mode) == 0o600, name
        if "/" in name:
            assert stat.S_IMODE((a / name).parent.stat().st_mode) == 0o700
    for name in set(first) - secret_names:
        assert stat.S_IMODE((a / name).stat().st_mode) == 0o644, name


def test_kubernetes_secrets_come_from_the_variables_and_the_data_dir(env, tmp_root):
    data = Path(env["SYNAPSE_DATA_DIR"])
    data.mkdir(parents=True)
    signing = "ed25519 a_test c29tZSBzaWduaW5nIGtleSBmb3IgdGhlIHRlc3Rz\n"
    (data / "example.test.signing.key").write_text(signing)
    out = tmp_root / "k"
    result = run({**env, "SYNAPSE_MACAROON_SECRET_KEY": "macaroon-from-env"}, "export", "kubernetes", "-o", str(out))
    assert result.returncode == 0, result.stderr
    secrets = secret_data(out)
    assert secrets["example.test.signing.key"] == signing  # a running server keeps its key
    assert secrets["example.test.macaroon.key"] == "macaroon-from-env\n"
    assert secrets["external_postgres.pgpass"] == f"*:*:*:*:{env['POSTGRES_PASSWORD']}\n"
    assert len(secrets["worker_replication.key"].strip()) == 64
    assert sorted(os.listdir(data)) == ["example.test.signing.key"]  # nothing written there
    manifests = (out / "synapse-workers.yaml").read_text()
    for value in secrets.values():
        assert value.strip() not in manifests
    assert "macaroon-from-env" not in result.stdout + result.stderr


def test_compose_database_password_from_the_variable(env, tmp_root):
    out = tmp_root / "c"
    assert run(env, "export", "compose", "-o", str(out)).returncode == 0
    assert (out / "secrets/postgres.password").read_text() == env["POSTGRES_PASSWORD"]
    assert (out / "secrets/external_postgres.pgpass").read_text() == f"*:*:*:*:{env['POSTGRES_PASSWORD']}\n"
    # Without the variable: a new password, kept by the next export.
    no_password = {k: v for k, v in env.items() if k != "POSTGRES_PASSWORD"}
    fresh = tmp_root / "c2"
    assert run(no_password, "export", "compose", "-o", str(fresh)).returncode == 0
    password = (fresh / "secrets/postgres.password").read_text()
    assert len(password) == 48 and password != env["POSTGRES_PASSWORD"]
    assert run(no_password, "export", "compose", "-o", str(fresh)).returncode == 0
    assert (fresh / "secrets/postgres.password").read_text() == password


def test_removed_worker_files_go_and_nothing_else(env, tmp_root):
    out = tmp_root / "c"
    assert run(env, "export", "compose", "-o", str(out)).returncode == 0
    assert (out / "config/workers/synapse-synchrotron-1.yaml").exists()
    (out / "notes.txt").write_text("mine")  # the user's own file in our directory
    result = run({**env, "SYNAPSE_WORKER_TYPES": "synchrotron"}, "export", "compose", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert not (out / "config/workers/synapse-synchrotron-1.yaml").exists()
    assert not (out / "config/workers/synapse-event-persister-0.yaml").exists()
    assert (out / "config/workers/synapse-synchrotron-0.yaml").exists()
    assert (out / "notes.txt").read_text() == "mine"


def refused(env, tmp_root, target, expected: str, *extra: str, out: Path | None = None):
    out = out or tmp_root / "out"
    before = tree(out) if out.exists() else None
    result = run(env, "export", target, "-o", str(out), *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert (tree(out) if out.exists() else None) == before  # nothing written
    return result


def test_refuses_a_foreign_directory(env, tmp_root):
    out = tmp_root / "mine"
    out.mkdir()
    (out / "deployment.yaml").write_text("kind: Deployment\n")
    refused(env, tmp_root, "kubernetes", "did not write", out=out)
    # An export of the other target is not ours to replace either.
    compose = tmp_root / "compose"
    assert run(env, "export", "compose", "-o", str(compose)).returncode == 0
    refused(env, tmp_root, "kubernetes", "did not write", out=compose)
    # A file, not a directory.
    (tmp_root / "file").write_text("x")
    refused(env, tmp_root, "compose", "not a directory", out=tmp_root / "file")


def test_an_empty_directory_is_fine(env, tmp_root):
    out = tmp_root / "empty"
    out.mkdir(mode=0o750)
    assert run(env, "export", "kubernetes", "-o", str(out)).returncode == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # the directory itself is left as it was


def test_refuses_what_the_export_cannot_carry(env, tmp_root):
    embedded = {k: v for k, v in env.items() if k != "POSTGRES_PASSWORD"}
    refused(embedded, tmp_root, "kubernetes", "SYNAPSE_DATABASE=embedded")
    cert = tmp_root / "cert.pem"
    cert.write_text("x")
    tls = {**env, "SYNAPSE_TLS_CERT": str(cert), "SYNAPSE_TLS_KEY": str(cert)}
    refused(tls, tmp_root, "kubernetes", "SYNAPSE_TLS_CERT")
    refused({**env, "SYNAPSE_ENABLE_BUILTIN_COTURN": "1"}, tmp_root, "compose", "SYNAPSE_ENABLE_BUILTIN_COTURN")
    refused({**env, "SYNAPSE_ENABLE_COMPRESSOR": "1"}, tmp_root, "kubernetes", "SYNAPSE_ENABLE_COMPRESSOR")
    log_config = tmp_root / "log.yaml"
    log_config.write_text("version: 1\n")
    refused({**env, "SYNAPSE_LOG_CONFIG": str(log_config)}, tmp_root, "kubernetes", "SYNAPSE_LOG_CONFIG")
    registration = tmp_root / "bridge.yaml"
    registration.write_text("id: bridge\nas_token: a\nhs_token: b\n")
    refused({**env, "SYNAPSE_APPSERVICES": str(registration)}, tmp_root, "compose", "SYNAPSE_APPSERVICES")
    data = Path(env["SYNAPSE_DATA_DIR"])
    data.mkdir(parents=True)
    (data / "homeserver.yaml").write_text("server_name: example.test\ndatabase: {name: psycopg2}\n")
    refused(env, tmp_root, "compose", "SYNAPSE_CONFIG_PATH")


def test_refuses_worker_names_kubernetes_cannot_take(env, tmp_root):
    result = refused(
        {**env, "SYNAPSE_WORKER_TYPES": "a_b=synchrotron, a-b=synchrotron"},
        tmp_root,
        "kubernetes",
        "SYNAPSE_WORKER_TYPES",
    )
    assert "'a-b'" in result.stderr and "'a_b'" in result.stderr
    long = "w" * 45
    result = refused({**env, "SYNAPSE_WORKER_TYPES": f"{long}=synchrotron"}, tmp_root, "kubernetes", "at most 52")
    refused({**env, "SYNAPSE_WORKER_TYPES": "nginx=synchrotron"}, tmp_root, "compose", "SYNAPSE_WORKER_TYPES")
    refused(env, tmp_root, "kubernetes", "--image", "--image", "bad image")


# ---- in-process: what the CLI decides, and how often it plans -------------------------------------------------


@pytest.mark.parametrize("target", ["kubernetes", "compose"])
def test_one_export_plan_per_export(env, tmp_root, monkeypatch, target):
    from synapse_workers.cli import main as cli_main
    from synapse_workers.render import export as export_module

    made = []
    real = export_module._groups  # every make_export calls it, whichever module imported make_export

    def counting(plan, target):
        made.append(target)
        return real(plan, target)

    monkeypatch.setattr(export_module, "_groups", counting)
    assert cli_main(["export", target, "-o", str(tmp_root / "out")], env) == 0
    assert made == [target]


def test_a_manifest_problem_is_our_bug_exit_1_and_nothing_written(env, tmp_root, monkeypatch, capsys):
    """The checker returns problems; the CLI reports them as a bug of ours (not exit 2: the input is fine), with no
    traceback, and writes nothing. The checker is replaced by one that finds a problem: ours never does here."""
    from synapse_workers.cli import main as cli_main
    from synapse_workers.render import kubernetes_check

    monkeypatch.setattr(kubernetes_check, "check_manifests", lambda objects: ["Service 'x': made up for the test"])
    out = tmp_root / "out"
    assert cli_main(["export", "kubernetes", "-o", str(out)], env) == 1
    err = capsys.readouterr().err
    assert "internal error: export kubernetes: Service 'x': made up for the test" in err
    assert "bug of synapse-workers" in err and "nothing was written" in err and "Traceback" not in err
    assert not out.exists()


def test_a_placeholder_secret_in_the_data_dir_is_not_exported(env, tmp_root):
    """A data dir started from the old Unraid template holds `generated` as its registration shared secret: the
    export (a new deployment of the same server) gets a random one instead, and a second export keeps that."""
    data = Path(env["SYNAPSE_DATA_DIR"])
    data.mkdir(parents=True)
    (data / "example.test.registration.key").write_text("generated\n")
    (data / "example.test.form.key").write_text("f" * 40 + "\n")  # a sound one is carried as it is
    first = tmp_root / "k1"
    assert run(env, "export", "kubernetes", "-o", str(first)).returncode == 0
    secrets = secret_data(first)
    assert secrets["example.test.registration.key"] != "generated\n"
    assert len(secrets["example.test.registration.key"].strip()) >= 32
    assert secrets["example.test.form.key"] == "f" * 40 + "\n"
    assert (data / "example.test.registration.key").read_text() == "generated\n"  # export writes nothing there
    (data / "example.test.registration.key").unlink()  # the next export finds only its previous output
    assert run(env, "export", "kubernetes", "-o", str(first)).returncode == 0
    assert secret_data(first)["example.test.registration.key"] == secrets["example.test.registration.key"]
