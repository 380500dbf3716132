"""The built-in coturn and Synapse's TURN settings: turnserver.conf, shared.yaml, the plan's services, the
program row, and the config written with the secret (pure, plus `generate` into a temp dir)."""

from __future__ import annotations

import json
import socket
import struct
import threading

import pytest
import yaml

from synapse_workers.cli import main as cli_main
from synapse_workers.errors import UserError
from synapse_workers.files import write_files
from synapse_workers.load import load_plan
from synapse_workers.programs import STAGE_NAMES, Health, programs
from synapse_workers.render import render_all
from synapse_workers.render.coturn import DENIED_PEERS, SECRET_KEY, peer_range
from synapse_workers.render.synapse import shared_config
from synapse_workers.run.health import check, stun_binding
from tests.unit.test_programs import BINARIES as PROGRAM_BINARIES

COTURN = {"SYNAPSE_ENABLE_BUILTIN_COTURN": "1"}
BINARIES = {**PROGRAM_BINARIES, "turnserver": "/usr/bin/turnserver"}


@pytest.fixture
def env(base_env):
    return {**base_env, "SYNAPSE_HTTP_PORT": "8008", "SYNAPSE_INTERNAL_PORT_BASE": "30000"}


def plan_for(env, **extra):
    return load_plan({**env, **extra})


def conf_for(env, **extra) -> str:
    plan = plan_for(env, **COTURN, **extra)
    private = render_all(plan).private[plan.layout.coturn_conf]
    return private.text


def lines(conf: str) -> list[str]:
    return [line for line in conf.splitlines() if line and not line.startswith("#")]


# ---- turnserver.conf ------------------------------------------------------------------------------------


def test_default_config_denies_private_loopback_and_link_local_peers(env):
    conf = lines(conf_for(env))
    denied = {line.split("=", 1)[1] for line in conf if line.startswith("denied-peer-ip=")}
    for network in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16", "::1/128",
                    "fc00::/7", "fe80::/10", "100.64.0.0/10", "0.0.0.0/8"):
        assert peer_range(network) in denied, network
    assert "127.0.0.0-127.255.255.255" in denied and "::1" in denied and "10.0.0.0-10.255.255.255" in denied
    assert "allow-loopback-peers" not in conf
    for flag in ("use-auth-secret", "fingerprint", "no-cli", "no-tls", "no-dtls", "no-multicast-peers",
                 "no-tcp-relay", "realm=example.test", "listening-port=3478", "min-port=49153", "max-port=49173",
                 "log-file=stdout"):
        assert flag in conf, flag
    # Without COTURN_INTERNAL_IP coturn listens on every address; no address is invented.
    assert not [line for line in conf if line.startswith(("listening-ip", "relay-ip", "external-ip", "prometheus"))]


def test_test_switch_allows_loopback_peers_only(env):
    conf = lines(conf_for(env, COTURN_ALLOW_LOOPBACK_PEERS="1"))
    denied = {line.split("=", 1)[1] for line in conf if line.startswith("denied-peer-ip=")}
    assert "allow-loopback-peers" in conf
    assert "127.0.0.0-127.255.255.255" not in denied and "::1" not in denied
    assert "10.0.0.0-10.255.255.255" in denied and "192.168.0.0-192.168.255.255" in denied  # the rest stays denied
    assert len(denied) == len(DENIED_PEERS) - 2


def test_no_denied_range_holds_the_unspecified_ipv6_address(env):
    """coturn 4.6 reads "::" (alone or as a range's end) as every address: denying it would deny every peer."""
    for line in lines(conf_for(env)):
        if line.startswith("denied-peer-ip="):
            assert "::" not in line.split("=", 1)[1].split("-") and "0:0:0:0:0:0:0:0" not in line, line


