"""Finding the programs the stack runs: one lookup for `check` and `run`, each miss named with its package."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess

from ..errors import Problem, UserError, Variable
from ..plan import COTURN, METRICS, NGINX_EXPORTER, POSTGRES_EXPORTER, PROMETHEUS, REDIS_EXPORTER, ROTATE_LOGS, Plan
from . import postgres

# name → (fallback path when not on PATH, the Debian package that ships it)
KNOWN = {
    "nginx": ("/usr/sbin/nginx", "nginx-light"),
    "setpriv": ("/usr/bin/setpriv", "util-linux"),
    "redis-server": ("/usr/bin/redis-server", "redis-server"),
    "turnserver": ("/usr/bin/turnserver", "coturn"),
    "prometheus": ("/usr/bin/prometheus", "prometheus"),
    "prometheus-nginx-exporter": ("/usr/bin/prometheus-nginx-exporter", "prometheus-nginx-exporter"),
    "prometheus-redis-exporter": ("/usr/bin/prometheus-redis-exporter", "prometheus-redis-exporter"),
    "prometheus-postgres-exporter": ("/usr/bin/prometheus-postgres-exporter", "prometheus-postgres-exporter"),
    "logrotate": ("/usr/sbin/logrotate", "logrotate"),
}
MALLOC, COTURN_METRICS = Variable("SYNAPSE_MALLOC"), Variable("COTURN_METRICS")
COTURN_USER = "turnserver"  # created by Debian's coturn package
PROMETHEUS_USER = "prometheus"  # created by Debian's prometheus package


# SYNAPSE_MALLOC=jemalloc: preloaded into the Synapse processes (Debian's multiarch library paths).
JEMALLOC_PATHS = tuple(f"/usr/lib/{arch}-linux-gnu/libjemalloc.so.2" for arch in ("x86_64", "aarch64", "arm", "i386"))


def find_jemalloc() -> str:
    for path in JEMALLOC_PATHS:
        if os.path.exists(path):
            return path
    raise UserError(
        Problem(
            f"{MALLOC} (jemalloc, or auto in fork mode) needs libjemalloc.so.2, from the Debian package "
            f"libjemalloc2: install it (scripts/install.sh does), or set {MALLOC}=system for glibc's malloc.",
            MALLOC,
            expected=f"libjemalloc.so.2 installed (Debian's libjemalloc2), or {MALLOC}=system",
            found="no libjemalloc.so.2 in " + ", ".join(JEMALLOC_PATHS),
        )
    )


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
    coturn = plan.service(COTURN)
    if coturn is not None:
        wanted.append("turnserver")
    if plan.service(PROMETHEUS) is not None:
        wanted.append("prometheus")
    if plan.service(NGINX_EXPORTER) is not None:
        wanted.append("prometheus-nginx-exporter")
    if plan.service(REDIS_EXPORTER) is not None:
        wanted.append("prometheus-redis-exporter")
    if plan.service(POSTGRES_EXPORTER) is not None:
        wanted.append("prometheus-postgres-exporter")
    if any(job.name == ROTATE_LOGS for job in plan.jobs):
        wanted.append("logrotate")
    found = {name: find(name) for name in wanted}
    if plan.settings.core.jemalloc and plan.local_processes:
        found["jemalloc"] = find_jemalloc()
    if coturn is not None and coturn.listener(METRICS) is not None:
        _check_coturn_prometheus(found["turnserver"])
    if plan.postgres:
        bindir = postgres.postgres_bin(plan.postgres.data_dir)  # an existing cluster's own major's, when installed
        found["postgres"] = f"{bindir}/postgres"
        found["pg_isready"] = f"{bindir}/pg_isready"
    return found


def check_machine(plan: Plan, as_root: bool) -> None:
    """What `run` refuses about this machine before it writes or starts anything (a binary missing or built
    without what the settings need, jemalloc, PostgreSQL's binaries and system user), for `generate` and
    `check` too: their files are this machine's, so an OK from them must not be followed by a refusal from
    `run`. Starts nothing but `turnserver -h`."""
    find_binaries(plan)
    if plan.postgres:
        postgres.cluster_owner(as_root)


def _check_coturn_prometheus(turnserver: str) -> None:
    """COTURN_METRICS needs a turnserver built with Prometheus that can bind its exporter to loopback
    (--prometheus-address); without that option coturn would serve metrics on every address."""
    result = subprocess.run([turnserver, "-h"], capture_output=True, text=True, timeout=30, check=False)
    options = result.stdout + result.stderr
    if "--prometheus" not in options:
        raise UserError(
            Problem(
                f"{COTURN_METRICS} is on, but {turnserver} is built without Prometheus support (Debian's coturn "
                f"package is): unset {COTURN_METRICS}, or install a coturn built with Prometheus (libprom) and "
                "--prometheus-address.",
                COTURN_METRICS,
                expected=f"{COTURN_METRICS} off, or a turnserver with --prometheus and --prometheus-address",
                found=f"{turnserver} without --prometheus",
            )
        )
    if "--prometheus-address" not in options:
        raise UserError(
            Problem(
                f"{COTURN_METRICS} is on, but {turnserver} cannot bind its Prometheus exporter to loopback (no "
                f"--prometheus-address; it would listen on every address): unset {COTURN_METRICS} or use a newer "
                "coturn.",
                COTURN_METRICS,
                expected=f"{COTURN_METRICS} off, or a turnserver with --prometheus-address",
                found=f"{turnserver} without --prometheus-address",
            )
        )


def coturn_user(uid: int, gid: int) -> tuple[int, int]:
    """Who the built-in coturn runs as (as root): Debian's `turnserver` system user, else Synapse's UID:GID
    (which can read the TURN secret anyway). Never nobody: coturn's config holds that secret."""
    return _system_user(COTURN_USER, uid, gid)


def prometheus_user(uid: int, gid: int) -> tuple[int, int]:
    """Who the built-in Prometheus runs as (as root): Debian's `prometheus` system user, else Synapse's UID:GID."""
    return _system_user(PROMETHEUS_USER, uid, gid)


def _system_user(name: str, uid: int, gid: int) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return uid, gid
    return entry.pw_uid, entry.pw_gid
