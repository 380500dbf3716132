"""Scheduled backups as `status`, `health` and the launcher's `/metrics` see them.

Three inputs: the schedule and destination (the plan's, or the `backup` job of `scheduler/jobs.json` for `status`
and `health`, which read only the runtime dir), the last run's outcome (`state/backup.json`, written by every
`synapse-workers backup`, ok or failed), and the newest complete backup in the destination (a `<UTC stamp>/`
directory holding its `manifest.json`: the outcome file keeps only the last run, so a failed run does not hide
when the last good one was made).

Late: the first due time after the start of the newest complete backup (or, with none, after the scheduler
started: runs missed while the stack was down are not made up) is more than `GRACE` ago. Pure (`missed_due`,
`metrics_text`, `report_lines`) except `read_report` and its readers.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ..cron import Cron, next_due, parse
from ..layout import Layout
from ..plan import BACKUP, Plan

GRACE = timedelta(hours=1)  # how long after its due time a backup may take before it is late
STAMP_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z")  # a complete backup's directory: its start, UTC
MANIFEST = "manifest.json"
DIR_VARIABLE = "SYNAPSE_BACKUP_DIR"


@dataclass(frozen=True)
class Outcome:
    """The last run (`state/backup.json`)."""

    started: float
    finished: float
    ok: bool
    error: str | None
    path: str | None
    bytes: int


@dataclass(frozen=True)
class Report:
    schedule: str
    destination: str
    last: Outcome | None  # the last run, ok or not (None: no run yet, or no outcome file)
    last_success: float | None  # epoch start of the newest complete backup (None: none)
    missed: datetime | None  # the due time (local) a backup is late for; None: not late
    unreadable: str | None = None  # why the outcome file could not be read


def missed_due(cron: Cron, reference: datetime, now: datetime, grace: timedelta = GRACE) -> datetime | None:
    """The due time a backup is late for, or None. `reference` is when the newest complete backup started (or
    when the scheduler started, with none); every time is naive local time, as the schedule's."""
    due = next_due(cron, reference)
    if due is None or now <= due + grace:
        return None
    return due


