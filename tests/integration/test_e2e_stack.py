"""End to end: `synapse-workers run` starts a whole stack; a real Matrix client drives it on the public port.

Three topologies, each started once per class (class scope, so one stack runs at a time on a small
machine): a monolith on the embedded PostgreSQL (then restarted with a synchrotron on the same data),
a small worker set on the embedded PostgreSQL (worker crash and hang), and the Complement default
worker set on an external PostgreSQL the test starts itself (events written by the event persisters).
Every class ends by stopping its stack with SIGTERM and proving nothing it started is still running.
Every stack-starting test runs once per launch mode (`fork`, `process`; SW_LAUNCH_MODES picks).
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg2
import pytest
from nio import RoomMessagesResponse, RoomMessageText

from tests.support.matrix import check_still_works, login, register, registration_secret, scenario
from tests.support.pgcluster import PgCluster
from tests.support.stack import LAUNCH_MODES, SW, Stack, make_root, stack_env, wait_for

pytestmark = pytest.mark.integration

SMALL_SET = (
    "synchrotron, event_persister, stream_writers=typing+to_device+receipts+account_data+presence, media_repository"
)
COMPLEMENT_SET = (
    "event_persister:2, background_worker, event_creator, user_dir, media_repository, federation_inbound, "
    "federation_reader, federation_sender, synchrotron, client_reader, appservice, pusher, device_lists:2, "
    "stream_writers=account_data+presence+receipts+to_device+typing"
)
START_TIMEOUT = 300
TIMINGS: dict[str, dict[str, float]] = {}


@dataclass
class Deployment:
    """One topology: its temp root, the current stack, and what earlier tests left for later ones."""

    name: str
    root: Path
    env: dict[str, str]
    stacks: list[Stack] = field(default_factory=list)  # every stack started here (all are torn down)
    room_id: str | None = None

    @property
    def stack(self) -> Stack:
        return self.stacks[-1]

    @property
    def data_dir(self) -> str:
        return self.env["SYNAPSE_DATA_DIR"]

    def start(self, env: dict[str, str] | None = None) -> Stack:
        if env is not None:
            self.env = env
        self.stacks.append(Stack(self.env))
        return self.stack.start(START_TIMEOUT)

    def time(self, key: str, seconds: float) -> None:
        TIMINGS.setdefault(self.name, {})[key] = round(seconds, 1)


def _teardown(deployment: Deployment) -> None:
    for stack in deployment.stacks:
        stack.close()


def _deploy(name: str, worker_types: str, mode: str, **extra: str):
    root = make_root(f"sw-e2e-{name}-")
    env = stack_env(root, worker_types, SYNAPSE_LAUNCH_MODE=mode, **extra)
    deployment = Deployment(f"{name} ({mode})", root, env)
    try:
        deployment.time("ready", deployment.start().ready_after or 0)
        yield deployment
    finally:
        try:
            _teardown(deployment)
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def timing_report(request):
    """Prints ready/scenario/stop times per topology at the end (and writes them to $SW_E2E_TIMINGS)."""
    yield
    if os.environ.get("SW_E2E_TIMINGS"):
        Path(os.environ["SW_E2E_TIMINGS"]).write_text(json.dumps(TIMINGS, indent=2))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter and capture and TIMINGS:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            for name, values in TIMINGS.items():
                shown = (f"{k} {v}s" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
                reporter.write_line(f"e2e timings {name}: " + ", ".join(shown))


# ---- shared checks ----------------------------------------------------------------------------------------

def run_scenario(deployment: Deployment) -> None:
    started = time.monotonic()
    result = asyncio.run(scenario(deployment.stack.base_url, deployment.data_dir))
    deployment.time("scenario", time.monotonic() - started)
    deployment.room_id = result.room_id
    TIMINGS[f"{deployment.name} scenario steps"] = result.timings
    if result.user_directory_reindex:
        TIMINGS[deployment.name]["user_directory_reindex"] = result.user_directory_reindex


def health(stack: Stack):
    return stack.cli("health", timeout=60)


def from_another_shell(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    """`synapse-workers ARGS` as an admin types it in a second shell: only the runtime dir is known."""
    env = {"PATH": os.environ["PATH"], "SYNAPSE_RUNTIME_DIR": stack.env["SYNAPSE_RUNTIME_DIR"]}
    return subprocess.run([SW, *args], env=env, capture_output=True, text=True, timeout=60)


def status_rows(stack: Stack) -> dict[str, dict]:
    result = from_another_shell(stack, "status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def assert_stops_cleanly(deployment: Deployment, key: str = "stop") -> None:
    stack = deployment.stack
    code, took = stack.stop(timeout=30)
    deployment.time(key, took)
    assert code == 0, f"exit code {code} after SIGTERM:\n{stack.tail()}"
    assert took < 30
    left = {pid: _cmdline(pid) for pid in stack.leftovers()}
    assert not left, f"still running after a clean stop: {left}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def expected_processes(stack: Stack) -> set[str]:
    """main and every worker, as `plan --json` lists them."""
    plan = stack.cli("plan", "--json")
    assert plan.returncode == 0, plan.stderr
    doc = json.loads(plan.stdout)
    return {doc["main"]["name"], *(worker["name"] for worker in doc["workers"])}


# ---- monolith, embedded PostgreSQL; restart with a synchrotron -------------------------------------------

@pytest.fixture(scope="class", params=LAUNCH_MODES)
def monolith(request):
    # glibc's malloc here (SYNAPSE_MALLOC=system); the other deployments use the default (auto).
    yield from _deploy("monolith", "", request.param, SYNAPSE_MALLOC="system")


def mapped_allocators(pid: int) -> set[str]:
    """jemalloc if the process has libjemalloc mapped (preloaded), else glibc."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {"jemalloc" if "libjemalloc.so" in maps else "glibc"}


