"""Scheduled backups without a stack: the variables and their refusals (exit 2 naming the variable), the job in the
plan and the jobs file (its command, its environment, no secret), lateness (a table worked out by hand from the
schedule), what `status`/`health` print, the launcher's /metrics text read by prometheus_client's parser (what a
Prometheus scrape reads), the aggregator serving it, and the built-in Prometheus's scrape of it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from synapse_workers.cli import main as cli_main
from synapse_workers.cron import parse
from synapse_workers.errors import UserError
from synapse_workers.load import load_plan
from synapse_workers.programs import child_environment, job_command, job_environment
from synapse_workers.render import render_all
from synapse_workers.run import scheduler
from synapse_workers.run.backup_report import (
    Outcome,
    Report,
    make_report,
    metrics_text,
    missed_due,
    read_report,
    report_lines,
    stamp_time,
)
from synapse_workers.run.health import Aggregator
from tests.conftest import free_port

D = datetime
PROMTOOL = "/usr/bin/promtool"


@pytest.fixture
def env(base_env, tmp_root):
    return {**base_env, "SYNAPSE_BACKUP_SCHEDULE": "30 3 * * *", "SYNAPSE_BACKUP_DIR": str(tmp_root / "backups")}


def _refusal(env, capsys) -> str:
    assert cli_main(["plan"], env) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ---- the variables ---------------------------------------------------------------------------------------------


def test_a_schedule_without_a_destination_is_refused_naming_it(base_env, capsys):
    err = _refusal({**base_env, "SYNAPSE_BACKUP_SCHEDULE": "0 4 * * *"}, capsys)
    assert "SYNAPSE_BACKUP_DIR is not" in err and "SYNAPSE_BACKUP_SCHEDULE='0 4 * * *'" in err


@pytest.mark.parametrize(
    ("inside", "named"),
    [
        ("data", "SYNAPSE_DATA_DIR"),
        ("data/backups", "SYNAPSE_DATA_DIR"),
        ("data/media_store/b", "SYNAPSE_DATA_DIR"),  # the default media store is in the data dir
        ("run/backups", "SYNAPSE_RUNTIME_DIR"),
    ],
)
def test_a_destination_inside_what_it_backs_up_is_refused(base_env, tmp_root, capsys, inside, named):
    where = str(tmp_root / inside)
    err = _refusal({**base_env, "SYNAPSE_BACKUP_DIR": where}, capsys)
    assert f"SYNAPSE_BACKUP_DIR={where!r} is inside" in err and f"({named})" in err
    assert "expected a directory outside it" in err


def test_a_destination_inside_a_media_store_elsewhere_is_refused(base_env, tmp_root, capsys):
    media = str(tmp_root / "media")
    err = _refusal({**base_env, "SYNAPSE_MEDIA_STORE_PATH": media, "SYNAPSE_BACKUP_DIR": f"{media}/backups"}, capsys)
    assert "inside the media store" in err and "(SYNAPSE_MEDIA_STORE_PATH)" in err


def test_beside_the_data_dir_is_fine(base_env, tmp_root):
    plan = load_plan({**base_env, "SYNAPSE_BACKUP_DIR": str(tmp_root / "data-backups")})  # a prefix, not inside
    assert plan.settings.backup.dir == str(tmp_root / "data-backups")
    assert plan.jobs == ()  # no schedule, no job: the variable is `backup`'s default -o only


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SYNAPSE_BACKUP_SCHEDULE", "0 4 * *", "5-field cron expression"),
        ("SYNAPSE_BACKUP_SCHEDULE", "0 25 * * *", "the hour field takes numbers from 0 to 23"),
        ("SYNAPSE_BACKUP_DIR", "backups", "an absolute path"),
        ("SYNAPSE_BACKUP_DIR", "/var", "a directory of its own"),
        ("SYNAPSE_BACKUP_KEEP", "0", "a whole number from 1 to 10000"),
        ("SYNAPSE_BACKUP_KEEP", "seven", "a whole number from 1 to 10000"),
    ],
)
def test_bad_values_exit_2_naming_the_variable(env, capsys, name, value, expected):
    err = _refusal({**env, name: value}, capsys)
    assert f"{name}={value!r} is invalid" in err and expected in err


def test_not_with_several_hosts_yet(env, capsys):
    err = _refusal({**env, "SYNAPSE_HOSTS": "a=10.0.0.1,b=10.0.0.2"}, capsys)
    assert "SYNAPSE_BACKUP_SCHEDULE is not supported with SYNAPSE_HOSTS yet" in err


def test_not_exported(env):
    with pytest.raises(UserError, match="SYNAPSE_BACKUP_SCHEDULE is set, but scheduled backups are not exported"):
        from synapse_workers.render.export import make_export

        make_export(load_plan(env), "compose")


# ---- the job ---------------------------------------------------------------------------------------------------


def test_plan_json_shows_the_job(env, capsys):
    assert cli_main(["plan", "--json"], env) == 0
    assert json.loads(capsys.readouterr().out)["jobs"] == {"backup": {"schedule": "30 3 * * *"}}


def test_jobs_file_runs_backup_with_its_destination_and_no_secret(env, tmp_root):
    env = {**env, "SYNAPSE_BACKUP_KEEP": "3", "SYNAPSE_TURN_SECRET": "a-turn-secret-of-some-length"}
    plan = load_plan(env)
    text = render_all(plan).managed[plan.layout.jobs_file]
    for secret in (env["POSTGRES_PASSWORD"], env["SYNAPSE_TURN_SECRET"]):
        assert secret not in text
    (job,) = json.loads(text)["jobs"]
    assert job["name"] == "backup" and job["schedule"] == "30 3 * * *"
    assert job["command"][1:] == ["-m", "synapse_workers.cli", "backup", "-o", str(tmp_root / "backups"), "--keep", "3"]
    # Every variable given, as given, but the secrets: the job makes the launcher's plan again.
    expected = {k: v for k, v in env.items() if k not in ("POSTGRES_PASSWORD", "SYNAPSE_TURN_SECRET")}
    assert job["env"] == expected
    assert render_all(plan).managed[plan.layout.jobs_file] == text  # deterministic


def test_the_jobs_environment_makes_the_same_plan(env):
    """What `synapse-workers backup` run by the scheduler sees: the child environment plus the job's variables."""
    plan = load_plan(env)
    (job,) = plan.jobs
    again = load_plan({**child_environment(os.environ), **job_environment(plan, job)})
    assert again.layout == plan.layout and again.media_store == plan.media_store
    assert again.settings.backup == plan.settings.backup and again.homeserver.path == plan.homeserver.path


