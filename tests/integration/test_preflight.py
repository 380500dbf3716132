"""Faults at start-up are named before anything starts: a port someone holds, an external PostgreSQL that
refuses our password or does not answer, a full disk. Real sockets, a real PostgreSQL, a real tmpfs."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from synapse_workers.files import write_files
from synapse_workers.load import load_plan
from synapse_workers.render import render_all
from synapse_workers.run.preflight import check_external_database
from tests.conftest import free_port
from tests.support.pgcluster import PgCluster
from tests.support.stack import SW, Stack, make_root, stack_env


def _run(env: dict[str, str], timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([SW, "run"], env=env, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


@pytest.fixture
def root():
    path = make_root("sw-pre-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("which", ["public", "internal"])
def test_a_port_in_use_is_named_and_nothing_starts(root, which):
    env = stack_env(root, "")
    port = int(env["SYNAPSE_HTTP_PORT"]) if which == "public" else int(env["SYNAPSE_INTERNAL_PORT_BASE"]) + 2
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result, took = _run(env)
    assert result.returncode == 2, result.stdout + result.stderr
    expected = (f"SYNAPSE_HTTP_PORT={port} cannot be used" if which == "public" else
                f"port {port} (main's health listener) cannot be used")
    assert expected in result.stderr and "in use by another program" in result.stderr, result.stderr
    assert took < 30 and "Traceback" not in result.stderr
    assert not Stack(env).leftovers()  # not even the embedded PostgreSQL was started
    assert not Path(env["SYNAPSE_CONFIG_DIR"], "homeserver.yaml").exists()  # and nothing was generated


def test_a_wrong_database_password_is_named(root):
    with PgCluster() as pg:
        env = stack_env(root, "synchrotron", **{**pg.env(), "POSTGRES_PASSWORD": "not-the-password"})
        result, took = _run(env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refused the password for user 'synapse': check POSTGRES_PASSWORD" in result.stderr, result.stderr
    assert "not-the-password" not in result.stdout + result.stderr
    assert took < 60


def test_an_unreachable_database_is_named_after_waiting(root):
    env = stack_env(root, "", POSTGRES_PASSWORD="x", POSTGRES_HOST="127.0.0.1", POSTGRES_PORT=str(free_port()))
    plan = load_plan(env)
    write_files(plan, render_all(plan))
    said: list[str] = []
    started = time.monotonic()
    problems = check_external_database(plan, said.append, lambda: False, wait=3)
    assert 3 <= time.monotonic() - started < 20
    assert len(problems) == 1 and "is unreachable after 3s" in problems[0], problems
    assert "check POSTGRES_HOST and POSTGRES_PORT" in problems[0]
    assert said and said[0].startswith("waiting for PostgreSQL at 127.0.0.1:")
    # Asked to stop while waiting: no error, no wait.
    assert check_external_database(plan, said.append, lambda: True, wait=30) == []


def test_a_full_disk_leaves_the_previous_files(root):
    """Generation on a full file system fails with the cause named, and the files of the last run stay."""
    runtime = root / "small"
    runtime.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(runtime)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs as root: {mounted.stderr!r}")
    try:
        env = stack_env(root, "synchrotron", SYNAPSE_RUNTIME_DIR=str(runtime), POSTGRES_PASSWORD="x")
        first = subprocess.run([SW, "generate"], env=env, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0, first.stderr
        before = {p: p.read_bytes() for p in runtime.rglob("*") if p.is_file()}
        with open(runtime / "filler", "wb", buffering=0) as handle:  # fill it up
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:
                pass
        env["SYNAPSE_WORKER_TYPES"] = "synchrotron:8, event_persister:4"  # much more to write
        second = subprocess.run([SW, "generate"], env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert "No space left on device" in second.stderr and "Traceback" not in second.stderr, second.stderr
        after = {p: p.read_bytes() for p in runtime.rglob("*") if p.is_file() and p.name != "filler"}
        assert after == before
        assert not [p for p in runtime.iterdir() if p.name.startswith((".staging-", ".old-"))]
    finally:
        subprocess.run(["umount", str(runtime)], check=False)


def test_a_data_dir_synapse_cannot_use_is_named(root):
    """A data dir that exists, owned by root and closed to others: not re-owned, and the cause is named."""
    data = root / "data"
    data.mkdir(mode=0o700)
    env = stack_env(root, "")
    result, took = _run(env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{data} (SYNAPSE_DATA_DIR) is not accessible to UID=991/GID=991" in result.stderr, result.stderr
    assert "cannot enter it" in result.stderr and f"chown 991:991 {data}" in result.stderr
    assert (data.stat().st_uid, data.stat().st_mode & 0o777) == (0, 0o700)  # left as the admin made it
    assert list(data.iterdir()) == []  # refused before anything was generated into it
    assert not Stack(env).leftovers()


def _kernel_ephemeral_range() -> range:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(low, high + 1)


def test_internal_ports_in_the_ephemeral_range_are_warned_about(root):
    """Outgoing connections take local ports from net.ipv4.ip_local_port_range (read here from the kernel):
    `check` warns, naming the variable, when internal listeners would lie there; not when they lie below it."""
    ephemeral = _kernel_ephemeral_range()
    inside = stack_env(root, "", SYNAPSE_INTERNAL_PORT_BASE=str(ephemeral.start + 100))
    result = subprocess.run([SW, "check"], env=inside, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr  # a warning, not a refusal
    warning = [line for line in result.stderr.splitlines() if "ephemeral range" in line]
    assert len(warning) == 1 and warning[0].startswith("synapse-workers: warning: SYNAPSE_INTERNAL_PORT_BASE="), \
        result.stderr
    assert f"{ephemeral.start}-{ephemeral.stop - 1}" in warning[0] and f"{ephemeral.start + 100}-" in warning[0]
    outside = {**inside, "SYNAPSE_INTERNAL_PORT_BASE": str(ephemeral.start - 2000)}
    plan = load_plan(outside)
    assert all(p.port not in ephemeral for proc in plan.processes for p in proc.listeners if p.port)
    result = subprocess.run([SW, "check"], env=outside, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and "ephemeral" not in result.stderr, result.stdout + result.stderr
