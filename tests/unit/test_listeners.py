"""Every listener of an existing homeserver.yaml: which ones nginx serves on their own port, with what, and which
ones are named in a warning; and one check of every port the plan uses against every other.

Expected prefixes are Synapse 1.163.2's (synapse/app/homeserver.py `_configure_named_resource`, prefixes from
synapse/api/urls.py), written out here, not taken from catalog.py.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from synapse_workers.cli import main as cli_main
from synapse_workers.errors import UserError
from synapse_workers.load import load_plan
from synapse_workers.render import render_all
from synapse_workers.routing import explain

POSTGRES_DB = {"name": "psycopg2", "args": {"user": "synapse", "password": "x", "host": "db", "database": "synapse"}}
CLIENT = {"port": 8008, "type": "http", "x_forwarded": True, "resources": [{"names": ["client"]}]}
FEDERATION = {"port": 8448, "type": "http", "resources": [{"names": ["federation"]}]}


@pytest.fixture
def env(base_env):
    # The public port from the file (8008 unless a test says otherwise); internal ports at a fixed base, far from
    # every port these tests name.
    env = {k: v for k, v in base_env.items() if k != "SYNAPSE_HTTP_PORT"}
    return {**env, "SYNAPSE_INTERNAL_PORT_BASE": "30000"}


def write_homeserver(env, listeners, **extra) -> Path:
    path = Path(env["SYNAPSE_CONFIG_DIR"]) / "homeserver.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"server_name": "example.test", "database": POSTGRES_DB, "listeners": listeners,
                                    **extra}))
    return path


def tls_files(env) -> dict[str, str]:
    folder = Path(env["SYNAPSE_CONFIG_DIR"]) / "tls"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_text("cert")
    (folder / "key.pem").write_text("key")
    return {"tls_certificate_path": str(folder / "cert.pem"), "tls_private_key_path": str(folder / "key.pem")}


# ---- which listeners are served, and with what ------------------------------------------------------------


def test_a_federation_listener_is_served_on_its_port(env):
    write_homeserver(env, [CLIENT, FEDERATION])
    plan = load_plan(env)
    assert plan.public.port == 8008  # the client listener stays the public one
    (extra,) = plan.extra_listeners
    assert extra.source == "listeners[1]" and extra.port == 8448 and extra.resources == ("federation",)
    # No bind_addresses: Synapse's default ['::', '0.0.0.0']; `::` is both families, so 0.0.0.0 is not bound again.
    assert extra.bind_addresses == ("::",)
    # federation mounts /_matrix/federation, /_matrix/key and the three media prefixes (r0, v3, legacy v1).
    assert extra.served_prefixes == (
        "/_matrix/federation", "/_matrix/key", "/_matrix/media/r0", "/_matrix/media/v1", "/_matrix/media/v3",
    )
    assert extra.unrecognized_prefixes == ("/_matrix", "/_matrix/media")
    assert extra.tls_cert is None and plan.warnings == ()


@pytest.mark.parametrize(
    "names, prefixes",
    [
        (["keys"], ["/_matrix/key"]),
        (["openid"], ["/_matrix/federation/v1/openid"]),
        (["static"], ["/_matrix/static"]),
        (["consent"], ["/_matrix/consent"]),
        (["health"], []),
        (["media"], ["/_matrix/client/v1/media", "/_matrix/federation/v1/media", "/_matrix/media/r0",
                     "/_matrix/media/v1", "/_matrix/media/v3"]),
        (["client"], ["/.well-known", "/_matrix/client", "/_matrix/media/r0", "/_matrix/media/v1",
                      "/_matrix/media/v3", "/_matrix/saml2", "/_matrix/static", "/_synapse/admin",
                      "/_synapse/client", "/_synapse/mas"]),
        # client+media: the media resource's client and federation parts are inside what client+federation mount.
        (["client", "federation", "media"], ["/.well-known", "/_matrix/client", "/_matrix/federation",
                                             "/_matrix/key", "/_matrix/media/r0", "/_matrix/media/v1",
                                             "/_matrix/media/v3", "/_matrix/saml2", "/_matrix/static",
                                             "/_synapse/admin", "/_synapse/client", "/_synapse/mas"]),
    ],
)
def test_what_each_resource_name_mounts(env, names, prefixes):
    write_homeserver(env, [CLIENT, {"port": 9448, "type": "http", "resources": [{"names": names}]}])
    (extra,) = load_plan(env).extra_listeners
    assert list(extra.served_prefixes) == prefixes


def test_bind_addresses_as_given(env):
    write_homeserver(env, [
        CLIENT,
        {**FEDERATION, "bind_addresses": ["127.0.0.1", "::1"]},
        {**FEDERATION, "port": 8449, "bind_addresses": ["0.0.0.0"]},
        {**FEDERATION, "port": 8450, "bind_address": "192.0.2.1"},  # Synapse's legacy single address
        {**FEDERATION, "port": 8451, "bind_addresses": ["0.0.0.0", "::"]},
    ])
    plan = load_plan(env)
    assert [x.bind_addresses for x in plan.extra_listeners] == [
        ("127.0.0.1", "::1"), ("0.0.0.0",), ("192.0.2.1",), ("::",),
    ]
    conf = render_all(plan).managed[plan.layout.nginx_conf]
    for line in ("listen 127.0.0.1:8448 so_keepalive=on;", "listen [::1]:8448 so_keepalive=on;",
                 "listen 0.0.0.0:8449 so_keepalive=on;", "listen 192.0.2.1:8450 so_keepalive=on;",
                 "listen [::]:8451 so_keepalive=on ipv6only=off;"):
        assert line in conf


def test_tls_listener_uses_the_files_certificate(env):
    files = tls_files(env)
    write_homeserver(env, [CLIENT, {**FEDERATION, "tls": True}], **files)
    plan = load_plan(env)
    (extra,) = plan.extra_listeners
    assert (extra.tls_cert, extra.tls_key) == (files["tls_certificate_path"], files["tls_private_key_path"])
    conf = render_all(plan).managed[plan.layout.nginx_conf]
    assert "listen [::]:8448 ssl so_keepalive=on ipv6only=off;" in conf
    assert f"ssl_certificate {files['tls_certificate_path']};" in conf
    assert plan.public.tls_port is None  # SYNAPSE_TLS_CERT is not set: no TLS on the public side


@pytest.mark.parametrize("missing", ["tls_certificate_path", "tls_private_key_path"])
def test_tls_listener_without_its_files_is_refused(env, missing):
    files = tls_files(env)
    del files[missing]
    path = write_homeserver(env, [CLIENT, {**FEDERATION, "tls": True}], **files)
    with pytest.raises(UserError) as info:
        load_plan(env)
    (problem,) = info.value.problems
    assert str(path) in problem and "'listeners[1].tls'" in problem and repr(missing) in problem


def test_tls_listener_with_an_unreadable_certificate_is_refused(env):
    files = tls_files(env)
    files["tls_certificate_path"] = str(Path(env["SYNAPSE_CONFIG_DIR"]) / "tls")  # a directory: never readable
    write_homeserver(env, [CLIENT, {**FEDERATION, "tls": True}], **files)
    with pytest.raises(UserError) as info:
        load_plan(env)
    (problem,) = info.value.problems
    assert "'tls_certificate_path'" in problem and "cannot be read" in problem and "listeners[1]" in problem


def test_a_relative_certificate_path_is_refused(env):
    files = {**tls_files(env), "tls_certificate_path": "tls/cert.pem"}
    write_homeserver(env, [CLIENT, {**FEDERATION, "tls": True}], **files)
    with pytest.raises(UserError, match="'tls_certificate_path': expected an absolute path"):
        load_plan(env)


def test_listeners_not_served_are_named_in_a_warning(env):
    path = write_homeserver(env, [
        CLIENT,
        {"port": 9000, "type": "metrics"},
        {"port": 9001, "type": "manhole"},
        {"port": 9093, "type": "http", "resources": [{"names": ["replication"]}]},
        {"port": 9002, "type": "http", "resources": [{"names": ["metrics"]}]},
        {"path": "/run/synapse/client.sock", "type": "http", "resources": [{"names": ["client"]}]},
        {"port": 8448, "type": "http", "resources": [{"names": ["federation", "metrics"]}]},
    ])
    plan = load_plan(env)
    assert [x.source for x in plan.extra_listeners] == ["listeners[6]"]
    assert plan.extra_listeners[0].resources == ("federation",)
    warnings = plan.warnings
    assert len(warnings) == 6 and all(w.startswith(f"{path}: listeners[") for w in warnings)
    by_path = {w.split(": ")[1].split(" ")[0]: w for w in warnings}
    assert "SYNAPSE_METRICS" in by_path["listeners[1]"] and "port 9000" in by_path["listeners[1]"]
    assert "manhole" in by_path["listeners[2]"]
    assert "replication" in by_path["listeners[3]"] and "not served" in by_path["listeners[3]"]
    assert "SYNAPSE_METRICS" in by_path["listeners[4]"] and "not served" in by_path["listeners[4]"]
    assert "NGINX_LISTEN_UNIX_SOCKET" in by_path["listeners[5]"]
    assert "served without metrics" in by_path["listeners[6]"]


def test_generate_prints_the_warnings_and_plan_json_shows_the_listeners(env, capsys):
    write_homeserver(env, [CLIENT, FEDERATION, {"port": 9000, "type": "metrics"}])
    assert cli_main(["generate"], env=env) == 0
    err = capsys.readouterr().err
    assert "synapse-workers: warning: " in err and "listeners[2] (type: metrics, port 9000) is not served" in err
    assert cli_main(["plan", "--json"], env=env) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["extra_listeners"] == [{
        "source": "listeners[1]", "port": 8448, "bind_addresses": ["::"], "resources": ["federation"], "tls": False,
        "prefixes": ["/_matrix/federation", "/_matrix/key", "/_matrix/media/r0", "/_matrix/media/v1",
                     "/_matrix/media/v3"],
    }]


def test_no_extra_listeners_for_a_generated_file(env):
    plan = load_plan(env)
    assert plan.extra_listeners == () and plan.warnings == ()


def test_synapse_http_port_moves_the_primary_listener_with_a_warning(env):
    write_homeserver(env, [CLIENT, FEDERATION])
    plan = load_plan({**env, "SYNAPSE_HTTP_PORT": "8118"})
    assert plan.public.port == 8118 and [x.port for x in plan.extra_listeners] == [8448]
    (warning,) = plan.warnings
    assert "listeners[0] (port 8008" in warning and "SYNAPSE_HTTP_PORT=8118" in warning


def test_routes_explains_a_request_on_a_listener(env):
    write_homeserver(env, [CLIENT, FEDERATION])
    plan = load_plan({**env, "SYNAPSE_WORKER_TYPES": "federation_reader"})
    refused = explain(plan, "GET", "/_matrix/client/v3/sync", 8448)
    assert refused["status"] == 404 and "M_UNRECOGNIZED" in refused["why"]
    assert explain(plan, "GET", "/_synapse/admin/v1/users", 8448)["status"] == 404
    served = explain(plan, "GET", "/_matrix/federation/v1/version", 8448)
    assert served == explain(plan, "GET", "/_matrix/federation/v1/version")  # routed like the public port
    with pytest.raises(UserError, match="--port 9999"):
        explain(plan, "GET", "/", 9999)


# ---- one check of every port -------------------------------------------------------------------------------


def test_postgres_exporter_on_the_public_port_is_refused(env):
    """SYNAPSE_INTERNAL_PORT_BASE=8000 puts the PostgreSQL exporter (base+8) on 8008, nginx's default port."""
    metrics = {"SYNAPSE_METRICS": "yes", "SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT": "yes"}
    with pytest.raises(UserError) as info:
        load_plan({**env, **metrics, "SYNAPSE_INTERNAL_PORT_BASE": "8000"})
    (problem,) = info.value.problems
    assert "SYNAPSE_HTTP_PORT=8008" in problem and "SYNAPSE_INTERNAL_PORT_BASE=8000+8" in problem
    assert "postgres_exporter" in problem and "both use port 8008" in problem


