"""The built-in Prometheus for real: a stack with workers and SYNAPSE_METRICS=1 runs Debian's prometheus as its
own user; within a bounded time it reports `up == 1` for every Synapse process nginx (stub_status through
prometheus-nginx-exporter) Redis and PostgreSQL (their
exporters; PostgreSQL's password from the 0600 passfile only) (labels process, worker_type), with
the metrics listeners on loopback TCP and on unix sockets (through nginx's loopback metrics server), and
holds a Synapse series per process; `status` lists it; its storage is created owned by its user; it stops with
the stack. Loopback only, free ports, temp dirs removed."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.stack import SW, Stack, make_root, stack_env, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists("/usr/bin/prometheus"), reason="Debian's prometheus is not installed"),
]

WORKERS = "synchrotron, event_persister"
EXPECTED = {"main": "main", "synchrotron1": "synchrotron", "event_persister1": "event_persister"}


def metrics_env(root: Path, workers: str, **extra: str) -> dict[str, str]:
    """SYNAPSE_METRICS on; Prometheus's port is isolated_env's (free, outside the internal range and public port)."""
    return stack_env(root, workers, SYNAPSE_METRICS="1", **extra)


@pytest.fixture(scope="module", params=["tcp", "unix"])
def stack(request):
    """Metrics listeners on loopback TCP, then on unix sockets (scraped through nginx's loopback server)."""
    root = make_root("sw-prometheus-")
    env = metrics_env(root, WORKERS, PROMETHEUS_SCRAPE_INTERVAL="1s",
                      SYNAPSE_METRICS_UNIX_SOCKETS="1" if request.param == "unix" else "0",
                      SYNAPSE_ENABLE_REDIS_METRIC_EXPORT="1", SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT="1")
    stack = Stack(env)
    try:
        stack.start(300)
        yield stack
    finally:
        stack.close(root)


def api(stack: Stack, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{stack.env['PROMETHEUS_PORT']}/api/v1/{path}"
    response = httpx.get(url, params=params, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def synapse_targets(stack: Stack) -> dict[str, tuple[str, str]]:
    """process → (worker_type, health) of the active Synapse targets."""
    try:
        targets = api(stack, "targets", state="active")["activeTargets"]
    except httpx.HTTPError:
        return {}
    return {t["labels"]["process"]: (t["labels"]["worker_type"], t["health"])
            for t in targets if t["labels"].get("job") == "synapse"}


def query(stack: Stack, expr: str) -> list[dict]:
    return api(stack, "query", query=expr)["result"]


def test_every_synapse_process_is_up(stack: Stack):
    ok = wait_for(lambda: {p: h for p, (_t, h) in synapse_targets(stack).items()} == dict.fromkeys(EXPECTED, "up"),
                  60, 1)
    assert ok, synapse_targets(stack)
    assert {p: t for p, (t, _h) in synapse_targets(stack).items()} == EXPECTED
    up = {r["metric"]["process"]: r["value"][1] for r in query(stack, 'up{job="synapse"}')}
    assert up == dict.fromkeys(EXPECTED, "1")


def test_a_synapse_series_per_process(stack: Stack):
    def per_process() -> dict[str, str]:
        result = query(stack, 'count by (process, worker_type) ({job="synapse", __name__=~"synapse_.+"})')
        return {r["metric"]["process"]: r["metric"]["worker_type"] for r in result}

    assert wait_for(lambda: per_process() == EXPECTED, 30, 1), per_process()


def test_nginx_through_its_exporter(stack: Stack):
    def nginx_up() -> list[str]:
        return [r["value"][1] for r in query(stack, 'nginx_up{job="nginx_exporter"}')]

    assert wait_for(lambda: nginx_up() == ["1"], 30, 1), nginx_up()
    assert query(stack, 'up{job="nginx_exporter"} == 1')
    assert query(stack, "nginx_connections_accepted > 0")
    stub = f"http://127.0.0.1:{int(stack.env['SYNAPSE_INTERNAL_PORT_BASE']) + 5}/stub_status"
    assert "Active connections" in httpx.get(stub, timeout=10).text
    public = httpx.get(f"{stack.base_url}/stub_status", timeout=10)  # the public server: Synapse's 404
    assert public.status_code == 404 and "Active connections" not in public.text


def test_redis_through_its_exporter(stack: Stack):
    def redis_up() -> list[str]:
        return [r["value"][1] for r in query(stack, 'redis_up{job="redis_exporter"}')]

    assert wait_for(lambda: redis_up() == ["1"], 30, 1), redis_up()
    assert query(stack, 'up{job="redis_exporter"} == 1')
    assert query(stack, "redis_connected_clients > 0")  # Synapse's processes


def test_postgres_through_its_exporter(stack: Stack):
    def pg_up() -> list[str]:
        return [r["value"][1] for r in query(stack, 'pg_up{job="postgres_exporter"}')]

    assert wait_for(lambda: pg_up() == ["1"], 30, 1), pg_up()
    assert query(stack, 'pg_stat_database_numbackends{datname="synapse"} > 0')
    # the password is in 0600 files of Synapse's user only: not in any process's arguments or environment
    password = Path(stack.env["SYNAPSE_DATA_DIR"], "embedded_postgres.pgpass").read_text().strip().rsplit(":", 1)[1]
    alone = Path(stack.env["SYNAPSE_DATA_DIR"], "embedded_postgres.password")
    assert alone.read_text() == password
    assert (alone.stat().st_mode & 0o777, alone.stat().st_uid) == (0o600, 991)
    for pid in stack.leftovers():
        for what in ("cmdline", "environ"):
            try:
                assert password.encode() not in Path(f"/proc/{pid}/{what}").read_bytes(), (pid, what)
            except (FileNotFoundError, ProcessLookupError):
                continue


def test_rules_are_loaded(stack: Stack):
    groups = api(stack, "rules")["groups"]
    assert any(g["name"] == "synapse-workers-http" for g in groups), [g["name"] for g in groups]


def test_plan_status_and_storage(stack: Stack):
    port = int(stack.env["PROMETHEUS_PORT"])
    plan = json.loads(stack.cli("plan", "--json").stdout)
    assert plan["services"]["prometheus"]["host"] == "127.0.0.1"
    assert plan["services"]["prometheus"]["port"] == port
    env = {"PATH": os.environ["PATH"], "SYNAPSE_RUNTIME_DIR": stack.env["SYNAPSE_RUNTIME_DIR"]}

    def status() -> dict[str, dict]:
        result = subprocess.run([SW, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        return {row["name"]: row for row in json.loads(result.stdout)}

    assert wait_for(lambda: status().get("prometheus", {}).get("state") == "RUNNING", 15), status()
    rows = status()
    health = stack.cli("health")  # the add-ons are checked too, and healthy
    assert health.returncode == 0 and "prometheus: OK" in health.stdout, health.stdout + health.stderr
    assert "nginx_exporter: OK" in health.stdout and "postgres_exporter: OK" in health.stdout, health.stdout
    storage = Path(stack.env["SYNAPSE_DATA_DIR"]) / "prometheus"
    owner = pwd.getpwnam("prometheus")
    assert storage.stat().st_uid == owner.pw_uid and (storage / "wal").is_dir()
    # the process runs as that user, not root
    pid = rows["prometheus"]["pid"]
    assert Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0] == str(owner.pw_uid)


def test_metrics_only_on_loopback(stack: Stack):
    assert httpx.get(f"{stack.base_url}/_synapse/metrics", timeout=10).status_code == 404
    proxy = f"http://127.0.0.1:{int(stack.env['SYNAPSE_INTERNAL_PORT_BASE']) + 5}"
    if stack.env["SYNAPSE_METRICS_UNIX_SOCKETS"] == "1":
        for name in EXPECTED:
            response = httpx.get(f"{proxy}/metrics/{name}", timeout=10)
            assert response.status_code == 200 and "synapse_" in response.text, name
        assert httpx.get(f"{proxy}/_synapse/metrics", timeout=10).status_code == 404
        assert httpx.get(f"{proxy}/metrics/nobody", timeout=10).status_code == 404
    else:
        assert httpx.get(f"{proxy}/metrics/main", timeout=10).status_code == 404


def test_stops_cleanly(stack: Stack):
    code, _took = stack.stop(timeout=60)
    assert code == 0, stack.tail()
    assert wait_for(lambda: not stack.leftovers(), 10), stack.leftovers()


def test_postgres_exporter_for_an_external_database():
    """POSTGRES_PASSWORD's external database (a real cluster on loopback TCP, password auth): the exporter connects
    with POSTGRES_USER/DB/HOST/PORT and the password from its own 0600 file, and reports pg_up 1 and the database's
    own statistics; the password is in no process's arguments or environment."""
    from tests.support.pgcluster import PgCluster

    root = make_root("sw-pgexp-")
    with PgCluster(user="mx_user", database="mx_db") as pg:
        env = metrics_env(root, "", SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT="1", **pg.env())
        stack = Stack(env)
        try:
            stack.start(300)
            exporter = json.loads(stack.cli("plan", "--json").stdout)["services"]["postgres_exporter"]
            url = f"http://{exporter['host']}:{exporter['port']}/metrics"

            def metrics() -> str:
                try:
                    return httpx.get(url, timeout=10).text
                except httpx.HTTPError:
                    return ""

            assert wait_for(lambda: "\npg_up 1" in metrics(), 30, 1), metrics()[-2000:]
            text = metrics()
            assert 'pg_stat_database_numbackends{datid=' in text and 'datname="mx_db"' in text
            alone = Path(env["SYNAPSE_DATA_DIR"], "external_postgres.password")
            assert alone.read_text() == pg.password
            assert (alone.stat().st_mode & 0o777, alone.stat().st_uid) == (0o600, 991)
            for pid in stack.leftovers():  # every process the launcher started (the test gave it the variable)
                if pid == stack.proc.pid:
                    continue
                for what in ("cmdline", "environ"):
                    try:
                        assert pg.password.encode() not in Path(f"/proc/{pid}/{what}").read_bytes(), (pid, what)
                    except (FileNotFoundError, ProcessLookupError):
                        continue
        finally:
            stack.close(root)
