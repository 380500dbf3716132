"""Several hosts (SYNAPSE_HOSTS, SYNAPSE_PLACEMENT, --host NAME): parsing, the plan, each host's slice.

Expectations are written out literally (addresses, ports from the base, files per host), not derived from the
code under test. The behaviour on real hosts (network namespaces) is tests/integration/test_multihost.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from synapse_workers.errors import UserError
from synapse_workers.load import load_plan
from synapse_workers.programs import STAGE_MAIN, STAGE_WORKERS, programs, remote_waits
from synapse_workers.render import render_all
from synapse_workers.run.postgres import hba_text
from tests.unit.test_cli_errors import run, snapshot
from tests.unit.test_programs import BINARIES, PG_USER

HOSTS = "db=10.0.0.11, front=10.0.0.12, w1=10.0.0.13, w2=10.0.0.14"
PLACEMENT = "main=front, nginx=front, synchrotron=w1, event_persister=w1, postgres=db, redis=db, client_reader1=w2"
WORKERS = "synchrotron, event_persister, client_reader:2"


@pytest.fixture
def env(base_env):
    """The embedded database (no POSTGRES_PASSWORD), base 30000, four hosts."""
    env = {k: v for k, v in base_env.items() if k != "POSTGRES_PASSWORD"}
    return {
        **env,
        "SYNAPSE_HTTP_PORT": "8008",
        "SYNAPSE_INTERNAL_PORT_BASE": "30000",
        "SYNAPSE_LAUNCH_MODE": "process",
        "SYNAPSE_WORKER_TYPES": WORKERS,
        "SYNAPSE_HOSTS": HOSTS,
        "SYNAPSE_PLACEMENT": PLACEMENT,
    }


@pytest.fixture
def generated(env):
    """main's host has generated: homeserver.yaml and the secrets exist (as if copied to every host)."""
    result = run(env, "generate", "--host", "front")
    assert result.returncode == 0, result.stderr


# ---- the plan -----------------------------------------------------------------------------------------------


def test_each_process_has_its_host_and_listens_on_its_address(env):
    plan = load_plan(env)
    assert plan.placement is not None
    assert plan.placement.where == {
        "main": "front",
        "synchrotron1": "w1",
        "event_persister1": "w1",
        "client_reader1": "w2",
        "client_reader2": "front",  # unplaced: with main
        "nginx": "front",
        "postgres": "db",
        "redis": "db",
    }
    hosts = {p.name: {lst.host for lst in p.listeners} for p in plan.processes}
    assert hosts == {
        "main": {"10.0.0.12"},
        "synchrotron1": {"10.0.0.13"},
        "event_persister1": {"10.0.0.13"},
        "client_reader1": {"10.0.0.14"},
        "client_reader2": {"10.0.0.12"},
    }


