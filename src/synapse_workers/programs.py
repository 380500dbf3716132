"""Plan → the programs to supervise on this host, in start stages. Pure.

How Synapse processes are started is behind `SynapseLauncher` (`SYNAPSE_LAUNCH_MODE`): `SeparateProcesses`
runs one `python -m synapse.app.*` per process under supervisord; `ForkedProcesses` runs one supervisord
program (`run/zygote.py`) that imports Synapse once and forks every Synapse process, which it carries as its
`children`. Either way every Synapse process is a `Program` with its own name, stage, health and PID.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote

from .plan import (
    BACKUP,
    COMPRESS_STATE,
    COTURN,
    HEALTH,
    MAIN,
    METRICS,
    NGINX,
    NGINX_EXPORTER,
    POSTGRES,
    POSTGRES_EXPORTER,
    PROMETHEUS,
    REDIS,
    REDIS_EXPORTER,
    ROTATE_LOGS,
    TURN,
    Job,
    Listener,
    Plan,
    Process,
    local_host,
    prometheus_storage,
)
from .settings import non_secret_given

STAGE_POSTGRES, STAGE_REDIS, STAGE_MAIN, STAGE_WORKERS, STAGE_NGINX = range(5)
STAGE_NAMES = ("postgres", "redis", "main", "workers", "nginx")


@dataclass(frozen=True)
class Health:
    kind: str  # http | redis | tcp | command | stun
    # URL, Redis's socket path or host:port, host:port (accepts a connection), or a shell-quoted command that
    # exits 0 when healthy
    target: str


@dataclass(frozen=True)
class Program:
    name: str
    command: tuple[str, ...]
    stage: int
    health: Health
    user: tuple[int, int] | None = None  # drop to uid:gid (only when started as root)
    env: dict[str, str] = field(default_factory=dict)
    stop_signal: str = "TERM"
    stop_wait: int = 10
    start_secs: int = 3
    critical: bool = True  # the stack cannot serve without it
    addon: bool = False  # beside Synapse (coturn, Prometheus, an exporter): `health` shows it, never fails on it
    log_file: str | None = None  # rotated copy of its output (SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK)
    # Its output may quote access tokens (nginx's error log quotes request lines): supervisord keeps no raw copy;
    # the output listener writes its capture and its log_file with tokens masked (run/logprefix.py).
    masked_log: bool = False
    # Processes this program forks and supervises itself (fork mode: the Synapse processes). supervisord
    # knows only this program; the launcher starts, stops and watches the children through it.
    children: tuple[Program, ...] = ()


# What a child process may inherit from the launcher's environment: nothing else (the environment holds
# POSTGRES_PASSWORD and the Synapse secrets; children read theirs from 0600 files). Synapse's own tuning
# variables pass (SYNAPSE_CACHE_FACTOR, SYNAPSE_CACHE_FACTOR_<NAME>); SYNAPSE_ASYNC_IO_REACTOR is validated
# and given to the Synapse processes alone, as "1" (synapse_environment).
INHERITED = ("PATH", "LANG", "LC_ALL", "TZ", "SYNAPSE_CACHE_FACTOR")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# nginx's worker processes: Debian's nginx is built with these defaults (our nginx.conf sets no `user`).
NGINX_WORKER_USER, NGINX_WORKER_GROUP = "nobody", "nogroup"


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The environment every child (supervisord, its programs, psql, health checks) starts from."""
    kept = {k: v for k, v in env.items() if k in INHERITED or k.startswith("SYNAPSE_CACHE_FACTOR_")}
    kept.setdefault("PATH", DEFAULT_PATH)
    return dict(sorted(kept.items()))


# SYNAPSE_MALLOC=jemalloc: one arena and no per-thread cache. Measured on the Complement set (fork mode, 20 s
# after ready): 737 MiB PSS with glibc, 710 with jemalloc's defaults, 690 with these (docs/benchmarks.md).
JEMALLOC_CONF = "narenas:1,tcache:false"


