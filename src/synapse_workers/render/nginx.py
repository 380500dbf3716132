"""Plan → the internal nginx: one self-contained nginx.conf with absolute paths (single host).

Routes come from plan.routes in catalogue order (nginx tries regex locations in file order, first match
wins). Method-sensitive routes pick their upstream through a `map $request_method`; sticky upstreams hash
on a key taken from the access token, the room ID or the federation origin.

When nginx cannot reach any process of a route's pool (it answers 502/504 itself), the route's `when_down`
decides: main stands in (`error_page ... = @sw_main`), another pool does first (`@sw_down_<upstream>`, then main),
or a fast 503 with Retry-After (`@sw_unavailable`). nginx's `backup` servers would do the first, but cannot be
combined with `hash ... consistent`.

A route's query class (plan.QueryTarget: initial syncs) is a `map` on `$arg_` values; the route's location jumps to
the class's named location (`return 418` + `error_page 418`), which has its own pool, read timeout and stand-in.
Every proxying location names its pool (`$sw_pool`); a `limit_conn` zone per pool bounds the requests in flight
(plan.pool_limits) and the next one gets 429 M_LIMIT_EXCEEDED (`@sw_limited`). The public `/health` is a cached
copy of the launcher's verdict (see HEALTH_STALE_SECONDS).
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from .. import catalog
from ..plan import MAIN, METRICS, PUBLIC, UNAVAILABLE, ExtraListener, Plan, Route, Upstream
from ..settings import NginxSettings

TEMPLATES = Path(__file__).parent / "templates"
HASH_KEYS = {catalog.BY_USER: "$sw_user", catalog.BY_ROOM: "$sw_room", catalog.BY_ORIGIN: "$sw_origin"}
# Named locations for a route whose pool is down (plan.Route.when_down); another pool standing in: @sw_down_<it>.
WHEN_DOWN = {MAIN: "= @sw_main", UNAVAILABLE: "=503 @sw_unavailable"}
# A request in a route's query class (plan.QueryTarget) jumps to its own named location with this status.
QUERY_JUMP = 418
# A pool at its bound (plan.pool_limits): 429 with Matrix's rate-limit error at once, never a 502/503 an outer
# proxy would take for "origin down"; the client tries again after this many seconds.
LIMITED_RETRY_AFTER_SECONDS = 2
# ($sw_pool: nginx puts the pool's name in; the text is single-quoted in nginx.conf)
LIMITED_BODY = (
    '{"errcode":"M_LIMIT_EXCEEDED","error":"Too many requests in flight for the $sw_pool pool of this server; '
    f'try again shortly","retry_after_ms":{1000 * LIMITED_RETRY_AFTER_SECONDS}}}'
)
RETRY_AFTER_SECONDS = 5  # below the upstream servers' fail_timeout default (10s): clients come back soon
UNAVAILABLE_BODY = '{"errcode":"M_UNKNOWN","error":"Temporarily unavailable: the process serving this request is down"}'
# Loopback upstreams accept at once or are gone; a dead process must not hold a request for nginx's 60s.
CONNECT_TIMEOUT = "5s"
# The public /health is answered from nginx's copy of the aggregator's answer (at most a second old: its
# Cache-Control, run/health.py); while one request refreshes it, the others get the previous answer for at most
# this many seconds after it expired (the aggregator's checks time out after 3 s). A copy nobody asked for that
# long is dropped, so the next request waits for a new verdict rather than getting an old one.
HEALTH_STALE_SECONDS = 5
# Each proxied request holds two descriptors (client, upstream); the rest: logs, cache files, listeners.
FILES_PER_CONNECTION = 2
SPARE_FILES = 256
# The public port's accept queue (the kernel caps it at net.core.somaxconn): a burst of new connections (2,000
# health checks at once) must wait there, not have its SYNs dropped and retried a second later.
LISTEN_BACKLOG = 4096

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,
)


def route_variable(route: Route) -> str:
    return f"$sw_route_{route.rule.id}"


def nginx_quote(text: str) -> str:
    if '"' in text or "\\\\" in text:
        raise ValueError(f"cannot quote {text!r} for nginx")
    return f'"{text}"'


def nginx_single_quote(text: str) -> str:
    if "'" in text or "\\" in text or "$" in text:
        raise ValueError(f"cannot quote {text!r} for nginx")
    return f"'{text}'"


def render_nginx(plan: Plan, nginx: NginxSettings, health_upstream: str | None = None) -> dict[str, str]:
    """Topology (listeners, upstreams, routes, the public listener and whom it trusts, the access log) from the
    plan; `nginx` (its settings section) only tunes them. `/health` asks `health_upstream` (host:port), by
    default the launcher's aggregator on loopback.

    Several hosts: only on nginx's host; its upstreams are the processes' addresses on their hosts."""
    if not plan.local("nginx"):
        return {}
    servers = {p.name: lst.address for p in plan.processes if (lst := p.listener(PUBLIC))}
    upstreams = []
    for upstream in plan.upstreams:
        upstreams.append(
            {
                "name": upstream.name,
                "hash": HASH_KEYS.get(upstream.balance) if upstream.balance else None,
                "servers": [servers[name] for name in upstream.servers],
                "keepalive": _keepalive(nginx, upstream),
            }
        )
    routes = []
    queries: dict[str, catalog.Query] = {}
    # a pool standing in for another → what stands in for it in turn, and the read timeout of what it answers
    stand_ins: dict[str, tuple[str, str | None]] = {}
    when_down: set[str | None] = set()

    def down(value: str | None, origin: str | None = None) -> str | None:
        """The error_page target for `value` (plan.Route.when_down) of requests first sent to the upstream
        `origin`, noting what the named locations need."""
        when_down.add(value)
        if value is None or value in WHEN_DOWN:
            return WHEN_DOWN[value] if value else None
        role = plan.upstream(value).role
        assert role is not None
        then = MAIN if catalog.ROLES[role].main_can_stand_in else UNAVAILABLE
        # Standing in for initial syncs, the synchrotron gets their long read timeout, not its own.
        timeout = (read_timeout(plan, origin) if origin else None) or read_timeout(plan, value)
        stand_ins[value] = (then, stand_ins.get(value, (then, None))[1] or timeout)
        when_down.add(then)
        return f"= @sw_down_{value}"

    for route in plan.routes:
        split = len(route.targets) > 1
        if len(route.queries) > 1:
            raise ValueError(f"route {route.rule.id}: one query class per route")
        for target in route.queries:
            queries[target.query.name] = target.query
        routes.append(
            {
                "id": route.rule.id,
                "why": route.rule.why or route.rule.group,
                "pattern": nginx_quote(route.rule.pattern),
                "target": route_variable(route) if split else route.targets[0][1],
                "pool": f"$sw_pool_{route.rule.id}" if split else pool(plan, route.targets[0][1]),
                "pools": [(sorted(methods) if methods else None, pool(plan, name)) for methods, name in route.targets],
                "split": split,
                "methods": [(sorted(methods) if methods else None, upstream) for methods, upstream in route.targets],
                "when_down": down(route.when_down, None if split else route.targets[0][1]),
                # A chain of error pages (the jump to a query's location, a pool standing in, then main) needs
                # nginx's recursive_error_pages where it starts.
                "recursive": bool(route.queries) or route.when_down not in (None, *WHEN_DOWN),
                "read_timeout": None if split else read_timeout(plan, route.targets[0][1]),
                "queries": [
                    {
                        "name": target.query.name,
                        "why": target.query.why,
                        "location": f"@sw_q_{route.rule.id}",
                        "upstream": target.upstream,
                        "pool": pool(plan, target.upstream),
                        "when_down": down(target.when_down, target.upstream),
                        "read_timeout": read_timeout(plan, target.upstream),
                    }
                    for target in route.queries
                ],
            }
        )
    bind = plan.public.bind_address
    trusted = plan.public.trusted_proxies
    text = _env.get_template("nginx.conf.j2").render(
        version=catalog.SYNAPSE_VERSION,
        n=nginx,
        public=plan.public,
        health_upstream=health_upstream or f"127.0.0.1:{plan.health_port}",
        nginx_dir=plan.layout.nginx_dir,
        upstreams=upstreams,
        routes=routes,
        private_prefixes=catalog.PRIVATE_PREFIXES,
        main=MAIN,
        listen_host=f"[{bind}]" if ":" in bind else bind,
        access_log=plan.layout.nginx_access_log if plan.disk_logs else None,
        trusted_proxies=trusted,
        trusted_networks=[proxy for proxy in trusted if proxy != "unix:"],
        trust_unix="unix:" in trusted,
        stand_in=MAIN in when_down,
        unavailable=UNAVAILABLE in when_down,
        query_maps=[
            {
                "name": query.name,
                "why": query.why,
                "key": nginx_quote(":".join(f"$arg_{arg}" for arg in query.args)),
                # nginx's map tries no regex on an empty value: "^$" is the exact empty string.
                "patterns": ['""' if pattern == "^$" else nginx_quote(f"~{pattern}") for pattern in query.patterns],
            }
            for query in queries.values()
        ],
        query_jump=QUERY_JUMP,
        main_pool=catalog.MAIN_POOL,
        pool_limits=list(plan.pool_limits.items()),
        limited_retry_after=LIMITED_RETRY_AFTER_SECONDS,
        limited_body=f"'{LIMITED_BODY}'",
        stand_ins=[
            {"upstream": name, "when_down": WHEN_DOWN[then], "read_timeout": timeout}
            for name, (then, timeout) in stand_ins.items()
        ],
        retry_after=RETRY_AFTER_SECONDS,
        unavailable_body=nginx_single_quote(UNAVAILABLE_BODY),
        # Unbuffered, a request body goes to the worker as it arrives and is not kept for main.
        body_streamed=nginx.proxy_request_buffering == "off",
        connect_timeout=CONNECT_TIMEOUT,
        metrics_proxy_port=plan.metrics_proxy_port,
        metrics_sockets=metrics_sockets(plan),
        extras=[_extra(extra) for extra in plan.extra_listeners],
        unrecognized_body=nginx_single_quote(catalog.UNRECOGNIZED_BODY),
        health_stale=HEALTH_STALE_SECONDS,
        worker_rlimit_nofile=FILES_PER_CONNECTION * nginx.worker_connections + SPARE_FILES,
        backlog=LISTEN_BACKLOG,
    )
    return {plan.layout.nginx_conf: text}


def pool(plan: Plan, upstream: str) -> str:
    """The pool an upstream's requests count against (plan.pool_limits): its role, or main."""
    return plan.upstream(upstream).role or catalog.MAIN_POOL


