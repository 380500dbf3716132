"""Settings that will silently do nothing, said at start (`run`, `check`): one pure function, plan → warnings.

A variable counts as set when it is non-empty and its value differs from its default (Unraid passes every
field of a template, its defaults included: those never warn). The facts only the machine knows (are we in a
container? is the file's log config one we generated?) are gathered by `facts_here`, the edge.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from .errors import Problem, Variable, YamlPath
from .homeserver import GENERATED_LOG_CONFIG
from .plan import POSTGRES_EXPORTER, REDIS_EXPORTER, Plan
from .settings import SECTIONS, VARIABLES

# Read only to generate homeserver.yaml: the key of the file that holds the same setting afterwards.
GENERATION_ONLY: dict[Variable, str] = {
    Variable("SYNAPSE_MEDIA_STORE_PATH"): "media_store_path",
    Variable("SYNAPSE_EVENT_CACHE_SIZE"): "event_cache_size",
    Variable("SYNAPSE_ENABLE_REGISTRATION"): "enable_registration",
    Variable("SYNAPSE_ALLOW_GUEST"): "allow_guest_access",
    Variable("SYNAPSE_REGISTRATION_SHARED_SECRET"): "registration_shared_secret_path",
    Variable("SYNAPSE_MACAROON_SECRET_KEY"): "macaroon_secret_key_path",
    Variable("SYNAPSE_FORM_SECRET"): "form_secret_path",
    Variable("SYNAPSE_SERVE_SERVER_WELLKNOWN"): "serve_server_wellknown",
    Variable("SYNAPSE_PUBLIC_BASEURL"): "public_baseurl",
    Variable("SYNAPSE_URL_PREVIEW_ENABLED"): "url_preview_enabled",
    Variable("SYNAPSE_DATABASE"): "database",
}
# Only with SYNAPSE_METRICS (the built-in Prometheus and the exporters it scrapes).
NEEDS_METRICS = (
    Variable("SYNAPSE_ENABLE_REDIS_METRIC_EXPORT"),
    Variable("SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT"),
    Variable("SYNAPSE_METRICS_UNIX_SOCKETS"),
    Variable("PROMETHEUS_SCRAPE_INTERVAL"),
    Variable("PROMETHEUS_STORAGE_RETENTION_TIME"),
    Variable("PROMETHEUS_BIND_ADDRESS"),
    Variable("PROMETHEUS_PORT"),
    Variable("PROMETHEUS_REMOTE_WRITE_HTTP_URL"),
)  # PROMETHEUS_STORAGE_PATH: the image sets it (ENV), so it is always there
NEEDS_COTURN = (
    Variable("COTURN_PORT"),
    Variable("COTURN_MIN_PORT"),
    Variable("COTURN_MAX_PORT"),
    Variable("COTURN_EXTERNAL_IP"),
    Variable("COTURN_INTERNAL_IP"),
    Variable("COTURN_METRICS"),
    Variable("COTURN_ALLOW_LOOPBACK_PEERS"),
)
NEEDS_EXTERNAL_POSTGRES = (
    Variable("POSTGRES_HOST"),
    Variable("POSTGRES_PORT"),
    Variable("POSTGRES_DB"),
    Variable("POSTGRES_USER"),
    Variable("POSTGRES_EXPORTER_SSLMODE"),
)


# The variables the sentences below name (made at import: a name not in the registry fails there).
METRICS = Variable("SYNAPSE_METRICS")
BUILTIN_COTURN = Variable("SYNAPSE_ENABLE_BUILTIN_COTURN")
EXTERNAL_IP = Variable("COTURN_EXTERNAL_IP")
COTURN_PORT = Variable("COTURN_PORT")
LOG_CONFIG = Variable("SYNAPSE_LOG_CONFIG")
LOGS_TO_DISK = Variable("SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK")
REDIS_EXPORT = Variable("SYNAPSE_ENABLE_REDIS_METRIC_EXPORT")
POSTGRES_EXPORT = Variable("SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT")
WORKER_TYPES = Variable("SYNAPSE_WORKER_TYPES")
POSTGRES_PASSWORD = Variable("POSTGRES_PASSWORD")
TURN_SECRET = Variable("SYNAPSE_TURN_SECRET")
TURN_URIS = Variable("SYNAPSE_TURN_URIS")
TLS_PORT, TLS_CERT, TLS_KEY = Variable("SYNAPSE_TLS_PORT"), Variable("SYNAPSE_TLS_CERT"), Variable("SYNAPSE_TLS_KEY")
REPLICATION_SOCKETS = Variable("SYNAPSE_HTTP_REPLICATION_UNIX_SOCKETS")
DISABLE_LOGROTATE = Variable("NGINX_DISABLE_LOGROTATE")
PORT_SQLITE = Variable("SYNAPSE_PORT_SQLITE")
BACKUP_KEEP, BACKUP_SCHEDULE = Variable("SYNAPSE_BACKUP_KEEP"), Variable("SYNAPSE_BACKUP_SCHEDULE")


def _unused(names: list[str], message: str, *needs: Variable, expected: str) -> Problem:
    """Variables that do nothing here: the first is the subject, the others and what they need are related."""
    first, *rest = (Variable(name) for name in names)
    return Problem(message, first, expected=expected, found="set", related=(*rest, *needs))


@dataclass(frozen=True)
class Facts:
    """What only the machine knows, gathered by facts_here()."""

    in_container: bool = False
    file_log_config_is_ours: bool = False  # the existing file's log_config carries our generated header
    env_log_config_exists: bool = False  # SYNAPSE_LOG_CONFIG names an existing file (ours or the user's)


@cache
def _defaults() -> dict[str, Any]:
    sections = {name: model.model_validate({}) for name, model in SECTIONS.items()}
    return {name: getattr(sections[v.section], v.field) for name, v in VARIABLES.items()}


def _set(plan: Plan, env: Mapping[str, str], name: str) -> bool:
    """Given (non-empty) and not its default."""
    return bool(env.get(name, "").strip()) and plan.settings.value(name) != _defaults()[name]


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _do(names: list[str]) -> str:
    return "does" if len(names) == 1 else "do"


def start_warnings(plan: Plan, env: Mapping[str, str], facts: Facts) -> list[Problem]:
    """Every setting that will do nothing in this combination, with what would make it count."""
    s, hs = plan.settings, plan.homeserver
    warnings: list[Problem] = []

    def given(variables: Iterable[Variable]) -> list[str]:
        return [v.name for v in variables if _set(plan, env, v.name)]

    if hs.exists:
        unused = given(GENERATION_ONLY)
        if unused:
            keys = ", ".join(GENERATION_ONLY[Variable(name)] for name in unused)
            warnings.append(
                _unused(
                    unused,
                    f"{_names(unused)} {_do(unused)} nothing: {hs.path} exists, and these are read only to generate "
                    f"it. Change the same settings in {hs.path} instead ({keys}).",
                    expected=f"unset: {hs.path} holds these settings ({keys})",
                )
            )
        log_config = s.homeserver.log_config
        if log_config and not facts.env_log_config_exists:
            warnings.append(
                Problem(
                    f"{LOG_CONFIG}={log_config} does nothing: it is not an existing file, so every process "
                    "keeps its own generated log config.",
                    LOG_CONFIG,
                    expected="an existing file",
                    found=log_config,
                )
            )
        elif hs.log_config and hs.user_log_config is None and not facts.file_log_config_is_ours:
            warnings.append(
                Problem(
                    f"log_config {hs.log_config} in {hs.path} is not used: every process gets its own generated log "
                    f"config (its output goes to the container's log; {LOGS_TO_DISK} adds files). "
                    f"To apply that file to every process instead, set {LOG_CONFIG}={hs.log_config} (its file "
                    "handlers are then shared by every process).",
                    YamlPath(hs.path, "log_config"),
                    expected=f"{LOG_CONFIG}={hs.log_config} to apply it",
                    found=hs.log_config,
                    related=(LOG_CONFIG, LOGS_TO_DISK),
                )
            )
    if not s.metrics.enabled:
        unused = given(NEEDS_METRICS)
        if unused:
            warnings.append(
                _unused(
                    unused,
                    f"{_names(unused)} {_do(unused)} nothing without {METRICS}=on (the built-in Prometheus, "
                    "the metrics listeners and the exporters all come with it).",
                    METRICS,
                    expected=f"{METRICS}=on",
                )
            )
    else:
        if s.metrics.redis_export and plan.service(REDIS_EXPORTER) is None:
            why = (
                f"Redis is external ({hs.path} sets redis)"
                if plan.redis is not None
                else f"the stack runs Redis only with workers ({WORKER_TYPES})"
            )
            needs = () if plan.redis is not None else (WORKER_TYPES,)
            warnings.append(
                _unused([REDIS_EXPORT.name], f"{REDIS_EXPORT} does nothing: {why}.", *needs, expected="Redis we run")
            )
        if s.metrics.postgres_export and plan.service(POSTGRES_EXPORTER) is None:
            warnings.append(
                _unused(
                    [POSTGRES_EXPORT.name],
                    f"{POSTGRES_EXPORT} does nothing: there is no embedded PostgreSQL and no "
                    f"{POSTGRES_PASSWORD} for the exporter to reach an external one"
                    + (f" ({hs.path} uses SQLite)." if hs.database == "sqlite" else "."),
                    POSTGRES_PASSWORD,
                    expected=f"an embedded PostgreSQL, or {POSTGRES_PASSWORD}",
                )
            )
    if not s.turn.builtin_coturn:
        unused = given(NEEDS_COTURN)
        if unused:
            warnings.append(
                _unused(
                    unused,
                    f"{_names(unused)} {_do(unused)} nothing without {BUILTIN_COTURN}=on.",
                    BUILTIN_COTURN,
                    expected=f"{BUILTIN_COTURN}=on",
                )
            )
    elif facts.in_container and s.turn.external_ip is None:
        warnings.append(
            Problem(
                f"{BUILTIN_COTURN} is on in a container without {EXTERNAL_IP}: coturn then announces "
                "the container's own address, which callers outside cannot reach (the original image looked the "
                f"public address up on the internet at every start; this one never does). Set {EXTERNAL_IP} to "
                f"the public IPv4 address your router forwards {COTURN_PORT} and the relay ports from.",
                EXTERNAL_IP,
                expected="the public IPv4 address",
                found="nothing",
                related=(BUILTIN_COTURN,),
            )
        )
    if _set(plan, env, TURN_SECRET.name) and not plan.turn_uris:
        warnings.append(
            _unused(
                [TURN_SECRET.name],
                f"{TURN_SECRET} does nothing without {TURN_URIS} or {BUILTIN_COTURN}=on "
                "(a turn_shared_secret in homeserver.yaml is Synapse's own and stays as it is).",
                TURN_URIS,
                BUILTIN_COTURN,
                expected=f"{TURN_URIS} or {BUILTIN_COTURN}=on",
            )
        )
    if s.database.kind != "postgres":
        unused = given(NEEDS_EXTERNAL_POSTGRES)
        if unused:
            warnings.append(
                _unused(
                    unused,
                    f"{_names(unused)} {_do(unused)} nothing without {POSTGRES_PASSWORD} (which selects an external "
                    "PostgreSQL for a generated homeserver.yaml and lets the exporter reach it).",
                    POSTGRES_PASSWORD,
                    expected=f"{POSTGRES_PASSWORD}",
                )
            )
    if _set(plan, env, TLS_PORT.name) and plan.public.tls_port is None:
        warnings.append(
            _unused(
                [TLS_PORT.name],
                f"{TLS_PORT} does nothing without {TLS_CERT} and {TLS_KEY}.",
                TLS_CERT,
                TLS_KEY,
                expected=f"{TLS_CERT} and {TLS_KEY}",
            )
        )
    if _set(plan, env, REPLICATION_SOCKETS.name) and not plan.workers:
        warnings.append(
            _unused(
                [REPLICATION_SOCKETS.name],
                f"{REPLICATION_SOCKETS} does nothing without workers (a monolith has no replication).",
                WORKER_TYPES,
                expected=f"workers ({WORKER_TYPES})",
            )
        )
    if _set(plan, env, DISABLE_LOGROTATE.name) and not s.logging.to_disk:
        warnings.append(
            _unused(
                [DISABLE_LOGROTATE.name],
                f"{DISABLE_LOGROTATE} does nothing without {LOGS_TO_DISK} (no log files to rotate).",
                LOGS_TO_DISK,
                expected=f"{LOGS_TO_DISK}=on",
            )
        )
    if _set(plan, env, BACKUP_KEEP.name) and s.backup.schedule is None:
        warnings.append(
            _unused(
                [BACKUP_KEEP.name],
                f"{BACKUP_KEEP} does nothing without {BACKUP_SCHEDULE} (it is the scheduled backups' --keep; "
                "`synapse-workers backup` removes old backups only with --keep N).",
                BACKUP_SCHEDULE,
                expected=f"{BACKUP_SCHEDULE} set",
            )
        )
    if _set(plan, env, PORT_SQLITE.name) and hs.database != "sqlite" and hs.sqlite_port is None:
        why = f"{hs.path} uses PostgreSQL" if hs.exists else f"there is no {hs.path} yet (it is generated)"
        warnings.append(
            _unused(
                [PORT_SQLITE.name],
                f"{PORT_SQLITE} does nothing: {why}, so there is no SQLite database to port.",
                expected="a homeserver.yaml on SQLite",
            )
        )
    return warnings


def facts_here(plan: Plan, env: Mapping[str, str]) -> Facts:
    """The edge: container markers (Docker's /.dockerenv, podman's /run/.containerenv, the `container`
    variable systemd and podman set) and the header of the file's log config."""
    in_container = os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv") or bool(env.get("container"))
    ours = False
    if plan.homeserver.log_config:
        try:
            with open(plan.homeserver.log_config, encoding="utf-8", errors="replace") as handle:
                ours = handle.read(len(GENERATED_LOG_CONFIG)) == GENERATED_LOG_CONFIG
        except OSError:
            ours = False
    env_log_config = plan.settings.homeserver.log_config
    return Facts(in_container, ours, bool(env_log_config and os.path.isfile(env_log_config)))
