"""The plan as it runs with one Synapse process per pod (Kubernetes) or container (Compose). Pure.

What changes against the single-host stack, and nothing else:
- every process has a network namespace of its own, so its listeners bind 0.0.0.0 on fixed ports
  (`PORTS`), never unix sockets; Kubernetes NetworkPolicies (Compose: the project network) keep them internal;
- peers are reached by DNS names: instance_map, nginx's upstreams, Redis;
- a worker is named after its pod (`synapse-<type>-<ordinal>`) or Compose service; main stays `main`.

Synapse's files are then rendered by `render/synapse.py` from that plan (`Export.synapse_files`), so each
process reads what `generate` would write for it apart from those names and addresses. What differs is a
parameter of the render (Redis without a password, nginx's /health upstream, the database settings), never an
edit of its output.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, replace
from typing import Any

import yaml

from ..errors import UserError
from ..layout import Layout
from ..plan import (
    HEALTH,
    MAIN,
    METRICS,
    NGINX,
    POSTGRES,
    PUBLIC,
    REDIS,
    REDIS_PORT,
    REPLICATION,
    Listener,
    Plan,
    Process,
    Redis,
)
from ..secrets import exported as exported_secrets
from ..settings import DEFAULT_HTTP_PORT, NginxSettings
from ..workers import VAR as WORKERS_VAR
from . import render_homeserver
from .nginx import render_nginx
from .synapse import render_synapse

KUBERNETES, COMPOSE = "kubernetes", "compose"
# Inside a pod or container every process has these ports (each has an address of its own).
PORTS = {PUBLIC: DEFAULT_HTTP_PORT, REPLICATION: 9093, HEALTH: 8080, METRICS: 9000}
ANY = "0.0.0.0"  # internal listeners: reachable inside the pod network only (NetworkPolicy / project network)
PREFIX = "synapse-"
REDIS_HOST = f"{PREFIX}{REDIS}"  # at plan.REDIS_PORT
POSTGRES_HOST = f"{PREFIX}{POSTGRES}"  # Compose's PostgreSQL service
NGINX_WORKLOAD = f"{PREFIX}{NGINX}"  # our nginx's Deployment and Service (Kubernetes) or service (Compose)
MAIN_WORKLOAD = f"{PREFIX}{MAIN}"
# What a Synapse container runs (the image's venv; README "Container").
PYTHON = "/opt/synapse-workers/venv/bin/python"
# nginx's error log quotes request lines, access tokens included: its output reaches the container's log masked.
MASKED = (posixpath.join(posixpath.dirname(PYTHON), "synapse-workers"), "mask-output", "--")
DEFAULT_IMAGE = "synapse-workers:latest"
# Official images for Compose's PostgreSQL and both targets' Redis, pinned by tag.
POSTGRES_IMAGE = "docker.io/library/postgres:15.8"
REDIS_IMAGE = "docker.io/library/redis:7.2.4"
STATEFULSET_NAME_MAX = 52  # 63 minus "-" and the 10-character controller-revision-hash suffix
RESERVED = (MAIN, NGINX, REDIS, POSTGRES, "init")  # names of our own workloads


@dataclass(frozen=True)
class Member:
    """One Synapse process of the export."""

    plan_name: str  # its name in the single-host plan (event_persister1)
    name: str  # its worker_name here (the pod or service name; main: "main")
    unit: str  # the pod (Kubernetes) or service (Compose) it runs in
    host: str  # the DNS name its peers reach it by
    process: Process  # as rendered here (listeners on PORTS, renamed)


@dataclass(frozen=True)
class Group:
    """Processes of one worker type (one declared base name): a StatefulSet, or Compose services."""

    workload: str  # synapse-main, synapse-event-persister
    app: str
    members: tuple[Member, ...]

    @property
    def kinds(self) -> tuple[str, ...]:
        """Listener kinds its processes have (the same for every member)."""
        return tuple(lst.kind for lst in self.members[0].process.listeners)


@dataclass(frozen=True)
class Export:
    source: Plan  # the single-host plan
    plan: Plan  # renamed, listeners on PORTS, peers by DNS name
    groups: tuple[Group, ...]
    target: str

    @property
    def members(self) -> tuple[Member, ...]:
        return tuple(m for g in self.groups for m in g.members)

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    def synapse_files(self, database: dict[str, object] | None = None) -> dict[str, str]:
        """Path → text of every Synapse file a process reads: homeserver.yaml (generated, as `generate`
        writes it, from the database settings updated with `database` if given), shared.yaml (Redis at
        REDIS_HOST without a password), main.yaml, the workers' and log configs."""
        files = render_synapse(self.plan, self.plan.settings.logging, redis_password=False)
        source = self.source
        if database is not None:
            database_settings = source.settings.database.model_copy(update=database)
            source = replace(source, settings=replace(source.settings, database=database_settings))
        text, _mode = render_homeserver(source)[source.homeserver.path]
        return {source.homeserver.path: text, **files}

    def secret_files(self) -> tuple[str, ...]:
        """Paths (in the data dir) of the secret files the Synapse processes read (`secrets.exported`)."""
        return tuple(row.path(self.source) for row in exported_secrets(self.source))

    @property
    def media_store(self) -> str:
        return self.source.media_store


