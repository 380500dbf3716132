"""`synapse-workers run`: start the stack in stages, watch it, stop it cleanly.

`Stack` sequences and decides; the processes are run by process-control back-ends (`run/control.py`):
supervisord (`run/supervisord_control.py`, every program) and, in fork mode (`SYNAPSE_LAUNCH_MODE=fork`), the
zygote (`run/zygote_control.py`, the Synapse processes it forks: a back-end whose host is one of supervisord's
programs). `Stack` starts stage by stage with health gates (PostgreSQL → Redis → main → workers → nginx), watches
for crashes and crash loops (the decision is `watch.observe`, pure), keeps `state/status.json` current for
`status`/`health`, and stops in reverse order. Files (supervisord.conf included) are written before this
starts; directories are prepared by `prepare`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..layout import RUNTIME_MARKER, RUNTIME_MARKER_TEXT
from ..plan import PROMETHEUS, Plan
from ..programs import STAGE_NAMES, Health, Program, flatten, remote_waits
from . import postgres, preflight
from .backup_report import backup_metrics
from .control import Control, Daemon, UnreachableError
from .health import Aggregator, check, public_health, synapse_checks
from .prepare import prepare
from .status import ProcessStatus, StackStatus, write_status
from .supervisord_control import SupervisordControl
from .watch import (
    CRASH_LIMIT,
    CRASH_LOOP,
    CRASH_WINDOW,
    CRASHED,
    FATAL,
    RESTARTED,
    Event,
    Report,
    WatchState,
    observe,
)
from .zygote_control import zygote_controls

STAGE_TIMEOUT = {"postgres": 60, "redis": 15, "main": 300, "workers": 180, "nginx": 30}  # first start migrates
REMOTE_TIMEOUT = 600  # several hosts: how long a stage waits for what it needs on another host (started later)
DONE_STATES = {"STOPPED", "EXITED", "FATAL", "UNKNOWN"}


def log(message: str) -> None:
    print(f"{'synapse-workers':18}| {message}", flush=True)


def warn(problem: str) -> None:
    """A warning found once the stack is starting (the external database's size), said as the CLI says its own."""
    print(f"synapse-workers: warning: {problem}", file=sys.stderr, flush=True)


class Stack:
    def __init__(
        self,
        plan: Plan,
        programs: Sequence[Program],
        binaries: dict[str, str],
        as_root: bool,
        daemon: Daemon | None = None,
        nested: Sequence[Control] = (),
    ):
        """daemon, nested: the process-control back-ends (tests give fakes); by default supervisord for
        `programs` and a zygote back-end for each program that forks processes itself."""
        self.plan = plan
        self.as_root = as_root
        self.binaries = binaries
        self.layout = plan.layout
        self.programs = flatten(list(programs))  # what supervisord runs, each followed by what it forks (fork mode)
        self.by_name = {p.name: p for p in self.programs}
        self.stop_requested = threading.Event()
        if daemon is None:
            daemon = supervisord = SupervisordControl(self.layout, programs)
            nested = zygote_controls(
                self.layout.sockets_dir, self.layout.state_dir, programs, supervisord.state, self.stop_requested.is_set
            )
        self.daemon = daemon
        self.backends: list[Control] = [daemon, *nested]  # outermost first: a host before what runs inside it
        self.owner = {name: backend for backend in self.backends for name in backend.names}
        # A back-end's host starts before the first stage (the zygote's import of Synapse needs no database, so it
        # overlaps PostgreSQL's and Redis's start), and `status` shows the processes it runs, not the host.
        self.hosts = [b.host for b in self.backends if b.host]
        self.shown = [p for p in self.programs if p.name not in self.hosts]
        self.checks: dict[str, Callable[[], str | None]] = {n: c for b in self.backends for n, c in b.checks().items()}
        self.stopped_for_good: set[str] = set()  # crash loops: not started again when their host restarts
        self._opened = False
        self.signals = 0
        self.exit_code = 0
        self.watch = WatchState()
        self.last_error: dict[str, str] = {}
        self._written_status: object = None

    # ---- lifecycle ------------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        prometheus = self.by_name.get(PROMETHEUS)
        prepare(self.plan, self.as_root, self.binaries["setpriv"], prometheus.user if prometheus else None)
        preflight.raise_if(preflight.check_external_database(self.plan, log, self.stop_requested.is_set, warn=warn))
        if self.stop_requested.is_set():
            return 0
        # ttl 0: nginx keeps the answer for a second and asks again, so each of its requests gets a verdict
        # that is new (requests that arrive together share one refresh).
        aggregator = Aggregator(
            synapse_checks(self.plan),
            self.plan.health_port,
            ttl=0.0,
            metrics=backup_metrics(self.plan),
            pids=self._pids,
        )
        aggregator.start()
        try:
            self._opened = True
            self.daemon.open()
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
            self.daemon.kill()
            os._exit(1)

    def _members(self, stage: int, names: Sequence[str] | None = None) -> list[Program]:
        return [p for p in self.programs if p.stage == stage and (names is None or p.name in names)]

    def _start(self, members: Sequence[Program], deadline: float) -> bool:
        """Ask each back-end to start its share of `members`, outermost first; False (reported) if one fails."""
        for backend in self.backends:
            names = [p.name for p in members if p.name in backend.names]
            failure = backend.start(names, deadline) if names else None
            if failure is not None:
                self._report(failure.name, failure.message)
                return False
        return True

    def _start_stages(self) -> bool:
        for host in self.hosts:
            self._start([self.by_name[host]], time.monotonic() + STAGE_TIMEOUT[STAGE_NAMES[self.by_name[host].stage]])
        for stage, name in enumerate(STAGE_NAMES):
            if not self._wait_remote(remote_waits(self.plan, stage)):
                return False
            members = self._members(stage)
            if not members:
                continue
            started = time.monotonic()
            ok = self._start([p for p in members if p.name not in self.hosts], started + STAGE_TIMEOUT[name])
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

    def _healthy(self, program: Program) -> str | None:
        answered = self.checks.get(program.name)  # a back-end's own check (the zygote: its socket answers)
        return answered() if answered else check(program.health, timeout=2)

    def _states(self) -> dict[str, str]:
        return {r.name: r.state for r in self._reports()}

    def _wait_healthy(self, members: Sequence[Program], timeout: float) -> bool:
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
    def _reports(self) -> list[Report]:
        """Every program, from each back-end in turn (a nested one reads its host's row in the same round)."""
        rows: dict[str, Report] = {}
        for backend in self.backends:
            rows.update((r.name, r) for r in backend.reports(rows))
        return list(rows.values())

    def _monitor(self) -> None:
        self.watch, _ = observe(self.watch, self._reports(), time.monotonic())
        while not self.stop_requested.wait(1.0):
            self._poll()

    def _poll(self) -> None:
        """One look at every program: `watch` decides what happened, this acts on it and publishes the status."""
        reports = self._reports()
        self.watch, events = observe(self.watch, reports, time.monotonic(), CRASH_LIMIT, CRASH_WINDOW)
        for event in events:
            self._act(event)
        self._publish_status(reports)

    def _act(self, event: Event) -> None:
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
            self.owner[name].stop([name])
            self._give_up_if_critical(name)
        elif event.kind == RESTARTED:
            for backend in self.backends:
                if backend.host == name:  # a new host: what it ran died with the old one
                    self._start_again(backend)
            self._watch_recovery(name)
        elif event.kind == FATAL:
            self._report(name, f"{name} cannot stay up (FATAL after retries).")
            self._give_up_if_critical(name)

    def _start_again(self, backend: Control) -> None:
        """Start what `backend` runs again, stage by stage as at start-up (main, then the workers once it is
        healthy), except what was stopped for crash-looping."""
        names = [p.name for p in self.programs if p.name in backend.names and p.name not in self.stopped_for_good]
        log(f"{backend.host} was restarted: forking {', '.join(names)} again")
        groups = [g for stage in range(len(STAGE_NAMES)) if (g := self._members(stage, names))]

        def start_again() -> None:
            for i, group in enumerate(groups):
                timeout = STAGE_TIMEOUT[STAGE_NAMES[group[0].stage]]
                if not self._start(group, time.monotonic() + timeout):
                    return
                if i + 1 < len(groups) and not self._wait_healthy(group, timeout):
                    return

        threading.Thread(target=start_again, name=f"start-again-{backend.host}", daemon=True).start()

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
        owner = self.owner.get(name)
        return owner.tail(name, size) if owner else None

    def _pids(self) -> dict[str, int]:
        """Each program's pid as last written to status.json (the aggregator's busy-or-hung question)."""
        status = self._written_status
        return {p.name: p.pid for p in status.processes if p.pid} if isinstance(status, StackStatus) else {}

    def _publish_status(self, reports: list[Report] | None = None) -> None:
        """Write state/status.json when anything `status` shows has changed."""
        try:
            rows = {r.name: r for r in (reports if reports is not None else self._reports())}
        except UnreachableError:
            return
        processes = tuple(
            ProcessStatus(
                name=p.name,
                pid=rows[p.name].pid if p.name in rows else 0,
                state=rows[p.name].state if p.name in rows else "UNKNOWN",
                started=rows[p.name].started if p.name in rows else 0.0,
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
        if not self._opened:
            return
        if self.daemon.alive():
            for stage in reversed(range(len(STAGE_NAMES))):
                members = self._members(stage)
                # Innermost back-end first: main's stage holds main and the zygote that forked it.
                for backend in reversed(self.backends):
                    group = [p for p in members if p.name in backend.names]
                    if group:
                        backend.stop([p.name for p in group])
                        self._wait_stopped(group)
            self._publish_status()
        self.daemon.close()
        log(f"stopped (exit code {self.exit_code})")

    def _wait_stopped(self, members: list[Program]) -> None:
        deadline = time.monotonic() + max((p.stop_wait for p in members), default=0) + 5
        while time.monotonic() < deadline:
            try:
                states = self._states()
            except UnreachableError:
                return
            if all(states.get(p.name, "UNKNOWN") in DONE_STATES for p in members):
                return
            time.sleep(0.1)


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def lock_runtime_dir(lock_file: str, runtime_dir: str) -> Any:
    """Hold an exclusive lock for the launcher's lifetime: one stack per runtime dir. The caller's load_plan
    accepted the runtime dir (new, empty or ours), so it is marked ours here: a start refused after locking
    (a port, a cluster of another PostgreSQL major) leaves a dir the next start and `check` accept, not one
    holding only a lock file they would take for someone else's."""
    import fcntl

    Path(runtime_dir).mkdir(parents=True, exist_ok=True)
    marker = Path(runtime_dir, RUNTIME_MARKER)
    if not marker.exists():
        marker.write_text(RUNTIME_MARKER_TEXT)
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
