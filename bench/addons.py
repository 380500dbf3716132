"""What the built-in services cost: the same stack without and with every add-on, in one run.

Variants (same worker set, embedded PostgreSQL, fresh temp root each):
  base     no add-ons
  add-ons  SYNAPSE_METRICS (every Synapse process's metrics listener + Prometheus + nginx exporter),
           SYNAPSE_ENABLE_REDIS_METRIC_EXPORT, SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT, SYNAPSE_ENABLE_BUILTIN_COTURN
For each: the first start (initdb, schema) as a warm-up, then --runs restarts measuring
  ready          launch of `synapse-workers run` → public /health and /_matrix/client/versions answer 200
  add-on ready   each add-on's process start (/proc/<pid>/stat) → its own health check answers (polled from the
                 launch every 20 ms: Prometheus /-/ready, an exporter's /metrics, coturn a STUN binding)
  memory         PSS/RSS of each add-on and of every Synapse process --idle seconds after ready
  CPU            user+system CPU seconds over a --window second idle window after that, per add-on and for
                 all Synapse processes together: at idle, Synapse's extra CPU with add-ons is what answering
                 Prometheus's scrapes (every PROMETHEUS_SCRAPE_INTERVAL, default 15 s) costs it.

    /opt/synapse-workers/venv/bin/python bench/addons.py --runs 2
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchStack, CpuWindow, LoadLog, fmt, median, print_header, print_table, smaps_rollup  # noqa: E402
from launch_modes import TICKS, cpu_seconds, status, synapse_pids  # noqa: E402

WORKERS = "synchrotron, event_persister"
ADDONS = ("prometheus", "nginx_exporter", "redis_exporter", "postgres_exporter", "coturn")
ADDON_ENV = {
    "SYNAPSE_METRICS": "yes",
    "SYNAPSE_ENABLE_REDIS_METRIC_EXPORT": "yes",
    "SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT": "yes",
    "SYNAPSE_ENABLE_BUILTIN_COTURN": "yes",
    "COTURN_INTERNAL_IP": "127.0.0.1",
}


def stun_ok(target: str) -> bool:
    host, port = target.rsplit(":", 1)
    request = struct.pack("!HHI12s", 0x0001, 0, 0x2112A442, os.urandom(12))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.sendto(request, (host.strip("[]"), int(port)))
            return sock.recv(2048)[:2] == b"\x01\x01"
        except OSError:
            return False


def healthy(row: dict, client: httpx.Client) -> bool:
    health = row.get("health") or {}
    kind, target = health.get("kind"), health.get("target", "")
    if kind == "stun":
        return stun_ok(target)
    if kind == "http":
        try:
            return client.get(target).status_code == 200
        except httpx.HTTPError:
            return False
    return row.get("state") == "RUNNING"


def start_boottime(pid: int) -> float | None:
    """When the process started, in seconds since boot (CLOCK_BOOTTIME), from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[19]) / TICKS


class AddonWatch:
    """From the launch on, polls each add-on's own health check (targets from an earlier start's status.json)
    every 20 ms in a thread; then each add-on's start → healthy is its first healthy answer minus its
    process's start time (/proc/<pid>/stat, both on CLOCK_BOOTTIME)."""

    def __init__(self, rows: dict[str, dict], timeout: float = 120) -> None:
        self.rows, self.timeout = rows, timeout
        self.healthy_at: dict[str, float] = {}
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        deadline = time.monotonic() + self.timeout
        with httpx.Client(timeout=0.5) as client:
            while len(self.healthy_at) < len(self.rows) and time.monotonic() < deadline:
                for name, row in self.rows.items():
                    if name not in self.healthy_at and healthy(row, client):
                        self.healthy_at[name] = time.clock_gettime(time.CLOCK_BOOTTIME)
                time.sleep(0.02)

    def result(self, stack: BenchStack) -> dict[str, float]:
        self.thread.join(self.timeout)
        rows = status(stack)
        found = {}
        for name, at in self.healthy_at.items():
            started = start_boottime(rows[name]["pid"])
            if started is not None:
                found[name] = at - started
        return found


def pss_rss(pid: int) -> tuple[float, float]:
    usage = smaps_rollup(pid) or {"pss": float("nan"), "rss": float("nan")}
    return usage["pss"], usage["rss"]