def test_database_postgres_without_its_password_is_left_out(env):
    plan = load_plan({**env, "SYNAPSE_DATABASE": "postgres"})
    job_env = job_environment(plan, plan.jobs[0])
    assert "SYNAPSE_DATABASE" not in job_env and "POSTGRES_PASSWORD" not in job_env
    load_plan(job_env)  # not refused for a password it cannot have


def test_other_jobs_get_no_environment(env):
    plan = load_plan({**env, "SYNAPSE_ENABLE_COMPRESSOR": "1"})
    jobs = {j.name: j for j in plan.jobs}
    assert job_environment(plan, jobs["compress-state"]) == {}
    assert "env" not in next(j for j in json.loads(render_all(plan).managed[plan.layout.jobs_file])["jobs"]
                             if j["name"] == "compress-state")  # fmt: skip


def test_the_scheduler_gives_a_job_its_environment(capsys):
    command = ("sh", "-c", "echo dir=$SYNAPSE_BACKUP_DIR path=${PATH:+set}")
    running = scheduler.start(scheduler.Job("show", parse("* * * * *"), command, (("SYNAPSE_BACKUP_DIR", "/b"),)))
    assert running.proc.wait(timeout=10) == 0
    running.relay.join(timeout=5)
    assert "show: dir=/b path=set" in capsys.readouterr().out  # added to the child environment, not instead


def test_the_scheduler_reads_the_environment_from_the_jobs_file(env, tmp_root):
    plan = load_plan(env)
    path = tmp_root / "jobs.json"
    path.write_text(render_all(plan).managed[plan.layout.jobs_file])
    _heartbeat, (job,) = scheduler.load_jobs(str(path))
    assert dict(job.env)["SYNAPSE_BACKUP_DIR"] == env["SYNAPSE_BACKUP_DIR"]
    assert job.command == job_command(plan, plan.jobs[0])


