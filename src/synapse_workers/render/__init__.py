"""Renderers: Plan → file contents, one module per output. Pure; `files` writes what they return."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..homeserver import GENERATED_LOG_CONFIG, generated_homeserver
from ..plan import Plan
from ..programs import Program
from .nginx import render_nginx
from .redis import render_redis
from .supervisor import render_supervisor
from .synapse import dump, log_config, render_synapse


@dataclass(frozen=True)
class FileSet:
    """managed: rewritten on every run under the runtime dir. once: created only when missing (mode)."""

    managed: dict[str, str]
    once: dict[str, tuple[str, int]] = field(default_factory=dict)


def render_all(plan: Plan, programs: Sequence[Program] = (), as_root: bool = False) -> FileSet:
    """Every file of the plan; with `programs` (what `run` supervises) also supervisord.conf."""
    managed: dict[str, str] = {}
    managed.update(render_synapse(plan))
    managed.update(render_nginx(plan))
    managed.update(render_redis(plan))
    if programs:
        managed.update(render_supervisor(plan.layout, programs, as_root))
    once: dict[str, tuple[str, int]] = {}
    if not plan.homeserver.exists:
        doc = generated_homeserver(plan.settings, plan.secrets, plan.layout.postgres_socket_dir, plan.public.port)
        text = (
            "# Generated once by synapse-workers from the environment; yours to edit from now on.\n"
            "# synapse-workers never modifies this file: workers and listeners are layered on top of it.\n"
        ) + dump(doc).split("\n", 2)[2]
        once[plan.homeserver.path] = (text, 0o600)
        # Marked as ours: SYNAPSE_LOG_CONFIG naming it later must not make it every process's log config.
        log_text = f"{GENERATED_LOG_CONFIG} (Synapse without synapse-workers reads it).\n"
        once[doc["log_config"]] = (log_text + dump(log_config(plan, plan.main)).split("\n", 2)[2], 0o644)
    return FileSet(managed, once)