def test_peer_ranges_are_coturn_ranges_not_cidr():
    assert peer_range("10.0.0.0/8") == "10.0.0.0-10.255.255.255"
    assert peer_range("::1/128") == "::1"
    assert peer_range("fe80::/10") == "fe80::-febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"COTURN_EXTERNAL_IP": "203.0.113.7"}, ["external-ip=203.0.113.7"]),
        (
            {"COTURN_EXTERNAL_IP": "203.0.113.7", "COTURN_INTERNAL_IP": "10.0.0.5"},
            ["listening-ip=10.0.0.5", "relay-ip=10.0.0.5", "external-ip=203.0.113.7/10.0.0.5"],
        ),
        ({"COTURN_INTERNAL_IP": "192.168.1.2"}, ["listening-ip=192.168.1.2", "relay-ip=192.168.1.2"]),
        ({"COTURN_EXTERNAL_IP": "2001:db8::1"}, ["external-ip=2001:db8::1"]),
    ],
)
def test_addresses_come_from_the_environment_only(env, extra, expected):
    conf = lines(conf_for(env, **extra))
    found = [line for line in conf if line.startswith(("listening-ip", "relay-ip", "external-ip"))]
    assert found == expected


def test_ports_and_metrics(env):
    conf = lines(conf_for(env, COTURN_PORT="3479", COTURN_MIN_PORT="50000", COTURN_MAX_PORT="50010",
                          COTURN_METRICS="1"))
    assert {"listening-port=3479", "min-port=50000", "max-port=50010"} <= set(conf)
    # Prometheus on loopback, on a fixed port from the internal base (base + 9).
    assert [line for line in conf if line.startswith("prometheus")] == [
        "prometheus", "prometheus-address=127.0.0.1", "prometheus-port=30009"]


def test_no_secret_in_any_rendered_text(env):
    secret = "turn-SECRET-value-77"
    plan = plan_for(env, **COTURN, SYNAPSE_TURN_SECRET=secret, COTURN_METRICS="1")
    files = render_all(plan)
    private = files.private[plan.layout.coturn_conf]
    assert secret not in private.text and not any(line.startswith(SECRET_KEY) for line in lines(private.text))
    assert private.secrets == ((SECRET_KEY, plan.secrets.turn),)
    for path, text in files.managed.items():
        assert secret not in text, path
    assert plan.layout.coturn_conf not in files.managed  # never a 0644 managed file


def test_coturn_off_renders_nothing(env):
    plan = plan_for(env)
    files = render_all(plan)
    assert files.private == {} and plan.services == () and plan.turn_uris == ()


# ---- Synapse's side: shared.yaml, never the generated homeserver.yaml --------------------------------------

TURN_KEYS = {"turn_uris", "turn_shared_secret", "turn_shared_secret_path", "turn_user_lifetime", "turn_allow_guests"}


def shared_and_homeserver(env, **extra):
    plan = plan_for(env, **extra)
    files = render_all(plan)
    shared = yaml.safe_load(files.managed[plan.layout.shared_config])
    homeserver = yaml.safe_load(files.once[plan.homeserver.path][0])
    return plan, shared, homeserver


def test_builtin_coturn_derives_turn_uris_from_server_name_and_port(env):
    plan, shared, homeserver = shared_and_homeserver(env, **COTURN, COTURN_PORT="3480")
    assert shared["turn_uris"] == ["turn:example.test:3480?transport=udp", "turn:example.test:3480?transport=tcp"]
    assert shared["turn_shared_secret_path"] == plan.secrets.turn
    assert shared["turn_shared_secret"] is None  # overrides an inline secret in a user's homeserver.yaml
    assert shared["turn_user_lifetime"] == "1h" and shared["turn_allow_guests"] is True
    assert not TURN_KEYS & set(homeserver)


def test_turn_uris_given_win_over_the_derived_ones(env):
    _, shared, _ = shared_and_homeserver(env, **COTURN, SYNAPSE_TURN_URIS="turn:turn.example.test:443?transport=tcp")
    assert shared["turn_uris"] == ["turn:turn.example.test:443?transport=tcp"]


def test_own_turn_server_without_coturn(env):
    plan, shared, homeserver = shared_and_homeserver(env, SYNAPSE_TURN_URIS="turns:turn.example.test:5349")
    assert shared["turn_uris"] == ["turns:turn.example.test:5349"] and plan.services == ()
    assert not TURN_KEYS & set(homeserver)


def test_no_turn_settings_at_all_when_off(env):
    _, shared, homeserver = shared_and_homeserver(env)
    assert not TURN_KEYS & set(shared) and not TURN_KEYS & set(homeserver)


