"""Faults, with the real nginx: a worker pool that is down, and a SIGKILLed nginx master.

1. Stub upstreams behind the generated nginx.conf; some stubs are closed before any request (so nginx holds no
   keep-alive connection to them) or replaced by a process that dies mid-request. A route main can also serve
   falls back to main; a route only the missing process serves fails fast with 503 and Retry-After; a pool
   with one dead member keeps serving from the others.
2. A SIGKILLed nginx master leaves its workers holding the listening sockets: a plain restart cannot bind.
   The start step (`python -m synapse_workers.run.nginx_start`, the nginx program's command) kills them
   first; under a real supervisord the nginx program comes back instead of ending FATAL.

Expectations are written from the docs (which process serves what; main has the media repository off when
a media worker exists), never read from catalog.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from contextlib import ExitStack, suppress
from pathlib import Path

import httpx
import pytest

from synapse_workers import cli
from synapse_workers.load import load_plan
from synapse_workers.programs import programs
from synapse_workers.render.supervisor import GROUP_NAME, render_supervisor
from tests.integration.test_nginx_routing import Deployment, access_token, make_env
from tests.support.nginx import NGINX, _alive, process_group
from tests.support.stubs import stubs_for_plan

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists(NGINX), reason=f"nginx not installed ({NGINX})"),
]

START_STEP = (sys.executable, "-m", "synapse_workers.run.nginx_start")
DOWN = "synchrotron, typing, media_repository, event_creator, client_reader"
ROOM = "%21room%3Aexample.org"


# ------------------------------------------------------------------------------------------------------
# 1. A worker pool is down
# ------------------------------------------------------------------------------------------------------


class DyingUpstream:
    """Accepts a connection, reads the request head, closes without answering: a worker dying mid-request."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, int(port)))
        self.sock.listen(16)
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(2)
                data = b""
                try:
                    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                        data += chunk
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=5)


def _down(dep: Deployment, *roles: str) -> list[str]:
    """Close the stubs of every process with one of `roles` (before any request reached them)."""
    names = [w.name for w in dep.plan.workers if set(roles) & set(w.roles)]
    assert names, roles
    for name in names:
        dep.fleet.stubs.pop(name).close()
    return names


@pytest.fixture(scope="module")
def pools_down():
    """synchrotron, typing and media workers down; the event_creator dies mid-request; client_reader up."""
    with ExitStack() as stack:
        dep = Deployment("pools-down", {"SYNAPSE_WORKER_TYPES": DOWN})
        stack.callback(dep.close)
        _down(dep, "synchrotron", "typing", "media_repository", "event_creator")
        (creator,) = [w for w in dep.plan.workers if "event_creator" in w.roles]
        stack.callback(DyingUpstream(creator.listener("public").address).close)
        yield dep


def _unavailable(dep: Deployment, method: str, path: str, content: bytes | None = None) -> None:
    before = len(dep.fleet.hits)
    started = time.monotonic()
    resp = dep.send(method, path, content=content)
    elapsed = time.monotonic() - started
    assert resp.status_code == 503, f"{method} {path}: {resp.status_code}\n{dep.nginx.log()[-2000:]}"
    assert resp.headers.get("Retry-After") == "5", resp.headers
    assert elapsed < 2, f"{method} {path}: 503 only after {elapsed:.1f}s"
    if method != "HEAD":
        assert resp.json()["errcode"] == "M_UNKNOWN"
    assert dep.fleet.hits[before:] == [], "no process may get it (main cannot serve it)"


def test_sync_goes_to_main_while_the_synchrotron_pool_is_down(pools_down):
    dep = pools_down
    token = access_token("alice")
    for path in (
        "/_matrix/client/v3/sync?since=s72594_4483_1934&timeout=0",
        "/_matrix/client/r0/initialSync",
        f"/_matrix/client/v3/rooms/{ROOM}/initialSync",
    ):
        resp = dep.send("GET", path, headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 200, f"{path}: {resp.status_code}\n{dep.nginx.log()[-2000:]}"
        body = resp.json()
        assert body["process"] == "main", path
        assert body["raw_path"] == path, "main must get the request exactly as the client sent it"
        assert body["x_forwarded_for"] == "127.0.0.1" and body["x_forwarded_proto"] == "http"
    # A POST nothing has seen yet (the pool refused the connection) goes to main too, with its body (also one
    # too large for nginx's memory buffer, kept in a temp file).
    for size in (2, 300_000):
        body = dep.answer("POST", "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync", content=b"x" * size)
        assert (body["process"], body["body_length"]) == ("main", size)


def test_typing_fails_fast_with_retry_after_while_the_typing_writer_is_down(pools_down):
    _unavailable(pools_down, "PUT", f"/_matrix/client/v3/rooms/{ROOM}/typing/%40alice%3Aexample.test")


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/_matrix/client/v1/media/download/example.test/abcdef"),
        ("GET", "/_matrix/media/v3/thumbnail/example.test/abcdef?width=32&height=32"),
        ("HEAD", "/_matrix/client/v1/media/download/example.test/abcdef"),
        ("POST", "/_matrix/media/v3/upload"),
    ],
)
def test_media_fails_fast_with_retry_after_while_the_media_worker_is_down(pools_down, method, path):
    """main has enable_media_repo off when a media worker exists: it cannot stand in."""
    _unavailable(pools_down, method, path)


