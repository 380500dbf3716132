"""`pytest -m "not integration"` is the fast run: no test of tests/integration may slip into it, whether or not its
module sets `pytestmark` (tests/integration/conftest.py marks them all)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _collected(*args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
         "--continue-on-collection-errors", *args, "tests/integration"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    # A module that fails to import is the integration run's failure, not this test's: the others are still checked
    # (and the caller's count of everything collected shows the directory was really read).
    return [line for line in result.stdout.splitlines() if line.startswith("tests/integration/")]


def test_every_integration_test_carries_the_marker():
    everything = _collected()
    assert len(everything) > 100, everything  # the directory was really collected
    assert _collected("-m", "not integration") == []