def test_plan_json_shows_placement_and_real_addresses(env):
    result = run(env, "plan", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["placement"]["hosts"] == {"db": "10.0.0.11", "front": "10.0.0.12", "w1": "10.0.0.13", "w2": "10.0.0.14"}
    assert doc["placement"]["this_host"] is None
    assert doc["main"]["host"] == "front"
    assert {w["name"]: w["host"] for w in doc["workers"]} == {
        "synchrotron1": "w1",
        "event_persister1": "w1",
        "client_reader1": "w2",
        "client_reader2": "front",
    }
    # main: base+1; workers from base+10 in declaration order (synchrotron1: public 30010, health 30011;
    # event_persister1: replication 30012, health 30013).
    assert {k: (v["host"], v["port"]) for k, v in doc["instance_map"].items()} == {
        "main": ("10.0.0.12", 30001),
        "event_persister1": ("10.0.0.13", 30012),
    }
    assert doc["redis"] == {"external": False, "path": None, "host": "10.0.0.11", "port": 6379}
    assert doc["postgres"]["host"] == "10.0.0.11" and doc["postgres"]["port"] == 5432


def test_one_host_plan_json_has_no_placement(base_env):
    result = run({**base_env, "SYNAPSE_HTTP_PORT": "8008", "SYNAPSE_WORKER_TYPES": "synchrotron"}, "plan", "--json")
    doc = json.loads(result.stdout)
    assert "placement" not in doc and "host" not in doc["main"]
    assert doc["instance_map"]["main"]["host"] == "127.0.0.1"


def test_a_worker_name_wins_over_its_type_and_main_defaults_to_the_first_host(env):
    plan = load_plan({**env, "SYNAPSE_PLACEMENT": "client_reader=w1, client_reader2=w2"})
    assert plan.placement is not None
    where = plan.placement.where
    assert (where["main"], where["client_reader1"], where["client_reader2"]) == ("db", "w1", "w2")
    assert (where["nginx"], where["postgres"], where["redis"]) == ("db", "db", "db")


# ---- each host's slice --------------------------------------------------------------------------------------


def slice_files(env, host: str) -> dict[str, str]:
    return render_all(load_plan(env, host)).managed


def test_shared_yaml_names_the_real_addresses(env):
    plan = load_plan(env)
    shared = yaml.safe_load(render_all(plan).managed[plan.layout.shared_config])
    assert shared["instance_map"] == {
        "main": {"host": "10.0.0.12", "port": 30001},
        "event_persister1": {"host": "10.0.0.13", "port": 30012},
    }
    data = env["SYNAPSE_DATA_DIR"]
    assert shared["redis"] == {
        "enabled": True,
        "host": "10.0.0.11",
        "port": 6379,
        "password_path": f"{data}/redis.key",
    }
    assert shared["database"]["args"]["host"] == "10.0.0.11"
    assert shared["database"]["args"]["port"] == 5432
    assert shared["database"]["args"]["passfile"] == f"{data}/embedded_postgres.pgpass"
    assert shared["worker_replication_secret_path"] == f"{data}/worker_replication.key"


def test_slices_after_the_copy_are_identical_and_create_no_secret(env, tmp_root):
    """front (main's host) generates; the others, given its files, render the same shared.yaml and never
    create or change a secret (different secrets would split the deployment)."""
    first = run(env, "generate", "--host", "front")
    assert first.returncode == 0, first.stderr
    data = Path(env["SYNAPSE_DATA_DIR"])
    secrets = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    assert {"worker_replication.key", "redis.key", "redis.auth.conf", "embedded_postgres.pgpass"} <= set(secrets)
    assert secrets["redis.auth.conf"] == b"requirepass " + secrets["redis.key"].strip() + b"\n"
    shared = Path(env["SYNAPSE_RUNTIME_DIR"], "synapse", "shared.yaml").read_bytes()
    for host in ("db", "w1", "w2"):
        result = run(env, "generate", "--host", host)
        assert result.returncode == 0, result.stderr
        assert Path(env["SYNAPSE_RUNTIME_DIR"], "synapse", "shared.yaml").read_bytes() == shared
        assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == secrets


def test_a_host_without_mains_files_refuses_and_writes_nothing(env, tmp_root):
    before = snapshot(tmp_root)
    result = run(env, "generate", "--host", "w1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "homeserver.yaml" in result.stderr and "worker_replication.key" in result.stderr
    assert "generate --host front" in result.stderr
    assert snapshot(tmp_root) == before


def test_each_host_gets_only_its_own_files(env, tmp_root):
    run(env, "generate", "--host", "front")  # main's files exist now, so every host can render
    runtime = env["SYNAPSE_RUNTIME_DIR"]

    def names(host):
        return {p.removeprefix(runtime + "/") for p in slice_files(env, host)}

    assert names("w1") == {
        "synapse/shared.yaml",
        "synapse/workers/synchrotron1.yaml",
        "synapse/workers/event_persister1.yaml",
        "synapse/log/synchrotron1.log.config",
        "synapse/log/event_persister1.log.config",
        "nftables/synapse-workers.nft",
    }
    assert names("db") == {"synapse/shared.yaml", "redis/redis.conf", "nftables/synapse-workers.nft"}
    assert {
        "synapse/main.yaml",
        "synapse/workers/client_reader2.yaml",
        "nginx/nginx.conf",
        "nftables/synapse-workers.nft",
    } <= names("front")
    assert "redis/redis.conf" not in names("front")


def test_nginx_upstreams_name_the_processes_on_their_hosts(env, tmp_root):
    run(env, "generate", "--host", "front")
    conf = next(text for path, text in slice_files(env, "front").items() if path.endswith("nginx.conf"))
    servers = {line.split()[1] for line in conf.splitlines() if line.strip().startswith("server 10.")}
    # main public 30000, synchrotron1 public 30010, client_reader1 30014, client_reader2 30016
    assert servers == {"10.0.0.12:30000", "10.0.0.13:30010", "10.0.0.14:30014", "10.0.0.12:30016"}


def test_redis_listens_on_its_hosts_address_with_an_included_password(env, tmp_root):
    run(env, "generate", "--host", "front")
    conf = next(text for path, text in slice_files(env, "db").items() if path.endswith("redis.conf"))
    lines = conf.splitlines()
    assert "bind 10.0.0.11" in lines and "port 6379" in lines
    assert f"include {env['SYNAPSE_DATA_DIR']}/redis.auth.conf" in lines
    assert not any(line.startswith("requirepass") for line in lines)  # the secret stays in the 0600 file


def test_the_firewall_allows_the_internal_ports_to_the_deployment_only(env, tmp_root):
    run(env, "generate", "--host", "front")
    ruleset = next(text for path, text in slice_files(env, "w1").items() if path.endswith(".nft"))
    # w1: synchrotron1 public 30010 + health 30011, event_persister1 replication 30012 + health 30013.
    assert "elements = { 10.0.0.11, 10.0.0.12, 10.0.0.13, 10.0.0.14 }" in ruleset
    assert "tcp dport { 30010, 30011, 30012, 30013 } ip saddr @peers4 accept" in ruleset
    assert "tcp dport { 30010, 30011, 30012, 30013 } counter drop" in ruleset
    db = next(text for path, text in slice_files(env, "db").items() if path.endswith(".nft"))
    assert "tcp dport { 5432, 6379 } counter drop" in db
    front = next(text for path, text in slice_files(env, "front").items() if path.endswith(".nft"))
    assert "8008" not in front  # nginx's public port stays open


def test_the_firewall_accepts_ipv6_hosts_too(env, tmp_root):
    six = {**env, "SYNAPSE_HOSTS": "db=fd00::11, front=fd00::12, w1=fd00::13, w2=10.0.0.14"}
    run(six, "generate", "--host", "front")
    ruleset = next(text for path, text in slice_files(six, "w1").items() if path.endswith(".nft"))
    assert "elements = { fd00::11, fd00::12, fd00::13 }" in ruleset
    assert "ip6 saddr @peers6 accept" in ruleset and "ip saddr @peers4 accept" in ruleset


def test_postgres_accepts_the_deployments_hosts_by_password(env, generated):
    plan = load_plan(env, "db")
    lines = hba_text(plan, "postgres").splitlines()
    assert [line.split() for line in lines if line.startswith("host")] == [
        ["host", "synapse", "synapse", f"10.0.0.{n}/32", "scram-sha-256"] for n in (11, 12, 13, 14)
    ]


# ---- programs per host --------------------------------------------------------------------------------------


def test_each_host_supervises_only_its_slice(env, generated):
    def names(host):
        progs = programs(load_plan(env, host), as_root=False, binaries=BINARIES, postgres_user=PG_USER)
        return [p.name for p in progs]

    assert names("db") == ["postgres", "redis"]
    assert names("front") == ["main", "client_reader2", "nginx"]
    assert names("w1") == ["synchrotron1", "event_persister1"]
    assert names("w2") == ["client_reader1"]
    db = {p.name: p for p in programs(load_plan(env, "db"), as_root=False, binaries=BINARIES, postgres_user=PG_USER)}
    assert "listen_addresses=10.0.0.11" in db["postgres"].command
    assert (db["redis"].health.kind, db["redis"].health.target) == ("redis", "10.0.0.11:6379")


def test_a_host_waits_for_what_runs_elsewhere(env, generated):
    w1 = load_plan(env, "w1")
    assert {k: (h.kind, h.target) for k, h in remote_waits(w1, STAGE_MAIN).items()} == {
        "postgres": ("tcp", "10.0.0.11:5432"),
        "redis": ("redis", "10.0.0.11:6379"),
    }
    assert {k: (h.kind, h.target) for k, h in remote_waits(w1, STAGE_WORKERS).items()} == {
        "main": ("http", "http://10.0.0.12:30002/health"),
    }
    front = load_plan(env, "front")
    assert "main" not in remote_waits(front, STAGE_WORKERS)  # main is here
    assert remote_waits(load_plan(env, "db"), STAGE_MAIN) == {}  # nothing of Synapse runs on db


# ---- bad input: exit 2, the variable named, nothing written ------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "argv", "expected"),
    [
        ({"SYNAPSE_HOSTS": "db=10.0.0.300"}, ["plan"], "SYNAPSE_HOSTS="),
        ({"SYNAPSE_HOSTS": "Db=10.0.0.1"}, ["plan"], "the host name 'Db' is not one"),
        ({"SYNAPSE_HOSTS": "a=10.0.0.1, b=10.0.0.1"}, ["plan"], "the address 10.0.0.1 is given twice"),
        ({"SYNAPSE_HOSTS": "a=0.0.0.0"}, ["plan"], "not an address other hosts can reach"),
        ({"SYNAPSE_HOSTS": "a=10.0.0.1, a=10.0.0.2"}, ["plan"], "the host 'a' is named twice"),
        ({"SYNAPSE_PLACEMENT": "main=nowhere"}, ["plan"], "SYNAPSE_PLACEMENT places 'main' on 'nowhere'"),
        ({"SYNAPSE_PLACEMENT": "synchrotrn=w1"}, ["plan"], "SYNAPSE_PLACEMENT: 'synchrotrn' is neither"),
        ({"SYNAPSE_PLACEMENT": "main"}, ["plan"], "SYNAPSE_PLACEMENT="),
        ({"SYNAPSE_HOSTS": "", "SYNAPSE_PLACEMENT": "main=w1"}, ["plan"], "SYNAPSE_PLACEMENT is set without"),
        ({"SYNAPSE_HTTP_REPLICATION_UNIX_SOCKETS": "yes"}, ["plan"], "unix sockets cannot cross hosts"),
        ({"SYNAPSE_PUBLIC_UNIX_SOCKETS": "yes"}, ["plan"], "SYNAPSE_PUBLIC_UNIX_SOCKETS is on"),
        (
            {
                "SYNAPSE_PLACEMENT": "synchrotron=w1, event_persister=w2",
                "SYNAPSE_WORKER_TYPES": "synchrotron+event_persister",
            },
            ["plan"],
            "placed on w1 and w2 by its types",
        ),
        ({"POSTGRES_PASSWORD": "x"}, ["plan"], "places postgres, but the database is not the embedded one"),
        ({"SYNAPSE_ENABLE_COMPRESSOR": "yes"}, ["plan"], "SYNAPSE_ENABLE_COMPRESSOR is not supported with"),
        ({}, ["export", "compose", "-o", "/tmp/sw-never-written"], "export compose: SYNAPSE_HOSTS is set"),
        ({}, ["generate"], "expected --host NAME"),
        ({}, ["run"], "expected --host NAME"),
        ({}, ["generate", "--host", "w3"], "'w3' is not in SYNAPSE_HOSTS: expected one of db, front, w1, w2"),
        ({"SYNAPSE_HOSTS": "", "SYNAPSE_PLACEMENT": ""}, ["generate", "--host", "w1"], "SYNAPSE_HOSTS is not set"),
    ],
)
def test_bad_placement_exits_2_naming_the_variable(env, tmp_root, extra, argv, expected):
    before = snapshot(tmp_root)
    result = run({**env, **extra}, *argv)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_root) == before