@pytest.mark.parametrize(
    "server_name, host",
    [("example.test:8448", "example.test"), ("[2001:db8::1]:8448", "[2001:db8::1]"), ("192.0.2.1", "192.0.2.1")],
)
def test_turn_host_is_the_server_name_without_its_port(env, server_name, host):
    plan = plan_for(env, **COTURN, SYNAPSE_SERVER_NAME=server_name)
    assert plan.turn_uris[0] == f"turn:{host}:3478?transport=udp"
    assert f"realm={host}" in lines(render_all(plan).private[plan.layout.coturn_conf].text)


def test_existing_homeserver_yaml_gets_turn_settings_and_a_secret(env, tmp_root):
    data = tmp_root / "data"
    data.mkdir()
    (data / "homeserver.yaml").write_text(
        "server_name: example.test\nturn_uris: [turn:old.example.test]\nturn_shared_secret: inline\n"
    )
    plan = plan_for(env, **COTURN)
    assert plan.homeserver.exists
    assert shared_config(plan)["turn_uris"][0].startswith("turn:example.test:3478")
    write_files(plan, render_all(plan))
    secret = (data / "example.test.turn.key")
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_text().strip()) == 64
    assert (data / "homeserver.yaml").read_text().count("turn") == 3  # the user's file is never touched


# ---- the plan ---------------------------------------------------------------------------------------------


def test_plan_json_lists_coturn_under_services(env, capsys):
    assert cli_main(["plan", "--json"], env={**env, **COTURN, "COTURN_INTERNAL_IP": "127.0.0.1",
                                             "COTURN_METRICS": "1"}) == 0
    doc = json.loads(capsys.readouterr().out)
    coturn = doc["services"]["coturn"]
    assert coturn["host"] == "127.0.0.1" and coturn["port"] == 3478 and coturn["protocols"] == ["udp", "tcp"]
    assert coturn["relay_ports"] == {"min": 49153, "max": 49173, "protocol": "udp"}
    metrics = [lst for lst in coturn["listeners"] if lst["kind"] == "metrics"]
    assert metrics == [{"kind": "metrics", "resources": ["metrics"], "host": "127.0.0.1", "port": 30009}]
    assert doc["turn_uris"] == ["turn:example.test:3478?transport=udp", "turn:example.test:3478?transport=tcp"]


def test_plan_json_services_empty_when_off(env, capsys):
    assert cli_main(["plan", "--json"], env=env) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["services"] == {} and doc["turn_uris"] == []


def test_every_address_when_no_internal_ip(env):
    service = plan_for(env, **COTURN).service("coturn")
    assert service is not None and service.main.host == "0.0.0.0" and service.listener("metrics") is None


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"COTURN_PORT": "49160"}, "inside the relay range"),
        ({"COTURN_PORT": "8008"}, "COTURN_PORT=8008 and SYNAPSE_HTTP_PORT=8008 both use port 8008"),
        ({"COTURN_PORT": "30003"}, "collides with the internal ports"),
        ({"COTURN_PORT": "80"}, "from 1024 to 65535"),
    ],
)
def test_port_conflicts_are_refused(env, extra, words):
    with pytest.raises(UserError) as info:
        plan_for(env, **COTURN, **extra)
    assert any(words in p for p in info.value.problems), info.value.problems


def test_relay_range_check_only_matters_with_coturn(env):
    plan_for(env, COTURN_PORT="49160")  # coturn off: nothing listens there


# ---- the program ------------------------------------------------------------------------------------------


def test_program_row(env):
    plan = plan_for(env, **COTURN, SYNAPSE_LAUNCH_MODE="process")
    rows = {p.name: p for p in programs(plan, as_root=True, binaries=BINARIES, coturn_user=(104, 107))}
    coturn = rows["coturn"]
    assert (STAGE_NAMES[coturn.stage] == "nginx" and not coturn.critical and coturn.addon
            and coturn.stop_signal == "TERM")
    assert coturn.health == Health("stun", "127.0.0.1:3478")
    # setpriv to coturn's own user; the secret is never in the command line or the environment
    assert coturn.command == ("/usr/bin/setpriv", "--reuid=104", "--regid=107", "--clear-groups", "--",
                              "/usr/bin/turnserver", "--log-file", "stdout", "--simple-log", "-c",
                              plan.layout.coturn_conf)
    assert coturn.env == {} and coturn.user == (104, 107)
    # rendered for run: the private config belongs to coturn's user
    assert render_all(plan, list(rows.values()), as_root=True).private[plan.layout.coturn_conf].owner == (104, 107)


