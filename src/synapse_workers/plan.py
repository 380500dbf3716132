"""Settings + declared workers + homeserver.yaml facts → the deployment Plan. Pure: no I/O.

The plan is the single source every renderer reads: processes with their listeners and duties, the
shared Synapse wiring (instance_map, stream_writers, duties), nginx upstreams and routes, and file paths.
It says nothing about how processes are started, so other targets (compose, Kubernetes) can render it too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import catalog
from .errors import Argument, Problem, Subject, UserError, Variable, YamlPath
from .homeserver import SYNAPSE_DEFAULT_BIND_ADDRESSES, HomeserverInfo
from .layout import Layout, SecretPaths, make_layout, secret_paths
from .settings import DEFAULT_HTTP_PORT, PLACED_SERVICES, Settings, placement_key_problems
from .workers import Worker

MAIN = "main"
MAIN_APP = "synapse.app.homeserver"
WORKER_APP = "synapse.app.generic_worker"
LOOPBACK = "127.0.0.1"

# The variables plan.py's problems and warnings name (as their subject, or related).
HTTP_PORT, TLS_PORT = Variable("SYNAPSE_HTTP_PORT"), Variable("SYNAPSE_TLS_PORT")
HTTP_BIND = Variable("SYNAPSE_HTTP_BIND_ADDRESS")
INTERNAL_PORT_BASE = Variable("SYNAPSE_INTERNAL_PORT_BASE")
COTURN_PORT = Variable("COTURN_PORT")
COTURN_MIN_PORT, COTURN_MAX_PORT = Variable("COTURN_MIN_PORT"), Variable("COTURN_MAX_PORT")
PROMETHEUS_PORT, METRICS_ON = Variable("PROMETHEUS_PORT"), Variable("SYNAPSE_METRICS")
CONFIG_PATH, HOSTS = Variable("SYNAPSE_CONFIG_PATH"), Variable("SYNAPSE_HOSTS")
COMPRESSOR, RUNTIME_DIR = Variable("SYNAPSE_ENABLE_COMPRESSOR"), Variable("SYNAPSE_RUNTIME_DIR")
OUTER_SOCKET = Variable("NGINX_LISTEN_UNIX_SOCKET")

PUBLIC, REPLICATION, HEALTH, METRICS = "public", "replication", "health", "metrics"
TURN = "turn"  # a TURN/STUN listener (coturn's)
# Ports from SYNAPSE_INTERNAL_PORT_BASE: main takes base+0..4, workers count up from base+WORKER_OFFSET.
MAIN_PORT_OFFSETS = {PUBLIC: 0, REPLICATION: 1, HEALTH: 2, METRICS: 3, "aggregate": 4}
# base+5..9 are the add-ons' loopback endpoints (one fixed port each, so scrape configs are stable).
ADDON_PORT_OFFSETS = {
    "metrics_proxy": 5,
    "nginx_exporter": 6,
    "redis_exporter": 7,
    "postgres_exporter": 8,
    "coturn_metrics": 9,
}
WORKER_OFFSET = 10
COTURN = "coturn"
PROMETHEUS = "prometheus"
NGINX_EXPORTER = "nginx_exporter"
REDIS_EXPORTER = "redis_exporter"
POSTGRES_EXPORTER = "postgres_exporter"
HTTP = "http"  # an add-on's own HTTP listener (Prometheus's web UI and API)
# Several hosts (SYNAPSE_HOSTS): what can be placed besides Synapse processes, and the ports PostgreSQL and
# Redis listen on at their host's address (their usual ones: each host has its own port space).
NGINX, POSTGRES, REDIS = "nginx", "postgres", "redis"
SERVICES_PLACED = PLACED_SERVICES  # settings.placement_key_problems checks SYNAPSE_PLACEMENT's keys against it
POSTGRES_PORT, REDIS_PORT = 5432, 6379


@dataclass(frozen=True)
class Listener:
    kind: str  # public | replication | health | metrics
    resources: tuple[str, ...]
    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def address(self) -> str:
        """nginx/httpx style address."""
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"

    def as_json(self) -> dict[str, Any]:
        where = {"path": self.path} if self.path else {"host": self.host, "port": self.port}
        return {"kind": self.kind, "resources": list(self.resources), **where}


@dataclass(frozen=True)
class Process:
    name: str
    app: str
    types: tuple[str, ...]
    roles: tuple[str, ...]
    listeners: tuple[Listener, ...]
    config_files: tuple[str, ...]
    log_config: str
    streams: tuple[str, ...] = ()
    duties: tuple[str, ...] = ()

    def listener(self, kind: str) -> Listener | None:
        return next((lst for lst in self.listeners if lst.kind == kind), None)

    @property
    def is_main(self) -> bool:
        return self.name == MAIN

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name}
        if not self.is_main:
            data["types"] = list(self.types)
            data["roles"] = list(self.roles)
        data.update(
            app=self.app,
            listeners=[lst.as_json() for lst in self.listeners],
            config_files=list(self.config_files),
            log_config=self.log_config,
            streams=list(self.streams),
            duties=list(self.duties),
        )
        return data


@dataclass(frozen=True)
class Upstream:
    name: str
    role: str | None  # None: main
    balance: str | None
    servers: tuple[str, ...]  # process names


# A route's `when_down` when only the missing process can answer: nginx fails fast (503, Retry-After).
UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class QueryTarget:
    """Requests of a route in the class `query` go to `upstream` (before the route's method targets)."""

    query: catalog.Query
    upstream: str
    when_down: str | None  # as Route.when_down, for this upstream


@dataclass(frozen=True)
class Route:
    rule: catalog.Rule
    # (methods or None for "any other"), upstream name; evaluated in order, the None entry last.
    targets: tuple[tuple[frozenset[str] | None, str], ...]
    # While a worker upstream of the route is down (nginx itself answers 502/504): MAIN stands in (the rule is
    # not HARD and main still serves the roles' endpoints), another upstream stands in (its role is the
    # `stand_in` of the route's role: that one first, then main), UNAVAILABLE, or None (every target is main).
    when_down: str | None = None
    queries: tuple[QueryTarget, ...] = ()

    def upstream_for(self, method: str) -> str:
        for methods, upstream in self.targets:
            if methods is None or method.upper() in methods:
                return upstream
        return MAIN

    @property
    def upstreams(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(u for _, u in self.targets))


@dataclass(frozen=True)
class Public:
    bind_address: str
    port: int
    unix_socket: str | None
    tls_port: int | None
    tls_cert: str | None
    tls_key: str | None
    max_body_size: int
    # Whose X-Forwarded-For nginx believes (SYNAPSE_TRUSTED_PROXIES: networks, `unix:`); not in `as_json`.
    trusted_proxies: tuple[str, ...] = ()

    @property
    def local_url(self) -> str:
        """How a process on this host reaches nginx's public listener."""
        host = local_host(self.bind_address)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def as_json(self) -> dict[str, Any]:
        return {
            "bind_address": self.bind_address,
            "port": self.port,
            "unix_socket": self.unix_socket,
            "tls_port": self.tls_port,
            "max_body_size": self.max_body_size,
        }


WILDCARDS = ("0.0.0.0", "::")


@dataclass(frozen=True)
class ExtraListener:
    """An http listener of the user's homeserver.yaml besides the one that became the public port: nginx serves
    it on its own port and addresses with the resources it names (catalog.LISTENER_RESOURCES), through the same
    routes as the public port; what Synapse would not answer there is refused as Synapse refuses it."""

    source: str  # its YAML path, listeners[i]
    port: int
    # Where nginx listens: the listener's addresses (Synapse's default ['::', '0.0.0.0'] when it names none).
    # `::` is both families (nginx `[::]:port ipv6only=off`, as Synapse's `::` on Linux), so 0.0.0.0 beside it
    # is dropped, as Synapse ignores its failing bind then.
    bind_addresses: tuple[str, ...]
    resources: tuple[str, ...]  # the names it lists (internal ones, metrics and replication, left out)
    tls_cert: str | None = None  # tls: true: the file's tls_certificate_path / tls_private_key_path
    tls_key: str | None = None

    @property
    def served_prefixes(self) -> tuple[str, ...]:
        """The URL prefixes Synapse mounts for these resource names (no duplicates, none inside another)."""
        prefixes = sorted({p for name in self.resources for p in catalog.LISTENER_RESOURCES.get(name, ())})
        return tuple(p for p in prefixes if not any(p != q and p.startswith(q + "/") for q in prefixes))

    @property
    def unrecognized_prefixes(self) -> tuple[str, ...]:
        """The parents of served prefixes (`/_matrix`, `/_synapse`, ...) not themselves served: Synapse answers
        everything under them that is not mounted with 404 M_UNRECOGNIZED."""
        served = self.served_prefixes
        parents = set()
        for prefix in served:
            parts = prefix.split("/")[1:-1]
            for n in range(1, len(parts) + 1):
                parents.add("/" + "/".join(parts[:n]))
        return tuple(sorted(p for p in parents if not any(p == q or p.startswith(q + "/") for q in served)))

    @property
    def root_redirect(self) -> bool:
        return any(name in catalog.ROOT_REDIRECT_RESOURCES for name in self.resources)

    def serves(self, path: str) -> bool:
        """Does Synapse answer `path` (normalised) on this listener with something it mounted?"""
        if path == "/health" or (path == "/" and self.root_redirect):
            return True
        return any(path == p or path.startswith(p) for p in self.served_prefixes)

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "port": self.port,
            "bind_addresses": list(self.bind_addresses),
            "resources": list(self.resources),
            "tls": self.tls_cert is not None,
            "prefixes": list(self.served_prefixes),
        }