@pytest.mark.parametrize("variable", ["PROMETHEUS_PORT", "SYNAPSE_TLS_PORT"])
def test_a_public_port_on_the_postgres_exporter_is_refused(env, tmp_root, variable):
    cert, key = tmp_root / "c.pem", tmp_root / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    given = {"SYNAPSE_METRICS": "yes", "SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT": "yes", "SYNAPSE_HTTP_PORT": "8008",
             "SYNAPSE_INTERNAL_PORT_BASE": "30000", "SYNAPSE_TLS_CERT": str(cert), "SYNAPSE_TLS_KEY": str(key),
             variable: "30008"}
    with pytest.raises(UserError) as info:
        load_plan({**env, **given})
    (problem,) = info.value.problems
    assert f"{variable}=30008" in problem and "SYNAPSE_INTERNAL_PORT_BASE=30000+8 (postgres_exporter" in problem


def test_an_extra_listener_on_a_taken_port_is_refused(env):
    path = write_homeserver(env, [CLIENT, {**FEDERATION, "port": 9090}])  # PROMETHEUS_PORT's default
    with pytest.raises(UserError) as info:
        load_plan({**env, "SYNAPSE_METRICS": "yes", "PROMETHEUS_PORT": "9090"})
    (problem,) = info.value.problems
    assert f"listeners[1].port=9090 in {path}" in problem and "PROMETHEUS_PORT=9090" in problem


