"""The user's homeserver.yaml: what we learn from an existing one, and what we generate when there is none.

Reading the file is the only I/O here (`read_homeserver`, and `describe` asking whether SYNAPSE_LOG_CONFIG
names an existing file); `generated_homeserver` is pure. An existing file is never written to: everything we
need is layered on with extra --config-path files.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, replace
from typing import Any

import yaml

from .errors import File, Problem, UserError, Variable
from .homeserver_keys import check_shape
from .layout import SecretPaths, make_layout
from .settings import Settings

SYNAPSE_DEFAULT_MAX_UPLOAD_SIZE = 50 * 1024**2  # Synapse's max_upload_size when no config file sets one


@dataclass(frozen=True)
class UserListener:
    """One entry of the user's `listeners`, with Synapse's defaults applied (synapse/config/server.py
    parse_listener_def): `bind_addresses` plus the legacy `bind_address`, else ['::', '0.0.0.0']
    (['0.0.0.0'] for `type: metrics`); `resources` every name of every resource block, in order, once."""

    index: int  # listeners[index]
    type: str  # http | metrics | manhole
    port: int | None
    path: str | None  # a unix socket instead of a port
    bind_addresses: tuple[str, ...]
    tls: bool
    resources: tuple[str, ...]

    @property
    def yaml_path(self) -> str:
        return f"listeners[{self.index}]"


SYNAPSE_DEFAULT_BIND_ADDRESSES = ("::", "0.0.0.0")  # synapse/config/server.py DEFAULT_BIND_ADDRESSES


@dataclass(frozen=True)
class SqlitePort:
    """The user's SQLite database ported into the embedded cluster (`port-sqlite`), as its marker file
    (`Layout.sqlite_port_marker`) records it; the user's homeserver.yaml still says sqlite3 and is never edited.
    `ported_at` None: the port about to be made (`port-sqlite`'s own plan), not one that happened."""

    marker: str  # the marker file
    sqlite_database: str | None  # the SQLite file ported (absolute); None in a marker: the one homeserver.yaml names
    ported_at: str | None = None  # ISO 8601 UTC; None: not ported yet

    def as_json(self) -> dict[str, Any]:
        return {"marker": self.marker, "sqlite_database": self.sqlite_database, "ported_at": self.ported_at}


@dataclass(frozen=True)
class HomeserverInfo:
    """What the rest of the plan needs to know about homeserver.yaml (existing or about to be generated)."""

    path: str
    exists: bool
    server_name: str
    public_port: int | None  # the port the user's own client listener had (becomes nginx's)
    database: str  # "postgres" or "sqlite"
    has_redis: bool
    enable_metrics: bool
    app_service_config_files: tuple[str, ...] = ()
    signing_key_path: str | None = None
    database_host: str | None = None  # PostgreSQL host or socket dir (tells an embedded cluster apart)
    # The upload limit every Synapse process enforces (nginx's client_max_body_size follows it): the
    # variable when it is set (then shared.yaml sets it over the file's) or the file is generated now (it
    # carries it), else the file's own max_upload_size, else Synapse's default.
    max_upload_size: int = SYNAPSE_DEFAULT_MAX_UPLOAD_SIZE
    max_upload_size_from_env: bool = False  # SYNAPSE_MAX_UPLOAD_SIZE is set: shared.yaml sets max_upload_size
    # SYNAPSE_LOG_CONFIG when it names an existing file: the log config of every process instead of ours.
    user_log_config: str | None = None
    # Every listener of an existing file, in file order (`listeners[i]`), as Synapse reads it; the one whose
    # port became `public_port` is `primary_listener` (its index). TLS files: for `tls: true` listeners.
    listeners: tuple[UserListener, ...] = ()
    primary_listener: int | None = None
    tls_certificate_path: str | None = None
    tls_private_key_path: str | None = None
    # Files and dirs an existing file names that Synapse uses (run/access.py checks them as Synapse's user), as
    # written there (a relative path is relative to Synapse's working directory): its own log_config (not used:
    # every process gets its own), media_store_path (None: Synapse's default `media_store`), the SQLite database
    # (None: not SQLite), and the secret files (`*_path` keys) Synapse reads, as (key, path).
    log_config: str | None = None
    media_store_path: str | None = None
    sqlite_database: str | None = None
    key_files: tuple[tuple[str, str], ...] = ()
    # The file says sqlite3 and its database was ported into the embedded cluster (`port-sqlite`'s marker): then
    # `database` is "postgres", `database_host` the embedded cluster's socket dir, `sqlite_database` None, and
    # shared.yaml sets the embedded cluster's `database` section over the file's.
    sqlite_port: SqlitePort | None = None


# The variables the sentences below name (made at import: a name not in the registry fails there).
CONFIG_PATH = Variable("SYNAPSE_CONFIG_PATH")
SERVER_NAME = Variable("SYNAPSE_SERVER_NAME")
REPORT_STATS = Variable("SYNAPSE_REPORT_STATS")
WORKER_TYPES = Variable("SYNAPSE_WORKER_TYPES")
DATABASE = Variable("SYNAPSE_DATABASE")
PORT_SQLITE = Variable("SYNAPSE_PORT_SQLITE")


def _unreadable(path: str, message: str, expected: str, found: str) -> UserError:
    return UserError(Problem(message, File(path), expected=expected, found=found, related=(CONFIG_PATH,)))


def read_homeserver(path: str) -> dict[str, Any] | None:
    """The parsed file, or None when it does not exist (`describe` checks the shape of what it holds)."""
    if not os.path.exists(path):
        return None
    where = f"{path} ({CONFIG_PATH})"
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise _unreadable(
            path, f"{where} cannot be read: {exc.strerror}.", "a readable file", str(exc.strerror)
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        found = f"the byte 0x{data[exc.start]:02x} on line {line}"
        raise _unreadable(
            path,
            f"{where} is not UTF-8 text: {found} is not UTF-8; expected a UTF-8 YAML file (save it as UTF-8).",
            "a UTF-8 YAML file",
            found,
        ) from None
    stream = io.StringIO(text)
    stream.name = path  # a stream, not the text: PyYAML's messages then quote no line (it may hold a password)
    try:
        doc = yaml.safe_load(stream)
    except yaml.YAMLError as exc:
        raise _unreadable(path, f"{where} cannot be read as YAML: {exc}", "YAML", str(exc)) from None
    if not isinstance(doc, dict):
        raise _unreadable(
            path, f"{where} is not a YAML mapping of Synapse settings.", "a YAML mapping", type(doc).__name__
        )
    return doc


def check_homeserver(settings: Settings, path: str, doc: dict[str, Any]) -> None:
    """Every value of the file we (or Synapse, under our files) read has its shape (`homeserver_keys.KEYS`):
    exit 2 naming the YAML path, never a traceback further on. A key that shared.yaml sets over the file's
    (max_upload_size with SYNAPSE_MAX_UPLOAD_SIZE) is never read from the file, by us or by Synapse."""
    skip = ("max_upload_size",) if "max_upload_size" in settings.core.model_fields_set else ()
    problems = check_shape(doc, f"{path} ({CONFIG_PATH})", skip, file=path)
    if problems:
        raise UserError(*problems)


def describe(
    settings: Settings, doc: dict[str, Any] | None, has_workers: bool, sqlite_port: SqlitePort | None = None
) -> HomeserverInfo:
    """sqlite_port: the marker of a completed `port-sqlite` (read by load.py), or the port about to be made."""
    core = settings.core
    path = core.homeserver_config_path
    if doc is None:
        if not core.server_name:
            raise UserError(
                Problem(
                    f"{SERVER_NAME} is required: there is no {path} yet, and one is generated from the environment.",
                    SERVER_NAME,
                    expected="the server name (there is no homeserver.yaml yet)",
                    found="nothing",
                )
            )
        if core.report_stats is None:
            raise UserError(
                Problem(
                    f"{REPORT_STATS} is required (yes or no): there is no {path} yet, and one is generated.",
                    REPORT_STATS,
                    expected="yes or no (there is no homeserver.yaml yet)",
                    found="nothing",
                )
            )
        database = "sqlite" if settings.database.kind == "sqlite" else "postgres"
        info = HomeserverInfo(
            path,
            False,
            core.server_name,
            None,
            database,
            False,
            settings.metrics.enabled,
            max_upload_size=core.max_upload_size,  # written into the generated file
        )
    else:
        check_homeserver(settings, path, doc)
        info = _describe_existing(settings, path, doc)
        if info.database == "sqlite" and sqlite_port is not None:
            info = _ported(settings, info, sqlite_port)
    info = replace(
        info,
        max_upload_size_from_env="max_upload_size" in core.model_fields_set,
        user_log_config=_user_log_config(settings),
    )
    if has_workers and info.database == "sqlite":
        where = f"{path} uses SQLite" if info.exists else f"{DATABASE}=sqlite"
        if info.exists and settings.database.port_sqlite:
            how = f"{PORT_SQLITE} is on: `synapse-workers run` ports it before anything starts (this command does not)."
        elif info.exists:
            how = (
                f"Port it into the embedded PostgreSQL once: `synapse-workers port-sqlite` (the file is not edited), "
                f"or set {PORT_SQLITE}=on to do it at this start; or leave {WORKER_TYPES} empty."
            )
        else:
            how = f"Use {DATABASE}=embedded (the default) or leave {WORKER_TYPES} empty."
        raise UserError(
            Problem(
                f"{WORKER_TYPES} needs PostgreSQL, but {where}: Synapse workers share one PostgreSQL database. {how}",
                WORKER_TYPES,
                expected="PostgreSQL, or no workers",
                found=where,
                related=(PORT_SQLITE,) if info.exists else (DATABASE,),
            )
        )
    return info


def _ported(settings: Settings, info: HomeserverInfo, port: SqlitePort) -> HomeserverInfo:
    """The file says sqlite3, and its database is (or is about to be) in the embedded cluster: that cluster is the
    database from now on. A marker that names another SQLite file than the file does is refused (which one
    holds the server's history is the admin's call, never a guess)."""
    assert info.sqlite_database is not None
    sqlite = os.path.normpath(os.path.join(os.getcwd(), info.sqlite_database))
    if port.sqlite_database is not None and port.sqlite_database != sqlite:
        found = f"{port.marker} records a port of {port.sqlite_database!r}"
        raise UserError(
            Problem(
                f"{found}, but {info.path} ({CONFIG_PATH}) names the SQLite database {sqlite!r}: which one holds "
                f"this server's history is unclear. Expected the file the port was made from; to port {sqlite!r} "
                "instead, run `synapse-workers port-sqlite --force` (the embedded database is replaced), or remove "
                "the marker to serve from SQLite again.",
                File(port.marker),
                expected=f"a port of {sqlite!r}",
                found=found,
                related=(CONFIG_PATH,),
            )
        )
    socket_dir = make_layout(settings.core.runtime_dir, settings.core.data_dir).postgres_socket_dir
    return replace(
        info,
        database="postgres",
        database_host=socket_dir,
        sqlite_database=None,
        sqlite_port=replace(port, sqlite_database=sqlite),
    )


def _describe_existing(settings: Settings, path: str, doc: dict[str, Any]) -> HomeserverInfo:
    server_name = doc["server_name"]  # homeserver_keys.check_shape refused a missing or malformed one
    assert isinstance(server_name, str)
    if settings.core.server_name and settings.core.server_name != server_name:
        raise UserError(
            Problem(
                f"{SERVER_NAME}={settings.core.server_name!r} differs from server_name {server_name!r} in {path}: "
                f"changing the server name breaks an existing homeserver. Unset {SERVER_NAME} or make them equal.",
                SERVER_NAME,
                expected=f"unset, or {server_name!r} (server_name in {path})",
                found=repr(settings.core.server_name),
            )
        )
    db = doc.get("database") or {}
    engine = db.get("name", "sqlite3") if isinstance(db, dict) else "sqlite3"
    database = "sqlite" if engine == "sqlite3" else "postgres"
    redis = doc.get("redis")
    has_redis = isinstance(redis, dict) and bool(redis.get("enabled", False))
    appservices = doc.get("app_service_config_files") or []
    listeners = user_listeners(doc.get("listeners"))
    primary = _primary_listener(listeners)
    return HomeserverInfo(
        path=path,
        exists=True,
        server_name=server_name,
        public_port=None if primary is None else listeners[primary].port,
        database=database,
        has_redis=has_redis,
        enable_metrics=bool(doc.get("enable_metrics", False)),
        app_service_config_files=tuple(str(a) for a in appservices if isinstance(a, str)),
        signing_key_path=doc.get("signing_key_path"),
        database_host=_database_host(db),
        max_upload_size=_max_upload_size(settings, path, doc),
        listeners=listeners,
        primary_listener=None if primary is None else listeners[primary].index,
        tls_certificate_path=_optional_string(doc.get("tls_certificate_path")),
        tls_private_key_path=_optional_string(doc.get("tls_private_key_path")),
        log_config=_optional_string(doc.get("log_config")),
        media_store_path=_optional_string(doc.get("media_store_path")),
        sqlite_database=_sqlite_database(db) if database == "sqlite" else None,
        key_files=tuple((key, doc[key]) for key in KEY_FILE_KEYS if _optional_string(doc.get(key))),
    )


# The secret files Synapse reads (the `*_path` twins of inline secrets), when the user's file names them.
KEY_FILE_KEYS = (
    "registration_shared_secret_path",
    "macaroon_secret_key_path",
    "form_secret_path",
    "recaptcha_private_key_path",
    "turn_shared_secret_path",
)


def _sqlite_database(db: Any) -> str:
    """Synapse's SQLite file: `database.args.database`, else its default `homeserver.db` (relative)."""
    args = db.get("args") if isinstance(db, dict) else None
    path = args.get("database") if isinstance(args, dict) else None
    return path if isinstance(path, str) and path else "homeserver.db"


def _max_upload_size(settings: Settings, path: str, doc: dict[str, Any]) -> int:
    """The limit Synapse enforces with this file first in its --config-path list and our files after it."""
    if "max_upload_size" in settings.core.model_fields_set:
        return settings.core.max_upload_size  # shared.yaml sets it over the file's
    value = doc.get("max_upload_size")
    if value is None:
        return SYNAPSE_DEFAULT_MAX_UPLOAD_SIZE
    size = _synapse_size(value)
    assert size is not None, value  # homeserver_keys.check_shape refused an unreadable one
    return size


def _synapse_size(value: Any) -> int | None:
    """Synapse's Config.parse_size (an int is bytes; a string may end in K, M, G or T); None if unreadable
    or not positive (nginx reads 0 as "no limit")."""
    if type(value) is int:
        size = value
    elif isinstance(value, str) and value:
        factor = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}.get(value[-1], 1)
        try:
            size = int(value[:-1] if factor > 1 else value) * factor
        except ValueError:
            return None
    else:
        return None
    return size if size > 0 else None


GENERATED_LOG_CONFIG = "# Generated once by synapse-workers for homeserver.yaml"


def _user_log_config(settings: Settings) -> str | None:
    """SYNAPSE_LOG_CONFIG naming an existing file of the user's. Otherwise it is only the path a generated
    homeserver.yaml names (the file we created there carries GENERATED_LOG_CONFIG and stays ours), and every
    process keeps its own generated log config."""
    path = settings.homeserver.log_config
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as handle:
        return None if handle.read(len(GENERATED_LOG_CONFIG)) == GENERATED_LOG_CONFIG else path


def _database_host(db: Any) -> str | None:
    args = db.get("args") if isinstance(db, dict) else None
    host = args.get("host") if isinstance(args, dict) else None
    return str(host) if host is not None else None


def user_listeners(listeners: Any) -> tuple[UserListener, ...]:
    """The file's `listeners` as Synapse reads them (shapes are checked by homeserver_keys at read time; an
    entry that still makes no sense is skipped rather than guessed at)."""
    found = []
    for index, listener in enumerate(listeners if isinstance(listeners, list) else []):
        if not isinstance(listener, dict):
            continue
        kind = listener.get("type", "http")
        port = listener.get("port")
        path = listener.get("path")
        addresses = [a for a in listener.get("bind_addresses") or [] if isinstance(a, str) and a]
        if isinstance(listener.get("bind_address"), str) and listener["bind_address"]:
            addresses.append(listener["bind_address"])
        if not addresses:
            addresses = ["0.0.0.0"] if kind == "metrics" else list(SYNAPSE_DEFAULT_BIND_ADDRESSES)
        names: list[str] = []
        resources = listener.get("resources")
        for resource in resources if isinstance(resources, list) else []:
            given = resource.get("names") if isinstance(resource, dict) else None
            for name in given if isinstance(given, list) else []:
                if isinstance(name, str) and name not in names:
                    names.append(name)
        found.append(
            UserListener(
                index=index,
                type=str(kind),
                port=port if type(port) is int else None,
                path=path if isinstance(path, str) and path else None,
                bind_addresses=tuple(dict.fromkeys(addresses)),
                tls=listener.get("tls") is True,
                resources=tuple(names),
            )
        )
    return tuple(found)


def _primary_listener(listeners: tuple[UserListener, ...]) -> int | None:
    """The first plain-HTTP TCP listener serving client traffic (the official images use 8008), whose port
    becomes nginx's public port: its position in `listeners`."""
    for position, listener in enumerate(listeners):
        if (
            listener.type == "http"
            and not listener.tls
            and listener.port is not None
            and "client" in listener.resources
        ):
            return position
    return None


def _optional_string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# --------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------


def database_block(settings: Settings, secrets: SecretPaths, embedded_socket_dir: str) -> dict[str, Any]:
    db = settings.database
    kind = db.kind
    if kind == "sqlite":
        return {"name": "sqlite3", "args": {"database": f"{settings.core.data_dir}/homeserver.db"}}
    if kind == "embedded":
        return embedded_database(secrets, embedded_socket_dir)
    # Like every other secret, the password is not in this file: libpq reads the passfile, which
    # `generate`/`run` write from POSTGRES_PASSWORD (0600), so changing the variable changes the password.
    args: dict[str, Any] = {
        "user": db.user,
        "dbname": db.name,
        "host": db.host,
        "port": db.port,
        "passfile": secrets.external_postgres,
    }
    # Small pools: every worker opens its own, and PostgreSQL allows 100 connections by default.
    args.update({"cp_min": 1, "cp_max": 5})
    return {"name": "psycopg2", "txn_limit": 10000, "args": args}


def embedded_database(secrets: SecretPaths, socket_dir: str) -> dict[str, Any]:
    """Synapse's `database` section for the embedded cluster over its socket: a generated homeserver.yaml's, and
    shared.yaml's over a ported SQLite one. No password: libpq reads it from the passfile (0600, made by `run`)."""
    args: dict[str, Any] = {"user": "synapse", "dbname": "synapse", "host": socket_dir, "passfile": secrets.postgres}
    # Small pools: every worker opens its own (the cluster's max_connections follows: plan.postgres_max_connections).
    args.update({"cp_min": 1, "cp_max": 5})
    return {"name": "psycopg2", "txn_limit": 10000, "args": args}


def generated_homeserver(
    settings: Settings, secrets: SecretPaths, embedded_socket_dir: str, port: int, media_store: str
) -> dict[str, Any]:
    """homeserver.yaml for a new install: a runnable monolith config; workers are layered on top.

    `port` is the public port (nginx's, and this client listener's when the file is used without us);
    `media_store` the plan's (`Plan.media_store`: SYNAPSE_MEDIA_STORE_PATH or <data dir>/media_store)."""
    core, s = settings.core, settings.homeserver
    doc: dict[str, Any] = {
        "server_name": core.server_name,
        "report_stats": bool(core.report_stats),
        "listeners": [
            {
                "port": port,
                "type": "http",
                "x_forwarded": True,
                "resources": [{"names": ["client", "federation"], "compress": False}],
            }
        ],
        "database": database_block(settings, secrets, embedded_socket_dir),
        "log_config": s.log_config or f"{core.config_dir}/{core.server_name}.log.config",
        "media_store_path": media_store,
        "max_upload_size": size_text(core.max_upload_size),
        "event_cache_size": s.event_cache_size,
        "signing_key_path": secrets.signing_key,
        "registration_shared_secret_path": secrets.registration,
        "macaroon_secret_key_path": secrets.macaroon,
        "form_secret_path": secrets.form,
        "trusted_key_servers": [{"server_name": "matrix.org"}],
        "suppress_key_server_warning": True,
        "enable_registration": s.enable_registration,
        "allow_guest_access": s.allow_guest,
        "serve_server_wellknown": s.serve_server_wellknown,
        "enable_metrics": settings.metrics.enabled,
        "url_preview_enabled": s.url_preview_enabled,
    }
    if s.enable_registration:
        # Synapse refuses open registration without this; the operator asked for it explicitly.
        doc["enable_registration_without_verification"] = True
    if s.url_preview_enabled:
        doc["url_preview_ip_range_blacklist"] = URL_PREVIEW_BLACKLIST
    if s.public_baseurl:
        doc["public_baseurl"] = s.public_baseurl
    # No TURN settings here: they follow the environment on every start (shared.yaml), like the coturn they
    # point at, so turning the built-in coturn off takes them away again.
    return doc


def size_text(size: int) -> str:
    """Bytes in Synapse's size syntax (50M), exact."""
    for unit, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


URL_PREVIEW_BLACKLIST = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "169.254.0.0/16",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "::1/128",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
]
