"""Environment → typed, validated Settings.

Every recognised variable that is set is validated, whether this run uses it or not. Each field's alias is
the environment variable's name; error messages name the variable, the value and what is accepted.
Pure: takes a mapping, never reads os.environ itself.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError
from pydantic.json_schema import JsonDict

from . import catalog
from .cron import parse as parse_cron
from .errors import Problem, UserError
from .errors import Variable as Var  # a problem's subject; `Variable` here is the registry's row

TRUTHY = ("yes", "y", "true", "t", "1", "on")
FALSY = ("no", "n", "false", "f", "0", "off", "")
BOOL_HELP = "one of yes, y, true, t, 1, on (on) or no, n, false, f, 0, off, empty (off)"


def _passthrough(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Defaults are validated too (validate_default): let None and already-parsed tuples through."""

    def wrapper(value: Any) -> Any:
        if value is None or isinstance(value, tuple):
            return value
        return parse(value)

    return wrapper


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUTHY:
        return True
    if text in FALSY:
        return False
    raise ValueError(BOOL_HELP)


def _yes_no(value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("yes", "no"):
        return text == "yes"
    raise ValueError("exactly 'yes' or 'no' (Synapse's own generator accepts nothing else)")


def _on_off(value: Any) -> str:
    text = str(value).strip().lower()
    if text in TRUTHY:
        return "on"
    if text in FALSY:
        return "off"
    raise ValueError("'on' or 'off'")


def _int(low: int, high: int | None = None) -> BeforeValidator:
    def parse(value: Any) -> int:
        text = str(value).strip()
        if not re.fullmatch(r"[0-9]+", text):
            raise ValueError(f"a whole number {_range(low, high)}")
        number = int(text)
        if number < low or (high is not None and number > high):
            raise ValueError(f"a whole number {_range(low, high)}")
        return number

    return BeforeValidator(_passthrough(parse))


def _range(low: int, high: int | None) -> str:
    return f"from {low} to {high}" if high is not None else f"of at least {low}"


def _abs_path(value: Any) -> str:
    text = str(value).strip()
    # These characters would break nginx/supervisor/YAML files that embed the path.
    if not text.startswith("/") or re.search(r"[\s;{}'\"$\\%#]", text):
        raise ValueError("an absolute path (starting with /) without spaces or any of ; { } ' \" $ \\ % #")
    return text.rstrip("/") or "/"


# Directories that belong to the system: never a data, config or runtime dir (we create, replace and
# re-own things inside those). Exact paths, and whole trees that are the system's alone.
SYSTEM_DIRS = frozenset(
    {
        "/",
        "/etc",
        "/home",
        "/media",
        "/mnt",
        "/opt",
        "/root",
        "/run",
        "/srv",
        "/tmp",
        "/var",
        "/var/lib",
        "/var/log",
        "/var/run",
        "/var/tmp",
        "/var/cache",
        "/var/spool",
        "/var/mail",
        "/var/opt",
        "/var/local",
        "/var/backups",
        "/usr/local",
    }
)
SYSTEM_TREES = ("/proc", "/sys", "/dev", "/boot", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr")


def _own_dir(value: Any) -> str:
    path = _abs_path(value)
    normal = os.path.normpath(path)
    if (
        normal in SYSTEM_DIRS
        or any(normal == t or normal.startswith(t + "/") for t in SYSTEM_TREES)
        and not (normal.startswith("/usr/local/"))
    ):
        raise ValueError(
            "a directory of its own, not a system directory such as /, /etc, /var or /usr (files are created, "
            "replaced and given to Synapse's user in it)"
        )
    return path


def _choice(*choices: str, upper: bool = False) -> BeforeValidator:
    def parse(value: Any) -> str:
        text = str(value).strip()
        text = text.upper() if upper else text.lower()
        if text not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return text

    return BeforeValidator(_passthrough(parse))


SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(value: Any) -> int:
    """Synapse's size syntax (50M, 2048M, 1G, 512K, plain bytes) → bytes."""
    match = re.fullmatch(r"([0-9]+)\s*([KMGT]?)B?", str(value).strip().upper())
    if not match or int(match.group(1)) == 0:
        raise ValueError("a size such as 50M, 2048M, 1G or a number of bytes")
    return int(match.group(1)) * SIZE_UNITS[match.group(2)]


def _cache_size(value: Any) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"[0-9]+[KMkm]?", text):
        raise ValueError("a number of entries such as 10K or 5000")
    return text.upper()


def _nginx_time(value: Any) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|M|y)?)+", text) or text.startswith("0") and text != "0":
        raise ValueError("an nginx time such as 60s, 5m or 1h")
    return text


def _prom_duration(value: Any) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|y))+", text):
        raise ValueError("a Prometheus duration such as 15s, 1m, 30d or 1y")
    return text


def _server_name(value: Any) -> str:
    text = str(value).strip()
    host = r"([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    ip6 = r"\[[0-9A-Fa-f:.]+\]"
    if not re.fullmatch(rf"({host}|{ip6})(:[0-9]{{1,5}})?", text):
        raise ValueError("a DNS name or IP address, optionally with :port, such as example.com")
    return text


def _base_url(value: Any) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", text):
        raise ValueError("a full URL such as https://matrix.example.com")
    return text if text.endswith("/") else text + "/"


def _turn_uris(value: Any) -> tuple[str, ...]:
    uris = tuple(u for u in str(value).split(",") if u)
    for uri in uris:
        if not re.fullmatch(r"(turns?|stuns?):\S+", uri):
            raise ValueError("comma-separated turn:, turns: or stun: URIs with no spaces")
    return uris


def _path_list(value: Any) -> tuple[str, ...]:
    return tuple(_abs_path(p) for p in str(value).split(",") if p.strip())


def _ip(value: Any) -> str:
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise ValueError("an IPv4 or IPv6 address") from None


