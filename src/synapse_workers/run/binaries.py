"""Finding the programs the stack runs: one lookup for `check` and `run`, each miss named with its package."""

from __future__ import annotations

import os
import shutil

from ..errors import UserError
from ..plan import Plan
from . import postgres

# name → (fallback path when not on PATH, the Debian package that ships it)
KNOWN = {
    "nginx": ("/usr/sbin/nginx", "nginx-light"),
    "setpriv": ("/usr/bin/setpriv", "util-linux"),
    "redis-server": ("/usr/bin/redis-server", "redis-server"),
}


def find(name: str) -> str:
    fallback, package = KNOWN[name]
    path = shutil.which(name) or (fallback if os.path.exists(fallback) else None)
    if not path:
        raise UserError(f"`{name}` is not installed: it comes with the Debian package {package}.")
    return path


def find_binaries(plan: Plan) -> dict[str, str]:
    """Every binary `run` needs for this plan, by the key `programs()` uses."""
    wanted = ["nginx", "setpriv"]
    if plan.redis and not plan.redis.external:
        wanted.append("redis-server")
    found = {name: find(name) for name in wanted}
    if plan.postgres:
        found["postgres"] = f"{postgres.postgres_bin()}/postgres"
        found["pg_isready"] = f"{postgres.postgres_bin()}/pg_isready"
    return found
