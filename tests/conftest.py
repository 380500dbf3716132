"""Shared fixtures: an isolated environment (temp data/runtime dirs, free ports) for each test."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from synapse_workers.run.preflight import ephemeral_ports

# "nginx not installed (...)", "... is not installed: ...": how the tests say a binary is missing.
_MISSING_BINARY = re.compile(r"\bnot installed\b", re.I)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true) every tool is installed by the project's scripts: a test skipped because a binary is
    missing is a failure there, never a skip."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci() and _MISSING_BINARY.search(str(report.longrepr)):
        report.outcome = "failed"
        report.longrepr = f"CI=true: a missing binary is a failure, not a skip: {report.longrepr}"


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def random_port_base(size: int = 1, lowest: int = 10000) -> int:
    """A random base with base..base+size-1 all at or above `lowest` and below the kernel's ephemeral range.

    An outgoing connection (nginx to an upstream, Synapse to Redis, a test's client) takes its local port from the
    ephemeral range; a listener there can lose its port to one between "it is free" and its bind (seen in CI:
    Synapse's `Address already in use` on a port checked free a moment before)."""
    ephemeral = ephemeral_ports() or range(32768, 61000)  # Linux's default
    if ephemeral.start - size < lowest:
        raise RuntimeError(f"no {size} ports from {lowest} below the ephemeral range starting at {ephemeral.start}")
    return random.randrange(lowest, ephemeral.start - size + 1)


def free_port() -> int:
    """A free loopback TCP port outside the ephemeral range (see random_port_base)."""
    for _ in range(500):
        port = random_port_base()
        if port_is_free(port):
            return port
    raise RuntimeError("no free port found")


def free_port_range(size: int = 120) -> int:
    """A base port such that base..base+size-1 are all free right now (and outside the ephemeral range)."""
    for _ in range(200):
        base = random_port_base(size)
        if all(port_is_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError("no free port range found")


@pytest.fixture
def tmp_root():
    # Short paths: unix socket paths must stay under 108 bytes. 0755: Synapse's user (UID 991) must reach the
    # data dir in it, as `run` and `check` verify before anything starts (mkdtemp makes 0700 dirs).
    root = Path(tempfile.mkdtemp(prefix="sw-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def free_ports(size: int = 120) -> tuple[int, int]:
    """(internal port base, public port) with the public port outside the internal range."""
    base = free_port_range(size)
    port = free_port()
    while base <= port < base + size:
        port = free_port()
    return base, port


def isolated_env(root: Path, server_name: str = "example.test") -> dict[str, str]:
    """Directories under root, free loopback ports: a stack that collides with nothing else."""
    base, port = free_ports()
    prometheus = free_port()
    while base <= prometheus < base + 120 or prometheus == port:
        prometheus = free_port()
    return {
        "SYNAPSE_SERVER_NAME": server_name,
        "SYNAPSE_REPORT_STATS": "no",
        "SYNAPSE_CONFIG_DIR": str(root / "data"),
        "SYNAPSE_DATA_DIR": str(root / "data"),
        "SYNAPSE_RUNTIME_DIR": str(root / "run"),
        "SYNAPSE_INTERNAL_PORT_BASE": str(base),
        "SYNAPSE_HTTP_PORT": str(port),
        "SYNAPSE_HTTP_BIND_ADDRESS": "127.0.0.1",
        "PROMETHEUS_PORT": str(prometheus),  # the built-in Prometheus's (with SYNAPSE_METRICS): never 9090 here
    }


@pytest.fixture
def base_env(tmp_root):
    """A minimal valid environment for a new install (external PostgreSQL), isolated under tmp_root."""
    return {**isolated_env(tmp_root), "POSTGRES_PASSWORD": "not-a-real-password"}