@dataclass(frozen=True)
class Service:
    """An add-on program the stack runs beside Synapse (coturn; Prometheus and exporters later): where it
    listens. The first listener is its main one; a METRICS listener is an endpoint for Prometheus to scrape."""

    name: str
    listeners: tuple[Listener, ...]
    protocols: tuple[str, ...] = ("tcp",)  # of the main listener
    relay_ports: tuple[int, int] | None = None  # coturn: the UDP range it relays on (first, last)

    @property
    def main(self) -> Listener:
        return self.listeners[0]

    def listener(self, kind: str) -> Listener | None:
        return next((lst for lst in self.listeners if lst.kind == kind), None)

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "host": self.main.host,
            "port": self.main.port,
            "protocols": list(self.protocols),
            "listeners": [lst.as_json() for lst in self.listeners],
        }
        if self.relay_ports:
            data["relay_ports"] = {"min": self.relay_ports[0], "max": self.relay_ports[1], "protocol": "udp"}
        return data


# Scheduled jobs (run by the `scheduler` program, or now by `synapse-workers <name>`).
COMPRESS_STATE = "compress-state"  # synapse_auto_compressor (SYNAPSE_ENABLE_COMPRESSOR)
ROTATE_LOGS = "rotate-logs"  # logrotate on the log files nginx writes itself
ROTATE_LOGS_SCHEDULE = "0 0 * * *"  # daily at midnight, when Synapse's own log files roll over too
BACKUP = "backup"  # `synapse-workers backup -o SYNAPSE_BACKUP_DIR --keep SYNAPSE_BACKUP_KEEP` (SYNAPSE_BACKUP_SCHEDULE)


@dataclass(frozen=True)
class Job:
    """Something the stack runs on a schedule: a name (also what it runs) and a 5-field cron expression."""

    name: str
    schedule: str

    def as_json(self) -> dict[str, Any]:
        return {"schedule": self.schedule}


@dataclass(frozen=True)
class Redis:
    external: bool  # configured in homeserver.yaml by the user: we neither start nor configure it
    path: str | None
    # Several hosts: TCP on its host's address, with a password (requirepass; Synapse's redis.password_path).
    host: str | None = None
    port: int | None = None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"external": self.external, "path": self.path}
        if self.host is not None:
            data.update(host=self.host, port=self.port)
        return data


@dataclass(frozen=True)
class EmbeddedPostgres:
    data_dir: str  # PGDATA, under the data dir
    socket_dir: str  # one host: no TCP, Synapse connects over this unix socket directory
    max_connections: int
    # Several hosts: also TCP on its host's address, password auth from the deployment's hosts only.
    host: str | None = None
    port: int | None = None
    clients: tuple[str, ...] = ()  # the deployment's host addresses (pg_hba `host` lines)

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "data_dir": self.data_dir,
            "socket_dir": self.socket_dir,
            "max_connections": self.max_connections,
        }
        if self.host is not None:
            data.update(host=self.host, port=self.port, clients=list(self.clients))
        return data


@dataclass(frozen=True)
class Placement:
    """Several hosts (SYNAPSE_HOSTS): the hosts, where each process and service runs, and which host's slice
    this plan renders (`here`; None: the whole deployment, as `plan` shows it)."""

    hosts: dict[str, str]  # name → address, in SYNAPSE_HOSTS order
    where: dict[str, str]  # process name, nginx, postgres, redis → host name
    here: str | None

    def address(self, name: str) -> str:
        """The address of the host `name` (a process or service) runs on."""
        return self.hosts[self.where[name]]

    def local(self, name: str) -> bool:
        return self.here is None or self.where.get(name) == self.here

    def as_json(self) -> dict[str, Any]:
        return {"hosts": dict(self.hosts), "this_host": self.here, "where": dict(self.where)}