def test_load_plan_raises_for_an_unknown_host(env):
    with pytest.raises(UserError, match="not in SYNAPSE_HOSTS"):
        load_plan(env, "nope")


def test_prometheus_on_nginxs_host_scrapes_every_host(env, tmp_root):
    metrics = {**env, "SYNAPSE_METRICS": "yes"}
    run(metrics, "generate", "--host", "front")
    front = slice_files(metrics, "front")
    conf = yaml.safe_load(next(text for path, text in front.items() if path.endswith("prometheus.yml")))
    targets = {t for job in conf["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    # metrics listeners: main base+3; synchrotron1 30010-30012 (public, health, metrics) -> 30012;
    # event_persister1 30013-30015 -> 30015; client_reader1 30016-30018 -> 30018; client_reader2 -> 30021.
    assert {"10.0.0.12:30003", "10.0.0.13:30012", "10.0.0.13:30015", "10.0.0.14:30018", "10.0.0.12:30021"} <= targets
    assert not [path for path in slice_files(metrics, "w1") if path.endswith("prometheus.yml")]
    ruleset = next(text for path, text in slice_files(metrics, "w1").items() if path.endswith(".nft"))
    assert "tcp dport { 30010, 30011, 30012, 30013, 30014, 30015 } counter drop" in ruleset
