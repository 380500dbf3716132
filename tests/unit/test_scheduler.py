"""Scheduled maintenance, without a stack: cron expressions and when they are next due (a table written from
crontab(5)), the variables' errors, the jobs in the plan and `plan --json`, the scheduler's program row, the
jobs file, the generated logrotate rules (checked by the real `logrotate -d`), and the compressor's helpers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from synapse_workers.cli import main as cli_main
from synapse_workers.cron import next_due, parse
from synapse_workers.load import load_plan
from synapse_workers.programs import programs
from synapse_workers.render import render_all
from synapse_workers.run import compressor, scheduler
from synapse_workers.run.flock import LOCKED
from tests.unit.test_programs import BINARIES

D = datetime

# (expression, after, the next due time) — worked out by hand from crontab(5), not by the code under test.
NEXT_DUE = [
    ("0 1 * * 0", D(2026, 11, 27, 12, 0), D(2026, 11, 29, 1, 0)),  # a Friday → Sunday 01:00
    ("0 1 * * 7", D(2026, 11, 27, 12, 0), D(2026, 11, 29, 1, 0)),  # 7 is Sunday too
    ("0 1 * * 0", D(2026, 11, 29, 1, 0), D(2026, 12, 6, 1, 0)),  # strictly after: not the same minute
    ("0 1 * * 0", D(2026, 11, 29, 0, 59, 59), D(2026, 11, 29, 1, 0)),
    ("* * * * *", D(2026, 1, 1, 10, 0, 30), D(2026, 1, 1, 10, 1)),
    ("*/15 * * * *", D(2026, 1, 1, 10, 14, 59), D(2026, 1, 1, 10, 15)),
    ("*/15 * * * *", D(2026, 1, 1, 23, 50), D(2026, 1, 2, 0, 0)),  # day rolls over
    ("10-20/5 3 * * *", D(2026, 1, 1, 3, 16), D(2026, 1, 1, 3, 20)),
    ("10-20/5 3 * * *", D(2026, 1, 1, 3, 21), D(2026, 1, 2, 3, 10)),
    ("5,35 */6 * * *", D(2026, 1, 1, 6, 36), D(2026, 1, 1, 12, 5)),
    ("0 0 31 * *", D(2026, 2, 1), D(2026, 3, 31)),  # February and its missing 31st are skipped
    ("0 0 31 * *", D(2026, 4, 15), D(2026, 5, 31)),  # so is April's
    ("0 0 29 2 *", D(2026, 3, 1), D(2028, 2, 29)),  # the next leap year
    ("30 23 28-31 * *", D(2026, 2, 28, 23, 31), D(2026, 3, 28, 23, 30)),  # month end
    ("0 0 1 1 *", D(2026, 12, 31, 23, 59), D(2027, 1, 1, 0, 0)),  # year end
    ("0 12 * * 1-5", D(2026, 11, 27, 12, 0), D(2026, 11, 30, 12, 0)),  # Friday noon → Monday noon
    ("0 12 * * 6,0", D(2026, 11, 27, 12, 0), D(2026, 11, 28, 12, 0)),  # Saturday
    ("0 12 * * 5-7", D(2026, 11, 28, 12, 0), D(2026, 11, 29, 12, 0)),  # a range ending on Sunday as 7
    ("0 0 13 * 5", D(2026, 11, 1), D(2026, 11, 6)),  # both day fields restricted: either matches (Friday the 6th)
    ("0 0 13 * 5", D(2026, 11, 7), D(2026, 11, 13)),  # ... or the 13th
    ("0 0 * 2 *", D(2026, 3, 1), D(2027, 2, 1, 0, 0)),
]


@pytest.mark.parametrize(("expr", "after", "due"), NEXT_DUE, ids=[f"{e}@{a:%m-%d %H:%M}" for e, a, _ in NEXT_DUE])
def test_next_due(expr, after, due):
    assert next_due(parse(expr), after) == due


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("", "5-field"),
        ("* * * *", "5-field"),
        ("* * * * * *", "5-field"),
        ("60 * * * *", "0 to 59"),
        ("* 24 * * *", "0 to 23"),
        ("* * 0 * *", "1 to 31"),
        ("* * * 13 *", "1 to 12"),
        ("* * * * 8", "0 to 7"),
        ("*/0 * * * *", "not '0'"),
        ("5/10 * * * *", "a step needs"),
        ("20-10 * * * *", "backwards"),
        ("0 0 30 2 *", "never matches"),
        ("@daily", "5-field"),
        ("0 0 * * sun", "'sun'"),
        ("-1 * * * *", "'"),
    ],
)
def test_bad_expressions_are_refused(expr, why):
    with pytest.raises(ValueError, match=why):
        parse(expr)


# ---- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SYNAPSE_COMPRESSOR_SCHEDULE", "61 1 * * 0", "cron expression"),
        ("SYNAPSE_COMPRESSOR_SCHEDULE", "weekly", "cron expression"),
        ("SYNAPSE_COMPRESSOR_CHUNK_SIZE", "lots", "whole number"),
        ("SYNAPSE_COMPRESSOR_CHUNKS", "0", "whole number"),
        ("SYNAPSE_COMPRESSOR_LEVELS", "100,,25", "level sizes"),
        ("SYNAPSE_COMPRESSOR_CHUNK_SIZE", "50", "first level size"),  # below the default levels' 100
        ("NGINX_LOGROTATE_KEEP", "0", "whole number"),
        ("NGINX_DISABLE_LOGROTATE", "maybe", "one of yes"),
    ],
)
def test_bad_variables_exit_2_naming_them(base_env, capsys, name, value, expected):
    root = Path(base_env["SYNAPSE_DATA_DIR"]).parent
    before = sorted(root.rglob("*"))
    assert cli_main(["generate"], {**base_env, name: value}) == 2
    err = capsys.readouterr().err
    assert name in err and expected in err and "Traceback" not in err
    assert sorted(root.rglob("*")) == before  # nothing written


def test_compressor_on_sqlite_is_refused(base_env, capsys):
    env = {k: v for k, v in base_env.items() if k != "POSTGRES_PASSWORD"}
    env.update(SYNAPSE_DATABASE="sqlite", SYNAPSE_ENABLE_COMPRESSOR="1")
    assert cli_main(["plan"], env) == 2
    err = capsys.readouterr().err
    assert "SYNAPSE_ENABLE_COMPRESSOR" in err and "PostgreSQL" in err
    assert cli_main(["compress-state"], {**env, "SYNAPSE_ENABLE_COMPRESSOR": "0"}) == 2
    assert "PostgreSQL only" in capsys.readouterr().err


# ---- the plan, the program, the files ----------------------------------------------------------------------


def plan_for(env, **extra):
    return load_plan({**env, **extra})


def test_no_jobs_no_scheduler(base_env):
    plan = plan_for(base_env)
    assert plan.jobs == ()
    assert "scheduler" not in {p.name for p in programs(plan, False, BINARIES)}
    assert not any("scheduler/" in path for path in render_all(plan).managed)


def test_jobs_in_plan_json(base_env, capsys):
    env = {**base_env, "SYNAPSE_ENABLE_COMPRESSOR": "1", "SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK": "1"}
    assert cli_main(["plan", "--json"], env) == 0
    jobs = json.loads(capsys.readouterr().out)["jobs"]
    assert jobs == {"compress-state": {"schedule": "0 1 * * 0"}, "rotate-logs": {"schedule": "0 0 * * *"}}
    env["SYNAPSE_COMPRESSOR_SCHEDULE"] = "30  2 * * 1-5"
    env["NGINX_DISABLE_LOGROTATE"] = "1"
    assert cli_main(["plan", "--json"], env) == 0
    assert json.loads(capsys.readouterr().out)["jobs"] == {"compress-state": {"schedule": "30 2 * * 1-5"}}
    assert cli_main(["plan"], env) == 0
    assert re.search(r"^  job compress-state +30 2 \* \* 1-5$", capsys.readouterr().out, re.M)


def test_logrotate_job_only_with_logs_on_disk(base_env):
    assert plan_for(base_env, NGINX_DISABLE_LOGROTATE="0").jobs == ()
    assert [j.name for j in plan_for(base_env, SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK="1").jobs] == ["rotate-logs"]


def test_scheduler_program_row(base_env):
    plan = plan_for(base_env, SYNAPSE_ENABLE_COMPRESSOR="1")
    rows = {p.name: p for p in programs(plan, True, BINARIES)}
    row = rows["scheduler"]
    assert row.addon and not row.critical
    assert row.stage == rows["nginx"].stage
    assert row.user is None  # the launcher's user: it signals nginx's master (root)
    assert row.command[-2:] == ("synapse_workers.run.scheduler", plan.layout.jobs_file)
    assert row.health.kind == "command" and plan.layout.scheduler_heartbeat in row.health.target
    assert "POSTGRES_PASSWORD" not in json.dumps(row.env)


def test_jobs_file_has_commands_and_no_secret(base_env):
    plan = plan_for(
        base_env,
        SYNAPSE_ENABLE_COMPRESSOR="1",
        SYNAPSE_COMPRESSOR_CHUNK_SIZE="700",
        SYNAPSE_COMPRESSOR_CHUNKS="3",
        SYNAPSE_COMPRESSOR_LEVELS="200,100",
    )
    files = render_all(plan).managed
    text = files[plan.layout.jobs_file]
    assert base_env["POSTGRES_PASSWORD"] not in text
    doc = json.loads(text)
    (job,) = doc["jobs"]
    assert job["name"] == "compress-state" and job["schedule"] == "0 1 * * 0"
    command = job["command"]
    assert command[1:3] == ["-m", "synapse_workers.run.compressor"]
    configs = command[3:9]
    assert configs[::2] == ["--config"] * 3
    assert configs[1::2] == [plan.homeserver.path, plan.layout.shared_config, plan.layout.main_config]
    flags = dict(zip(command[9::2], command[10::2], strict=True))
    assert flags == {
        "--chunk-size": "700",
        "--chunks": "3",
        "--levels": "200,100",
        "--lock": plan.layout.compressor_lock,
    }
    assert plan.layout.compressor_lock.startswith(plan.layout.state_dir + "/")
    assert doc["heartbeat"] == plan.layout.scheduler_heartbeat
    assert render_all(plan).managed == files  # deterministic


def logrotate_plan(base_env, **extra):
    return plan_for(base_env, SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK="1", **extra)


def test_logrotate_rules(base_env):
    plan = logrotate_plan(base_env, NGINX_LOGROTATE_KEEP="3")
    files = render_all(plan).managed
    text = files[plan.layout.logrotate_conf]
    nginx_conf = files[plan.layout.nginx_conf]
    access_log = f"{base_env['SYNAPSE_DATA_DIR']}/logs/nginx-access.log"
    error_log = f"{base_env['SYNAPSE_DATA_DIR']}/logs/nginx-error.log"
    assert f"access_log {access_log} " in nginx_conf  # the file nginx writes is the one rotated
    # its error log goes to stderr only, and the output listener writes the (masked) file
    assert "error_log stderr warn;" in nginx_conf and nginx_conf.count("error_log ") == 1
    rows = programs(plan, False, BINARIES)
    assert next(p for p in rows if p.name == "nginx").log_file == error_log
    assert f"pid {plan.layout.nginx_pid};" in nginx_conf  # the master we signal
    assert text.count("{") == 1 and f"{access_log} {error_log} {{" in text
    body = {line.strip() for line in text.splitlines()}
    assert {"daily", "rotate 3", "delaycompress", "nocreate"} <= body
    assert "copytruncate" not in text  # it loses the lines written between copy and truncate
    assert f'kill -USR1 "$(cat {plan.layout.nginx_pid})"' in text
    job = json.loads(files[plan.layout.jobs_file])["jobs"][0]
    assert job == {
        "name": "rotate-logs",
        "schedule": "0 0 * * *",
        "command": ["logrotate", "--force", "--state", plan.layout.logrotate_state, plan.layout.logrotate_conf],
    }
    assert plan.layout.logrotate_state.startswith(plan.layout.state_dir + "/")  # kept across starts


@pytest.mark.skipif(not shutil.which("logrotate", path="/usr/sbin:/usr/bin"), reason="logrotate is not installed")
def test_logrotate_accepts_the_rules(base_env, tmp_root):
    plan = logrotate_plan(base_env)
    conf = tmp_root / "logrotate.conf"
    conf.write_text(render_all(plan).managed[plan.layout.logrotate_conf])
    os.chmod(conf, 0o644)
    logs = Path(plan.layout.logs_on_disk)
    logs.mkdir(parents=True)
    (logs / "nginx-access.log").write_text("a line\n")
    (logs / "nginx-error.log").write_text("a warning\n")
    result = subprocess.run(
        ["logrotate", "-d", "-s", str(tmp_root / "state"), str(conf)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "error:" not in result.stderr.lower(), result.stderr
    assert f"considering log {logs}/nginx-access.log" in result.stderr
    assert f"considering log {logs}/nginx-error.log" in result.stderr
    # -f really rotates (no nginx here: the pid file is missing, so the reopen is skipped, not an error)
    result = subprocess.run(
        ["logrotate", "-f", "-s", str(tmp_root / "state"), str(conf)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (logs / "nginx-access.log.1").read_text() == "a line\n"
    assert (logs / "nginx-error.log.1").read_text() == "a warning\n"
    assert not (logs / "nginx-access.log").exists()  # nocreate: nginx's master creates it when it reopens
    assert not (logs / "nginx-error.log").exists()


def test_disable_logrotate_drops_the_rule(base_env):
    plan = logrotate_plan(base_env, NGINX_DISABLE_LOGROTATE="1")
    assert plan.jobs == ()
    assert plan.layout.logrotate_conf not in render_all(plan).managed


# ---- the scheduler's and the compressor's own pieces ------------------------------------------------------


def test_outcome_lines():
    assert scheduler.outcome("compress-state", 0, 2.04) == "compress-state: finished OK in 2.0s"
    assert "FAILED with exit 1" in scheduler.outcome("compress-state", 1, 3)
    assert "holds its lock" in scheduler.outcome("compress-state", LOCKED, 0)
    assert "killed by signal 9" in scheduler.outcome("rotate-logs", -9, 0)


def test_tick_starts_due_jobs_once_and_never_twice_at_once():
    every_minute = scheduler.Job("a", parse("* * * * *"), ("true",))
    sunday = scheduler.Job("b", parse("0 1 * * 0"), ("true",))
    jobs = [every_minute, sunday]
    due = {"a": D(2026, 11, 27, 10, 1), "b": D(2026, 11, 29, 1, 0)}
    # not yet due
    assert scheduler.tick(jobs, due, set(), D(2026, 11, 27, 10, 0, 59)) == ([], [], due)
    # due: started once, next due the following minute
    start, skipped, new_due = scheduler.tick(jobs, due, set(), D(2026, 11, 27, 10, 1, 0, 500))
    assert start == [(every_minute, D(2026, 11, 27, 10, 1))] and skipped == []
    assert new_due == {"a": D(2026, 11, 27, 10, 2), "b": D(2026, 11, 29, 1, 0)}
    # due again while the previous run still goes: skipped, and the next due time still moves on
    start, skipped, newer = scheduler.tick(jobs, new_due, {"a"}, D(2026, 11, 27, 10, 2, 1))
    assert start == [] and skipped == ["a"] and newer["a"] == D(2026, 11, 27, 10, 3)
    # the clock jumped two days (a suspended machine): each job runs once, nothing is made up
    start, _, later = scheduler.tick(jobs, newer, set(), D(2026, 11, 29, 12, 0))
    assert [j.name for j, _ in start] == ["a", "b"]
    assert later == {"a": D(2026, 11, 29, 12, 1), "b": D(2026, 12, 6, 1, 0)}


def test_alive_is_a_light_import():
    code = "import sys, synapse_workers.run.scheduler; print('synapse_workers.plan' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_alive_reads_the_heartbeat_age(tmp_root):
    beat = tmp_root / "beat"
    assert scheduler.alive(str(beat)) == 1
    beat.write_text("1\n")
    assert scheduler.alive(str(beat)) == 0
    old = time.time() - scheduler.ALIVE_SECONDS - 5
    os.utime(beat, (old, old))
    assert scheduler.alive(str(beat)) == 1


def test_compressor_url_encodes_everything():
    url = compressor.compressor_url("syn apse", "p@ss:w/rd%", "/run/sw/postgresql", 5432, "synapse", None)
    assert url == "postgresql://syn%20apse:p%40ss%3Aw%2Frd%25@%2Frun%2Fsw%2Fpostgresql:5432/synapse"
    assert (
        compressor.compressor_url("u", None, "db", 5433, "d", "require") == "postgresql://u@db:5433/d?sslmode=require"
    )


def test_redact_hides_plain_and_encoded():
    redact = compressor.Redact()
    redact.hide("p@ss word")
    assert redact.clean("postgresql://u:p%40ss%20word@h and p@ss word") == "postgresql://u:<hidden>@h and <hidden>"


def test_database_args_from_homeserver_yaml(tmp_root):
    path = tmp_root / "homeserver.yaml"
    args = {"user": "synapse", "dbname": "synapse", "host": "/run/x", "passfile": "/data/p", "cp_min": 1, "cp_max": 5}
    path.write_text(yaml.safe_dump({"database": {"name": "psycopg2", "args": args}}))
    assert compressor.database_args([str(path)]) == {
        "user": "synapse",
        "dbname": "synapse",
        "host": "/run/x",
        "passfile": "/data/p",
    }
    path.write_text(yaml.safe_dump({"database": {"name": "sqlite3", "args": {"database": "/data/h.db"}}}))
    with pytest.raises(compressor.CompressorError, match="PostgreSQL only") as info:
        compressor.database_args([str(path)])
    assert info.value.code == 2
    # a later file's database section replaces the earlier one's (several hosts: shared.yaml's, over TCP)
    later = tmp_root / "shared.yaml"
    later.write_text(yaml.safe_dump({"database": {"name": "psycopg2", "args": {"host": "10.0.0.5", "port": 5433}}}))
    assert compressor.database_args([str(path), str(later)]) == {"host": "10.0.0.5", "port": 5433}
    later.write_text(yaml.safe_dump({"redis": {"enabled": True}}))  # no database section: the earlier one stands
    with pytest.raises(compressor.CompressorError, match="PostgreSQL only"):
        compressor.database_args([str(path), str(later)])


def test_lock_refuses_a_second_holder(tmp_root):
    lock = str(tmp_root / "compressor.lock")
    with compressor.exclusive(lock):
        with pytest.raises(compressor.CompressorError, match="in progress") as info, compressor.exclusive(lock):
            pass
        assert info.value.code == LOCKED
    with compressor.exclusive(lock):  # released
        pass


def test_lock_in_a_directory_we_cannot_use(tmp_root):
    lock = str(tmp_root / "missing-dir" / "compressor.lock")
    with pytest.raises(compressor.CompressorError, match="cannot open the lock file"), compressor.exclusive(lock):
        pass


def test_unknown_job_is_a_bug(base_env):
    from synapse_workers.plan import Job
    from synapse_workers.programs import job_command

    with pytest.raises(ValueError):
        job_command(plan_for(base_env), Job("nope", "* * * * *"))


def test_check_runs_logrotate_on_the_rules(base_env, capsys):
    from synapse_workers.cli import _logrotate_test
    from synapse_workers.files import write_files

    plan = logrotate_plan(base_env)
    write_files(plan, render_all(plan))
    assert _logrotate_test(plan) is True
    assert f"logrotate: OK ({plan.layout.logrotate_conf})" in capsys.readouterr().out
    Path(plan.layout.logrotate_conf).write_text(Path(plan.layout.logrotate_conf).read_text() + "bogus_directive\n")
    assert _logrotate_test(plan) is False
    assert "logrotate: FAILED" in capsys.readouterr().out


def test_compress_state_says_when_the_database_is_unreachable(base_env, capfd):
    """The real child, the real libpq: a closed port is a clear error (exit 1), and the password is not in it."""
    from tests.conftest import free_port

    env = {**base_env, "POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(free_port())}
    assert cli_main(["generate"], env) == 0
    capfd.readouterr()
    assert cli_main(["compress-state"], env) == 1  # no state dir: the stack never ran here
    assert "start the stack first" in capfd.readouterr().err
    Path(env["SYNAPSE_RUNTIME_DIR"], "state").mkdir(mode=0o700)
    assert cli_main(["compress-state"], env) == 1
    out, err = capfd.readouterr()
    assert f"cannot connect to the database (127.0.0.1:{env['POSTGRES_PORT']}/synapse)" in out, out + err
    assert "Connection refused" in out
    assert env["POSTGRES_PASSWORD"] not in out + err
    assert "Traceback" not in out + err


def test_several_hosts_schedule_on_nginx_host_only(base_env):
    """With SYNAPSE_HOSTS the scheduler and its files belong to nginx's host; `compress-state` there connects with
    shared.yaml's database (the cluster over TCP). (SYNAPSE_ENABLE_COMPRESSOR itself is refused there for now.)"""
    from synapse_workers.plan import Job
    from synapse_workers.programs import job_command
    from tests.unit.test_placement import HOSTS, PLACEMENT, WORKERS

    env = {k: v for k, v in base_env.items() if k != "POSTGRES_PASSWORD"}
    env.update(SYNAPSE_WORKER_TYPES=WORKERS, SYNAPSE_HOSTS=HOSTS, SYNAPSE_PLACEMENT=PLACEMENT)
    env.update(SYNAPSE_LAUNCH_MODE="process", SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK="1")
    pg_user = ("postgres", 101, 104)
    assert cli_main(["generate", "--host", "front"], env) == 0  # main's host creates the secrets (shared here)
    for host in ("front", "db", "w1"):
        plan = load_plan(env, host)
        names = {p.name for p in programs(plan, False, BINARIES, postgres_user=pg_user)}
        files = render_all(plan).managed
        on_front = host == "front"  # nginx's host
        assert ("scheduler" in names) == on_front, (host, names)
        assert (plan.layout.jobs_file in files) == on_front
        assert (plan.layout.logrotate_conf in files) == on_front
    front = load_plan(env, "front")
    shared = yaml.safe_load(render_all(front).managed[front.layout.shared_config])
    assert shared["database"]["args"]["host"] == "10.0.0.11"  # the db host
    command = job_command(front, Job("compress-state", ""))
    assert command[command.index(front.layout.shared_config) - 1] == "--config"
