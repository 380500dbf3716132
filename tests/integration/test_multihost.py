"""One deployment on four simulated hosts (network namespaces), each running its slice with `run --host NAME`.

    db     PostgreSQL, Redis          front  main, nginx
    w1     event_persister1           w2     synchrotron1
    out    not part of the deployment: the Matrix client, and the stranger that must not reach replication

Every host gets its own network namespace on one bridge (in a namespace of its own), and its own files: the
same environment names the same paths everywhere (as on real machines), and each host's process bind-mounts
its own directory over them in the private mount namespace `ip netns exec` gives it. Nothing is added to the
root namespace, and the test process never sends to the simulated addresses itself: the client runs inside
`out` (tests/integration/multihost_client.py). As the README says an admin does: front (main's host) generates
first, its data dir (homeserver.yaml, secrets) is copied to the other hosts, and each host applies its own
generated nftables ruleset before it starts.

Checks: each host listens only on its own address (plus loopback, and nginx's public port); a real client
through nginx creates a room and sends messages that the writer on w1 persists (the `events` table says so) and
the synchrotron on w2 serves; a partition of w1 while messages are sent, then its heal: every acknowledged
message reads back once; replication, PostgreSQL and Redis are unreachable from `out` and reachable from w2; the
public /health on front asks the remote processes (a partitioned w2 makes it 503). Teardown stops every process
by PID and deletes the namespaces (and with them the veths and the bridge), even on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest

from tests.conftest import random_port_base
from tests.support.matrix import registration_secret
from tests.support.stack import SW, make_root, process_table, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
IP = shutil.which("ip") or "/usr/sbin/ip"
NFT = shutil.which("nft") or "/usr/sbin/nft"
HOSTS = {"db": 11, "front": 12, "w1": 13, "w2": 14}
OUTSIDER = 50
WORKERS = "event_persister, synchrotron"
PLACEMENT = "main=front, nginx=front, postgres=db, redis=db, event_persister=w1, synchrotron=w2"
READY_TIMEOUT = 240


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in (IP, NFT):
        if not os.path.exists(tool):
            return f"{os.path.basename(tool)} is not installed (iproute2, nftables: scripts/install.sh)"
    if not shutil.which("nginx") and not os.path.exists("/usr/sbin/nginx"):
        return "nginx is not installed"
    return None


class Simulation:
    def __init__(self) -> None:
        self.tag = f"swmh{os.getpid() % 100000}"
        self.net = f"10.{random.randrange(100, 250)}.{random.randrange(0, 250)}"
        self.root = make_root("sw-mh-")
        self.mnt = self.root / "mnt"  # the paths the environment names; each host mounts its own dir here
        self.mnt.mkdir()
        os.chmod(self.mnt, 0o755)
        self.namespaces: list[str] = []
        self.runs: dict[str, subprocess.Popen] = {}
        base = random_port_base(200, lowest=11000)  # its own namespaces; public port base - 1000
        self.public_port = base - 1000
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SYNAPSE_", "POSTGRES_", "NGINX_"))},
            "SYNAPSE_SERVER_NAME": "localhost",
            "SYNAPSE_REPORT_STATS": "no",
            "SYNAPSE_CONFIG_DIR": f"{self.mnt}/data",
            "SYNAPSE_DATA_DIR": f"{self.mnt}/data",
            "SYNAPSE_RUNTIME_DIR": f"{self.mnt}/run",
            "SYNAPSE_INTERNAL_PORT_BASE": str(base),
            "SYNAPSE_HTTP_PORT": str(self.public_port),
            "SYNAPSE_HTTP_BIND_ADDRESS": "0.0.0.0",
            "SYNAPSE_WORKER_TYPES": WORKERS,
            "SYNAPSE_HOSTS": ", ".join(f"{h}={self.address(h)}" for h in HOSTS),
            "SYNAPSE_PLACEMENT": PLACEMENT,
        }

    # ---- the network -------------------------------------------------------------------------------------
    def address(self, host: str) -> str:
        return f"{self.net}.{HOSTS.get(host, OUTSIDER)}"

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def ip(self, *args: str) -> None:
        subprocess.run([IP, *args], check=True, capture_output=True, timeout=30)

    def build(self) -> None:
        switch = self.ns("sw")
        self.ip("netns", "add", switch)
        self.namespaces.append(switch)
        self.ip("-n", switch, "link", "add", "br0", "type", "bridge")
        self.ip("-n", switch, "link", "set", "br0", "up")
        for host in [*HOSTS, "out"]:
            ns = self.ns(host)
            self.ip("netns", "add", ns)
            self.namespaces.append(ns)
            self.ip("-n", ns, "link", "set", "lo", "up")
            # Both ends created inside their namespaces: nothing appears in the root namespace.
            self.ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p-{host}", "netns", switch)
            self.ip("-n", switch, "link", "set", f"p-{host}", "master", "br0")
            self.ip("-n", switch, "link", "set", f"p-{host}", "up")
            self.ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            self.ip("-n", ns, "link", "set", "eth0", "up")

    def link(self, host: str, state: str) -> None:
        """Take a host off the switch (down) or put it back (up)."""
        self.ip("-n", self.ns("sw"), "link", "set", f"p-{host}", state)

    # ---- the hosts ---------------------------------------------------------------------------------------
    def host_dir(self, host: str) -> Path:
        return self.root / "hosts" / host

    def on_host(self, host: str, *argv: str) -> list[str]:
        """argv in the host's network namespace, with the host's own files mounted over the shared paths."""
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        return [
            IP,
            "netns",
            "exec",
            self.ns(host),
            "sh",
            "-c",
            script,
            "sh",
            str(self.host_dir(host)),
            str(self.mnt),
            *argv,
        ]

    def sw(self, host: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.on_host(host, SW, *args), env=self.env, capture_output=True, text=True, timeout=120)

    def prepare(self) -> None:
        for host in HOSTS:
            self.host_dir(host).mkdir(parents=True)
            os.chmod(self.host_dir(host), 0o755)
        generated = self.sw("front", "generate", "--host", "front")
        assert generated.returncode == 0, generated.stderr
        refused = self.sw("w1", "generate", "--host", "w1")  # before the copy: the secrets are main's host's
        assert refused.returncode == 2 and "copied here" in refused.stderr, refused.stderr
        for host in HOSTS:
            if host != "front":  # what the admin copies: the data dir's homeserver.yaml and secrets
                subprocess.run(["cp", "-a", str(self.host_dir("front") / "data"), str(self.host_dir(host))], check=True)
        for host in HOSTS:
            result = self.sw(host, "generate", "--host", host)
            assert result.returncode == 0, result.stderr
            ruleset = self.host_dir(host) / "run" / "nftables" / "synapse-workers.nft"
            subprocess.run([IP, "netns", "exec", self.ns(host), NFT, "-f", str(ruleset)], check=True, timeout=30)

    def log(self, host: str) -> Path:
        return self.root / f"{host}.log"

    def launch(self, host: str) -> None:
        with open(self.log(host), "ab") as log:
            self.runs[host] = subprocess.Popen(
                self.on_host(host, SW, "run", "--host", host), env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self, *hosts: str) -> None:
        def ready() -> bool:
            for host in hosts:
                if self.runs[host].poll() is not None:
                    raise AssertionError(f"{host}: run exited {self.runs[host].returncode}:\n{self.tail(host)}")
            return all("| ready: " in self.log(h).read_text(errors="replace") for h in hosts)

        assert wait_for(ready, READY_TIMEOUT, 0.5), "\n".join(f"--- {h}\n{self.tail(h)}" for h in hosts)

    def tail(self, host: str, lines: int = 40) -> str:
        return "\n".join(self.log(host).read_text(errors="replace").splitlines()[-lines:])

    def client(self, command: str, request: dict, host: str = "out", timeout: float = 180) -> dict:
        result = subprocess.run(
            [IP, "netns", "exec", self.ns(host), sys.executable, "-m", "tests.integration.multihost_client", command],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout)

    def in_ns(self, host: str, *argv: str) -> str:
        return subprocess.run(
            [IP, "netns", "exec", self.ns(host), *argv], check=True, capture_output=True, text=True, timeout=30
        ).stdout

    @property
    def base(self) -> str:
        return f"http://{self.address('front')}:{self.public_port}"

    def plan(self) -> dict:
        result = subprocess.run([SW, "plan", "--json"], env=self.env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    # ---- teardown ----------------------------------------------------------------------------------------
    def ours(self) -> list[int]:
        """PIDs still running that we started: a command line naming our root, or anything in our namespaces."""
        marker = str(self.root).encode()
        pids = {pid for pid, info in process_table().items() if marker in info.cmdline}
        for ns in self.namespaces:
            listed = subprocess.run([IP, "netns", "pids", ns], capture_output=True, text=True, timeout=30)
            pids.update(int(p) for p in listed.stdout.split())
        pids.discard(os.getpid())
        return sorted(pids)

    def close(self) -> list[str]:
        """Stop everything, delete the namespaces and files; returns what was left behind (empty: nothing)."""
        for host in reversed(list(self.runs)):
            run = self.runs[host]
            if run.poll() is None:
                run.send_signal(signal.SIGTERM)
        for run in self.runs.values():
            try:
                run.wait(timeout=45)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
        for pid in self.ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not self.ours(), 10)
        left = [f"pid {pid}" for pid in self.ours()]
        for ns in reversed(self.namespaces):
            subprocess.run([IP, "netns", "del", ns], capture_output=True, timeout=30)
        listed = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        left += [f"namespace {ns}" for ns in self.namespaces if re.search(rf"^{re.escape(ns)}\b", listed, re.M)]
        self.namespaces = []
        self.runs = {}
        shutil.rmtree(self.root, ignore_errors=True)
        return left


@pytest.fixture(scope="module")
def sim():
    reason = _missing()
    if reason:
        pytest.skip(reason)
    simulation = Simulation()
    try:
        simulation.build()
        simulation.prepare()
        simulation.launch("db")
        simulation.wait_ready("db")
        simulation.launch("front")
        simulation.launch("w1")
        simulation.launch("w2")
        simulation.wait_ready("front", "w1", "w2")
        yield simulation
    finally:
        simulation.close()


@pytest.fixture(scope="module")
def room(sim):
    secret = registration_secret(sim.host_dir("front") / "data")
    return sim.client("setup", {"base": sim.base, "secret": secret})


def _events_by_writer(sim: Simulation, room_id: str) -> dict[str, int]:
    password = (sim.host_dir("db") / "data" / "embedded_postgres.pgpass").read_text().strip().rsplit(":", 1)[1]
    # The cluster's unix socket is a file: reachable from here without touching the simulated network.
    with (
        psycopg2.connect(
            host=str(sim.host_dir("db") / "run" / "postgresql"), user="synapse", dbname="synapse", password=password
        ) as conn,
        conn.cursor() as cur,
    ):
        cur.execute(
            "SELECT instance_name, count(*) FROM events WHERE room_id = %s AND type = 'm.room.message' "
            "GROUP BY instance_name",
            (room_id,),
        )
        return dict(cur.fetchall())


def test_each_host_listens_only_on_its_own_address(sim):
    plan = sim.plan()
    for host in HOSTS:
        own = sim.address(host)
        listening = set()
        for line in sim.in_ns(host, "ss", "-ltnH").splitlines():
            local = line.split()[3]
            address, port = local.rsplit(":", 1)
            listening.add((address.strip("[]"), int(port)))
        allowed = {own, "127.0.0.1"} | ({"0.0.0.0", "*"} if host == "front" else set())
        assert {a for a, _ in listening} <= allowed, (host, listening)
        if host == "front":  # only nginx's public port on every address
            assert {p for a, p in listening if a in ("0.0.0.0", "*")} == {sim.public_port}
        expected = {
            "db": {(own, 5432), (own, 6379)},
            "front": {(own, plan["instance_map"]["main"]["port"])},
            "w1": {(own, plan["instance_map"]["event_persister1"]["port"])},
            "w2": {(own, lst["port"]) for lst in plan["workers"][1]["listeners"]},
        }[host]
        assert expected <= listening, (host, expected, listening)


def test_a_client_through_nginx_writes_on_another_host(sim, room):
    request = {**room, "base": sim.base, "count": 5, "interval": 0, "timeout": 30, "retry_for": 0, "prefix": "calm"}
    sent = sim.client("send", request)
    assert all(sent["first"].values()), sent
    seen = sim.client("read", {**room, "base": sim.base})
    bodies = [m["body"] for m in seen["messages"]]
    assert bodies == [f"calm-{i:03d}" for i in range(5)]
    # /sync is the synchrotron's (w2): it saw the events the writer on w1 persisted, through Redis on db.
    assert set(sent["first"].values()) <= set(seen["synced"])
    assert _events_by_writer(sim, room["room_id"]) == {"event_persister1": 5}


def test_a_partition_of_the_writer_host_loses_no_acknowledged_message(sim, room):
    count = 16
    request = {
        **room,
        "base": sim.base,
        "count": count,
        "interval": 0.5,
        "timeout": 4,
        "retry_for": 120,
        "prefix": "split",
    }
    (sim.root / "send.json").write_text(json.dumps(request))
    with open(sim.root / "send.json") as stdin:
        sender = subprocess.Popen(
            [IP, "netns", "exec", sim.ns("out"), sys.executable, "-m", "tests.integration.multihost_client", "send"],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
    try:
        time.sleep(2)
        sim.link("w1", "down")
        time.sleep(10)
    finally:
        sim.link("w1", "up")
    out, err = sender.communicate(timeout=240)
    assert sender.returncode == 0, err[-3000:]
    sent = json.loads(out)
    failed_first = [t for t, e in sent["first"].items() if e is None]
    assert failed_first, f"no send failed while the writer's host was cut off: the partition did nothing ({sent})"
    assert all(sent["final"].values()), f"not acknowledged even after the heal: {sent['final']}"
    seen = sim.client("read", {**room, "base": sim.base})
    split = [m for m in seen["messages"] if m["body"].startswith("split-")]
    # Every message exactly once, with the event id the server acknowledged (a retry returned the same event).
    # Not necessarily in sending order: one held up by the partition may be persisted after later ones.
    assert sorted(m["body"] for m in split) == [f"split-{i:03d}" for i in range(count)]
    assert {m["body"]: m["event_id"] for m in split} == sent["final"]
    writers = _events_by_writer(sim, room["room_id"])
    assert list(writers) == ["event_persister1"] and sum(writers.values()) == len(seen["messages"])


def test_replication_and_storage_are_unreachable_from_outside_the_deployment(sim):
    plan = sim.plan()
    internal = [
        [sim.address("front"), plan["instance_map"]["main"]["port"]],
        [sim.address("w1"), plan["instance_map"]["event_persister1"]["port"]],
        [sim.address("db"), 5432],
        [sim.address("db"), 6379],
    ]
    public = [sim.address("front"), sim.public_port]
    from_stranger = sim.client("probe", {"targets": [*internal, public], "timeout": 2})
    from_member = sim.client("probe", {"targets": internal, "timeout": 2}, host="w2")
    shown = {f"{h}:{p}" for h, p in internal}
    assert all(from_member[t] == "open" for t in shown), from_member  # the ports do listen, for the deployment
    assert not [t for t in shown if from_stranger[t] == "open"], from_stranger
    assert from_stranger[f"{public[0]}:{public[1]}"] == "open"


def test_public_health_asks_the_processes_on_other_hosts(sim):
    def public_health() -> tuple[int, str]:
        result = subprocess.run(
            [
                IP,
                "netns",
                "exec",
                sim.ns("out"),
                sys.executable,
                "-c",
                "import httpx,sys; r=httpx.get(sys.argv[1], timeout=10); print(r.status_code); print(r.text)",
                f"{sim.base}/health",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        code, _, body = result.stdout.partition("\n")
        return int(code or 0), body

    assert public_health()[0] == 200
    sim.link("w2", "down")
    try:
        assert wait_for(lambda: public_health()[0] == 503, 30, 1)
        assert "synchrotron1" in public_health()[1]
    finally:
        sim.link("w2", "up")
    assert wait_for(lambda: public_health()[0] == 200, 30, 1)


def test_health_on_a_host_covers_its_slice(sim):
    w1 = sim.sw("w1", "health")
    assert w1.returncode == 0, w1.stdout + w1.stderr
    assert {line.split(":")[0] for line in w1.stdout.splitlines()} == {"event_persister1"}
    db = sim.sw("db", "status")
    assert db.returncode == 0, db.stdout + db.stderr
    assert {line.split()[0] for line in db.stdout.splitlines()[2:]} == {"postgres", "redis"}
    front = sim.sw("front", "health")
    assert front.returncode == 0, front.stdout + front.stderr
    assert {line.split(":")[0] for line in front.stdout.splitlines()} == {"nginx", "main"}


def test_teardown_leaves_nothing(sim):
    namespaces = list(sim.namespaces)
    root = sim.root
    assert sim.close() == []
    listed = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    assert not [ns for ns in namespaces if ns in listed]
    assert not root.exists()
