"""The exported deployments actually work. No cluster or Docker engine here, so each pod of `export kubernetes` (each
Synapse service of `export compose`) becomes a network namespace with an address of its own, its peers' DNS names
(`<pod>.<headless service>`, the per-pod Services, `synapse-redis`, the database host; Compose: the service names)
in that namespace's /etc/hosts, and runs exactly its container command on the files it would mount.
PostgreSQL and Redis run in namespaces of their own (Debian's, standing in for the official images).

A client in another namespace talks to nginx only: registers, creates a room, sends, syncs. Proven from outside:
events are written by the event persister (`events.instance_name`), /sync is served by the synchrotron, never by
main, replication is refused at nginx, and every process listens on its own namespace's fixed ports.

Root only (network namespaces); everything is torn down by PID and name even when the test fails. Traffic goes
only to 10.x addresses inside our own namespaces, which have no route anywhere else.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from synapse_workers.render.export import MASKED
from tests.support.stack import SW

from .test_export_kubernetes import export, materialise

pytestmark = pytest.mark.integration

PG_BIN = "/usr/lib/postgresql/15/bin"
SPEC = "synchrotron, event_persister"
DB_HOST = "postgres.test"
CLIENT = r"""
import hashlib, hmac, json, sys, time
import httpx

base, secret, mode = sys.argv[1], sys.argv[2], sys.argv[3]
urls = sys.argv[4:]
deadline = time.monotonic() + 240
for url in urls:  # wait for every health URL
    while True:
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            print(json.dumps({"error": f"not healthy: {url}"}))
            sys.exit(1)
        time.sleep(0.5)
if mode == "wait":
    print(json.dumps({"ok": True}))
    sys.exit(0)
with httpx.Client(base_url=base, timeout=30) as http:
    url = "/_synapse/admin/v1/register"
    nonce = http.get(url).raise_for_status().json()["nonce"]
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
    mac.update(b"\x00".join([nonce.encode(), b"alice", b"pw-alice-1", b"notadmin"]))
    user = http.post(url, json={"nonce": nonce, "username": "alice", "password": "pw-alice-1", "admin": False,
                                "mac": mac.hexdigest()}).raise_for_status().json()
    auth = {"Authorization": f"Bearer {user['access_token']}"}
    room = http.post("/_matrix/client/v3/createRoom", json={}, headers=auth).raise_for_status().json()["room_id"]
    sent = []
    for i in range(3):
        r = http.put(f"/_matrix/client/v3/rooms/{room}/send/m.room.message/t{i}",
                     json={"msgtype": "m.text", "body": f"hello {i}"}, headers=auth)
        sent.append(r.raise_for_status().json()["event_id"])
    bodies = []
    for _ in range(20):
        sync = http.get("/_matrix/client/v3/sync", params={"timeout": "1000"}, headers=auth).raise_for_status().json()
        events = sync.get("rooms", {}).get("join", {}).get(room, {}).get("timeline", {}).get("events", [])
        bodies = [e["content"].get("body") for e in events if e["type"] == "m.room.message"]
        if len(bodies) == 3:
            break
        time.sleep(0.5)
    replication = http.get("/_synapse/replication/get_repl_stream_updates/events/1").status_code
    health = http.get("/health").status_code
