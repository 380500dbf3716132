"""What a running stack leaves in its runtime dir for `status` and `health` from another shell.

`run` writes `state/status.json` (atomically, root-only like the rest of `state/`) whenever a process
changes: every program's PID, state, start time, restarts, last error line and health check, plus the
public health URL. `status` and `health` read it with nothing but SYNAPSE_RUNTIME_DIR, and tell a live
stack from a stale file by the launcher's lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import UserError
from ..layout import Layout
from ..programs import Health

FORMAT = 1


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    pid: int
    state: str
    started: float  # epoch seconds of the current run (0: not running)
    restarts: int
    last_error: str
    health: Health
    addon: bool = False  # coturn, Prometheus, an exporter: the stack serves without it (health shows, never fails)

    def as_json(self, now: float) -> dict[str, Any]:
        uptime = round(now - self.started, 1) if self.pid and self.started else 0.0
        return {
            "name": self.name,
            "pid": self.pid,
            "state": self.state,
            "uptime_s": uptime,
            "restarts": self.restarts,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class StackStatus:
    launcher_pid: int
    server_name: str
    public_health: Health
    processes: tuple[ProcessStatus, ...]
    running: bool = True  # False: the launcher's lock is free (the file is what a stopped stack left)


def write_status(layout: Layout, status: StackStatus) -> None:
    doc = {
        "format": FORMAT,
        "launcher_pid": status.launcher_pid,
        "server_name": status.server_name,
        "public_health": asdict(status.public_health),
        "processes": [asdict(p) for p in status.processes],
    }
    fd, tmp = tempfile.mkstemp(dir=layout.state_dir, prefix=".status-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(doc, handle, indent=1, sort_keys=True)
        os.replace(tmp, layout.status_file)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_status(layout: Layout) -> StackStatus:
    """The last status `run` wrote in this runtime dir; UserError when there is none."""
    try:
        with open(layout.status_file, encoding="utf-8") as handle:
            doc = json.load(handle)
    except FileNotFoundError:
        raise UserError(
            f"SYNAPSE_RUNTIME_DIR={layout.runtime_dir!r} holds no running stack ({layout.status_file} is missing): "
            "start one with `synapse-workers run`, or set SYNAPSE_RUNTIME_DIR to the running stack's."
        ) from None
    except PermissionError:
        raise UserError(
            f"{layout.status_file} is readable only by the user that runs the stack (root in a container)."
        ) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{layout.status_file} cannot be read: {exc}") from None
    processes = tuple(ProcessStatus(**{**p, "health": Health(**p["health"])}) for p in doc.get("processes", []))
    return StackStatus(
        launcher_pid=doc.get("launcher_pid", 0),
        server_name=doc.get("server_name", ""),
        public_health=Health(**doc["public_health"]),
        processes=processes,
        running=launcher_running(layout),
    )


def launcher_running(layout: Layout) -> bool:
    """True while a `run` holds the runtime dir's lock."""
    try:
        handle = open(layout.lock_file)  # noqa: SIM115 (closed by the with below; open may fail first)
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