class TestMonolith:
    def test_scenario(self, monolith: Deployment):
        assert set(monolith.stack.processes()) == {"main"}
        run_scenario(monolith)

    def test_system_malloc_preloads_nothing(self, monolith: Deployment):
        for name, pid in monolith.stack.processes().items():
            assert mapped_allocators(pid) == {"glibc"}, name

    def test_sigterm_stops_everything(self, monolith: Deployment):
        assert_stops_cleanly(monolith)

    def test_restart_with_a_synchrotron_keeps_the_data(self, monolith: Deployment):
        assert monolith.room_id, "the scenario did not run"
        env = {**monolith.env, "SYNAPSE_WORKER_TYPES": "synchrotron"}
        stack = monolith.start(env)
        monolith.time("ready_with_synchrotron", stack.ready_after or 0)
        assert set(stack.processes()) == {"main", "synchrotron1"}

        routes = stack.cli("routes", "GET", "/_matrix/client/v3/sync")
        assert routes.returncode == 0, routes.stderr
        assert "synchrotron1" in routes.stdout, routes.stdout

        sync_log = Path(env["SYNAPSE_RUNTIME_DIR"], "state", "synchrotron1.log")
        before = sync_log.read_text(errors="replace").count("/_matrix/client/v3/sync")
        asyncio.run(check_still_works(stack.base_url, monolith.room_id, label="restarted"))
        asyncio.run(_history_survived(stack.base_url, monolith.room_id))
        after = sync_log.read_text(errors="replace").count("/_matrix/client/v3/sync")
        assert after > before, f"synchrotron1 logged no /sync request ({sync_log})"

        assert_stops_cleanly(monolith, "stop_with_synchrotron")


async def _history_survived(base_url: str, room_id: str) -> None:
    alice = await login(base_url, "alice", device_name="alice-history")
    try:
        response = await alice.room_messages(room_id, start="", limit=100)
        assert isinstance(response, RoomMessagesResponse), response
        bodies = {e.body.split(" ")[1] for e in response.chunk
                  if isinstance(e, RoomMessageText) and e.body.startswith("message ")}
        assert bodies == {str(i) for i in range(10)}, bodies
    finally:
        await alice.close()


_REACTOR_LINE = re.compile(r"^(\S+)\s*\|.*Twisted reactor(?: behind the proxy)?: (\w+)")


def reactors(stack: Stack) -> dict[str, set[str]]:
    """Which reactor each Synapse process reported: Synapse logs `Twisted reactor: <class>` at start; in fork mode
    that class is Synapse's ProxiedReactor and the child names the one behind it."""
    found: dict[str, set[str]] = {}
    for line in stack.log_path.read_text(errors="replace").splitlines():
        match = _REACTOR_LINE.match(line)
        if match and match[2] != "ProxiedReactor":
            found.setdefault(match[1], set()).add(match[2])
    return found


@pytest.fixture(scope="class", params=LAUNCH_MODES)
def on_asyncio(request):
    # "yes": our boolean spelling; Synapse's strtobool is given "1" (it rejects an empty value, for one)
    yield from _deploy("asyncio", "synchrotron, event_persister", request.param, SYNAPSE_ASYNC_IO_REACTOR="yes")


