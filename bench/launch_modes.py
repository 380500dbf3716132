"""Both launch modes in one run (SYNAPSE_LAUNCH_MODE=process and =fork) on the Complement set and on `full`.

For each topology and mode: a fresh temp root (embedded PostgreSQL, rate limits lifted as in messaging.py);
the first start (initdb, schema) is a warm-up; then --runs restarts on the same data dir, each measuring:
  ready        launch of `synapse-workers run` → public /health and /_matrix/client/versions answer 200
  CPU s        user+system CPU seconds of every Synapse process (in fork mode including the zygote, which
               did the one import) --idle seconds after ready
  PSS / RSS    of every Synapse process (zygote included), --idle seconds after ready (/proc/<pid>/smaps_rollup)
  kill → serve SIGKILL of a worker (each of --kill, one after another, each after its start_secs) until its
               own /health answers 200 again from a new PID (polled every 10 ms)
After the last restart: messaging throughput through nginx (messaging.py's rounds: N senders, one room each,
a receiver long-polling /sync).

    /opt/synapse-workers/venv/bin/python bench/launch_modes.py --runs 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import NO_RATE_LIMITS, BenchStack, CpuWindow, LoadLog, classify, fmt, median, print_header, print_table  # noqa: E402
from messaging import run_topology  # noqa: E402
from startup_memory import COMPLEMENT  # noqa: E402

TOPOLOGIES = {"complement": COMPLEMENT, "full": "full"}
MODES = ("process", "fork")
TICKS = os.sysconf("SC_CLK_TCK")


def synapse_pids(stack: BenchStack) -> list[int]:
    launcher = stack.stack.proc.pid if stack.stack and stack.stack.proc else -1
    return [pid for pid in stack.pids() if classify(pid, launcher) == "synapse"]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime stime
    return total / TICKS


def status(stack: BenchStack) -> dict[str, dict]:
    doc = json.loads(Path(stack.env["SYNAPSE_RUNTIME_DIR"], "state", "status.json").read_text())
    return {p["name"]: p for p in doc["processes"]}


def kill_and_time(stack: BenchStack, name: str, timeout: float = 60) -> float:
    """SIGKILL `name` once it has run past its start_secs; seconds until its /health answers from a new PID."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = status(stack)[name]
        if row["state"] == "RUNNING" and row["pid"]:
            break
        time.sleep(0.2)
    row = status(stack)[name]
    url, old = row["health"]["target"], row["pid"]
    with httpx.Client(timeout=1) as client:
        killed = time.monotonic()
        os.kill(old, signal.SIGKILL)
        while time.monotonic() - killed < timeout:
            try:
                if client.get(url).status_code == 200 and _alive_other_than(stack, name, old):
                    return time.monotonic() - killed
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
    return float("nan")


def _alive_other_than(stack: BenchStack, name: str, old: int) -> bool:
    try:
        os.kill(old, 0)
        return False  # the old one still answers (not reaped yet)
    except ProcessLookupError:
        return True


def measure(topology: str, workers: str, mode: str, args, load: LoadLog) -> dict:
    result: dict = {"topology": topology, "mode": mode, "ready": [], "cpu": [], "pss": [], "rss": [], "kills": {},
                    "procs": 0, "foreign": []}
    with BenchStack(workers, homeserver_extra=NO_RATE_LIMITS, prefix="sw-bl-", SYNAPSE_LAUNCH_MODE=mode) as stack:
        load.wait_quiet()
        result["first_start"] = stack.start()
        stack.stop()
        for run in range(args.runs):
            load.wait_quiet()
            with CpuWindow() as window:
                result["ready"].append(stack.start())
            result["foreign"].append(window.foreign)
            time.sleep(args.idle)
            pids = synapse_pids(stack)
            result["procs"] = len(pids)
            result["cpu"].append(cpu_seconds(pids))
            memory = stack.memory().get("synapse", {})
            result["pss"].append(memory.get("pss", 0.0))
            result["rss"].append(memory.get("rss", 0.0))
            for name in args.kill:
                result["kills"].setdefault(name, []).append(kill_and_time(stack, name))
            print(f"  {topology} {mode} run {run + 1}: ready {result['ready'][-1]:.2f}s, CPU {result['cpu'][-1]:.1f}s, "
                  f"PSS {result['pss'][-1]:.0f} MiB, RSS {result['rss'][-1]:.0f} MiB, kill→serve "
                  + ", ".join(f"{n} {v[-1]:.2f}s" for n, v in result["kills"].items())
                  + f" (other CPU {window.foreign:.2f} cores during start)", file=sys.stderr, flush=True)
            if run == args.runs - 1 and args.clients:
                result["messaging"] = asyncio.run(run_topology(stack, args.clients, args.messages, 1, False, load))
            stack.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="restarts measured per topology and mode (default 2)")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds after ready before CPU and memory")
    parser.add_argument("--only", choices=list(TOPOLOGIES), action="append", help="limit to these topologies")
    parser.add_argument("--kill", default="synchrotron1,event_persister1", help="workers to SIGKILL, in turn")
    parser.add_argument("--clients", default="4,16", help="messaging: concurrent senders ('' to skip)")
    parser.add_argument("--messages", type=int, default=25, help="messaging: messages per sender")
    args = parser.parse_args()
    args.kill = [k for k in args.kill.split(",") if k]
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    print_header("launch modes: separate processes vs import once and fork", args)

    load = LoadLog()
    results = []
    for topology, workers in TOPOLOGIES.items():
        if args.only and topology not in args.only:
            continue
        for mode in MODES:
            print(f"  {topology} ({mode}): starting", file=sys.stderr, flush=True)
            results.append(measure(topology, workers, mode, args, load))

    rows = []
    for r in results:
        rows.append([
            r["topology"], r["mode"], r["procs"], fmt(r["first_start"]), fmt(median(r["ready"]), 2),
            f"{min(r['ready']):.2f}-{max(r['ready']):.2f}", fmt(median(r["cpu"]), 1), fmt(median(r["pss"]), 0),
            fmt(median(r["rss"]), 0),
            *[fmt(median(r["kills"].get(n, [float("nan")])), 2) for n in args.kill],
            fmt(median(r["foreign"]), 2),
        ])
    print_table(
        ["topology", "mode", "Synapse procs", "first start s", "ready s (median)", "ready min-max",
         f"Synapse CPU s at +{args.idle:.0f}s", "Synapse PSS MiB", "Synapse RSS MiB",
         *[f"{n} kill→serve s" for n in args.kill], "other CPU"],
        rows, title=f"Start, CPU, memory ({args.idle:.0f}s after ready) and recovery; median of {args.runs} restarts",
    )
    if args.clients:
        rows = []
        for r in results:
            for n, m in r.get("messaging", {}).items():
                rows.append([r["topology"], r["mode"], n, fmt(m["rate"]), fmt(median(m["send_ms"]), 0),
                             fmt(median(m["delivery_ms"]), 0), m["undelivered"], m["lost"]])
        print_table(["topology", "mode", "senders", "sends/s", "send p50 ms", "delivery p50 ms", "undelivered", "lost"],
                    rows, title=f"Messaging through nginx ({args.messages} messages per sender, one room each)")
    print("Synapse procs: processes counted as Synapse "
          "(fork mode: the zygote that imported Synapse, plus its children).")
    print(load.summary())
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
