"""Moving a data dir from the official or the original image: what Synapse's user cannot use is named before
anything starts (exit 2, the command to run, nothing changed on disk), through the real `synapse-workers run`
and `check`; settings that will do nothing are warned about at start."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.stack import SW, Stack, make_root, stack_env
from tests.unit.test_cli_errors import snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ownership is checked as root for UID 991")


@pytest.fixture
def root():
    path = make_root("sw-mig-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def official_data_dir(root: Path) -> tuple[Path, dict[str, str]]:
    """What the official image's `generate` leaves (a monolith on SQLite), owned by 991 as its chown leaves it."""
    data = root / "data"
    data.mkdir()
    (data / "homeserver.yaml").write_text(yaml.safe_dump({
        "server_name": "localhost",
        "pid_file": f"{data}/homeserver.pid",
        "listeners": [{"port": 8008, "type": "http", "x_forwarded": True,
                       "resources": [{"names": ["client", "federation"], "compress": False}]}],
        "database": {"name": "sqlite3", "args": {"database": f"{data}/homeserver.db"}},
        "log_config": f"{data}/localhost.log.config",
        "media_store_path": f"{data}/media_store",
        "report_stats": False,
        "signing_key_path": f"{data}/localhost.signing.key",
        "trusted_key_servers": [{"server_name": "matrix.org"}],
    }))
    (data / "localhost.log.config").write_text(yaml.safe_dump({
        "version": 1,
        "handlers": {"console": {"class": "logging.StreamHandler"}},
        "root": {"level": "INFO", "handlers": ["console"]},
    }))
    (data / "localhost.signing.key").write_text("ed25519 a_abcd dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3Q\n")
    (data / "homeserver.db").write_bytes(b"")
    (data / "media_store").mkdir()
    for path in [data, *data.iterdir()]:
        os.chown(path, 991, 991)
    os.chmod(data / "localhost.signing.key", 0o600)
    env = stack_env(root, "", SYNAPSE_CONFIG_PATH=str(data / "homeserver.yaml"))
    return data, env


def _sw(env: dict[str, str], command: str) -> subprocess.CompletedProcess:
    return subprocess.run([SW, command], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["run", "check"])
def test_a_signing_key_made_by_root_stops_the_start_with_its_chown(root, command):
    data, env = official_data_dir(root)
    key = data / "localhost.signing.key"
    os.chown(key, 0, 0)  # e.g. `generate` run as root, 0600
    before = snapshot(data)
    result = _sw(env, command)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"synapse-workers: error: {key} (signing_key_path in {data}/homeserver.yaml) is not accessible to " \
           f"UID=991/GID=991 (Synapse's user): it cannot read it. Run as root: `chown 991:991 {key}`." \
           in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert f"synapse-workers: warning: log_config {data}/localhost.log.config in {data}/homeserver.yaml is not " \
           "used" in result.stderr  # said at start, before the refusal
    assert snapshot(data) == before  # nothing re-owned, nothing generated next to it
    assert not Stack(env).leftovers()


def test_a_root_owned_data_dir_without_media_store_stops_the_start(root):
    """Synapse would create media_store at its first start, as 991, in a directory only root may write."""
    data, env = official_data_dir(root)
    (data / "media_store").rmdir()
    os.chown(data, 0, 0)
    before = snapshot(data)
    result = _sw(env, "run")
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("synapse-workers: error: ")]
    assert f"`mkdir -p {data}/media_store && chown 991:991 {data}/media_store`" in errors[0], result.stderr
    assert errors[1].endswith(f"Run as root: `chown 991:991 {data}`.")  # SQLite's journal beside homeserver.db
    assert "All of the above, as root" in errors[-1] and len(errors) == 3
    assert snapshot(data) == before and (data.stat().st_uid, data.stat().st_mode & 0o777) == (0, 0o755)
    assert not Stack(env).leftovers()


def test_an_official_data_dir_passes_check_and_its_log_config_is_named(root):
    """The same data dir, as the official image leaves it: `check` passes (nginx -t, Synapse's own config
    loader on every process), and says that the file's log config is not used and how to apply it."""
    data, env = official_data_dir(root)
    (data / "media_store").rmdir()  # Synapse's config loader creates it: as Synapse's user, not as root
    result = _sw(env, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (data / "media_store").stat().st_uid == 991
    again = _sw(env, "check")  # a root-owned media store would now be refused
    assert again.returncode == 0, again.stdout + again.stderr
    warning = [line for line in result.stderr.splitlines() if "log_config" in line]
    assert warning == [
        f"synapse-workers: warning: log_config {data}/localhost.log.config in {data}/homeserver.yaml is not used: "
        "every process gets its own generated log config (its output goes to the container's log; "
        "SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK adds files). To apply that file to every process instead, set "
        f"SYNAPSE_LOG_CONFIG={data}/localhost.log.config (its file handlers are then shared by every process)."
    ]
