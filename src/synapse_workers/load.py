"""Environment → Plan: the edge where inputs are read (homeserver.yaml, appservice dir, TLS files).

Everything after this is pure; everything here is reading only, never writing. One run reports every
problem it can find: the variables, the worker list and the files are checked independently, and the
plan's own checks (ports, socket paths) run once those inputs are sound.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from .errors import File, Problem, UserError, Variable, YamlPath
from .homeserver import HomeserverInfo, SqlitePort, describe, read_homeserver
from .layout import RUNTIME_MARKER, make_layout
from .plan import Plan, make_plan
from .secrets import copies_needed
from .settings import DEFAULT_HTTP_PORT, SYSTEM_DIRS, Settings, load_settings
from .workers import parse_workers

T = TypeVar("T")


def load_plan(env: Mapping[str, str], host: str | None = None, port_target: bool = False) -> Plan:
    """host: with SYNAPSE_HOSTS, the host whose slice is wanted (`--host NAME`). port_target: the plan as it will
    be once homeserver.yaml's SQLite database is ported into the embedded cluster (`port-sqlite`'s own plan)."""
    problems: list[str] = []

    def attempt(step: Callable[[], T]) -> T | None:
        try:
            return step()
        except UserError as exc:
            problems.extend(exc.problems)
            return None

    settings = attempt(lambda: load_settings(env))
    # The worker list is a plain string: check its grammar even when other variables are bad.
    workers = attempt(lambda: parse_workers(settings.core.worker_types if settings else _raw_workers(env)))
    if settings is None:
        raise UserError(*problems)
    attempt(lambda: _check_files(settings))
    marker = make_layout(settings.core.runtime_dir, settings.core.data_dir).sqlite_port_marker
    info = attempt(
        lambda: describe(
            settings,
            read_homeserver(settings.core.homeserver_config_path),
            has_workers=bool(workers),
            sqlite_port=SqlitePort(marker, None) if port_target else read_sqlite_port(marker),
        )
    )
    if info is not None:
        attempt(lambda: _check_listener_tls(info))
    if info is None or workers is None:
        raise UserError(*problems)
    ported = attempt(lambda: host_network_ports(settings, info.public_port, env))
    if ported is None:
        raise UserError(*problems)
    plan = attempt(lambda: make_plan(ported, info, workers, _appservices(ported), host))
    if plan is not None:
        attempt(lambda: _check_copied(plan))
    if plan is None or problems:
        raise UserError(*problems)
    return plan


def read_sqlite_port(path: str) -> SqlitePort | None:
    """`port-sqlite`'s marker (`Layout.sqlite_port_marker`), or None when there is none. A marker we cannot read is
    refused (exit 2): whether the server's history is in SQLite or in PostgreSQL is never guessed."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        data = exc
    if (
        isinstance(data, dict)
        and isinstance(data.get("sqlite_database"), str)
        and isinstance(data.get("ported_at"), str)
    ):
        return SqlitePort(path, data["sqlite_database"], data["ported_at"])
    found = str(data) if isinstance(data, Exception) else "no sqlite_database/ported_at"
    raise UserError(
        Problem(
            f"{path} cannot be read ({found}): it records that the SQLite database was ported into the embedded "
            "PostgreSQL (`synapse-workers port-sqlite`). Expected the JSON that command wrote: restore it, remove it "
            "to serve from SQLite again, or run `synapse-workers port-sqlite --force` to port again.",
            File(path),
            expected="the JSON file `synapse-workers port-sqlite` writes",
            found=found,
        )
    )


def host_network_ports(settings: Settings, homeserver_port: int | None, env: Mapping[str, str]) -> Settings:
    """Unraid on the host (or macvlan) network publishes no port: it passes the form's host port as
    TCP_PORT_<container port>=<host port> instead (`-p host:container` on a bridge). nginx then listens on that
    host port, as the bridge would have delivered it: the public port (8008, or homeserver.yaml's) and the TLS
    port. SYNAPSE_HTTP_PORT and SYNAPSE_TLS_PORT, when set, win."""
    listen = settings.listen
    update: dict[str, int] = {}
    if listen.http_port is None:
        port = _unraid_port(env, homeserver_port or DEFAULT_HTTP_PORT)
        if port is not None:
            update["http_port"] = port
    if not env.get("SYNAPSE_TLS_PORT", "").strip():
        port = _unraid_port(env, listen.tls_port)
        if port is not None:
            update["tls_port"] = port
    if not update:
        return settings
    return replace(settings, listen=listen.model_copy(update=update))


def _unraid_port(env: Mapping[str, str], container_port: int) -> int | None:
    name = f"TCP_PORT_{container_port}"
    value = env.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise UserError(
            f"{name}={value!r} is invalid: expected a port number (1-65535). Unraid passes the host port of the "
            f"container's port {container_port} here on the host network: fill in a number in that field."
        )
    return int(value)


def _check_copied(plan: Plan) -> None:
    """Several hosts: main's host creates homeserver.yaml and the secrets; every other host must have the same
    files (copied by the admin), never its own: different secrets would split the deployment."""
    placement = plan.placement
    if placement is None or placement.here is None or placement.local("main"):
        return
    needed = [plan.homeserver.path] if plan.local_processes else []
    needed += copies_needed(plan)  # the secrets table's rows main's host makes and this host uses
    missing = [path for path in needed if not os.path.isfile(path)]
    if missing:
        main_host = placement.where["main"]
        raise UserError(
            Problem(
                f"--host {placement.here}: {', '.join(missing)} missing: on several hosts ({HOSTS}) main's host "
                f"({main_host}) creates homeserver.yaml and the secrets. Expected them copied here (same paths, "
                f"0600) after `synapse-workers generate --host {main_host}` there.",
                File(missing[0]),
                expected=f"copies of main's host's ({main_host}) files, same paths, 0600",
                found=f"{', '.join(missing)} missing",
                related=(HOSTS,),
            )
        )