@dataclass(frozen=True)
class Plan:
    settings: Settings
    homeserver: HomeserverInfo
    secrets: SecretPaths
    public: Public
    main: Process
    workers: tuple[Process, ...]
    redis: Redis | None
    instance_map: dict[str, Listener]
    stream_writers: dict[str, tuple[str, ...]]
    duties: dict[str, Any]
    upstreams: tuple[Upstream, ...]
    routes: tuple[Route, ...]
    layout: Layout
    app_service_config_files: tuple[str, ...] = ()
    postgres: EmbeddedPostgres | None = None
    health_port: int = 0  # the launcher's aggregated /health (what nginx answers on /health)
    services: tuple[Service, ...] = ()  # add-ons beside Synapse (the built-in coturn)
    # nginx's loopback-only metrics server (base+5, SYNAPSE_METRICS): its stub_status, and the unix-socket
    # metrics listeners (SYNAPSE_METRICS_UNIX_SOCKETS) as /metrics/<process>.
    metrics_proxy_port: int | None = None
    # What Synapse hands to clients (SYNAPSE_TURN_URIS, or the built-in coturn's); empty: no TURN settings at all.
    turn_uris: tuple[str, ...] = ()
    jobs: tuple[Job, ...] = ()  # scheduled maintenance (the `scheduler` program runs when there is one)
    placement: Placement | None = None  # several hosts (SYNAPSE_HOSTS); None: everything here
    # The user's other http listeners, served by nginx on their own ports (homeserver.yaml `listeners`).
    extra_listeners: tuple[ExtraListener, ...] = ()
    # One line each, printed by generate, check and run: listeners of the user's file that are not served.
    warnings: tuple[Problem, ...] = ()
    # Requests nginx lets each pool hold in flight (main, and each role some route sends requests to), past which
    # it answers 429: NGINX_POOL_LIMITS, else the catalogue's defaults.
    pool_limits: dict[str, int] = field(default_factory=dict)
    # Derived once here, never again by a renderer or the launcher (none of them is in `as_json`):
    # the generated homeserver.yaml's media_store_path (SYNAPSE_MEDIA_STORE_PATH, or <data dir>/media_store);
    # an existing homeserver.yaml's own is `homeserver.media_store_path`.
    media_store: str = ""
    # Where Synapse and nginx also write their logs (SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK); None: stdout only.
    disk_logs: str | None = None

    @property
    def synapse_metrics(self) -> bool:
        """Do the Synapse processes serve metrics (SYNAPSE_METRICS: each has a METRICS listener)?"""
        return self.main.listener(METRICS) is not None

    def local(self, name: str) -> bool:
        """Does `name` (a Synapse process, nginx, postgres or redis) run on the host this plan is rendered for?"""
        return self.placement is None or self.placement.local(name)

    @property
    def local_processes(self) -> tuple[Process, ...]:
        return tuple(p for p in self.processes if self.local(p.name))

    @property
    def multi_host(self) -> bool:
        return self.placement is not None

    @property
    def processes(self) -> tuple[Process, ...]:
        return (self.main, *self.workers)

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def upstream(self, name: str) -> Upstream:
        return next(u for u in self.upstreams if u.name == name)

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)

    def as_json(self) -> dict[str, Any]:
        data = self._as_json()
        if self.placement is not None:
            data["placement"] = self.placement.as_json()
            for proc in (data["main"], *data["workers"]):
                proc["host"] = self.placement.where[proc["name"]]
        return data

    def _as_json(self) -> dict[str, Any]:
        return {
            "synapse_version": catalog.SYNAPSE_VERSION,
            "server_name": self.homeserver.server_name,
            "homeserver_yaml": {"path": self.homeserver.path, "exists": self.homeserver.exists},
            "public": self.public.as_json(),
            "extra_listeners": [x.as_json() for x in self.extra_listeners],
            "main": self.main.as_json(),
            "workers": [w.as_json() for w in self.workers],
            "redis": None if self.redis is None else self.redis.as_json(),
            "postgres": None if self.postgres is None else self.postgres.as_json(),
            # homeserver.yaml says sqlite3 and its database was ported into the embedded cluster (port-sqlite)
            "sqlite_port": None if self.homeserver.sqlite_port is None else self.homeserver.sqlite_port.as_json(),
            "health_port": self.health_port,
            "metrics_proxy_port": self.metrics_proxy_port,
            "services": {s.name: s.as_json() for s in self.services},
            "turn_uris": list(self.turn_uris),
            "jobs": {j.name: j.as_json() for j in self.jobs},
            "instance_map": {k: v.as_json() for k, v in self.instance_map.items()},
            "stream_writers": {k: list(v) for k, v in self.stream_writers.items()},
            "duties": self.duties,
            "upstreams": [
                {"name": u.name, "role": u.role, "balance": u.balance, "servers": list(u.servers)}
                for u in self.upstreams
            ],
            "pool_limits": self.pool_limits,
            "routes": [
                {
                    "id": r.rule.id,
                    "pattern": r.rule.pattern,
                    "targets": [{"methods": sorted(m) if m else None, "upstream": u} for m, u in r.targets],
                    "when_down": r.when_down,
                    **(
                        {
                            "queries": [
                                {
                                    "query": q.query.name,
                                    "why": q.query.why,
                                    "upstream": q.upstream,
                                    "when_down": q.when_down,
                                }
                                for q in r.queries
                            ]
                        }
                        if r.queries
                        else {}
                    ),
                }
                for r in self.routes
            ],
            "files": {
                **self.layout.as_json(),
                **{f"synapse:{p.name}": p.config_files[-1] for p in self.processes},
            },
        }


# ------------------------------------------------------------------------------------------------------


