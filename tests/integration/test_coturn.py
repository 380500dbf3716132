"""The built-in coturn, for real: Debian's turnserver started from the generated config, and a whole stack with
SYNAPSE_ENABLE_BUILTIN_COTURN where credentials from Synapse's /voip/turnServer allocate a relay (coturn's own
turnutils_uclient and turnutils_stunclient as clients). Loopback only, free ports, temp dirs removed."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from synapse_workers.files import write_files
from synapse_workers.load import load_plan
from synapse_workers.render import render_all
from synapse_workers.run.health import stun_binding
from tests.conftest import random_port_base
from tests.support.matrix import register, registration_secret
from tests.support.stack import SW, Stack, make_root, stack_env, wait_for

pytestmark = pytest.mark.integration

TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"
UCLIENT = shutil.which("turnutils_uclient") or "/usr/bin/turnutils_uclient"
STUNCLIENT = shutil.which("turnutils_stunclient") or "/usr/bin/turnutils_stunclient"
if not all(os.path.exists(p) for p in (TURNSERVER, UCLIENT, STUNCLIENT)):
    pytest.skip("coturn is not installed (turnserver, turnutils_uclient, turnutils_stunclient)",
                allow_module_level=True)

# Where coturn writes a log file of its own when it is not told otherwise: nothing may appear there.
COTURN_LOG_DIRS = ("/var/log", "/var/tmp", "/tmp")


def _udp_and_tcp_free(port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def coturn_ports(avoid: range) -> dict[str, str]:
    """COTURN_PORT (UDP and TCP free) and a 10-port UDP relay range, all free now and outside `avoid`."""
    for _ in range(500):
        base = random_port_base(12)
        ports = range(base, base + 12)  # the listening port, one spare, 10 relay ports
        if not any(p in avoid for p in ports) and all(_udp_and_tcp_free(p) for p in ports):
            return {"COTURN_PORT": str(base), "COTURN_MIN_PORT": str(base + 2), "COTURN_MAX_PORT": str(base + 11)}
    raise RuntimeError("no free ports for coturn")


def coturn_env(root: Path, **extra: str) -> dict[str, str]:
    env = stack_env(root, "")
    base = int(env["SYNAPSE_INTERNAL_PORT_BASE"])
    env.update(coturn_ports(range(base, base + 120)))
    env.update(SYNAPSE_ENABLE_BUILTIN_COTURN="1", COTURN_INTERNAL_IP="127.0.0.1", **extra)
    return env


def rest_credentials(secret: str, user: str = "probe", lifetime: int = 3600) -> tuple[str, str]:
    """TURN REST API credentials, as Synapse makes them from the shared secret."""
    username = f"{int(time.time()) + lifetime}:{user}"
    password = base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return username, password


def uclient(port: str, username: str, password: str) -> subprocess.CompletedProcess:
    """Two clients, each with an allocation, send 20 messages to each other through their relays (-y)."""
    return subprocess.run(
        [UCLIENT, "-u", username, "-w", password, "-y", "-n", "20", "-l", "120", "-p", port, "127.0.0.1"],
        capture_output=True, text=True, timeout=60,
    )


def received(result: subprocess.CompletedProcess) -> int:
    counts = [int(line.rsplit("tot_recv_msgs=", 1)[1].split(",")[0]) for line in result.stdout.splitlines()
              if "tot_recv_msgs=" in line]
    return max(counts, default=0)


def coturn_log_files() -> set[str]:
    found = set()
    for folder in COTURN_LOG_DIRS:
        try:
            found |= {f"{folder}/{name}" for name in os.listdir(folder) if name.startswith("turn_")}
        except OSError:
            continue
    return found


# ---- coturn alone, from the generated config -------------------------------------------------------------


@pytest.fixture
def root():
    path = make_root("sw-turn-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start_turnserver(plan) -> subprocess.Popen:
    """Started as `run` starts it (the command of its program row, without the privilege drop)."""
    command = [TURNSERVER, "--log-file", "stdout", "--simple-log", "-c", plan.layout.coturn_conf]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _answers(proc: subprocess.Popen, port: int) -> bool:
    """Up once our STUN probe (the program's health check) gets an answer; stunclient itself never times out."""
    return proc.poll() is not None or stun_binding(f"127.0.0.1:{port}", timeout=0.5) is None


def _stop_turnserver(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    return output


@pytest.mark.parametrize("test_switch", [False, True], ids=["default", "loopback-peers-allowed"])
def test_generated_config_answers_stun_and_denies_loopback_peers(root, test_switch):
    """The generated config: STUN answers, every option is one coturn 4.6 knows, and a valid allocation may not
    relay to 127.0.0.1 unless the test switch is on (then the same credentials relay: only the switch differs)."""
    before = coturn_log_files()
    env = coturn_env(root, **({"COTURN_ALLOW_LOOPBACK_PEERS": "1"} if test_switch else {}))
    plan = load_plan(env)
    write_files(plan, render_all(plan))
    conf = Path(plan.layout.coturn_conf)
    secret = Path(plan.secrets.turn).read_text().strip()
    assert conf.stat().st_mode & 0o777 == 0o600
    assert conf.read_text().splitlines()[-1] == f"static-auth-secret={secret}"

    proc = _start_turnserver(plan)
    try:
        assert wait_for(lambda: _answers(proc, plan.settings.turn.port), 15) and proc.poll() is None
        stun = subprocess.run([STUNCLIENT, "-p", env["COTURN_PORT"], "127.0.0.1"], capture_output=True, text=True,
                              timeout=10)
        assert stun.returncode == 0 and "UDP reflexive addr: 127.0.0.1:" in stun.stdout, stun.stdout + stun.stderr
        relayed = uclient(env["COTURN_PORT"], *rest_credentials(secret))
        if test_switch:
            assert relayed.returncode == 0 and received(relayed) >= 20, relayed.stdout + relayed.stderr
        else:
            assert relayed.returncode != 0 and received(relayed) == 0, relayed.stdout
            assert "403 (Forbidden IP)" in relayed.stdout + relayed.stderr, relayed.stdout + relayed.stderr
    finally:
        output = _stop_turnserver(proc)
    assert "Bad configuration format" not in output, output  # every line of ours is an option coturn knows
    assert "Relay address to use: 127.0.0.1" in output and "Listener address to use: 127.0.0.1" in output
    assert coturn_log_files() <= before, coturn_log_files() - before  # logs went to stdout, no file anywhere


def test_metrics_are_refused_with_a_turnserver_without_prometheus(root):
    """Debian's coturn 4.6.1 is built without Prometheus: `run` says so (exit 2) before writing or starting."""
    help_text = subprocess.run([TURNSERVER, "-h"], capture_output=True, text=True, timeout=30)
    if "--prometheus-address" in help_text.stdout + help_text.stderr:
        pytest.skip("this turnserver can serve Prometheus metrics on loopback")
    env = coturn_env(root, COTURN_METRICS="1")
    result = subprocess.run([SW, "run"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "COTURN_METRICS is on" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not Path(env["SYNAPSE_CONFIG_DIR"], "homeserver.yaml").exists()
    assert not Stack(env).leftovers()


def test_a_turn_port_in_use_is_named_before_anything_starts(root):
    """Someone holds COTURN_PORT over UDP only: `run` names it (exit 2) and starts and writes nothing."""
    env = coturn_env(root)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", int(env["COTURN_PORT"])))
        result = subprocess.run([SW, "run"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"COTURN_PORT={env['COTURN_PORT']} (coturn's turn listener) (UDP) cannot be used" in result.stderr, \
        result.stderr
    assert not Path(env["SYNAPSE_CONFIG_DIR"], "homeserver.yaml").exists() and not Stack(env).leftovers()


# ---- a whole stack: Synapse hands out credentials, coturn relays with them -----------------------------------


@pytest.fixture(scope="module")
def stack():
    root = make_root("sw-turn-stack-")
    before = coturn_log_files()
    stack = Stack(coturn_env(root, COTURN_ALLOW_LOOPBACK_PEERS="1"))
    try:
        stack.start(300)
        yield stack
    finally:
        stack.close(root)
    assert coturn_log_files() <= before, coturn_log_files() - before


@pytest.fixture(scope="module")
def credentials(stack: Stack) -> dict:
    secret = registration_secret(stack.env["SYNAPSE_DATA_DIR"])
    token = register(stack.base_url, secret, "caller")["access_token"]
    response = httpx.get(f"{stack.base_url}/_matrix/client/v3/voip/turnServer",
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _status(stack: Stack) -> dict[str, dict]:
    env = {"PATH": os.environ["PATH"], "SYNAPSE_RUNTIME_DIR": stack.env["SYNAPSE_RUNTIME_DIR"]}
    result = subprocess.run([SW, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def _coturn_pid(stack: Stack) -> int:
    for pid in stack.leftovers():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"turnserver"):
            return pid
    raise AssertionError("no turnserver process in the stack")


def test_status_lists_coturn_running(stack: Stack):
    # RUNNING once it has stayed up for its startsecs (nginx may answer before that)
    assert wait_for(lambda: _status(stack)["coturn"]["state"] == "RUNNING", 15), _status(stack)["coturn"]
    row = _status(stack)["coturn"]
    assert row["pid"] == _coturn_pid(stack) and row["restarts"] == 0, row
    assert "nginx: nginx, coturn healthy" in stack.tail(400), stack.tail()
    # its output is prefixed like every program's
    assert any(line.startswith("coturn ") and "|" in line for line in stack.tail(400).splitlines()), stack.tail()


def test_synapse_hands_out_credentials_for_the_builtin_coturn(stack: Stack, credentials: dict):
    port = stack.env["COTURN_PORT"]
    assert credentials["uris"] == [f"turn:localhost:{port}?transport=udp", f"turn:localhost:{port}?transport=tcp"]
    assert credentials["ttl"] == 3600
    # Both sides share one secret: the password is the HMAC of the username with the key file coturn was given.
    key = Path(stack.env["SYNAPSE_DATA_DIR"], "localhost.turn.key").read_text().strip()
    expected = base64.b64encode(hmac.new(key.encode(), credentials["username"].encode(), hashlib.sha1).digest())
    assert credentials["password"] == expected.decode()


def test_a_relay_allocated_with_synapses_credentials_carries_packets(stack: Stack, credentials: dict):
    result = uclient(stack.env["COTURN_PORT"], credentials["username"], credentials["password"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert received(result) >= 20, result.stdout
    assert "Total lost packets 0" in result.stdout, result.stdout


def test_a_wrong_password_gets_no_allocation(stack: Stack, credentials: dict):
    result = uclient(stack.env["COTURN_PORT"], credentials["username"], "not-" + credentials["password"])
    assert result.returncode != 0 and received(result) == 0, result.stdout
    assert "Cannot complete Allocation" in result.stdout + result.stderr, result.stdout + result.stderr


def test_the_secret_is_only_in_files_coturn_alone_can_read(stack: Stack):
    pid = _coturn_pid(stack)
    key = Path(stack.env["SYNAPSE_DATA_DIR"], "localhost.turn.key").read_text().strip()
    proc = Path(f"/proc/{pid}")
    assert key.encode() not in (proc / "cmdline").read_bytes() and key.encode() not in (proc / "environ").read_bytes()
    conf = Path(stack.env["SYNAPSE_RUNTIME_DIR"], "coturn", "turnserver.conf")
    owner = proc.stat().st_uid
    assert conf.stat().st_mode & 0o777 == 0o600 and conf.stat().st_uid == owner
    assert conf.parent.stat().st_mode & 0o777 == 0o700
    if os.geteuid() == 0:  # run as root: coturn drops to Debian's turnserver user (setpriv), never root
        assert owner == pwd.getpwnam("turnserver").pw_uid
    assert f"static-auth-secret={key}" in conf.read_text()


def test_a_killed_coturn_is_restarted_and_healthy_again(stack: Stack, credentials: dict):
    old = _coturn_pid(stack)
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: "coturn is back and healthy" in stack.tail(200), 30), stack.tail()
    assert wait_for(lambda: _status(stack)["coturn"]["restarts"] == 1, 10), _status(stack)["coturn"]
    assert _coturn_pid(stack) != old
    result = uclient(stack.env["COTURN_PORT"], credentials["username"], credentials["password"])
    assert result.returncode == 0 and received(result) >= 20, result.stdout + result.stderr


def test_stops_cleanly(stack: Stack):
    code, took = stack.stop(timeout=30)
    assert code == 0, stack.tail()
    assert took < 30
    assert wait_for(lambda: not stack.leftovers(), 10), stack.leftovers()
