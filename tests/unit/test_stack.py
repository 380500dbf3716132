"""`Stack` (run/supervise.py) against fake process-control back-ends, table-driven.

The programs are the real ones `programs()` derives from a plan, in both launch modes; the back-ends are fakes
that run nothing and journal what they were asked. What the journal must say follows from the stack's stated
order (PostgreSQL → Redis → main → workers → nginx, each stage healthy before the next; the zygote first, its
import needing no database; stopped in reverse, what the zygote forked before the zygote) and from the crash
rules (five crashes in ten minutes stop a program; losing an essential one stops the stack; a restarted zygote
forks what it ran again, main first). `status.json` is read back as `synapse-workers status` reads it.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import replace

import pytest

from synapse_workers.load import load_plan
from synapse_workers.programs import programs
from synapse_workers.run.control import Failure
from synapse_workers.run.status import read_status
from synapse_workers.run.supervise import Stack
from synapse_workers.run.watch import CRASH_LIMIT, Report
from tests.unit.test_programs import BINARIES

PIDS = itertools.count(100)


class FakeBackend:
    """Runs nothing: a program it is asked to start is RUNNING (or what `on_start` says) with a new PID."""

    def __init__(self, label: str, journal: list, names, host: str | None = None):
        self.label, self.journal, self.host = label, journal, host
        self.names = frozenset(names)
        self.rows = {n: Report(n, "STOPPED", 0) for n in sorted(self.names)}
        self.on_start: dict[str, str] = {}  # name → the state a start leaves it in
        self.failure: Failure | None = None
        self.unhealthy: set[str] = set()

    def start(self, names, deadline):
        self.journal.append((self.label, "start", *names))
        if self.failure:
            return self.failure
        for n in names:
            state = self.on_start.get(n, "RUNNING")
            self.rows[n] = Report(n, state, next(PIDS) if state == "RUNNING" else 0)
        return None

    def stop(self, names):
        self.journal.append((self.label, "stop", *names))
        for n in names:
            self.rows[n] = Report(n, "STOPPED", 0)

    def reports(self, earlier):
        return list(self.rows.values())

    def tail(self, name, size):
        return f"starting {name}\n{name}: the last line\n"

    def checks(self):
        return {n: (lambda n=n: "refused" if n in self.unhealthy else None) for n in self.names}

    # the daemon's
    def open(self):
        self.journal.append((self.label, "open"))

    def alive(self):
        return True

    def close(self):
        self.journal.append((self.label, "close"))

    def kill(self):
        self.journal.append((self.label, "kill"))

    # what happens to a program meanwhile
    def crash_and_restart(self, name):
        self.rows[name] = replace(self.rows[name], state="RUNNING", pid=next(PIDS))


def make_stack(base_env, mode: str, workers: str = "synchrotron"):
    plan = load_plan({**base_env, "SYNAPSE_WORKER_TYPES": workers, "SYNAPSE_LAUNCH_MODE": mode})
    progs = programs(plan, as_root=False, binaries=BINARIES)
    journal: list = []
    supervisord = FakeBackend("supervisord", journal, [p.name for p in progs])
    forking = [p for p in progs if p.children]
    nested = [FakeBackend("zygote", journal, [c.name for c in p.children], host=p.name) for p in forking]
    stack = Stack(plan, progs, BINARIES, as_root=False, daemon=supervisord, nested=nested)
    os.makedirs(plan.layout.state_dir, exist_ok=True)  # prepare()'s, in `run`
    return stack, journal, supervisord, (nested[0] if nested else supervisord)


START = {
    "process": [("supervisord", "open"), ("supervisord", "start", "redis"), ("supervisord", "start", "main"),
                ("supervisord", "start", "synchrotron1"), ("supervisord", "start", "nginx")],
    "fork": [("supervisord", "open"), ("supervisord", "start", "synapse"), ("supervisord", "start", "redis"),
             ("zygote", "start", "main"), ("zygote", "start", "synchrotron1"), ("supervisord", "start", "nginx")],
}
STOP = {
    "process": [("supervisord", "stop", "nginx"), ("supervisord", "stop", "synchrotron1"),
                ("supervisord", "stop", "main"), ("supervisord", "stop", "redis"), ("supervisord", "close")],
    "fork": [("supervisord", "stop", "nginx"), ("zygote", "stop", "synchrotron1"), ("zygote", "stop", "main"),
             ("supervisord", "stop", "synapse"), ("supervisord", "stop", "redis"), ("supervisord", "close")],
}


def start(stack: Stack) -> bool:
    stack._opened = True
    stack.daemon.open()
    return stack._start_stages()


@pytest.mark.parametrize("mode", ["process", "fork"])
def test_starts_in_stages_and_stops_in_reverse(base_env, mode):
    stack, journal, _, _ = make_stack(base_env, mode)
    assert start(stack) and stack.exit_code == 0
    assert journal == START[mode]
    journal.clear()
    stack._stop_all()
    assert journal == STOP[mode]


@pytest.mark.parametrize("mode", ["process", "fork"])
def test_status_shows_the_synapse_processes_not_the_zygote(base_env, mode):
    stack, _, _, _ = make_stack(base_env, mode)
    assert start(stack)
    shown = read_status(stack.layout).processes
    assert [(p.name, p.state) for p in shown] == [("redis", "RUNNING"), ("main", "RUNNING"),
                                                  ("synchrotron1", "RUNNING"), ("nginx", "RUNNING")]
    assert all(p.pid for p in shown)


# A stage that cannot start: (mode, what goes wrong) → the journal of starts, the program blamed in `status`.
FAILED_STARTS = {
    "zygote does not answer": ("fork", "zygote-fails", [("supervisord", "open"), ("supervisord", "start", "synapse"),
                                                        ("supervisord", "start", "redis"), ("zygote", "start", "main")],
                               "synapse"),
    "main FATAL (process)": ("process", "main-fatal", START["process"][:3], "main"),
    "main FATAL (fork)": ("fork", "main-fatal", START["fork"][:4], "main"),
}


@pytest.mark.parametrize("case", FAILED_STARTS)
def test_a_stage_that_fails_stops_the_start_and_names_the_program(base_env, case):
    mode, trouble, expected, blamed = FAILED_STARTS[case]
    stack, journal, _, synapse = make_stack(base_env, mode)
    if trouble == "zygote-fails":
        synapse.failure = Failure("synapse", "synapse (which forks main) does not answer: refused.")
    else:
        synapse.on_start["main"] = "FATAL"
    assert not start(stack)
    assert stack.exit_code == 1
    assert journal == expected
    assert stack.last_error == {blamed: f"{blamed}: the last line"}


def test_asked_to_stop_while_starting_is_a_clean_stop(base_env):
    stack, journal, _, synapse = make_stack(base_env, "process")
    synapse.unhealthy.add("main")
    stack.stop_requested.set()
    assert not start(stack) and stack.exit_code == 0


def poll(stack: Stack, times: int = 1) -> None:
    for _ in range(times):
        stack._poll()


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.mark.parametrize("mode", ["process", "fork"])
def test_a_crash_looping_worker_is_stopped_by_its_back_end_and_the_stack_goes_on(base_env, mode):
    stack, journal, _, synapse = make_stack(base_env, mode)
    assert start(stack)
    poll(stack)
    journal.clear()
    for _ in range(CRASH_LIMIT):
        synapse.crash_and_restart("synchrotron1")
        poll(stack)
    assert journal == [("zygote" if mode == "fork" else "supervisord", "stop", "synchrotron1")]
    assert not stack.stop_requested.is_set() and stack.exit_code == 0
    assert {p.name: p.restarts for p in read_status(stack.layout).processes}["synchrotron1"] == CRASH_LIMIT


@pytest.mark.parametrize("mode", ["process", "fork"])
def test_losing_main_for_good_stops_the_stack(base_env, mode):
    stack, _, _, synapse = make_stack(base_env, mode)
    assert start(stack)
    poll(stack)
    synapse.rows["main"] = Report("main", "FATAL", 0, 1)
    poll(stack)
    assert stack.stop_requested.is_set() and stack.exit_code == 1
    assert stack.last_error["main"] == "main: the last line"


def test_a_restarted_zygote_forks_again_main_first_without_a_crash_looped_worker(base_env):
    stack, journal, supervisord, zygote = make_stack(base_env, "fork", "synchrotron, event_persister")
    assert start(stack)
    poll(stack)
    for _ in range(CRASH_LIMIT):
        zygote.crash_and_restart("synchrotron1")
        poll(stack)
    journal.clear()
    for name in zygote.names:  # the zygote died: its children with it; supervisord started a new one
        zygote.rows[name] = Report(name, "STOPPED", 0)
    zygote.unhealthy.add("main")
    supervisord.crash_and_restart("synapse")
    poll(stack)
    assert wait_for(lambda: journal == [("zygote", "start", "main")])
    time.sleep(0.2)
    assert journal == [("zygote", "start", "main")]  # the workers wait for main to be healthy
    zygote.unhealthy.clear()
    assert wait_for(lambda: journal == [("zygote", "start", "main"), ("zygote", "start", "event_persister1")])
    assert not stack.stop_requested.is_set()


def test_a_restarted_program_that_hosts_nothing_is_only_watched(base_env):
    stack, journal, supervisord, _ = make_stack(base_env, "process")
    assert start(stack)
    poll(stack)
    journal.clear()
    supervisord.crash_and_restart("nginx")
    poll(stack)
    time.sleep(0.1)
    assert journal == []
    assert {p.name: p.restarts for p in read_status(stack.layout).processes}["nginx"] == 1
