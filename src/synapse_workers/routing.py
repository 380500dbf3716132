"""Route emulation: the decision nginx makes for a request, for `routes` and the tests.

nginx matches `location ~` regexes on the decoded, normalised URI in file order; the first match wins. The
plan's routes are in that same order, so the first route whose pattern matches is where nginx sends it.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from . import catalog
from .errors import UserError
from .plan import MAIN, UNAVAILABLE, Plan, Route


def normalise(path: str) -> str:
    """nginx matches locations on the decoded URI: no query, merged slashes, dot segments resolved."""
    path = re.sub(r"/{2,}", "/", unquote(path.split("?", 1)[0]))
    segments: list[str] = []
    parts = path.split("/")[1:]
    for segment in parts:
        if segment == "..":
            if segments:
                segments.pop()
        elif segment != ".":
            segments.append(segment)
    trailing = bool(parts) and parts[-1] in ("", ".", "..") and segments
    return "/" + "/".join(segments) + ("/" if trailing and segments[-1] != "" else "")


def nginx_arg(path: str, name: str) -> str:
    """nginx's `$arg_<name>` for a request target: the value of the first `&`-separated parameter whose name is
    `name` without regard to case, as sent (not decoded); empty when there is none."""
    query = path.split("?", 1)[1] if "?" in path else ""
    for part in query.split("&"):
        key, equals, value = part.partition("=")
        if equals and key.lower() == name.lower():
            return value
    return ""


def in_class(query: catalog.Query, path: str) -> bool:
    """Whether the request target is in the query class, as nginx's `map` decides it (render/nginx.py)."""
    key = ":".join(nginx_arg(path, arg) for arg in query.args)
    return any(re.search(pattern, key) for pattern in query.patterns)


def private_path(path: str) -> bool:
    return any(normalise(path).startswith(prefix) for prefix in catalog.PRIVATE_PREFIXES)


def match_route(plan: Plan, path: str) -> Route | None:
    uri = normalise(path)
    for route in plan.routes:
        if re.search(route.rule.pattern, uri):
            return route
    return None


def _answered_by_nginx(method: str, path: str, status: int, why: str) -> dict[str, Any]:
    """A request no Synapse process sees."""
    return {"method": method, "path": path, "status": status, "upstream": None, "servers": [], "why": why}


def explain(plan: Plan, method: str, path: str, port: int | None = None) -> dict[str, Any]:
    """Where nginx sends METHOD PATH, and why; `port`: received on that port (one of the user's extra listeners
    only answers what Synapse mounts for its resources, then routes like the public port)."""
    method = method.upper()
    extra = None
    if port is not None and port not in (plan.public.port, plan.public.tls_port):
        extra = next((x for x in plan.extra_listeners if x.port == port), None)
        if extra is None:
            ports = [plan.public.port, *(x.port for x in plan.extra_listeners)]
            raise UserError(f"routes --port {port}: nginx does not listen there: expected one of {ports}.")
    if extra is not None and not extra.serves(normalise(path)):
        uri = normalise(path)
        parent = next((p for p in extra.unrecognized_prefixes if uri.startswith(p + "/")), None)
        answer = "404 M_UNRECOGNIZED (Synapse's answer there)" if parent else "a plain 404"
        served = ", ".join(extra.resources) or "health only"
        why = f"{extra.source} (port {extra.port}) serves {served}, which do not mount this path: nginx answers "
        why += answer
        return _answered_by_nginx(method, path, 404, why)
    if normalise(path) == "/health":
        why = (
            "the whole stack's health (same as `synapse-workers health`): nginx answers from its copy of the "
            "launcher's verdict, at most a second old, counted in no pool"
        )
        return _answered_by_nginx(method, path, 200, why)
    if private_path(path):
        return _answered_by_nginx(method, path, 404, "internal-only path: nginx refuses it on the public port")
    route = match_route(plan, path)
    if route is None:
        return {
            "method": method,
            "path": path,
            "rule": None,
            "upstream": MAIN,
            "servers": [MAIN],
            "why": "no worker route matches: main serves everything not routed elsewhere",
            **_bound(plan, catalog.MAIN_POOL),
        }
    rule = route.rule
    why = rule.why or f"docs/workers.md group '{rule.group}'"
    target = next((q for q in route.queries if in_class(q.query, path)), None)
    if target is not None:
        upstream = plan.upstream(target.upstream)
        why = f"{why}; this request is {target.query.why}"
        when_down = target.when_down
    else:
        upstream = plan.upstream(route.upstream_for(method))
        when_down = route.when_down
        if route.queries:
            why = f"{why}; this request is not {' or '.join(q.query.why for q in route.queries)}"
    if upstream.name == MAIN:
        roles = [r for b in rule.branches if b.methods is None or method in b.methods for r in b.roles]
        wanted = " or ".join(dict.fromkeys(roles))
        why = (
            f"{why}; no {wanted} worker is deployed, so main serves {method}"
            if wanted
            else f"{why}; {method} is served by main only"
        )
    return {
        "method": method,
        "path": path,
        "rule": rule.id,
        "pattern": rule.pattern,
        "upstream": upstream.name,
        "servers": list(upstream.servers),
        "balance": upstream.balance,
        "hard": rule.hard,
        "why": why,
        "when_down": _when_down(plan, when_down, upstream.name),
        **_bound(plan, upstream.role or catalog.MAIN_POOL),
    }


def _bound(plan: Plan, pool: str) -> dict[str, Any]:
    """The pool a request counts against and how many it holds in flight before nginx answers 429."""
    return {"pool": pool, "limit": plan.pool_limits[pool]}


def _when_down(plan: Plan, when_down: str | None, upstream: str) -> str | None:
    """What nginx answers while every server of the upstream is down (None: the upstream is main)."""
    if upstream == MAIN:
        return None
    if when_down == MAIN:
        return "main answers instead (it serves this endpoint too)"
    if when_down == UNAVAILABLE or when_down is None:
        return "503 with Retry-After at once (only this worker type serves it)"
    role = plan.upstream(when_down).role
    then = "main" if role and catalog.ROLES[role].main_can_stand_in else "503 with Retry-After"
    return f"{when_down} answers instead (it serves this endpoint too), and {then} while it is down as well"
