"""Environment → typed, validated Settings.

Every recognised variable that is set is validated, whether this run uses it or not. Each field's alias is
the environment variable's name; error messages name the variable, the value and what is accepted.
Pure: takes a mapping, never reads os.environ itself.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError

from .errors import UserError

TRUTHY = ("yes", "y", "true", "t", "1", "on")
FALSY = ("no", "n", "false", "f", "0", "off", "")
BOOL_HELP = "one of yes, y, true, t, 1, on (on) or no, n, false, f, 0, off, empty (off)"


def _passthrough(parse):
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


def _int(low: int, high: int | None = None):
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


def _choice(*choices: str, upper: bool = False):
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


def _workers_processes(value: Any) -> str:
    text = str(value).strip().lower()
    if text == "auto" or re.fullmatch(r"[1-9][0-9]{0,3}", text):
        return text
    raise ValueError("'auto' or a number of processes from 1 to 9999")


Bool = Annotated[bool, BeforeValidator(_passthrough(_bool))]
OnOff = Annotated[str, BeforeValidator(_passthrough(_on_off))]
AbsPath = Annotated[str, BeforeValidator(_passthrough(_abs_path))]
Port = Annotated[int, _int(1, 65535)]
Bytes = Annotated[int, _int(512, 1 << 30)]
Secret = SecretStr


def var(name: str, default: Any = None) -> Any:
    return Field(default, alias=name)


class Settings(BaseModel):
    """Everything the environment can say. Field aliases are the variable names."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True, validate_default=True)

    # Identity and generation of homeserver.yaml
    server_name: Annotated[str | None, BeforeValidator(_passthrough(_server_name))] = var("SYNAPSE_SERVER_NAME")
    report_stats: Annotated[bool | None, BeforeValidator(_passthrough(_yes_no))] = var("SYNAPSE_REPORT_STATS")
    config_dir: AbsPath = var("SYNAPSE_CONFIG_DIR", "/data")
    data_dir: AbsPath = var("SYNAPSE_DATA_DIR", "/data")
    config_path: AbsPath | None = var("SYNAPSE_CONFIG_PATH")
    media_store_path: AbsPath | None = var("SYNAPSE_MEDIA_STORE_PATH")
    no_tls: Bool = var("SYNAPSE_NO_TLS", True)  # accepted for compatibility; TLS is nginx's job
    event_cache_size: Annotated[str, BeforeValidator(_passthrough(_cache_size))] = var("SYNAPSE_EVENT_CACHE_SIZE", "10K")
    max_upload_size: Annotated[int, BeforeValidator(parse_size)] = var("SYNAPSE_MAX_UPLOAD_SIZE", "50M")
    turn_uris: Annotated[tuple[str, ...], BeforeValidator(_passthrough(_turn_uris))] = var("SYNAPSE_TURN_URIS", ())
    turn_secret: Secret | None = var("SYNAPSE_TURN_SECRET")
    enable_registration: Bool = var("SYNAPSE_ENABLE_REGISTRATION", False)
    allow_guest: Bool = var("SYNAPSE_ALLOW_GUEST", False)
    registration_shared_secret: Secret | None = var("SYNAPSE_REGISTRATION_SHARED_SECRET")
    macaroon_secret_key: Secret | None = var("SYNAPSE_MACAROON_SECRET_KEY")
    form_secret: Secret | None = var("SYNAPSE_FORM_SECRET")
    as_registration_dir: AbsPath | None = var("SYNAPSE_AS_REGISTRATION_DIR")
    appservices: Annotated[tuple[str, ...], BeforeValidator(_passthrough(_path_list))] = var("SYNAPSE_APPSERVICES", ())
    log_config: AbsPath | None = var("SYNAPSE_LOG_CONFIG")
    serve_server_wellknown: Bool = var("SYNAPSE_SERVE_SERVER_WELLKNOWN", False)
    public_baseurl: Annotated[str | None, BeforeValidator(_passthrough(_base_url))] = var("SYNAPSE_PUBLIC_BASEURL")
    url_preview_enabled: Bool = var("SYNAPSE_URL_PREVIEW_ENABLED", False)
    uid: Annotated[int, _int(0, 2**31 - 1)] = var("UID", 991)
    gid: Annotated[int, _int(0, 2**31 - 1)] = var("GID", 991)

    # Database
    database: Annotated[
        Literal["embedded", "postgres", "sqlite"] | None, _choice("embedded", "postgres", "sqlite")
    ] = var("SYNAPSE_DATABASE")
    postgres_host: str = var("POSTGRES_HOST", "db")
    postgres_port: Port = var("POSTGRES_PORT", 5432)
    postgres_db: str = var("POSTGRES_DB", "synapse")
    postgres_user: str = var("POSTGRES_USER", "synapse")
    postgres_password: Secret | None = var("POSTGRES_PASSWORD")

    # Workers and transport
    worker_types: str = var("SYNAPSE_WORKER_TYPES", "")
    public_unix_sockets: Bool = var("SYNAPSE_PUBLIC_UNIX_SOCKETS", False)
    replication_unix_sockets: Bool = var("SYNAPSE_HTTP_REPLICATION_UNIX_SOCKETS", False)
    runtime_dir: AbsPath = var("SYNAPSE_RUNTIME_DIR", "/run/synapse-workers")
    internal_port_base: Annotated[int, _int(1024, 64535)] = var("SYNAPSE_INTERNAL_PORT_BASE", 18000)
    http_port: Port | None = var("SYNAPSE_HTTP_PORT")
    http_bind_address: Annotated[str, BeforeValidator(_passthrough(_ip))] = var("SYNAPSE_HTTP_BIND_ADDRESS", "0.0.0.0")
    tls_cert: AbsPath | None = var("SYNAPSE_TLS_CERT")
    tls_key: AbsPath | None = var("SYNAPSE_TLS_KEY")
    tls_port: Port = var("SYNAPSE_TLS_PORT", 8448)

    # Logging
    log_level: Annotated[str, _choice("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", upper=True)] = var(
        "SYNAPSE_LOG_LEVEL", "INFO"
    )
    log_sensitive: Bool = var("SYNAPSE_LOG_SENSITIVE", False)
    write_logs_to_disk: Bool = var("SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK", False)

    # Metrics and add-ons
    metrics: Bool = var("SYNAPSE_METRICS", False)
    metrics_unix_sockets: Bool = var("SYNAPSE_METRICS_UNIX_SOCKETS", False)
    redis_metric_export: Bool = var("SYNAPSE_ENABLE_REDIS_METRIC_EXPORT", False)
    postgres_metric_export: Bool = var("SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT", False)
    prometheus_scrape_interval: Annotated[str, BeforeValidator(_passthrough(_prom_duration))] = var(
        "PROMETHEUS_SCRAPE_INTERVAL", "15s"
    )
    prometheus_retention: Annotated[str, BeforeValidator(_passthrough(_prom_duration))] = var(
        "PROMETHEUS_STORAGE_RETENTION_TIME", "1y"
    )
    enable_compressor: Bool = var("SYNAPSE_ENABLE_COMPRESSOR", False)
    enable_coturn: Bool = var("SYNAPSE_ENABLE_BUILTIN_COTURN", False)
    coturn_min_port: Port = var("COTURN_MIN_PORT", 49153)
    coturn_max_port: Port = var("COTURN_MAX_PORT", 49173)
    coturn_metrics: Bool = var("COTURN_METRICS", False)
    coturn_external_ip: Annotated[str | None, BeforeValidator(_passthrough(_ip))] = var("COTURN_EXTERNAL_IP")
    coturn_internal_ip: Annotated[str | None, BeforeValidator(_passthrough(_ip))] = var("COTURN_INTERNAL_IP")

    # nginx
    nginx_listen_unix_socket: AbsPath | None = var("NGINX_LISTEN_UNIX_SOCKET")
    nginx_worker_processes: Annotated[str, BeforeValidator(_passthrough(_workers_processes))] = var(
        "NGINX_WORKER_PROCESSES", "auto"
    )
    nginx_worker_connections: Annotated[int, _int(16, 1 << 20)] = var("NGINX_WORKER_CONNECTIONS", 2048)
    nginx_page_size: Bytes = var("NGINX_GENERAL_PAGE_SIZE_BYTES", 4096)
    nginx_gzip_comp_level: Annotated[int, _int(1, 9)] = var("NGINX_GZIP_COMP_LEVEL", 1)
    nginx_gzip_http_version: Annotated[str, _choice("1.0", "1.1")] = var("NGINX_GZIP_HTTP_VERSION", "1.1")
    nginx_gzip_min_length: Annotated[int, _int(0, 1 << 30)] = var("NGINX_GZIP_MIN_LENGTH", 200)
    nginx_client_keepalive_enable: Bool = var("NGINX_CLIENT_KEEPALIVE_ENABLE", True)
    nginx_client_keepalive_timeout: Annotated[int, _int(0, 86400)] = var(
        "NGINX_CLIENT_KEEPALIVE_TIMEOUT_SECONDS", 60
    )
    nginx_upstream_keepalive_enable: Bool = var("NGINX_UPSTREAM_KEEPALIVE_ENABLE", True)
    nginx_upstream_keepalive_timeout: Annotated[int, _int(1, 86400)] = var(
        "NGINX_UPSTREAM_KEEPALIVE_TIMEOUT_SECONDS", 60
    )
    nginx_upstream_keepalive_multiplier: Annotated[int, _int(1, 1000)] = var(
        "NGINX_UPSTREAM_KEEPALIVE_CONNECTION_MULTIPLIER", 1
    )
    nginx_max_fails: Annotated[int, _int(0, 1000)] = var("NGINX_UPSTREAM_SERVER_MAX_FAILS", 1)
    nginx_fail_timeout: Annotated[int, _int(1, 86400)] = var("NGINX_UPSTREAM_SERVER_FAIL_TIMEOUT", 10)
    nginx_proxy_buffering: OnOff = var("NGINX_PROXY_BUFFERING", "on")
    nginx_proxy_request_buffering: OnOff = var("NGINX_PROXY_REQUEST_BUFFERING", "on")
    nginx_proxy_buffer_size: Bytes | None = var("NGINX_PROXY_BUFFER_SIZE_BYTES")
    nginx_buffering_disabled_multiplier: Annotated[int, _int(1, 1024)] = var(
        "NGINX_PROXY_BUFFERING_DISABLED_PAGE_MULTIPLIER", 1
    )
    nginx_proxy_busy_buffers_size: Bytes | None = var("NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES")
    nginx_proxy_temp_file_write_size: Bytes | None = var("NGINX_PROXY_TEMP_FILE_WRITE_SIZE_BYTES")
    nginx_client_body_buffer_size: Bytes | None = var("NGINX_CLIENT_BODY_BUFFER_SIZE_BYTES")
    nginx_proxy_read_timeout: Annotated[str, BeforeValidator(_passthrough(_nginx_time))] = var("NGINX_PROXY_READ_TIMEOUT", "60s")
    nginx_disable_logrotate: Bool = var("NGINX_DISABLE_LOGROTATE", False)

    # ---- derived values (no I/O) ----
    @property
    def homeserver_config_path(self) -> str:
        return self.config_path or f"{self.config_dir}/homeserver.yaml"

    @property
    def proxy_buffer_size(self) -> int:
        if self.nginx_proxy_buffer_size:
            return self.nginx_proxy_buffer_size
        if self.nginx_proxy_buffering == "off":
            return self.nginx_page_size * self.nginx_buffering_disabled_multiplier
        return self.nginx_page_size

    @property
    def proxy_busy_buffers_size(self) -> int:
        # nginx needs busy >= proxy_buffer_size; the seed's plain 2×page breaks with a large multiplier.
        return self.nginx_proxy_busy_buffers_size or max(2 * self.nginx_page_size, self.proxy_buffer_size)

    @property
    def proxy_temp_file_write_size(self) -> int:
        return self.nginx_proxy_temp_file_write_size or max(2 * self.nginx_page_size, self.proxy_buffer_size)

    @property
    def client_body_buffer_size(self) -> int:
        return self.nginx_client_body_buffer_size or 1024 * self.nginx_page_size

    @property
    def client_keepalive_timeout(self) -> int:
        return self.nginx_client_keepalive_timeout if self.nginx_client_keepalive_enable else 0

    @property
    def database_kind(self) -> str:
        """What a generated homeserver.yaml uses: external postgres when a password is given."""
        if self.database:
            return self.database
        return "postgres" if self.postgres_password is not None else "embedded"


