"""The `synapse-workers` command: thin wrappers around load → plan → render → files."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from . import __version__, catalog
from .errors import Argument, File, Problem, UserError, Variable, as_problem
from .files import write_files
from .layout import make_layout
from .load import load_plan
from .plan import Plan
from .render import render_all
from .routing import explain
from .settings import runtime_dir, unknown_variables

if TYPE_CHECKING:
    from .run.status import StackStatus

# What `set_defaults(func=...)` stores for each subcommand: parsed arguments and the environment in, exit code out.
Command = Callable[[argparse.Namespace, Mapping[str, str]], int]


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ if env is None else env
    said: list[Problem] = []  # every warning of this run, as data (`check --json` lists them)
    try:
        argv, env = _official_arguments(argv, env, said)
    except UserError as exc:
        for problem in exc.problems:
            print(f"synapse-workers: error: {problem}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.warnings = said
    if args.command not in ("status", "health", "mask-output"):  # those read nothing of the environment
        for warning in unknown_variables(env):
            _warn(args, warning)
    try:
        command: Command = args.func
        code = command(args, env)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # `synapse-workers env | head`: the reader has gone; a quiet exit, like any Unix filter.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UserError as exc:
        for problem in exc.problems:
            print(f"synapse-workers: error: {problem}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"synapse-workers: cannot write or read {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _warn(args: argparse.Namespace | list[Problem], warning: str) -> None:
    """Say a warning on stderr, and keep it (as data) for `check --json`."""
    print(f"synapse-workers: warning: {warning}", file=sys.stderr)
    said = args if isinstance(args, list) else getattr(args, "warnings", None)
    if said is not None:
        said.append(as_problem(warning))


def _official_arguments(
    argv: list[str], env: Mapping[str, str], said: list[Problem]
) -> tuple[list[str], Mapping[str, str]]:
    """Arguments written for the official image (an Unraid template's Post Arguments): our own instead, with a
    warning naming what was ignored (official_args.py)."""
    from .official_args import translate

    translation = translate(argv, env)
    if translation is None:
        return argv, env
    for warning in translation.warnings:
        _warn(said, warning)
    if not translation.env:
        return translation.argv, env
    if env is os.environ:
        os.environ.update(translation.env)  # the scheduler's jobs (compress-state) read the same file
    return translation.argv, {**env, **translation.env}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synapse-workers",
        description=f"Synapse {catalog.SYNAPSE_VERSION} with workers and an internal nginx, from the environment.",
    )
    parser.add_argument(
        "--version", action="version", version=f"synapse-workers {__version__} (Synapse {catalog.SYNAPSE_VERSION})"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    generate = sub.add_parser("generate", help="validate the environment and write every config file")
    _host_option(generate)
    generate.set_defaults(func=cmd_generate)
    plan = sub.add_parser("plan", help="print the deployment plan; writes nothing")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    _host_option(plan)
    plan.set_defaults(func=cmd_plan)
    check = sub.add_parser("check", help="generate, then nginx -t and Synapse's config loader on every process")
    check.add_argument(
        "--json",
        action="store_true",
        help="one object on stdout: problems and warnings as data (variable or YAML path, expected, found), the "
        "checks run, the exit code (unchanged)",
    )
    _host_option(check)
    check.set_defaults(func=cmd_check)
    routes = sub.add_parser("routes", help="explain where a request goes: routes [METHOD] PATH")
    routes.add_argument("words", nargs="+", metavar="[METHOD] PATH")
    routes.add_argument("--json", action="store_true")
    routes.add_argument(
        "--port", type=int, help="as received on this port: the public one (default) or a listener of homeserver.yaml"
    )
    routes.set_defaults(func=cmd_routes)
    run = sub.add_parser("run", help="generate, then start and supervise the whole stack (container entrypoint)")
    _host_option(run)
    run.set_defaults(func=cmd_run)
    sub.add_parser("health", help="exit 0 only when nginx, main and every worker answer /health").set_defaults(
        func=cmd_health
    )
    status = sub.add_parser("status", help="every process of the running stack: PID, state, uptime, restarts")
    status.add_argument("--json", action="store_true", help="a list of objects (name, pid, state, uptime_s, ...)")
    status.set_defaults(func=cmd_status)
    port = sub.add_parser(
        "port-sqlite",
        help="port homeserver.yaml's SQLite database into the embedded PostgreSQL cluster (stack stopped; the file "
        "is not edited: shared.yaml sets the new database over it)",
    )
    port.add_argument(
        "--force",
        action="store_true",
        help="ported already: start over from the SQLite file (what the server wrote to PostgreSQL since is lost)",
    )
    port.set_defaults(func=cmd_port_sqlite)
    compress = sub.add_parser(
        "compress-state",
        help="run synapse_auto_compressor once, now, against the running stack's PostgreSQL; exit with its status",
    )
    _host_option(compress)
    compress.set_defaults(func=cmd_compress_state)
    upgrade = sub.add_parser(
        "upgrade-postgres",
        help="upgrade the embedded PostgreSQL cluster to the newest installed major with pg_upgrade (stack stopped); "
        "the old cluster is kept as postgres.old-<major>",
    )
    upgrade.add_argument(
        "--old-bindir",
        metavar="DIR",
        help="the cluster's own (old) PostgreSQL's bin directory (default: /usr/lib/postgresql/<old major>/bin)",
    )
    upgrade.add_argument(
        "--link",
        action="store_true",
        help="hard-link the data files instead of copying them: fast, no second copy, but the old cluster cannot "
        "be started again once the new one has run",
    )
    _host_option(upgrade)
    upgrade.set_defaults(func=cmd_upgrade_postgres)
    backup = sub.add_parser(
        "backup",
        help="back up the server while it runs: one database snapshot, keys, secrets, config, media (incremental)",
    )
    backup.add_argument("-o", "--output", metavar="DIR", help="the destination: each backup is DIR/<UTC stamp>/")
    backup.add_argument("--keep", type=int, metavar="N", help="then remove the oldest complete backups beyond N")
    backup.add_argument(
        "--verify", metavar="PATH", help="instead: recheck one backup's files against its manifest (exit 0/1)"
    )
    backup.set_defaults(func=cmd_backup)
    restore = sub.add_parser(
        "restore", help="put a backup back into an empty data dir (the environment names it), database included"
    )
    restore.add_argument("path", metavar="PATH", help="one backup: DIR/<UTC stamp>/")
    restore.set_defaults(func=cmd_restore)
    env = sub.add_parser(
        "env", help="every variable: meaning, default and the value set here (secrets masked), as an env file"
    )
    env.add_argument("--json", action="store_true", help="a list of objects (name, default, description, value, ...)")
    env.set_defaults(func=cmd_env)
    sub.add_parser(
        "unraid-template", help="print the Unraid Community Applications template (contrib/unraid/synapse-workers.xml)"
    ).set_defaults(func=cmd_unraid_template)
    export = sub.add_parser(
        "export", help="write the plan as Kubernetes manifests or a Compose project (one Synapse process per pod)"
    )
    export.add_argument("target", choices=("kubernetes", "compose"))
    export.add_argument("-o", "--output", required=True, metavar="DIR", help="a new or empty directory, or our own")
    export.add_argument("--image", default="synapse-workers:latest", help="the image built from this repository")
    export.set_defaults(func=cmd_export)
    mask = sub.add_parser(
        "mask-output",
        help="run a command with access tokens masked in its output (the exported nginx containers use it)",
    )
    mask.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="the command and its arguments")
    mask.set_defaults(func=cmd_mask_output)
    return parser


def _host_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        metavar="NAME",
        help="with SYNAPSE_HOSTS: the host (a name there) whose slice of the deployment to render and run",
    )


def _slice_plan(args: argparse.Namespace, env: Mapping[str, str]) -> Plan:
    """The plan for the host this runs on: with SYNAPSE_HOSTS, --host NAME is required."""
    plan = load_plan(env, args.host)
    if plan.placement is not None and plan.placement.here is None:
        hosts, variable = ", ".join(plan.placement.hosts), Variable("SYNAPSE_HOSTS")
        raise UserError(
            Problem(
                f"{variable} is set: expected --host NAME, the host this runs on (one of {hosts}).",
                Argument("--host"),
                expected=f"--host NAME, one of {hosts}",
                found="no --host",
                related=(variable,),
            )
        )
    for warning in plan.warnings:  # generate, check and run: listeners of the user's file that are not served
        _warn(args, warning)
    return plan


def cmd_generate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .run.binaries import check_machine

    plan = _slice_plan(args, env)
    check_machine(plan, os.geteuid() == 0)  # what `run` would refuse here (binaries, their build, users)
    _warn_weak_secrets(plan, args)
    written = write_files(plan, render_all(plan))
    if plan.placement is not None:
        here = plan.placement.here
        names = [p.name for p in plan.local_processes] + [s for s in ("nginx", "postgres", "redis") if _runs(plan, s)]
        print(
            f"synapse-workers: wrote {len(written)} files for host {here}: {', '.join(names) or 'nothing to run'} "
            f"(firewall: {plan.layout.nftables_conf})"
        )
        return 0
    print(
        f"synapse-workers: wrote {len(written)} files for main + {len(plan.workers)} workers "
        f"(nginx: {plan.layout.nginx_conf})"
    )
    return 0


def _runs(plan: Plan, service: str) -> bool:
    exists = {"nginx": True, "postgres": plan.postgres is not None, "redis": bool(plan.redis and plan.redis.host)}
    return exists[service] and plan.local(service)


def cmd_plan(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    plan = load_plan(env, args.host)
    if args.json:
        print(json.dumps(plan.as_json(), indent=2))
        return 0
    print(
        f"server_name {plan.homeserver.server_name}; public port {plan.public.port}; Synapse {catalog.SYNAPSE_VERSION}"
    )
    ported = plan.homeserver.sqlite_port
    if ported is not None:
        print(f"  database: the embedded PostgreSQL, ported from {ported.sqlite_database} at {ported.ported_at}")
    for extra in plan.extra_listeners:
        tls = " (TLS)" if extra.tls_cert else ""
        addresses = ", ".join(f"[{a}]" if ":" in a else a for a in extra.bind_addresses)
        print(f"  nginx also serves {extra.source}: port {extra.port}{tls} on {addresses}: {'+'.join(extra.resources)}")
    for proc in plan.processes:
        listeners = ", ".join(f"{lst.kind}={lst.address}" for lst in proc.listeners)
        types = "+".join(proc.types) or "main"
        where = f"{plan.placement.where[proc.name]:10} " if plan.placement else ""
        print(f"  {proc.name:28} {where}{types:40} {listeners}")
    if plan.placement is not None:
        for service in ("nginx", "postgres", "redis"):
            print(f"  {service:28} {plan.placement.where[service]}")
    for job in plan.jobs:
        print(f"  job {job.name:24} {job.schedule}")
    return 0


def cmd_check(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    if not args.json:
        return _check(args, env, [])
    checks: list[dict[str, object]] = []
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # stdout holds the one JSON object
            code = _check(args, env, checks)
    except UserError as exc:
        _check_json(args, 2, exc.details, checks)
        raise  # said on stderr as without --json: exit 2
    _check_json(args, code, [], checks)
    return code


def _check_json(args: argparse.Namespace, code: int, problems: list[Problem], checks: list[dict[str, object]]) -> None:
    """`check --json`: the refusals (exit 2) and the warnings as data, and each check that ran (nginx -t,
    Synapse's loader per process, logrotate -d)."""
    report = {
        "ok": code == 0,
        "exit_code": code,
        "problems": [p.as_json() for p in problems],
        "warnings": [w.as_json() for w in args.warnings],
        "checks": checks,
    }
    print(json.dumps(report, indent=2))


def _check(args: argparse.Namespace, env: Mapping[str, str], checks: list[dict[str, object]]) -> int:
    from .run import access, port_sqlite, postgres
    from .run.binaries import check_machine
    from .run.prepare import dir_problems

    plan = _slice_plan(args, env)
    check_machine(plan, os.geteuid() == 0)  # what `run` would refuse here (binaries, their build, users)
    _warn_start(plan, env, args)
    _warn_memory(plan, args, now=False)  # beside a running stack, its own memory is not available: ceilings only
    problems: list[str] = [*access.check(plan, os.geteuid() == 0)]  # what `run` refuses before anything starts
    problems += dir_problems(plan, os.geteuid() == 0)  # the runtime dir's and Prometheus's storage's way
    problems += postgres.version_problems(plan)  # an embedded cluster these binaries cannot open
    problems += port_sqlite.cluster_problems(plan)  # ported from SQLite, but the embedded cluster is gone
    if problems:
        raise UserError(*problems)
    write_files(plan, render_all(plan))
    ok = _nginx_test(plan, checks) if plan.local("nginx") else True
    ok = _synapse_test(plan, checks) and ok
    ok = _logrotate_test(plan, checks) and ok
    print("check: OK" if ok else "check: FAILED")
    return 0 if ok else 1


def _warn_start(plan: Plan, env: Mapping[str, str], args: argparse.Namespace) -> None:
    """Settings that will do nothing here (start_warnings.py), internal ports in the ephemeral range, and an
    embedded cluster running with an older major's binaries than the newest installed."""
    from .run.postgres import version_warning
    from .start_warnings import facts_here, start_warnings

    for warning in start_warnings(plan, env, facts_here(plan, env)):
        _warn(args, warning)
    older_cluster = version_warning(plan)
    if older_cluster is not None:
        _warn(args, older_cluster)
    _warn_ephemeral(plan, args)
    _warn_weak_secrets(plan, args)


def _warn_weak_secrets(plan: Plan, args: argparse.Namespace) -> None:
    """Stored secrets too short to be secrets (`files.weak_secret_files`): replaced by the writer, said here."""
    from .files import weak_secret_files
    from .settings import SECRET_MIN_LENGTH

    for path in weak_secret_files(plan):
        _warn(
            args,
            Problem(
                f"{path} holds a secret shorter than {SECRET_MIN_LENGTH} characters (the Unraid template before 0.2 "
                "sent the word 'generated' as every secret): it is replaced with a random one now. If it was the "
                "macaroon key, guest sessions and unfinished SSO logins start again; nothing else changes for users.",
                File(path),
                expected=f"a secret of at least {SECRET_MIN_LENGTH} characters",
                found="a shorter one",
            ),
        )


def _warn_ephemeral(plan: Plan, args: argparse.Namespace) -> None:
    from .run.preflight import ephemeral_overlap, ephemeral_ports

    warning = ephemeral_overlap(plan, ephemeral_ports())
    if warning:
        _warn(args, warning)


def _warn_memory(plan: Plan, args: argparse.Namespace, now: bool) -> None:
    """The Synapse processes of this host against the memory we may use (memory.py: measured idle PSS)."""
    from .memory import memory_warning
    from .run.memory import read_limits

    warning = memory_warning(len(plan.local_processes), plan.settings.core.launch_mode, read_limits(now))
    if warning:
        _warn(args, warning)


def _record(checks: list[dict[str, object]] | None, result: dict[str, object]) -> None:
    """One check's outcome, for `check --json` (its `checks`)."""
    if checks is not None:
        checks.append(result)


def _logrotate_test(plan: Plan, checks: list[dict[str, object]] | None = None) -> bool:
    """`logrotate -d` on the generated rules (debug mode: nothing is rotated, no state is written)."""
    from .plan import ROTATE_LOGS
    from .run.binaries import find

    if not plan.local("nginx") or not any(job.name == ROTATE_LOGS for job in plan.jobs):
        return True
    layout = plan.layout
    command = [find("logrotate"), "-d", "--state", layout.logrotate_state, layout.logrotate_conf]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode == 0 and "error:" not in result.stderr:
        print(f"logrotate: OK ({layout.logrotate_conf})")
        _record(checks, {"name": "logrotate", "ok": True, "file": layout.logrotate_conf, "error": None})
        return True
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    print("logrotate: FAILED\n" + "\n".join(errors or result.stderr.splitlines()[-5:]))
    error = "\n".join(errors or result.stderr.splitlines()[-5:])
    _record(checks, {"name": "logrotate", "ok": False, "file": layout.logrotate_conf, "error": error})
    return False


def _nginx_test(plan: Plan, checks: list[dict[str, object]] | None = None) -> bool:
    from .run.binaries import find

    conf = plan.layout.nginx_conf
    result = subprocess.run([find("nginx"), "-t", "-q", "-c", conf], capture_output=True, text=True)
    if result.returncode == 0:
        print(f"nginx: OK ({conf})")
        _record(checks, {"name": "nginx", "ok": True, "file": conf, "error": None})
        return True
    print(f"nginx: FAILED\n{result.stderr.strip()}")
    _record(checks, {"name": "nginx", "ok": False, "file": conf, "error": result.stderr.strip()})
    return False


def _synapse_test(plan: Plan, checks: list[dict[str, object]] | None = None) -> bool:
    procs = [{"name": p.name, "app": p.app, "config_files": list(p.config_files)} for p in plan.local_processes]
    core = plan.settings.core
    # As root, the loader runs as Synapse's user (no supplementary groups, as setpriv starts Synapse): it reads
    # what Synapse will read, and what it creates (the media store) is Synapse's, not root's.
    as_root = os.geteuid() == 0
    result = subprocess.run(
        [sys.executable, "-m", "synapse_workers.synapse_check"],
        input=json.dumps(procs),
        capture_output=True,
        text=True,
        user=core.uid if as_root else None,
        group=core.gid if as_root else None,
        extra_groups=[] if as_root else None,
    )
    seen = 0
    for line in result.stdout.splitlines():
        report = json.loads(line)
        seen += 1
        print(f"{report['name']}: OK" if report["ok"] else f"{report['name']}: FAILED\n  {report['error']}")
        _record(checks, {"name": report["name"], "ok": report["ok"], "file": None, "error": report.get("error")})
    if seen != len(procs):
        print(f"synapse config check crashed:\n{result.stderr.strip()[-2000:]}")
        _record(checks, {"name": "synapse", "ok": False, "file": None, "error": result.stderr.strip()[-2000:]})
        return False
    return result.returncode == 0


def cmd_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .programs import programs
    from .run import postgres
    from .run.binaries import coturn_user, find_binaries, prometheus_user
    from .run.port_sqlite import cluster_problems, port_at_start
    from .run.prepare import check_before_start
    from .run.supervise import Stack, lock_runtime_dir

    ported = port_at_start(env, args.host)  # SYNAPSE_PORT_SQLITE=on: the SQLite database first, once
    if ported:
        return ported
    plan = _slice_plan(args, env)
    if cluster_problems(plan):  # ported, but the embedded cluster is gone: never start an empty server
        raise UserError(*cluster_problems(plan))
    _warn_start(plan, env, args)
    _warn_memory(plan, args, now=True)
    as_root = os.geteuid() == 0
    binaries = find_binaries(plan)
    pg_owner = postgres.cluster_owner(as_root) if plan.postgres else None
    pg_user = (pg_owner.pw_name, pg_owner.pw_uid, pg_owner.pw_gid) if pg_owner else None
    core = plan.settings.core
    progs = programs(
        plan,
        as_root,
        binaries,
        postgres_user=pg_user,
        coturn_user=coturn_user(core.uid, core.gid),
        prometheus_user=prometheus_user(core.uid, core.gid),
    )
    # Lock before writing: never rewrite a live stack's files.
    lock = lock_runtime_dir(plan.layout.lock_file, plan.layout.runtime_dir)
    try:
        check_before_start(plan, as_root)  # a start refused for a port or a dir writes nothing
        write_files(plan, render_all(plan, progs, as_root))
        return Stack(plan, progs, binaries, as_root).run()
    finally:
        lock.close()


def cmd_upgrade_postgres(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """pg_upgrade of the embedded cluster (run/pgupgrade.py), under the runtime dir's lock: never beside a running
    stack. Exit 2 when refused (nothing changed), 1 when a step failed (the old cluster still in place)."""
    from .run import pgupgrade
    from .run.binaries import find
    from .run.supervise import lock_runtime_dir

    plan = _slice_plan(args, env)
    as_root = os.geteuid() == 0
    setpriv = find("setpriv")
    lock = lock_runtime_dir(plan.layout.lock_file, plan.layout.runtime_dir)
    try:
        pgupgrade.upgrade(plan, as_root, setpriv, args.old_bindir, args.link)
    except RuntimeError as exc:
        print(f"synapse-workers: upgrade-postgres: {exc}", file=sys.stderr)
        return 1
    finally:
        lock.close()
    return 0


def cmd_port_sqlite(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """homeserver.yaml's SQLite database into the embedded cluster (run/port_sqlite.py): 0 ported, 1 failed (nothing
    changed), 2 refused (already ported without --force, a running stack, not SQLite)."""
    from .run.port_sqlite import port_command

    return port_command(env, None, args.force)


def cmd_compress_state(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """The scheduled job's command, now (SYNAPSE_COMPRESSOR_* tune it; SYNAPSE_ENABLE_COMPRESSOR need not be on)."""
    from .plan import COMPRESS_STATE, Job
    from .programs import child_environment, job_command

    plan = _slice_plan(args, env)
    if plan.homeserver.database == "sqlite":
        raise UserError(
            f"compress-state needs PostgreSQL, but {plan.homeserver.path} uses SQLite: synapse_auto_compressor works "
            "on PostgreSQL only (`synapse-workers port-sqlite` ports the database into the embedded PostgreSQL)."
        )
    if not os.path.isdir(plan.layout.state_dir):
        print(
            f"synapse-workers: compress-state: {plan.layout.state_dir} does not exist: start the stack first "
            f"(synapse-workers run), or point {Variable('SYNAPSE_RUNTIME_DIR')} at the running stack's.",
            file=sys.stderr,
        )
        return 1
    job = next((j for j in plan.jobs if j.name == COMPRESS_STATE), Job(COMPRESS_STATE, ""))
    sys.stdout.flush()
    return subprocess.run(job_command(plan, job), env=child_environment(env), cwd="/", check=False).returncode


def _backup_output(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    """Where `backup` writes: -o DIR, else SYNAPSE_BACKUP_DIR (the scheduled backups' destination)."""
    from .settings import BackupSettings, load_section

    if args.output:
        return os.path.abspath(str(args.output))
    default = load_section(BackupSettings, env).dir
    if default is not None:
        return default
    backup_dir = Variable("SYNAPSE_BACKUP_DIR")
    raise UserError(
        Problem(
            f"backup: expected -o DIR, the directory backups go to (each one DIR/<UTC stamp>/), or {backup_dir} "
            "set to it.",
            Argument("-o"),
            expected=f"-o DIR or {backup_dir}",
            found="neither",
            related=(backup_dir,),
        )
    )


def cmd_backup(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`backup -o DIR [--keep N]` (run/backup.py), or `backup --verify PATH`."""
    from .run.backup import run_backup, run_verify

    if args.verify is not None:
        if args.output or args.keep is not None:
            raise UserError(
                Problem(
                    "backup --verify PATH checks one backup: -o and --keep do not go with it.",
                    Argument("--verify"),
                    expected="--verify PATH alone",
                    found="--verify with -o or --keep",
                )
            )
        return run_verify(args.verify)
    if args.keep is not None and args.keep < 1:
        raise UserError(
            Problem(
                f"backup --keep {args.keep}: expected a number of backups to keep, at least 1.",
                Argument("--keep"),
                expected="N >= 1",
                found=str(args.keep),
            )
        )
    output = _backup_output(args, env)
    plan = load_plan(env)
    if plan.placement is not None:
        raise UserError(
            Problem(
                f"backup with {Variable('SYNAPSE_HOSTS')} is not supported: back up main's host's data dir and the "
                "database with the tools of your deployment.",
                Variable("SYNAPSE_HOSTS"),
                expected="a single-host deployment",
                found="several hosts",
            )
        )
    sys.stdout.flush()
    return run_backup(plan, output, args.keep)


def cmd_restore(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`restore PATH` (run/restore.py): into the empty data dir the environment names."""
    from .run.restore import run_restore

    return run_restore(env, os.path.abspath(args.path))


def _running_status(env: Mapping[str, str]) -> StackStatus:
    from .run.status import read_status

    layout = make_layout(runtime_dir(env), data_dir="/")  # only runtime paths are used
    return read_status(layout)


def cmd_health(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Reads what `run` left in the runtime dir: needs only SYNAPSE_RUNTIME_DIR (or its default)."""
    from .run.health import check_all

    status = _running_status(env)
    # Several hosts: a host without nginx has no public side; its slice's own processes are checked.
    front = any(p.name == "nginx" for p in status.processes) or not status.processes
    checks = {"nginx": status.public_health} if front else {}
    checks.update({p.name: p.health for p in status.processes if p.health.kind == "http" and p.name != "nginx"})
    # An add-on that is down (Prometheus, an exporter) is reported, but the stack serves without it.
    optional = {p.name for p in status.processes if p.addon}
    # A process that is busy (no answer in time, but using CPU) is not failing: status.json has the pids.
    results = check_all(checks, {p.name: p.pid for p in status.processes} if status.running else None)
    for name, problem in results.items():
        note = " (not essential)" if name in optional else ""
        print(f"{name}: {'OK' if problem is None else 'FAILED (' + problem + ')' + note}")
    for line in _backup_lines(status, env):  # said, never part of the verdict: the server serves without backups
        print(line)
    if not status.running:
        print("the stack is not running (no `synapse-workers run` holds this runtime dir)")
        return 1
    return 0 if not any(problem for name, problem in results.items() if name not in optional) else 1


def cmd_status(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    import time

    status = _running_status(env)
    now = time.time()
    rows = [p.as_json(now) for p in status.processes]
    if not status.running:
        rows = [{**row, "pid": 0, "state": "STOPPED", "uptime_s": 0.0} for row in rows]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        verdict = f"running (launcher pid {status.launcher_pid})" if status.running else "not running"
        print(f"stack for {status.server_name}: {verdict}")
        print(f"  {'NAME':28} {'PID':>7} {'STATE':9} {'UPTIME':>9} {'RESTARTS':>8}  LAST ERROR")
        for row in rows:
            print(
                f"  {row['name']:28} {row['pid']:>7} {row['state']:9} {_duration(row['uptime_s']):>9} "
                f"{row['restarts']:>8}  {row['last_error']}"
            )
        for line in _backup_lines(status, env):
            print(line)
    return 0 if status.running else 3


def _backup_lines(status: StackStatus, env: Mapping[str, str]) -> list[str]:
    """The scheduled backups (run/backup_report.py): the last run, the newest complete backup, whether one is late.
    Before any backup, lateness counts from when the scheduler started."""
    import time

    from .programs import SCHEDULER
    from .run.backup_report import read_report, report_lines

    now = time.time()
    scheduler = next((p for p in status.processes if p.name == SCHEDULER and p.started), None)
    since = scheduler.started if scheduler is not None and status.running else now
    report = read_report(make_layout(runtime_dir(env), data_dir="/"), since, now)
    return report_lines(report) if report is not None else []


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def cmd_routes(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    words = args.words
    if len(words) > 2 or not words[-1].startswith("/"):
        raise UserError("routes: expected [METHOD] PATH, for example: routes PUT /_matrix/client/v3/sendToDevice/m.x/1")
    method = words[0] if len(words) == 2 else "GET"
    plan = load_plan(env)
    result = explain(plan, method, words[-1], args.port)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result["upstream"] is None:
        outcome = "refused (404)" if result["status"] == 404 else "answered by the launcher"
        print(f"{result['method']} {result['path']} -> {outcome}: {result['why']}")
        return 0
    servers = ", ".join(result["servers"])
    balance = f", balanced by {result['balance']}" if result.get("balance") else ""
    print(f"{result['method']} {result['path']}")
    print(f"  -> upstream {result['upstream']} ({servers}{balance})")
    if result.get("rule"):
        print(f"  rule {result['rule']}: {result['pattern']}")
    print(f"  why: {result['why']}")
    if result.get("when_down"):
        print(f"  if {result['upstream']} is down: {result['when_down']}")
    print(f"  pool {result['pool']}: at most {result['limit']} requests in flight (NGINX_POOL_LIMITS), then 429")
    return 0


def cmd_env(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .export_env import env_entries, format_env

    entries = env_entries(env)
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        sys.stdout.write(format_env(entries))
    return 0


def cmd_unraid_template(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .export_env import unraid_template

    sys.stdout.write(unraid_template())
    return 0


def cmd_mask_output(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .run.logprefix import wrap

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UserError("mask-output: expected a command after --, such as: mask-output -- nginx -g 'daemon off;'")
    return wrap(command)


def cmd_export(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .files import check_export_dir, export_secrets, read_export, write_export
    from .render import compose, kubernetes
    from .render.compose import render_compose
    from .render.export import make_export
    from .render.kubernetes import manifests, secrets_in_configuration
    from .render.kubernetes_check import check_manifests

    if not args.image or any(c.isspace() for c in args.image):
        raise UserError(f"export --image {args.image!r}: expected an image reference such as synapse-workers:latest.")
    plan = load_plan(env)
    check_export_dir(args.output, args.target)  # before anything is read from it
    export = make_export(plan, args.target)
    # Each target reads its own earlier export's secrets (kept when exporting again).
    previous = kubernetes.previous_secrets if args.target == "kubernetes" else compose.previous_secrets
    secrets, password = export_secrets(plan, *previous(read_export(args.output)))
    if args.target == "kubernetes":
        objects = manifests(export, secrets, args.image)
        refused = secrets_in_configuration(plan, objects.objects, secrets)
        if refused:  # the input's secrets (exit 2 naming each); before the checker would take them for a leak
            raise UserError(*refused)
        bugs = check_manifests(objects.all)
        if bugs:  # manifests Kubernetes would refuse: ours to fix, not the user's input; nothing is written
            for bug in bugs:
                print(f"synapse-workers: internal error: export kubernetes: {bug}", file=sys.stderr)
            print(
                "synapse-workers: this is a bug of synapse-workers (please report it); nothing was written.",
                file=sys.stderr,
            )
            return 1
        files = objects.files()
    else:
        files = render_compose(export, secrets, password, args.image)
    written = write_export(args.output, args.target, files)
    print(f"synapse-workers: wrote {len(written)} files for main + {len(plan.workers)} workers to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