# ---- late --------------------------------------------------------------------------------------------------------

# (schedule, the newest complete backup's start (or the scheduler's start), now, the due time it is late for) —
# worked out by hand: late once the first due time after the reference is more than an hour ago.
LATE = [
    ("30 3 * * *", D(2026, 12, 5, 3, 30, 5), D(2026, 12, 6, 3, 0), None),  # the next is still ahead
    ("30 3 * * *", D(2026, 12, 5, 3, 30, 5), D(2026, 12, 6, 4, 30), None),  # due 03:30, exactly the grace
    ("30 3 * * *", D(2026, 12, 5, 3, 30, 5), D(2026, 12, 6, 4, 31), D(2026, 12, 6, 3, 30)),
    ("30 3 * * *", D(2026, 12, 1, 3, 30, 5), D(2026, 12, 6, 12, 0), D(2026, 12, 2, 3, 30)),  # the first missed one
    ("30 3 * * *", D(2026, 12, 6, 3, 30, 0), D(2026, 12, 6, 4, 45), None),  # started on time: this is the one
    ("0 1 * * 0", D(2026, 11, 29, 1, 0, 2), D(2026, 12, 6, 1, 59), None),  # weekly, Sunday 01:00
    ("0 1 * * 0", D(2026, 11, 29, 1, 0, 2), D(2026, 12, 6, 2, 1), D(2026, 12, 6, 1, 0)),
    ("* * * * *", D(2026, 12, 6, 4, 0, 30), D(2026, 12, 6, 5, 0), None),  # due 04:01; 05:01 is the limit
    ("* * * * *", D(2026, 12, 6, 4, 0, 30), D(2026, 12, 6, 5, 2), D(2026, 12, 6, 4, 1)),
]


@pytest.mark.parametrize(("schedule", "reference", "now", "missed"), LATE)
def test_late(schedule, reference, now, missed):
    assert missed_due(parse(schedule), reference, now) == missed


def test_a_shorter_grace():
    due = missed_due(parse("* * * * *"), D(2026, 12, 6, 4, 0, 30), D(2026, 12, 6, 4, 3), timedelta(minutes=1))
    assert due == D(2026, 12, 6, 4, 1)


def test_stamp_names():
    assert stamp_time("20261206T041500Z") == datetime(2026, 12, 6, 4, 15, tzinfo=UTC).timestamp()
    for name in ("20261206T041500", ".partial-20261206T041500Z", "20261306T041500Z", "notes"):
        assert stamp_time(name) is None


def _outcome(path, **fields):
    doc = {"started": 0.0, "finished": 0.0, "ok": True, "error": None, "path": None, "bytes": 0, "files": 0,
           "media_linked": 0, "media_copied": 0, **fields}  # fmt: skip
    path.write_text(json.dumps(doc))


def _complete(destination, when: float, manifest: bool = True) -> str:
    name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    os.makedirs(destination / name)
    if manifest:
        (destination / name / "manifest.json").write_text("{}")
    return str(destination / name)


def test_a_failed_run_keeps_the_newest_complete_backup(tmp_root):
    destination, outcome = tmp_root / "backups", tmp_root / "backup.json"
    now = time.time()
    good = now - 1800
    _complete(destination, good)
    _complete(destination, now - 600, manifest=False)  # not complete: no manifest
    _outcome(outcome, started=now - 60, finished=now - 50, ok=False, error="pg_dump: connection refused", bytes=10)
    report = make_report("* * * * *", str(destination), str(outcome), since=now - 7200, now=now)
    assert report.last is not None and not report.last.ok
    assert report.last_success == float(int(good))  # its stamp: whole seconds
    assert report.missed is None  # due half an hour ago: within the grace
    late = make_report("* * * * *", str(destination), str(outcome), since=now - 7200, now=now + 3600)
    assert late.missed is not None


