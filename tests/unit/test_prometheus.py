"""The built-in Prometheus (SYNAPSE_METRICS): the plan's service, prometheus.yml (checked by promtool when it is
installed), the shipped rules file, the program row and the variables' checks. Pure, plus promtool."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from synapse_workers.errors import UserError
from synapse_workers.load import load_plan
from synapse_workers.programs import STAGE_NAMES, Health, programs
from synapse_workers.render import render_all
from tests.unit.test_programs import BINARIES as PROGRAM_BINARIES

REPO = Path(__file__).resolve().parents[2]
PROMTOOL = "/usr/bin/promtool"
WORKERS = "synchrotron, event_persister, stream_writers=typing+to_device+receipts"
METRICS = {"SYNAPSE_METRICS": "1"}
BINARIES = {
    **PROGRAM_BINARIES,
    "prometheus": "/usr/bin/prometheus",
    "prometheus-nginx-exporter": "/usr/bin/prometheus-nginx-exporter",
}


@pytest.fixture
def env(base_env):
    env = {**base_env, "SYNAPSE_HTTP_PORT": "8008", "SYNAPSE_INTERNAL_PORT_BASE": "30000",
           "SYNAPSE_WORKER_TYPES": WORKERS}
    env.pop("PROMETHEUS_PORT")  # base_env's free port: these tests check the default
    return env


def config(plan) -> dict:
    return yaml.safe_load(render_all(plan).managed[plan.layout.prometheus_conf])


def prometheus_row(plan, as_root=False, user=None):
    rows = programs(plan, as_root, BINARIES, postgres_user=("postgres", 1, 1), prometheus_user=user)
    return next(p for p in rows if p.name == "prometheus")


def test_off_without_synapse_metrics(env):
    plan = load_plan(env)
    assert plan.service("prometheus") is None
    assert plan.layout.prometheus_conf not in render_all(plan).managed
    assert "prometheus" not in {p.name for p in programs(plan, False, BINARIES, postgres_user=("postgres", 1, 1))}
    assert plan.as_json()["services"] == {}


def test_plan_json_lists_prometheus_on_loopback_by_default(env):
    services = load_plan({**env, **METRICS}).as_json()["services"]
    assert services["prometheus"]["host"] == "127.0.0.1"
    assert services["prometheus"]["port"] == 9090
    moved = load_plan({**env, **METRICS, "PROMETHEUS_BIND_ADDRESS": "0.0.0.0", "PROMETHEUS_PORT": "9191"})
    assert moved.as_json()["services"]["prometheus"] | {"listeners": None} == {
        "host": "0.0.0.0", "port": 9191, "protocols": ["tcp"], "listeners": None}


def test_every_process_is_a_target_labelled_process_and_worker_type(env):
    plan = load_plan({**env, **METRICS, "PROMETHEUS_SCRAPE_INTERVAL": "7s"})
    doc = config(plan)
    assert doc["global"]["scrape_interval"] == "7s"
    assert doc["rule_files"] == [plan.layout.prometheus_rules]
    job, exporter = doc["scrape_configs"]
    assert exporter == {"job_name": "nginx_exporter", "static_configs": [{"targets": ["127.0.0.1:30006"]}]}
    assert job["job_name"] == "synapse" and job["metrics_path"] == "/_synapse/metrics"
    seen = {}
    for static in job["static_configs"]:
        (target,) = static["targets"]
        seen[static["labels"]["process"]] = (target, static["labels"]["worker_type"])
    expected = {}
    for proc in plan.processes:
        listener = proc.listener("metrics")
        expected[proc.name] = (f"127.0.0.1:{listener.port}", "main" if proc.name == "main" else "+".join(
            sorted(proc.types)))
    assert seen == expected
    assert seen["stream_writers1"][1] == "receipts+to_device+typing"
    assert "remote_write" not in doc


def test_rules_file_is_the_contrib_one(env):
    plan = load_plan({**env, **METRICS})
    rendered = render_all(plan).managed[plan.layout.prometheus_rules]
    assert rendered == (REPO / "contrib" / "prometheus" / "synapse-workers.rules.yml").read_text()


def test_remote_write(env):
    url = "https://metrics.example.org/api/v1/write"
    plan = load_plan({**env, **METRICS, "PROMETHEUS_REMOTE_WRITE_HTTP_URL": url})
    assert config(plan)["remote_write"] == [{"url": url}]


@pytest.mark.parametrize("url", ["ftp://example.org/", "https://user:pw@example.org/write", "not a url"])
def test_remote_write_url_refused(env, url):
    with pytest.raises(UserError, match="PROMETHEUS_REMOTE_WRITE_HTTP_URL"):
        load_plan({**env, **METRICS, "PROMETHEUS_REMOTE_WRITE_HTTP_URL": url})


@pytest.mark.parametrize("port", ["8008", "30001"])
def test_port_collisions_refused(env, port):
    with pytest.raises(UserError, match=f"PROMETHEUS_PORT={port}"):
        load_plan({**env, **METRICS, "PROMETHEUS_PORT": port})


def test_program_row(env):
    plan = load_plan({**env, **METRICS, "PROMETHEUS_STORAGE_RETENTION_TIME": "30d"})
    row = prometheus_row(plan)
    assert STAGE_NAMES[row.stage] == "nginx" and not row.critical and row.addon
    assert row.health == Health("http", "http://127.0.0.1:9090/-/ready")
    assert row.command == (
        "/usr/bin/prometheus",
        f"--config.file={plan.layout.prometheus_conf}",
        f"--storage.tsdb.path={plan.settings.core.data_dir}/prometheus",
        "--storage.tsdb.retention.time=30d",
        "--web.listen-address=127.0.0.1:9090",
    )
    stored = load_plan({**env, **METRICS, "PROMETHEUS_STORAGE_PATH": "/var/lib/prometheus/sw",
                        "PROMETHEUS_BIND_ADDRESS": "::"})
    row = prometheus_row(stored, as_root=True, user=(103, 106))
    assert row.command[:5] == ("/usr/bin/setpriv", "--reuid=103", "--regid=106", "--clear-groups", "--")
    assert "--storage.tsdb.path=/var/lib/prometheus/sw" in row.command
    assert "--web.listen-address=[::]:9090" in row.command
    assert row.health.target == "http://[::1]:9090/-/ready"


@pytest.mark.skipif(not os.path.exists(PROMTOOL), reason="promtool (Debian's prometheus) not installed")
def test_promtool_accepts_the_rendered_config(env, tmp_path):
    plan = load_plan({**env, **METRICS, "PROMETHEUS_REMOTE_WRITE_HTTP_URL": "http://127.0.0.1:1/write"})
    files = render_all(plan).managed
    rules = tmp_path / "rules.yml"
    rules.write_text(files[plan.layout.prometheus_rules])
    conf = tmp_path / "prometheus.yml"
    conf.write_text(files[plan.layout.prometheus_conf].replace(plan.layout.prometheus_rules, str(rules)))
    result = subprocess.run([PROMTOOL, "check", "config", str(conf)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unix_socket_metrics_are_scraped_through_nginxs_loopback_server(env):
    plan = load_plan({**env, **METRICS, "SYNAPSE_METRICS_UNIX_SOCKETS": "1"})
    assert plan.metrics_proxy_port == 30005
    files = render_all(plan).managed
    nginx = files[plan.layout.nginx_conf]
    server = nginx[nginx.index("listen 127.0.0.1:30005;"):]
    for proc in plan.processes:
        socket = proc.listener("metrics").path
        assert socket.endswith(f"/{proc.name}.metrics.sock")
        assert (f"location = /metrics/{proc.name} {{\n            proxy_pass http://unix:{socket}:/_synapse/metrics;"
                in server), proc.name
    assert "location / {\n            return 404;" in server
    job = yaml.safe_load(files[plan.layout.prometheus_conf])["scrape_configs"][0]
    paths = {s["labels"]["process"]: (s["targets"], s["labels"]["__metrics_path__"]) for s in job["static_configs"]}
    assert paths == {p.name: (["127.0.0.1:30005"], f"/metrics/{p.name}") for p in plan.processes}


def test_loopback_metrics_server_without_unix_sockets_has_stub_status_only(env):
    plan = load_plan({**env, **METRICS})
    assert plan.metrics_proxy_port == 30005
    nginx = render_all(plan).managed[plan.layout.nginx_conf]
    server = nginx[nginx.index("listen 127.0.0.1:30005;"):]
    assert "location = /stub_status {\n            stub_status;" in server
    assert "/metrics/main" not in nginx


def test_nginx_exporter_row(env):
    plan = load_plan({**env, **METRICS})
    assert plan.as_json()["services"]["nginx_exporter"]["port"] == 30006
    rows = programs(plan, True, BINARIES, postgres_user=("postgres", 1, 1), prometheus_user=(103, 106))
    row = next(p for p in rows if p.name == "nginx_exporter")
    assert STAGE_NAMES[row.stage] == "nginx" and not row.critical and row.addon
    assert row.health == Health("http", "http://127.0.0.1:30006/metrics")
    assert row.command == ("/usr/bin/setpriv", "--reuid=103", "--regid=106", "--clear-groups", "--",
                           "/usr/bin/prometheus-nginx-exporter", "-nginx.scrape-uri=http://127.0.0.1:30005/stub_status",
                           "-nginx.retries=30", "-nginx.retry-interval=1s", "-web.listen-address=127.0.0.1:30006")


def test_redis_exporter(env):
    plan = load_plan({**env, **METRICS, "SYNAPSE_ENABLE_REDIS_METRIC_EXPORT": "1"})
    assert plan.as_json()["services"]["redis_exporter"]["port"] == 30007
    jobs = {j["job_name"]: j for j in config(plan)["scrape_configs"]}
    assert jobs["redis_exporter"]["static_configs"] == [{"targets": ["127.0.0.1:30007"]}]
    rows = programs(plan, True, {**BINARIES, "prometheus-redis-exporter": "/usr/bin/prometheus-redis-exporter"},
                    postgres_user=("postgres", 1, 1), prometheus_user=(103, 106))
    row = next(p for p in rows if p.name == "redis_exporter")
    uid, gid = plan.settings.core.uid, plan.settings.core.gid  # Synapse's: the only user Redis's socket admits
    assert row.command == ("/usr/bin/setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
                           "/usr/bin/prometheus-redis-exporter", f"-redis.addr=unix://{plan.redis.path}",
                           "-web.listen-address=127.0.0.1:30007")
    assert not row.critical and row.addon and row.health == Health("http", "http://127.0.0.1:30007/metrics")


@pytest.mark.parametrize("extra", [{}, {"SYNAPSE_METRICS": "0"}, {"SYNAPSE_WORKER_TYPES": ""}])
def test_no_redis_exporter_without_metrics_or_our_redis(env, extra):
    plan = load_plan({**env, **METRICS, "SYNAPSE_ENABLE_REDIS_METRIC_EXPORT": "1" if extra else "0", **extra})
    assert plan.service("redis_exporter") is None


def test_postgres_exporter_reads_the_password_from_a_file(env):
    env = {k: v for k, v in env.items() if k != "POSTGRES_PASSWORD"}  # the embedded cluster
    plan = load_plan({**env, **METRICS, "SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT": "1"})
    assert plan.postgres is not None and plan.as_json()["services"]["postgres_exporter"]["port"] == 30008
    rows = programs(plan, False, {**BINARIES, "prometheus-postgres-exporter": "/usr/bin/prometheus-postgres-exporter"},
                    postgres_user=("postgres", 1, 1))
    row = next(p for p in rows if p.name == "postgres_exporter")
    assert row.command == ("/usr/bin/prometheus-postgres-exporter", "--web.listen-address=127.0.0.1:30008")
    assert row.env == {
        "DATA_SOURCE_URI": f"/synapse?host={plan.postgres.socket_dir}&sslmode=disable",
        "DATA_SOURCE_USER": "synapse",
        "DATA_SOURCE_PASS_FILE": plan.secrets.postgres_password,
    }
    assert not row.critical and row.addon
    # only this program is told where the password is
    assert all("DATA_SOURCE_PASS_FILE" not in p.env for p in rows if p is not row)


@pytest.mark.parametrize(
    ("extra", "uri"),
    [
        ({"POSTGRES_HOST": "db.example.test", "POSTGRES_PORT": "5433", "POSTGRES_DB": "matrix db"},
         "db.example.test:5433/matrix%20db?sslmode=disable"),
        ({"POSTGRES_HOST": "10.0.0.5", "POSTGRES_EXPORTER_SSLMODE": "verify-full"},
         "10.0.0.5:5432/synapse?sslmode=verify-full"),
        ({"POSTGRES_HOST": "fd00::5"}, "[fd00::5]:5432/synapse?sslmode=disable"),
        ({"POSTGRES_HOST": "/run/postgresql"}, "/synapse?host=/run/postgresql&port=5432&sslmode=disable"),
    ],
)
def test_postgres_exporter_for_an_external_database(env, extra, uri):
    """POSTGRES_PASSWORD's external database: POSTGRES_HOST/PORT/DB/USER, the password alone in its own file."""
    plan = load_plan({**env, **METRICS, "SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT": "1", "POSTGRES_USER": "mx", **extra})
    assert plan.postgres is None and plan.service("postgres_exporter") is not None
    rows = programs(plan, False, {**BINARIES, "prometheus-postgres-exporter": "/usr/bin/prometheus-postgres-exporter"})
    row = next(p for p in rows if p.name == "postgres_exporter")
    assert row.env == {
        "DATA_SOURCE_URI": uri,
        "DATA_SOURCE_USER": "mx",
        "DATA_SOURCE_PASS_FILE": f"{env['SYNAPSE_DATA_DIR']}/external_postgres.password",
    }


def test_postgres_exporter_sslmode_is_checked(env):
    with pytest.raises(UserError) as caught:
        load_plan({**env, **METRICS, "POSTGRES_EXPORTER_SSLMODE": "prefer"})
    message = "\n".join(caught.value.problems)
    assert "POSTGRES_EXPORTER_SSLMODE" in message and "verify-full" in message, message
