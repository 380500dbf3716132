"""Shared by the integration modules: every test here carries the `integration` marker; the container image,
built once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.podman import Podman, build_image, podman_runner

INTEGRATION_DIR = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks every test under tests/integration `integration`, whether or not its module says so, so that
    `pytest -m "not integration"` never starts a real Synapse, nginx, PostgreSQL, Redis or container. tryfirst: the
    marks must be on before pytest's own -m deselection (a hook of the same name) looks at them. A conftest hook
    sees the items of every directory, hence the path test."""
    for item in items:
        if item.path.resolve().is_relative_to(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def image_conf() -> Iterator[str]:
    """Builds the image once (scripts/build-image.sh) for every module that uses it; yields the containers.conf."""
    yield from build_image()


@pytest.fixture
def podman(image_conf: str) -> Iterator[Podman]:
    """A podman runner that removes its containers and volumes at the end of the test, even on failure."""
    yield from podman_runner(image_conf)
