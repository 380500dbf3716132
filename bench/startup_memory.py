"""Startup time, idle memory and stop time of a whole `synapse-workers run` stack, for three topologies.

For each topology: a fresh temp root with the embedded PostgreSQL; the first start (initdb, database
creation, Synapse's schema) is a warm-up reported on its own; then --runs restarts on the same data dir.
Ready = the public port answers /health and /_matrix/client/versions with 200 (polled every 0.05 s).
Memory is read ~--idle seconds after ready from /proc/<pid>/smaps_rollup of every process of the stack.
Stop = SIGTERM to `synapse-workers run` until it has exited (it stops everything in reverse order).

    /opt/synapse-workers/venv/bin/python bench/startup_memory.py --runs 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchStack, CpuWindow, LoadLog, fmt, median, print_header, print_table  # noqa: E402

COMPLEMENT = (
    "event_persister:2, background_worker, event_creator, user_dir, media_repository, federation_inbound, "
    "federation_reader, federation_sender, synchrotron, client_reader, appservice, pusher, device_lists:2, "
    "stream_writers=account_data+presence+receipts+to_device+typing"
)
TOPOLOGIES = {
    "monolith": "",
    "2 workers": "synchrotron, event_persister",
    "complement": COMPLEMENT,
}
KINDS = ("synapse", "nginx", "redis", "postgres", "supervisor", "launcher", "other")


def measure(name: str, workers: str, runs: int, idle: float, load: LoadLog) -> dict:
    result: dict = {"name": name, "ready": [], "stop": [], "codes": [], "mem": [], "loads": [], "foreign": [],
                    "gone": [], "stages": []}
    with BenchStack(workers, prefix="sw-bm-") as stack:
        result["synapse_procs"] = 1 + len(stack.plan()["workers"])
        result["first_load"] = load.wait_quiet()
        with CpuWindow() as window:
            result["first_start"] = stack.start()
        result["first_foreign"] = window.foreign
        code, result["first_stop"], _ = stack.stop_detailed()
        result["codes"].append(code)
        for i in range(runs):
            result["loads"].append(load.wait_quiet())
            with CpuWindow() as window:
                result["ready"].append(stack.start())
            result["foreign"].append(window.foreign)
            time.sleep(idle)
            result["stages"].append(stack.stage_times())  # after the idle wait: nginx's line may come late
            result["mem"].append(stack.memory())
            code, seconds, gone = stack.stop_detailed()
            result["codes"].append(code)
            result["stop"].append(seconds)
            result["gone"].append(gone)
            print(f"  {name}: restart {i + 1}/{runs}: ready {result['ready'][-1]:.2f}s, stop {seconds:.2f}s "
                  f"(programs gone after {gone:.2f}s), "
                  f"PSS {result['mem'][-1]['total']['pss']:.0f} MiB "
                  f"(CPU busy {result['loads'][-1]:.2f} cores before; other work "
                  f"{window.foreign:.2f} during start)",
                  file=sys.stderr, flush=True)
    return result


def mem(result: dict, kind: str, key: str = "pss") -> float:
    values = [m.get(kind, {}).get(key, 0.0) for m in result["mem"]]
    return median(values)


def count(result: dict, kind: str) -> int:
    return int(median([m.get(kind, {}).get("count", 0) for m in result["mem"]]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="restarts measured per topology (default 3)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds after ready before reading memory")
    parser.add_argument("--only", choices=list(TOPOLOGIES), action="append", help="limit to these topologies")
    args = parser.parse_args()
    print_header("startup time, idle memory, stop time", args)

    load = LoadLog()
    results = []
    for name, workers in TOPOLOGIES.items():
        if args.only and name not in args.only:
            continue
        print(f"  {name}: starting ({workers or 'no workers'})", file=sys.stderr, flush=True)
        results.append(measure(name, workers, args.runs, args.idle, load))

    rows = []
    for r in results:
        ready = r["ready"]
        rows.append([
            r["name"], r["synapse_procs"], fmt(r["first_start"]), fmt(median(ready), 2),
            f"{min(ready):.2f}-{max(ready):.2f}", fmt(r["first_stop"], 2), fmt(median(r["stop"]), 2),
            fmt(median(r["gone"]), 2),
            "ok" if all(c == 0 for c in r["codes"]) else f"codes {r['codes']}",
            f"{r['first_foreign']:.2f} / {median(r['foreign']):.2f}",
        ])
    print_table(
        ["topology", "synapse procs", "first start s", "restart s (median)", "restart min-max",
         "first stop s", "stop s (median)", "programs gone s", "exit", "other CPU first/restart"],
        rows, title=f"Start to ready and SIGTERM to exited, seconds ({args.runs} restarts each); other CPU = cores "
                    "used by other work on the machine while starting",
    )

    stages = ("postgres", "redis", "main", "workers", "nginx")
    rows = []
    for r in results:
        row = [r["name"]]
        for stage in stages:
            values = [st[stage] for st in r["stages"] if stage in st]
            row.append(fmt(median(values), 1) if values else "-")
        rows.append([*row, fmt(median(r["ready"]), 2)])
    print_table(["topology", *stages, "ready (ours)"], rows,
                title="Restart by stage: the launcher's own 'healthy in' times, seconds (median); stages run one "
                      "after another")

    rows = []
    for r in results:
        rows.append([r["name"], count(r, "total"), fmt(mem(r, "total"), 0), fmt(mem(r, "total", "rss"), 0),
                     fmt(mem(r, "synapse") / max(1, count(r, "synapse")), 0)])
    print_table(
        ["topology", "processes", "PSS MiB", "RSS MiB", "PSS per Synapse proc"],
        rows, title=f"Idle memory of the whole stack, {args.idle:.0f}s after ready (median over restarts)",
    )

    rows = []
    for r in results:
        row = [r["name"]]
        for kind in ("synapse", "nginx", "redis", "postgres"):
            n = count(r, kind)
            row.append(f"{mem(r, kind):.0f} ({n})" if n else "-")
        sup = mem(r, "supervisor") + mem(r, "launcher")
        row.append(f"{sup:.0f} ({count(r, 'supervisor') + count(r, 'launcher')})")
        row.append(f"{mem(r, 'other'):.0f} ({count(r, 'other')})" if count(r, "other") else "-")
        rows.append(row)
    print_table(
        ["topology", "Synapse", "nginx", "Redis", "PostgreSQL", "supervisor+launcher", "other"],
        rows, title="PSS by component, MiB (number of processes)",
    )
    rows = []
    for r in results:
        row = [r["name"]]
        for kind in ("synapse", "nginx", "redis", "postgres"):
            row.append(f"{mem(r, kind, 'rss'):.0f}" if count(r, kind) else "-")
        row.append(f"{mem(r, 'supervisor', 'rss') + mem(r, 'launcher', 'rss'):.0f}")
        rows.append(row)
    print_table(["topology", "Synapse", "nginx", "Redis", "PostgreSQL", "supervisor+launcher"], rows,
                title="RSS by component, MiB (RSS double-counts shared pages, e.g. PostgreSQL shared buffers)")
    print("stop s: SIGTERM to `synapse-workers run` until it exited; programs gone s: until the last Synapse,\n"
          "nginx, Redis and PostgreSQL process had exited (supervisord and its log listener stop after them).\n")
    print(load.summary())
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
