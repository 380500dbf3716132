"""Whether the Synapse processes of a worker list fit the memory we may use: the decision, pure.

The numbers are measured, idle, 10-20 s after ready (docs/benchmarks.md, Synapse 1.163.2, Debian 12):
- separate processes (`SYNAPSE_LAUNCH_MODE=process`): 1489 MiB PSS for the 17 of the Complement set, 88 MiB
  each (104 MiB for a lone monolith);
- forked (`fork`, with jemalloc): 697 MiB for the same 17 plus the zygote, 41 MiB per Synapse process;
- the rest of the stack (PostgreSQL, Redis, nginx, supervisord, the launcher and its log listener): 100-175 MiB.
Under traffic every process grows (caches), so an idle total that does not fit will not fit later either.
What we may use is read at the edge (`run/memory.py`): MemTotal, MemAvailable and the smallest cgroup memory limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import Problem, Variable

WORKER_TYPES, LAUNCH_MODE = Variable("SYNAPSE_WORKER_TYPES"), Variable("SYNAPSE_LAUNCH_MODE")
SYNAPSE_PSS_MIB = {"fork": 41, "process": 88}  # per Synapse process, idle (see above)
STACK_PSS_MIB = 175  # PostgreSQL, Redis, nginx and the supervision layer, idle (the measured maximum)


@dataclass(frozen=True)
class MemoryLimits:
    """What this machine gives us, in MiB; None where unknown or unlimited."""

    total: int | None  # /proc/meminfo MemTotal
    available: int | None  # MemAvailable (None: not compared, as in `check` beside a running stack)
    cgroup_limit: int | None  # the smallest cgroup memory limit from our cgroup up to the root


def estimate_mib(processes: int, mode: str) -> int:
    """Idle PSS of the stack with `processes` Synapse processes started in `mode` (fork or process)."""
    return processes * SYNAPSE_PSS_MIB[mode] + STACK_PSS_MIB


def memory_warning(processes: int, mode: str, limits: MemoryLimits) -> Problem | None:
    """A warning with the numbers when the estimate exceeds what we may use (the hard ceiling first: the cgroup
    limit or the machine's memory, whichever is smaller; then what is available now), else None."""
    need = estimate_mib(processes, mode)
    ceilings = [
        (limits.cgroup_limit, "the memory limit of this container or service (cgroup)"),
        (limits.total, "this machine has (MemTotal)"),
    ]
    known = [(mib, what) for mib, what in ceilings if mib is not None]
    ceiling = min(known) if known else None
    if ceiling is not None and need > ceiling[0]:
        have, what = ceiling
    elif limits.available is not None and need > limits.available:
        have, what = limits.available, "available now (MemAvailable)"
    else:
        return None
    per = SYNAPSE_PSS_MIB[mode]
    advice = "run fewer workers"
    if mode == "process":
        advice += f", or {LAUNCH_MODE}=fork ({SYNAPSE_PSS_MIB['fork']} MiB each)"
    return Problem(
        f"{WORKER_TYPES}: {processes} Synapse processes need about {need} MiB even when idle ({processes} x "
        f"{per} MiB measured in {mode} mode, docs/benchmarks.md, + {STACK_PSS_MIB} MiB for PostgreSQL, Redis, nginx "
        f"and supervision), more than the {have} MiB {what}: expect swapping or the OOM killer; {advice}.",
        WORKER_TYPES,
        expected=f"at most {have} MiB ({what})",
        found=f"about {need} MiB for {processes} Synapse processes",
        related=(LAUNCH_MODE,) if mode == "process" else (),
    )
