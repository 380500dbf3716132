"""How many CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota.

nginx's own `worker_processes auto` counts online CPUs and ignores a container's quota (`--cpus=1` on a
16-core host gives 16 workers). With `NGINX_WORKER_PROCESSES=auto` we count ourselves when nginx starts:

- cgroup v2: `cpu.max` ("QUOTA PERIOD" or "max PERIOD") of our cgroup and of every ancestor up to the
  mount's root; the smallest quota wins.
- cgroup v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us` (quota -1: none) in the `cpu` hierarchy, same walk.

A quota of 1.5 CPUs gives 2 (rounded up: the quota is time, not cores), never more than the affinity mask
and never less than 1. The parsers are pure; `usable_cpus()` reads /proc and /sys.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path


def quota_v2(cpu_max: str) -> float | None:
    """CPUs granted by a cgroup v2 `cpu.max` text ("max 100000" → None, "50000 100000" → 0.5)."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def quota_v1(quota_us: str, period_us: str) -> float | None:
    """CPUs granted by cgroup v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us` (quota -1: unlimited)."""
    try:
        quota, period = int(quota_us), int(period_us)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpus_from(affinity: int, quotas: list[float]) -> int:
    """The CPUs to use: the affinity mask's count, capped by the smallest quota rounded up; at least 1."""
    count = max(affinity, 1)
    if quotas:
        count = min(count, math.ceil(min(quotas)))
    return max(count, 1)


def cgroup_paths(proc_cgroup: str) -> dict[str, str]:
    """/proc/self/cgroup → {"": v2 path, "cpu": v1 cpu path, ...} (v1 lines list their controllers)."""
    paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for controller in controllers.split(","):
            if controller:
                paths[controller] = path
    return paths


def cgroup_mounts(mountinfo: str) -> dict[str, tuple[str, str]]:
    """/proc/self/mountinfo → {"": (root, mount point) of cgroup2, "cpu": (root, mount point) of v1's cpu}."""
    mounts: dict[str, tuple[str, str]] = {}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point, fstype, options = fields[3], fields[4], tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            mounts.setdefault("", (root, point))
        elif fstype == "cgroup" and "cpu" in options:
            mounts.setdefault("cpu", (root, point))
    return mounts


def _walk(root: str, point: str, path: str) -> Iterator[Path]:
    """Our cgroup's directory, then each ancestor, up to the mount point."""
    relative = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
    here = Path(point) / ("" if relative == "." else relative)
    top = Path(point)
    while True:
        yield here
        if here == top or top not in here.parents:
            return
        here = here.parent


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_quotas(proc: Path = Path("/proc/self")) -> list[float]:
    """Every CPU quota on the way from our cgroup to its hierarchy's root (v2 and v1 cpu)."""
    paths = cgroup_paths(_read(proc / "cgroup") or "")
    mounts = cgroup_mounts(_read(proc / "mountinfo") or "")
    quotas: list[float] = []
    if "" in paths and "" in mounts:
        for folder in _walk(*mounts[""], paths[""]):
            text = _read(folder / "cpu.max")
            if text is not None and (q := quota_v2(text)) is not None:
                quotas.append(q)
    if "cpu" in paths and "cpu" in mounts:
        for folder in _walk(*mounts["cpu"], paths["cpu"]):
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota is not None and period is not None and (q := quota_v1(quota, period)) is not None:
                quotas.append(q)
    return quotas


def usable_cpus() -> int:
    return cpus_from(len(os.sched_getaffinity(0)), cgroup_quotas())
