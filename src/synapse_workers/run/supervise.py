"""`synapse-workers run`: start the stack in stages under supervisord, watch it, stop it cleanly.

supervisord (PyPI `supervisor`) does the process work: spawning, capturing output, restarting with
backoff. We drive it through its XML-RPC API: start stage by stage with health gates (PostgreSQL →
Redis → main → workers → nginx), watch for crashes and crash loops, and stop in reverse order.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import xmlrpc.client
from collections import defaultdict, deque
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

from ..errors import UserError
from ..plan import Plan
from ..render.supervisor import GROUP_NAME, render_supervisor, supervisor_paths
from . import postgres
from .health import Aggregator, check
from .programs import STAGE_NAMES, Program, programs

STAGE_TIMEOUT = {"postgres": 60, "redis": 15, "main": 300, "workers": 180, "nginx": 30}  # first start migrates
CRASH_LIMIT, CRASH_WINDOW = 5, 600  # more restarts than this within the window: stop and report
GROUP = GROUP_NAME + ":"  # every program sits in one supervisor group (see render/supervisor.py)
DONE_STATES = {"STOPPED", "EXITED", "FATAL", "UNKNOWN"}


def log(message: str) -> None:
    print(f"{'synapse-workers':18}| {message}", flush=True)


def find_binaries(plan: Plan) -> dict[str, str]:
    wanted = {"nginx": ("nginx", "/usr/sbin/nginx", "nginx-light"), "setpriv": ("setpriv", "/usr/bin/setpriv", "util-linux")}
    if plan.redis and not plan.redis.external:
        wanted["redis-server"] = ("redis-server", "/usr/bin/redis-server", "redis-server")
    found = {}
    for key, (name, fallback, package) in wanted.items():
        path = shutil.which(name) or (fallback if os.path.exists(fallback) else None)
        if not path:
            raise UserError(f"`{name}` is not installed: it comes with the Debian package {package}.")
        found[key] = path
    if plan.postgres:
        found["postgres"] = f"{postgres.postgres_bin()}/postgres"
        found["pg_isready"] = f"{postgres.postgres_bin()}/pg_isready"
    return found


class Stack:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.as_root = os.geteuid() == 0
        self.binaries = find_binaries(plan)
        self.pg_owner = postgres.cluster_owner(self.as_root) if plan.postgres else None
        pg_user = (self.pg_owner.pw_name, self.pg_owner.pw_uid, self.pg_owner.pw_gid) if self.pg_owner else None
        self.programs = programs(plan, self.as_root, self.binaries, postgres_user=pg_user)
        self.by_name = {p.name: p for p in self.programs}
        self.paths = supervisor_paths(plan)
        self.supervisord: subprocess.Popen | None = None
        self.stop_requested = threading.Event()
        self.signals = 0
        self.exit_code = 0

    @property
    def rpc(self):
        """A fresh XML-RPC proxy per use: supervisor's transport is unusable after one failed request."""
        transport = SupervisorTransport(None, None, serverurl=f"unix://{self.paths['socket']}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    # ---- lifecycle ------------------------------------------------------------------------------------
    def run(self) -> int:
        self._prepare()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        aggregator = Aggregator(self.plan)
        aggregator.start()
        try:
            self._start_supervisord()
            if self._start_stages():
                self._announce()
                self._monitor()
        finally:
            self._stop_all()
            aggregator.stop()
        return self.exit_code

    def _on_signal(self, signum, frame) -> None:
        self.signals += 1
        if self.signals == 1:
            log(f"{signal.Signals(signum).name}: stopping (send it again to force)")
            self.stop_requested.set()
        else:
            log("second signal: killing everything now")
            self._force_kill()
            os._exit(1)

    def _prepare(self) -> None:
        s, uid, gid = self.plan.settings, self.plan.settings.uid, self.plan.settings.gid
        Path(self.paths["dir"]).mkdir(parents=True, exist_ok=True)
        os.chmod(self.paths["dir"], 0o700)
        redis_dir = Path(self.plan.files["runtime_dir"], "redis")
        redis_dir.mkdir(exist_ok=True)
        media = Path(s.data_dir)
        media.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            os.chown(redis_dir, uid, gid)
            _own_tree(media, uid, gid, skip={self.plan.postgres.data_dir} if self.plan.postgres else set())
            _check_readable(self.plan.homeserver.path, uid, gid)
        if self.plan.postgres:
            postgres.prepare_cluster(self.plan, self.as_root, self.binaries["setpriv"])
        Path(self.paths["conf"]).write_text(render_supervisor(self.plan, self.programs, self.as_root))

    def _start_supervisord(self) -> None:
        socket_path = self.paths["socket"]
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        self.supervisord = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", self.paths["conf"]],
            start_new_session=True,  # our signal handler decides; ^C must not hit every program at once
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if self.rpc.supervisor.getState()["statename"] == "RUNNING":
                    return
            except (OSError, xmlrpc.client.Fault):
                pass
            if self.supervisord.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"supervisord did not start (see {self.paths['dir']}/supervisord.log)")

    def _start_stages(self) -> bool:
        for stage, name in enumerate(STAGE_NAMES):
            members = [p for p in self.programs if p.stage == stage]
            if not members:
                continue
            started = time.monotonic()
            for program in members:
                self.rpc.supervisor.startProcess(GROUP + program.name, False)
            if not self._wait_healthy(members, STAGE_TIMEOUT[name]):
                if not self.stop_requested.is_set():  # asked to stop while starting: still a clean stop
                    self.exit_code = 1
                return False
            log(f"{name}: {', '.join(p.name for p in members)} healthy in {time.monotonic() - started:.1f}s")
            if name == "postgres":
                postgres.ensure_database(self.plan, self.pg_owner, self.as_root, self.binaries["setpriv"])
        return True

    def _wait_healthy(self, members: list[Program], timeout: float) -> bool:
        pending = {p.name: p for p in members}
        deadline = time.monotonic() + timeout
        while pending:
            if self.stop_requested.is_set():
                return False
            for name in list(pending):
                state = self.rpc.supervisor.getProcessInfo(GROUP + name)["statename"]
                if state == "FATAL":
                    log(f"{name} could not start (FATAL). Last output:\n{self._tail(name)}")
                    return False
                if state in ("STARTING", "RUNNING") and check(pending[name].health, timeout=2) is None:
                    del pending[name]
            if time.monotonic() > deadline:
                for name in pending:
                    log(f"{name} not healthy after {timeout}s ({check(pending[name].health)}). "
                        f"Last output:\n{self._tail(name)}")
                return False
            time.sleep(0.2)
        return True

    def _announce(self) -> None:
        url = self.plan.public.local_url
        log(f"ready: Synapse for {self.plan.homeserver.server_name} with {len(self.plan.workers)} workers "
            f"at {url}/ (health: {url}/health). Point a Matrix client at {url}.")
        log(f"first user: register_new_matrix_user -c {self.plan.homeserver.path} {url}")

    # ---- watching -------------------------------------------------------------------------------------
    def _monitor(self) -> None:
        last: dict[str, tuple[str, int]] = {}
        crashes: dict[str, deque] = defaultdict(deque)
        reported_fatal: set[str] = set()
        while not self.stop_requested.wait(1.0):
            for info in self.rpc.supervisor.getAllProcessInfo():
                name, state, pid = info["name"], info["statename"], info["pid"]
                if name not in self.by_name:
                    continue
                before = last.get(name)
                last[name] = (state, pid)
                if before is None:
                    continue
                alive = ("STARTING", "RUNNING")
                restarted = bool(pid) and pid != before[1] and state in alive
                died = before[0] in alive and state in ("EXITED", "BACKOFF", "FATAL", "UNKNOWN")
                # A death and the restart can fall between two polls: then only the new pid shows it.
                if died or (restarted and before[0] in alive):
                    now = time.monotonic()
                    window = crashes[name]
                    window.append(now)
                    while window and now - window[0] > CRASH_WINDOW:
                        window.popleft()
                    status = f" (exit status {info['exitstatus']})" if info["exitstatus"] else ""
                    log(f"{name} exited unexpectedly{status}; supervisor restarts it")
                    if len(window) >= CRASH_LIMIT:
                        log(f"{name} crashed {len(window)} times in {CRASH_WINDOW // 60} minutes: stopping it. "
                            f"Last output:\n{self._tail(name)}")
                        self._safe(self.rpc.supervisor.stopProcess, GROUP + name, False)
                        self._give_up_if_critical(name)
                if restarted:
                    self._watch_recovery(name)
                if state == "FATAL" and name not in reported_fatal:
                    reported_fatal.add(name)
                    log(f"{name} cannot stay up (FATAL after retries). Last output:\n{self._tail(name)}")
                    self._give_up_if_critical(name)

    def _give_up_if_critical(self, name: str) -> None:
        if self.by_name[name].critical:
            log(f"{name} is essential: stopping the stack")
            self.exit_code = 1
            self.stop_requested.set()

    def _watch_recovery(self, name: str) -> None:
        program = self.by_name[name]

        def watch() -> None:
            started = time.monotonic()
            while time.monotonic() - started < STAGE_TIMEOUT["workers"]:
                if self.stop_requested.is_set():
                    return
                if check(program.health, timeout=2) is None:
                    log(f"{name} is back and healthy after {time.monotonic() - started:.1f}s")
                    return
                time.sleep(0.2)
            log(f"{name} restarted but is still not healthy after {STAGE_TIMEOUT['workers']}s")

        threading.Thread(target=watch, name=f"recover-{name}", daemon=True).start()

    def _tail(self, name: str, size: int = 3000) -> str:
        try:
            text = self.rpc.supervisor.tailProcessStdoutLog(GROUP + name, 0, size)[0]
        except (OSError, xmlrpc.client.Fault):
            return "  (no output captured)"
        if not text.strip():
            return "  (it printed nothing)"
        return "\n".join(f"  {line}" for line in text.strip().splitlines()[-25:])

    # ---- stopping -------------------------------------------------------------------------------------
    def _stop_all(self) -> None:
        if self.supervisord is None:
            return
        if self.supervisord.poll() is None:
            for stage in reversed(range(len(STAGE_NAMES))):
                members = [p for p in self.programs if p.stage == stage]
                for program in members:
                    self._safe(self.rpc.supervisor.stopProcess, GROUP + program.name, False)
                self._wait_stopped(members)
            self._safe(self.rpc.supervisor.shutdown)
        try:
            self.supervisord.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._force_kill()
        log(f"stopped (exit code {self.exit_code})")

    def _wait_stopped(self, members: list[Program]) -> None:
        deadline = time.monotonic() + max((p.stop_wait for p in members), default=0) + 5
        while time.monotonic() < deadline:
            states = [self._safe(self.rpc.supervisor.getProcessInfo, GROUP + p.name) for p in members]
            if all(s is None or s["statename"] in DONE_STATES for s in states):
                return
            time.sleep(0.1)

    def _force_kill(self) -> None:
        try:
            infos = self.rpc.supervisor.getAllProcessInfo() if self.supervisord else []
        except (OSError, xmlrpc.client.Fault):
            infos = []
        for info in infos:
            if info.get("pid"):
                _kill_group(info["pid"])
        if self.supervisord and self.supervisord.poll() is None:
            _kill_group(self.supervisord.pid)

    @staticmethod
    def _safe(call, *args):
        try:
            return call(*args)
        except (OSError, xmlrpc.client.Fault):
            return None


