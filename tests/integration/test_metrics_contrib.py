"""The shipped Prometheus rules and Grafana dashboard (contrib/): valid, and fed by what Synapse really exports.

Static checks: `promtool check rules` and `promtool test rules` on the rules file; the dashboard parses,
every panel has a datasource and PromQL targets, and every target expression is valid PromQL (promtool
validates it as a recording rule). Live check: a real stack with workers, SYNAPSE_METRICS=1 and the Redis and
PostgreSQL exporters on: its built-in Prometheus scrapes every process's metrics listener (labels `process` and
`worker_type`) and the nginx, Redis and PostgreSQL exporters, with the shipped rules loaded; after a little
Matrix traffic every dashboard expression (exporter panels included: NEEDS_EXPORTER says which) and every
recording rule must return data through Prometheus's query API, and no alert fires.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from nio import JoinResponse, RoomCreateResponse

from tests.support.matrix import (
    client_api,
    expect,
    login,
    register,
    registration_secret,
    send_and_receive,
    unlimited,
)
from tests.support.stack import Stack, make_root, stack_env, wait_for

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "contrib" / "prometheus" / "synapse-workers.rules.yml"
RULES_TEST = REPO / "contrib" / "prometheus" / "synapse-workers.rules.test.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "synapse-workers.json"
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
WORKERS = "synchrotron, event_persister, stream_writers=typing+to_device+receipts"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (os.path.exists(PROMTOOL) and os.path.exists(PROMETHEUS)),
                       reason="Debian's prometheus (prometheus, promtool) not installed"),
]

# Dashboard panels (by title) and rules (by record/alert name) whose expressions read an exporter's
# metrics: they have data only where that exporter runs (the live test turns all three on).
NEEDS_EXPORTER = {
    # panels
    "nginx": "prometheus-nginx-exporter",
    "nginx requests": "prometheus-nginx-exporter",
    "nginx connections": "prometheus-nginx-exporter",
    "Redis": "prometheus-redis-exporter",
    "Redis clients and pub/sub channels": "prometheus-redis-exporter",
    "Redis commands": "prometheus-redis-exporter",
    "Redis memory": "prometheus-redis-exporter",
    "PostgreSQL": "prometheus-postgres-exporter",
    "Connections by state": "prometheus-postgres-exporter",
    "Transactions": "prometheus-postgres-exporter",
    "Buffer cache hit ratio": "prometheus-postgres-exporter",
    "Database size": "prometheus-postgres-exporter",
    "Deadlocks": "prometheus-postgres-exporter",
    # rules
    "instance:nginx_http_requests:rate5m": "prometheus-nginx-exporter",
    "instance:nginx_connections_dropped:rate5m": "prometheus-nginx-exporter",
    "NginxDown": "prometheus-nginx-exporter",
    "instance:redis_commands_processed:rate5m": "prometheus-redis-exporter",
    "RedisDown": "prometheus-redis-exporter",
    "datname:pg_stat_database_xact_commit:rate5m": "prometheus-postgres-exporter",
    "datname:pg_stat_database_xact_rollback:rate5m": "prometheus-postgres-exporter",
    "datname:pg_stat_database_blks_hit:ratio_rate5m": "prometheus-postgres-exporter",
    "instance:pg_connections:ratio": "prometheus-postgres-exporter",
    "PostgresDown": "prometheus-postgres-exporter",
    "PostgresConnectionsNearLimit": "prometheus-postgres-exporter",
}
EXPORTER_METRIC = {
    "nginx": "prometheus-nginx-exporter",
    "redis": "prometheus-redis-exporter",
    "pg": "prometheus-postgres-exporter",
}
# Grafana's variables, as a user with "All" selected gets them.
SUBSTITUTIONS = {"$worker_type": ".*", "$process": ".*", "$__rate_interval": "1m"}


def exporter_of(expr: str) -> str | None:
    """The exporter whose metrics (raw, or recorded from them) the expression reads, if any."""
    found = {EXPORTER_METRIC[m] for m in re.findall(r"\b(nginx|redis|pg)_[a-z_]+", expr)}
    assert len(found) <= 1, f"one expression, several exporters: {expr}"
    return found.pop() if found else None


def substitute(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every dashboard query."""
    return [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


# ---- static -----------------------------------------------------------------------------------------------

def test_rules_pass_promtool_check():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_unit_tests():
    result = promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_names_and_exporter_marks():
    names = []
    for rule in rules():
        name = rule.get("record") or rule["alert"]
        names.append(name)
        if "record" in rule:
            assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), f"not level:metric:operations: {name}"
        assert NEEDS_EXPORTER.get(name) == exporter_of(rule["expr"]), name
    assert len(names) == len(set(names)), "a rule name is used twice"


def test_dashboard_structure():
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("worker_type", "process"):
        assert variables[name]["type"] == "query"
        assert variables[name]["allValue"] == ".*"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    titles = [p["title"] for p in panels()]
    assert len(titles) == len(set(titles)), "panel titles repeat"
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']}: empty expression"
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    for title, expr in targets():
        exporter = exporter_of(expr)
        assert NEEDS_EXPORTER.get(title) == exporter, f"{title}: reads {exporter}, NEEDS_EXPORTER disagrees"
        if exporter is None:  # Synapse-side: the variables filter it
            assert "$process" in expr and "$worker_type" in expr, f"{title}: not filtered: {expr}"
    known = {title for title, _ in targets()} | {r.get("record") or r["alert"] for r in rules()}
    assert set(NEEDS_EXPORTER) <= known, f"NEEDS_EXPORTER names what is not there: {set(NEEDS_EXPORTER) - known}"