ENV_NAMES = tuple(f.alias for f in Settings.model_fields.values() if f.alias)
BOOL_NAMES = frozenset(
    f.alias for f in Settings.model_fields.values() if f.alias and f.annotation is bool
)
PROXY_BUFFER_COUNT = 8


def load_settings(env: Mapping[str, str]) -> Settings:
    """Validate every recognised variable; raise UserError listing all problems at once."""
    given: dict[str, str] = {}
    for name in ENV_NAMES:
        if name not in env:
            continue
        # Empty means "unset" except for switches, where empty is documented as off.
        if env[name].strip() == "" and name not in BOOL_NAMES:
            continue
        given[name] = env[name]
    try:
        settings = Settings.model_validate(given)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "environment"
            expected = str(err.get("ctx", {}).get("error", err["msg"])).removeprefix("Value error, ")
            if err["type"] == "literal_error":
                expected = err["msg"]
            problems.append(f"{name}={_shown(name, env.get(name, ''))} is invalid: expected {expected}.")
        raise UserError(*problems) from None
    _check_combinations(settings)
    return settings


def _shown(name: str, value: str) -> str:
    if any(word in name for word in ("PASSWORD", "SECRET", "KEY")) and "TLS" not in name:
        return "<hidden>"
    return repr(value)


def _check_combinations(s: Settings) -> None:
    problems = []
    if (s.tls_cert is None) != (s.tls_key is None):
        problems.append("SYNAPSE_TLS_CERT and SYNAPSE_TLS_KEY must be set together (TLS on the 8448 port).")
    if s.coturn_min_port > s.coturn_max_port:
        problems.append(
            f"COTURN_MIN_PORT={s.coturn_min_port} is above COTURN_MAX_PORT={s.coturn_max_port}: "
            "expected a range with min <= max."
        )
    if s.database == "postgres" and s.postgres_password is None:
        problems.append("SYNAPSE_DATABASE=postgres needs POSTGRES_PASSWORD (the external database's password).")
    buffers_total = PROXY_BUFFER_COUNT * s.proxy_buffer_size
    if s.proxy_busy_buffers_size < s.proxy_buffer_size:
        problems.append(
            f"NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES={s.proxy_busy_buffers_size} is below the proxy buffer size "
            f"{s.proxy_buffer_size}: expected at least NGINX_PROXY_BUFFER_SIZE_BYTES."
        )
    if s.proxy_temp_file_write_size < s.proxy_buffer_size:
        problems.append(
            f"NGINX_PROXY_TEMP_FILE_WRITE_SIZE_BYTES={s.proxy_temp_file_write_size} is below the proxy buffer size "
            f"{s.proxy_buffer_size}: expected at least NGINX_PROXY_BUFFER_SIZE_BYTES (nginx refuses less)."
        )
    if s.proxy_busy_buffers_size >= buffers_total - s.proxy_buffer_size:
        problems.append(
            f"NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES={s.proxy_busy_buffers_size} is too large: expected below "
            f"{buffers_total - s.proxy_buffer_size} ({PROXY_BUFFER_COUNT - 1} proxy buffers of "
            f"{s.proxy_buffer_size} bytes)."
        )
    if problems:
        raise UserError(*problems)