def test_no_backup_yet_counts_from_the_schedulers_start(tmp_root):
    now = time.time()
    report = make_report("* * * * *", str(tmp_root / "none"), str(tmp_root / "none.json"), since=now, now=now + 60)
    assert report.last is None and report.last_success is None and report.missed is None
    report = make_report("* * * * *", str(tmp_root / "none"), str(tmp_root / "none.json"), since=now, now=now + 4000)
    assert report.missed is not None


def test_an_unreadable_outcome_file_is_said(tmp_root):
    (tmp_root / "backup.json").write_text("{not json")
    report = make_report("* * * * *", str(tmp_root), str(tmp_root / "backup.json"), since=time.time(), now=time.time())
    assert report.last is None and "backup.json" in (report.unreadable or "")
    assert any("last run: unknown" in line for line in report_lines(report))


# ---- what status and health print ---------------------------------------------------------------------------------


def test_report_lines():
    started = datetime(2026, 12, 6, 3, 30, 1).timestamp()
    ok = Outcome(started, started + 42, True, None, "/backups/20261206T023001Z", 3 * 1024 * 1024)
    lines = report_lines(Report("30 3 * * *", "/backups", ok, started, None))
    assert lines == [
        "backups: '30 3 * * *' (local time) to /backups",
        "  last run: OK at 2026-12-06 03:30, 3.0 MiB in 42s: /backups/20261206T023001Z",
        "  newest complete backup: 2026-12-06 03:30",
    ]
    failed = Outcome(started, started + 1, False, "pg_dump: connection refused", None, 0)
    lines = report_lines(Report("30 3 * * *", "/backups", failed, None, datetime(2026, 12, 6, 3, 30)))
    assert lines[1:] == [
        "  last run: FAILED at 2026-12-06 03:30: pg_dump: connection refused",
        "  newest complete backup: none",
        "  LATE: a backup was due at 2026-12-06 03:30 and none has completed since (more than 1 h)",
    ]


def test_status_and_health_read_the_runtime_dir(env, tmp_root):
    plan = load_plan(env)
    files = render_all(plan).managed
    os.makedirs(os.path.dirname(plan.layout.jobs_file))
    with open(plan.layout.jobs_file, "w") as handle:
        handle.write(files[plan.layout.jobs_file])
    os.makedirs(plan.layout.state_dir)
    _outcome(tmp_root / "run" / "state" / "backup.json", started=time.time(), finished=time.time(), ok=False,
             error="disk full")  # fmt: skip
    report = read_report(plan.layout, since=time.time(), now=time.time())
    assert report is not None and report.destination == env["SYNAPSE_BACKUP_DIR"]
    assert report.schedule == "30 3 * * *" and report.last is not None and report.last.error == "disk full"
    assert plan.layout.backup_status == str(tmp_root / "run" / "state" / "backup.json")


def test_no_backup_job_no_report(base_env):
    plan = load_plan(base_env)
    assert read_report(plan.layout, since=time.time(), now=time.time()) is None


# ---- the metric ---------------------------------------------------------------------------------------------------


def _samples(text: str) -> dict[str, float]:
    """The text as Prometheus reads it (prometheus_client's parser): name → value, every family a gauge."""
    found = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge", family.name
        for sample in family.samples:
            assert sample.labels == {}
            found[sample.name] = sample.value
    return found


def test_metrics_of_a_good_run():
    ok = Outcome(1765000000.5, 1765000042.25, True, None, "/backups/x", 123456789)
    assert _samples(metrics_text(Report("* * * * *", "/backups", ok, 1765000000.0, None))) == {
        "synapse_workers_backup_last_success_timestamp_seconds": 1765000000.0,
        "synapse_workers_backup_last_run_timestamp_seconds": 1765000042.25,
        "synapse_workers_backup_last_run_ok": 1.0,
        "synapse_workers_backup_last_bytes": 123456789.0,
        "synapse_workers_backup_late": 0.0,
    }