class TestAsyncioReactor:
    def test_every_process_runs_the_asyncio_reactor(self, on_asyncio: Deployment):
        names = set(on_asyncio.stack.processes())
        assert names == {"main", "synchrotron1", "event_persister1"}
        assert reactors(on_asyncio.stack) == {name: {"AsyncioSelectorReactor"} for name in names}

    def test_scenario(self, on_asyncio: Deployment):
        run_scenario(on_asyncio)

    def test_sigterm_stops_everything(self, on_asyncio: Deployment):
        assert_stops_cleanly(on_asyncio)


# ---- small worker set, embedded PostgreSQL: crash and hang of a worker ------------------------------------

@pytest.fixture(scope="class", params=LAUNCH_MODES)
def small(request):
    yield from _deploy("small", SMALL_SET, request.param)


class TestSmallWorkerSet:
    def test_scenario(self, small: Deployment):
        assert set(small.stack.processes()) == expected_processes(small.stack)
        run_scenario(small)

    def test_synapse_processes_allocator(self, small: Deployment):
        """SYNAPSE_MALLOC=auto (the default): in fork mode every Synapse process has libjemalloc mapped, the tuning
        in its environment (inherited from the zygote); separate processes keep glibc's malloc."""
        forked = small.env["SYNAPSE_LAUNCH_MODE"] == "fork"
        for name, pid in small.stack.processes().items():
            assert mapped_allocators(pid) == {"jemalloc" if forked else "glibc"}, name
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert (b"MALLOC_CONF=narenas:1,tcache:false" in environ) == forked, name

    def test_synapse_processes_run_twisteds_epoll_reactor(self, small: Deployment):
        """Without SYNAPSE_ASYNC_IO_REACTOR every process runs Twisted's default (epoll) reactor."""
        assert reactors(small.stack) == {name: {"EPollReactor"} for name in small.stack.processes()}

    def test_synapse_runs_as_uid_gid_and_owns_the_data_dir(self, small: Deployment):
        """Started as root: Synapse drops to UID:GID (991 by default), PostgreSQL to `postgres`."""
        assert os.geteuid() == 0, "the e2e tests run as root, like the container entrypoint"
        for name, pid in small.stack.processes().items():
            status = Path(f"/proc/{pid}/status").read_text()
            uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
            gids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Gid:"))
            assert set(uids) == {"991"} and set(gids) == {"991"}, (name, uids, gids)
        data = Path(small.data_dir)
        assert (data.stat().st_uid, data.stat().st_gid) == (991, 991)
        assert (data / "postgres").stat().st_uid == pwd.getpwnam("postgres").pw_uid

    def test_status_and_health_need_only_the_runtime_dir(self, small: Deployment):
        stack = small.stack
        rows = status_rows(stack)
        # Every Synapse process with the PID /proc shows for it, plus the services the stack runs.
        synapse = stack.processes()
        assert set(rows) == set(synapse) | {"postgres", "redis", "nginx"}, rows
        for name, pid in synapse.items():
            # supervisord says STARTING for its first startsecs (5 s) even when the process already serves.
            assert rows[name]["pid"] == pid and rows[name]["state"] in ("STARTING", "RUNNING"), rows[name]
        for row in rows.values():
            assert row["uptime_s"] > 0 and row["restarts"] == 0, row
            assert Path(f"/proc/{row['pid']}").exists(), row
        text = from_another_shell(stack, "status")
        assert text.returncode == 0 and "running (launcher pid" in text.stdout, text.stdout
        result = from_another_shell(stack, "health")
        assert result.returncode == 0, result.stdout + result.stderr
        assert {line.split(":")[0] for line in result.stdout.splitlines()} == set(synapse) | {"nginx"}

    def test_synapse_records_the_real_client_address_not_a_forged_one(self, small: Deployment):
        """A client's own X-Forwarded-For must not become the address Synapse records (and rate-limits by)."""
        stack = small.stack
        admin = register(stack.base_url, registration_secret(small.data_dir), "ipcheck", admin=True)
        headers = {"Authorization": f"Bearer {admin['access_token']}", "X-Forwarded-For": "6.6.6.6",
                   "X-Forwarded-Proto": "https"}
        assert httpx.get(f"{stack.base_url}/_matrix/client/v3/account/whoami", headers=headers,
                         timeout=10).status_code == 200

        def recorded() -> set[str]:
            whois = httpx.get(f"{stack.base_url}/_synapse/admin/v1/whois/{admin['user_id']}", timeout=10,
                              headers={"Authorization": f"Bearer {admin['access_token']}"}).json()
            return {c["ip"] for d in whois["devices"].values() for s in d["sessions"] for c in s["connections"]}

        # Synapse writes client IPs in batches (every few seconds).
        assert wait_for(lambda: bool(recorded()), 30, interval=1)
        assert recorded() == {"127.0.0.1"}, recorded()

    def test_supervisor_is_root_only_and_quiet(self, small: Deployment):
        stack = small.stack
        state = Path(stack.env["SYNAPSE_RUNTIME_DIR"], "state")
        sock = state / "supervisor.sock"
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert (sock.stat().st_uid, stat.S_IMODE(sock.stat().st_mode)) == (0, 0o700)
        assert stat.S_IMODE(state.stat().st_mode) == 0o700 and state.stat().st_uid == 0
        # supervisord's own lines (CRIT/INFO/WARN with its timestamp format) stay in its log file.
        output = stack.log_path.read_text(errors="replace")
        assert not re.search(r"^\S+ \S+ (CRIT|INFO|WARN|ERRO) ", output, re.M), output[:3000]
        assert "CRIT" not in output

    def test_killed_worker_comes_back(self, small: Deployment):
        stack = small.stack
        old = stack.processes()["synchrotron1"]
        back = "synchrotron1 is back and healthy"
        backs_before = stack.log_path.read_text(errors="replace").count(back)
        killed = time.monotonic()
        os.kill(old, signal.SIGKILL)
        assert wait_for(lambda: stack.processes().get("synchrotron1") not in (None, old), 30), \
            f"synchrotron1 was not restarted:\n{stack.tail()}"
        assert wait_for(lambda: health(stack).returncode == 0, 60, interval=1), \
            f"not healthy again after 60s:\n{health(stack).stdout}\n{stack.tail()}"
        small.time("worker_recovery", time.monotonic() - killed)
        # The launcher noticed the crash and reported the recovery.
        assert wait_for(lambda: stack.log_path.read_text(errors="replace").count(back) > backs_before, 10), \
            stack.tail()
        asyncio.run(check_still_works(stack.base_url, small.room_id, label="after-kill"))

    def test_forked_processes_come_from_one_parent_that_takes_them_along(self, small: Deployment):
        """Fork mode: every Synapse process is a child of the zygote; SIGKILL it and none is left holding a
        port: supervisord starts it again, the launcher forks them all again and the stack serves."""
        if small.env["SYNAPSE_LAUNCH_MODE"] != "fork":
            pytest.skip("fork mode only")
        stack = small.stack
        zygote = stack.zygote()
        assert zygote, stack.tail()
        old = stack.processes()
        for name, pid in old.items():
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert ppid == zygote, (name, pid, ppid)
        os.kill(zygote, signal.SIGKILL)
        assert wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in old.values()), 10), \
            f"children outlived their parent:\n{stack.tail()}"
        assert wait_for(lambda: health(stack).returncode == 0
                        and set(stack.processes()) == set(old)
                        and not set(stack.processes().values()) & set(old.values()), 120, interval=1), \
            f"{health(stack).stdout}\n{stack.tail()}"
        assert stack.zygote() not in (None, zygote)
        asyncio.run(check_still_works(stack.base_url, small.room_id, label="after-zygote-kill"))

    def test_health_names_a_hung_worker(self, small: Deployment):
        stack = small.stack
        assert health(stack).returncode == 0
        pid = stack.processes()["media_repository1"]
        os.kill(pid, signal.SIGSTOP)
        try:
            result = health(stack)
            assert result.returncode == 1, result.stdout
            failing = [line for line in result.stdout.splitlines() if "FAILED" in line]
            assert any(line.startswith("media_repository1: FAILED") for line in failing), result.stdout
            assert not any(line.startswith(("main:", "synchrotron1:", "event_persister1:")) for line in failing), \
                result.stdout
            # The same verdict on the public port, once nginx's copy (at most a second old; the previous one is
            # served while a refresh waits out a check's 3 s timeout) has it.
            assert wait_for(lambda: httpx.get(f"{stack.base_url}/health", timeout=30).status_code == 503, 8, 0.2)
            public = httpx.get(f"{stack.base_url}/health", timeout=30)
            assert public.status_code == 503 and "media_repository1" in public.json()["unhealthy"], public.text
        finally:
            os.kill(pid, signal.SIGCONT)
        assert wait_for(lambda: health(stack).returncode == 0, 30, interval=1), health(stack).stdout

    def test_crash_loop_is_stopped_and_reported(self, small: Deployment):
        """A worker that keeps dying is stopped and named, not restarted forever; the rest keeps serving."""
        stack = small.stack
        for kill in range(5):  # CRASH_LIMIT in run/supervise.py
            # Let each restart outlive supervisor's startsecs (5 s): a death before that is a failed start,
            # which supervisor handles with its own backoff and FATAL (reported as "cannot stay up").
            time.sleep(6)
            old = stack.processes()["media_repository1"]
            os.kill(old, signal.SIGKILL)
            if kill < 4:  # B023: wait_for calls the closure within this iteration only
                assert wait_for(lambda: stack.processes().get("media_repository1") not in (None, old),  # noqa: B023
                                30), stack.tail()
        assert wait_for(lambda: "media_repository1 crashed 5 times" in stack.log_path.read_text(errors="replace"),
                        15), stack.tail()
        assert wait_for(lambda: "media_repository1" not in stack.processes(), 30), stack.tail()
        # `status` follows within the launcher's next look at supervisord (once a second).
        assert wait_for(lambda: status_rows(stack)["media_repository1"]["state"] == "STOPPED", 10), \
            status_rows(stack)
        row = status_rows(stack)["media_repository1"]
        assert row["pid"] == 0 and row["restarts"] >= 4 and row["last_error"], row
        result = health(stack)
        assert result.returncode == 1 and "media_repository1: FAILED" in result.stdout, result.stdout
        assert "main: OK" in result.stdout, result.stdout
        assert httpx.get(f"{stack.base_url}/_matrix/client/versions", timeout=10).status_code == 200

    def test_sigterm_stops_everything(self, small: Deployment):
        assert_stops_cleanly(small)