def stamp_time(name: str) -> float | None:
    """A backup directory's name (`20261206T041500Z`) → epoch seconds; None for any other name."""
    if not STAMP_RE.fullmatch(name):
        return None
    try:
        return datetime.strptime(name, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def newest_complete(destination: str) -> float | None:
    """The start of the newest complete backup in `destination` (a stamp directory with its manifest)."""
    try:
        names = os.listdir(destination)
    except OSError:
        return None
    times = [t for n in names if (t := stamp_time(n)) is not None and os.path.isfile(f"{destination}/{n}/{MANIFEST}")]
    return max(times, default=None)


def read_outcome(path: str) -> tuple[Outcome | None, str | None]:
    """The last run's outcome, or (None, why) when the file is missing (why None) or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            doc = json.load(handle)
        return (
            Outcome(
                started=float(doc["started"]),
                finished=float(doc["finished"]),
                ok=bool(doc["ok"]),
                error=None if doc.get("error") is None else str(doc["error"]),
                path=None if doc.get("path") is None else str(doc["path"]),
                bytes=int(doc.get("bytes") or 0),
            ),
            None,
        )
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{path}: {exc}"


def make_report(schedule: str, destination: str, outcome_path: str, since: float, now: float) -> Report:
    """The report at `now` (epoch); `since`: when the scheduler started (the reference with no backup yet)."""
    last, unreadable = read_outcome(outcome_path)
    success = newest_complete(destination)
    if last is not None and last.ok and last.path and os.path.dirname(last.path.rstrip("/")) == destination:
        success = max(success or 0.0, last.started)
    reference = success if success is not None else since
    missed = missed_due(parse(schedule), datetime.fromtimestamp(reference), datetime.fromtimestamp(now))
    return Report(schedule, destination, last, success, missed, unreadable)


def scheduled_backup(layout: Layout) -> tuple[str, str] | None:
    """(schedule, destination) of the `backup` job of the runtime dir's jobs file; None when there is none."""
    try:
        with open(layout.jobs_file, encoding="utf-8") as handle:
            doc = json.load(handle)
    except (OSError, ValueError):
        return None
    for job in doc.get("jobs", []):
        if job.get("name") == BACKUP and DIR_VARIABLE in job.get("env", {}):
            return str(job["schedule"]), str(job["env"][DIR_VARIABLE])
    return None


def read_report(layout: Layout, since: float, now: float) -> Report | None:
    """For `status` and `health`: the running stack's scheduled backups (None: none scheduled)."""
    job = scheduled_backup(layout)
    if job is None:
        return None
    return make_report(job[0], job[1], layout.backup_status, since, now)


def backup_metrics(plan: Plan) -> Callable[[], str] | None:
    """The launcher's /metrics (its /health aggregator's): the report made on each request, the launcher's start as
    the reference before any backup. None when no backup is scheduled."""
    job = next((j for j in plan.jobs if j.name == BACKUP), None)
    destination = plan.settings.backup.dir
    if job is None or destination is None:
        return None
    since = time.time()
    outcome = plan.layout.backup_status

    def text() -> str:
        return metrics_text(make_report(job.schedule, destination, outcome, since, time.time()))

    return text


def _local(epoch: float) -> str:
    return f"{datetime.fromtimestamp(epoch):%Y-%m-%d %H:%M}"


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def report_lines(report: Report) -> list[str]:
    """What `status` and `health` print (local times, as the schedule's)."""
    lines = [f"backups: '{report.schedule}' (local time) to {report.destination}"]
    last = report.last
    if report.unreadable:
        lines.append(f"  last run: unknown ({report.unreadable})")
    elif last is None:
        lines.append("  last run: none yet")
    elif last.ok:
        took = max(0.0, last.finished - last.started)
        lines.append(f"  last run: OK at {_local(last.started)}, {_size(last.bytes)} in {took:.0f}s: {last.path}")
    else:
        lines.append(f"  last run: FAILED at {_local(last.started)}: {last.error or 'no error recorded'}")
    newest = "none" if report.last_success is None else _local(report.last_success)
    lines.append(f"  newest complete backup: {newest}")
    if report.missed is not None:
        lines.append(
            f"  LATE: a backup was due at {report.missed:%Y-%m-%d %H:%M} and none has completed since "
            f"(more than {GRACE.total_seconds() / 3600:g} h)"
        )
    return lines


METRICS = (
    (
        "synapse_workers_backup_last_success_timestamp_seconds",
        "When the newest complete backup in SYNAPSE_BACKUP_DIR started (0: none).",
    ),
    ("synapse_workers_backup_last_run_timestamp_seconds", "When the last backup run finished (0: none yet)."),
    ("synapse_workers_backup_last_run_ok", "1 if the last backup run succeeded, 0 if it failed (absent: none yet)."),
    (
        "synapse_workers_backup_last_bytes",
        "Size of the last run's backup: every file of its manifest, hard-linked media included (absent: none yet).",
    ),
    ("synapse_workers_backup_late", "1 if a scheduled backup is more than an hour overdue, else 0."),
)


def metrics_text(report: Report) -> str:
    """Prometheus text exposition (0.0.4) of the report, every metric a gauge."""
    last = report.last
    values: dict[str, float | None] = {
        "synapse_workers_backup_last_success_timestamp_seconds": report.last_success or 0.0,
        "synapse_workers_backup_last_run_timestamp_seconds": last.finished if last else 0.0,
        "synapse_workers_backup_last_run_ok": (1.0 if last.ok else 0.0) if last else None,
        "synapse_workers_backup_last_bytes": float(last.bytes) if last else None,
        "synapse_workers_backup_late": 1.0 if report.missed is not None else 0.0,
    }
    out = []
    for name, help_text in METRICS:
        value = values[name]
        if value is None:
            continue
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value!r}"]
    return "\n".join(out) + "\n"