def malloc_environment(binaries: Mapping[str, str]) -> dict[str, str]:
    """The Synapse processes' allocator: jemalloc preloaded when `binaries` has it (SYNAPSE_MALLOC=jemalloc)."""
    if "jemalloc" not in binaries:
        return {}
    return {"LD_PRELOAD": binaries["jemalloc"], "MALLOC_CONF": JEMALLOC_CONF}


def synapse_health(proc: Process) -> Health:
    """Every Synapse process answers /health on its own loopback health listener."""
    listener = proc.listener(HEALTH)
    assert listener is not None, proc.name
    return Health("http", f"http://{listener.host}:{listener.port}/health")


class SynapseLauncher(Protocol):
    def command(self, plan: Plan, proc: Process) -> tuple[str, ...]: ...

    def arrange(self, plan: Plan, synapse: list[Program]) -> list[Program]:
        """The supervisord programs that run these Synapse processes."""
        ...


@dataclass(frozen=True)
class SeparateProcesses:
    """One `python -m synapse.app.*` per process: simple, and what Synapse documents."""

    python: str = sys.executable

    def command(self, plan: Plan, proc: Process) -> tuple[str, ...]:
        args = [arg for path in proc.config_files for arg in ("--config-path", path)]
        return (self.python, "-m", proc.app, *args)

    def arrange(self, plan: Plan, synapse: list[Program]) -> list[Program]:
        return synapse  # each its own program


@dataclass(frozen=True)
class ForkedProcesses(SeparateProcesses):
    """One program imports Synapse once and forks each process (`run/zygote.py`); the command of each child is
    the command line it shows (the same as with separate processes): the zygote runs that app's `main()`."""

    def arrange(self, plan: Plan, synapse: list[Program]) -> list[Program]:
        """The one supervisord program that forks these Synapse processes."""
        from .run.zygote import NAME, ChildSpec, control_socket, encode_specs  # no Synapse import at module level

        if not synapse:
            return []
        specs = [ChildSpec(p.name, p.command, p.start_secs, p.stop_wait) for p in synapse]
        control = control_socket(plan.layout.sockets_dir)
        first = synapse[0]
        zygote = Program(
            name=NAME,
            command=(self.python, "-m", "synapse_workers.run.zygote", control, encode_specs(specs)),
            stage=first.stage,  # started (and stopped) with main, before main is forked
            health=Health("command", shlex.join([self.python, "-m", "synapse_workers.run.zygote", "--ping", control])),
            user=first.user,
            env=first.env,
            stop_wait=max(p.stop_wait for p in synapse) + 5,  # it stops its children first
            start_secs=1,
            critical=True,
            children=tuple(synapse),
        )
        return [zygote]


LAUNCHERS: dict[str, SynapseLauncher] = {"process": SeparateProcesses(), "fork": ForkedProcesses()}


def flatten(programs: list[Program]) -> list[Program]:
    """Every program, each followed by the ones it forks itself."""
    return [q for p in programs for q in (p, *p.children)]


