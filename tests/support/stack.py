"""Start and stop a real `synapse-workers run` stack for tests and benchmarks.

The stack runs as a child process; everything it starts is found afterwards by scanning /proc for
command lines that mention its runtime or data dir, so a test can prove nothing was left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import isolated_env

SW = shutil.which("synapse-workers", path=str(Path(os.sys.executable).parent)) or "synapse-workers"
# The launch modes the end-to-end tests run on (each stack-starting test once per mode); SW_LAUNCH_MODES=fork
# (or =process) runs one of them.
LAUNCH_MODES = tuple(m.strip() for m in os.environ.get("SW_LAUNCH_MODES", "fork,process").split(",") if m.strip())


def stack_env(root: Path, worker_types: str = "", **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("SYNAPSE_", "POSTGRES_", "NGINX_", "COTURN_", "PROMETHEUS_"))
    }
    env.update(isolated_env(root, server_name="localhost"))
    env["SYNAPSE_WORKER_TYPES"] = worker_types
    if os.environ.get("SW_LAUNCH_MODE"):  # a harness default (drivers that build their own env read it too)
        env["SYNAPSE_LAUNCH_MODE"] = os.environ["SW_LAUNCH_MODE"]
    env.update(extra)
    return env


def make_root(prefix: str = "sw-e2e-") -> Path:
    """A temp dir Synapse's own user (UID 991) can traverse: mkdtemp makes 0700 dirs."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(root, 0o755)
    return root


class Stack:
    def __init__(self, env: dict[str, str], log_path: Path | None = None):
        self.env = env
        self.root = Path(env["SYNAPSE_RUNTIME_DIR"]).parent
        self.log_path = log_path or self.root / "stack.log"
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_after: float | None = None
        self._sessions: set[int] = set()  # session ids the stack's processes run in (see leftovers)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.env['SYNAPSE_HTTP_PORT']}"

    def launch(self) -> Stack:
        """Start `synapse-workers run` without waiting for it to be ready."""
        self.started_at = time.monotonic()
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([SW, "run"], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    poll_interval = 0.25  # readiness polls (benchmarks poll faster with a cheaper client)

    def start(self, timeout: float = 300) -> Stack:
        self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"synapse-workers run exited {self.proc.returncode}:\n{self.tail()}")
            if self.ready():
                self.ready_after = time.monotonic() - self.started_at
                self.leftovers()  # remembers the stack's sessions while its processes still show the root
                return self
            time.sleep(self.poll_interval)
        raise TimeoutError(f"stack not ready after {timeout}s:\n{self.tail()}")

    def ready(self) -> bool:
        try:
            health = httpx.get(f"{self.base_url}/health", timeout=2)
            versions = httpx.get(f"{self.base_url}/_matrix/client/versions", timeout=2)
        except httpx.HTTPError:
            return False
        return health.status_code == 200 and versions.status_code == 200

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds taken). Kills everything if it does not stop in time."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = -1
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self, *remove: Path) -> None:
        """For `finally`: stop it if it still runs (SIGTERM), kill what is left, remove the given dirs."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.stop()
        finally:
            self.kill()
            for path in remove:
                shutil.rmtree(path, ignore_errors=True)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`synapse-workers ARGS` with this stack's environment (health, routes, plan...)."""
        return subprocess.run([SW, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def leftovers(self) -> list[int]:
        """PIDs of everything this stack started that still runs.

        A process belongs to the stack when its command line or environment mentions the stack's root,
        when it descends from such a process, or when it is in a session one of them started (supervisord
        runs in its own). The descendants and sessions catch what renames itself and overwrites its own
        argv and environment: PostgreSQL backends, nginx workers, redis-server."""
        marker = str(self.root).encode()
        own_session = os.getsid(0)
        table = process_table()
        seeds = {pid for pid, info in table.items() if marker in info.cmdline or marker in info.environ}
        self._sessions.update(table[pid].sid for pid in seeds if table[pid].sid not in (0, 1, own_session))
        children: dict[int, list[int]] = {}
        for pid, info in table.items():
            children.setdefault(info.ppid, []).append(pid)
        found: set[int] = set()
        todo = list(seeds | {pid for pid, info in table.items() if info.sid in self._sessions})
        while todo:
            pid = todo.pop()
            if pid in found:
                continue
            found.add(pid)
            todo.extend(children.get(pid, ()))
        found.discard(os.getpid())
        return sorted(found)

    def zygote(self) -> int | None:
        """The pid of the fork launcher (SYNAPSE_LAUNCH_MODE=fork), from its command line."""
        for pid in self.leftovers():
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"synapse_workers.run.zygote" in args and b"setpriv" not in args[0]:
                return pid
        return None

    def processes(self) -> dict[str, int]:
        """Synapse process name → pid, from the running stack's command lines (forked processes show their own)."""
        result = {}
        for pid in self.leftovers():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            args = [a.decode() for a in cmdline if a]
            if any(a.startswith("synapse.app.") for a in args) and "setpriv" not in args[0]:
                last = args[-1]
                name = "main" if last.endswith("/main.yaml") else Path(last).stem
                result[name] = pid
        return result


@dataclass(frozen=True)
class _Proc:
    ppid: int
    sid: int
    cmdline: bytes
    environ: bytes


def process_table() -> dict[int, _Proc]:
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            try:
                environ = (entry / "environ").read_bytes()
            except PermissionError:
                environ = b""
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        if fields[0] == "Z":
            continue  # a zombie runs nothing; its parent reaps it
        table[int(entry.name)] = _Proc(int(fields[1]), int(fields[3]), cmdline, environ)
    return table


def wait_for(predicate, timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


__all__ = ["LAUNCH_MODES", "Stack", "make_root", "process_table", "stack_env", "wait_for"]
