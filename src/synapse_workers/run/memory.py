"""The memory we may use, read from /proc and the cgroup filesystem (the edge of `memory.memory_warning`).

- /proc/meminfo: MemTotal and MemAvailable.
- cgroup v2: `memory.max` ("max" or bytes) of our cgroup and of every ancestor up to the mount's root.
- cgroup v1: `memory.limit_in_bytes` in the `memory` hierarchy, same walk (an unlimited one reads as a
  number near 2^63, which is larger than any machine and so never the smallest).
The smallest limit wins, as the kernel enforces each. The parsers are pure; `read_limits()` reads.
"""

from __future__ import annotations

from pathlib import Path

from ..memory import MemoryLimits
from .cpus import _read, _walk, cgroup_mounts, cgroup_paths

MIB = 1024 * 1024


def meminfo(text: str) -> tuple[int | None, int | None]:
    """/proc/meminfo → (MemTotal, MemAvailable) in MiB."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if name in ("MemTotal", "MemAvailable") and parts and parts[0].isdigit():
            values[name] = int(parts[0]) // 1024  # kB
    return values.get("MemTotal"), values.get("MemAvailable")


def limit_mib(text: str) -> int | None:
    """A cgroup memory limit file ("max", or bytes) → MiB; None when unlimited or unreadable."""
    text = text.strip()
    if not text.isdigit():
        return None  # "max" (v2)
    value = int(text)
    return value // MIB if value < 1 << 62 else None  # v1's "unlimited" is PAGE_COUNTER_MAX pages in bytes


def cgroup_memory_limit(proc: Path = Path("/proc/self")) -> int | None:
    """The smallest memory limit on the way from our cgroup to its hierarchy's root (v2, and v1 memory), MiB."""
    paths = cgroup_paths(_read(proc / "cgroup") or "")
    mounts = _memory_mounts(_read(proc / "mountinfo") or "")
    limits: list[int] = []
    for key, name in (("", "memory.max"), ("memory", "memory.limit_in_bytes")):
        if key in paths and key in mounts:
            for folder in _walk(*mounts[key], paths[key]):
                text = _read(folder / name)
                if text is not None and (mib := limit_mib(text)) is not None:
                    limits.append(mib)
    return min(limits) if limits else None


def _memory_mounts(mountinfo: str) -> dict[str, tuple[str, str]]:
    """cgroup2's mount (from `cpus.cgroup_mounts`) and v1's `memory` hierarchy."""
    mounts = {k: v for k, v in cgroup_mounts(mountinfo).items() if k == ""}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and len(fields) >= 5 and len(tail) >= 3 and tail[0] == "cgroup" and "memory" in tail[2].split(","):
            mounts.setdefault("memory", (fields[3], fields[4]))
    return mounts


def read_limits(now: bool, proc: Path = Path("/proc")) -> MemoryLimits:
    """now: compare with MemAvailable too (`run`, before the stack starts); `check` may run beside the stack,
    whose own memory is not available, so it compares with the ceilings only."""
    total, available = meminfo(_read(proc / "meminfo") or "")
    return MemoryLimits(total, available if now else None, cgroup_memory_limit(proc / "self"))