def make_plan(
    settings: Settings,
    homeserver: HomeserverInfo,
    workers: tuple[Worker, ...],
    app_service_files: tuple[str, ...] = (),
    host: str | None = None,
) -> Plan:
    """host: with SYNAPSE_HOSTS, the host whose slice is rendered (None: the whole deployment)."""
    layout = make_layout(settings.core.runtime_dir, settings.core.data_dir)
    has_workers = bool(workers)
    ports = _PortAllocator(settings.listen.internal_port_base)
    embedded = _embedded_postgres(settings, homeserver, layout, len(workers)) is not None
    placement = _placement(settings, homeserver, workers, host, embedded)

    def bind(name: str) -> str:
        return placement.address(name) if placement else LOOPBACK

    main = _main_process(settings, layout, has_workers, ports, bind(MAIN))
    health_port = ports.main("aggregate")
    metrics_proxy_port = ports.addon("metrics_proxy") if settings.metrics.enabled else None
    worker_procs = tuple(_worker_process(settings, layout, w, ports, bind(w.name)) for w in workers)
    addons = (_coturn(settings, ports), _prometheus(settings), _nginx_exporter(settings, ports))
    services = tuple(s for s in addons if s is not None)
    public = _public(settings, homeserver)
    extra_listeners, warnings = _extra_listeners(settings, homeserver)

    stream_writers = _stream_writers(worker_procs)
    writer_names = {n for names in stream_writers.values() for n in names}
    instance_map: dict[str, Listener] = {}
    if has_workers:
        instance_map[MAIN] = _listener(main, REPLICATION)
        for proc in worker_procs:
            if proc.name in writer_names:
                instance_map[proc.name] = _listener(proc, REPLICATION)
    # Synapse calls main "master" inside stream_writers.
    stream_writers = {s: tuple("master" if n == MAIN else n for n in names) for s, names in stream_writers.items()}

    redis = None
    if has_workers and placement is not None and not homeserver.has_redis:
        redis = Redis(external=False, path=None, host=placement.address(REDIS), port=REDIS_PORT)
    elif has_workers:
        redis = Redis(external=homeserver.has_redis, path=None if homeserver.has_redis else layout.redis_socket)
    if settings.metrics.enabled and settings.metrics.redis_export and redis is not None and not redis.external:
        listener = Listener(METRICS, ("metrics",), host=LOOPBACK, port=ports.addon(REDIS_EXPORTER))
        services = (*services, Service(REDIS_EXPORTER, (listener,)))
    postgres = _embedded_postgres(settings, homeserver, layout, len(workers))
    if postgres is not None and placement is not None:
        clients = tuple(placement.hosts.values())
        postgres = replace(postgres, host=placement.address(POSTGRES), port=POSTGRES_PORT, clients=clients)
    # The embedded cluster, or an external one given by POSTGRES_* (its password known: POSTGRES_PASSWORD).
    external_postgres = postgres is None and settings.database.password is not None
    if settings.metrics.enabled and settings.metrics.postgres_export and (postgres is not None or external_postgres):
        listener = Listener(METRICS, ("metrics",), host=LOOPBACK, port=ports.addon(POSTGRES_EXPORTER))
        services = (*services, Service(POSTGRES_EXPORTER, (listener,)))

    # Every port is allocated now (the exporters' last): one check sees them all.
    _check_ports(settings, homeserver, public, ports, (main, *worker_procs), services, extra_listeners)
    _check_socket_paths(settings, layout, (main, *worker_procs))
    upstreams, routes = _routing(main, worker_procs)
    given = dict(settings.nginx.pool_limits)
    pools = dict.fromkeys(u.role or catalog.MAIN_POOL for u in upstreams)
    pool_limits = {
        pool: given.get(
            pool,
            catalog.main_pool_limit(pools) if pool == catalog.MAIN_POOL else catalog.ROLES[pool].pool_limit,
        )
        for pool in pools
    }
    appservices = tuple(dict.fromkeys((*homeserver.app_service_config_files, *app_service_files)))
    return Plan(
        settings=settings,
        homeserver=homeserver,
        secrets=secret_paths(settings.core.data_dir, homeserver.server_name),
        public=public,
        main=main,
        workers=worker_procs,
        redis=redis,
        instance_map=instance_map,
        stream_writers=stream_writers,
        duties=_duties(worker_procs),
        upstreams=upstreams,
        routes=routes,
        layout=layout,
        app_service_config_files=appservices,
        postgres=postgres,
        health_port=health_port,
        metrics_proxy_port=metrics_proxy_port,
        services=services,
        turn_uris=_turn_uris(settings, homeserver.server_name),
        jobs=_jobs(settings, homeserver),
        placement=placement,
        extra_listeners=extra_listeners,
        warnings=warnings,
        pool_limits=pool_limits,
        media_store=settings.homeserver.media_store_path or f"{settings.core.data_dir}/media_store",
        disk_logs=layout.logs_on_disk if settings.logging.to_disk else None,
    )


def _jobs(settings: Settings, homeserver: HomeserverInfo) -> tuple[Job, ...]:
    jobs = []
    if settings.compressor.enabled:
        if homeserver.database == "sqlite":
            where = f"{homeserver.path} uses SQLite" if homeserver.exists else "the database is SQLite"
            raise UserError(
                Problem(
                    f"{COMPRESSOR}=on needs PostgreSQL, but {where}: synapse_auto_compressor works on "
                    f"PostgreSQL only. Unset {COMPRESSOR} or port the database (`synapse-workers port-sqlite`).",
                    COMPRESSOR,
                    expected="a PostgreSQL database",
                    found="SQLite",
                )
            )
        jobs.append(Job(COMPRESS_STATE, settings.compressor.schedule))
    if settings.logging.to_disk and not settings.nginx.disable_logrotate:
        jobs.append(Job(ROTATE_LOGS, ROTATE_LOGS_SCHEDULE))
    if settings.backup.schedule is not None:
        jobs.append(Job(BACKUP, settings.backup.schedule))
    return tuple(jobs)


def _placement(
    settings: Settings, homeserver: HomeserverInfo, workers: tuple[Worker, ...], host: str | None, embedded: bool
) -> Placement | None:
    """SYNAPSE_HOSTS + SYNAPSE_PLACEMENT → where every process and service runs. A worker's own name wins over
    its types; unplaced workers, nginx, PostgreSQL and Redis run with main; main unplaced runs on the first host."""
    hosts = dict(settings.placement.hosts)
    if not hosts:
        if host is not None:
            raise UserError(
                Problem(
                    f"--host {host}: {HOSTS} is not set: expected {HOSTS} naming the hosts.",
                    Argument("--host"),
                    expected=f"{HOSTS} naming the hosts",
                    found=host,
                    related=(HOSTS,),
                )
            )
        return None
    if host is not None and host not in hosts:
        expected = f"one of {', '.join(hosts)}"
        raise UserError(
            Problem(
                f"--host {host}: {host!r} is not in {HOSTS}: expected {expected}.",
                Argument("--host"),
                expected=expected,
                found=host,
                related=(HOSTS,),
            )
        )
    problems = placement_key_problems(
        settings, [(w.name, w.types) for w in workers], embedded=embedded, own_redis=homeserver.has_redis
    )
    if problems:
        raise UserError(*problems)
    given = dict(settings.placement.placement)
    main_host = given.get(MAIN, next(iter(hosts)))
    where = {MAIN: main_host}
    for worker in workers:
        if worker.name in given:
            where[worker.name] = given[worker.name]
            continue
        chosen = {given[t] for t in worker.types if t in given}  # one host at most: placement_key_problems
        where[worker.name] = chosen.pop() if chosen else main_host
    for service in (NGINX, POSTGRES, REDIS):
        where[service] = given.get(service, main_host)
    return Placement(hosts, where, host)


