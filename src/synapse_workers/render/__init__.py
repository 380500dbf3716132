"""Renderers: Plan → file contents, one module per output. Pure; `files` writes what they return."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..homeserver import GENERATED_LOG_CONFIG, generated_homeserver
from ..plan import COTURN, MAIN, NGINX, Plan
from ..programs import Program
from .coturn import SECRET_KEY, render_coturn
from .nftables import render_nftables
from .nginx import render_nginx
from .prometheus import render_prometheus
from .redis import render_redis
from .scheduler import render_scheduler
from .supervisor import render_supervisor
from .synapse import dump, log_config, render_synapse

# The generated homeserver.yaml's (not `synapse.HEADER`: this file is the user's once written).
HOMESERVER_HEADER = (
    "# Generated once by synapse-workers from the environment; yours to edit from now on.\n"
    "# synapse-workers never modifies this file: workers and listeners are layered on top of it.\n"
)


@dataclass(frozen=True)
class PrivateFile:
    """A config that must hold a secret: rewritten on every run, 0600, owned by `owner` (uid, gid) when run as
    root, with `key=<secret>` appended for each (key, secret file) pair when written. The text never holds it."""

    text: str
    secrets: tuple[tuple[str, str], ...]
    owner: tuple[int, int] | None = None


@dataclass(frozen=True)
class FileSet:
    """managed: rewritten on every run under the runtime dir. once: created only when missing (mode).
    private: configs written with a secret for one program's user (coturn's)."""

    managed: dict[str, str]
    once: dict[str, tuple[str, int]] = field(default_factory=dict)
    private: dict[str, PrivateFile] = field(default_factory=dict)


def render_all(plan: Plan, programs: Sequence[Program] = (), as_root: bool = False) -> FileSet:
    """Every file of the plan; with `programs` (what `run` supervises) also supervisord.conf."""
    managed: dict[str, str] = {}
    # The one place a section is picked: each renderer gets the plan and the section that tunes it.
    settings = plan.settings
    managed.update(render_synapse(plan, settings.logging))
    managed.update(render_nginx(plan, settings.nginx))
    managed.update(render_redis(plan))
    if plan.local(NGINX):  # several hosts: the add-ons run beside nginx
        managed.update(render_prometheus(plan, settings.metrics))
    managed.update(render_nftables(plan))
    if plan.local(NGINX):  # several hosts: the scheduler rotates nginx's logs, beside it
        managed.update(render_scheduler(plan, settings.nginx))
    if programs:
        managed.update(render_supervisor(plan.layout, programs, as_root))
    private: dict[str, PrivateFile] = {}
    coturn_conf = render_coturn(plan, settings.turn) if plan.local(NGINX) else None
    if coturn_conf is not None:
        # Written for the user coturn runs as (its program row's, when `run` supervises it).
        owner = next((p.user for p in programs if p.name == COTURN), None) if as_root else None
        private[plan.layout.coturn_conf] = PrivateFile(coturn_conf, ((SECRET_KEY, plan.secrets.turn),), owner)
    once: dict[str, tuple[str, int]] = {}
    if not plan.homeserver.exists and plan.local(MAIN):  # several hosts: main's host creates it, the rest copy it
        once.update(render_homeserver(plan))
    return FileSet(managed, once, private)


def render_homeserver(plan: Plan) -> dict[str, tuple[str, int]]:
    """The generated homeserver.yaml and the log config it names: path → (text, mode), as `generate` creates
    them once (`render_all`'s `once`; an export's homeserver.yaml)."""
    doc = generated_homeserver(
        plan.settings, plan.secrets, plan.layout.postgres_socket_dir, plan.public.port, plan.media_store
    )
    # Marked as ours: SYNAPSE_LOG_CONFIG naming it later must not make it every process's log config.
    log_header = f"{GENERATED_LOG_CONFIG} (Synapse without synapse-workers reads it).\n"
    return {
        plan.homeserver.path: (dump(doc, header=HOMESERVER_HEADER), 0o600),
        doc["log_config"]: (dump(log_config(plan, plan.main, plan.settings.logging), header=log_header), 0o644),
    }