def read_timeout(plan: Plan, upstream: str) -> str | None:
    """The pool's own proxy_read_timeout (catalog.Role.read_timeout), if it has one."""
    role = plan.upstream(upstream).role
    return catalog.ROLES[role].read_timeout if role else None


def _extra(extra: ExtraListener) -> dict[str, object]:
    """A user's extra listener as its server block needs it. `::` is both families (ipv6only=off), as Synapse's
    `::` is on Linux; plan.ExtraListener already dropped a 0.0.0.0 beside it."""
    return {
        "source": extra.source,
        "resources": ", ".join(extra.resources) or "health only",
        "port": extra.port,
        "listen": [listen_address(address) for address in extra.bind_addresses],
        "tls_cert": extra.tls_cert,
        "tls_key": extra.tls_key,
        "root_redirect": extra.root_redirect,
        "served": [nginx_quote(prefix) for prefix in extra.served_prefixes],
        "unrecognized": list(extra.unrecognized_prefixes),
    }


def listen_address(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def metrics_sockets(plan: Plan) -> list[tuple[str, str]]:
    """(process, metrics socket) of every process whose metrics listener is a unix socket."""
    found = []
    for proc in plan.processes:
        listener = proc.listener(METRICS)
        if listener is not None and listener.path:
            found.append((proc.name, listener.path))
    return found


def _keepalive(tuning: NginxSettings, upstream: Upstream) -> int:
    if not tuning.upstream_keepalive_enable:
        return 0
    # Seed formula: idle connections kept per upstream = servers × 2 × multiplier.
    return len(upstream.servers) * 2 * tuning.upstream_keepalive_multiplier
