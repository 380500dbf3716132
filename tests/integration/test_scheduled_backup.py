"""Scheduled backups in a real stack (monolith, embedded PostgreSQL, the built-in Prometheus): SYNAPSE_BACKUP_SCHEDULE
`* * * * *` into a destination that is at first a file (so the first run fails), then a directory.

- the failed run: `status` and `health` show it FAILED with its error (health's exit code stays 0), the launcher's
  /metrics says last_run_ok 0 (read by prometheus_client's parser), the built-in Prometheus scrapes it and fires
  SynapseWorkersBackupFailed (the shipped rules);
- the file replaced by a directory, the next run succeeds: a complete backup (`<UTC stamp>/manifest.json`, which
  `backup --verify` accepts) is in the destination, `status` shows the run OK and that backup, the metrics say
  last_run_ok 1 with its size and start time, Prometheus has the new value and the alert is gone.

The scheduler runs the job as it runs every job (its minimal child environment plus the job's variables), so the
backup finds the stack's data dir, runtime dir and database from jobs.json alone."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.stack import Stack, make_root, stack_env, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the embedded cluster runs as postgres: needs root"),
    pytest.mark.skipif(not os.path.exists("/usr/bin/prometheus"), reason="Debian's prometheus is not installed"),
]


def metrics(stack: Stack) -> dict[str, float]:
    """The launcher's /metrics as a scrape reads it (loopback, the /health aggregator's port: base+4)."""
    port = int(stack.env["SYNAPSE_INTERNAL_PORT_BASE"]) + 4
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200, response.text
    return {s.name: s.value for f in text_string_to_metric_families(response.text) for s in f.samples}


def prometheus(stack: Stack, query: str) -> list[dict]:
    url = f"http://127.0.0.1:{stack.env['PROMETHEUS_PORT']}/api/v1/query"
    response = httpx.get(url, params={"query": query}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["data"]["result"]


def outcome(stack: Stack) -> dict | None:
    try:
        return json.loads((Path(stack.env["SYNAPSE_RUNTIME_DIR"]) / "state" / "backup.json").read_text())
    except (OSError, ValueError):
        return None


def test_scheduled_backups_fail_then_succeed_and_say_so():
    root = make_root("sw-backup-schedule-")
    destination = root / "backups"
    destination.write_text("a file where the backups should go\n")  # the first run fails on it
    env = stack_env(
        root,
        "",
        SYNAPSE_BACKUP_SCHEDULE="* * * * *",
        SYNAPSE_BACKUP_DIR=str(destination),
        SYNAPSE_BACKUP_KEEP="2",
        SYNAPSE_METRICS="1",
        PROMETHEUS_SCRAPE_INTERVAL="1s",
    )
    stack = Stack(env)
    try:
        stack.start(300)
        jobs = json.loads((root / "run" / "scheduler" / "jobs.json").read_text())["jobs"]
        assert [j["name"] for j in jobs] == ["backup"]

        # ---- the first run fails: the destination is a file --------------------------------------------------
        assert wait_for(lambda: outcome(stack) is not None, timeout=90, interval=1), stack.tail()
        failed = outcome(stack)
        assert failed["ok"] is False and failed["error"], failed
        status = stack.cli("status")
        assert status.returncode == 0, status.stderr
        assert f"backups: '* * * * *' (local time) to {destination}" in status.stdout
        assert "last run: FAILED at" in status.stdout and failed["error"] in status.stdout, status.stdout
        assert "newest complete backup: none" in status.stdout
        health = stack.cli("health")
        assert health.returncode == 0, health.stdout + health.stderr  # the verdict is the server's alone
        assert "last run: FAILED" in health.stdout
        values = metrics(stack)
        assert values["synapse_workers_backup_last_run_ok"] == 0.0
        assert values["synapse_workers_backup_last_success_timestamp_seconds"] == 0.0
        assert values["synapse_workers_backup_late"] == 0.0  # the scheduler started under an hour ago
        assert wait_for(lambda: prometheus(stack, 'ALERTS{alertname="SynapseWorkersBackupFailed"}'), 30, 1)
        (scraped,) = prometheus(stack, "synapse_workers_backup_last_run_ok")
        assert scraped["metric"]["job"] == "synapse-workers" and scraped["value"][1] == "0"
        assert "backup: FAILED with exit 1" in stack.tail(400)  # the scheduler's outcome line

        # ---- a directory there: the next run succeeds ----------------------------------------------------------
        destination.unlink()
        destination.mkdir()
        assert wait_for(lambda: (outcome(stack) or {}).get("ok") is True, timeout=90, interval=1), stack.tail()
        good = outcome(stack)
        (backup,) = [p for p in destination.iterdir() if not p.name.startswith(".")]
        assert str(backup) == good["path"] and (backup / "manifest.json").is_file()
        verify = stack.cli("backup", "--verify", str(backup))
        assert verify.returncode == 0, verify.stdout + verify.stderr
        status = stack.cli("status")
        assert f"last run: OK at {time.strftime('%Y-%m-%d %H:%M', time.localtime(good['started']))}" in status.stdout
        newest = time.strftime("%Y-%m-%d %H:%M", time.localtime(int(good["started"])))
        assert f"newest complete backup: {newest}" in status.stdout and "LATE" not in status.stdout, status.stdout
        values = metrics(stack)
        assert values["synapse_workers_backup_last_run_ok"] == 1.0
        assert values["synapse_workers_backup_last_bytes"] == good["bytes"] > 0
        assert abs(values["synapse_workers_backup_last_success_timestamp_seconds"] - good["started"]) < 1
        assert values["synapse_workers_backup_late"] == 0.0

        def scraped_ok() -> bool:
            found = prometheus(stack, "synapse_workers_backup_last_run_ok")
            return bool(found) and found[0]["value"][1] == "1"

        assert wait_for(scraped_ok, 30, 1)
        assert wait_for(lambda: not prometheus(stack, 'ALERTS{alertname="SynapseWorkersBackupFailed"}'), 30, 1)
    finally:
        stack.close(root)