def test_an_extra_listener_on_the_public_port_from_the_file_is_refused(env):
    path = write_homeserver(env, [CLIENT, {**FEDERATION, "port": 8008}])
    with pytest.raises(UserError) as info:
        load_plan(env)
    (problem,) = info.value.problems
    assert f"listeners[1].port=8008 in {path}" in problem and f"listeners[0].port=8008 in {path}" in problem


def test_every_clash_is_reported_at_once(env):
    given = {"SYNAPSE_HTTP_PORT": "8008", "PROMETHEUS_PORT": "8008", "SYNAPSE_METRICS": "yes",
             "SYNAPSE_ENABLE_BUILTIN_COTURN": "yes", "COTURN_PORT": "8008"}
    with pytest.raises(UserError) as info:
        load_plan({**env, **given})
    assert len(info.value.problems) == 3  # HTTP/Prometheus, HTTP/coturn, Prometheus/coturn


def test_ports_on_different_addresses_do_not_clash(env):
    write_homeserver(env, [CLIENT, {**FEDERATION, "port": 9090, "bind_addresses": ["192.0.2.1"]}])
    given = {"SYNAPSE_METRICS": "yes", "PROMETHEUS_PORT": "9090", "SYNAPSE_HTTP_BIND_ADDRESS": "192.0.2.2"}
    plan = load_plan({**env, **given})
    assert plan.extra_listeners[0].port == 9090  # Prometheus is on 127.0.0.1:9090