# ---- the Complement worker set on an external PostgreSQL ---------------------------------------------------

@pytest.fixture(scope="class", params=LAUNCH_MODES)
def external_pg(request):
    """A fresh external database per launch mode (the mode rides along: `complement` reads it)."""
    with PgCluster() as pg:
        pg.launch_mode = request.param
        yield pg


@pytest.fixture(scope="class")
def complement(external_pg: PgCluster):
    yield from _deploy("complement", COMPLEMENT_SET, external_pg.launch_mode, **external_pg.env(), **CHILD_SECRETS,
                       SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK="1")


# Secrets given in the environment: they must reach only the 0600 files, never a child's environment.
CHILD_SECRETS = {
    "SYNAPSE_MACAROON_SECRET_KEY": "macaroon-e2e-SECRET-1",
    "SYNAPSE_FORM_SECRET": "form-e2e-SECRET-2",
    "SYNAPSE_TURN_SECRET": "turn-e2e-SECRET-3",
}


class TestComplementSetExternalPostgres:
    def test_scenario(self, complement: Deployment):
        running = set(complement.stack.processes())
        assert running == expected_processes(complement.stack)
        assert len(running) == 17
        run_scenario(complement)

    def test_events_written_by_event_persisters(self, complement: Deployment, external_pg: PgCluster):
        assert complement.room_id, "the scenario did not run"
        with psycopg2.connect(**external_pg.dsn()) as conn, conn.cursor() as cur:
            cur.execute("SELECT instance_name, count(*) FROM events WHERE room_id = %s GROUP BY instance_name",
                        (complement.room_id,))
            writers = dict(cur.fetchall())
        conn.close()
        assert writers, "no events for the room"
        assert set(writers) <= {"event_persister1", "event_persister2"}, writers
        assert sum(writers.values()) >= 15  # create, members, power levels, ..., 10 messages

    def test_no_secret_in_any_child_environment(self, complement: Deployment, external_pg: PgCluster):
        stack = complement.stack
        secrets = [*CHILD_SECRETS.values(), external_pg.env()["POSTGRES_PASSWORD"]]
        children = [pid for pid in stack.leftovers() if pid != stack.proc.pid]  # the launcher was given them
        assert len(children) >= 20, children  # supervisord, its listener, 17 Synapse processes, nginx...
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue  # gone meanwhile
            names = {item.split(b"=", 1)[0].decode() for item in environ.split(b"\0") if item}
            assert not names & {"POSTGRES_PASSWORD", *CHILD_SECRETS}, (pid, _cmdline(pid), names)
            for secret in secrets:
                assert secret.encode() not in environ, (pid, _cmdline(pid))

    def test_logs_are_private_and_hold_no_access_token(self, complement: Deployment):
        logs = sorted(Path(complement.data_dir, "logs").glob("*.log"))
        names = {p.name for p in logs}
        assert {"nginx-access.log", "main.log", "synchrotron1.log"} <= names, names
        for path in logs:
            assert stat.S_IMODE(path.stat().st_mode) & 0o037 == 0, (path, oct(path.stat().st_mode))
        # The client sent its token as ?access_token= (matrix-nio does); no log keeps one.
        for path in [*logs, complement.stack.log_path]:
            text = path.read_text(errors="replace")
            leaked = re.findall(r"access_token=(?!<redacted>)[^&\s\"]+", text)
            assert not leaked, (path, leaked[:3])

    def test_sigterm_stops_everything(self, complement: Deployment, external_pg: PgCluster):
        assert_stops_cleanly(complement)
        assert external_pg.running()  # an external database is not ours to stop


