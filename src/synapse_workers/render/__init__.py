"""Renderers: Plan → file contents. Pure; `files` writes what they return."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..homeserver import generated_homeserver
from ..plan import Plan
from .nginx import render_nginx
from .supervisor import render_redis
from .synapse import dump, log_config, render_synapse


@dataclass(frozen=True)
class FileSet:
    """managed: rewritten on every run under the runtime dir. once: created only when missing (mode)."""

    managed: dict[str, str]
    once: dict[str, tuple[str, int]] = field(default_factory=dict)


def render_all(plan: Plan) -> FileSet:
    managed: dict[str, str] = {}
    managed.update(render_synapse(plan))
    managed.update(render_nginx(plan))
    if plan.redis and not plan.redis.external:
        managed[plan.files["redis_conf"]] = render_redis(plan)
    once: dict[str, tuple[str, int]] = {}
    if not plan.homeserver.exists:
        doc = generated_homeserver(plan.settings, plan.secrets, plan.files["postgres_socket_dir"])
        text = (
            "# Generated once by synapse-workers from the environment; yours to edit from now on.\n"
            "# synapse-workers never modifies this file: workers and listeners are layered on top of it.\n"
        ) + dump(doc).split("\n", 2)[2]
        once[plan.homeserver.path] = (text, 0o600)
        once[doc["log_config"]] = (dump(log_config(plan, plan.main)).split("\n", 2)[2], 0o644)
    return FileSet(managed, once)