def measure(variant: str, extra: dict[str, str], args, load: LoadLog) -> dict:
    result: dict = {"variant": variant, "ready": [], "addon_ready": {}, "mem": {}, "cpu": {}, "foreign": []}
    with BenchStack(WORKERS, prefix="sw-ba-", **extra) as stack:
        if "SYNAPSE_ENABLE_BUILTIN_COTURN" in extra:  # coturn's ports: free, and outside the internal range
            from tests.integration.test_coturn import coturn_ports

            base = int(stack.env["SYNAPSE_INTERNAL_PORT_BASE"])
            stack.env.update(coturn_ports(range(base, base + 120)))
        load.wait_quiet()
        result["first_start"] = stack.start()
        names = [n for n in ADDONS if n in status(stack)] if variant != "base" else []
        stack.stop()
        for run in range(args.runs):
            load.wait_quiet()
            watch = AddonWatch({name: status(stack)[name] for name in names})
            with CpuWindow() as window:
                result["ready"].append(stack.start())
            result["foreign"].append(window.foreign)
            time.sleep(args.idle)  # (status.json has every pid by then)
            for name, seconds in watch.result(stack).items():
                result["addon_ready"].setdefault(name, []).append(seconds)
            rows = status(stack)
            pids = {name: rows[name]["pid"] for name in names}
            synapse = synapse_pids(stack)
            for name, pid in pids.items():
                pss, rss = pss_rss(pid)
                result["mem"].setdefault(name, []).append((pss, rss))
            syn = [smaps_rollup(p) or {"pss": 0.0, "rss": 0.0} for p in synapse]  # synapse_pids: classified
            result["mem"].setdefault("Synapse (all)", []).append(
                (sum(u["pss"] for u in syn), sum(u["rss"] for u in syn))
            )
            before = {name: cpu_seconds([pid]) for name, pid in pids.items()}
            before["Synapse (all)"] = cpu_seconds(synapse)
            time.sleep(args.window)
            after = {name: cpu_seconds([pid]) for name, pid in pids.items()}
            after["Synapse (all)"] = cpu_seconds(synapse)
            for name in before:
                result["cpu"].setdefault(name, []).append(after[name] - before[name])
            print(
                f"  {variant} run {run + 1}: ready {result['ready'][-1]:.2f}s, "
                + ", ".join(f"{n} CPU {v[-1]:.2f}s" for n, v in result["cpu"].items())
                + f" (other CPU {window.foreign:.2f} cores during start)",
                file=sys.stderr,
                flush=True,
            )
            stack.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="restarts measured per variant (default 2)")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds after ready before memory and the CPU window")
    parser.add_argument("--window", type=float, default=120.0, help="idle CPU window in seconds (default 120)")
    args = parser.parse_args()
    print_header(f"built-in services: cost of the add-ons ({WORKERS}; embedded PostgreSQL)", args)
    load = LoadLog()
    base = measure("base", {}, args, load)
    addons = measure("add-ons", ADDON_ENV, args, load)

    print_table(
        ["variant", "first start s", "ready s (median)", "ready min-max", "other CPU"],
        [
            [
                r["variant"],
                fmt(r["first_start"]),
                fmt(median(r["ready"]), 2),
                f"{min(r['ready']):.2f}-{max(r['ready']):.2f}",
                fmt(median(r["foreign"]), 2),
            ]
            for r in (base, addons)
        ],
        title=f"Stack start, median of {args.runs} restarts",
    )
    rows = []
    per_minute = 60.0 / args.window
    for name in [*ADDONS, "Synapse (all)"]:
        for r in (base, addons):
            if name not in r["mem"] and name not in r["cpu"]:
                continue
            mem = r["mem"].get(name, [(float("nan"), float("nan"))])
            rows.append(
                [
                    name,
                    r["variant"],
                    fmt(median(r["addon_ready"].get(name, [float("nan")])), 2),
                    fmt(median([m[0] for m in mem]), 1),
                    fmt(median([m[1] for m in mem]), 1),
                    fmt(median(r["cpu"].get(name, [float("nan")])) * per_minute, 3),
                ]
            )
    print_table(
        ["process", "variant", "start → healthy s", "PSS MiB", "RSS MiB", "CPU s per minute (idle)"],
        rows,
        title=f"Each add-on, and Synapse without/with being scraped ({args.idle:.0f} s after ready; CPU over "
        f"{args.window:.0f} s; medians of {args.runs})",
    )
    print(load.summary())
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