def test_an_extra_listener_inside_the_internal_range_is_refused(env):
    write_homeserver(env, [CLIENT, {**FEDERATION, "port": 30007}])
    with pytest.raises(UserError, match=r"listeners\[1\]\.port=30007 .* collides with the internal ports 30000-"):
        load_plan({**env, "SYNAPSE_INTERNAL_PORT_BASE": "30000", "SYNAPSE_WORKER_TYPES": "pusher"})


def test_preflight_names_an_extra_listeners_port_held_by_another_program(env):
    from synapse_workers.run.preflight import check_ports

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = write_homeserver(env, [CLIENT, {**FEDERATION, "port": port, "bind_addresses": ["127.0.0.1"]}])
        problems = check_ports(load_plan(env))
    assert [p for p in problems if "listeners[1]" in p] == [
        f"listeners[1].port={port} in {path} cannot be used: 127.0.0.1:{port} is in use by another program. "
        "Stop the program that holds it, or choose another."
    ]


# ---- the primary listener's addresses ------------------------------------------------------------------------


def _listen_lines(plan) -> list[str]:
    conf = render_all(plan).managed[plan.layout.nginx_conf]
    return [line.strip() for line in conf.splitlines() if line.strip().startswith("listen ") and "8008" in line]


@pytest.mark.parametrize(
    ("bind_addresses", "variable", "expected", "warned"),
    [
        # Synapse's --generate-config without --open-private-ports: loopback only, behind a proxy on this host.
        (["::1", "127.0.0.1"], None, "127.0.0.1", False),
        (["::1"], None, "::1", False),
        # The official Docker image's ['::'] and Synapse's default (no bind_addresses): every address, as before.
        (["::"], None, "0.0.0.0", False),
        (None, None, "0.0.0.0", False),
        # A specific public address: nginx binds every address; said, with the variable that keeps it.
        (["192.0.2.10"], None, "0.0.0.0", True),
        (["::1", "192.0.2.10"], None, "0.0.0.0", True),
        # The variable always wins.
        (["::1", "127.0.0.1"], "0.0.0.0", "0.0.0.0", False),
        (["192.0.2.10"], "192.0.2.10", "192.0.2.10", False),
    ],
)
def test_the_primary_listener_keeps_loopback(env, bind_addresses, variable, expected, warned):
    """Moving a loopback-only client listener behind nginx must not open it to every address."""
    env = {k: v for k, v in env.items() if k != "SYNAPSE_HTTP_BIND_ADDRESS"}
    if variable is not None:
        env["SYNAPSE_HTTP_BIND_ADDRESS"] = variable
    client = {**CLIENT, **({"bind_addresses": bind_addresses} if bind_addresses is not None else {})}
    path = write_homeserver(env, [client])
    plan = load_plan(env)
    assert plan.public.bind_address == expected
    host = f"[{expected}]" if ":" in expected else expected
    assert f"listen {host}:8008" in " ".join(_listen_lines(plan)), _listen_lines(plan)
    warnings = [w for w in plan.warnings if "SYNAPSE_HTTP_BIND_ADDRESS" in w]
    assert len(warnings) == (1 if warned else 0), plan.warnings
    if warned:
        assert warnings[0].startswith(f"{path}: listeners[0] binds {', '.join(bind_addresses)}; nginx's public ")