def secret_key(path: str) -> str:
    """A data-dir secret file's name in a Secret or Compose secret (only [-._a-zA-Z0-9])."""
    return re.sub(r"[^-._a-zA-Z0-9]", "-", posixpath.basename(path))


class Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # every object spelled out, no &id001 anchors
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


Dumper.add_representer(str, _str)


def dump_all(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=Dumper, sort_keys=False, width=120, allow_unicode=True, explicit_start=True)


def dump_yaml(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=120, allow_unicode=True)


def dns_label(text: str) -> str:
    """A worker base name as a DNS-1123 label part: lower case, `_` and `+` as `-`."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def make_export(plan: Plan, target: str) -> Export:
    """The export's plan; UserError (exit 2) for what the export cannot carry."""
    _refuse_unsupported(plan, target)
    groups = _groups(plan, target)
    members = {m.plan_name: m for g in groups for m in g.members}

    def rename(name: str) -> str:
        return "master" if name == "master" else members[name].name

    instance_map = {
        rename(name): Listener(REPLICATION, lst.resources, host=members[name].host, port=PORTS[REPLICATION])
        for name, lst in plan.instance_map.items()
    }
    duties = {
        key: [rename(n) for n in value] if isinstance(value, list) else rename(value)
        for key, value in plan.duties.items()
    }
    exported = replace(
        plan,
        main=members[MAIN].process,
        workers=tuple(members[w.name].process for w in plan.workers),
        instance_map=instance_map,
        stream_writers={k: tuple(rename(n) for n in v) for k, v in plan.stream_writers.items()},
        duties=duties,
        upstreams=tuple(replace(u, servers=tuple(rename(s) for s in u.servers)) for u in plan.upstreams),
        redis=Redis(external=False, path=None, host=REDIS_HOST, port=REDIS_PORT) if plan.redis else None,
        postgres=None,
        public=replace(plan.public, bind_address=ANY, unix_socket=None),
    )
    return Export(plan, exported, groups, target)


def nginx_plan(export: Export, upstream_host: dict[str, str]) -> Plan:
    """The export's plan with each process's public listener at `upstream_host[name]`:PORTS (what nginx
    connects to; Synapse itself binds ANY)."""
    procs = []
    for proc in export.plan.processes:
        listeners = tuple(
            replace(lst, host=upstream_host[proc.name]) if lst.kind == PUBLIC else lst for lst in proc.listeners
        )
        procs.append(replace(proc, listeners=listeners))
    return replace(export.plan, main=procs[0], workers=tuple(procs[1:]))


def nginx_conf(export: Export, upstream_host: dict[str, str], health: str) -> str:
    """Our nginx.conf (render/nginx.py) for this export; its /health asks `health` (host:port), main's
    health listener, instead of the launcher's aggregator (there is no launcher here)."""
    plan = nginx_plan(export, upstream_host)
    return render_nginx(plan, plan.settings.nginx, health_upstream=health)[plan.layout.nginx_conf]


def nginx_flags(nginx: NginxSettings) -> str:
    """nginx's `-g` in an export's container: in the foreground and, with NGINX_WORKER_PROCESSES=auto (which
    nginx.conf leaves to `-g`; no run/nginx_start.py here to count the CPUs a quota allows), nginx's own `auto`."""
    return "daemon off;" + (" worker_processes auto;" if nginx.worker_processes == "auto" else "")


# ------------------------------------------------------------------------------------------------------