def programs(
    plan: Plan,
    as_root: bool,
    binaries: dict[str, str],
    launcher: SynapseLauncher | None = None,
    postgres_user: tuple[str, int, int] | None = None,
    coturn_user: tuple[int, int] | None = None,
    prometheus_user: tuple[int, int] | None = None,
) -> list[Program]:
    """binaries: paths of postgres, redis-server, nginx, setpriv, turnserver (found by the caller);
    coturn_user, prometheus_user: the uid, gid each runs as when started as root (looked up by the caller;
    default UID:GID)."""
    launcher = launcher or LAUNCHERS[plan.settings.core.launch_mode]
    core = plan.settings.core
    synapse_user = (core.uid, core.gid) if as_root else None
    disk_logs = plan.disk_logs
    result: list[Program] = []

    if plan.postgres and plan.local(POSTGRES):
        pg = plan.postgres
        assert postgres_user is not None, "the embedded cluster's owner is looked up by the caller"
        result.append(
            Program(
                name="postgres",
                command=(
                    binaries["postgres"],
                    "-D",
                    pg.data_dir,
                    "-c",
                    f"listen_addresses={pg.host or ''}",  # several hosts: its host's address too
                    "-c",
                    f"unix_socket_directories={pg.socket_dir}",
                    "-c",
                    f"max_connections={pg.max_connections}",
                ),
                stage=STAGE_POSTGRES,
                health=Health("command", _pg_isready(binaries, pg.socket_dir, postgres_user, as_root)),
                user=(postgres_user[1], postgres_user[2]) if as_root else None,
                stop_signal="INT",  # PostgreSQL's "fast" shutdown
                stop_wait=20,
                log_file=disk_logs and f"{disk_logs}/postgres.log",
            )
        )
    if plan.redis and not plan.redis.external and plan.local(REDIS):
        redis = plan.redis
        result.append(
            Program(
                name="redis",
                command=(binaries["redis-server"], plan.layout.redis_conf),
                stage=STAGE_REDIS,
                health=Health("redis", f"{redis.host}:{redis.port}" if redis.host else redis.path or ""),
                user=synapse_user,
                stop_wait=10,
                log_file=disk_logs and f"{disk_logs}/redis.log",
            )
        )
    env = {"PYTHONUNBUFFERED": "1", "HOME": core.data_dir, **malloc_environment(binaries)}
    if core.asyncio_reactor:  # Synapse parses it with strtobool at import: "1", never the user's spelling
        env["SYNAPSE_ASYNC_IO_REACTOR"] = "1"
    synapse: list[Program] = []
    for proc in plan.local_processes:
        synapse.append(
            Program(
                name=proc.name,
                command=launcher.command(plan, proc),
                stage=STAGE_MAIN if proc.is_main else STAGE_WORKERS,
                health=synapse_health(proc),
                user=synapse_user,
                env=env,
                stop_wait=15,
                start_secs=5,
                critical=proc.is_main,
            )
        )
    result += launcher.arrange(plan, synapse)
    if plan.local(NGINX):
        result += _front(plan, binaries, as_root, synapse_user, disk_logs, coturn_user, prometheus_user)
    result += redis_exporter_programs(plan, binaries, synapse_user, disk_logs)
    result += postgres_exporter_programs(plan, binaries, synapse_user, disk_logs)
    if plan.local(NGINX):  # several hosts: it rotates nginx's logs
        result += scheduler_programs(plan, disk_logs)
    if as_root:
        result = [_drop_privileges(p, binaries["setpriv"]) for p in result]
    return result


def _front(
    plan: Plan,
    binaries: dict[str, str],
    as_root: bool,
    synapse_user: tuple[int, int] | None,
    disk_logs: str | None,
    coturn_user: tuple[int, int] | None,
    prometheus_user: tuple[int, int] | None,
) -> list[Program]:
    """nginx and the add-ons that run beside it (several hosts: on nginx's host)."""
    result: list[Program] = []
    result.append(
        Program(
            name="nginx",
            # run/nginx_start.py first kills what a SIGKILLed nginx master left holding the ports, then execs nginx.
            command=(
                sys.executable,
                "-m",
                "synapse_workers.run.nginx_start",
                binaries["nginx"],
                "-c",
                plan.layout.nginx_conf,
                "-g",
                "daemon off;",
            ),
            stage=STAGE_NGINX,
            health=Health("http", f"{plan.public.local_url}/_matrix/client/versions"),
            stop_signal="QUIT",  # graceful: finish requests in flight
            stop_wait=10,
            log_file=disk_logs and plan.layout.nginx_error_log,  # rotated daily with the access log (logrotate)
            masked_log=True,
        )
    )
    result += coturn_programs(plan, binaries, (coturn_user or synapse_user) if as_root else None, disk_logs)
    metrics_user = (prometheus_user or synapse_user) if as_root else None
    result += prometheus_programs(plan, binaries, metrics_user, disk_logs)
    result += nginx_exporter_programs(plan, binaries, metrics_user, disk_logs)
    return result


