"""The stack's scheduler: the supervised program `scheduler` runs each job of `scheduler/jobs.json` when its cron
expression is due (local time, `TZ`), as a child process, one instance of a job at a time.

Its output goes through supervisord and the prefixer (`scheduler | ...`): one line when a job starts, its output
(each line prefixed with the job's name), one line with the outcome. A job whose previous run is still going when
it is due again is skipped (and says so). Runs missed while the stack was down are not made up: the next run is
the next due time after the scheduler starts. `--alive HEARTBEAT` is its health check (the loop touches the file).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..cron import Cron, next_due, parse
from .flock import LOCKED  # a job that found another run of itself holding its lock

POLL_SECONDS = 1.0  # how often the loop looks at the clock and its children (and touches the heartbeat)
ALIVE_SECONDS = 30.0  # a heartbeat older than this: the loop is stuck
STOP_SECONDS = 8.0  # on SIGTERM, how long running jobs get before they are killed (supervisord waits 10 s)


@dataclass(frozen=True)
class Job:
    name: str
    cron: Cron
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()  # added to the minimal child environment (the backup job's variables)


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    started: float
    relay: threading.Thread


_output = threading.Lock()


def log(line: str) -> None:
    """One whole line at a time: the jobs' output is relayed from other threads."""
    with _output:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def load_jobs(path: str) -> tuple[str, list[Job]]:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    jobs = [
        Job(j["name"], parse(j["schedule"]), tuple(j["command"]), tuple(sorted(j.get("env", {}).items())))
        for j in doc["jobs"]
    ]
    return doc["heartbeat"], jobs


def outcome(name: str, code: int, seconds: float) -> str:
    """The one line that says how a run ended."""
    if code == 0:
        return f"{name}: finished OK in {seconds:.1f}s"
    if code == LOCKED:
        return f"{name}: not run: another run of it holds its lock (exit {code})"
    if code < 0:
        return f"{name}: FAILED: killed by signal {-code} after {seconds:.1f}s"
    return f"{name}: FAILED with exit {code} after {seconds:.1f}s"


def _relay(name: str, stream: object) -> None:
    for raw in stream:  # type: ignore[attr-defined]
        text = raw.decode("utf-8", "replace").rstrip("\n")
        log(f"{name}: {text}")


def tick(
    jobs: list[Job], due: dict[str, datetime | None], running: set[str], now: datetime
) -> tuple[list[tuple[Job, datetime]], list[str], dict[str, datetime | None]]:
    """The scheduling decision, pure: at `now`, given each job's next due time and the jobs still running, which
    jobs start (with the time they were due), which are skipped (still running), and the next due times. A job
    that was due several times meanwhile (a suspended machine) runs once; the next due time is after `now`."""
    start, skipped, new_due = [], [], dict(due)
    for job in jobs:
        when = due[job.name]
        if when is None or now < when:
            continue
        new_due[job.name] = next_due(job.cron, now)
        if job.name in running:
            skipped.append(job.name)
        else:
            start.append((job, when))
    return start, skipped, new_due


def start(job: Job) -> Running:
    from ..programs import child_environment  # here: `--alive` (the health check) stays a light import

    proc = subprocess.Popen(
        job.command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**child_environment(os.environ), **dict(job.env)},
        cwd="/",
        start_new_session=True,  # our SIGTERM handling decides when it stops
    )
    relay = threading.Thread(target=_relay, args=(job.name, proc.stdout), daemon=True)
    relay.start()
    return Running(proc, time.monotonic(), relay)


def run(jobs_file: str) -> int:
    heartbeat, jobs = load_jobs(jobs_file)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    now = datetime.now()
    due: dict[str, datetime | None] = {job.name: next_due(job.cron, now) for job in jobs}
    for job in jobs:
        log(f"{job.name}: scheduled '{job.cron.text}', next run {_when(due[job.name])}")
    running: dict[str, Running] = {}
    Path(heartbeat).write_text(f"{os.getpid()}\n")
    while not stopping.is_set():
        os.utime(heartbeat)
        _reap(running)
        starting, skipped, due = tick(jobs, due, set(running), datetime.now())
        for name in skipped:
            log(f"{name}: due, but its previous run is still going: skipped; next {_when(due[name])}")
        for job, when in starting:
            log(f"{job.name}: started (due {when:%Y-%m-%d %H:%M})")  # before any line of its own output
            try:
                running[job.name] = start(job)
            except OSError as exc:
                log(f"{job.name}: FAILED to start: {exc}")
        stopping.wait(POLL_SECONDS)
    _stop(running)
    return 0


def _reap(running: dict[str, Running]) -> None:
    for name, job in list(running.items()):
        code = job.proc.poll()
        if code is None:
            continue
        job.relay.join(timeout=2)
        del running[name]
        log(outcome(name, code, time.monotonic() - job.started))


def _stop(running: dict[str, Running]) -> None:
    for name, job in running.items():
        log(f"{name}: stopping with the stack")
        job.proc.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for job in running.values():
        try:
            job.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            job.proc.kill()
            job.proc.wait()
    _reap(running)


def _when(when: datetime | None) -> str:
    return f"{when:%Y-%m-%d %H:%M} (local time)" if when else "never"


def alive(heartbeat: str) -> int:
    try:
        age = time.time() - os.stat(heartbeat).st_mtime
    except OSError as exc:
        print(f"no heartbeat: {exc}", file=sys.stderr)
        return 1
    return 0 if age < ALIVE_SECONDS else 1


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--alive":
        return alive(argv[1])
    if len(argv) != 1:
        print("usage: python -m synapse_workers.run.scheduler JOBS_FILE | --alive HEARTBEAT", file=sys.stderr)
        return 2
    return run(argv[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
