"""Environment values that point at the system, or at someone else's files: refused, and nothing re-owned.

`SYNAPSE_RUNTIME_DIR=/etc` would have renamed and deleted /etc/nginx (directories under the runtime dir are
replaced whole), and `SYNAPSE_DATA_DIR=/` had the root launcher chown the whole filesystem to 991."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.test_cli_errors import run, snapshot

SYSTEM = ["/", "/etc", "/etc/", "/usr", "/usr/lib/synapse", "/var", "/var/lib", "/proc/self", "/tmp", "/run", "/root"]


@pytest.mark.parametrize("variable", ["SYNAPSE_RUNTIME_DIR", "SYNAPSE_DATA_DIR", "SYNAPSE_CONFIG_DIR"])
@pytest.mark.parametrize("path", SYSTEM)
def test_system_directories_are_refused(base_env, variable, path):
    result = run({**base_env, variable: path}, "generate")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{variable}={path!r} is invalid" in result.stderr and "system directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_symlink_to_a_system_directory_is_refused(base_env, tmp_root):
    link = tmp_root / "runtime"
    link.symlink_to("/etc")
    result = run({**base_env, "SYNAPSE_RUNTIME_DIR": str(link)}, "generate")
    assert result.returncode == 2 and "leads to the system directory '/etc'" in result.stderr, result.stderr


def test_a_runtime_dir_with_foreign_files_is_left_alone(base_env, tmp_root):
    runtime = tmp_root / "shared-dir"
    (runtime / "nginx").mkdir(parents=True)
    (runtime / "nginx" / "nginx.conf").write_text("user's own nginx\n")
    (runtime / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_root)
    for command in ("generate", "check", "run"):
        result = run({**base_env, "SYNAPSE_RUNTIME_DIR": str(runtime)}, command)
        assert result.returncode == 2, (command, result.stderr)
        assert "holds files synapse-workers did not create (notes.txt)" in result.stderr
    assert snapshot(tmp_root) == before


def test_an_empty_runtime_dir_is_claimed_and_reused(base_env, tmp_root):
    runtime = tmp_root / "empty"
    runtime.mkdir()
    env = {**base_env, "SYNAPSE_RUNTIME_DIR": str(runtime)}
    assert run(env, "generate").returncode == 0
    assert (runtime / ".synapse-workers-runtime").is_file()
    (runtime / "left-by-a-crash.tmp").write_text("x")  # our marker says the dir is ours: still accepted
    assert run(env, "generate").returncode == 0


def test_a_runtime_dir_from_before_the_marker_is_recognised(base_env, tmp_root):
    env = base_env
    assert run(env, "generate").returncode == 0
    runtime = Path(env["SYNAPSE_RUNTIME_DIR"])
    (runtime / ".synapse-workers-runtime").unlink()
    assert run(env, "generate").returncode == 0, "our own tree (shared.yaml with our header) is still ours"


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership changes happen only as root")
def test_only_what_we_create_changes_owner(base_env, tmp_root):
    """A data dir that exists, with the user's files in it: neither it nor its files are re-owned."""
    data = tmp_root / "data"
    data.mkdir()
    os.chown(data, 1234, 1234)
    mine = data / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_text("meow")
    os.chown(mine / "cat.jpg", 4321, 4321)
    env = {**base_env, "SYNAPSE_DATA_DIR": str(data), "SYNAPSE_CONFIG_DIR": str(data), "UID": "991", "GID": "991"}
    result = run(env, "generate")
    assert result.returncode == 0, result.stderr
    assert (data.stat().st_uid, mine.stat().st_uid, (mine / "cat.jpg").stat().st_uid) == (1234, 0, 4321)
    # What generate created is Synapse's: the generated config, its keys, the media store it made.
    for created in ("homeserver.yaml", "example.test.signing.key", "media_store"):
        assert (data / created).stat().st_uid == 991, created