def _embedded_postgres(
    settings: Settings, homeserver: HomeserverInfo, layout: Layout, n_workers: int
) -> EmbeddedPostgres | None:
    socket_dir = layout.postgres_socket_dir
    generated = not homeserver.exists and settings.database.kind == "embedded"
    if not generated and homeserver.database_host != socket_dir:
        return None
    return EmbeddedPostgres(layout.postgres_data_dir, socket_dir, postgres_max_connections(n_workers + 1))


POSTGRES_CP_MAX = 5  # the pools we configure (homeserver.database_block), and Synapse's (Twisted's) default
POSTGRES_HEADROOM = 20  # beyond the Synapse processes' pools: psql, the compressor, the exporter, a backup


def postgres_connections_needed(n_processes: int, cp_max: int = POSTGRES_CP_MAX) -> int:
    """How many connections `n_processes` Synapse processes may open at once (each its own pool of at most
    cp_max), plus headroom for our other clients: what the embedded cluster is sized for, and what an external
    PostgreSQL is checked against at start (run/preflight.py)."""
    return cp_max * n_processes + POSTGRES_HEADROOM


def postgres_max_connections(n_processes: int) -> int:
    """PostgreSQL's max_connections for `n_processes` Synapse processes (the embedded cluster's, an export's
    PostgreSQL service's): every pool may be full at once (postgres_connections_needed), and never below
    PostgreSQL's own default of 100."""
    return max(100, postgres_connections_needed(n_processes))


class _PortAllocator:
    def __init__(self, base: int):
        self.base = base
        self.next = base + WORKER_OFFSET
        self.used: list[int] = []

    def main(self, kind: str) -> int:
        port = self.base + MAIN_PORT_OFFSETS[kind]
        self.used.append(port)
        return port

    def addon(self, name: str) -> int:
        port = self.base + ADDON_PORT_OFFSETS[name]
        self.used.append(port)
        return port

    def take(self) -> int:
        port = self.next
        self.next += 1
        self.used.append(port)
        return port


def _listeners(
    settings: Settings,
    layout: Layout,
    name: str,
    wanted: list[tuple[str, tuple[str, ...]]],
    port_for: Callable[[str], int],
    bind: str = LOOPBACK,
) -> tuple[Listener, ...]:
    """Internal listeners for one process: TCP on `bind` (loopback; several hosts: the process's host's
    address), or unix sockets where the switches ask for them."""
    sockets = {
        PUBLIC: settings.listen.public_unix_sockets,
        REPLICATION: settings.listen.replication_unix_sockets,
        METRICS: settings.metrics.unix_sockets,
        HEALTH: False,  # health stays on TCP so any checker (curl, Docker) can reach it
    }
    result = []
    for kind, resources in wanted:
        if sockets[kind]:
            result.append(Listener(kind, resources, path=layout.socket(name, kind)))
        else:
            result.append(Listener(kind, resources, host=bind, port=port_for(kind)))
    return tuple(result)


def _main_process(
    settings: Settings, layout: Layout, has_workers: bool, ports: _PortAllocator, bind: str = LOOPBACK
) -> Process:
    wanted: list[tuple[str, tuple[str, ...]]] = [(PUBLIC, ("client", "federation"))]
    if has_workers:
        wanted.append((REPLICATION, ("replication",)))
    wanted.append((HEALTH, ()))
    if settings.metrics.enabled:
        wanted.append((METRICS, ("metrics",)))
    listeners = _listeners(settings, layout, MAIN, wanted, ports.main, bind)
    return Process(
        name=MAIN,
        app=MAIN_APP,
        types=(),
        roles=(),
        listeners=listeners,
        config_files=(settings.core.homeserver_config_path, layout.shared_config, layout.main_config),
        log_config=layout.log_config(MAIN),
    )


def _worker_process(
    settings: Settings, layout: Layout, worker: Worker, ports: _PortAllocator, bind: str = LOOPBACK
) -> Process:
    resources = sorted({res for r in worker.roles for res in catalog.ROLES[r].resources})
    wanted: list[tuple[str, tuple[str, ...]]] = []
    if resources:
        wanted.append((PUBLIC, tuple(resources)))
    if worker.streams:
        wanted.append((REPLICATION, ("replication",)))
    wanted.append((HEALTH, ()))
    if settings.metrics.enabled:
        wanted.append((METRICS, ("metrics",)))
    listeners = _listeners(settings, layout, worker.name, wanted, lambda _kind: ports.take(), bind)
    duties = tuple(sorted({d for r in worker.roles if (d := catalog.ROLES[r].duty)}))
    return Process(
        name=worker.name,
        app=WORKER_APP,
        types=worker.types,
        roles=worker.roles,
        listeners=listeners,
        config_files=(settings.core.homeserver_config_path, layout.shared_config, layout.worker_config(worker.name)),
        log_config=layout.log_config(worker.name),
        streams=worker.streams,
        duties=duties,
    )


def _listener(proc: Process, kind: str) -> Listener:
    found = proc.listener(kind)
    assert found is not None, (proc.name, kind)
    return found


def _public(settings: Settings, homeserver: HomeserverInfo) -> Public:
    listen = settings.listen
    port = listen.http_port or homeserver.public_port or DEFAULT_HTTP_PORT
    tls = listen.tls_cert is not None
    return Public(
        bind_address=_public_address(settings, homeserver) or listen.http_bind_address,
        port=port,
        unix_socket=listen.nginx_listen_unix_socket,
        tls_port=listen.tls_port if tls else None,
        tls_cert=listen.tls_cert,
        tls_key=listen.tls_key,
        max_body_size=homeserver.max_upload_size,  # what Synapse enforces: the two limits always agree
        trusted_proxies=listen.trusted_proxies,
    )


