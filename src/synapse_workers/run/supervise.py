"""`synapse-workers run`: start the stack in stages under supervisord, watch it, stop it cleanly.

supervisord (PyPI `supervisor`) does the process work: spawning, capturing output, restarting with
backoff. We drive it through its XML-RPC API: start stage by stage with health gates (PostgreSQL →
Redis → main → workers → nginx), watch for crashes and crash loops (the decision is `watch.observe`,
pure), keep `state/status.json` current for `status`/`health`, and stop in reverse order.
In fork mode (`SYNAPSE_LAUNCH_MODE=fork`) the Synapse processes are the children of one supervisord program,
the zygote (`run/zygote.py`): the same stages, reports, crash decisions and stop order, through its socket.
Files (supervisord.conf included) are written before this starts; directories are prepared by `prepare`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from ..errors import UserError
from ..plan import PROMETHEUS, Plan
from ..programs import STAGE_NAMES, Health, Program, child_environment, flatten, remote_waits
from ..render.supervisor import GROUP_NAME
from . import postgres, preflight
from .health import Aggregator, check, public_health, synapse_checks
from .prepare import prepare
from .status import ProcessStatus, StackStatus, write_status
from .watch import (
    ALIVE,
    CRASH_LIMIT,
    CRASH_LOOP,
    CRASH_WINDOW,
    CRASHED,
    FATAL,
    RESTARTED,
    Report,
    WatchState,
    observe,
)
from .zygote import call as zygote_call
from .zygote import control_socket

STAGE_TIMEOUT = {"postgres": 60, "redis": 15, "main": 300, "workers": 180, "nginx": 30}  # first start migrates
REMOTE_TIMEOUT = 600  # several hosts: how long a stage waits for what it needs on another host (started later)
GROUP = GROUP_NAME + ":"  # every program sits in one supervisor group (see render/supervisor.py)
DONE_STATES = {"STOPPED", "EXITED", "FATAL", "UNKNOWN"}


def log(message: str) -> None:
    print(f"{'synapse-workers':18}| {message}", flush=True)


class Stack:
    def __init__(self, plan: Plan, programs: Sequence[Program], binaries: dict[str, str], as_root: bool):
        self.plan = plan
        self.as_root = as_root
        self.binaries = binaries
        self.supervised = list(programs)  # what supervisord runs
        self.programs = flatten(self.supervised)  # ... and what those fork themselves (fork mode)
        self.by_name = {p.name: p for p in self.programs}
        self.forked_by = {c.name: p for p in self.supervised for c in p.children}
        # `status` shows every process the stack serves with, not the zygote that forks them.
        self.shown = [p for p in self.programs if not p.children]
        self.control = control_socket(plan.layout.sockets_dir)
        self.stopped_for_good: set[str] = set()  # crash loops: not restarted when the zygote is
        self._last_forked: dict[str, dict[str, Any]] = {}
        self.layout = plan.layout
        self.supervisord: subprocess.Popen[bytes] | None = None
        self.stop_requested = threading.Event()
        self.signals = 0
        self.exit_code = 0
        self.watch = WatchState()
        self.last_error: dict[str, str] = {}
        self._written_status: object = None

    @property
    def rpc(self) -> Any:
        """A fresh XML-RPC proxy per use: supervisor's transport is unusable after one failed request."""
        transport = SupervisorTransport(None, None, serverurl=f"unix://{self.layout.supervisor_socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    # ---- lifecycle ------------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        prometheus = self.by_name.get(PROMETHEUS)
        prepare(self.plan, self.as_root, self.binaries["setpriv"], prometheus.user if prometheus else None)
        preflight.raise_if(preflight.check_external_database(self.plan, log, self.stop_requested.is_set))
        if self.stop_requested.is_set():
            return 0
        aggregator = Aggregator(synapse_checks(self.plan), self.plan.health_port)
        aggregator.start()
        try:
            self._start_supervisord()
            self._publish_status()
            if self._start_stages():
                self._announce()
                self._monitor()
        finally:
            self._stop_all()
            aggregator.stop()
        return self.exit_code

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals += 1
        if self.signals == 1:
            log(f"{signal.Signals(signum).name}: stopping (send it again to force)")
            self.stop_requested.set()
        else:
            log("second signal: killing everything now")
            self._force_kill()
            os._exit(1)

    def _start_supervisord(self) -> None:
        self.supervisord = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", self.layout.supervisor_conf],
            env=child_environment(os.environ),  # no secrets: supervisord's programs inherit its environment
            start_new_session=True,  # our signal handler decides; ^C must not hit every program at once
            preexec_fn=_supervisord_setup,
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
        raise RuntimeError(f"supervisord did not start (see {self.layout.state_dir}/supervisord.log)")

    def _start_stages(self) -> bool:
        # The zygote first: its import of Synapse needs no database, so it overlaps PostgreSQL's and Redis's start.
        early = {p.name for p in self.supervised if p.children}
        for zygote in early:
            self.rpc.supervisor.startProcess(GROUP + zygote, False)
        for stage, name in enumerate(STAGE_NAMES):
            if not self._wait_remote(remote_waits(self.plan, stage)):
                return False
            members = [p for p in self.programs if p.stage == stage]
            if not members:
                continue
            started = time.monotonic()
            for program in members:
                if program.name not in self.forked_by and program.name not in early:
                    self.rpc.supervisor.startProcess(GROUP + program.name, False)
            forked = [p.name for p in members if p.name in self.forked_by]
            ok = not forked or self._fork(forked, started + STAGE_TIMEOUT[name])
            ok = ok and self._wait_healthy(members, STAGE_TIMEOUT[name])
            self._publish_status()
            if not ok:
                if not self.stop_requested.is_set():  # asked to stop while starting: still a clean stop
                    self.exit_code = 1
                return False
            log(f"{name}: {', '.join(p.name for p in members)} healthy in {time.monotonic() - started:.1f}s")
            if name == "postgres":
                assert self.plan.postgres is not None
                owner = postgres.cluster_owner(self.as_root)
                postgres.ensure_database(self.plan, owner, self.as_root, self.binaries["setpriv"])
        return True

    def _wait_remote(self, waits: dict[str, Health]) -> bool:
        """Several hosts: wait for what runs on another host (started there, maybe later)."""
        if not waits:
            return True
        placement = self.plan.placement
        assert placement is not None
        started, said = time.monotonic(), False
        pending = dict(waits)
        while pending:
            if self.stop_requested.is_set():
                return False
            for name in list(pending):
                if check(pending[name], timeout=2) is None:
                    del pending[name]
            if not pending:
                break
            if not said:
                where = ", ".join(f"{n} on {placement.where.get(n, '?')}" for n in pending)
                log(f"waiting for {where}")
                said = True
            if time.monotonic() - started > REMOTE_TIMEOUT:
                for name in pending:
                    why = check(pending[name], timeout=2)
                    log(f"{name} (host {placement.where.get(name)}) not reachable after {REMOTE_TIMEOUT}s: {why}.")
                self.exit_code = 1
                return False
            time.sleep(0.5)
        if said:
            log(f"{', '.join(waits)} reachable after {time.monotonic() - started:.1f}s")
        return True

    def _fork(self, names: list[str], deadline: float) -> bool:
        """Ask the zygote to fork these (it answers once Synapse is imported)."""
        while not self.stop_requested.is_set():
            try:
                zygote_call(self.control, {"op": "start", "names": names})
                return True
            except (OSError, ValueError) as exc:
                zygote = self.forked_by[names[0]].name
                state = self.rpc.supervisor.getProcessInfo(GROUP + zygote)["statename"]
                if state == "FATAL" or time.monotonic() > deadline:
                    self._report(zygote, f"{zygote} (which forks {', '.join(names)}) does not answer: {exc}.")
                    return False
            time.sleep(0.05)
        return False

    def _healthy(self, program: Program) -> str | None:
        if program.children:  # the zygote: it answers on its socket
            try:
                zygote_call(self.control, {"op": "ping"}, timeout=2)
            except (OSError, ValueError) as exc:
                return str(exc)
            return None
        return check(program.health, timeout=2)

    def _states(self) -> dict[str, str]:
        return {r.name: r.state for r, _ in self._reports()}

    def _wait_healthy(self, members: list[Program], timeout: float) -> bool:
        pending = {p.name: p for p in members}
        deadline = time.monotonic() + timeout
        while pending:
            if self.stop_requested.is_set():
                return False
            states = self._states()
            for name in list(pending):
                state = states.get(name, "UNKNOWN")
                if state == "FATAL":
                    self._report(name, f"{name} could not start (FATAL).")
                    return False
                if state in ("STARTING", "RUNNING") and self._healthy(pending[name]) is None:
                    del pending[name]
            if time.monotonic() > deadline:
                for name in pending:
                    self._report(name, f"{name} not healthy after {timeout}s ({check(pending[name].health)}).")
                return False
            time.sleep(0.05)  # a start is ready up to one poll sooner: checks are cheap (one shared client)
        return True

    def _announce(self) -> None:
        if not self.plan.local("nginx"):
            here = self.plan.placement.here if self.plan.placement else None
            names = ", ".join(p.name for p in self.shown) or "nothing"
            log(f"ready: host {here} of {self.plan.homeserver.server_name} runs {names}")
            return
        url = self.plan.public.local_url
        log(
            f"ready: Synapse for {self.plan.homeserver.server_name} with {len(self.plan.workers)} workers "
            f"at {url}/ (health: {url}/health). Point a Matrix client at {url}."
        )
        log(f"first user: register_new_matrix_user -c {self.plan.homeserver.path} {url}")

    # ---- watching -------------------------------------------------------------------------------------
    def _reports(self) -> list[tuple[Report, dict[str, Any]]]:
        result = []
        infos = [info for info in self.rpc.supervisor.getAllProcessInfo() if info["name"] in self.by_name]
        for info in infos + self._forked_infos(infos):
            report = Report(info["name"], info["statename"], info["pid"], info["exitstatus"])
            result.append((report, info))
        return result

    def _forked_infos(self, supervised: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The zygote's children, in supervisord's terms. A zygote that is not running has no children (they
        die with it); one that does not answer right now keeps its last report."""
        if not self.forked_by:
            return []
        zygote = next((i for i in supervised if i["name"] in {p.name for p in self.forked_by.values()}), None)
        if zygote is None or zygote["statename"] not in ALIVE:
            self._last_forked = {}
            return [{"name": n, "statename": "STOPPED", "pid": 0, "exitstatus": 0, "start": 0} for n in self.forked_by]
        try:
            rows = zygote_call(self.control, {"op": "status"}, timeout=2)
        except (OSError, ValueError):
            if zygote["statename"] == "STARTING":  # still importing Synapse
                rows = [{"name": n, "state": "STOPPED", "pid": 0, "exitstatus": 0, "start": 0} for n in self.forked_by]
            else:
                return list(self._last_forked.values())
        self._last_forked = {
            r["name"]: {
                "name": r["name"],
                "statename": r["state"],
                "pid": r["pid"],
                "exitstatus": r["exitstatus"],
                "start": r["start"],
            }
            for r in rows
        }
        return list(self._last_forked.values())

    def _stop_program(self, name: str) -> None:
        if name in self.forked_by:
            self._safe_zygote({"op": "stop", "names": [name]})
        else:
            self._safe(self.rpc.supervisor.stopProcess, GROUP + name, False)

    def _safe_zygote(self, request: dict[str, Any]) -> Any:
        try:
            return zygote_call(self.control, request)
        except (OSError, ValueError):
            return None

    def _monitor(self) -> None:
        self.watch, _ = observe(self.watch, [r for r, _ in self._reports()], time.monotonic())
        while not self.stop_requested.wait(1.0):
            reports = self._reports()
            self.watch, events = observe(
                self.watch, [r for r, _ in reports], time.monotonic(), CRASH_LIMIT, CRASH_WINDOW
            )
            for event in events:
                name = event.name
                if event.kind == CRASHED:
                    status = f" (exit status {event.exit_status})" if event.exit_status else ""
                    log(f"{name} exited unexpectedly{status}; supervisor restarts it")
                    self.last_error[name] = _last_line(self._tail_text(name)) or f"exited{status}"
                elif event.kind == CRASH_LOOP:
                    self._report(
                        name, f"{name} crashed {event.crashes} times in {int(CRASH_WINDOW) // 60} minutes: stopping it."
                    )
                    self.stopped_for_good.add(name)
                    self._stop_program(name)
                    self._give_up_if_critical(name)
                elif event.kind == RESTARTED:
                    if self.by_name[name].children:  # a new zygote: its children died with the old one
                        self._refork(self.by_name[name])
                    self._watch_recovery(name)
                elif event.kind == FATAL:
                    self._report(name, f"{name} cannot stay up (FATAL after retries).")
                    self._give_up_if_critical(name)
            self._publish_status(reports)

    def _refork(self, zygote: Program) -> None:
        names = [c.name for c in zygote.children if c.name not in self.stopped_for_good]
        log(f"{zygote.name} was restarted: forking {', '.join(names)} again")

        def refork() -> None:
            first, rest = names[:1], names[1:]  # main first, as at start-up
            if not self._fork(first, time.monotonic() + STAGE_TIMEOUT["main"]):
                return
            if rest and self._wait_healthy([self.by_name[n] for n in first], STAGE_TIMEOUT["main"]):
                self._fork(rest, time.monotonic() + STAGE_TIMEOUT["workers"])

        threading.Thread(target=refork, name=f"refork-{zygote.name}", daemon=True).start()

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
                if self._healthy(program) is None:
                    log(f"{name} is back and healthy after {time.monotonic() - started:.1f}s")
                    return
                time.sleep(0.2)
            log(f"{name} restarted but is still not healthy after {STAGE_TIMEOUT['workers']}s")

        threading.Thread(target=watch, name=f"recover-{name}", daemon=True).start()

    def _report(self, name: str, message: str) -> None:
        """Log a failure with the program's last output, and remember its last line for `status`."""
        text = self._tail_text(name)
        self.last_error[name] = _last_line(text) or message
        if text is None:
            shown = "  (no output captured)"
        elif not text.strip():
            shown = "  (it printed nothing)"
        else:
            shown = "\n".join(f"  {line}" for line in text.strip().splitlines()[-25:])
        log(f"{message} Last output:\n{shown}")

    def _tail_text(self, name: str, size: int = 3000) -> str | None:
        masked = any(p.masked_log for p in self.programs if p.name == name)
        if name in self.forked_by or masked:  # captured by the output listener (run/logprefix.py)
            try:
                with open(f"{self.layout.state_dir}/{name}.log", "rb") as handle:
                    handle.seek(max(0, handle.seek(0, os.SEEK_END) - size))
                    return handle.read().decode(errors="replace")
            except OSError:
                return None
        try:
            return str(self.rpc.supervisor.tailProcessStdoutLog(GROUP + name, 0, size)[0])
        except (OSError, xmlrpc.client.Fault):
            return None

    def _publish_status(self, reports: list[tuple[Report, dict[str, Any]]] | None = None) -> None:
        """Write state/status.json when anything `status` shows has changed."""
        try:
            infos = {info["name"]: info for _, info in (reports if reports is not None else self._reports())}
        except (OSError, xmlrpc.client.Fault):
            return
        processes = tuple(
            ProcessStatus(
                name=p.name,
                pid=infos.get(p.name, {}).get("pid", 0),
                state=infos.get(p.name, {}).get("statename", "UNKNOWN"),
                started=float(infos.get(p.name, {}).get("start", 0)),
                restarts=self.watch.restarts.get(p.name, 0),
                last_error=self.last_error.get(p.name, ""),
                health=p.health,
                addon=p.addon,
            )
            for p in self.shown
        )
        status = StackStatus(os.getpid(), self.plan.homeserver.server_name, public_health(self.plan), processes)
        if status != self._written_status:
            write_status(self.layout, status)
            self._written_status = status

    # ---- stopping -------------------------------------------------------------------------------------
    def _stop_all(self) -> None:
        if self.supervisord is None:
            return
        if self.supervisord.poll() is None:
            for stage in reversed(range(len(STAGE_NAMES))):
                members = [p for p in self.programs if p.stage == stage]
                # Forked processes first (main's stage holds main and the zygote that forked it).
                for group in (
                    [p for p in members if p.name in self.forked_by],
                    [p for p in members if p.name not in self.forked_by],
                ):
                    if group:
                        forked = [p.name for p in group if p.name in self.forked_by]
                        if forked:
                            self._safe_zygote({"op": "stop", "names": forked})
                        for program in group:
                            if program.name not in self.forked_by:
                                self._safe(self.rpc.supervisor.stopProcess, GROUP + program.name, False)
                        self._wait_stopped(group)
            self._publish_status()
            self._safe(self.rpc.supervisor.shutdown)
        try:
            self.supervisord.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._force_kill()
        log(f"stopped (exit code {self.exit_code})")

    def _wait_stopped(self, members: list[Program]) -> None:
        deadline = time.monotonic() + max((p.stop_wait for p in members), default=0) + 5
        while time.monotonic() < deadline:
            try:
                states = self._states()
            except (OSError, xmlrpc.client.Fault):
                return
            if all(states.get(p.name, "UNKNOWN") in DONE_STATES for p in members):
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
    def _safe(call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except (OSError, xmlrpc.client.Fault):
            return None


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def lock_runtime_dir(lock_file: str, runtime_dir: str) -> Any:
    """Hold an exclusive lock for the launcher's lifetime: one stack per runtime dir."""
    import fcntl

    Path(runtime_dir).mkdir(parents=True, exist_ok=True)
    handle = open(lock_file, "w")  # noqa: SIM115 (held open for the launcher's lifetime: that is the lock)
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


def _supervisord_setup() -> None:
    """In the child before exec: die with the launcher, and create no world-readable file.

    supervisord gets SIGTERM (and stops its programs) if we are killed outright. The umask is inherited by
    every program, so the log files it and they create (nginx's, Synapse's, captured output) are 0640 at
    most; supervisord's own `umask` option applies only when it daemonizes."""
    import ctypes

    os.umask(0o027)

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
