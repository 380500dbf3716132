"""Plan → the scheduler's jobs file (`scheduler/jobs.json`): each job's name, cron expression, command and the
variables it gets besides the minimal child environment (`env`, the backup job's). Pure.

The `scheduler` program (`run/scheduler.py`) reads it, `status`/`health` find the backup job's schedule and
destination there; it holds paths and numbers, never a secret (the compressor reads the database password from
its 0600 file itself; the backup job's `env` leaves the secret variables out).
"""

from __future__ import annotations

import json
from typing import Any

from ..plan import NGINX, Job, Plan
from ..programs import job_command, job_environment
from ..settings import NginxSettings
from .logrotate import render_logrotate


def render_scheduler(plan: Plan, nginx: NginxSettings) -> dict[str, str]:
    """The jobs file, and logrotate.conf for the `rotate-logs` job (`nginx` tunes it)."""
    if not plan.jobs or not plan.local(NGINX):  # several hosts: the scheduler runs on nginx's host
        return {}
    doc = {
        "heartbeat": plan.layout.scheduler_heartbeat,
        "jobs": [_job(plan, j) for j in plan.jobs],
    }
    return {plan.layout.jobs_file: json.dumps(doc, indent=2) + "\n", **render_logrotate(plan, nginx)}


def _job(plan: Plan, job: Job) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": job.name, "schedule": job.schedule, "command": list(job_command(plan, job))}
    env = job_environment(plan, job)
    if env:
        entry["env"] = env
    return entry
