"""Plan → the scheduler's jobs file (`scheduler/jobs.json`): each job's name, cron expression and command. Pure.

The `scheduler` program (`run/scheduler.py`) reads it; it holds paths and numbers, never a secret (the compressor
reads the database password from its 0600 file itself).
"""

from __future__ import annotations

import json

from ..plan import NGINX, Plan
from ..programs import job_command
from ..settings import NginxSettings
from .logrotate import render_logrotate


def render_scheduler(plan: Plan, nginx: NginxSettings) -> dict[str, str]:
    """The jobs file, and logrotate.conf for the `rotate-logs` job (`nginx` tunes it)."""
    if not plan.jobs or not plan.local(NGINX):  # several hosts: the scheduler runs on nginx's host
        return {}
    doc = {
        "heartbeat": plan.layout.scheduler_heartbeat,
        "jobs": [{"name": j.name, "schedule": j.schedule, "command": list(job_command(plan, j))} for j in plan.jobs],
    }
    return {plan.layout.jobs_file: json.dumps(doc, indent=2) + "\n", **render_logrotate(plan, nginx)}
