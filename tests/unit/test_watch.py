"""The supervision decision (run/watch.py), table-driven: no processes, no clock.

Each case is a sequence of supervisord snapshots (name, statename, pid) at given times, and the events a
person watching those snapshots would name: a running program whose state turns EXITED/BACKOFF/FATAL has
crashed; a new PID while it was running means it died and was restarted between two looks; five crashes
within ten minutes is a crash loop; FATAL is reported once.
"""

from __future__ import annotations

import pytest

from synapse_workers.run.watch import Report, WatchState, observe


def run(snapshots, limit=5, window=600.0):
    """snapshots: [(time, [(name, state, pid), ...]), ...] → (final state, [(time, kind, name), ...])."""
    state, seen = WatchState(), []
    for now, rows in snapshots:
        state, events = observe(state, [Report(n, s, p) for n, s, p in rows], now, limit, window)
        seen += [(now, e.kind, e.name) for e in events]
    return state, seen


CASES = {
    "steady": (
        [(0, [("main", "RUNNING", 10)]), (1, [("main", "RUNNING", 10)]), (2, [("main", "RUNNING", 10)])],
        [],
    ),
    "first sight is not a crash": (
        [(0, [("w1", "EXITED", 0)])],
        [],
    ),
    "starting then running is not a crash": (
        [(0, [("w1", "STARTING", 11)]), (1, [("w1", "RUNNING", 11)])],
        [],
    ),
    "exit seen, then the restart": (
        [(0, [("w1", "RUNNING", 11)]), (1, [("w1", "BACKOFF", 0)]), (2, [("w1", "STARTING", 12)])],
        [(1, "crashed", "w1"), (2, "restarted", "w1")],
    ),
    "death and restart between two looks": (
        [(0, [("w1", "RUNNING", 11)]), (1, [("w1", "RUNNING", 12)])],
        [(1, "crashed", "w1"), (1, "restarted", "w1")],
    ),
    "an orderly stop is not a crash": (
        [(0, [("w1", "RUNNING", 11)]), (1, [("w1", "STOPPING", 11)]), (2, [("w1", "STOPPED", 0)])],
        [],
    ),
    "fatal is reported once": (
        [(0, [("w1", "RUNNING", 11)]), (1, [("w1", "FATAL", 0)]), (2, [("w1", "FATAL", 0)])],
        [(1, "crashed", "w1"), (1, "fatal", "w1")],
    ),
    "only the program that changed": (
        [(0, [("a", "RUNNING", 1), ("b", "RUNNING", 2)]), (1, [("a", "RUNNING", 1), ("b", "RUNNING", 3)])],
        [(1, "crashed", "b"), (1, "restarted", "b")],
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_events(name):
    snapshots, expected = CASES[name]
    assert run(snapshots)[1] == expected


def _crashes(times, pid=100):
    """A program that dies and is back with a new PID at each of `times`."""
    snapshots = [(0, [("w1", "RUNNING", pid)])]
    for i, t in enumerate(times, start=1):
        snapshots.append((t, [("w1", "RUNNING", pid + i)]))
    return snapshots


def test_fifth_crash_within_ten_minutes_is_a_crash_loop():
    _, events = run(_crashes([10, 20, 30, 40, 50]))
    loops = [e for e in events if e[1] == "crash_loop"]
    assert loops == [(50, "crash_loop", "w1")]


def test_four_crashes_are_not_a_loop():
    _, events = run(_crashes([10, 20, 30, 40]))
    assert not [e for e in events if e[1] == "crash_loop"]


def test_crashes_spread_beyond_the_window_are_not_a_loop():
    # 5 crashes, but never 5 within any 600 s window.
    _, events = run(_crashes([0.5, 200, 400, 700, 900]))
    assert not [e for e in events if e[1] == "crash_loop"]


def test_restarts_are_counted_for_status():
    state, _ = run(_crashes([10, 20, 700]))
    assert state.restarts == {"w1": 3}


def test_observe_does_not_change_the_previous_state():
    before = WatchState()
    after, _ = observe(before, [Report("w1", "RUNNING", 5)], 0.0)
    assert before.last == {} and after.last["w1"].pid == 5
