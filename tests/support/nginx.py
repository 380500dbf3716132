"""Start and stop a real nginx from a generated nginx.conf.

nginx daemonizes: `nginx -c CONF` returns once the master has bound its listeners and forked. The master
pid is read from the `pid` file the generated config names; stopping sends SIGQUIT (graceful) and waits
until the master and its workers are gone, escalating to SIGTERM and SIGKILL if needed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class NginxError(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie counts as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _live_processes() -> dict[int, list[str]]:
    """pid → the fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...), zombies left out."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            table[int(entry.name)] = fields
    return table


def children(pid: int) -> list[int]:
    return [p for p, fields in _live_processes().items() if int(fields[1]) == pid]


def process_group(pgid: int) -> list[int]:
    """Live processes of a process group (a killed nginx master's workers stay in its group)."""
    return [p for p, fields in _live_processes().items() if int(fields[2]) == pgid]


class Nginx:
    """A running nginx master started from `conf`; use as a context manager or call stop()."""

    def __init__(self, conf: str, log_path: str | None = None) -> None:
        self.conf = conf
        text = Path(conf).read_text()
        match = re.search(r"^\s*pid\s+([^;]+);", text, re.M)
        if not match:
            raise NginxError(f"{conf} names no pid file")
        self.pid_file = match.group(1).strip()
        self.log_path = log_path or str(Path(conf).with_name("nginx-test.log"))
        self.pid: int | None = None
        self.workers: list[int] = []

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = 10.0) -> Nginx:
        if os.path.exists(self.pid_file):
            os.unlink(self.pid_file)
        with open(self.log_path, "ab") as log:
            # `error_log stderr`: the daemon keeps writing to the file we hand it as stderr.
            result = subprocess.run([NGINX, "-c", self.conf], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    timeout=timeout)
        if result.returncode != 0:
            raise NginxError(f"nginx -c {self.conf} exited {result.returncode}:\n{self.log()}")
        try:
            self._wait_started(timeout)
        except BaseException:
            self._kill_by_conf()
            raise
        return self

    def _wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = Path(self.pid_file).read_text().strip()
                if text:
                    self.pid = int(text)
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise NginxError(f"nginx wrote no pid file {self.pid_file}:\n{self.log()}")
            time.sleep(0.02)
        # Remember the workers too, so stop() can make sure none outlives the master.
        deadline = time.monotonic() + timeout
        while not self.workers and time.monotonic() < deadline:
            self.workers = children(self.pid)
            if not self.workers:
                time.sleep(0.02)

    def _kill_by_conf(self) -> None:
        """Startup went wrong after nginx forked: find our master by its command line and stop it."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                # The master retitles itself "nginx: master process /usr/sbin/nginx -c CONF".
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"nginx: master" in cmdline and self.conf.encode() in cmdline:
                self.pid = int(entry.name)
                self.workers = children(self.pid)
                self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        if self.pid is None:
            return
        pids = [self.pid, *self.workers, *children(self.pid)]
        for sig in (signal.SIGQUIT, signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            deadline = time.monotonic() + (timeout if sig != signal.SIGKILL else 5.0)
            while any(_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.02)
            if not any(_alive(p) for p in pids):
                break
            if sig == signal.SIGTERM:
                # Last resort: the master may be gone while a worker lingers.
                for p in pids:
                    if _alive(p):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p, signal.SIGKILL)
        self.pid = None
        self.workers = []

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