def remote_waits(plan: Plan, stage: int) -> dict[str, Health]:
    """Several hosts: what runs elsewhere that this host's stage needs first (its start waits for them):
    PostgreSQL and Redis before Synapse starts here, main before this host's workers (it migrates the schema)."""
    if plan.placement is None:
        return {}
    local = plan.local_processes
    waits: dict[str, Health] = {}
    if stage == STAGE_MAIN and local:
        if plan.postgres is not None and not plan.local(POSTGRES):
            waits["postgres"] = Health("tcp", f"{plan.postgres.host}:{plan.postgres.port}")
        if plan.redis is not None and plan.redis.host is not None and not plan.local(REDIS):
            waits["redis"] = Health("redis", f"{plan.redis.host}:{plan.redis.port}")
    if stage == STAGE_WORKERS and any(not p.is_main for p in local) and not plan.local(MAIN):
        waits[MAIN] = synapse_health(plan.main)
    # nginx does not wait for workers elsewhere: a worker host that is down must not keep the front from serving
    # (its routes fall back to main, or answer 503, as when a local worker is down).
    return waits


def _pg_isready(binaries: dict[str, str], socket_dir: str, owner: tuple[str, int, int], as_root: bool) -> str:
    """As the cluster owner over peer auth: a wrong user would make PostgreSQL log a failed login."""
    name, uid, gid = owner
    command = [binaries["pg_isready"], "-q", "-h", socket_dir, "-U", name, "-d", "postgres", "-t", "2"]
    if as_root:
        command = [*setpriv_prefix(binaries["setpriv"], uid, gid), *command]
    return shlex.join(command)


def _drop_privileges(program: Program, setpriv: str) -> Program:
    if program.user is None:
        return program
    uid, gid = program.user
    # setpriv needs no passwd entry for UID/GID, unlike supervisor's own `user=`.
    command = (*setpriv_prefix(setpriv, uid, gid), *program.command)
    return Program(**{**vars(program), "command": command})


