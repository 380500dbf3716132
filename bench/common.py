"""Shared pieces for the benchmarks: machine facts, load waiting, stacks, memory, tables, statistics.

Run the benchmarks from the repository root with the project's venv Python, e.g.
    /opt/synapse-workers/venv/bin/python bench/startup_memory.py --runs 3
The stack harness (tests/support/stack.py) is reused; this module only adds what benchmarks need.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.stack import SW, Stack, make_root, process_table, stack_env  # noqa: E402

# Synapse rate-limits almost everything a benchmark does (sending, registering, joining, creating
# rooms). These go into homeserver.yaml before the first start; only benchmark stacks get them.
NO_RATE_LIMITS = {
    "rc_message": {"per_second": 10000, "burst_count": 10000},
    "rc_registration": {"per_second": 10000, "burst_count": 10000},
    "rc_login": {
        "address": {"per_second": 10000, "burst_count": 10000},
        "account": {"per_second": 10000, "burst_count": 10000},
        "failed_attempts": {"per_second": 10000, "burst_count": 10000},
    },
    "rc_joins": {
        "local": {"per_second": 10000, "burst_count": 10000},
        "remote": {"per_second": 10000, "burst_count": 10000},
    },
    "rc_joins_per_room": {"per_second": 10000, "burst_count": 10000},
    "rc_room_creation": {"per_second": 10000, "burst_count": 10000},
    "rc_invites": {
        "per_room": {"per_second": 10000, "burst_count": 10000},
        "per_user": {"per_second": 10000, "burst_count": 10000},
        "per_issuer": {"per_second": 10000, "burst_count": 10000},
    },
}

# ---- machine ---------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = "?"
    try:
        from synapse import __version__ as synapse_version
    except Exception:  # noqa: BLE001 - only for the header
        synapse_version = "?"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "os": f"Debian {debian}, kernel {platform.release()}",
        "python": platform.python_version(),
        "synapse": synapse_version,
    }


def print_header(title: str, args) -> None:
    m = machine()
    print(f"== {title} ==")
    print(f"date      {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"machine   {m['cpu']}, {m['cores']} cores, {m['ram']} RAM; {m['os']}")
    print(f"software  Python {m['python']}, Synapse {m['synapse']}")
    options = " ".join(f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items())
    print(f"options   {options}")
    print(f"load      {loadavg_text()} at start")
    print(flush=True)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def loadavg_text() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def busy_cores(interval: float = 1.0) -> float:
    """CPU in use over `interval`, in cores (all processes on the machine, ours included)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]), idle

    total0, idle0 = sample()
    time.sleep(interval)
    total1, idle1 = sample()
    if total1 == total0:
        return 0.0
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


TICKS = os.sysconf("SC_CLK_TCK")


def _machine_busy_ticks() -> int:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait


def _own_tree_ticks() -> int:
    """CPU used by this process and everything under it (living, plus reaped children via cutime)."""
    total = 0
    for pid in [os.getpid(), *descendants(os.getpid())]:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total


class CpuWindow:
    """CPU used on the machine by processes that are not ours (not this benchmark or its stacks),
    averaged in cores over the `with` block: the other work that may have disturbed a measurement."""

    def __enter__(self) -> CpuWindow:
        self.t0 = time.monotonic()
        self.busy0 = _machine_busy_ticks()
        self.ours0 = _own_tree_ticks()
        self.foreign = float("nan")
        return self

    def __exit__(self, *exc) -> None:
        elapsed = time.monotonic() - self.t0
        busy = _machine_busy_ticks() - self.busy0
        ours = _own_tree_ticks() - self.ours0
        if elapsed > 0:
            self.foreign = max(0.0, (busy - ours) / TICKS / elapsed)


class LoadLog:
    """Waits for a quiet machine before each measurement and remembers how quiet it was.

    The 1-minute load average lags (a stack we just stopped keeps it up for a minute), so "quiet" is
    judged on the CPU actually in use over one second: below `threshold` cores, waiting up to `max_wait`
    seconds. The load average is recorded alongside. All waits of one script together stay within
    `budget` seconds (then it waits at most 5 s), so a busy machine cannot stretch a run for ever.
    """

    def __init__(self, threshold: float = 0.5, max_wait: float = 60.0, budget: float = 300.0):
        self.threshold = threshold
        self.max_wait = max_wait
        self.budget = budget
        self.waited = 0.0
        self.samples: list[float] = []
        self.loads: list[float] = []

    def wait_quiet(self) -> float:
        started = time.monotonic()
        limit = self.max_wait if self.waited < self.budget else 5.0
        busy = busy_cores()
        while busy >= self.threshold and time.monotonic() - started < limit:
            busy = busy_cores()
        self.waited += time.monotonic() - started
        self.samples.append(busy)
        self.loads.append(loadavg())
        return busy

    @property
    def noisy(self) -> bool:
        return any(s >= self.threshold for s in self.samples)

    def summary(self) -> str:
        if not self.samples:
            return "load: no samples"
        text = (f"CPU busy before measurements (cores, 1 s sample): median {median(self.samples):.2f}, "
                f"max {max(self.samples):.2f} (wanted < {self.threshold}); 1-min load average: median "
                f"{median(self.loads):.2f}, max {max(self.loads):.2f}; waited {self.waited:.0f}s for quiet")
        if self.noisy:
            noisy = sum(s >= self.threshold for s in self.samples)
            text += (f"\nNOTE: other work kept the CPU busy (>= {self.threshold} cores) before {noisy} of "
                     f"{len(self.samples)} measurements even after waiting: those numbers may be noisy.")
        return text