def _check_listener_tls(info: HomeserverInfo) -> None:
    """A `tls: true` listener of the user's file is served by nginx with the file's certificate and key: they
    must be readable now (nginx would refuse to start). Missing keys are the plan's to report."""
    if not any(lst.tls and lst.type == "http" and lst.port is not None for lst in info.listeners):
        return
    problems = []
    for key, path in (
        ("tls_certificate_path", info.tls_certificate_path),
        ("tls_private_key_path", info.tls_private_key_path),
    ):
        if path is None or not path.startswith("/"):
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            tls = next(lst.yaml_path for lst in info.listeners if lst.tls)
            expected = f"a readable PEM file, which nginx serves the TLS listener {tls} with"
            problems.append(
                Problem(
                    f"{info.path} ({CONFIG_PATH}) at {key!r}: {path!r} cannot be read ({exc.strerror}): expected "
                    f"{expected}.",
                    YamlPath(info.path, key),
                    expected=expected,
                    found=f"{path!r} ({exc.strerror})",
                    related=(CONFIG_PATH,),
                )
            )
    if problems:
        raise UserError(*problems)


def _raw_workers(env: Mapping[str, str]) -> str:
    return env.get(WORKER_TYPES.name, "")


def _appservices(settings: Settings) -> tuple[str, ...]:
    appservices = list(settings.core.appservices)
    if settings.core.as_registration_dir and os.path.isdir(settings.core.as_registration_dir):
        folder = Path(settings.core.as_registration_dir)
        appservices += sorted(str(p) for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return tuple(appservices)


# The variables the checks below name (made at import: a name not in the registry fails there).
CONFIG_PATH = Variable("SYNAPSE_CONFIG_PATH")
WORKER_TYPES = Variable("SYNAPSE_WORKER_TYPES")
RUNTIME_DIR = Variable("SYNAPSE_RUNTIME_DIR")
HOSTS = Variable("SYNAPSE_HOSTS")


def _check_files(settings: Settings) -> None:
    problems = []
    listen, core = settings.listen, settings.core
    for variable, path in (
        (Variable("SYNAPSE_TLS_CERT"), listen.tls_cert),
        (Variable("SYNAPSE_TLS_KEY"), listen.tls_key),
    ):
        if path and not os.path.isfile(path):
            problems.append(Problem.invalid(variable, repr(path), "an existing file (PEM)"))
    if core.as_registration_dir and not os.path.isdir(core.as_registration_dir):
        problems.append(
            Problem.invalid(
                Variable("SYNAPSE_AS_REGISTRATION_DIR"),
                repr(core.as_registration_dir),
                "an existing directory of application service registration files (*.yaml)",
            )
        )
    appservices = Variable("SYNAPSE_APPSERVICES")
    for path in core.appservices:
        if not os.path.isfile(path):
            problems.append(
                Problem(
                    f"{appservices} names {path!r}, which is not an existing file.",
                    appservices,
                    expected="existing files",
                    found=repr(path),
                )
            )
    problems += _check_own_dirs(settings)
    if problems:
        raise UserError(*problems)


def _check_own_dirs(settings: Settings) -> list[Problem]:
    """The runtime dir holds only what we write; no directory we write into resolves to a system one."""
    core = settings.core
    problems = []
    for variable, path in (
        (Variable("SYNAPSE_CONFIG_DIR"), core.config_dir),
        (Variable("SYNAPSE_DATA_DIR"), core.data_dir),
        (RUNTIME_DIR, core.runtime_dir),
    ):
        real = os.path.realpath(path)
        if real != os.path.normpath(path) and real in SYSTEM_DIRS:
            problems.append(
                Problem(
                    f"{variable}={path!r} is invalid: it leads to the system directory {real!r}; expected a "
                    "directory of its own.",
                    variable,
                    expected="a directory of its own",
                    found=f"{path!r}, which leads to {real!r}",
                )
            )
    runtime = core.runtime_dir
    if os.path.lexists(runtime) and not os.path.isdir(runtime):
        problems.append(
            Problem(
                f"{RUNTIME_DIR}={runtime!r} is invalid: it exists and is not a directory.",
                RUNTIME_DIR,
                expected="a directory",
                found=f"{runtime!r}, which is not one",
            )
        )
    elif os.path.isdir(runtime):
        entries = os.listdir(runtime)
        layout = make_layout(runtime, core.data_dir)
        ours = (
            RUNTIME_MARKER in entries
            or not entries
            or (not layout.foreign_entries(entries) and _generated_by_us(layout.shared_config))
        )
        if not ours:
            shown = ", ".join(layout.foreign_entries(entries)[:5] or sorted(entries)[:5])
            problems.append(
                Problem(
                    f"{RUNTIME_DIR}={runtime!r} is invalid: it holds files synapse-workers did not create "
                    f"({shown}), and everything in the runtime dir is replaced on every start. Expected an empty "
                    "or new directory (the default /run/synapse-workers is one).",
                    RUNTIME_DIR,
                    expected="an empty or new directory, or one synapse-workers made",
                    found=f"files synapse-workers did not create ({shown})",
                )
            )
    return problems


def _generated_by_us(path: str) -> bool:
    """A runtime dir from before the marker existed: its shared.yaml carries our header."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read(40).startswith("# Generated by synapse-workers")
    except OSError:
        return False