def lock_runtime_dir(runtime_dir: str):
    """Hold an exclusive lock for the launcher's lifetime: one stack per runtime dir."""
    import fcntl

    Path(runtime_dir).mkdir(parents=True, exist_ok=True)
    handle = open(Path(runtime_dir) / ".launcher.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(
            f"SYNAPSE_RUNTIME_DIR={runtime_dir!r} is in use by another `synapse-workers run`: "
            "stop it first, or give this stack its own runtime dir and SYNAPSE_INTERNAL_PORT_BASE."
        ) from None
    return handle


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
            return
        except (ProcessLookupError, PermissionError):
            continue


def _die_with_parent() -> None:
    """supervisord gets SIGTERM (and stops its programs) if we are killed outright."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _own_tree(root: Path, uid: int, gid: int, skip: set[str]) -> None:
    """Give the data dir to UID:GID. A full walk only when the top is not theirs yet (first start)."""
    st = root.stat()
    if (st.st_uid, st.st_gid) == (uid, gid):
        return
    for path, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(path, d) not in skip]
        os.chown(path, uid, gid)
        for name in names:
            os.chown(os.path.join(path, name), uid, gid, follow_symlinks=False)


def _check_readable(path: str, uid: int, gid: int) -> None:
    st = os.stat(path)
    mode = st.st_mode
    readable = (
        (st.st_uid == uid and mode & stat.S_IRUSR)
        or (st.st_gid == gid and mode & stat.S_IRGRP)
        or mode & stat.S_IROTH
    )
    if not readable:
        raise UserError(
            f"{path} is not readable by UID={uid}/GID={gid}, which Synapse runs as: "
            f"chown {uid}:{gid} it, or set UID/GID to its owner."
        )
