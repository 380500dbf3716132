"""Before anything starts: the causes that would otherwise surface as a crash loop, named up front.

Ports someone else holds, and an external PostgreSQL that is unreachable or refuses our password. Each
problem names the variable to change; `run` exits 2 without starting anything. An external PostgreSQL whose
max_connections leaves less than the plan's pools may open is a warning with the numbers.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import File, Problem, Subject, UserError, Variable, YamlPath
from ..plan import POSTGRES_CP_MAX, POSTGRES_HEADROOM, PROMETHEUS, TURN, Plan, postgres_connections_needed

# The variables the sentences below name (made at import: a name not in the registry fails there).
HTTP_PORT, TLS_PORT = Variable("SYNAPSE_HTTP_PORT"), Variable("SYNAPSE_TLS_PORT")
INTERNAL_PORT_BASE, HOSTS = Variable("SYNAPSE_INTERNAL_PORT_BASE"), Variable("SYNAPSE_HOSTS")
COTURN_PORT, PROMETHEUS_PORT = Variable("COTURN_PORT"), Variable("PROMETHEUS_PORT")
PASSWORD, DB, USER = Variable("POSTGRES_PASSWORD"), Variable("POSTGRES_DB"), Variable("POSTGRES_USER")
HOST, PORT = Variable("POSTGRES_HOST"), Variable("POSTGRES_PORT")
WORKER_TYPES = Variable("SYNAPSE_WORKER_TYPES")

DB_WAIT = 60.0  # an external database may still be starting (compose): wait this long for it to answer


def check_ports(plan: Plan) -> list[Problem]:
    """Every TCP port the stack will listen on (and coturn's UDP port) must be free now."""
    listen, public, hs_path = plan.settings.listen, plan.public, plan.homeserver.path
    source = f"{HTTP_PORT}=" if listen.http_port else "The client port of homeserver.yaml, "
    public_subject: Subject = HTTP_PORT if listen.http_port else File(hs_path)
    front = plan.local("nginx")  # several hosts: nginx and its add-ons run on nginx's host only
    wanted: list[tuple[str, int, str, Subject]] = (
        [(public.bind_address, public.port, f"{source}{public.port}", public_subject)] if front else []
    )
    if public.tls_port and front:
        wanted.append((public.bind_address, public.tls_port, f"{TLS_PORT}={public.tls_port}", TLS_PORT))
    for extra in plan.extra_listeners if front else ():  # the user's other listeners, served by nginx
        for host in extra.bind_addresses:
            what = f"{extra.source}.port={extra.port} in {hs_path}"
            wanted.append((host, extra.port, what, YamlPath(hs_path, f"{extra.source}.port")))
    internal = f"{INTERNAL_PORT_BASE}={listen.internal_port_base}: port"
    base = INTERNAL_PORT_BASE
    wanted.append(("127.0.0.1", plan.health_port, f"{internal} {plan.health_port} (the launcher's /health)", base))
    if plan.metrics_proxy_port is not None:
        port = plan.metrics_proxy_port
        wanted.append(("127.0.0.1", port, f"{internal} {port} (nginx's loopback metrics server)", base))
    for proc in plan.local_processes:
        for lst in proc.listeners:
            if lst.port is not None and lst.host is not None:
                what = f"{internal} {lst.port} ({proc.name}'s {lst.kind} listener)"
                wanted.append((lst.host, lst.port, what, base))
    if plan.postgres is not None and plan.postgres.host and plan.local("postgres"):
        what = f"the embedded PostgreSQL ({HOSTS})"
        wanted.append((plan.postgres.host, plan.postgres.port or 0, what, HOSTS))
    if plan.redis is not None and plan.redis.host and plan.local("redis"):
        wanted.append((plan.redis.host, plan.redis.port or 0, f"Redis ({HOSTS})", HOSTS))
    udp: list[tuple[str, int, str, Subject]] = []
    for service in plan.services if front else ():
        for lst in service.listeners:
            if lst.port is None or lst.host is None:
                continue
            subject: Subject
            if lst.kind == TURN:
                variable, subject = f"{COTURN_PORT}={lst.port}", COTURN_PORT
            elif service.name == PROMETHEUS and lst is service.main:
                variable, subject = f"{PROMETHEUS_PORT}={lst.port}", PROMETHEUS_PORT
            else:
                variable, subject = f"{internal} {lst.port}", base
            what = f"{variable} ({service.name}'s {lst.kind} listener)"
            wanted.append((lst.host, lst.port, what, subject))
            if "udp" in service.protocols and lst is service.main:
                udp.append((lst.host, lst.port, what, subject))
    problems = []
    for kind, entries in ((socket.SOCK_STREAM, wanted), (socket.SOCK_DGRAM, udp)):
        for host, port, what, subject in entries:
            reason = _bind_error(host, port, kind)
            if reason:
                shown = what + (" (UDP)" if kind == socket.SOCK_DGRAM else "")
                problems.append(
                    Problem(
                        f"{shown} cannot be used: {reason}. Stop the program that holds it, or choose another.",
                        subject,
                        expected="a port free on this machine",
                        found=reason,
                    )
                )
    return problems


def ephemeral_ports() -> range | None:
    """The kernel's range for the local port of outgoing connections (net.ipv4.ip_local_port_range)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return None
    return range(low, high + 1)


def ephemeral_overlap(plan: Plan, ephemeral: range | None) -> Problem | None:
    """A warning when internal listeners lie in the ephemeral range: an outgoing connection (nginx to an upstream,
    Synapse to Redis) may hold such a port when its listener binds, and that process then fails to start."""
    if ephemeral is None:
        return None
    internal = [plan.health_port, plan.metrics_proxy_port]
    internal += [lst.port for proc in plan.local_processes for lst in proc.listeners]
    inside = sorted({port for port in internal if port is not None and port in ephemeral})
    if not inside:
        return None
    expected = f"a base below {ephemeral.start} or above {ephemeral.stop - 1}"
    return Problem(
        f"{INTERNAL_PORT_BASE}={plan.settings.listen.internal_port_base}: internal ports {inside[0]}-{inside[-1]}"
        f" lie in the kernel's ephemeral range {ephemeral.start}-{ephemeral.stop - 1} (net.ipv4.ip_local_port_range),"
        " where outgoing connections take their local port; a listener can then find its port taken."
        f" Expected {expected}.",
        INTERNAL_PORT_BASE,
        expected=expected,
        found=f"{plan.settings.listen.internal_port_base} (internal ports {inside[0]}-{inside[-1]})",
    )


def _bind_error(host: str, port: int, kind: int = socket.SOCK_STREAM) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as sock:
        if kind == socket.SOCK_STREAM:  # ignore TIME_WAIT leftovers; on UDP it would share a port in use
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"{host}:{port} is in use by another program"
            if exc.errno == errno.EACCES:
                return f"binding {host}:{port} needs root (ports below 1024)"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine"
            return f"{host}:{port}: {exc.strerror}"
    return None


def check_external_database(
    plan: Plan,
    log: Callable[[str], None],
    cancelled: Callable[[], bool],
    wait: float = DB_WAIT,
    warn: Callable[[Problem], None] | None = None,
) -> list[Problem]:
    """Connect once with the database settings Synapse will use (an embedded cluster is ours: skipped); once in,
    a server too small for the plan's pools is a warning (`warn`: connection_problem)."""
    if plan.postgres is not None or plan.homeserver.database != "postgres":
        return []
    args = _database_args(plan.homeserver.path)
    if args is None:
        return []
    import psycopg2

    where = f"{args.get('host', 'localhost')}:{args.get('port', 5432)}"
    deadline, said = time.monotonic() + wait, False
    while True:
        try:
            connection = psycopg2.connect(**args, connect_timeout=5)
            try:
                limits = server_limits(connection)
            finally:
                connection.close()
            problem = connection_problem(plan, where, _pool_max(plan.homeserver.path), limits)
            if problem is not None and warn is not None:
                warn(problem)
            return []
        except psycopg2.OperationalError as exc:
            text = " ".join(str(exc).split())
            if "password authentication failed" in text or "no password supplied" in text:
                path = YamlPath(plan.homeserver.path, "database.args.password")
                return [
                    Problem(
                        f"PostgreSQL at {where} refused the password for user {args.get('user')!r}: check "
                        f"{PASSWORD} (or the database password in homeserver.yaml).",
                        path,
                        expected=f"the password PostgreSQL at {where} accepts",
                        found="a password it refused",
                        related=(PASSWORD,),
                    )
                ]
            if "does not exist" in text:
                return [
                    Problem(
                        f"PostgreSQL at {where}: {text}. Check {DB} / {USER} (or homeserver.yaml).",
                        YamlPath(plan.homeserver.path, "database.args"),
                        expected="a database and user that exist",
                        found=text,
                        related=(DB, USER),
                    )
                ]
            if cancelled():
                return []  # asked to stop while waiting: a clean stop, not an error
            if time.monotonic() > deadline:
                return [
                    Problem(
                        f"PostgreSQL at {where} is unreachable after {wait:.0f}s ({text}): check {HOST} and "
                        f"{PORT} (or homeserver.yaml), and that the database server runs.",
                        YamlPath(plan.homeserver.path, "database.args"),
                        expected="a PostgreSQL server that answers",
                        found=text,
                        related=(HOST, PORT),
                    )
                ]
            if not said:
                log(f"waiting for PostgreSQL at {where} ({text})")
                said = True
            time.sleep(1)


@dataclass(frozen=True)
class ServerLimits:
    """What an external PostgreSQL lets our user open: max_connections, the slots kept for superusers (and, from
    PostgreSQL 16, for pg_use_reserved_connections) when our user is not one, and the connections other users'
    clients hold now (our own user's, such as another host's workers, are ours to count, not theirs)."""

    max_connections: int
    reserved: int
    others: int


SERVER_LIMITS_SQL = """
SELECT current_setting('max_connections')::int,
       CASE WHEN r.rolsuper THEN 0 ELSE current_setting('superuser_reserved_connections')::int
            + coalesce(current_setting('reserved_connections', true)::int, 0) END,
       (SELECT count(*) FROM pg_stat_activity  -- another user's row hides its backend_type (NULL) from us
         WHERE coalesce(backend_type, 'client backend') = 'client backend' AND datname IS NOT NULL
           AND usename <> current_user)::int
  FROM pg_roles r WHERE r.rolname = current_user
"""


def server_limits(connection: Any) -> ServerLimits:
    """SHOW max_connections and friends over an open psycopg2 connection (three settings, one count)."""
    with connection.cursor() as cursor:
        cursor.execute(SERVER_LIMITS_SQL)
        max_connections, reserved, others = cursor.fetchone()
    connection.rollback()
    return ServerLimits(max_connections, reserved, others)


def connection_problem(plan: Plan, where: str, cp_max: int, limits: ServerLimits) -> Problem | None:
    """A warning when the deployment's Synapse processes (every host's: they share the database), each with a pool
    of cp_max, plus our headroom (plan.postgres_connections_needed, the embedded cluster's own rule) may open more
    connections than the server leaves us. A warning, not a refusal: pools open connections on demand, so a small
    server may serve a quiet homeserver for years, and the server's other clients come and go; refusing would stop
    a server that ran before this check. Under load Synapse would get "too many clients" errors: hence the numbers."""
    processes = len(plan.processes)
    needed = postgres_connections_needed(processes, cp_max)
    available = limits.max_connections - limits.reserved - limits.others
    if needed <= available:
        return None
    shown = f"max_connections={limits.max_connections}"
    detail = f"{limits.reserved} reserved for superusers, {limits.others} held by other clients now"
    return Problem(
        f"PostgreSQL at {where} has {shown} ({detail}): {available} left for Synapse, but {processes} Synapse "
        f"processes x cp_max {cp_max} + {POSTGRES_HEADROOM} headroom = {needed} connections may be open at once "
        '(each process has its own pool). Under load Synapse would fail with "too many clients already". Raise '
        f"max_connections on that server to at least {needed + limits.reserved + limits.others}, or lower "
        f"database.args.cp_max in {plan.homeserver.path}, or run fewer workers ({WORKER_TYPES}).",
        YamlPath(plan.homeserver.path, "database.args"),
        expected=f"at least {needed} connections for synapse-workers' user",
        found=f"{shown}: {available} available",
        related=(HOST, WORKER_TYPES),
    )


def _pool_max(path: str) -> int:
    """database.args.cp_max of homeserver.yaml: each Synapse process's pool size (Twisted's default when unset)."""
    with open(path, encoding="utf-8") as handle:
        doc = yaml.safe_load(handle) or {}
    db = doc.get("database") or {}
    args = db.get("args") if isinstance(db, dict) else None
    value = args.get("cp_max") if isinstance(args, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else POSTGRES_CP_MAX


def _database_args(path: str) -> dict[str, Any] | None:
    with open(path, encoding="utf-8") as handle:
        doc = yaml.safe_load(handle) or {}
    db = doc.get("database") or {}
    args = db.get("args") if isinstance(db, dict) else None
    if not isinstance(args, dict):
        return None
    # Synapse's own pool options are not libpq's; `database` is psycopg2's old spelling of dbname.
    return {k: v for k, v in args.items() if not k.startswith("cp_")}


def raise_if(problems: Sequence[str]) -> None:
    if problems:
        raise UserError(*problems)
