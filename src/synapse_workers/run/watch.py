"""The supervision decision, pure: given what we knew and what the back-ends report now, what happened?

`observe(previous, reports, now)` → (next state, events). No processes, no clock, no I/O: the monitor loop
in `supervise.py` polls the process-control back-ends (supervisord's programs, the zygote's children, both in
supervisord's terms: run/control.py), calls this, and acts on the events (log, stop a crash-looping program,
stop the stack when an essential one is lost, watch a restarted one until it is healthy again).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

CRASH_LIMIT, CRASH_WINDOW = 5, 600.0  # this many crashes within the window (seconds): stop and report
# A program in one of these has a process up: leaving them for DEAD, or showing a new PID, is a crash.
UP = frozenset({"STARTING", "RUNNING"})
DEAD = frozenset({"EXITED", "BACKOFF", "FATAL", "UNKNOWN"})

CRASHED, CRASH_LOOP, RESTARTED, FATAL = "crashed", "crash_loop", "restarted", "fatal"


@dataclass(frozen=True)
class Report:
    """One program as supervisord's getAllProcessInfo describes it."""

    name: str
    state: str  # supervisor's statename
    pid: int
    exit_status: int = 0
    started: float = 0.0  # epoch of the current start (`status` shows the uptime); not part of the decision


@dataclass(frozen=True)
class Event:
    kind: str  # crashed | crash_loop | restarted | fatal
    name: str
    exit_status: int = 0
    crashes: int = 0  # crashes inside the window, for crash_loop


@dataclass(frozen=True)
class WatchState:
    last: Mapping[str, Report] = field(default_factory=dict)
    crash_times: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    restarts: Mapping[str, int] = field(default_factory=dict)  # every crash seen since start
    fatal_reported: frozenset[str] = frozenset()


def observe(
    previous: WatchState,
    reports: Iterable[Report],
    now: float,
    limit: int = CRASH_LIMIT,
    window: float = CRASH_WINDOW,
) -> tuple[WatchState, list[Event]]:
    last = dict(previous.last)
    crash_times = dict(previous.crash_times)
    restarts = dict(previous.restarts)
    fatal = set(previous.fatal_reported)
    events: list[Event] = []
    for report in reports:
        before = last.get(report.name)
        last[report.name] = report
        if before is None:  # first sight: nothing to compare with
            continue
        restarted = bool(report.pid) and report.pid != before.pid and report.state in UP
        died = before.state in UP and report.state in DEAD
        # A death and the restart can fall between two polls: then only the new pid shows it.
        if died or (restarted and before.state in UP):
            times = tuple(t for t in crash_times.get(report.name, ()) if now - t <= window) + (now,)
            crash_times[report.name] = times
            restarts[report.name] = restarts.get(report.name, 0) + 1
            events.append(Event(CRASHED, report.name, report.exit_status))
            if len(times) >= limit:
                events.append(Event(CRASH_LOOP, report.name, report.exit_status, len(times)))
                crash_times[report.name] = ()
        if restarted:
            events.append(Event(RESTARTED, report.name))
        if report.state == "FATAL" and report.name not in fatal:
            fatal.add(report.name)
            events.append(Event(FATAL, report.name, report.exit_status))
    state = replace(previous, last=last, crash_times=crash_times, restarts=restarts, fatal_reported=frozenset(fatal))
    return state, events