# ---- statistics and tables --------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank style with linear interpolation; p in 0..100."""
    if not values:
        return float("nan")
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    k = (len(data) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def print_table(headers: list[str], rows: list[list], title: str | None = None) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(title)

    def line(row: list[str]) -> str:
        # first column left-aligned (labels), the rest right-aligned (numbers)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))
    print(flush=True)


# ---- stacks -----------------------------------------------------------------------------------------


class _Stack(Stack):
    """The harness's Stack with a cheaper readiness poll: one reused httpx client. A new httpx client per
    request (httpx.get) costs ~20 ms of CPU (it builds an SSL context), which on 2 cores would compete
    with the very start being measured."""

    _client: httpx.Client | None = None
    poll_interval = 0.05  # ready times to ~50 ms (the tests' 0.25 s rounds them up by up to a quarter second)

    def ready(self) -> bool:
        if self._client is None:
            self._client = httpx.Client(timeout=2)
        try:
            health = self._client.get(f"{self.base_url}/health")
            versions = self._client.get(f"{self.base_url}/_matrix/client/versions")
        except httpx.HTTPError:
            return False
        return health.status_code == 200 and versions.status_code == 200

    def close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class BenchStack:
    """One benchmark deployment: a temp root, `generate` (+ our homeserver.yaml additions), start/stop.

    Restarts reuse the same data dir and the same ports. Always call close() (it stops, kills what is
    left and removes the temp root).
    """

    def __init__(self, worker_types: str = "", homeserver_extra: dict | None = None, prefix: str = "sw-bench-",
                 **extra_env: str):
        self.root = make_root(prefix)
        self.env = stack_env(self.root, worker_types, **extra_env)
        self.homeserver_extra = homeserver_extra or {}
        self.stack: _Stack | None = None
        self.generated = False
        self.starts = 0
        self._plan: dict | None = None

    # -- setup
    def generate(self) -> None:
        """Write homeserver.yaml (and secrets) once, then append our keys: `run` never modifies it again."""
        result = subprocess.run([SW, "generate"], env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"synapse-workers generate failed:\n{result.stdout}\n{result.stderr}")
        if self.homeserver_extra:
            path = Path(self.env["SYNAPSE_CONFIG_DIR"], "homeserver.yaml")
            with open(path, "a", encoding="utf-8") as handle:
                handle.write("\n# Added by bench/common.py: benchmarks must not be rate-limited.\n")
                for key, value in self.homeserver_extra.items():
                    handle.write(f"{key}: {json.dumps(value)}\n")  # JSON is valid YAML
        self.generated = True

    def plan(self) -> dict:
        if self._plan is None:
            result = subprocess.run([SW, "plan", "--json"], env=self.env, capture_output=True, text=True, check=True)
            self._plan = json.loads(result.stdout)
        return self._plan

    def listener(self, process: str, kind: str) -> dict:
        plan = self.plan()
        procs = [plan["main"], *plan["workers"]]
        proc = next(p for p in procs if p["name"] == process)
        return next(lst for lst in proc["listeners"] if lst["kind"] == kind)

    def secret(self, name: str) -> str:
        server = self.env["SYNAPSE_SERVER_NAME"]
        return Path(self.env["SYNAPSE_DATA_DIR"], f"{server}.{name}.key").read_text().strip()

    # -- lifecycle
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.env['SYNAPSE_HTTP_PORT']}"

    def start(self, timeout: float = 900) -> float:
        """Start and wait for public /health and /_matrix/client/versions; returns seconds to ready."""
        if not self.generated:
            self.generate()
        self.stack = _Stack(self.env)
        self.starts += 1
        self._log_offset = self.stack.log_path.stat().st_size if self.stack.log_path.exists() else 0
        try:
            self.stack.start(timeout=timeout)
        except BaseException:
            self._hard_stop()
            if self.stack.log_path.exists():  # the whole log outlives the temp root: the reason is often early
                kept = Path(f"/tmp/sw-bench-failed-{time.strftime('%Y%m%d-%H%M%S')}.log")
                shutil.copy(self.stack.log_path, kept)
                print(f"  start failed: the stack's whole log is in {kept}", file=sys.stderr, flush=True)
            raise
        finally:
            if self.stack is not None:
                self.stack.close_client()
        return self.stack.ready_after or float("nan")

    def stop(self, timeout: float = 90) -> tuple[int, float]:
        """SIGTERM to `synapse-workers run`; returns (exit code, seconds until it exited)."""
        assert self.stack is not None
        try:
            code, seconds = self.stack.stop(timeout=timeout)
        finally:
            self._hard_stop()
        return code, seconds

    def stage_times(self) -> dict[str, float]:
        """The launcher's own "<stage>: ... healthy in X s" lines from the latest start."""
        if self.stack is None or not self.stack.log_path.exists():
            return {}
        with open(self.stack.log_path, "rb") as handle:
            handle.seek(getattr(self, "_log_offset", 0))
            text = handle.read().decode(errors="replace")
        stages = {}
        for match in re.finditer(r"^synapse-workers\s*\| (\w+): .* healthy in ([\d.]+)s$", text, re.M):
            stages.setdefault(match.group(1), float(match.group(2)))
        return stages

    def stop_detailed(self, timeout: float = 90) -> tuple[int, float, float]:
        """SIGTERM; returns (exit code, seconds until `run` exited, seconds until the last program —
        Synapse, nginx, Redis, PostgreSQL — was gone; supervisord and its log listener may outlive them)."""
        assert self.stack is not None and self.stack.proc is not None
        launcher = self.stack.proc.pid
        programs = [p for p in self.pids() if classify(p, launcher) in ("synapse", "nginx", "redis", "postgres")]
        started = time.monotonic()
        self.stack.proc.send_signal(signal.SIGTERM)
        programs_gone = float("nan")
        code = -1
        try:
            while time.monotonic() - started < timeout:
                if programs_gone != programs_gone and not any(_alive(p) for p in programs):
                    programs_gone = time.monotonic() - started
                if self.stack.proc.poll() is not None:
                    code = self.stack.proc.returncode
                    break
                time.sleep(0.02)
            total = time.monotonic() - started
        finally:
            self._hard_stop()
        return code, total, programs_gone

    def _hard_stop(self) -> None:
        if self.stack is None:
            return
        pids = self.pids()
        self.stack.kill()
        for pid in pids:  # descendants whose command line no longer names the root (postgres, nginx workers)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.stack = None

    def close(self) -> None:
        try:
            if self.stack is not None and self.stack.proc is not None and self.stack.proc.poll() is None:
                self.stop()
        finally:
            self._hard_stop()
            wait_gone = time.monotonic() + 10
            while time.monotonic() < wait_gone and _pids_under(self.root):
                time.sleep(0.2)
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> BenchStack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- processes and memory
    def pids(self) -> list[int]:
        """Every process of the stack: descendants of `synapse-workers run`, plus the harness's own scan."""
        if self.stack is None or self.stack.proc is None:
            return []
        found = set(descendants(self.stack.proc.pid))
        if self.stack.proc.poll() is None:
            found.add(self.stack.proc.pid)
        found.update(self.stack.leftovers())
        return sorted(found)

    def memory(self) -> dict[str, dict[str, float]]:
        """kind → {"pss": MiB, "rss": MiB, "count": n} over every process of the stack, plus "total"."""
        launcher = self.stack.proc.pid if self.stack and self.stack.proc else -1
        result: dict[str, dict[str, float]] = {}
        for pid in self.pids():
            kind = classify(pid, launcher)
            usage = smaps_rollup(pid)
            if kind is None or usage is None:
                continue
            for key in (kind, "total"):
                slot = result.setdefault(key, {"pss": 0.0, "rss": 0.0, "count": 0})
                slot["pss"] += usage["pss"]
                slot["rss"] += usage["rss"]
                slot["count"] += 1
        return result


def descendants(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, proc in process_table().items():
        children.setdefault(proc.ppid, []).append(pid)
    found, todo = [], [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _pids_under(root: Path) -> list[int]:
    marker = str(root).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def classify(pid: int, launcher_pid: int) -> str | None:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return None
    if pid == launcher_pid:
        return "launcher"
    if "synapse.app." in cmdline:
        return "synapse"
    if "supervisor.supervisord" in cmdline or "supervisord" in exe or "synapse_workers.run.logprefix" in cmdline:
        return "supervisor"  # supervisord and its log-prefixing event listener
    if exe == "nginx" or cmdline.startswith("nginx"):
        return "nginx"
    if exe.startswith("redis"):
        return "redis"
    if exe == "postgres" or cmdline.startswith("postgres"):
        return "postgres"
    return "other"  # short-lived health checks (pg_isready, setpriv)


def smaps_rollup(pid: int) -> dict[str, float] | None:
    """PSS and RSS in MiB."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("Pss:", "Rss:"):
            values[parts[0][:-1].lower()] = int(parts[1]) / 1024
    if "pss" not in values:
        return None  # kernel threads, zombies
    return values


def stack_pids_alive(root: Path) -> list[int]:
    return _pids_under(root)