def _public_address(settings: Settings, homeserver: HomeserverInfo) -> str | None:
    """A primary listener of the user's file bound to loopback only (Synapse's `--generate-config` without
    `--open-private-ports` makes ['::1', '127.0.0.1']: a server behind a proxy on the same host) stays on
    loopback while SYNAPSE_HTTP_BIND_ADDRESS is unset: moving it behind nginx must not open it to every address."""
    if "http_bind_address" in settings.listen.model_fields_set or homeserver.primary_listener is None:
        return None
    listener = next(x for x in homeserver.listeners if x.index == homeserver.primary_listener)
    loopback = [a for a in listener.bind_addresses if _is_loopback(a)]
    if not loopback or len(loopback) < len(listener.bind_addresses):
        return None
    return "127.0.0.1" if "127.0.0.1" in loopback else loopback[0]


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _extra_listeners(
    settings: Settings, homeserver: HomeserverInfo
) -> tuple[tuple[ExtraListener, ...], tuple[Problem, ...]]:
    """The user's listeners besides the primary one: the http ones nginx serves on their own ports, and a
    warning for each that is not served (metrics, manhole, replication, unix sockets)."""
    extras: list[ExtraListener] = []
    warnings: list[Problem] = []
    where = homeserver.path
    problems: list[Problem] = []

    def warn(name: str, sentence: str, expected: str, found: str, *related: Variable) -> None:
        warnings.append(Problem(sentence, YamlPath(where, name), expected=expected, found=found, related=related))

    for listener in homeserver.listeners:
        name = listener.yaml_path
        resources = "+".join(listener.resources)
        if listener.index == homeserver.primary_listener:
            chosen = _public_address(settings, homeserver) or settings.listen.http_bind_address
            specific = [a for a in listener.bind_addresses if a not in SYNAPSE_DEFAULT_BIND_ADDRESSES]
            unset = "http_bind_address" not in settings.listen.model_fields_set  # set: the admin's choice
            if specific and unset and chosen not in listener.bind_addresses:
                warn(
                    name,
                    f"{where}: {name} binds {', '.join(listener.bind_addresses)}; nginx's public listener binds "
                    f"{HTTP_BIND}={chosen} instead (set {HTTP_BIND} to one of the file's addresses to keep it).",
                    f"{HTTP_BIND} one of {', '.join(listener.bind_addresses)}",
                    f"{HTTP_BIND}={chosen}",
                    HTTP_BIND,
                )
            port = settings.listen.http_port
            if port is not None and port != listener.port:
                warn(
                    name,
                    f"{where}: {name} (port {listener.port}, {resources}) is served by nginx's "
                    f"public listener on {HTTP_PORT}={port} instead (unset {HTTP_PORT} to keep "
                    f"{listener.port}).",
                    f"{HTTP_PORT} unset, or {listener.port}",
                    f"{HTTP_PORT}={port}",
                    HTTP_PORT,
                )
            continue
        at = f"port {listener.port}" if listener.port is not None else f"unix socket {listener.path}"
        if listener.type != "http":
            metrics = listener.type == "metrics"
            instead = (
                f"each Synapse process gets its own metrics listener with {METRICS_ON}=yes (scraped by the "
                "built-in Prometheus)"
                if metrics
                else "synapse-workers starts no manhole (use the admin API, or Synapse outside synapse-workers)"
            )
            warn(
                name,
                f"{where}: {name} (type: {listener.type}, {at}) is not served: {instead}.",
                "an http listener",
                f"type: {listener.type}",
                *((METRICS_ON,) if metrics else ()),
            )
            continue
        internal = [r for r in listener.resources if r in catalog.INTERNAL_RESOURCES]
        served = tuple(r for r in listener.resources if r not in catalog.INTERNAL_RESOURCES)
        if internal:
            uses = []
            if "metrics" in internal:
                uses.append(f"metrics: {METRICS_ON}=yes gives each process its own metrics listener")
            if "replication" in internal:
                uses.append("replication: synapse-workers wires its own between its processes")
            what = "is not served" if not served else f"is served without {'+'.join(internal)}"
            warn(
                name,
                f"{where}: {name} ({at}, {resources}) {what}: {'; '.join(uses)}.",
                "resources nginx serves (" + ", ".join(sorted(catalog.INTERNAL_RESOURCES)) + " are internal)",
                resources,
                *((METRICS_ON,) if "metrics" in internal else ()),
            )
            if not served and listener.resources:
                continue
        if listener.port is None:
            warn(
                name,
                f"{where}: {name} (unix socket {listener.path}) is not served: nginx serves everything the public "
                f"port does on a unix socket with {OUTER_SOCKET} instead.",
                f"a port (or {OUTER_SOCKET})",
                f"unix socket {listener.path}",
                OUTER_SOCKET,
            )
            continue
        addresses = listener.bind_addresses
        if "::" in addresses:
            addresses = tuple(a for a in addresses if a != "0.0.0.0")
        cert = key = None
        if listener.tls:
            cert, key, missing = _listener_tls(homeserver, name)
            problems += missing
        extras.append(ExtraListener(name, listener.port, addresses, served, cert, key))
    if problems:
        raise UserError(*problems)
    return tuple(extras), tuple(warnings)


def _listener_tls(homeserver: HomeserverInfo, name: str) -> tuple[str | None, str | None, list[Problem]]:
    """tls: true: nginx serves the listener with the file's certificate and key (checked readable by load)."""
    problems = []
    found = []
    for key, value in (
        ("tls_certificate_path", homeserver.tls_certificate_path),
        ("tls_private_key_path", homeserver.tls_private_key_path),
    ):
        if value is None:
            expected = "the path of a PEM file nginx serves it with"
            problems.append(
                Problem(
                    f"{homeserver.path} ({CONFIG_PATH}) at {name + '.tls'!r}: the listener is TLS, but "
                    f"{key!r} is not set: expected {expected}.",
                    YamlPath(homeserver.path, key),
                    expected=expected,
                    found=None,
                    related=(CONFIG_PATH,),
                )
            )
        elif not value.startswith("/"):
            problems.append(
                Problem(
                    f"{homeserver.path} ({CONFIG_PATH}) at {key!r}: expected an absolute path for nginx "
                    f"({name} is TLS), found {value!r}.",
                    YamlPath(homeserver.path, key),
                    expected="an absolute path for nginx",
                    found=repr(value),
                    related=(CONFIG_PATH,),
                )
            )
        found.append(value)
    return found[0], found[1], problems


@dataclass(frozen=True)
class _Claim:
    """A port or range the plan listens on, and who asked for it (a variable, or a YAML path): `owner` as a
    sentence says it, `subject` (and `also`, the other variable of a range) as data."""

    owner: str
    first: int
    last: int
    protocols: frozenset[str]
    hosts: tuple[str, ...]
    subject: Subject
    also: tuple[Variable, ...] = ()
    internal: bool = False

    def meets(self, other: _Claim) -> bool:
        return (
            self.first <= other.last
            and other.first <= self.last
            and bool(self.protocols & other.protocols)
            and any(a == b or a in WILDCARDS or b in WILDCARDS for a in self.hosts for b in other.hosts)
        )