def setpriv_prefix(setpriv: str, uid: int, gid: int) -> tuple[str, ...]:
    """Run the rest of a command as uid:gid with no supplementary groups (root's must not leak)."""
    return (setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--")


def coturn_programs(
    plan: Plan, binaries: dict[str, str], user: tuple[int, int] | None, disk_logs: str | None
) -> list[Program]:
    """The built-in coturn (SYNAPSE_ENABLE_BUILTIN_COTURN): started with nginx, after Synapse, and stopped first.

    Not critical: calls need it, chat does not, so a crash loop stops coturn alone. Its config (with the TURN
    secret) is read from the 0600 file `files` writes for `user`; logging goes to stdout from the first line
    (the options on the command line: otherwise coturn opens a log file under /var/log or /var/tmp first)."""
    service = plan.service(COTURN)
    if service is None:
        return []
    listener = service.listener(TURN)
    assert listener is not None and listener.port is not None
    host = local_host(listener.host)
    command = (binaries["turnserver"], "--log-file", "stdout", "--simple-log", "-c", plan.layout.coturn_conf)
    health = Health("stun", f"{host}:{listener.port}")  # a STUN binding request over UDP
    return [_addon(COTURN, command, health, user, disk_logs and f"{disk_logs}/coturn.log")]


def prometheus_programs(
    plan: Plan, binaries: dict[str, str], user: tuple[int, int] | None, disk_logs: str | None
) -> list[Program]:
    """The built-in Prometheus (SYNAPSE_METRICS): started with nginx, after every Synapse process it scrapes.

    Not critical: a crash loop stops Prometheus alone. Retention and storage are command-line flags (they are
    not config-file settings in Prometheus); health is its own readiness endpoint."""
    service = plan.service(PROMETHEUS)
    if service is None:
        return []
    metrics = plan.settings.metrics
    listener = service.main
    host = local_host(listener.host)
    url_host = f"[{host}]" if ":" in host else host
    bind = f"[{listener.host}]" if listener.host and ":" in listener.host else listener.host
    command = (
        binaries["prometheus"],
        f"--config.file={plan.layout.prometheus_conf}",
        f"--storage.tsdb.path={prometheus_storage(plan)}",
        f"--storage.tsdb.retention.time={metrics.retention}",
        f"--web.listen-address={bind}:{listener.port}",
    )
    health = Health("http", f"http://{url_host}:{listener.port}/-/ready")
    log_file = disk_logs and f"{disk_logs}/prometheus.log"
    # stop_wait 20: it writes its head block out on the way down
    return [_addon(PROMETHEUS, command, health, user, log_file, stop_wait=20)]


def nginx_exporter_programs(
    plan: Plan, binaries: dict[str, str], user: tuple[int, int] | None, disk_logs: str | None
) -> list[Program]:
    """prometheus-nginx-exporter (SYNAPSE_METRICS): nginx's stub_status on its loopback metrics server, served to
    Prometheus on loopback. Started with nginx (it retries until nginx answers); not critical."""
    service = plan.service(NGINX_EXPORTER)
    if service is None:
        return []
    listener = service.listener(METRICS)
    assert listener is not None and plan.metrics_proxy_port is not None
    command = (
        binaries["prometheus-nginx-exporter"],
        f"-nginx.scrape-uri=http://127.0.0.1:{plan.metrics_proxy_port}/stub_status",
        "-nginx.retries=30",
        "-nginx.retry-interval=1s",
        f"-web.listen-address={listener.host}:{listener.port}",
    )
    return [_exporter(NGINX_EXPORTER, command, listener, user, disk_logs and f"{disk_logs}/nginx_exporter.log")]


def redis_exporter_programs(
    plan: Plan, binaries: dict[str, str], user: tuple[int, int] | None, disk_logs: str | None
) -> list[Program]:
    """prometheus-redis-exporter (SYNAPSE_ENABLE_REDIS_METRIC_EXPORT, with SYNAPSE_METRICS and the stack's own
    Redis): as Synapse's user, the only one that may open Redis's socket (unixsocketperm 700). Not critical."""
    service = plan.service(REDIS_EXPORTER)
    if service is None:
        return []
    listener = service.listener(METRICS)
    assert listener is not None and plan.redis is not None and plan.redis.path
    command = (
        binaries["prometheus-redis-exporter"],
        f"-redis.addr=unix://{plan.redis.path}",
        f"-web.listen-address={listener.host}:{listener.port}",
    )
    return [_exporter(REDIS_EXPORTER, command, listener, user, disk_logs and f"{disk_logs}/redis_exporter.log")]


def postgres_exporter_programs(
    plan: Plan, binaries: dict[str, str], user: tuple[int, int] | None, disk_logs: str | None
) -> list[Program]:
    """prometheus-postgres-exporter (SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT, with SYNAPSE_METRICS): as Synapse's user,
    connecting like Synapse, to the embedded cluster's socket or to the external POSTGRES_HOST:POSTGRES_PORT; the
    password from a 0600 file of Synapse's user (`files.ensure_secrets` writes it alone: the exporter's lib/pq
    reads no libpq passfile), never in an argument or environment."""
    service = plan.service(POSTGRES_EXPORTER)
    if service is None:
        return []
    listener = service.listener(METRICS)
    assert listener is not None
    # postgresql://USER:<password from the file>@HOST/DB: with no host in the URL, lib/pq takes a socket dir from
    # the query. Only the file's path is in this program's environment.
    if plan.postgres is not None:
        uri = f"/synapse?host={quote(plan.postgres.socket_dir, safe='/')}&sslmode=disable"
        role, password_file = "synapse", plan.secrets.postgres_password
    else:
        db = plan.settings.database
        sslmode = plan.settings.metrics.postgres_export_sslmode
        name = quote(db.name, safe="")
        if db.host.startswith("/"):
            uri = f"/{name}?host={quote(db.host, safe='/')}&port={db.port}&sslmode=disable"
        else:
            host = f"[{db.host}]" if ":" in db.host else db.host
            uri = f"{host}:{db.port}/{name}?sslmode={sslmode}"
        role, password_file = db.user, plan.secrets.external_postgres_password
    env = {"DATA_SOURCE_URI": uri, "DATA_SOURCE_USER": role, "DATA_SOURCE_PASS_FILE": password_file}
    command = (binaries["prometheus-postgres-exporter"], f"--web.listen-address={listener.host}:{listener.port}")
    log_file = disk_logs and f"{disk_logs}/postgres_exporter.log"
    return [_exporter(POSTGRES_EXPORTER, command, listener, user, log_file, env)]


def _exporter(
    name: str,
    command: tuple[str, ...],
    listener: Listener,
    user: tuple[int, int] | None,
    log_file: str | None,
    env: dict[str, str] | None = None,
) -> Program:
    """A Prometheus exporter: healthy when its /metrics answers."""
    health = Health("http", f"http://{listener.host}:{listener.port}/metrics")
    return _addon(name, command, health, user, log_file, env=env)


def _addon(
    name: str,
    command: tuple[str, ...],
    health: Health,
    user: tuple[int, int] | None,
    log_file: str | None,
    env: dict[str, str] | None = None,
    stop_wait: int = 10,
) -> Program:
    """A program beside Synapse (coturn, Prometheus, an exporter): started with nginx, not critical (a crash
    loop stops it alone), shown by `health` but never deciding it."""
    return Program(
        name=name,
        command=command,
        stage=STAGE_NGINX,
        health=health,
        user=user,
        env=env or {},
        stop_signal="TERM",
        stop_wait=stop_wait,
        start_secs=2,
        critical=False,
        addon=True,
        log_file=log_file,
    )


SCHEDULER = "scheduler"


def scheduler_programs(plan: Plan, disk_logs: str | None) -> list[Program]:
    """The stack's scheduler (`run/scheduler.py`), when the plan has jobs: it runs each job's command (`job_command`)
    when its cron expression is due, one instance of a job at a time, and logs one line per run. As the launcher's
    user (root in a container): it signals nginx's master to reopen its logs and reads the database password file.
    Not critical; healthy while its loop keeps touching its heartbeat file."""
    if not plan.jobs:
        return []
    python = sys.executable
    command = (python, "-m", "synapse_workers.run.scheduler", plan.layout.jobs_file)
    alive = shlex.join([python, "-m", "synapse_workers.run.scheduler", "--alive", plan.layout.scheduler_heartbeat])
    log_file = disk_logs and f"{disk_logs}/scheduler.log"
    return [_addon(SCHEDULER, command, Health("command", alive), None, log_file, env={"PYTHONUNBUFFERED": "1"})]


def job_command(plan: Plan, job: Job) -> tuple[str, ...]:
    """What a job runs (the scheduler, or `synapse-workers compress-state` now): no secret in it."""
    layout = plan.layout
    if job.name == COMPRESS_STATE:
        c = plan.settings.compressor
        # Main's config files, in Synapse's order: the last one with a `database` section is what Synapse uses
        # (several hosts: shared.yaml's, the cluster over TCP).
        configs = [arg for path in plan.main.config_files for arg in ("--config", path)]
        return (
            sys.executable,
            "-m",
            "synapse_workers.run.compressor",
            *configs,
            "--chunk-size",
            str(c.chunk_size),
            "--chunks",
            str(c.chunks),
            "--levels",
            c.levels,
            "--lock",
            layout.compressor_lock,
        )
    if job.name == ROTATE_LOGS:
        # logrotate from PATH (Debian: /usr/sbin, in every child's PATH); `run` checked that it is installed.
        # --force: the schedule decides when (daily); logrotate's own `daily` would only record a log it sees for
        # the first time, and its state file is new whenever the runtime dir is (a container recreated daily
        # would never rotate). notifempty still holds under --force.
        return ("logrotate", "--force", "--state", layout.logrotate_state, layout.logrotate_conf)
    if job.name == BACKUP:
        b = plan.settings.backup
        assert b.dir is not None  # settings: required with SYNAPSE_BACKUP_SCHEDULE
        return (sys.executable, "-m", "synapse_workers.cli", "backup", "-o", b.dir, "--keep", str(b.keep))
    raise ValueError(f"unknown job {job.name}")


def job_environment(plan: Plan, job: Job) -> dict[str, str]:
    """What a job gets besides the minimal child environment: `synapse-workers backup` makes the launcher's plan
    again from the variables given to it (secrets left out: it reads their stored files); the others get nothing."""
    if job.name == BACKUP:
        return non_secret_given(plan.settings)
    return {}
