"""`pytest -m "not integration"` is the fast run: no test of tests/integration may slip into it, whether or not its
module sets `pytestmark` (tests/integration/conftest.py marks them all)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_integration_test_carries_the_marker():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
         "--continue-on-collection-errors", "-m", "not integration", "tests/integration"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    # A module that fails to import is the integration run's failure, not this test's: the others are still checked.
    slipped = [line for line in result.stdout.splitlines() if line.startswith("tests/integration/")]
    assert slipped == [], result.stdout
    deselected = re.search(r"(\d+) deselected", result.stdout)
    assert deselected and int(deselected[1]) > 100, result.stdout + result.stderr  # the directory was really read