# ---- stopping while still starting ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", LAUNCH_MODES)
def test_sigterm_during_start_up_is_a_clean_stop(mode: str):
    """A stop asked for mid-start (here: after PostgreSQL, before main is up) still exits 0, leaving nothing."""
    root = make_root("sw-e2e-early-")
    stack = Stack(stack_env(root, "synchrotron", SYNAPSE_LAUNCH_MODE=mode))
    try:
        stack.launch()
        assert wait_for(lambda: "postgres: postgres healthy" in stack.tail(200), 120), stack.tail()
        code, seconds = stack.stop()
        assert code == 0, stack.tail()
        assert seconds < 30
        assert wait_for(lambda: not stack.leftovers(), 10), stack.leftovers()
    finally:
        stack.kill()
        shutil.rmtree(root, ignore_errors=True)


# ---- unix sockets: only nginx and Synapse may connect ------------------------------------------------------

_CONNECT = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('connected')"


def _connect_as(user: str, group: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups", sys.executable,
                           "-c", _CONNECT, str(path)], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("mode", LAUNCH_MODES)
def test_unix_sockets_reach_only_nginx_and_synapse(mode: str):
    root = make_root("sw-e2e-unix-")
    env = stack_env(root, "synchrotron, event_persister", SYNAPSE_LAUNCH_MODE=mode, SYNAPSE_PUBLIC_UNIX_SOCKETS="1",
                    SYNAPSE_HTTP_REPLICATION_UNIX_SOCKETS="1", SYNAPSE_METRICS="1", SYNAPSE_METRICS_UNIX_SOCKETS="1")
    stack = Stack(env)
    try:
        stack.start(START_TIMEOUT)
        asyncio.run(scenario(stack.base_url, env["SYNAPSE_DATA_DIR"]))  # everything through nginx → sockets
        sockets = Path(env["SYNAPSE_RUNTIME_DIR"], "sockets")
        nogroup = grp.getgrnam("nogroup").gr_gid
        st = sockets.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (991, nogroup, 0o2750), oct(st.st_mode)
        public, metrics = sockets / "synchrotron1.public.sock", sockets / "main.metrics.sock"
        replication = sockets / "event_persister1.replication.sock"
        for path in (public, metrics):
            assert (stat.S_IMODE(path.stat().st_mode), path.stat().st_gid) == (0o660, nogroup), path
        assert (stat.S_IMODE(replication.stat().st_mode), replication.stat().st_uid) == (0o600, 991)
        # nginx's worker identity connects; any other local user cannot skip nginx.
        assert _connect_as("nobody", "nogroup", public).returncode == 0
        refused = _connect_as("4242", "4242", public)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
        assert _connect_as("nobody", "nogroup", replication).returncode != 0  # replication: Synapse's user only
        assert _connect_as("991", "991", replication).returncode == 0
        assert stack.stop()[0] == 0
    finally:
        stack.kill()
        shutil.rmtree(root, ignore_errors=True)


def test_unix_sockets_under_a_closed_directory_fail_clearly():
    """Before: the stack started and every proxied request failed with 502. Now: a message and exit 2."""
    root = make_root("sw-e2e-closed-")
    closed = root / "private"
    closed.mkdir(mode=0o700)
    env = stack_env(root, "synchrotron", SYNAPSE_PUBLIC_UNIX_SOCKETS="1",
                    SYNAPSE_RUNTIME_DIR=str(closed / "run"))
    try:
        result = subprocess.run([SW, "run"], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"is under '{closed}', which nginx's worker user (nobody) cannot enter" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)