def _check_ports(
    settings: Settings,
    homeserver: HomeserverInfo,
    public: Public,
    ports: _PortAllocator,
    procs: tuple[Process, ...],
    services: tuple[Service, ...],
    extras: tuple[ExtraListener, ...],
) -> None:
    """After every port is allocated: every port the plan uses against every other (exit 2, both owners
    named), and the public ones against the internal range (base..highest, the add-ons' reserved ones too)."""
    base = settings.listen.internal_port_base
    if max(ports.used) > 65535:
        raise UserError(
            Problem(
                f"{INTERNAL_PORT_BASE}={base} leaves no room for {ports.next - base} internal ports: "
                "expected a lower base.",
                INTERNAL_PORT_BASE,
                expected=f"a base of at most {65535 - (max(ports.used) - base)}",
                found=str(base),
            )
        )
    tcp, udp = frozenset({"tcp"}), frozenset({"udp"})
    claims: list[_Claim] = []

    def internal(what: str, host: str | None, port: int | None) -> None:
        if port is not None:
            owner = f"{INTERNAL_PORT_BASE}={base}+{port - base} ({what})"
            claims.append(_Claim(owner, port, port, tcp, (host or LOOPBACK,), INTERNAL_PORT_BASE, internal=True))

    for proc in procs:
        for lst in proc.listeners:
            internal(f"{proc.name}'s {lst.kind} listener", lst.host, lst.port)
    for kind, offset in MAIN_PORT_OFFSETS.items():
        if kind == "aggregate" and base + offset in ports.used:
            internal("the stack's /health", LOOPBACK, base + offset)
    for name, offset in ADDON_PORT_OFFSETS.items():
        if name == "metrics_proxy" and settings.metrics.enabled:
            internal("nginx's loopback metrics server", LOOPBACK, base + offset)
    for service in services:
        for lst in service.listeners:
            if lst.kind == METRICS and lst.port is not None:
                internal(f"{service.name}'s metrics listener", lst.host, lst.port)

    listen = settings.listen
    http_subject: Subject = HTTP_PORT
    if listen.http_port is not None:
        http_owner = f"{HTTP_PORT}={public.port}"
    elif homeserver.public_port is not None:
        http_path = f"listeners[{homeserver.primary_listener}].port"
        http_owner = f"{http_path}={public.port} in {homeserver.path}"
        http_subject = YamlPath(homeserver.path, http_path)
    else:
        http_owner = f"{HTTP_PORT}={public.port} (its default)"
    public_hosts = (public.bind_address,)
    claims.append(_Claim(http_owner, public.port, public.port, tcp, public_hosts, http_subject))
    if public.tls_port is not None:
        owner = f"{TLS_PORT}={public.tls_port}"
        claims.append(_Claim(owner, public.tls_port, public.tls_port, tcp, public_hosts, TLS_PORT))
    for extra in extras:
        owner = f"{extra.source}.port={extra.port} in {homeserver.path}"
        subject = YamlPath(homeserver.path, f"{extra.source}.port")
        claims.append(_Claim(owner, extra.port, extra.port, tcp, extra.bind_addresses, subject))
    for service in services:
        main_listener = service.main
        if service.name == COTURN and main_listener.port is not None:
            host = main_listener.host or "0.0.0.0"
            port = main_listener.port
            claims.append(_Claim(f"{COTURN_PORT}={port}", port, port, tcp | udp, (host,), COTURN_PORT))
            if service.relay_ports:
                low, high = service.relay_ports
                owner = f"{COTURN_MIN_PORT}-{COTURN_MAX_PORT}={low}-{high} (coturn's UDP relays)"
                claims.append(_Claim(owner, low, high, udp, ("0.0.0.0",), COTURN_MIN_PORT, (COTURN_MAX_PORT,)))
        elif service.name == PROMETHEUS and main_listener.port is not None:
            port = main_listener.port
            hosts = (main_listener.host or "0.0.0.0",)
            claims.append(_Claim(f"{PROMETHEUS_PORT}={port}", port, port, tcp, hosts, PROMETHEUS_PORT))

    problems = []
    clashing: set[int] = set()
    for i, one in enumerate(claims):
        for j in range(i + 1, len(claims)):
            other = claims[j]
            if one.meets(other):
                port = max(one.first, other.first)
                protocol = "/".join(sorted(one.protocols & other.protocols))
                # The subject is the owner named first; the other owner's variables are related (a YAML path
                # of homeserver.yaml is in the sentence only).
                related = [v for v in (*other.also, *_variables(one)) if v != other.subject]
                problems.append(
                    Problem(
                        f"{other.owner} and {one.owner} both use port {port} ({protocol}): expected a port of its "
                        "own for each.",
                        other.subject,
                        expected="a port of its own for each",
                        found=f"port {port} ({protocol}), also used by {one.owner}",
                        related=dict.fromkeys(related),
                    )
                )
                clashing.update((i, j))
    high = max(ports.used)
    for i, claim in enumerate(claims):
        if claim.internal or i in clashing or "tcp" not in claim.protocols:
            continue
        if claim.first <= high and base <= claim.last:
            problems.append(
                Problem(
                    f"{claim.owner} collides with the internal ports {base}-{high} "
                    f"({INTERNAL_PORT_BASE}={base}): expected a port outside that range.",
                    claim.subject,
                    expected=f"a port outside {base}-{high}",
                    found=claim.owner,
                    related=(*claim.also, INTERNAL_PORT_BASE),
                )
            )
    if problems:
        raise UserError(*problems)


def _variables(claim: _Claim) -> tuple[Variable, ...]:
    """The variables a claim's owner is made of (none for a YAML path)."""
    first = (claim.subject,) if isinstance(claim.subject, Variable) else ()
    return first + claim.also


def _coturn(settings: Settings, ports: _PortAllocator) -> Service | None:
    """The built-in coturn: TURN/STUN on COTURN_PORT (UDP and TCP), relays on the UDP range, metrics on loopback."""
    turn = settings.turn
    if not turn.builtin_coturn:
        return None
    host = turn.internal_ip or "0.0.0.0"  # no COTURN_INTERNAL_IP: every address of the host
    listeners = [Listener(TURN, (), host=host, port=turn.port)]
    if turn.metrics:
        listeners.append(Listener(METRICS, ("metrics",), host=LOOPBACK, port=ports.addon("coturn_metrics")))
    return Service(COTURN, tuple(listeners), ("udp", "tcp"), (turn.min_port, turn.max_port))


def _prometheus(settings: Settings) -> Service | None:
    """The built-in Prometheus (SYNAPSE_METRICS): its web UI and API on PROMETHEUS_BIND_ADDRESS:PROMETHEUS_PORT."""
    metrics = settings.metrics
    if not metrics.enabled:
        return None
    return Service(PROMETHEUS, (Listener(HTTP, (), host=metrics.bind_address, port=metrics.port),))


