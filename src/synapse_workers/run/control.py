"""Process control: what `Stack` (run/supervise.py) asks of whatever runs its programs.

Two back-ends implement it: supervisord (`run/supervisord_control.py`: every program of the stack, driven over
XML-RPC) and, in fork mode, the zygote (`run/zygote_control.py`: the Synapse processes it forks, driven over its
control socket). The zygote is itself one of supervisord's programs, its `host`: the back-end that runs inside
a program. `Stack` knows only this interface; the back-ends never sequence, gate on health or decide.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .watch import Report


class UnreachableError(Exception):
    """The back-end cannot be asked right now (supervisord gone or not answering)."""


@dataclass(frozen=True)
class Failure:
    """A start that failed: the program to blame (its output is shown) and what happened."""

    name: str
    message: str


class Control(Protocol):
    @property
    def names(self) -> frozenset[str]:
        """The programs it runs."""
        ...

    @property
    def host(self) -> str | None:
        """The program it runs inside (one of an outer back-end's); None: the launcher starts it."""
        ...

    def start(self, names: Sequence[str], deadline: float) -> Failure | None:
        """Ask for these to be started. None once asked (their health is the caller's to wait for), or when the
        stack is being stopped meanwhile."""
        ...

    def stop(self, names: Sequence[str]) -> None:
        """Ask for these to be stopped; never raises (a back-end that is gone has stopped them)."""
        ...

    def reports(self, earlier: Mapping[str, Report]) -> list[Report]:
        """Each of its programs as it is now, in supervisord's terms. `earlier`: what the back-ends before it
        reported in this round (a nested back-end reads its host's row there). Unreachable if it cannot tell."""
        ...

    def tail(self, name: str, size: int) -> str | None:
        """The end of a program's captured output; None when there is none."""
        ...

    def checks(self) -> Mapping[str, Callable[[], str | None]]:
        """Health checks it answers itself, cheaper than the program's own (name → None when healthy, else why)."""
        ...


class Daemon(Control, Protocol):
    """The outermost back-end: a process the launcher starts itself and that everything else runs under."""

    def open(self) -> None:
        """Start it; RuntimeError if it does not come up."""
        ...

    def alive(self) -> bool:
        """Its process still runs (it can be asked to stop the programs)."""
        ...

    def close(self) -> None:
        """After every program stopped: make it exit, by force if it does not."""
        ...

    def kill(self) -> None:
        """Now: SIGKILL every program's process group and the daemon's."""
        ...


def read_tail(path: str, size: int) -> str | None:
    """The last `size` bytes of a capture file written by the output listener (run/logprefix.py)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - size))
            return handle.read().decode(errors="replace")
    except OSError:
        return None