print(json.dumps({"room": room, "sent": sent, "bodies": bodies, "replication": replication, "health": health}))
"""


def _run(*argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, **kwargs)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {result.returncode} {result.stderr}")
    return result


class Network:
    """Namespaces on a bridge that lives in a namespace of its own; nothing is added to the root namespace."""

    def __init__(self, names: list[str]):
        self.tag = f"swx{random.randrange(16**4):04x}"
        self.subnet = f"10.213.{random.randrange(1, 250)}"
        self.switch = f"{self.tag}-sw"
        self.hosts = {name: f"{self.subnet}.{i + 10}" for i, name in enumerate(names)}
        self.created: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def up(self, aliases: dict[str, str]) -> None:
        """aliases: DNS name → host (its namespace's address)."""
        _run("ip", "netns", "add", self.switch)
        self.created.append(self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        lines = ["127.0.0.1 localhost"] + [f"{self.hosts[host]} {name}" for name, host in sorted(aliases.items())]
        for i, (host, address) in enumerate(self.hosts.items()):
            ns = self.ns(host)
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run(
                "ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", self.switch
            )
            _run("ip", "-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            _run("ip", "-n", self.switch, "link", "set", f"p{i}", "up")
            _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            etc = Path("/etc/netns", ns)
            etc.mkdir(parents=True)
            (etc / "hosts").write_text("\n".join(lines) + "\n")

    def exec(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def down(self) -> list[str]:
        leftovers = []
        for ns in reversed(self.created):
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            if pids:
                leftovers.append(f"{ns}: {pids}")
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns", ns), ignore_errors=True)
        return leftovers


class Processes:
    def __init__(self, logs: Path):
        self.logs = logs
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - kept open for the process's life
        self.running[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd="/", start_new_session=True
        )

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in reversed(list(self.running.values())):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.running.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def root():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    path = Path(tempfile.mkdtemp(prefix="sw-x-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_postgres(net: Network, procs: Processes, root: Path, password: str) -> Path:
    owner = pwd.getpwnam("postgres")
    data, sockets = root / "pg" / "data", root / "pg" / "sock"
    for d in (data, sockets):
        d.mkdir(parents=True)
        os.chown(d, owner.pw_uid, owner.pw_gid)
    os.chown(root / "pg", owner.pw_uid, owner.pw_gid)
    as_pg = ["setpriv", "--reuid", "postgres", "--regid", str(owner.pw_gid), "--init-groups", "--"]
    _run(
        *as_pg,
        f"{PG_BIN}/initdb",
        "-D",
        str(data),
        "--encoding=UTF8",
        "--locale=C",
        "-U",
        "postgres",
        "--auth-local=peer",
        "--auth-host=scram-sha-256",
        "--no-sync",
        cwd="/",
    )
    (data / "pg_hba.conf").write_text(f"local all postgres peer\nhost all synapse {net.subnet}.0/24 scram-sha-256\n")
    address = net.hosts["db"]
    procs.start(
        "postgres",
        [
            *net.exec("db"),
            *as_pg,
            f"{PG_BIN}/postgres",
            "-D",
            str(data),
            "-c",
            f"listen_addresses={address}",
            "-p",
            "5432",
            "-k",
            str(sockets),
            "-c",
            "fsync=off",
        ],
    )
    deadline = time.monotonic() + 60
    while not (sockets / ".s.PGSQL.5432").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("PostgreSQL did not start:\n" + procs.log("postgres")[-2000:])
        time.sleep(0.2)
    time.sleep(0.5)
    sql = (
        f"CREATE ROLE synapse LOGIN PASSWORD '{password}';\n"
        "CREATE DATABASE synapse OWNER synapse ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;\n"
    )
    _run(
        *as_pg,
        f"{PG_BIN}/psql",
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        str(sockets),
        "-p",
        "5432",
        "-U",
        "postgres",
        "-d",
        "postgres",
        input=sql,
        cwd="/",
    )
    return sockets


@dataclass
class Deployment:
    processes: dict[str, dict]  # pod/service → {app, config_files}, main first
    main: str
    synchrotron: str
    persister: str
    nginx_command: list[str]
    registration: str
    aliases: dict[str, str]  # DNS name → the pod (namespace) it names; the infrastructure's are added later


def kubernetes(env: dict[str, str], root: Path) -> Deployment:
    out = root / "k8s"
    export(env, out, SPEC)
    processes = {p["name"]: p for p in materialise(out)}  # the files every pod mounts, at their paths
    docs = [d for d in yaml.safe_load_all((out / "synapse-workers.yaml").read_text()) if d]
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    nginx = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "synapse-nginx")
    command = nginx["spec"]["template"]["spec"]["containers"][0]["command"]
    _nginx_files(command, config_maps["synapse-nginx-config"]["nginx.conf"])
    secret = yaml.safe_load((out / "secret.yaml").read_text())["stringData"]
    aliases = {"synapse-redis": "redis", "synapse-nginx": "nginx"}
    for pod in processes:
        workload = pod.rsplit("-", 1)[0]
        aliases[f"{pod}.{workload}"] = pod  # the headless Service's per-pod name
        aliases[pod] = pod  # the per-pod ClusterIP Service
    return Deployment(
        processes,
        "synapse-main-0",
        "synapse-synchrotron-0",
        "synapse-event-persister-0",
        command,
        secret["example.test.registration.key"].strip(),
        aliases,
    )


def compose(env: dict[str, str], root: Path) -> Deployment:
    from .test_export_compose import export as compose_export
    from .test_export_compose import materialise as compose_materialise
    from .test_export_compose import normalised

    out = root / "compose"
    compose_export(env, out, SPEC)
    config = normalised(out)  # as Compose v2 reads it
    processes = {p["name"]: p for p in compose_materialise(out, config)}
    nginx = config["services"]["synapse-nginx"]
    mount = nginx["configs"][0]
    _nginx_files(nginx["entrypoint"], Path(config["configs"][mount["source"]]["file"]).read_text())
    aliases = {"synapse-redis": "redis", "synapse-nginx": "nginx", "synapse-postgres": "db"}
    aliases.update({service: service for service in processes})
    return Deployment(
        processes,
        "synapse-main",
        "synapse-synchrotron-0",
        "synapse-event-persister-0",
        nginx["entrypoint"],
        (out / "secrets/example.test.registration.key").read_text().strip(),
        aliases,
    )


def _nginx_files(command: list[str], text: str) -> None:
    conf = Path(command[command.index("-c") + 1])
    (conf.parent / "tmp").mkdir(parents=True, exist_ok=True)  # an emptyDir / tmpfs there
    conf.write_text(text)


@pytest.mark.parametrize("target", ["kubernetes", "compose"])
def test_exported_deployment_serves_a_client(base_env, root, target):
    password = "pw" + os.urandom(8).hex()
    env = {
        **base_env,
        "SYNAPSE_HTTP_PORT": "8008",
        "POSTGRES_HOST": DB_HOST,  # Compose has its own: synapse-postgres
        "POSTGRES_PORT": "5432",
        "POSTGRES_PASSWORD": password,
    }
    deployment = (kubernetes if target == "kubernetes" else compose)(env, root)
    processes, registration = deployment.processes, deployment.registration
    # nginx runs under the image's `synapse-workers mask-output` (tokens masked in its output): ours here
    assert deployment.nginx_command[:3] == list(MASKED), deployment.nginx_command
    nginx_command = [SW, *deployment.nginx_command[1:]]
    pods = list(processes)
    assert sorted(pods) == sorted([deployment.main, deployment.synchrotron, deployment.persister])
    net = Network([*pods, "nginx", "redis", "db", "client"])
    aliases = {DB_HOST: "db", **deployment.aliases}
    logs = root / "logs"
    logs.mkdir()
    procs = Processes(logs)
    client_script = root / "client.py"
    client_script.write_text(textwrap.dedent(CLIENT))
    failure = ""
    try:
        net.up(aliases)
        pg_sockets = start_postgres(net, procs, root, password)
        procs.start(
            "redis",
            [
                *net.exec("redis"),
                "redis-server",
                "--bind",
                net.hosts["redis"],
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
        )

        def client(mode: str, *urls: str) -> dict:
            result = subprocess.run(
                [
                    *net.exec("client"),
                    sys.executable,
                    str(client_script),
                    "http://synapse-nginx:8008",
                    registration,
                    mode,
                    *urls,
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if result.returncode:
                raise AssertionError(f"client {mode}: {result.stdout}{result.stderr[-3000:]}")
            return json.loads(result.stdout.splitlines()[-1])

        def synapse(pod: str) -> None:
            proc = processes[pod]
            argv = [sys.executable, "-m", proc["app"]]
            for path in proc["config_files"]:
                argv += ["--config-path", path]
            procs.start(pod, [*net.exec(pod), *argv])

        synapse(deployment.main)  # main migrates the schema first (in Kubernetes the workers crash-loop meanwhile)
        client("wait", f"http://{deployment.main}:8080/health")
        synapse(deployment.synchrotron)
        synapse(deployment.persister)
        procs.start("nginx", [*net.exec("nginx"), *nginx_command])
        client("wait", *(f"http://{pod}:8080/health" for pod in pods), "http://synapse-nginx:8008/health")
        result = client("scenario")

        assert result["bodies"] == ["hello 0", "hello 1", "hello 2"], result
        assert result["replication"] == 404 and result["health"] == 200, result
        # Every event (the room's creation included) was persisted by the event persister pod.
        counts = _run(
            "setpriv",
            "--reuid",
            "postgres",
            "--regid",
            "postgres",
            "--init-groups",
            "--",
            f"{PG_BIN}/psql",
            "-X",
            "-At",
            "-h",
            str(pg_sockets),
            "-p",
            "5432",
            "-U",
            "postgres",
            "-d",
            "synapse",
            "-c",
            "SELECT instance_name, count(*) FROM events GROUP BY 1",
            cwd="/",
        ).stdout
        assert counts.split("|")[0] == deployment.persister and len(counts.splitlines()) == 1, counts
        # /sync went to the synchrotron pod, never to main.
        assert "/_matrix/client/v3/sync" in procs.log(deployment.synchrotron)
        assert "/_matrix/client/v3/sync" not in procs.log(deployment.main)
        # Each Synapse process listens on its own pod's fixed ports, on the pod's address.
        for pod in pods:
            listening = _run(*net.exec(pod), "ss", "-Hltn").stdout
            assert "0.0.0.0:8080" in listening, (pod, listening)
    except Exception as exc:
        failure = "\n".join(f"--- {name}\n{procs.log(name)[-3000:]}" for name in procs.running)
        raise AssertionError(f"{exc}\n{failure}") from exc
    finally:
        procs.stop()
        leftovers = net.down()
    assert not leftovers, leftovers