def _nginx_exporter(settings: Settings, ports: _PortAllocator) -> Service | None:
    """prometheus-nginx-exporter (SYNAPSE_METRICS): reads nginx's stub_status, serves Prometheus on loopback."""
    if not settings.metrics.enabled:
        return None
    return Service(NGINX_EXPORTER, (Listener(METRICS, ("metrics",), host=LOOPBACK, port=ports.addon(NGINX_EXPORTER)),))


def prometheus_storage(plan: Plan) -> str:
    """The built-in Prometheus's database directory."""
    return plan.settings.metrics.storage_path or plan.layout.prometheus_data


def local_host(host: str | None) -> str:
    """How to reach, from this host, a listener bound to `host` (the unspecified addresses: loopback)."""
    return {None: LOOPBACK, "0.0.0.0": LOOPBACK, "::": "::1"}.get(host, host or LOOPBACK)


def _turn_uris(settings: Settings, server_name: str) -> tuple[str, ...]:
    """SYNAPSE_TURN_URIS, else the built-in coturn's on the server name's host (UDP first, as clients try it)."""
    turn = settings.turn
    if turn.uris or not turn.builtin_coturn:
        return turn.uris
    return tuple(f"turn:{server_host(server_name)}:{turn.port}?transport={t}" for t in ("udp", "tcp"))


def server_host(server_name: str) -> str:
    """The server name without its port (an IPv6 literal keeps its brackets)."""
    if server_name.startswith("["):
        return server_name[: server_name.index("]") + 1]
    return server_name.split(":")[0]


SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


def _check_socket_paths(settings: Settings, layout: Layout, procs: tuple[Process, ...]) -> None:
    paths = [lst.path for p in procs for lst in p.listeners if lst.path]
    paths += [layout.redis_socket, layout.supervisor_socket, f"{layout.postgres_socket_dir}/.s.PGSQL.{POSTGRES_PORT}"]
    longest = max(paths, key=lambda p: len(p.encode()))
    if len(longest.encode()) > SOCKET_PATH_MAX:
        raise UserError(
            Problem(
                f"{RUNTIME_DIR}={settings.core.runtime_dir!r} is too long for unix sockets: {longest!r} has "
                f"{len(longest.encode())} bytes, expected at most {SOCKET_PATH_MAX}. Use a shorter directory.",
                RUNTIME_DIR,
                expected=f"socket paths of at most {SOCKET_PATH_MAX} bytes",
                found=f"{longest!r} ({len(longest.encode())} bytes)",
            )
        )
    outer = settings.listen.nginx_listen_unix_socket
    if outer and len(outer.encode()) > SOCKET_PATH_MAX:
        raise UserError(
            Problem(
                f"{OUTER_SOCKET}={outer!r} is too long: expected at most {SOCKET_PATH_MAX} bytes.",
                OUTER_SOCKET,
                expected=f"at most {SOCKET_PATH_MAX} bytes",
                found=f"{len(outer.encode())} bytes",
            )
        )


def _stream_writers(workers: tuple[Process, ...]) -> dict[str, tuple[str, ...]]:
    writers: dict[str, list[str]] = {}
    for stream in catalog.STREAMS:
        names = [w.name for w in workers if stream in w.streams]
        if names:
            writers[stream] = names
    return {k: tuple(v) for k, v in writers.items()}


def _duties(workers: tuple[Process, ...]) -> dict[str, Any]:
    duties: dict[str, Any] = {}
    for key in catalog.LIST_DUTIES:
        names = [w.name for w in workers if key in w.duties]
        if names:
            duties[key] = names
    for key in catalog.ONE_NAME_DUTIES:
        names = [w.name for w in workers if key in w.duties]
        if names:
            duties[key] = names[0]  # e.g. several user_dir workers serve search; the first updates
    return duties


def _routing(main: Process, workers: tuple[Process, ...]) -> tuple[tuple[Upstream, ...], tuple[Route, ...]]:
    by_role: dict[str, tuple[str, ...]] = {}
    for role in catalog.ROLES:
        names = tuple(w.name for w in workers if role in w.roles)
        if names:
            by_role[role] = names
    upstreams: dict[str, Upstream] = {MAIN: Upstream(MAIN, None, None, (MAIN,))}
    routes = []
    for rule in catalog.RULES:
        targets: list[tuple[frozenset[str] | None, str]] = []
        queries: list[QueryTarget] = []
        for branch in rule.branches:
            found = next((r for r in branch.roles if r in by_role), None)
            if found is None:
                continue
            name = _upstream(upstreams, by_role, rule, found)
            if branch.query is not None:
                queries.append(QueryTarget(branch.query, name, _stand_in(upstreams, by_role, rule, {found})))
            else:
                targets.append((branch.methods, name))
        targets = _simplify(targets)
        roles = {served for _, name in targets if (served := upstreams[name].role)}
        routes.append(Route(rule, tuple(targets), _stand_in(upstreams, by_role, rule, roles), tuple(queries)))
    return tuple(upstreams.values()), tuple(routes)


def _upstream(
    upstreams: dict[str, Upstream], by_role: dict[str, tuple[str, ...]], rule: catalog.Rule, role: str
) -> str:
    """The upstream of `role`'s processes for `rule` (hashed by the rule's key when there are several), made once."""
    servers = by_role[role]
    balance = rule.balance if len(servers) > 1 else None
    name = role if balance is None else f"{role}_by_{balance}"
    upstreams.setdefault(name, Upstream(name, role, balance, servers))
    return name


def _stand_in(
    upstreams: dict[str, Upstream], by_role: dict[str, tuple[str, ...]], rule: catalog.Rule, roles: set[str]
) -> str | None:
    """Route.when_down for a target served by `roles`: the deployed `stand_in` role's upstream when the one role
    has one, else main or unavailable (_when_down)."""
    if len(roles) == 1:
        other = catalog.ROLES[next(iter(roles))].stand_in
        if other is not None and other in by_role:
            return _upstream(upstreams, by_role, rule, other)
    return _when_down(rule, roles)


def _when_down(rule: catalog.Rule, roles: set[str]) -> str | None:
    if not roles:
        return None
    if rule.hard or not all(catalog.ROLES[role].main_can_stand_in for role in roles):
        return UNAVAILABLE
    return MAIN


def _simplify(targets: list[tuple[frozenset[str] | None, str]]) -> list[tuple[frozenset[str] | None, str]]:
    """Drop branches shadowed by an earlier catch-all; end with a catch-all (main if none)."""
    result: list[tuple[frozenset[str] | None, str]] = []
    for methods, upstream in targets:
        result.append((methods, upstream))
        if methods is None:
            return result
    result.append((None, MAIN))
    # A list of only-main targets collapses to one.
    if all(u == MAIN for _, u in result):
        return [(None, MAIN)]
    return result