def test_dashboard_exprs_are_valid_promql(tmp_path):
    """promtool validates every expression of a rules file: put each dashboard query in as a recording rule."""
    exprs = [substitute(expr) for _, expr in targets()]
    check = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}:check", "expr": expr} for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-exprs.rules.yml"
    path.write_text(yaml.safe_dump(check))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout
    # Every recorded series the dashboard reads is one the rules file records.
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = {name for expr in exprs for name in re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", expr)}
    assert used <= recorded, f"the dashboard reads series no rule records: {used - recorded}"


# ---- against a running stack ------------------------------------------------------------------------------

async def drive_traffic(base_url: str, secret: str) -> None:
    """Register two users, make a room, send messages, sync, type and mark read: work for every process."""
    tag = secrets.token_hex(3)
    admin = register(base_url, secret, f"metrics_a{tag}", admin=True)
    other = register(base_url, secret, f"metrics_b{tag}")
    for user in (admin, other):
        unlimited(base_url, admin["access_token"], user["user_id"])
    alice = await login(base_url, f"metrics_a{tag}")
    bob = await login(base_url, f"metrics_b{tag}")
    try:
        room = expect(await alice.room_create(invite=[other["user_id"]]), RoomCreateResponse).room_id
        expect(await bob.join(room), JoinResponse)
        await bob.sync(timeout=0)
        event_ids = await send_and_receive(alice, bob, room, [f"metrics {tag} {i}" for i in range(8)])
        await bob.room_typing(room, True, timeout=5000)
        client_api(bob, "POST", f"/_matrix/client/v3/rooms/{room}/receipt/m.read/{event_ids[-1]}", json={})
        for _ in range(3):
            await alice.sync(timeout=0)
    finally:
        await alice.close()
        await bob.close()


def query(port: int, expr: str) -> list[dict]:
    response = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def has_data(result: list[dict]) -> bool:
    """At least one sample that is a number (a NaN, e.g. a quantile of nothing, is no data)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def test_every_query_returns_data_against_a_running_stack():
    root = make_root("sw-metrics-")
    env = stack_env(root, WORKERS, SYNAPSE_METRICS="1", PROMETHEUS_SCRAPE_INTERVAL="1s",
                    SYNAPSE_ENABLE_REDIS_METRIC_EXPORT="1", SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT="1")
    stack = Stack(env)
    try:
        stack.start(300)
        plan = json.loads(stack.cli("plan", "--json").stdout)
        port = int(env["PROMETHEUS_PORT"])
        # Every Synapse process, and the three exporters, are up.
        expected = len(plan["workers"]) + 1 + 3
        assert wait_for(lambda: len(query(port, "up == 1")) == expected, 60), query(port, "up")

        # What must return data: every dashboard query and every recording rule's output.
        live: dict[str, str] = {f"panel {title!r}: {expr}": substitute(expr) for title, expr in targets()}
        alerts = {}
        for rule in rules():
            if "record" in rule:
                live[f"rule {rule['record']}"] = rule["record"]
            else:
                alerts[rule["alert"]] = rule["expr"]
        exporter_queries = sum(1 for title, expr in targets() if exporter_of(expr))
        assert exporter_queries >= 10, "the exporter panels are part of this check"

        secret = registration_secret(stack.env["SYNAPSE_DATA_DIR"])
        missing = dict(live)
        deadline = time.monotonic() + 240
        while missing and time.monotonic() < deadline:
            try:
                asyncio.run(drive_traffic(stack.base_url, secret))
            except Exception as exc:  # say what the stack was doing: a refused connection means nginx was gone
                status = stack.cli("status").stdout
                raise AssertionError(f"traffic failed: {exc!r}\nstatus:\n{status}\n"
                                     f"stack log:\n{stack.tail(150)}") from exc
            time.sleep(3)  # a few scrapes and rule evaluations
            for name, expr in list(missing.items()):
                if has_data(query(port, expr)):
                    del missing[name]
        assert not missing, "no data for:\n" + "\n".join(missing)
        print(f"\n{len(live)} queries returned data ({exporter_queries} dashboard queries over exporters); "
              f"{len(alerts)} alerts evaluated")

        # The alerts must at least be accepted by the query API (evaluated without error).
        for expr in alerts.values():
            query(port, expr)
        # The rules group loaded and evaluates without errors.
        groups = httpx.get(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10).json()["data"]["groups"]
        bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r.get("health") == "err"]
        assert not bad, bad
        assert sum(len(g["rules"]) for g in groups) == len(rules())
        # A healthy stack fires none of the Synapse alerts.
        firing = query(port, 'ALERTS{alertstate="firing"}')
        assert not firing, firing
    finally:
        stack.close(root)
    assert not stack.leftovers(), "the stack left processes running"
