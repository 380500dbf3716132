"""Fixtures shared by the integration modules: the container image, built once per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.podman import Podman, build_image, podman_runner


@pytest.fixture(scope="session")
def image_conf() -> Iterator[str]:
    """Builds the image once (scripts/build-image.sh) for every module that uses it; yields the containers.conf."""
    yield from build_image()


@pytest.fixture
def podman(image_conf: str) -> Iterator[Podman]:
    """A podman runner that removes its containers and volumes at the end of the test, even on failure."""
    yield from podman_runner(image_conf)
