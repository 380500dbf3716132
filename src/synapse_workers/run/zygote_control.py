"""The zygote back-end of process control (run/control.py): the Synapse processes the zygote forks (fork mode).

The zygote (`run/zygote.py`) is one of supervisord's programs, this back-end's `host`; the processes it forks
are asked for over its control socket (start, stop, status, ping) and reported in supervisord's terms, so
that `Stack` and `watch.observe` treat them like supervisord's programs. `call` sends one request (tests give
a fake one); `host_state` asks supervisord for the zygote program's state.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..programs import Program
from .control import Failure, read_tail
from .watch import UP, Report
from .zygote import call as socket_call
from .zygote import control_socket

Call = Callable[[dict[str, Any], float], Any]  # (request, timeout) → result; OSError/ValueError: no answer


class ZygoteControl:
    def __init__(
        self,
        host: str,
        names: Sequence[str],
        state_dir: str,
        call: Call,
        host_state: Callable[[str], str],
        cancelled: Callable[[], bool],
    ):
        self.host = host
        self.order = tuple(names)
        self.names = frozenset(names)
        self.state_dir = state_dir
        self.call = call
        self.host_state = host_state
        self.cancelled = cancelled
        self._last: dict[str, Report] = {}  # its last answer, kept while it does not answer

    def start(self, names: Sequence[str], deadline: float) -> Failure | None:
        """Ask the zygote to fork these: it answers once Synapse is imported, so ask until it does."""
        while not self.cancelled():
            try:
                self.call({"op": "start", "names": list(names)}, 5.0)
                return None
            except (OSError, ValueError) as exc:
                if self.host_state(self.host) == "FATAL" or time.monotonic() > deadline:
                    return Failure(self.host, f"{self.host} (which forks {', '.join(names)}) does not answer: {exc}.")
            time.sleep(0.05)
        return None

    def stop(self, names: Sequence[str]) -> None:
        with contextlib.suppress(OSError, ValueError):  # a zygote that does not answer has no children left
            self.call({"op": "stop", "names": list(names)}, 5.0)

    def reports(self, earlier: Mapping[str, Report]) -> list[Report]:
        """A zygote that is not up has no children (they die with it); one that does not answer right now
        keeps its last report, unless it is still starting (importing Synapse): then none is started yet."""
        host = earlier.get(self.host)
        stopped = [Report(n, "STOPPED", 0) for n in self.order]
        if host is None or host.state not in UP:
            self._last = {}
            return stopped
        try:
            rows = self.call({"op": "status"}, 2.0)
            answered = [Report(r["name"], r["state"], r["pid"], r["exitstatus"], float(r["start"])) for r in rows]
        except (OSError, ValueError):
            if host.state != "STARTING":
                return list(self._last.values())
            answered = stopped
        self._last = {r.name: r for r in answered}
        return answered

    def tail(self, name: str, size: int) -> str | None:
        # Its output reaches supervisord as the zygote's (`name|line`): the output listener captures it per name.
        return read_tail(f"{self.state_dir}/{name}.log", size)

    def checks(self) -> Mapping[str, Callable[[], str | None]]:
        return {self.host: self.ping}  # the zygote's health: an answer on its socket (no `--ping` process)

    def ping(self) -> str | None:
        try:
            self.call({"op": "ping"}, 2.0)
        except (OSError, ValueError) as exc:
            return str(exc)
        return None


def zygote_controls(
    sockets_dir: str,
    state_dir: str,
    supervised: Sequence[Program],
    host_state: Callable[[str], str],
    cancelled: Callable[[], bool],
) -> list[ZygoteControl]:
    """A back-end for each supervised program that forks processes itself (fork mode: the zygote)."""
    path = control_socket(sockets_dir)

    def call(request: dict[str, Any], timeout: float) -> Any:
        return socket_call(path, request, timeout)

    return [
        ZygoteControl(p.name, [c.name for c in p.children], state_dir, call, host_state, cancelled)
        for p in supervised
        if p.children
    ]
