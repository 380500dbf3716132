"""`SYNAPSE_LAUNCH_MODE=fork`: one process imports Synapse once and forks every Synapse process from it.

supervisord runs this as one program (`synapse`), already as Synapse's UID:GID (setpriv execs it, so the
privileges are dropped before anything is imported). It installs Synapse's `ProxiedReactor`, imports the
entry points of the apps it will run, `gc.collect(); gc.freeze()` (so the children's collections do not
dirty the inherited objects' pages), then waits, single-threaded, for requests on a unix socket from the
launcher (`run/zygote_control.py`): start these, stop those, report every child's state.

Each child is forked from this pristine parent (never from a running one): it restores default signal
handlers, dies with the parent (PR_SET_PDEATHSIG), points stdout/stderr at a pipe of its own, closes
everything else it inherited, rewrites its command line to what `python -m synapse.app.X --config-path ...`
would show, installs a fresh reactor behind the proxy and calls the app's `main()` with its own argv: config
loading, logging, listeners, metrics and the reactor are its own. The parent relays each child's output
line by line as `name|line` (`run/logprefix.py` prefixes and captures it per process).

Children are restarted like supervisord restarts its programs (`startsecs`, `startretries=3`, backoff 1, 2,
3 s, then FATAL; an exit after start-up: at once); crash loops are the launcher's decision (`watch.observe`).
The state machine (`Child`, `exited`, `due`) is pure; the rest is I/O.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PRELOAD = ("encodings.unicode_escape", "hiredis")
NAME = "synapse"  # the supervisord program; never a Synapse process name (those are `main` or end in a digit)
STARTRETRIES = 3  # as supervisord's startretries in render/supervisor.py
WITH_PROCESS = ("STARTING", "RUNNING", "STOPPING")  # the child's process exists: a start leaves it alone
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: tuple[str, ...]  # what separate processes would run: python -m synapse.app.X --config-path ...
    start_secs: int
    stop_wait: int

    @property
    def app(self) -> str:
        return self.argv[self.argv.index("-m") + 1]


def encode_specs(specs: Sequence[ChildSpec]) -> str:
    return json.dumps([[s.name, s.start_secs, s.stop_wait, *s.argv] for s in specs], separators=(",", ":"))


def decode_specs(text: str) -> list[ChildSpec]:
    return [ChildSpec(row[0], tuple(row[3:]), int(row[1]), int(row[2])) for row in json.loads(text)]


# ---- the restart policy, pure ------------------------------------------------------------------------------


@dataclass
class Child:
    spec: ChildSpec
    state: str = "STOPPED"  # supervisord's names: STOPPED STARTING RUNNING BACKOFF STOPPING EXITED FATAL
    pid: int = 0
    started: float = 0.0  # monotonic time of the current start
    started_wall: float = 0.0  # epoch of the current start (status uptime)
    exit_status: int = 0  # exit code, -1 when killed by a signal (as supervisord reports it)
    backoff: int = 0
    delay: float = 0.0  # BACKOFF: spawn again at this monotonic time
    kill_at: float = 0.0  # STOPPING: SIGKILL at this monotonic time
    output: int = -1  # read end of the child's stdout/stderr pipe
    partial: bytes = b""
    wanted: bool = field(default=False)  # started and not stopped since

    def report(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "state": self.state,
            "pid": self.pid,
            "exitstatus": self.exit_status,
            "start": self.started_wall if self.pid else 0,
        }


def spawned(child: Child, pid: int, now: float, wall: float) -> None:
    child.state, child.pid, child.started, child.started_wall = "STARTING", pid, now, wall


def exited(child: Child, status: int, now: float) -> None:
    """The child died (status as os.waitpid gives it): what state is it in now?"""
    child.pid = 0
    child.exit_status = os.waitstatus_to_exitcode(status) if status >= 0 else status
    if child.exit_status < 0:
        child.exit_status = -1
    if child.state == "STOPPING" or not child.wanted:
        child.state = "STOPPED"
    elif child.state == "STARTING" and now - child.started < child.spec.start_secs:
        child.backoff += 1  # died before start_secs: a failed start
        child.state, child.delay = ("BACKOFF", now + child.backoff) if child.backoff <= STARTRETRIES else ("FATAL", 0)
    else:
        child.state = "EXITED"  # ran: restart at once


def due(child: Child, now: float) -> str | None:
    """What to do for this child now: `spawn`, `kill` (SIGKILL after stop_wait) or nothing."""
    if child.state == "STARTING" and now - child.started >= child.spec.start_secs:
        child.state, child.backoff = "RUNNING", 0
    if child.state == "EXITED" and child.wanted:
        return "spawn"
    if child.state == "BACKOFF" and now >= child.delay:
        return "spawn"
    if child.state == "STOPPING" and now >= child.kill_at:
        return "kill"
    return None


def next_wakeup(children: Sequence[Child], now: float) -> float:
    times = [now + 0.5]
    for c in children:
        if c.state == "STARTING":
            times.append(c.started + c.spec.start_secs)
        elif c.state == "BACKOFF":
            times.append(c.delay)
        elif c.state == "STOPPING":
            times.append(c.kill_at)
    return max(0.0, min(times) - now)


# ---- the launcher's side: a client ------------------------------------------------------------------------


def control_socket(sockets_dir: str) -> str:
    return f"{sockets_dir}/{NAME}.control.sock"


def _read_line(conn: socket.socket) -> bytes:
    """One JSON line of the control protocol (without a final newline if the peer closed first)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def call(path: str, request: dict[str, Any], timeout: float = 5.0) -> Any:
    """One request, one answer (JSON lines). OSError/ValueError when the zygote does not answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.sendall(json.dumps(request).encode() + b"\n")
        data = _read_line(conn)
    answer = json.loads(data)
    if "error" in answer:
        raise ValueError(answer["error"])
    return answer["result"]


# ---- the zygote ---------------------------------------------------------------------------------------------


class Zygote:
    def __init__(self, control_path: str, specs: Sequence[ChildSpec], reactor: Any, asyncio_reactor: bool):
        import selectors

        self.children = {s.name: Child(s) for s in specs}
        self.order = [s.name for s in specs]
        self.reactor = reactor
        self.asyncio_reactor = asyncio_reactor
        self.stopping = False
        self.stop_signal = 0
        self.pid = os.getpid()
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        if os.path.exists(control_path):
            os.unlink(control_path)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)  # the launcher (root) and Synapse's own user only
        try:
            self.server.bind(control_path)
        finally:
            os.umask(old)
        self.server.listen(16)
        self.selector.register(self.server, 1, "control")
        self.selector.register(self.wake_r, 1, "wake")
        self.out = sys.stdout.buffer

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only note it: the loop acts (a handler runs between any two bytecodes, even mid-write).
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stop_signal = self.stop_signal or signum

    def say(self, message: str) -> None:
        self.out.write(f"{NAME}|{message}\n".encode())
        self.out.flush()

    # ---- the loop -----------------------------------------------------------------------------------------
    def serve(self) -> int:
        self.say(f"Synapse imported once (pid {self.pid}); forking on request")
        while True:
            if self.stop_signal and not self.stopping:
                self.stopping = True
                self.say(f"{signal.Signals(self.stop_signal).name}: stopping every Synapse process, main last")
            if self.stopping:  # reverse order: the workers, then main once they are gone
                first, *rest = self.order
                alive = [n for n in rest if self.children[n].pid]
                self.stop([n for n in alive if self.children[n].state != "STOPPING"])
                if not alive and self.children[first].state != "STOPPING":
                    self.stop([first])
            now = time.monotonic()
            for child in self.children.values():
                action = due(child, now)
                if action == "spawn" and not self.stopping:
                    self.spawn(child)
                elif action == "kill" and child.pid:
                    self._kill(child.pid, signal.SIGKILL)
            if self.stopping and not any(c.pid or c.output >= 0 for c in self.children.values()):
                return 0
            for key, _ in self.selector.select(next_wakeup(list(self.children.values()), time.monotonic())):
                if key.data == "control":
                    self._answer()
                elif key.data == "wake":
                    try:
                        while os.read(self.wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    self._relay(self.children[key.data])
            self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for child in self.children.values():
                if child.pid == pid:
                    exited(child, status, time.monotonic())

    def _relay(self, child: Child) -> None:
        try:
            data = os.read(child.output, 65536)
        except BlockingIOError:
            return
        if not data:  # every writer closed: the child is gone (or closed its output)
            self.selector.unregister(child.output)
            os.close(child.output)
            child.output = -1
            data = b"\n" if child.partial else b""
        text = child.partial + data
        *lines, child.partial = text.split(b"\n")
        prefix = child.spec.name.encode() + b"|"
        if lines:
            self.out.write(b"".join(prefix + line + b"\n" for line in lines))
            self.out.flush()

    def _answer(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.settimeout(2)
            try:
                data = _read_line(conn)
                if not data.endswith(b"\n"):
                    return  # the caller went away mid-request
                request = json.loads(data)
                op, names = request.get("op"), request.get("names") or []
                unknown = [n for n in names if n not in self.children]
                if unknown:
                    raise ValueError(f"unknown process {unknown}")
                result: Any = None
                if op == "start":
                    self.start(names)
                elif op == "stop":
                    self.stop(names)
                elif op == "status":
                    result = [self.children[n].report() for n in self.order]
                elif op == "ping":
                    result = {"pid": self.pid}
                else:
                    raise ValueError(f"unknown request {op!r}")
                conn.sendall(json.dumps({"result": result}).encode() + b"\n")
            except (OSError, ValueError) as exc:
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"error": str(exc)}).encode() + b"\n")

    # ---- requests -----------------------------------------------------------------------------------------
    def start(self, names: Sequence[str]) -> None:
        for name in names:
            child = self.children[name]
            child.wanted = True
            if child.state not in WITH_PROCESS and not self.stopping:
                child.backoff = 0
                self.spawn(child)

    def stop(self, names: Sequence[str]) -> None:
        now = time.monotonic()
        for name in names:
            child = self.children[name]
            child.wanted = False
            if child.pid and child.state != "STOPPING":
                child.state, child.kill_at = "STOPPING", now + child.spec.stop_wait
                self._kill(child.pid, signal.SIGTERM)
            elif not child.pid:
                child.state = "STOPPED"

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def spawn(self, child: Child) -> None:
        read_end, write_end = os.pipe()
        self.out.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.close(read_end)
                code = self._become(child.spec, write_end)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):  # exiting anyway
                        stream.flush()
                os._exit(code)
        os.close(write_end)
        os.set_blocking(read_end, False)
        if child.output >= 0:  # the previous run's pipe, if a grandchild still holds it: stop relaying it
            self.selector.unregister(child.output)
            os.close(child.output)
        child.output, child.partial = read_end, b""
        self.selector.register(read_end, 1, child.spec.name)
        spawned(child, pid, time.monotonic(), time.time())
        self.say(f"forked {child.spec.name} (pid {pid})")

    # ---- in the child -------------------------------------------------------------------------------------
    def _become(self, spec: ChildSpec, output: int) -> int:
        import ctypes
        import importlib

        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != self.pid:  # the parent died before the line above
            return 1
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        # Nothing of the parent's stays open: its control socket, the other children's pipes, the wakeup pipe.
        os.closerange(3, _max_fd())
        set_title(spec.argv, spec.name, libc)
        if self.asyncio_reactor:
            import asyncio

            from twisted.internet.asyncioreactor import AsyncioSelectorReactor

            real: Any = AsyncioSelectorReactor(asyncio.new_event_loop())
        else:
            from twisted.internet.epollreactor import EPollReactor

            real = EPollReactor()
        self.reactor._install_real_reactor(real)
        # Synapse logs "Twisted reactor: ProxiedReactor" here (the proxy): say which one runs behind it.
        os.write(1, f"synapse-workers: Twisted reactor behind the proxy: {type(real).__name__}\n".encode())
        app = spec.app
        sys.argv = [app, *spec.argv[spec.argv.index("-m") + 2 :]]
        importlib.import_module(app).main()
        return 0


def _max_fd() -> int:
    try:
        return max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return os.sysconf("SC_OPEN_MAX")


def set_title(argv: Sequence[str], name: str, libc: Any) -> None:
    """Make /proc/<pid>/cmdline (ps, pgrep) show this child's own command line, within the parent's argv area.

    The kernel reads the command line from the memory between arg_start and arg_end (/proc/self/stat fields
    48, 49); the parent's argv holds every child's argv, so each child's fits."""
    import ctypes

    libc.prctl(PR_SET_NAME, name.encode()[:15])
    try:
        with open("/proc/self/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])
    except (OSError, IndexError, ValueError):
        return
    size = end - start
    title = b"\0".join(arg.encode() for arg in argv)[: size - 1]
    if size > 1:
        ctypes.memmove(start, title.ljust(size, b"\0"), size)


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "--ping":
        try:
            call(argv[1], {"op": "ping"}, timeout=2)
        except (OSError, ValueError):
            return 1
        return 0
    control_path, specs_text = argv
    import ctypes

    # Die with supervisord (set here: a change of credentials, as setpriv's, clears the parent-death signal).
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    specs = decode_specs(specs_text)
    # synapse/__init__.py would install a real (asyncio) reactor at import: each child installs its own.
    asyncio_reactor = os.environ.pop("SYNAPSE_ASYNC_IO_REACTOR", "") == "1"  # programs.py sets "1" or nothing
    started = time.monotonic()
    from synapse.app.complement_fork_proxied_reactor import ProxiedReactor
    from twisted.internet.main import installReactor

    reactor = ProxiedReactor()
    installReactor(reactor)  # a shared epoll reactor created before fork() breaks in the children

    import gc
    import importlib

    for app in dict.fromkeys(s.app for s in specs):
        importlib.import_module(app)
    for module in PRELOAD:  # imported by every child at start-up (txredisapi cannot be: it needs the reactor)
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    # Each child collects (and freezes) at start-up: without this, that walk would copy every inherited page.
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)  # give the import's garbage back: the children start from a smaller heap
    zygote = Zygote(control_path, specs, reactor, asyncio_reactor)
    zygote.say(f"imported {', '.join(dict.fromkeys(s.app for s in specs))} in {time.monotonic() - started:.1f}s")
    return zygote.serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
