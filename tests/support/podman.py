"""podman for the container tests: the image built once per test session by scripts/build-image.sh, and a
runner that removes every container and volume it made, whatever happens.

The fixtures (`image_conf`, `podman`) live in tests/integration/conftest.py so that every module shares the one
build; the two podman settings this host needs (runc, ulimits within the hard limits) are in the containers.conf
build-image.sh writes, passed as CONTAINERS_CONF on every call.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("SW_TEST_IMAGE", "synapse-workers:latest")
TIMINGS: dict[str, float] = {}


@dataclass
class Podman:
    conf: str  # the containers.conf build-image.sh wrote for this host (runc, ulimits)
    created: list[tuple[str, str]] = field(default_factory=list)  # (kind, name) to remove at the end

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["podman", *args],
            env={**os.environ, "CONTAINERS_CONF": self.conf},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}\n{result.stderr[-3000:]}")
        return result

    def volume(self) -> str:
        name = f"sw-test-{secrets.token_hex(4)}"
        self("volume", "create", name)
        self.created.append(("volume", name))
        return name

    def mountpoint(self, volume: str) -> Path:
        return Path(self("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip())

    def run(self, volume: str, port: int, env: dict[str, str], *extra: str) -> str:
        name = f"sw-test-{secrets.token_hex(4)}"
        self.created.append(("container", name))
        args = ["run", "-d", "--name", name, "-v", f"{volume}:/data", "-p", f"127.0.0.1:{port}:8008"]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        self(*args, *extra, IMAGE)
        return name

    def logs(self, name: str) -> str:
        result = self("logs", name, check=False)
        return result.stdout + result.stderr

    def wait_healthy(self, name: str, timeout: float = 240) -> float:
        """Runs the image's HEALTHCHECK until it passes (podman has no timer without systemd); seconds taken."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            state = self("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running":
                raise AssertionError(f"{name} is {state}:\n{self.logs(name)[-4000:]}")
            if self("healthcheck", "run", name, check=False).returncode == 0:
                return time.monotonic() - started
            time.sleep(0.5)
        raise AssertionError(f"{name} not healthy within {timeout}s:\n{self.logs(name)[-4000:]}")

    def stop(self, name: str) -> float:
        started = time.monotonic()
        self("stop", "-t", "10", name, timeout=60)
        return time.monotonic() - started

    def cleanup(self) -> None:
        for kind, name in reversed(self.created):
            if kind == "container":
                self("rm", "-f", "-t", "0", name, check=False)
            else:
                self("volume", "rm", "-f", name, check=False)


def _missing(message: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)  # CI installs everything: a missing tool is a failure there, never a skip
    pytest.skip(message)


def build_image() -> Iterator[str]:
    """Builds the image once (scripts/build-image.sh); yields the containers.conf path."""
    if os.geteuid() != 0:
        _missing("the container tests need root (podman as root, no registry)")
    if not shutil.which("podman"):
        _missing("podman is not installed: run scripts/container-tools.sh")
    workdir = Path(tempfile.mkdtemp(prefix="sw-image-"))
    conf = str(workdir / "containers.conf")
    try:
        started = time.monotonic()
        build = subprocess.run(
            ["bash", str(REPO / "scripts/build-image.sh")],
            env={**os.environ, "SW_IMAGE": IMAGE, "SW_CONTAINERS_CONF": conf},
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert build.returncode == 0, f"build-image.sh failed:\n{build.stderr[-5000:]}"
        TIMINGS["image build (s)"] = round(time.monotonic() - started, 1)
        size = Podman(conf)("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip()
        TIMINGS["image size (MB)"] = round(int(size) / 1e6)
        yield conf
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        print("\ncontainer timings:", TIMINGS, file=sys.stderr)


def podman_runner(image_conf: str) -> Iterator[Podman]:
    runner = Podman(image_conf)
    try:
        yield runner
    finally:
        runner.cleanup()