def _remote_write_url(value: Any) -> str | None:
    text = str(value).strip()
    if not text:
        return None
    parsed = urlsplit(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError("an http:// or https:// URL")
    if parsed.username or parsed.password:
        # The rendered prometheus.yml is not a private file: a password there would be readable by any user.
        raise ValueError("a URL without user:password@ (the generated Prometheus config is not secret)")
    return text


TRUSTED_PROXIES_HELP = (
    "comma-separated IP addresses or CIDR networks (IPv4 or IPv6, no host bits set, such as 10.0.0.0/8, "
    "192.0.2.1, fd00::/8) or unix: (the nginx unix-socket listener)"
)


def _trusted_proxies(value: Any) -> tuple[str, ...]:
    """SYNAPSE_TRUSTED_PROXIES → normalised networks (a bare address is a /32 or /128), in order, once each."""
    found: list[str] = []
    for entry in (e.strip() for e in str(value).split(",")):
        if not entry:
            continue
        if entry == "unix:":
            network = entry
        else:
            try:
                if "%" in entry:  # an IPv6 zone: nginx cannot match on it
                    raise ValueError(entry)
                network = str(ipaddress.ip_network(entry))
            except ValueError:
                raise ValueError(f"{TRUSTED_PROXIES_HELP}; {entry!r} is not one") from None
        if network not in found:
            found.append(network)
    return tuple(found)


def _workers_processes(value: Any) -> str:
    text = str(value).strip().lower()
    if text == "auto" or re.fullmatch(r"[1-9][0-9]{0,3}", text):
        return text
    raise ValueError("'auto' or a number of processes from 1 to 9999")


def _secret_text(value: Any) -> Any:
    text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    # Secrets are written to one-line files (and libpq passfiles): a line break would split them.
    if re.search(r"[\x00-\x1f\x7f]", text):
        raise ValueError("a single line without control characters (it is stored in a one-line key file)")
    return text


# A secret we would otherwise generate (Synapse's keys, the TURN secret): at least this long. Synapse's own
# `--generate-config` makes 50 random characters, the original image 64 hex digits, we 64 hex digits; a shorter
# one is a placeholder (and `export kubernetes` could no longer tell it from the configuration's own text).
# POSTGRES_PASSWORD is not held to it: it is the password of the user's existing database, which we do not choose.
SECRET_MIN_LENGTH = 16


def _key_secret(value: Any) -> Any:
    text = _secret_text(value)
    if len(text) < SECRET_MIN_LENGTH:
        raise ValueError(
            f"a secret of at least {SECRET_MIN_LENGTH} characters (this one has {len(text)}), such as the output "
            "of `openssl rand -hex 32`; leave it unset to have one generated and kept in the data dir"
        )
    return text


HOST_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
PLACEMENT_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*")
HOSTS_HELP = "comma-separated NAME=ADDRESS pairs (a lowercase name, an IPv4 or IPv6 address), such as db=10.0.0.11"
PLACEMENT_HELP = (
    "comma-separated KEY=HOST pairs: KEY a worker type, a worker name, main, nginx, postgres or redis; HOST a "
    "name from SYNAPSE_HOSTS, such as main=front, synchrotron=w1"
)


def _pairs(value: Any, what: str) -> list[tuple[str, str]]:
    pairs = []
    for entry in (e.strip() for e in str(value).split(",")):
        if not entry:
            continue
        key, sep, rest = entry.partition("=")
        if not sep or not key.strip() or not rest.strip():
            raise ValueError(f"{what}; {entry!r} is not one")
        pairs.append((key.strip(), rest.strip()))
    return pairs


def _hosts(value: Any) -> tuple[tuple[str, str], ...]:
    """SYNAPSE_HOSTS → ((name, address), ...) in the order given; names and addresses once each."""
    found: dict[str, str] = {}
    for name, address in _pairs(value, HOSTS_HELP):
        if not HOST_NAME_RE.fullmatch(name):
            raise ValueError(f"{HOSTS_HELP}; the host name {name!r} is not one (a-z, 0-9, -; a letter first)")
        try:
            ip = ipaddress.ip_address(address.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise ValueError(f"{HOSTS_HELP}; {address!r} (host {name}) is not an IP address") from None
        if ip.is_unspecified or ip.is_multicast:
            raise ValueError(f"{HOSTS_HELP}; {address!r} (host {name}) is not an address other hosts can reach")
        if name in found:
            raise ValueError(f"{HOSTS_HELP}; the host {name!r} is named twice")
        if str(ip) in found.values():
            raise ValueError(f"{HOSTS_HELP}; the address {ip} is given twice")
        found[name] = str(ip)
    return tuple(found.items())


POOL_LIMITS_HELP = (
    "comma-separated POOL=NUMBER pairs, POOL a worker type or main, NUMBER from 1 to 1000000, such as "
    "initial_synchrotron=50, synchrotron=2000, main=250"
)


def _pool_limits(value: Any) -> tuple[tuple[str, int], ...]:
    """NGINX_POOL_LIMITS → ((pool, requests in flight), ...): a pool is a role or main; a shorthand
    (client_reader) sets each of its roles."""
    found: dict[str, int] = {}
    names = (*catalog.TYPE_NAMES, catalog.MAIN_POOL)
    for name, number in _pairs(value, POOL_LIMITS_HELP):
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{POOL_LIMITS_HELP}; {name!r} is not a worker type or main{hint}")
        if not number.isdigit() or not 1 <= int(number) <= 1_000_000:
            raise ValueError(f"{POOL_LIMITS_HELP}; {name}={number} is not a number from 1 to 1000000")
        for pool in (name,) if name == catalog.MAIN_POOL else catalog.expand_type(name):
            if pool in found:
                raise ValueError(f"{POOL_LIMITS_HELP}; the pool {pool!r} is given twice")
            found[pool] = int(number)
    return tuple(found.items())


def _placement(value: Any) -> tuple[tuple[str, str], ...]:
    """SYNAPSE_PLACEMENT → ((key, host name), ...); whether keys and hosts exist is checked against the worker
    list and SYNAPSE_HOSTS (plan.py, _check_combinations)."""
    found: dict[str, str] = {}
    for key, host in _pairs(value, PLACEMENT_HELP):
        if not PLACEMENT_KEY_RE.fullmatch(key):
            raise ValueError(f"{PLACEMENT_HELP}; {key!r} is not a worker type, worker name or service")
        if key in found:
            raise ValueError(f"{PLACEMENT_HELP}; {key!r} is placed twice")
        found[key] = host
    return tuple(found.items())


Bool = Annotated[bool, BeforeValidator(_passthrough(_bool))]
OnOff = Annotated[str, BeforeValidator(_passthrough(_on_off))]
AbsPath = Annotated[str, BeforeValidator(_passthrough(_abs_path))]
OwnDir = Annotated[str, BeforeValidator(_passthrough(_own_dir))]
Port = Annotated[int, _int(1, 65535)]
Bytes = Annotated[int, _int(512, 1 << 30)]
Secret = Annotated[SecretStr, BeforeValidator(_passthrough(_secret_text))]
KeySecret = Annotated[SecretStr, BeforeValidator(_passthrough(_key_secret))]  # at least SECRET_MIN_LENGTH
ServerName = Annotated[str, BeforeValidator(_passthrough(_server_name))]
CacheSize = Annotated[str, BeforeValidator(_passthrough(_cache_size))]
Size = Annotated[int, BeforeValidator(parse_size)]
NginxTime = Annotated[str, BeforeValidator(_passthrough(_nginx_time))]
PromDuration = Annotated[str, BeforeValidator(_passthrough(_prom_duration))]
IP = Annotated[str, BeforeValidator(_passthrough(_ip))]
Id = Annotated[int, _int(0, 2**31 - 1)]

DEFAULT_HTTP_PORT = 8008  # the official images' client port: nginx's public port unless told otherwise


def var(name: str, default: Any = None, *, help: str, default_text: str | None = None) -> Any:
    """A field read from the environment variable `name`. `help` is its one-line meaning (shown by `env`, the
    README and the Unraid template); `default_text` says what leaving it unset means when no literal does."""
    extra: JsonDict | None = {"default_text": default_text} if default_text is not None else None
    return Field(default, alias=name, description=help, json_schema_extra=extra)


S = TypeVar("S", bound="Section")


class Section(BaseModel):
    """One group of variables, validated on its own; a consumer receives only its section.

    Field aliases are the environment variables' names."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True, validate_default=True)


class CoreSettings(Section):
    """Identity, where things live, who Synapse runs as, and which workers exist."""

    server_name: ServerName | None = var(
        "SYNAPSE_SERVER_NAME",
        help="The server name in user IDs (@user:NAME); required to generate; an existing file's must match",
    )
    report_stats: Annotated[bool | None, BeforeValidator(_passthrough(_yes_no))] = var(
        "SYNAPSE_REPORT_STATS",
        help="Report anonymous usage statistics to matrix.org: exactly yes or no; required to generate",
    )
    config_dir: OwnDir = var(
        "SYNAPSE_CONFIG_DIR", "/data", help="Directory of homeserver.yaml and the generated log config"
    )
    data_dir: OwnDir = var(
        "SYNAPSE_DATA_DIR",
        "/data",
        help="Directory of the signing key, secrets, media store, logs and the embedded PostgreSQL cluster",
    )
    config_path: AbsPath | None = var(
        "SYNAPSE_CONFIG_PATH",
        help="Path of homeserver.yaml (yours, or the one generated there)",
        default_text="<config dir>/homeserver.yaml",
    )
    runtime_dir: OwnDir = var(
        "SYNAPSE_RUNTIME_DIR",
        "/run/synapse-workers",
        help="All generated config, sockets, pid files and the status file (nothing goes to /etc or /run when set)",
    )
    worker_types: str = var(
        "SYNAPSE_WORKER_TYPES",
        "",
        help="The workers to run: comma-separated [name=]type[+type...][:count], or full; empty runs a monolith",
    )
    as_registration_dir: AbsPath | None = var(
        "SYNAPSE_AS_REGISTRATION_DIR",
        help="A directory of application service registration *.yaml files, added on every start",
    )
    appservices: Annotated[tuple[str, ...], BeforeValidator(_passthrough(_path_list))] = var(
        "SYNAPSE_APPSERVICES",
        (),
        help="A comma-separated list of application service registration files, added on every start",
    )
    max_upload_size: Size = var(
        "SYNAPSE_MAX_UPLOAD_SIZE",
        "50M",
        help="Largest upload, for Synapse and nginx alike, on every start; unset: an existing homeserver.yaml's limit",
    )
    uid: Id = var(
        "UID", 991, help="User ID Synapse and Redis run as when started as root; data dirs we create are given to it"
    )
    gid: Id = var("GID", 991, help="Group ID Synapse and Redis run as when started as root")
    launch_mode: Annotated[Literal["fork", "process"], _choice("fork", "process")] = var(
        "SYNAPSE_LAUNCH_MODE",
        "fork",
        help="How Synapse processes start: fork (import Synapse once, fork each process: faster, smaller) "
        "or process (one Python per process)",
    )
    malloc: Annotated[Literal["auto", "jemalloc", "system"], _choice("auto", "jemalloc", "system")] = var(
        "SYNAPSE_MALLOC",
        "auto",
        help="Allocator of the Synapse processes: jemalloc (libjemalloc2, one arena, no thread cache), system "
        "(glibc), or auto: jemalloc in fork mode",
    )
    asyncio_reactor: Bool = var(
        "SYNAPSE_ASYNC_IO_REACTOR",
        False,
        help="Run every Synapse process on Twisted's asyncio reactor instead of its epoll one (Synapse's own switch)",
    )

    @property
    def jemalloc(self) -> bool:
        """Measured (docs/benchmarks.md): jemalloc saves memory with forked processes, costs some without."""
        return self.malloc == "jemalloc" or (self.malloc == "auto" and self.launch_mode == "fork")

    @property
    def homeserver_config_path(self) -> str:
        return self.config_path or f"{self.config_dir}/homeserver.yaml"


class HomeserverSettings(Section):
    """Read when homeserver.yaml is generated (a new install); SYNAPSE_LOG_CONFIG also on every start."""

    media_store_path: AbsPath | None = var(
        "SYNAPSE_MEDIA_STORE_PATH",
        help="Where uploaded media are stored (generation only)",
        default_text="<data dir>/media_store",
    )
    no_tls: Bool = var(
        "SYNAPSE_NO_TLS",
        True,
        help="Accepted for compatibility with the official image; TLS is nginx's job (SYNAPSE_TLS_CERT)",
    )  # accepted for compatibility; TLS is nginx's job
    event_cache_size: CacheSize = var(
        "SYNAPSE_EVENT_CACHE_SIZE", "10K", help="Synapse's event cache size in entries, such as 10K (generation only)"
    )
    enable_registration: Bool = var(
        "SYNAPSE_ENABLE_REGISTRATION",
        False,
        help="Open registration without verification: anyone can create an account (generation only)",
    )
    allow_guest: Bool = var("SYNAPSE_ALLOW_GUEST", False, help="Allow guest access (generation only)")
    registration_shared_secret: KeySecret | None = var(
        "SYNAPSE_REGISTRATION_SHARED_SECRET",
        help=(
            "Shared secret for register_new_matrix_user and the admin register API; at least 16 characters; "
            "stored in the data dir (0600)"
        ),
        default_text="generated",
    )
    macaroon_secret_key: KeySecret | None = var(
        "SYNAPSE_MACAROON_SECRET_KEY",
        help="Key that signs access tokens' macaroons; at least 16 characters; stored in the data dir (0600)",
        default_text="generated",
    )
    form_secret: KeySecret | None = var(
        "SYNAPSE_FORM_SECRET",
        help="Secret for Synapse's forms (consent, terms); at least 16 characters; stored in the data dir (0600)",
        default_text="generated",
    )
    log_config: AbsPath | None = var(
        "SYNAPSE_LOG_CONFIG",
        help="An existing file: the log config of every process; otherwise the path a generated homeserver.yaml names",
        default_text="<config dir>/<server name>.log.config",
    )
    serve_server_wellknown: Bool = var(
        "SYNAPSE_SERVE_SERVER_WELLKNOWN",
        False,
        help="Serve /.well-known/matrix/server so federation reaches this port (generation only)",
    )
    public_baseurl: Annotated[str | None, BeforeValidator(_passthrough(_base_url))] = var(
        "SYNAPSE_PUBLIC_BASEURL",
        help="The public URL clients use, such as https://matrix.example.com (generation only)",
    )
    url_preview_enabled: Bool = var(
        "SYNAPSE_URL_PREVIEW_ENABLED", False, help="Generate URL previews (generation only)"
    )


class DatabaseSettings(Section):
    database: Annotated[Literal["embedded", "postgres", "sqlite"] | None, _choice("embedded", "postgres", "sqlite")] = (
        var(
            "SYNAPSE_DATABASE",
            help="Database of a generated homeserver.yaml: embedded, postgres (external) or sqlite (monolith only)",
            default_text="embedded, or postgres when POSTGRES_PASSWORD is set",
        )
    )
    host: str = var("POSTGRES_HOST", "db", help="External PostgreSQL host name, address or socket directory")
    port: Port = var("POSTGRES_PORT", 5432, help="External PostgreSQL port")
    name: str = var("POSTGRES_DB", "synapse", help="External PostgreSQL database name")
    user: str = var("POSTGRES_USER", "synapse", help="External PostgreSQL user")
    password: Secret | None = var(
        "POSTGRES_PASSWORD",
        help="External PostgreSQL password (kept in a 0600 libpq passfile); setting it selects the external database",
    )
    port_sqlite: Bool = var(
        "SYNAPSE_PORT_SQLITE",
        False,
        help="At start, port homeserver.yaml's SQLite database into the embedded PostgreSQL once "
        "(`synapse-workers port-sqlite`); the file is not edited",
    )

    @property
    def kind(self) -> str:
        """What a generated homeserver.yaml uses: external postgres when a password is given."""
        if self.database:
            return self.database
        return "postgres" if self.password is not None else "embedded"


class ListenSettings(Section):
    """Where the stack listens: nginx's public side, and how processes reach each other."""

    http_port: Port | None = var(
        "SYNAPSE_HTTP_PORT",
        help="nginx's public port (clients and federation)",
        default_text="8008, or your homeserver.yaml's client port",
    )
    http_bind_address: IP = var("SYNAPSE_HTTP_BIND_ADDRESS", "0.0.0.0", help="nginx's public address (IPv4 or IPv6)")
    internal_port_base: Annotated[int, _int(1024, 64535)] = var(
        "SYNAPSE_INTERNAL_PORT_BASE",
        18000,
        help="First internal port: main base..base+4, workers from base+10; below the kernel's ephemeral port range",
    )
    public_unix_sockets: Bool = var(
        "SYNAPSE_PUBLIC_UNIX_SOCKETS", False, help="Connect nginx to Synapse over unix sockets instead of loopback TCP"
    )
    replication_unix_sockets: Bool = var(
        "SYNAPSE_HTTP_REPLICATION_UNIX_SOCKETS", False, help="Run replication (instance_map) over unix sockets"
    )
    nginx_listen_unix_socket: AbsPath | None = var(
        "NGINX_LISTEN_UNIX_SOCKET", help="An extra nginx listener on this unix socket, for an outer proxy"
    )
    tls_cert: AbsPath | None = var(
        "SYNAPSE_TLS_CERT", help="Certificate file for an optional TLS listener in nginx (with SYNAPSE_TLS_KEY)"
    )
    tls_key: AbsPath | None = var(
        "SYNAPSE_TLS_KEY", help="Private key file for the TLS listener (with SYNAPSE_TLS_CERT)"
    )
    tls_port: Port = var("SYNAPSE_TLS_PORT", 8448, help="Port of the TLS listener")
    # Whose X-Forwarded-For / X-Forwarded-Proto nginx believes (everyone else's are replaced); empty: no one.
    trusted_proxies: Annotated[tuple[str, ...], BeforeValidator(_passthrough(_trusted_proxies))] = var(
        "SYNAPSE_TRUSTED_PROXIES",
        (),
        help="Outer proxies whose X-Forwarded-For/-Proto are believed: comma-separated IPs/CIDRs, or unix:",
        default_text="none (trust no one)",
    )


class LoggingSettings(Section):
    level: Annotated[str, _choice("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", upper=True)] = var(
        "SYNAPSE_LOG_LEVEL", "INFO", help="Log level of every Synapse process: CRITICAL, ERROR, WARNING, INFO or DEBUG"
    )
    sensitive: Bool = var(
        "SYNAPSE_LOG_SENSITIVE", False, help="Let the SQL logger follow a DEBUG level (off keeps it at INFO)"
    )
    to_disk: Bool = var(
        "SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK", False, help="Also write rotated log files to <data dir>/logs/"
    )


class MetricsSettings(Section):
    enabled: Bool = var(
        "SYNAPSE_METRICS",
        False,
        help="Loopback metrics listeners on every process, the built-in Prometheus and the nginx exporter",
    )
    unix_sockets: Bool = var(
        "SYNAPSE_METRICS_UNIX_SOCKETS",
        False,
        help="Put the metrics listeners on unix sockets (scraped through nginx on 127.0.0.1:base+5/metrics/NAME)",
    )
    redis_export: Bool = var(
        "SYNAPSE_ENABLE_REDIS_METRIC_EXPORT",
        False,
        help="With SYNAPSE_METRICS and the stack's own Redis (workers): prometheus-redis-exporter on base+7",
    )
    postgres_export: Bool = var(
        "SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT",
        False,
        help="With SYNAPSE_METRICS and the embedded cluster or POSTGRES_PASSWORD's external one: "
        "prometheus-postgres-exporter on base+8",
    )
    postgres_export_sslmode: Annotated[
        Literal["disable", "require", "verify-ca", "verify-full"],
        _choice("disable", "require", "verify-ca", "verify-full"),
    ] = var(
        "POSTGRES_EXPORTER_SSLMODE",
        "disable",
        help="How prometheus-postgres-exporter reaches an external PostgreSQL: disable, require, verify-ca or "
        "verify-full (its driver has no 'prefer')",
    )
    scrape_interval: PromDuration = var(
        "PROMETHEUS_SCRAPE_INTERVAL", "15s", help="How often the built-in Prometheus scrapes every target"
    )
    retention: PromDuration = var(
        "PROMETHEUS_STORAGE_RETENTION_TIME", "1y", help="How long the built-in Prometheus keeps samples"
    )
    storage_path: AbsPath | None = var(
        "PROMETHEUS_STORAGE_PATH",
        help="The built-in Prometheus's database directory (created owned by its user); survives restarts",
        default_text="<data dir>/prometheus",
    )
    bind_address: IP = var(
        "PROMETHEUS_BIND_ADDRESS", "127.0.0.1", help="The built-in Prometheus's address (loopback: this host only)"
    )
    port: Port = var("PROMETHEUS_PORT", 9090, help="The built-in Prometheus's port (its web UI and query API)")
    remote_write_url: Annotated[str | None, BeforeValidator(_passthrough(_remote_write_url))] = var(
        "PROMETHEUS_REMOTE_WRITE_HTTP_URL",
        help="Also send every sample to this Prometheus remote-write URL (http/https, no credentials in it)",
    )


class TurnSettings(Section):
    """Synapse's TURN settings (shared.yaml, every start) and the built-in coturn."""

    uris: Annotated[tuple[str, ...], BeforeValidator(_passthrough(_turn_uris))] = var(
        "SYNAPSE_TURN_URIS",
        (),
        help="Comma-separated turn:/turns:/stun: URIs Synapse hands to clients, on every start",
        default_text="with the built-in coturn: turn:<server name>:<COTURN_PORT> over udp and tcp; else none",
    )
    secret: KeySecret | None = var(
        "SYNAPSE_TURN_SECRET",
        help=(
            "The TURN shared secret (use-auth-secret) of Synapse and the TURN server; at least 16 characters; "
            "stored in the data dir (0600)"
        ),
        default_text="generated",
    )
    builtin_coturn: Bool = var(
        "SYNAPSE_ENABLE_BUILTIN_COTURN",
        False,
        help="Run coturn (TURN/STUN relay for voice and video calls) in the stack; Synapse's turn_uris point at it",
    )
    port: Annotated[int, _int(1024, 65535)] = var(
        "COTURN_PORT", 3478, help="The built-in coturn's TURN/STUN port, UDP and TCP (publish both), 1024 or above"
    )
    min_port: Annotated[int, _int(1024, 65535)] = var(
        "COTURN_MIN_PORT", 49153, help="First UDP relay port of the built-in coturn (publish the whole range)"
    )
    max_port: Annotated[int, _int(1024, 65535)] = var(
        "COTURN_MAX_PORT", 49173, help="Last UDP relay port of the built-in coturn"
    )
    metrics: Bool = var(
        "COTURN_METRICS",
        False,
        help="coturn's Prometheus endpoint on 127.0.0.1:<SYNAPSE_INTERNAL_PORT_BASE+9> (a turnserver built with it)",
    )
    external_ip: IP | None = var(
        "COTURN_EXTERNAL_IP",
        help="The public IP coturn announces behind NAT (external-ip); taken from here only, never looked up",
    )
    internal_ip: IP | None = var(
        "COTURN_INTERNAL_IP",
        help="The local IP coturn listens and relays on (the private side of COTURN_EXTERNAL_IP)",
        default_text="every address of the host",
    )
    allow_loopback_peers: Bool = var(
        "COTURN_ALLOW_LOOPBACK_PEERS",
        False,
        help="For tests only, never in production: let coturn relay to loopback peers (127.0.0.0/8, ::1)",
    )


def _cron(value: Any) -> str:
    return parse_cron(str(value)).text


def _levels(value: Any) -> str:
    text = str(value).strip().replace(" ", "")
    if not re.fullmatch(r"[1-9][0-9]{0,5}(,[1-9][0-9]{0,5}){0,9}", text):
        raise ValueError("a comma-separated list of level sizes, largest first, such as 100,50,25")
    return text


CronText = Annotated[str, BeforeValidator(_passthrough(_cron))]


class PlacementSettings(Section):
    """Several hosts: where each Synapse process, PostgreSQL, Redis and nginx run (unset: one host, as always)."""

    hosts: Annotated[tuple[tuple[str, str], ...], BeforeValidator(_passthrough(_hosts))] = var(
        "SYNAPSE_HOSTS",
        (),
        help="Hosts of a deployment on several machines: NAME=ADDRESS pairs, such as db=10.0.0.11, front=10.0.0.12",
        default_text="none (one host)",
    )
    placement: Annotated[tuple[tuple[str, str], ...], BeforeValidator(_passthrough(_placement))] = var(
        "SYNAPSE_PLACEMENT",
        (),
        help="With SYNAPSE_HOSTS: KEY=HOST pairs, KEY a worker type or name, main, nginx, postgres or redis; "
        "unplaced ones run with main (main: the first host)",
        default_text="everything on the first host",
    )

    @property
    def multi_host(self) -> bool:
        return bool(self.hosts)


class CompressorSettings(Section):
    """synapse_auto_compressor, run by the stack's scheduler (PostgreSQL only)."""

    enabled: Bool = var(
        "SYNAPSE_ENABLE_COMPRESSOR",
        False,
        help="Run synapse_auto_compressor (state compression, PostgreSQL only) on SYNAPSE_COMPRESSOR_SCHEDULE",
    )
    schedule: CronText = var(
        "SYNAPSE_COMPRESSOR_SCHEDULE",
        "0 1 * * 0",
        help="When the compressor runs: a 5-field cron expression in the container's local time (TZ)",
    )
    chunk_size: Annotated[int, _int(1, 1_000_000)] = var(
        "SYNAPSE_COMPRESSOR_CHUNK_SIZE",
        500,
        help="State groups the compressor works on at once (-c; at least the first level size)",
    )
    chunks: Annotated[int, _int(1, 1_000_000)] = var(
        "SYNAPSE_COMPRESSOR_CHUNKS", 100, help="Chunks compressed per run (-n): how long one run lasts"
    )
    levels: Annotated[str, BeforeValidator(_passthrough(_levels))] = var(
        "SYNAPSE_COMPRESSOR_LEVELS", "100,50,25", help="The compressor's level sizes (its -l default: 100,50,25)"
    )


class BackupSettings(Section):
    """Scheduled backups (`synapse-workers backup`, run by the stack's scheduler) and `backup`'s default -o."""

    schedule: CronText | None = var(
        "SYNAPSE_BACKUP_SCHEDULE",
        help="When a backup runs: a 5-field cron expression in the container's local time (TZ); empty: no "
        "scheduled backups",
        default_text="none (no scheduled backups)",
    )
    dir: OwnDir | None = var(
        "SYNAPSE_BACKUP_DIR",
        help="Where backups go (one <UTC stamp>/ directory each; outside the data dir and the media store): "
        "the scheduled ones, and `synapse-workers backup` without -o",
        default_text="none (required with SYNAPSE_BACKUP_SCHEDULE)",
    )
    keep: Annotated[int, _int(1, 10_000)] = var(
        "SYNAPSE_BACKUP_KEEP",
        7,
        help="Complete backups the scheduled backup keeps in SYNAPSE_BACKUP_DIR (the oldest beyond it are removed)",
    )


PROXY_BUFFER_COUNT = 8


class NginxSettings(Section):
    """How the internal nginx is tuned (what it routes comes from the plan)."""

    worker_processes: Annotated[str, BeforeValidator(_passthrough(_workers_processes))] = var(
        "NGINX_WORKER_PROCESSES",
        "auto",
        help="nginx worker processes: auto (one per CPU usable, a container's CPU quota honoured) or a number",
    )
    worker_connections: Annotated[int, _int(16, 1 << 20)] = var(
        "NGINX_WORKER_CONNECTIONS",
        8192,
        help="Connections per nginx worker (a proxied request holds two; a burst of connections may land on one)",
    )
    page_size: Bytes = var(
        "NGINX_GENERAL_PAGE_SIZE_BYTES", 4096, help="P, the page size the buffer defaults below are multiples of"
    )
    gzip_comp_level: Annotated[int, _int(1, 9)] = var("NGINX_GZIP_COMP_LEVEL", 1, help="gzip compression level, 1 to 9")
    gzip_http_version: Annotated[str, _choice("1.0", "1.1")] = var(
        "NGINX_GZIP_HTTP_VERSION", "1.1", help="Lowest HTTP version that gets gzip: 1.0 or 1.1"
    )
    gzip_min_length: Annotated[int, _int(0, 1 << 30)] = var(
        "NGINX_GZIP_MIN_LENGTH", 200, help="Smallest response gzip compresses, in bytes"
    )
    client_keepalive_enable: Bool = var(
        "NGINX_CLIENT_KEEPALIVE_ENABLE", True, help="Keep client connections open (off sets keepalive_timeout 0)"
    )
    client_keepalive_timeout_seconds: Annotated[int, _int(0, 86400)] = var(
        "NGINX_CLIENT_KEEPALIVE_TIMEOUT_SECONDS", 60, help="Client keepalive timeout in seconds"
    )
    upstream_keepalive_enable: Bool = var(
        "NGINX_UPSTREAM_KEEPALIVE_ENABLE", True, help="Keep idle connections from nginx to Synapse open"
    )
    upstream_keepalive_timeout: Annotated[int, _int(1, 86400)] = var(
        "NGINX_UPSTREAM_KEEPALIVE_TIMEOUT_SECONDS", 60, help="Idle upstream connection timeout in seconds"
    )
    upstream_keepalive_multiplier: Annotated[int, _int(1, 1000)] = var(
        "NGINX_UPSTREAM_KEEPALIVE_CONNECTION_MULTIPLIER", 1, help="Idle upstream connections = servers x 2 x this"
    )
    max_fails: Annotated[int, _int(0, 1000)] = var(
        "NGINX_UPSTREAM_SERVER_MAX_FAILS", 1, help="Failures before nginx marks a Synapse process unavailable"
    )
    fail_timeout: Annotated[int, _int(1, 86400)] = var(
        "NGINX_UPSTREAM_SERVER_FAIL_TIMEOUT", 10, help="Seconds a failed Synapse process stays marked unavailable"
    )
    proxy_buffering: OnOff = var("NGINX_PROXY_BUFFERING", "on", help="Buffer Synapse's responses in nginx: on or off")
    proxy_request_buffering: OnOff = var(
        "NGINX_PROXY_REQUEST_BUFFERING", "on", help="Buffer request bodies before passing them on: on or off"
    )
    proxy_buffer_size_bytes: Bytes | None = var(
        "NGINX_PROXY_BUFFER_SIZE_BYTES",
        help="proxy_buffer_size",
        default_text="P, or P x NGINX_PROXY_BUFFERING_DISABLED_PAGE_MULTIPLIER with buffering off",
    )
    buffering_disabled_multiplier: Annotated[int, _int(1, 1024)] = var(
        "NGINX_PROXY_BUFFERING_DISABLED_PAGE_MULTIPLIER",
        1,
        help="Multiplier of P for the proxy buffer when buffering is off",
    )
    proxy_busy_buffers_size_bytes: Bytes | None = var(
        "NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES",
        help="proxy_busy_buffers_size (at least the buffer size)",
        default_text="2P",
    )
    proxy_temp_file_write_size_bytes: Bytes | None = var(
        "NGINX_PROXY_TEMP_FILE_WRITE_SIZE_BYTES",
        help="proxy_temp_file_write_size (at least the buffer size)",
        default_text="2P",
    )
    client_body_buffer_size_bytes: Bytes | None = var(
        "NGINX_CLIENT_BODY_BUFFER_SIZE_BYTES", help="client_body_buffer_size", default_text="1024P"
    )
    proxy_read_timeout: NginxTime = var(
        "NGINX_PROXY_READ_TIMEOUT", "60s", help="How long nginx waits for Synapse's answer, such as 60s"
    )
    pool_limits: Annotated[tuple[tuple[str, int], ...], BeforeValidator(_passthrough(_pool_limits))] = var(
        "NGINX_POOL_LIMITS",
        (),
        help="Requests each pool (a worker type's processes, or main) holds at once, then 429: POOL=NUMBER pairs, "
        "such as initial_synchrotron=50, main=250",
        default_text=f"synchrotron and sliding_synchrotron 2000, initial_synchrotron 50, main "
        f"{catalog.MAIN_POOL_LIMIT} (+{catalog.ROLES[catalog.LONG_POLLS].pool_limit} without a synchrotron: main "
        "holds the /sync long-polls then), every other type 500",
    )
    disable_logrotate: Bool = var(
        "NGINX_DISABLE_LOGROTATE",
        False,
        help="Do not rotate nginx's logs (<data dir>/logs/nginx-access.log and nginx-error.log, daily with logrotate)",
    )
    logrotate_keep: Annotated[int, _int(1, 366)] = var(
        "NGINX_LOGROTATE_KEEP", 7, help="Rotated nginx logs kept (one per day; older ones are deleted)"
    )

    # ---- derived values ----
    @property
    def proxy_buffer_size(self) -> int:
        if self.proxy_buffer_size_bytes:
            return self.proxy_buffer_size_bytes
        if self.proxy_buffering == "off":
            return self.page_size * self.buffering_disabled_multiplier
        return self.page_size

    @property
    def proxy_busy_buffers_size(self) -> int:
        # nginx needs busy >= proxy_buffer_size; the seed's plain 2×page breaks with a large multiplier.
        return self.proxy_busy_buffers_size_bytes or max(2 * self.page_size, self.proxy_buffer_size)

    @property
    def proxy_temp_file_write_size(self) -> int:
        return self.proxy_temp_file_write_size_bytes or max(2 * self.page_size, self.proxy_buffer_size)

    @property
    def client_body_buffer_size(self) -> int:
        return self.client_body_buffer_size_bytes or 1024 * self.page_size

    @property
    def client_keepalive_timeout(self) -> int:
        return self.client_keepalive_timeout_seconds if self.client_keepalive_enable else 0


SECTIONS: dict[str, type[Section]] = {
    "core": CoreSettings,
    "homeserver": HomeserverSettings,
    "database": DatabaseSettings,
    "listen": ListenSettings,
    "logging": LoggingSettings,
    "metrics": MetricsSettings,
    "turn": TurnSettings,
    "compressor": CompressorSettings,
    "backup": BackupSettings,
    "nginx": NginxSettings,
    "placement": PlacementSettings,
}


@dataclass(frozen=True)
class Settings:
    """Everything the environment can say, one typed section per consumer."""

    core: CoreSettings
    homeserver: HomeserverSettings
    database: DatabaseSettings
    listen: ListenSettings
    logging: LoggingSettings
    metrics: MetricsSettings
    turn: TurnSettings
    compressor: CompressorSettings
    backup: BackupSettings
    nginx: NginxSettings
    placement: PlacementSettings
    # The recognised variables given, as text, secrets left out (never kept in clear): see `non_secret_given`.
    given: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def value(self, name: str) -> Any:
        """The parsed value of one environment variable."""
        variable = VARIABLES[name]
        return getattr(getattr(self, variable.section), variable.field)


def _is_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    return any(_is_secret(arg) for arg in get_args(annotation))


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or (get_origin(annotation) is Annotated and get_args(annotation)[0] is bool)


@dataclass(frozen=True)
class VariableSpec:
    """One recognised environment variable: where it lands, its default, and what kind of value it is."""

    name: str
    section: str
    field: str
    default: Any
    secret: bool  # asked of the type (SecretStr): never shown, in errors or by `env`
    boolean: bool
    help: str  # one line: what it means (`env`, the README reference, the Unraid template)
    default_text: str  # the default as a person reads it: "on", "50M", "<config dir>/homeserver.yaml", "" (none)


def _default_text(info: Any, boolean: bool) -> str:
    extra = info.json_schema_extra or {}
    if "default_text" in extra:
        return str(extra["default_text"])
    default = info.default
    if boolean:
        return "on" if default else "off"
    if default is None:
        return ""
    if isinstance(default, tuple):
        return ",".join(default)
    return str(default)


VARIABLES: dict[str, VariableSpec] = {
    info.alias: VariableSpec(
        info.alias,
        section,
        field,
        info.default,
        _is_secret(info.annotation),
        _is_bool(info.annotation),
        info.description or "",
        _default_text(info, _is_bool(info.annotation)),
    )
    for section, model in SECTIONS.items()
    for field, info in model.model_fields.items()
    if info.alias
}
ENV_NAMES = tuple(VARIABLES)
BOOL_NAMES = frozenset(name for name, v in VARIABLES.items() if v.boolean)
SECRET_NAMES = frozenset(name for name, v in VARIABLES.items() if v.secret)


# Prefixes of the variables we read: any other variable with one of them is probably a typo.
OUR_PREFIXES = ("SYNAPSE_", "NGINX_", "POSTGRES_", "COTURN_", "PROMETHEUS_")
# ... except variables that Synapse itself reads from its environment (children inherit them).
SYNAPSE_OWN = ("SYNAPSE_CACHE_FACTOR",)


def unknown_variables(env: Mapping[str, str]) -> list[Problem]:
    """A warning for every variable that looks like ours but is not one, with the closest real name."""
    warnings = []
    for name in sorted(env):
        if not name.startswith(OUR_PREFIXES) or name in VARIABLES:
            continue
        if name in SYNAPSE_OWN or name.startswith("SYNAPSE_CACHE_FACTOR_"):
            continue
        close = difflib.get_close_matches(name, ENV_NAMES, n=1, cutoff=0.75)
        hint = f" Did you mean {close[0]}?" if close else " `synapse-workers env` lists every variable."
        warnings.append(
            Problem(
                f"{name} is not a variable synapse-workers reads: it is ignored.{hint}",
                expected=f"a variable of `synapse-workers env`{', such as ' + close[0] if close else ''}",
                found=name,
                related=[Var(close[0])] if close else (),
            )
        )
    return warnings


def shown(name: str, value: str) -> str:
    """How a variable's value may appear in output: secrets never do."""
    return "<hidden>" if name in SECRET_NAMES else repr(value)


def runtime_dir(env: Mapping[str, str]) -> str:
    """SYNAPSE_RUNTIME_DIR alone (what `status` and `health` need to find a running stack)."""
    return load_section(CoreSettings, env).runtime_dir


def load_section(model: type[S], env: Mapping[str, str]) -> S:
    """One section from the environment; UserError names every bad variable in it."""
    sections, problems = _validate({"section": model}, env)
    if problems:
        raise UserError(*problems)
    return sections["section"]  # type: ignore[return-value]


def _given(env: Mapping[str, str]) -> dict[str, str]:
    """The recognised variables that are set. Empty means "unset" except for switches, where empty is off."""
    return {name: env[name] for name in ENV_NAMES if name in env and (env[name].strip() != "" or name in BOOL_NAMES)}


def _validate(models: Mapping[str, type[Section]], env: Mapping[str, str]) -> tuple[dict[str, Section], list[str]]:
    given = _given(env)
    problems: list[str] = []
    sections: dict[str, Section] = {}
    for key, model in models.items():
        try:
            sections[key] = model.model_validate(given)
        except ValidationError as exc:
            for err in exc.errors():
                # Every field has an alias (VARIABLES is made of them): the error's location is the variable.
                name = str(err["loc"][0])
                expected = str(err.get("ctx", {}).get("error", err["msg"])).removeprefix("Value error, ")
                if err["type"] == "literal_error":
                    expected = err["msg"]
                problems.append(Problem.invalid(Var(name), shown(name, env.get(name, "")), expected))
    return sections, problems


def load_settings(env: Mapping[str, str]) -> Settings:
    """Validate every recognised variable; raise UserError listing all problems at once."""
    sections, problems = _validate(SECTIONS, env)
    if problems:
        raise UserError(*problems)
    given = {name: text for name, text in _given(env).items() if name not in SECRET_NAMES}
    settings = Settings(**sections, given=given)  # type: ignore[arg-type]
    _check_combinations(settings)
    return settings


def non_secret_given(s: Settings) -> dict[str, str]:
    """The variables a scheduled job of ours (`synapse-workers backup`) needs to make the launcher's plan again:
    every recognised one that was given, as given, except secrets (never in a child's environment: the job reads
    the stored files). SYNAPSE_DATABASE=postgres without its password would be refused; it only matters for a
    homeserver.yaml not yet generated, which a running stack has."""
    kept = dict(s.given)
    if s.database.database == "postgres" and s.database.password is not None:
        kept.pop("SYNAPSE_DATABASE", None)
    return dict(sorted(kept.items()))


def _check_combinations(s: Settings) -> None:
    """The checks across variables (each field's own check is its type): every problem at once."""
    problems = _tls_problems(s) + _turn_problems(s) + placement_problems(s) + _compressor_problems(s)
    problems += _database_problems(s) + _nginx_buffer_problems(s) + _backup_problems(s)
    if problems:
        raise UserError(*problems)


def _tls_problems(s: Settings) -> list[Problem]:
    cert, key = Var("SYNAPSE_TLS_CERT"), Var("SYNAPSE_TLS_KEY")
    if (s.listen.tls_cert is None) == (s.listen.tls_key is None):
        return []
    found = f"{cert if s.listen.tls_cert is not None else key} alone"
    return [
        Problem(
            f"{cert} and {key} must be set together (TLS on the 8448 port).",
            cert if s.listen.tls_cert is None else key,
            expected="both set, or neither",
            found=found,
            related=(key if s.listen.tls_cert is None else cert,),
        )
    ]


def _turn_problems(s: Settings) -> list[Problem]:
    turn = s.turn
    low, high, port = Var("COTURN_MIN_PORT"), Var("COTURN_MAX_PORT"), Var("COTURN_PORT")
    if turn.min_port > turn.max_port:
        return [
            Problem(
                f"{low}={turn.min_port} is above {high}={turn.max_port}: expected a range with min <= max.",
                low,
                expected=f"at most {high} ({turn.max_port})",
                found=str(turn.min_port),
                related=(high,),
            )
        ]
    if turn.builtin_coturn and turn.min_port <= turn.port <= turn.max_port:
        return [
            Problem(
                f"{port}={turn.port} is inside the relay range {low}-{high} ({turn.min_port}-{turn.max_port}): "
                "expected a port outside it (coturn relays on those).",
                port,
                expected=f"a port outside {turn.min_port}-{turn.max_port}",
                found=str(turn.port),
                related=(low, high),
            )
        ]
    return []


def _compressor_problems(s: Settings) -> list[Problem]:
    compressor = s.compressor
    chunk, levels = Var("SYNAPSE_COMPRESSOR_CHUNK_SIZE"), Var("SYNAPSE_COMPRESSOR_LEVELS")
    first = compressor.levels.split(",")[0]
    if compressor.chunk_size >= int(first):
        return []
    return [
        Problem(
            f"{chunk}={compressor.chunk_size} is below the first level size of {levels}={compressor.levels!r}: "
            f"expected at least {first} (the compressor skips chunks smaller than its first level).",
            chunk,
            expected=f"at least {first}",
            found=str(compressor.chunk_size),
            related=(levels,),
        )
    ]


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.normpath(path), os.path.normpath(parent)
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _backup_problems(s: Settings) -> list[Problem]:
    """SYNAPSE_BACKUP_DIR: given when backups are scheduled, and never where the backed-up data lives."""
    schedule, backup_dir = Var("SYNAPSE_BACKUP_SCHEDULE"), Var("SYNAPSE_BACKUP_DIR")
    where = s.backup.dir
    if where is None:
        if s.backup.schedule is None:
            return []
        return [
            Problem(
                f"{schedule}={s.backup.schedule!r} is set, but {backup_dir} is not: expected {backup_dir}, the "
                "directory the scheduled backups go to (an absolute path outside the data dir, ideally another "
                "disk or share).",
                backup_dir,
                expected="the directory backups go to",
                found="nothing",
                related=(schedule,),
            )
        ]
    data_dir, media_store = s.core.data_dir, s.homeserver.media_store_path or f"{s.core.data_dir}/media_store"
    media = Var("SYNAPSE_MEDIA_STORE_PATH") if s.homeserver.media_store_path else Var("SYNAPSE_DATA_DIR")
    refusals = (
        (data_dir, Var("SYNAPSE_DATA_DIR"), "the data dir", "a backup there is lost with the data it copies"),
        (media_store, media, "the media store", "each backup would also copy the ones before it"),
        (
            s.core.runtime_dir,
            Var("SYNAPSE_RUNTIME_DIR"),
            "the runtime dir",
            "it holds generated files and is often in memory (/run)",
        ),
    )
    for parent, variable, what, why in refusals:
        if _inside(where, parent):
            return [
                Problem(
                    f"{backup_dir}={where!r} is inside {what} {parent!r} ({variable}): expected a directory "
                    f"outside it ({why}).",
                    backup_dir,
                    expected=f"a directory outside {parent}",
                    found=where,
                    related=(variable,),
                )
            ]
    return []


def _database_problems(s: Settings) -> list[Problem]:
    database, password = Var("SYNAPSE_DATABASE"), Var("POSTGRES_PASSWORD")
    if s.database.database != "postgres" or s.database.password is not None:
        return []
    return [
        Problem(
            f"{database}=postgres needs {password} (the external database's password).",
            password,
            expected="the external database's password",
            found="nothing",
            related=(database,),
        )
    ]


def _nginx_buffer_problems(s: Settings) -> list[Problem]:
    nginx = s.nginx
    size, busy = Var("NGINX_PROXY_BUFFER_SIZE_BYTES"), Var("NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES")
    temp = Var("NGINX_PROXY_TEMP_FILE_WRITE_SIZE_BYTES")
    problems = []
    buffer, buffers_total = nginx.proxy_buffer_size, PROXY_BUFFER_COUNT * nginx.proxy_buffer_size
    if nginx.proxy_busy_buffers_size < buffer:
        problems.append(
            Problem(
                f"{busy}={nginx.proxy_busy_buffers_size} is below the proxy buffer size {buffer}: expected at least "
                f"{size}.",
                busy,
                expected=f"at least {buffer}",
                found=str(nginx.proxy_busy_buffers_size),
                related=(size,),
            )
        )
    if nginx.proxy_temp_file_write_size < buffer:
        problems.append(
            Problem(
                f"{temp}={nginx.proxy_temp_file_write_size} is below the proxy buffer size {buffer}: expected at "
                f"least {size} (nginx refuses less).",
                temp,
                expected=f"at least {buffer}",
                found=str(nginx.proxy_temp_file_write_size),
                related=(size,),
            )
        )
    if nginx.proxy_busy_buffers_size >= buffers_total - buffer:
        problems.append(
            Problem(
                f"{busy}={nginx.proxy_busy_buffers_size} is too large: expected below {buffers_total - buffer} "
                f"({PROXY_BUFFER_COUNT - 1} proxy buffers of {buffer} bytes).",
                busy,
                expected=f"below {buffers_total - buffer}",
                found=str(nginx.proxy_busy_buffers_size),
                related=(size,),
            )
        )
    return problems


# Unix sockets cannot cross hosts: replication, nginx's upstreams and metrics scrapes all may.
NO_UNIX_SOCKETS_ACROSS_HOSTS = (
    "SYNAPSE_PUBLIC_UNIX_SOCKETS",
    "SYNAPSE_HTTP_REPLICATION_UNIX_SOCKETS",
    "SYNAPSE_METRICS_UNIX_SOCKETS",
)
NOT_ACROSS_HOSTS_YET = (
    "SYNAPSE_ENABLE_REDIS_METRIC_EXPORT",
    "SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT",
    "SYNAPSE_ENABLE_COMPRESSOR",
    "SYNAPSE_BACKUP_SCHEDULE",
)


# What SYNAPSE_PLACEMENT may name besides workers (plan.py names them MAIN, NGINX, POSTGRES, REDIS).
PLACED_SERVICES = ("main", "nginx", "postgres", "redis")


def placement_key_problems(
    s: Settings, workers: Sequence[tuple[str, tuple[str, ...]]], *, embedded: bool, own_redis: bool
) -> list[Problem]:
    """SYNAPSE_PLACEMENT's keys against the worker list ((name, declared types) per worker) and the homeserver
    file (`embedded`: our own PostgreSQL; `own_redis`: homeserver.yaml configures Redis): what plan._placement
    needs before it decides where each process runs. With `placement_problems`, every placement check."""
    placement, worker_types = Var("SYNAPSE_PLACEMENT"), Var("SYNAPSE_WORKER_TYPES")
    given = dict(s.placement.placement)
    names = {name for name, _ in workers}
    types = {t for _, declared in workers for t in declared}
    problems = []
    for key in given:
        if key in PLACED_SERVICES or key in names or key in types:
            continue
        if key in catalog.TYPE_NAMES:
            continue  # a known type that is not deployed now: nothing to place
        known = ", ".join([*PLACED_SERVICES, *sorted(types), *(name for name, _ in workers)])
        problems.append(
            Problem(
                f"{placement}: {key!r} is neither a worker type, a worker name from {worker_types}, nor one "
                f"of main, nginx, postgres, redis: expected one of {known}.",
                placement,
                expected=f"one of {known}",
                found=key,
                related=(worker_types,),
            )
        )
    if "postgres" in given and not embedded:
        problems.append(
            Problem(
                f"{placement} places postgres, but the database is not the embedded one: expected no postgres key "
                f"(an external PostgreSQL is where {Var('POSTGRES_HOST')} or homeserver.yaml says).",
                placement,
                expected="no postgres key",
                found=f"postgres={given['postgres']}",
            )
        )
    if "redis" in given and own_redis:
        problems.append(
            Problem(
                f"{placement} places redis, but homeserver.yaml configures its own Redis: expected no redis key.",
                placement,
                expected="no redis key",
                found=f"redis={given['redis']}",
            )
        )
    for name, declared in workers:
        if name in given:
            continue
        chosen = sorted({given[t] for t in declared if t in given})
        if len(chosen) > 1:
            problems.append(
                Problem(
                    f"{placement}: the worker {name} ({'+'.join(declared)}) is placed on "
                    f"{' and '.join(chosen)} by its types: expected one host (place {name} by name).",
                    placement,
                    expected="one host per worker",
                    found=", ".join(f"{t}={given[t]}" for t in declared if t in given),
                )
            )
    return problems


def placement_problems(s: Settings) -> list[Problem]:
    """SYNAPSE_HOSTS/SYNAPSE_PLACEMENT against each other and against what cannot cross hosts. (Each pair's own
    syntax is the field's type, `_hosts`/`_placement`; which keys name workers needs the worker list and the
    homeserver file: plan.py's `_placement`.)"""
    hosts, placement = Var("SYNAPSE_HOSTS"), Var("SYNAPSE_PLACEMENT")
    if not s.placement.hosts:
        if s.placement.placement:
            return [
                Problem(
                    f"{placement} is set without {hosts}: expected {hosts} naming the hosts it uses.",
                    hosts,
                    expected=f"the hosts {placement} uses",
                    found="nothing",
                    related=(placement,),
                )
            ]
        return []
    problems = []
    names = [name for name, _ in s.placement.hosts]
    for key, host in s.placement.placement:
        if host not in names:
            problems.append(
                Problem(
                    f"{placement} places {key!r} on {host!r}, which is not in {hosts}: expected one of "
                    + ", ".join(names)
                    + ".",
                    placement,
                    expected="one of " + ", ".join(names),
                    found=host,
                    related=(hosts,),
                )
            )
    for name in NO_UNIX_SOCKETS_ACROSS_HOSTS + NOT_ACROSS_HOSTS_YET:
        variable = Var(name)
        if not s.value(name):
            continue
        if name in NOT_ACROSS_HOSTS_YET:
            message = f"{variable} is not supported with {hosts} yet: expected it unset."
        else:
            message = (
                f"{variable} is on, but {hosts} spreads the deployment over several hosts and unix sockets "
                f"cannot cross hosts: expected {variable} unset (TCP on each host's address)."
            )
        found = "on" if s.value(name) is True else repr(s.value(name))
        problems.append(Problem(message, variable, expected="unset", found=found, related=(hosts,)))
    return problems