def test_program_row_without_root_or_coturn(env):
    plan = plan_for(env, **COTURN, COTURN_INTERNAL_IP="127.0.0.2", SYNAPSE_LAUNCH_MODE="process")
    coturn = next(p for p in programs(plan, as_root=False, binaries=BINARIES) if p.name == "coturn")
    assert coturn.command[0] == "/usr/bin/turnserver" and coturn.user is None
    assert coturn.health.target == "127.0.0.2:3478"
    assert "coturn" not in {p.name for p in programs(plan_for(env), as_root=False, binaries=BINARIES)}


def test_as_root_without_a_coturn_user_falls_back_to_synapses(env):
    plan = plan_for(env, **COTURN, UID="1234", GID="5678", SYNAPSE_LAUNCH_MODE="process")
    coturn = next(p for p in programs(plan, as_root=True, binaries=BINARIES) if p.name == "coturn")
    assert coturn.user == (1234, 5678)


# ---- the config with the secret, on disk ------------------------------------------------------------------


def test_generate_writes_the_config_0600_with_the_secret_file_content(env, tmp_root):
    env = {**env, **COTURN}
    assert cli_main(["generate"], env=env) == 0
    plan = load_plan(env)
    conf = tmp_root / "run" / "coturn" / "turnserver.conf"
    secret = (tmp_root / "data" / "example.test.turn.key").read_text().strip()
    assert conf.stat().st_mode & 0o777 == 0o600 and (conf.parent.stat().st_mode & 0o777) == 0o700
    assert conf.read_text().splitlines()[-1] == f"static-auth-secret={secret}"
    assert plan.secrets.turn == str(tmp_root / "data" / "example.test.turn.key")
    # A given secret replaces the stored one, in both places.
    assert cli_main(["generate"], env={**env, "SYNAPSE_TURN_SECRET": "given-turn-secret"}) == 0
    assert conf.read_text().splitlines()[-1] == "static-auth-secret=given-turn-secret"
    assert (tmp_root / "data" / "example.test.turn.key").read_text().strip() == "given-turn-secret"
    # Turned off: the config with the secret goes; Synapse's config carries no TURN settings.
    (conf.parent / "turndb").write_text("coturn's")
    assert cli_main(["generate"], env={k: v for k, v in env.items() if k != "SYNAPSE_ENABLE_BUILTIN_COTURN"}) == 0
    assert not conf.parent.exists()
    assert "turn_" not in (tmp_root / "run" / "synapse" / "shared.yaml").read_text()


# ---- the health check -------------------------------------------------------------------------------------


def _stun_responder(answer_type: int) -> tuple[socket.socket, threading.Thread]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve():
        data, peer = sock.recvfrom(2048)
        sock.sendto(struct.pack("!HHI", answer_type, 0, 0x2112A442) + data[8:20], peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return sock, thread


def test_stun_binding_probe():
    sock, thread = _stun_responder(0x0101)
    try:
        assert stun_binding(f"127.0.0.1:{sock.getsockname()[1]}", timeout=2) is None
    finally:
        thread.join(2)
        sock.close()
    sock, thread = _stun_responder(0x0111)  # a binding error response
    try:
        assert "0x0111" in (stun_binding(f"127.0.0.1:{sock.getsockname()[1]}", timeout=2) or "")
    finally:
        thread.join(2)
        sock.close()


def test_stun_probe_of_nothing_fails_fast():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # bound, never answers
    try:
        assert "no STUN answer" in (check(Health("stun", f"127.0.0.1:{silent.getsockname()[1]}"), timeout=0.3) or "")
    finally:
        silent.close()
    assert check(Health("stun", f"127.0.0.1:{_closed_port()}"), timeout=0.5) is not None


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