def _refuse_unsupported(plan: Plan, target: str) -> None:
    problems = []
    settings = plan.settings
    if plan.homeserver.exists:
        problems.append(
            f"export {target}: {plan.homeserver.path} (SYNAPSE_CONFIG_PATH) exists; the export renders a new "
            "deployment from the environment and cannot carry an existing homeserver.yaml (its database, secrets "
            "and paths). Expected SYNAPSE_CONFIG_PATH naming a file that does not exist."
        )
    if target == KUBERNETES and settings.database.kind != "postgres":
        problems.append(
            f"export kubernetes: SYNAPSE_DATABASE={settings.database.kind} is not exported (the embedded PostgreSQL "
            "runs only inside the single container): expected an external PostgreSQL, POSTGRES_PASSWORD with "
            "POSTGRES_HOST, POSTGRES_PORT, POSTGRES_DB and POSTGRES_USER."
        )
    if target == COMPOSE and settings.database.kind == "sqlite":
        problems.append("export compose: SYNAPSE_DATABASE=sqlite is not exported: expected embedded or postgres.")
    if settings.placement.hosts:
        problems.append(
            f"export {target}: SYNAPSE_HOSTS is set, but an export places every process itself (one per "
            "pod/container): expected SYNAPSE_HOSTS and SYNAPSE_PLACEMENT unset."
        )
    if settings.listen.tls_cert is not None:
        problems.append(
            f"export {target}: SYNAPSE_TLS_CERT is set, but the export carries no TLS files: expected it unset "
            "(terminate TLS in front of nginx: an Ingress or a load balancer)."
        )
    if settings.turn.builtin_coturn:
        problems.append(
            f"export {target}: SYNAPSE_ENABLE_BUILTIN_COTURN is on, but coturn is not exported: expected it off "
            "(run a TURN server of your own and set SYNAPSE_TURN_URIS and SYNAPSE_TURN_SECRET)."
        )
    if settings.compressor.enabled:
        problems.append(
            f"export {target}: SYNAPSE_ENABLE_COMPRESSOR is on, but the scheduled state compressor is not exported: "
            "expected it off (schedule synapse_auto_compressor against your database yourself, e.g. a CronJob)."
        )
    if settings.backup.schedule is not None:
        problems.append(
            f"export {target}: SYNAPSE_BACKUP_SCHEDULE is set, but scheduled backups are not exported: expected it "
            "unset (back up the deployment's database and volumes yourself)."
        )
    if plan.homeserver.user_log_config:
        problems.append(
            f"export {target}: SYNAPSE_LOG_CONFIG names your own file {plan.homeserver.user_log_config!r}, which the "
            "export does not carry: expected it unset (each process gets its generated log config)."
        )
    if plan.app_service_config_files:
        problems.append(
            f"export {target}: application services ({', '.join(plan.app_service_config_files)}) are not exported "
            "(their registration files hold tokens): expected SYNAPSE_APPSERVICES and SYNAPSE_AS_REGISTRATION_DIR "
            "unset."
        )
    if problems:
        raise UserError(*problems)


def _base(name: str) -> str:
    return name.rstrip("0123456789")


def _groups(plan: Plan, target: str) -> tuple[Group, ...]:
    bases: dict[str, list[Process]] = {}
    for proc in plan.workers:
        bases.setdefault(_base(proc.name), []).append(proc)
    groups = [_group(MAIN_WORKLOAD, [plan.main], target, plan.layout)]
    seen: dict[str, str] = {}
    problems = []
    for base, procs in bases.items():
        label = dns_label(base)
        workload = f"{PREFIX}{label}"
        if label in RESERVED or label in seen:
            other = f"the worker name {seen[label]!r}" if label in seen else "one of the export's own workloads"
            problems.append(
                f"{WORKERS_VAR}: the worker name {base!r} becomes {workload!r} in the export, like {other}: expected "
                "names that differ in more than case, '_', '+' and '-', and none of " + ", ".join(RESERVED) + "."
            )
        elif len(workload) > STATEFULSET_NAME_MAX:
            problems.append(
                f"{WORKERS_VAR}: the worker name {base!r} becomes {workload!r} ({len(workload)} characters): "
                f"expected at most {STATEFULSET_NAME_MAX} (a Kubernetes StatefulSet name); give it a shorter name."
            )
        seen.setdefault(label, base)
        groups.append(_group(workload, procs, target, plan.layout))
    if problems:
        raise UserError(*problems)
    return tuple(groups)


def _group(workload: str, procs: list[Process], target: str, layout: Layout) -> Group:
    members = []
    for ordinal, proc in enumerate(procs):
        unit = f"{workload}-{ordinal}" if target == KUBERNETES or not proc.is_main else workload
        # Kubernetes: the pod's name under its StatefulSet's headless Service; Compose: the service.
        host = f"{unit}.{workload}" if target == KUBERNETES else unit
        name = MAIN if proc.is_main else unit
        members.append(Member(proc.name, name, unit, host, _process(proc, name, layout)))
    return Group(workload, procs[0].app, tuple(members))


def _process(proc: Process, name: str, layout: Layout) -> Process:
    listeners = tuple(Listener(lst.kind, lst.resources, host=ANY, port=PORTS[lst.kind]) for lst in proc.listeners)
    if proc.is_main:
        return replace(proc, listeners=listeners)
    return replace(
        proc,
        name=name,
        listeners=listeners,
        config_files=(*proc.config_files[:-1], layout.worker_config(name)),
        log_config=layout.log_config(name),
    )
