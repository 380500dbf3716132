"""The deployment plan: ports, listeners, Synapse wiring, duties, redis, `plan --json`, and route emulation."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pytest
import yaml

from synapse_workers import catalog
from synapse_workers.cli import main as cli_main
from synapse_workers.errors import UserError
from synapse_workers.load import load_plan
from synapse_workers.plan import MAIN
from synapse_workers.render import render_all
from synapse_workers.routing import explain, normalise, private_path
from tests.integration.request_table import REQUESTS

BIG = "synchrotron:2, event_persister:2, media_repository, stream_writers=typing+to_device+receipts"
WIDE = ("full, synchrotron:2, event_persister:2, client_reader:2, push_rules, device_lists:2, "
        "thread_subscriptions, appservice, user_dir:2, pusher:2, federation_sender:2, media_repository:2")
TOPOLOGIES = ["", "pusher", BIG, "full", WIDE]


@pytest.fixture
def env(base_env):
    # base_env's random public port can land inside the random internal range; a fixed low port never does.
    return {**base_env, "SYNAPSE_HTTP_PORT": "8008"}


def plan_for(env, spec="", **extra):
    return load_plan({**env, "SYNAPSE_WORKER_TYPES": spec, **extra})


def tcp_ports(plan) -> list[int]:
    return [lst.port for proc in plan.processes for lst in proc.listeners if lst.port is not None]


def write_homeserver(env, doc) -> Path:
    path = Path(env["SYNAPSE_CONFIG_DIR"]) / "homeserver.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


POSTGRES_DB = {"name": "psycopg2", "args": {"user": "synapse", "password": "x", "host": "db", "database": "synapse"}}


# ---- ports ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", TOPOLOGIES)
def test_ports_are_unique_and_inside_the_internal_range(env, spec):
    plan = plan_for(env, spec, SYNAPSE_METRICS="yes")
    ports = tcp_ports(plan)
    extra = getattr(plan, "health_port", None)
    if extra:
        ports.append(extra)
    base = int(env["SYNAPSE_INTERNAL_PORT_BASE"])
    assert len(ports) == len(set(ports))
    assert all(base <= p <= 65535 for p in ports)
    assert plan.public.port not in ports
    assert plan.public.port == 8008


@pytest.mark.parametrize("spec", TOPOLOGIES)
def test_ports_all_derive_from_the_base(env, spec):
    one = plan_for(env, spec, SYNAPSE_METRICS="yes", SYNAPSE_INTERNAL_PORT_BASE="20000")
    two = plan_for(env, spec, SYNAPSE_METRICS="yes", SYNAPSE_INTERNAL_PORT_BASE="41234")
    assert [p - 20000 for p in tcp_ports(one)] == [p - 41234 for p in tcp_ports(two)]
    assert min(tcp_ports(one)) == 20000  # main's public listener takes the base itself


def test_port_layout_from_the_base(env):
    """README: main takes base+0..4 (public, replication, health, metrics, the stack's /health); workers count
    up from base+10 in declaration order, one port per listener (public, replication, health, metrics)."""
    plan = plan_for(env, BIG, SYNAPSE_METRICS="yes", SYNAPSE_INTERNAL_PORT_BASE="30000")
    ports = {proc.name: {lst.kind: lst.port for lst in proc.listeners} for proc in plan.processes}
    assert ports == {
        "main": {"public": 30000, "replication": 30001, "health": 30002, "metrics": 30003},
        "synchrotron1": {"public": 30010, "health": 30011, "metrics": 30012},
        "synchrotron2": {"public": 30013, "health": 30014, "metrics": 30015},
        "event_persister1": {"replication": 30016, "health": 30017, "metrics": 30018},
        "event_persister2": {"replication": 30019, "health": 30020, "metrics": 30021},
        "media_repository1": {"public": 30022, "replication": 30023, "health": 30024, "metrics": 30025},
        "stream_writers1": {"public": 30026, "replication": 30027, "health": 30028, "metrics": 30029},
    }
    assert plan.health_port == 30004


def test_every_process_listens_on_loopback_only(env):
    plan = plan_for(env, WIDE, SYNAPSE_METRICS="yes")
    for proc in plan.processes:
        for lst in proc.listeners:
            assert lst.path or lst.host == "127.0.0.1", (proc.name, lst)


@pytest.mark.parametrize("offset", [0, 1, 2, 10, 11])
def test_public_port_inside_the_internal_range_is_refused(env, offset):
    with pytest.raises(UserError) as info:
        plan_for(env, BIG, SYNAPSE_INTERNAL_PORT_BASE="30000", SYNAPSE_HTTP_PORT=str(30000 + offset))
    text = str(info.value)
    assert f"SYNAPSE_HTTP_PORT={30000 + offset}" in text and "SYNAPSE_INTERNAL_PORT_BASE=30000" in text


def test_public_port_just_outside_the_range_is_fine(env):
    plan = plan_for(env, BIG, SYNAPSE_INTERNAL_PORT_BASE="30000", SYNAPSE_HTTP_PORT="29999")
    assert plan.public.port == 29999
    high = max(tcp_ports(plan))
    plan = plan_for(env, BIG, SYNAPSE_INTERNAL_PORT_BASE="30000", SYNAPSE_HTTP_PORT=str(high + 1))
    assert plan.public.port == high + 1


def test_tls_port_inside_the_internal_range_is_refused(env, tmp_root):
    cert, key = tmp_root / "c.pem", tmp_root / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    tls = {"SYNAPSE_TLS_CERT": str(cert), "SYNAPSE_TLS_KEY": str(key)}
    with pytest.raises(UserError, match="SYNAPSE_TLS_PORT=30001"):
        plan_for(env, BIG, SYNAPSE_INTERNAL_PORT_BASE="30000", SYNAPSE_TLS_PORT="30001", **tls)
    with pytest.raises(UserError, match="SYNAPSE_TLS_PORT=8008"):
        plan_for(env, "", SYNAPSE_TLS_PORT="8008", **tls)
    plan = plan_for(env, BIG, **tls)
    assert plan.public.tls_port == 8448 and plan.public.tls_cert == str(cert)


def test_public_port_from_an_existing_homeserver_yaml(env):
    tls = Path(env["SYNAPSE_CONFIG_DIR"]) / "tls"
    tls.mkdir(parents=True)
    (tls / "cert.pem").write_text("x")
    (tls / "key.pem").write_text("x")
    write_homeserver(env, {
        "server_name": "example.test", "database": POSTGRES_DB,
        "tls_certificate_path": str(tls / "cert.pem"), "tls_private_key_path": str(tls / "key.pem"),
        "listeners": [
            {"port": 9000, "type": "metrics"},
            {"port": 8448, "type": "http", "tls": True, "resources": [{"names": ["federation"]}]},
            {"port": 8118, "type": "http", "resources": [{"names": ["client", "federation"]}]},
        ],
    })
    env = {k: v for k, v in env.items() if k != "SYNAPSE_HTTP_PORT"}
    assert plan_for(env).public.port == 8118
    assert plan_for(env, SYNAPSE_HTTP_PORT="8228").public.port == 8228


def test_too_high_a_base_is_refused_and_the_last_port_counts(env, monkeypatch):
    """Fill the range exactly up to 65535 (allowed), then one port more (refused)."""
    # The plan's own port check, beyond the worker list's bound (255 workers cannot fill 1000 ports).
    monkeypatch.setattr("synapse_workers.workers.MAX_WORKERS", 1000)

    def spec(n):
        items, i = [], 0
        while n:
            count = min(64, n)
            items.append(f"p{string.ascii_lowercase[i]}=pusher:{count}")
            n, i = n - count, i + 1
        return ", ".join(items)

    probe = plan_for(env, spec(1000), SYNAPSE_INTERNAL_PORT_BASE="20000")
    span = max(tcp_ports(probe)) - 20000
    assert span > 1000  # so that 65536 - span is still a valid base
    top = plan_for(env, spec(1000), SYNAPSE_INTERNAL_PORT_BASE=str(65535 - span))
    assert max(tcp_ports(top)) == 65535
    with pytest.raises(UserError, match="SYNAPSE_INTERNAL_PORT_BASE=.*expected a lower base"):
        plan_for(env, spec(1000), SYNAPSE_INTERNAL_PORT_BASE=str(65536 - span))


# ---- unix sockets ---------------------------------------------------------------------------------------


def test_public_unix_sockets(env):
    plan = plan_for(env, BIG, SYNAPSE_PUBLIC_UNIX_SOCKETS="1")
    runtime = env["SYNAPSE_RUNTIME_DIR"]
    for proc in plan.processes:
        public = proc.listener("public")
        if public is None:
            continue
        assert public.port is None and public.host is None
        assert public.path.startswith(runtime + "/")
        assert public.address == f"unix:{public.path}"
        assert len(public.path.encode()) < 108
        # replication stays on TCP unless its own switch is set
        if proc.listener("replication"):
            assert proc.listener("replication").port is not None
    conf = render_all(plan).managed[plan.layout.nginx_conf]
    servers = [line.split()[1] for line in conf.splitlines()
               if line.strip().startswith("server ") and "max_fails" in line]
    assert servers and all(s.startswith(f"unix:{runtime}/") for s in servers)
    main_yaml = yaml.safe_load(render_all(plan).managed[plan.layout.main_config])
    public = main_yaml["listeners"][0]
    assert public["path"].startswith(runtime + "/") and "port" not in public


def test_replication_unix_sockets(env):
    plan = plan_for(env, BIG, SYNAPSE_HTTP_REPLICATION_UNIX_SOCKETS="yes")
    runtime = env["SYNAPSE_RUNTIME_DIR"]
    for name, lst in plan.instance_map.items():
        assert lst.path and lst.path.startswith(runtime + "/"), name
    assert plan.main.listener("public").port is not None  # public stays on TCP
    shared = yaml.safe_load(render_all(plan).managed[plan.layout.shared_config])
    for name, endpoint in shared["instance_map"].items():
        assert set(endpoint) == {"path"} and endpoint["path"].startswith(runtime + "/"), name


def test_socket_paths_are_distinct(env):
    plan = plan_for(env, WIDE, SYNAPSE_PUBLIC_UNIX_SOCKETS="1", SYNAPSE_HTTP_REPLICATION_UNIX_SOCKETS="1",
                    SYNAPSE_METRICS="1", SYNAPSE_METRICS_UNIX_SOCKETS="1")
    paths = [lst.path for proc in plan.processes for lst in proc.listeners if lst.path]
    assert len(paths) == len(set(paths))
    assert plan.redis.path not in paths
    # health stays on TCP so container health checks can reach it
    assert all(proc.listener("health").port for proc in plan.processes)


# ---- Synapse wiring --------------------------------------------------------------------------------------


# spec -> instance_map (replication ports, base 30000) and stream_writers, written out by hand.
WIRING = {
    "pusher, synchrotron": ({"main": 30001}, {}),
    "typing+account_data, x=presence": (
        {"main": 30001, "account_data+typing1": 30011, "x1": 30014},
        {"account_data": ("account_data+typing1",), "presence": ("x1",), "typing": ("account_data+typing1",)},
    ),
    BIG: (
        {"main": 30001, "event_persister1": 30014, "event_persister2": 30016, "media_repository1": 30019,
         "stream_writers1": 30022},
        {"events": ("event_persister1", "event_persister2"), "quarantined_media_changes": ("media_repository1",),
         "receipts": ("stream_writers1",), "to_device": ("stream_writers1",), "typing": ("stream_writers1",)},
    ),
    "full": (
        {"main": 30001, "account_data1": 30011, "event_persister1": 30016, "media_repository1": 30026,
         "presence1": 30029, "receipts1": 30033, "to_device1": 30036, "typing1": 30039},
        {"account_data": ("account_data1",), "events": ("event_persister1",), "presence": ("presence1",),
         "quarantined_media_changes": ("media_repository1",), "receipts": ("receipts1",),
         "to_device": ("to_device1",), "typing": ("typing1",)},
    ),
}


@pytest.mark.parametrize("spec", list(WIRING))
def test_instance_map_is_main_plus_every_stream_writer(env, spec):
    """instance_map: main and each stream writer, on its loopback replication port; stream_writers by stream."""
    ports, writers = WIRING[spec]
    plan = plan_for(env, spec, SYNAPSE_INTERNAL_PORT_BASE="30000")
    assert {name: (lst.kind, lst.host, lst.port) for name, lst in plan.instance_map.items()} == {
        name: ("replication", "127.0.0.1", port) for name, port in ports.items()}
    assert plan.stream_writers == writers
    shared = yaml.safe_load(render_all(plan).managed[plan.layout.shared_config])
    assert shared["instance_map"] == {name: {"host": "127.0.0.1", "port": port} for name, port in ports.items()}


def test_only_main_and_stream_writers_have_a_replication_listener(env):
    plan = plan_for(env, "full")
    assert {p.name for p in plan.processes if p.listener("replication")} == {
        MAIN, "account_data1", "event_persister1", "media_repository1", "presence1", "receipts1", "to_device1",
        "typing1"}


def test_stream_writers_and_instance_map_rendered(env):
    plan = plan_for(env, BIG)
    shared = yaml.safe_load(render_all(plan).managed[plan.layout.shared_config])
    assert shared["stream_writers"] == {
        "events": ["event_persister1", "event_persister2"],
        "quarantined_media_changes": ["media_repository1"],
        "receipts": ["stream_writers1"],
        "to_device": ["stream_writers1"],
        "typing": ["stream_writers1"],
    }
    assert set(shared["instance_map"]) == {"main", "event_persister1", "event_persister2", "media_repository1",
                                           "stream_writers1"}


def test_duties(env):
    plan = plan_for(env, "background_worker, appservice, user_dir:2, pusher:2, fs=federation_sender:2, "
                         "media_repository:2")
    assert plan.duties == {
        "pusher_instances": ["pusher1", "pusher2"],
        "federation_sender_instances": ["fs1", "fs2"],
        "run_background_tasks_on": "background_worker1",
        "notify_appservices_from_worker": "appservice1",
        "update_user_directory_from_worker": "user_dir1",
        "media_instance_running_background_jobs": "media_repository1",
    }
    shared = yaml.safe_load(render_all(plan).managed[plan.layout.shared_config])
    for key, value in plan.duties.items():
        assert shared[key] == value


def test_no_duties_without_their_workers(env):
    plan = plan_for(env, "synchrotron, event_persister")
    shared = yaml.safe_load(render_all(plan).managed[plan.layout.shared_config])
    for key in (*catalog.LIST_DUTIES, *catalog.ONE_NAME_DUTIES, "enable_media_repo"):
        assert key not in shared


def test_merged_worker_carries_every_duty(env):
    plan = plan_for(env, "bg=background_worker+pusher+federation_sender")
    assert plan.duties == {"pusher_instances": ["bg1"], "federation_sender_instances": ["bg1"],
                           "run_background_tasks_on": "bg1"}


def test_media_workers_write_quarantined_media_changes(env):
    plan = plan_for(env, "media_repository:2, synchrotron")
    assert plan.stream_writers["quarantined_media_changes"] == ("media_repository1", "media_repository2")
    managed = render_all(plan).managed
    shared = yaml.safe_load(managed[plan.layout.shared_config])
    assert shared["enable_media_repo"] is False
    assert {"media_repository1", "media_repository2"} <= set(shared["instance_map"])
    for name in ("media_repository1", "media_repository2"):
        worker = yaml.safe_load(managed[plan.process(name).config_files[-1]])
        assert worker["enable_media_repo"] is True
        resources = {n for lst in worker["worker_listeners"] for r in lst["resources"] for n in r["names"]}
        assert {"media", "replication"} <= resources
    sync = yaml.safe_load(managed[plan.process("synchrotron1").config_files[-1]])
    assert "enable_media_repo" not in sync


def test_monolith_plan(env):
    plan = plan_for(env, "")
    assert plan.workers == ()
    assert plan.main.listener("replication") is None
    assert plan.redis is None
    assert plan.instance_map == {} and plan.stream_writers == {} and plan.duties == {}
    assert {u.name for u in plan.upstreams} == {MAIN}
    managed = render_all(plan).managed
    shared = yaml.safe_load(managed[plan.layout.shared_config])
    assert not shared  # nothing to share
    for route in plan.routes:
        assert route.targets == ((None, MAIN),)


def test_workers_get_our_own_redis(env):
    plan = plan_for(env, "pusher")
    assert plan.redis is not None and plan.redis.external is False
    assert plan.redis.path.startswith(env["SYNAPSE_RUNTIME_DIR"] + "/")
    shared = yaml.safe_load(render_all(plan).managed[plan.layout.shared_config])
    assert shared["redis"] == {"enabled": True, "path": plan.redis.path}


def test_existing_redis_block_is_left_to_the_user(env):
    write_homeserver(env, {"server_name": "example.test", "database": POSTGRES_DB,
                           "redis": {"enabled": True, "host": "redis.internal", "port": 6379}})
    plan = plan_for(env, BIG)
    assert plan.redis.external is True
    shared = yaml.safe_load(render_all(plan).managed[plan.layout.shared_config])
    assert "redis" not in shared


def test_disabled_redis_block_is_not_external(env):
    write_homeserver(env, {"server_name": "example.test", "database": POSTGRES_DB, "redis": {"enabled": False}})
    plan = plan_for(env, BIG)
    assert plan.redis.external is False
    shared = yaml.safe_load(render_all(plan).managed[plan.layout.shared_config])
    assert shared["redis"]["enabled"] is True


def test_config_files_layer_on_homeserver_yaml(env):
    """README: --config-path homeserver.yaml, then <runtime>/synapse/shared.yaml, then the process's own file."""
    plan = plan_for(env, BIG)
    hs = env["SYNAPSE_CONFIG_DIR"] + "/homeserver.yaml"
    synapse = env["SYNAPSE_RUNTIME_DIR"] + "/synapse"
    assert plan.main.config_files == (hs, f"{synapse}/shared.yaml", f"{synapse}/main.yaml")
    assert {p.name: p.config_files for p in plan.workers} == {
        name: (hs, f"{synapse}/shared.yaml", f"{synapse}/workers/{name}.yaml")
        for name in ("synchrotron1", "synchrotron2", "event_persister1", "event_persister2", "media_repository1",
                     "stream_writers1")}


# ---- plan --json ----------------------------------------------------------------------------------------


def test_plan_json_shape(env, capsys):
    assert cli_main(["plan", "--json"], env={**env, "SYNAPSE_WORKER_TYPES": BIG}) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["public"]["port"] == 8008
    assert data["main"]["name"] == "main"
    assert {lst["kind"] for lst in data["main"]["listeners"]} >= {"public", "replication", "health"}
    assert data["main"]["config_files"][0] == env["SYNAPSE_CONFIG_DIR"] + "/homeserver.yaml"
    assert [w["name"] for w in data["workers"]] == [
        "synchrotron1", "synchrotron2", "event_persister1", "event_persister2", "media_repository1", "stream_writers1"]
    for worker in data["workers"]:
        assert worker["app"] == "synapse.app.generic_worker"
        assert worker["types"] and worker["listeners"] and len(worker["config_files"]) == 3
        for lst in worker["listeners"]:
            assert ("port" in lst) != ("path" in lst)
    assert data["workers"][-1]["types"] == ["typing", "to_device", "receipts"]
    assert data["files"]["nginx_conf"] == env["SYNAPSE_RUNTIME_DIR"] + "/nginx/nginx.conf"
    assert "not-a-real-password" not in json.dumps(data)


def test_plan_json_writes_nothing(env, tmp_root, capsys):
    assert cli_main(["plan", "--json"], env=env) == 0
    assert json.loads(capsys.readouterr().out)["workers"] == []
    assert not (tmp_root / "run").exists() and not (tmp_root / "data").exists()


def test_plan_json_bad_env_exits_2(env, capsys):
    assert cli_main(["plan", "--json"], env={**env, "SYNAPSE_WORKER_TYPES": "synchrotorn"}) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "SYNAPSE_WORKER_TYPES" in captured.err and "Did you mean 'synchrotron'?" in captured.err


# ---- route emulation -------------------------------------------------------------------------------------

READERS = "client_reader"  # reads only: every writer endpoint stays on main
WRITERS = ("general_reader, push_rules, account_data, thread_subscriptions, presence, "
           "stream_writers=typing+to_device+receipts, media_repository")
NO_PUSH_WRITER = "general_reader, account_data"


def where(plan, method, path) -> list[str]:
    return explain(plan, method, path)["servers"]


@pytest.fixture
def topo(env):
    cache: dict[str, object] = {}

    def get(spec):
        if spec not in cache:
            cache[spec] = plan_for(env, spec)
        return cache[spec]

    return get


PUSH = "/_matrix/client/v3/pushrules/global/room/!r:x"


def test_push_rules_by_method(topo):
    plan = topo(READERS)
    assert where(plan, "GET", "/_matrix/client/v3/pushrules/") == ["client_reader1"]
    assert where(plan, "HEAD", "/_matrix/client/v3/pushrules/") == ["client_reader1"]
    for method in ("PUT", "DELETE", "POST"):
        assert where(plan, method, PUSH) == [MAIN], method
    plan = topo(WRITERS)
    for method in ("GET", "PUT", "DELETE"):
        assert where(plan, method, PUSH) == ["push_rules1"], method
    plan = topo("")
    assert where(plan, "GET", PUSH) == [MAIN] and where(plan, "PUT", PUSH) == [MAIN]


@pytest.mark.parametrize("spec", [READERS, WRITERS, NO_PUSH_WRITER, "full", ""])
@pytest.mark.parametrize(
    "path",
    ["/_matrix/client/v3/pushrules/global/room/tags", "/_matrix/client/v3/pushrules/global/override/tags/actions",
     "/_matrix/client/r0/pushrules/global/content/tags/enabled", "/_matrix/client/v3/pushrules/global/room/!r:x/tags"],
)
def test_push_rule_writes_with_tags_in_the_path_never_reach_account_data(topo, spec, path):
    plan = topo(spec)
    for method in ("PUT", "DELETE"):
        result = explain(plan, method, path)
        assert result["rule"] == "push_rules"
        servers = result["servers"]
        assert all("account_data" not in plan.process(s).roles for s in servers), (method, servers)
        assert servers == (["push_rules1"] if "push_rules" in spec else [MAIN])


def test_admin_v2_users_by_method(topo):
    plan = topo(READERS)
    path = "/_synapse/admin/v2/users/@alice:example.test"
    assert where(plan, "GET", path) == ["client_reader1"]
    for method in ("PUT", "POST", "DELETE"):
        assert where(plan, method, path) == [MAIN], method
    assert where(plan, "GET", path + "/devices") == [MAIN]  # only the bare user resource is routed


def test_delayed_events_by_method(topo):
    plan = topo(READERS)
    base = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events"
    assert where(plan, "GET", base) == ["client_reader1"]
    assert where(plan, "GET", base + "/abc") == ["client_reader1"]
    assert where(plan, "POST", base + "/abc") == [MAIN]
    assert where(plan, "POST", base + "/abc/restart") == ["client_reader1"]
    assert explain(plan, "POST", base + "/abc")["hard"] is True


def test_admin_v1_rooms_by_method(topo):
    plan = topo(READERS)
    path = "/_synapse/admin/v1/rooms/!room:example.test"
    for method in ("GET", "HEAD", "DELETE"):
        assert where(plan, method, path) == ["client_reader1"], method
    for method in ("POST", "PUT"):
        assert where(plan, method, path) == [MAIN], method


HARD = [
    ("PUT", "/_matrix/client/v3/rooms/!r:x/typing/@u:x", "typing"),
    ("PUT", "/_matrix/client/r0/rooms/!r:x/typing/@u:x", "typing"),
    ("PUT", "/_matrix/client/v3/sendToDevice/m.room.encrypted/txn1", "to_device"),
    ("POST", "/_matrix/client/v3/rooms/!r:x/receipt/m.read/$ev", "receipts"),
    ("POST", "/_matrix/client/v3/rooms/!r:x/read_markers", "receipts"),
    ("PUT", "/_matrix/client/unstable/io.element.msc4306/rooms/!r:x/thread/$ev/subscription", "thread_subscriptions"),
    ("DELETE", "/_matrix/client/unstable/io.element.msc4306/rooms/!r:x/thread/$ev/subscription",
     "thread_subscriptions"),
    ("POST", "/_synapse/admin/v1/media/quarantine/example.test/abc", "media_repository"),
    ("POST", "/_synapse/admin/v1/room/!r:x/media/quarantine", "media_repository"),
    ("POST", "/_synapse/admin/v1/user/@u:x/media/quarantine", "media_repository"),
    ("POST", "/_synapse/admin/v1/quarantine_media/example.test/abc", "media_repository"),
]


@pytest.mark.parametrize("method, path, role", HARD)
def test_hard_routes_go_to_their_writer_when_deployed(topo, method, path, role):
    plan = topo(WRITERS)
    result = explain(plan, method, path)
    assert result["hard"] is True
    assert result["servers"], result
    for name in result["servers"]:
        assert role in plan.process(name).roles, (name, result)


@pytest.mark.parametrize("method, path, role", HARD)
@pytest.mark.parametrize("spec", ["", READERS, "synchrotron:2, event_persister"])
def test_hard_routes_go_to_main_when_their_writer_is_missing(topo, spec, method, path, role):
    result = explain(topo(spec), method, path)
    assert result["servers"] == [MAIN]
    assert result["hard"] is True


def test_hard_routes_in_full_preset(topo):
    plan = topo("full")  # full has typing, to_device, receipts, media but no thread_subscriptions writer
    assert where(plan, "PUT", HARD[0][1]) == ["typing1"]
    assert where(plan, "PUT", HARD[2][1]) == ["to_device1"]
    assert where(plan, "POST", HARD[4][1]) == ["receipts1"]
    assert where(plan, "PUT", HARD[5][1]) == [MAIN]
    assert where(plan, "POST", HARD[7][1]) == ["media_repository1"]


ENCODED = [
    ("PUT", "/_matrix/client/v3/rooms/{room}/typing/{user}"),
    ("POST", "/_matrix/client/v3/rooms/{room}/receipt/m.read/{event}"),
    ("GET", "/_matrix/client/v3/rooms/{room}/messages"),
    ("PUT", "/_matrix/client/v3/rooms/{room}/send/m.room.message/t1"),
    ("GET", "/_synapse/admin/v1/rooms/{room}"),
    ("DELETE", "/_synapse/admin/v1/rooms/{room}"),
    ("POST", "/_synapse/admin/v1/rooms/{room}"),
    ("GET", "/_synapse/admin/v2/users/{user}"),
    ("PUT", "/_matrix/client/v3/pushrules/global/room/{room}"),
    ("GET", "/_matrix/federation/v1/state/{room}"),
    ("POST", "/_synapse/admin/v1/room/{room}/media/quarantine"),
]


@pytest.mark.parametrize("method, template", ENCODED)
@pytest.mark.parametrize("spec", ["full", READERS, WRITERS])
def test_percent_encoded_ids_route_like_decoded_ones(topo, spec, method, template):
    plan = topo(spec)
    plain = template.format(room="!room:server", user="@u:server", event="$ev")
    encoded = template.format(room="%21room%3Aserver", user="%40u%3Aserver", event="%24ev")
    a, b = explain(plan, method, plain), explain(plan, method, encoded)
    assert (a["rule"], a["upstream"], a["servers"]) == (b["rule"], b["upstream"], b["servers"])
    assert a["rule"] is not None


def test_lower_case_percent_escapes_and_doubled_slashes(topo):
    plan = topo(WRITERS)
    assert where(plan, "PUT", "/_matrix/client/v3/rooms/%21r%3ax//typing/%40u%3ax") == ["stream_writers1"]
    assert where(plan, "PUT", "//_matrix/client/v3/sendToDevice/m.x/1") == ["stream_writers1"]
    assert where(plan, "PUT", "/_matrix/client/v3/sendToDevice/m.x/1?access_token=syt_x") == ["stream_writers1"]


@pytest.mark.parametrize("spec", ["", WRITERS, "full"])
@pytest.mark.parametrize(
    "path",
    ["/_synapse/replication/send_event/abc", "/_synapse/replication", "/_synapse/metrics",
     "/_synapse/metrics?name[]=x", "/_synapse//replication/x", "/_synapse/%72eplication/x",
     "/_synapse/%6Detrics", "//_synapse/metrics"],
)
def test_private_paths_are_refused(topo, spec, path):
    for method in ("GET", "POST", "PUT"):
        result = explain(topo(spec), method, path)
        assert result["upstream"] is None and result["servers"] == [] and result["status"] == 404
    assert private_path(path)


def test_similar_public_paths_are_not_private():
    for path in ("/_synapse/admin/v1/server_version", "/_synapse/client/password_reset", "/_synapse/mas/x",
                 "/_matrix/client/v3/replication"):
        assert not private_path(path), path


@pytest.mark.parametrize("spec", ["", READERS, WRITERS, "full", WIDE])
@pytest.mark.parametrize(
    "method, path",
    [("GET", "/"), ("GET", "/nowhere"), ("GET", "/_matrix/client/v3/no_such_endpoint"),
     ("POST", "/_synapse/admin/v1/register"), ("GET", "/_matrix/key/v2/server"),
     ("GET", "/.well-known/matrix/server"), ("PUT", "/_matrix/client/v3/directory/list/room/!r:x")],
)
def test_unknown_paths_go_to_main(topo, spec, method, path):
    result = explain(topo(spec), method, path)
    assert result["upstream"] == MAIN and result["servers"] == [MAIN]


def test_normalise():
    assert normalise("/a//b///c?x=1") == "/a/b/c"
    assert normalise("/rooms/%21r%3Ax") == "/rooms/!r:x"


# One process per role, so a request's first-choice role is always deployed.
ALL_ROLES = ("synchrotron, initial_synchrotron, sliding_synchrotron, "
             "client_reader_room, client_reader_non_room, federation_reader_room, "
             "federation_reader_non_room, federation_inbound, event_creator, frontend_proxy, user_dir, "
             "media_repository, pusher, federation_sender, appservice, background_worker, event_persister, "
             "account_data, presence, receipts, to_device, typing, push_rules, device_lists, thread_subscriptions")


def test_request_table_with_every_role_deployed(topo):
    """Each request of the docs table (tests/integration/request_table.py) reaches its first-choice role, or main."""
    plan = topo(ALL_ROLES)
    wrong = []
    for req in REQUESTS:
        expected = [f"{req.want[0]}1"] if req.want else [MAIN]
        got = where(plan, req.method, req.path)
        if got != expected:
            wrong.append(f"{req.method} {req.path} ({req.note}): {got}, expected {expected}")
    assert not wrong, "\n".join(wrong)
    assert len(REQUESTS) >= 200


# The catalogue examples that stay on main with every role deployed: main-only methods (docs/workers.md §5).
MAIN_ONLY_EXAMPLES = {
    "POST /_matrix/client/unstable/org.matrix.msc4140/delayed_events/abc",
    "PUT /_synapse/admin/v2/users/@u:x",
}


def test_every_catalog_example_hits_its_own_rule(topo):
    """With every role deployed, no example is shadowed by an earlier rule, and only main-only methods stay on main."""
    plan = topo(ALL_ROLES)
    on_main = set()
    for rule in catalog.RULES:
        for example in rule.examples:
            method, path = example.split(" ", 1)
            result = explain(plan, method, path)
            assert result["rule"] == rule.id, (example, result["rule"])
            if result["servers"] == [MAIN]:
                on_main.add(example)
    assert on_main == MAIN_ONLY_EXAMPLES


def test_sticky_upstreams_only_when_there_are_several_servers(topo):
    one = topo("synchrotron")
    two = topo("synchrotron:2")
    assert explain(one, "GET", "/_matrix/client/v3/sync")["balance"] is None
    result = explain(two, "GET", "/_matrix/client/v3/sync")
    assert result["balance"] == "user" and result["servers"] == ["synchrotron1", "synchrotron2"]


# docs/workers.md patterns that overlap more specific routes (nginx: first regex in file order wins).
TAGS = r"^/_matrix/client/(r0|v3|unstable)/.*/tags"  # account data
MEDIA_ADMIN = r"^/_synapse/admin/v1/media/.*$"
MEDIA3 = ["media_repository1", "media_repository2", "media_repository3"]

# method, path, the broad pattern it also matches, the rule that must win, where WIDE sends it.
FIRST_MATCH = [
    ("PUT", "/_matrix/client/v3/rooms/%21r%2Ftags%3Ax/typing/%40u%3Ax", TAGS, "typing", ["typing1"]),
    ("PUT", "/_matrix/client/v3/sendToDevice/m.room.encrypted/tags", TAGS, "to_device", ["to_device1"]),
    ("POST", "/_matrix/client/v3/rooms/%21r%3Ax/receipt/m.read/%24e%2Ftags", TAGS, "receipts", ["receipts1"]),
    ("PUT", "/_matrix/client/unstable/io.element.msc4306/rooms/!r:x/thread/%24e%2Ftags/subscription", TAGS,
     "thread_subscriptions", ["thread_subscriptions1"]),
    ("PUT", "/_matrix/client/v3/pushrules/global/content/tags", TAGS, "push_rules", ["push_rules1"]),
    ("GET", "/_matrix/client/v3/pushrules/global/room/!r:x/tags", TAGS, "push_rules", ["push_rules1"]),
    ("PUT", "/_matrix/client/v3/rooms/!r:x/state/m.tag/tags", TAGS, "event_send", ["event_creator1"]),
    ("POST", "/_synapse/admin/v1/media/quarantine/x/abc", MEDIA_ADMIN, "media_quarantine", MEDIA3),
    # what nothing earlier claims still reaches the broad patterns
    ("PUT", "/_matrix/client/v3/user/@u:x/rooms/!r:x/tags/m.favourite", TAGS, "account_data", ["account_data1"]),
    ("GET", "/_synapse/admin/v1/media/x/abc", MEDIA_ADMIN, "media_admin", MEDIA3),
]


@pytest.mark.parametrize("method, path, broad, rule, servers", FIRST_MATCH)
def test_specific_routes_come_before_broad_patterns(topo, method, path, broad, rule, servers):
    assert re.search(broad, normalise(path))  # the overlap is real
    for spec in ("", READERS):
        assert explain(topo(spec), method, path)["rule"] == rule, spec
    result = explain(topo(WIDE), method, path)
    assert (result["rule"], result["servers"]) == (rule, servers)


def test_every_route_ends_with_a_catch_all(topo):
    plan = topo(WIDE)
    names = {u.name for u in plan.upstreams}
    for route in plan.routes:
        assert route.targets[-1][0] is None, route.rule.id
        assert set(route.upstreams) <= names


# ---- the initial-sync pool: query classes as nginx's $arg_ variables see them ---------------------------------


@pytest.mark.parametrize(
    "path, initial",
    [
        ("/_matrix/client/v3/sync", True),
        ("/_matrix/client/v3/sync?timeout=30000", True),
        ("/_matrix/client/v3/sync?since=s1_2", False),
        ("/_matrix/client/v3/sync?SINCE=s1_2", False),  # nginx's $arg_ matches the name without case
        ("/_matrix/client/v3/sync?since=", True),
        ("/_matrix/client/v3/sync?since=s1_2&full_state=true", True),
        ("/_matrix/client/v3/sync?full_state=true&since=s1_2", True),
        ("/_matrix/client/v3/sync?since=s1_2&full_state=false", False),
        ("/_matrix/client/v3/sync?since=s1_2&full_state=TRUE", False),  # Synapse's parse_boolean: true only
        ("/_matrix/client/v3/sync?xsince=s1_2", True),
        ("/_matrix/client/v3/sync?since=s1_2&since=", False),  # the first one counts, for nginx and Twisted
        ("/_matrix/client/v3/events", True),
        ("/_matrix/client/v3/events?from=s1_2", False),
        ("/_matrix/client/r0/initialSync", True),
        ("/_matrix/client/v3/rooms/!r:x/initialSync?limit=1", True),
    ],
)
def test_initial_requests_go_to_the_initial_pool(topo, path, initial):
    plan = topo("synchrotron, initial_synchrotron")
    assert where(plan, "GET", path) == (["initial_synchrotron1"] if initial else ["synchrotron1"])
    # Without the initial pool every one of them stays on synchrotron; without synchrotron incremental ones on main.
    assert where(topo("synchrotron"), "GET", path) == ["synchrotron1"]
    assert where(topo("initial_synchrotron"), "GET", path) == (["initial_synchrotron1"] if initial else [MAIN])


def test_the_initial_pool_is_stood_in_for_by_the_sync_pool_then_main(topo):
    plan = topo("synchrotron:2, initial_synchrotron:2")
    answer = explain(plan, "GET", "/_matrix/client/v3/sync")
    assert answer["upstream"] == "initial_synchrotron_by_user" and answer["balance"] == "user"
    assert answer["when_down"].startswith("synchrotron_by_user answers instead") and "then" not in answer["why"]
    assert "main while it is down as well" in answer["when_down"]
    assert explain(plan, "GET", "/_matrix/client/v3/sync?since=s1")["when_down"].startswith("main answers instead")
    alone = explain(topo("initial_synchrotron"), "GET", "/_matrix/client/v3/initialSync")
    assert alone["when_down"].startswith("main answers instead")
    routes = {r["id"]: r for r in plan.as_json()["routes"]}
    assert routes["sync"]["queries"] == [{
        "query": "initial_sync", "why": "an initial sync (no since, or full_state=true)",
        "upstream": "initial_synchrotron_by_user", "when_down": "synchrotron_by_user",
    }]
    assert routes["sync"]["targets"] == [{"methods": None, "upstream": "synchrotron_by_user"}]


# ---- bounds per pool (NGINX_POOL_LIMITS) ------------------------------------------------------------------------


def test_every_pool_has_a_bound_given_or_by_default(env):
    plan = plan_for(env, "synchrotron:2, initial_synchrotron, client_reader, media_repository",
                    NGINX_POOL_LIMITS="initial_synchrotron=7, main=9, client_reader=11")
    # Written from the README's defaults: synchrotron 2000, initial_synchrotron 50, main 250 (2250 without a
    # synchrotron: every /sync long-poll waits on main then), others 500.
    assert plan.pool_limits == {"main": 9, "synchrotron": 2000, "initial_synchrotron": 7,
                                "client_reader_room": 11, "client_reader_non_room": 11, "media_repository": 500}
    assert plan.as_json()["pool_limits"] == plan.pool_limits
    assert plan_for(env, "").pool_limits == {"main": 2250}
    assert plan_for(env, "synchrotron").pool_limits == {"main": 250, "synchrotron": 2000}
    assert plan_for(env, "initial_synchrotron").pool_limits == {"main": 2250, "initial_synchrotron": 50}
    # A pool that is not deployed is no error: nothing to bound.
    assert plan_for(env, "", NGINX_POOL_LIMITS="typing=3").pool_limits == {"main": 2250}


def test_routes_names_the_pool_and_its_bound(env):
    plan = plan_for(env, "synchrotron, initial_synchrotron", NGINX_POOL_LIMITS="synchrotron=5")
    assert {k: explain(plan, "GET", "/_matrix/client/v3/sync?since=s1")[k] for k in ("pool", "limit")} == {
        "pool": "synchrotron", "limit": 5}
    assert explain(plan, "GET", "/_matrix/client/v3/sync")["pool"] == "initial_synchrotron"
    assert {k: explain(plan, "POST", "/_matrix/client/v3/logout")[k] for k in ("pool", "limit")} == {
        "pool": "main", "limit": 250}  # a synchrotron holds the long-polls