def test_a_worker_dying_mid_request(pools_down):
    """Idempotent requests go to main; a POST the worker may have acted on is not sent again (502)."""
    dep = pools_down
    body = dep.answer("GET", "/_matrix/client/v3/profile/%40alice%3Aexample.test")
    assert body["process"] == "main"
    before = len(dep.fleet.hits)
    resp = dep.send("POST", "/_matrix/client/v3/createRoom")
    assert resp.status_code == 502
    assert dep.fleet.hits[before:] == [], "a POST that reached a worker must not reach main too"


def test_other_pools_are_not_affected(pools_down):
    dep = pools_down
    body = dep.answer("GET", "/_matrix/client/v3/capabilities")
    assert body["process"].startswith("client_reader")


def test_unbuffered_request_bodies_are_not_resent():
    """NGINX_PROXY_REQUEST_BUFFERING=off: nginx keeps no copy of a body for main: 503 at once, not a hang."""
    dep = Deployment("unbuffered", {"SYNAPSE_WORKER_TYPES": "synchrotron", "NGINX_PROXY_REQUEST_BUFFERING": "off"})
    try:
        _down(dep, "synchrotron")
        assert dep.answer("GET", "/_matrix/client/v3/sync")["process"] == "main"
        assert (
            dep.answer("POST", "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync", content=b"")["process"]
            == "main"
        )
        for size in (2, 300_000):
            _unavailable(
                dep, "POST", "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync", content=b"x" * size
            )
    finally:
        dep.close()


@pytest.fixture
def one_synchrotron_down():
    dep = Deployment("one-down", {"SYNAPSE_WORKER_TYPES": "synchrotron:2"})
    try:
        dep.fleet.stubs.pop("synchrotron2").close()
        yield dep
    finally:
        dep.close()