def test_metrics_of_a_failed_late_run_and_of_none():
    failed = Outcome(1765000000.0, 1765000001.0, False, "boom", None, 0)
    samples = _samples(metrics_text(Report("* * * * *", "/b", failed, None, datetime(2026, 12, 6, 3, 30))))
    assert samples["synapse_workers_backup_last_run_ok"] == 0.0
    assert samples["synapse_workers_backup_late"] == 1.0
    assert samples["synapse_workers_backup_last_success_timestamp_seconds"] == 0.0
    samples = _samples(metrics_text(Report("* * * * *", "/b", None, None, None)))
    assert samples == {
        "synapse_workers_backup_last_success_timestamp_seconds": 0.0,
        "synapse_workers_backup_last_run_timestamp_seconds": 0.0,
        "synapse_workers_backup_late": 0.0,
    }  # no run yet: no last_run_ok (an alert on == 0 stays silent) and no size


def test_the_aggregator_serves_metrics_beside_health():
    port = free_port()
    aggregator = Aggregator({}, port, metrics=lambda: "synapse_workers_backup_late 0.0\n")
    aggregator.start()
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert response.status_code == 200 and response.text == "synapse_workers_backup_late 0.0\n"
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).text == "OK"
    finally:
        aggregator.stop()


def test_no_metrics_without_a_schedule():
    port = free_port()
    aggregator = Aggregator({}, port)
    aggregator.start()
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text == "OK"  # as before: health
    finally:
        aggregator.stop()


def test_prometheus_scrapes_the_launcher(env, tmp_root):
    plan = load_plan({**env, "SYNAPSE_METRICS": "1"})
    files = render_all(plan).managed
    doc = yaml.safe_load(files[plan.layout.prometheus_conf])
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "synapse-workers"]
    assert job["static_configs"] == [{"targets": [f"127.0.0.1:{plan.health_port}"]}]
    assert plan.health_port == int(env["SYNAPSE_INTERNAL_PORT_BASE"]) + 4
    without = load_plan({**env, "SYNAPSE_METRICS": "1", "SYNAPSE_BACKUP_SCHEDULE": ""})
    doc = yaml.safe_load(render_all(without).managed[without.layout.prometheus_conf])
    assert "synapse-workers" not in [j["job_name"] for j in doc["scrape_configs"]]
    if os.path.exists(PROMTOOL):
        conf = tmp_root / "prometheus.yml"
        rules = tmp_root / "r.yml"
        conf.write_text(files[plan.layout.prometheus_conf].replace(plan.layout.prometheus_rules, str(rules)))
        rules.write_text(files[plan.layout.prometheus_rules])
        result = subprocess.run([PROMTOOL, "check", "config", str(conf)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


# ---- backup's default -o --------------------------------------------------------------------------------------------


def test_backup_writes_to_synapse_backup_dir_without_o(tmp_root):
    from argparse import Namespace

    from synapse_workers.cli import _backup_output

    where = str(tmp_root / "backups")
    assert _backup_output(Namespace(output=None), {"SYNAPSE_BACKUP_DIR": where}) == where
    assert _backup_output(Namespace(output="elsewhere"), {"SYNAPSE_BACKUP_DIR": where}) == os.path.abspath("elsewhere")
    with pytest.raises(UserError) as info:
        _backup_output(Namespace(output=None), {})
    (problem,) = info.value.problems
    assert "expected -o DIR" in problem and "or SYNAPSE_BACKUP_DIR set to it" in problem
    with pytest.raises(UserError, match="SYNAPSE_BACKUP_DIR='relative' is invalid"):
        _backup_output(Namespace(output=None), {"SYNAPSE_BACKUP_DIR": "relative"})


def test_keep_without_a_schedule_is_a_warning(base_env):
    from synapse_workers.start_warnings import Facts, start_warnings

    def about_keep(env):
        found = start_warnings(load_plan(env), env, Facts())
        return [w for w in found if "SYNAPSE_BACKUP" in w]

    env = {**base_env, "SYNAPSE_BACKUP_KEEP": "3"}
    (warning,) = about_keep(env)
    assert warning.startswith("SYNAPSE_BACKUP_KEEP does nothing without SYNAPSE_BACKUP_SCHEDULE")
    assert warning.subject.name == "SYNAPSE_BACKUP_KEEP"
    assert about_keep({**env, "SYNAPSE_BACKUP_SCHEDULE": "0 4 * * *", "SYNAPSE_BACKUP_DIR": "/srv/backups"}) == []
    assert about_keep({**base_env, "SYNAPSE_BACKUP_KEEP": "7"}) == []  # the default, as the compose files pass it
