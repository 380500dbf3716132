"""The supervisord back-end of process control (run/control.py): every program of the stack's supervisord.conf.

supervisord (PyPI `supervisor`) does the process work: spawning, capturing output, restarting with backoff,
process groups. We start it (`open`), drive it through its XML-RPC API on its 0700 unix socket, and shut it
down after the last program stopped (`close`). `proxy` makes the XML-RPC proxy: tests give a fake one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from ..layout import Layout
from ..programs import Program, child_environment
from ..render.supervisor import GROUP_NAME
from .control import Failure, UnreachableError, read_tail
from .watch import Report

GROUP = GROUP_NAME + ":"  # every program sits in one supervisor group (see render/supervisor.py)
OPEN_TIMEOUT = 15  # seconds for supervisord to answer RUNNING


class SupervisordControl:
    host: str | None = None  # the launcher starts it

    def __init__(self, layout: Layout, programs: Sequence[Program], proxy: Callable[[], Any] | None = None):
        self.layout = layout
        self.names = frozenset(p.name for p in programs)
        # Captured by the output listener (run/logprefix.py) with tokens masked: supervisord keeps no copy.
        self.masked = frozenset(p.name for p in programs if p.masked_log)
        self.proxy = proxy or self._socket_proxy
        self.process: subprocess.Popen[bytes] | None = None

    def _socket_proxy(self) -> Any:
        """A fresh XML-RPC proxy per use: supervisor's transport is unusable after one failed request."""
        transport = SupervisorTransport(None, None, serverurl=f"unix://{self.layout.supervisor_socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    @property
    def rpc(self) -> Any:
        return self.proxy().supervisor

    # ---- the daemon ---------------------------------------------------------------------------------------
    def open(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", self.layout.supervisor_conf],
            env=child_environment(os.environ),  # no secrets: supervisord's programs inherit its environment
            start_new_session=True,  # the launcher's signal handler decides; ^C must not hit every program at once
            preexec_fn=_supervisord_setup,
        )
        deadline = time.monotonic() + OPEN_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if self.rpc.getState()["statename"] == "RUNNING":
                    return
            except (OSError, xmlrpc.client.Fault):
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"supervisord did not start (see {self.layout.state_dir}/supervisord.log)")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self._safe(self.rpc.shutdown)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        try:
            infos = self.rpc.getAllProcessInfo() if self.process else []
        except (OSError, xmlrpc.client.Fault):
            infos = []
        for info in infos:
            if info.get("pid"):
                _kill_group(info["pid"])
        if self.process and self.process.poll() is None:
            _kill_group(self.process.pid)

    # ---- its programs -------------------------------------------------------------------------------------
    def start(self, names: Sequence[str], deadline: float) -> Failure | None:
        for name in names:
            self.rpc.startProcess(GROUP + name, False)  # returns at once: the caller waits for health
        return None

    def stop(self, names: Sequence[str]) -> None:
        for name in names:
            self._safe(self.rpc.stopProcess, GROUP + name, False)

    def reports(self, earlier: Mapping[str, Report]) -> list[Report]:
        try:
            infos = self.rpc.getAllProcessInfo()
        except (OSError, xmlrpc.client.Fault) as exc:
            raise UnreachableError(f"supervisord: {exc}") from exc
        return [
            Report(i["name"], i["statename"], i["pid"], i["exitstatus"], float(i["start"]))
            for i in infos
            if i["name"] in self.names
        ]

    def state(self, name: str) -> str:
        """One program's state now (the zygote back-end asks about its host)."""
        return str(self.rpc.getProcessInfo(GROUP + name)["statename"])

    def tail(self, name: str, size: int) -> str | None:
        if name in self.masked:
            return read_tail(f"{self.layout.state_dir}/{name}.log", size)
        try:
            return str(self.rpc.tailProcessStdoutLog(GROUP + name, 0, size)[0])
        except (OSError, xmlrpc.client.Fault):
            return None

    def checks(self) -> Mapping[str, Callable[[], str | None]]:
        return {}

    @staticmethod
    def _safe(call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except (OSError, xmlrpc.client.Fault):
            return None


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
            return
        except (ProcessLookupError, PermissionError):
            continue


def _supervisord_setup() -> None:
    """In the child before exec: die with the launcher, and create no world-readable file.

    supervisord gets SIGTERM (and stops its programs) if we are killed outright. The umask is inherited by
    every program, so the log files it and they create (nginx's, Synapse's, captured output) are 0640 at
    most; supervisord's own `umask` option applies only when it daemonizes."""
    import ctypes

    os.umask(0o027)

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