def test_sync_keeps_working_with_one_of_two_synchrotrons_down(one_synchrotron_down):
    dep = one_synchrotron_down
    for i in range(30):
        token = access_token(f"user{i}")
        started = time.monotonic()
        resp = dep.send("GET", "/_matrix/client/v3/sync", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 200, f"user{i}: {resp.status_code}"
        assert resp.json()["process"] == "synchrotron1", f"user{i}"
        assert time.monotonic() - started < 2


# ------------------------------------------------------------------------------------------------------
# 2. A SIGKILLed nginx master
# ------------------------------------------------------------------------------------------------------


def _kill_group(pgid: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_nginx(pgid: int) -> None:
    """The nginx processes of a group supervisord started (its pid may be reaped and reused: check the name)."""
    for pid in process_group(pgid):
        with suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "nginx":
                os.kill(pid, signal.SIGKILL)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Generated:
    """A generated deployment with stub upstreams, nginx not started: the tests start it their way."""

    def __init__(self, workers: str) -> None:
        self._stack = ExitStack()
        try:
            self.root = Path(tempfile.mkdtemp(prefix="sw-", dir="/tmp"))
            self._stack.callback(shutil.rmtree, self.root, ignore_errors=True)
            os.chmod(self.root, 0o755)
            self.env = make_env(self.root, {"SYNAPSE_WORKER_TYPES": workers})
            assert cli.main(["generate"], env=self.env) == 0
            self.plan = load_plan(self.env)
            self.fleet = self._stack.enter_context(stubs_for_plan(self.plan))
            self.conf = self.plan.layout.nginx_conf
            self.pid_file = f"{self.plan.layout.nginx_dir}/nginx.pid"
            self.public = f"127.0.0.1:{self.plan.public.port}"
            self.url = f"http://{self.public}/_matrix/client/versions"
            self.groups: list[int] = []  # process groups of what we spawned: killed at the end, whatever happened
            self.spawned: list[subprocess.Popen[bytes]] = []  # reaped only after that, so no pid is reused
            self.nginx_groups: list[int] = []  # groups of nginx masters supervisord started
            self._stack.callback(self._kill_groups)
        except BaseException:
            self._stack.close()
            raise

    def _kill_groups(self) -> None:
        for pgid in self.nginx_groups:
            _kill_nginx(pgid)
        for pgid in self.groups:
            _kill_group(pgid)
        for proc in self.spawned:
            proc.wait(10)

    def spawn(self, command: tuple[str, ...], log: str) -> subprocess.Popen[bytes]:
        """Like supervisord: a foreground process in its own process group."""
        with open(self.root / log, "ab") as out:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, process_group=0)
        self.groups.append(proc.pid)
        self.spawned.append(proc)
        return proc

    def nginx_command(self) -> tuple[str, ...]:
        return (NGINX, "-c", self.conf, "-g", "daemon off;")

    def serves(self) -> bool:
        try:
            return httpx.get(self.url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self, name: str) -> str:
        path = self.root / name
        return path.read_text(errors="replace") if path.exists() else ""

    def killed_master(self) -> tuple[int, list[int]]:
        """Start nginx in the foreground, SIGKILL its master: (old master pid, its workers still alive)."""
        master = self.spawn(self.nginx_command(), "nginx-old.log")
        _wait(self.serves, 10, f"nginx to serve\n{self.log('nginx-old.log')}")
        workers = [pid for pid in process_group(master.pid) if pid != master.pid]
        assert workers
        master.kill()
        master.wait(5)
        assert Path(self.pid_file).read_text().strip() == str(master.pid), "nginx leaves its pid file when killed"
        return master.pid, workers

    def close(self) -> None:
        self._stack.close()


@pytest.fixture
def generated():
    gen = Generated("synchrotron")
    try:
        yield gen
    finally:
        gen.close()


def test_a_killed_master_leaves_workers_that_block_a_plain_restart(generated):
    """The fault itself (what the start step is for): the orphaned workers keep the port."""
    old, workers = generated.killed_master()
    assert all(_alive(pid) for pid in workers)
    assert generated.serves(), "the orphaned workers still answer on the public port"
    plain = generated.spawn(generated.nginx_command(), "nginx-plain.log")
    assert plain.wait(20) != 0
    assert "Address already in use" in generated.log("nginx-plain.log")


def test_the_start_step_clears_a_killed_master_and_serves(generated):
    old, workers = generated.killed_master()
    new = generated.spawn((*START_STEP, *generated.nginx_command()), "nginx-new.log")
    _wait(lambda: not any(_alive(pid) for pid in workers), 10, "the old workers to be killed")
    _wait(
        lambda: bool(process_group(new.pid)) and new.pid != old and generated.serves(),
        10,
        f"the new nginx to serve\n{generated.log('nginx-new.log')}",
    )
    assert new.poll() is None
    title = Path(f"/proc/{new.pid}/cmdline").read_bytes()
    assert title.startswith(b"nginx: master process"), "the start step execs nginx in its own place"
    assert httpx.get(generated.url, timeout=2).json()["process"] == "main"
    assert Path(generated.pid_file).read_text().strip() == str(new.pid)
    assert f"master pid {old}" in generated.log("nginx-new.log")


def test_the_start_step_kills_nothing_that_is_not_our_nginx(generated):
    """A stale pid file naming another process group: that group is left alone, nginx starts as usual."""
    other = generated.spawn(("sleep", "60"), "sleep.log")
    Path(generated.pid_file).write_text(f"{other.pid}\n")
    new = generated.spawn((*START_STEP, *generated.nginx_command()), "nginx-new.log")
    _wait(generated.serves, 10, f"nginx to serve\n{generated.log('nginx-new.log')}")
    assert other.poll() is None and _alive(other.pid)
    assert "killed" not in generated.log("nginx-new.log")
    new.send_signal(signal.SIGQUIT)
    assert new.wait(10) == 0


def test_supervised_nginx_comes_back_after_its_master_is_killed(generated):
    """The real thing: supervisord restarts nginx (the program row's command) and it binds again."""
    plan = generated.plan
    binaries = {"nginx": NGINX, "setpriv": "/usr/bin/setpriv", "redis-server": "/usr/bin/redis-server"}
    (nginx,) = [p for p in programs(plan, as_root=False, binaries=binaries) if p.name == "nginx"]
    os.makedirs(plan.layout.state_dir, exist_ok=True)
    ((conf_path, text),) = render_supervisor(plan.layout, [nginx], as_root=os.geteuid() == 0).items()
    Path(conf_path).parent.mkdir(parents=True, exist_ok=True)
    Path(conf_path).write_text(text)
    supervisord = generated.spawn(
        (sys.executable, "-m", "supervisor.supervisord", "-n", "-c", conf_path), "supervisord.out"
    )

    from supervisor.xmlrpc import SupervisorTransport

    def rpc():
        transport = SupervisorTransport(None, None, serverurl=f"unix://{plan.layout.supervisor_socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def info() -> dict:
        return rpc().getProcessInfo(f"{GROUP_NAME}:nginx")

    def up() -> bool:
        try:
            return rpc().getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Fault):
            return False

    try:
        _wait(up, 15, "supervisord")
        rpc().startProcess(f"{GROUP_NAME}:nginx", True)
        _wait(generated.serves, 10, "nginx under supervisord")
        first = info()["pid"]
        generated.nginx_groups.append(first)
        workers = [pid for pid in process_group(first) if pid != first]
        assert workers
        os.kill(first, signal.SIGKILL)

        def back() -> bool:
            state = info()
            if state["statename"] == "FATAL":
                output = rpc().readProcessStdoutLog(f"{GROUP_NAME}:nginx", -4000, 0)
                raise AssertionError(f"supervisord gave up on nginx (FATAL):\n{output}")
            return state["statename"] == "RUNNING" and state["pid"] not in (0, first) and generated.serves()

        _wait(back, 20, "supervisord to restart nginx")
        generated.nginx_groups.append(info()["pid"])
        assert not any(_alive(pid) for pid in workers)
        rpc().stopProcess(f"{GROUP_NAME}:nginx", True)
    finally:
        supervisord.terminate()
        supervisord.wait(15)


# ------------------------------------------------------------------------------------------------------
# 3. NGINX_WORKER_PROCESSES=auto under a CPU quota
# ------------------------------------------------------------------------------------------------------


def _quota_cgroup(name: str, cpus: float) -> Path | None:
    """A new cgroup limited to `cpus` CPUs of time (v2 cpu.max, else v1 cpu.cfs_quota_us); None if neither
    can be made here."""
    v2 = Path("/sys/fs/cgroup")
    if "cpu" in (v2 / "cgroup.subtree_control").read_text().split() if (v2 / "cgroup.subtree_control").exists() else []:
        folder = v2 / name
        folder.mkdir()
        (folder / "cpu.max").write_text(f"{int(cpus * 100000)} 100000\n")
        return folder
    for v1 in (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct")):
        if (v1 / "cpu.cfs_quota_us").exists():
            folder = v1 / name
            try:
                folder.mkdir()
            except OSError:
                return None
            (folder / "cpu.cfs_period_us").write_text("100000\n")
            (folder / "cpu.cfs_quota_us").write_text(f"{int(cpus * 100000)}\n")
            return folder
    return None


def _nginx_workers(master: int) -> list[int]:
    found = []
    for pid in process_group(master):
        with suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"nginx: worker process"):
                found.append(pid)
    return found


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to tell a quota of 1 from the count")
def test_auto_worker_processes_honour_the_cgroup_cpu_quota(generated):
    """nginx's own `auto` counts online CPUs; under a 1-CPU quota (docker --cpus=1) we start one worker."""
    assert "worker_processes" not in "".join(
        line for line in Path(generated.conf).read_text().splitlines() if not line.startswith("#")
    ), "with NGINX_WORKER_PROCESSES=auto (the default) the count is left to the start step"
    folder = _quota_cgroup(f"sw-test-{os.getpid()}", 1.0)
    if folder is None:
        pytest.skip("no writable cgroup cpu controller here")
    enter = ("sh", "-c", f'echo $$ > {folder}/cgroup.procs && exec "$@"', "sh")
    try:
        limited = generated.spawn((*enter, *START_STEP, *generated.nginx_command()), "nginx-limited.log")
        _wait(generated.serves, 10, f"nginx to serve\n{generated.log('nginx-limited.log')}")
        _wait(lambda: len(_nginx_workers(limited.pid)) >= 1, 10, "nginx workers")
        time.sleep(0.5)  # all workers are forked at once; give a wrong count the time to show
        assert len(_nginx_workers(limited.pid)) == 1
        assert "worker_processes auto: 1" in generated.log("nginx-limited.log")
        limited.send_signal(signal.SIGQUIT)
        assert limited.wait(10) == 0
        # Outside the quota: one per CPU we may run on (this machine's affinity mask).
        free = generated.spawn((*START_STEP, *generated.nginx_command()), "nginx-free.log")
        _wait(
            lambda: len(_nginx_workers(free.pid)) == len(os.sched_getaffinity(0)),
            10,
            f"{len(os.sched_getaffinity(0))} workers\n{generated.log('nginx-free.log')}",
        )
        free.send_signal(signal.SIGQUIT)
        assert free.wait(10) == 0
    finally:
        generated.close()
        _wait(lambda: not (folder / "cgroup.procs").read_text().strip(), 10, "the cgroup to empty")
        folder.rmdir()
