"""What the internal nginx costs per request: GET /_matrix/client/versions, direct vs through nginx.

Two monolith stacks: one with TCP listeners (nginx → main over loopback TCP), one with
SYNAPSE_PUBLIC_UNIX_SOCKETS=1 (main's public listener is a unix socket; nginx proxies to it). For each,
the client talks to main's public listener directly (TCP port or unix socket, httpx
HTTPTransport(uds=...)) or to nginx's public TCP port. The client is the same keep-alive httpx client in
every case, so its own cost (~0.2-0.5 ms per request in Python) is in every number alike.

Sequential: one client, --requests requests after --warmup; p50/p90/p99 latency and requests/s.
Concurrent: --concurrency httpx.AsyncClient tasks sharing --requests requests; requests/s and latency.
Each (stack, path) measurement is repeated --runs times, interleaved; the table shows medians over runs.

    /opt/synapse-workers/venv/bin/python bench/proxy_overhead.py --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchStack, CpuWindow, LoadLog, fmt, median, percentile, print_header, print_table  # noqa: E402

PATH = "/_matrix/client/versions"


def sequential(make_client, n: int, warmup: int) -> dict:
    with make_client() as client:
        for _ in range(warmup):
            client.get(PATH).raise_for_status()
        latencies = []
        started = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            response = client.get(PATH)
            latencies.append(time.perf_counter() - t0)
            if response.status_code != 200:
                raise RuntimeError(f"GET {PATH}: HTTP {response.status_code}")
        elapsed = time.perf_counter() - started
    return summarize(latencies, elapsed)


async def _concurrent(make_client, n: int, warmup: int, concurrency: int) -> dict:
    latencies: list[float] = []
    per_task = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    clients = [make_client() for _ in range(concurrency)]
    try:
        for client in clients:  # open the connections
            for _ in range(max(1, warmup // concurrency)):
                (await client.get(PATH)).raise_for_status()

        async def worker(client, count: int) -> None:
            for _ in range(count):
                t0 = time.perf_counter()
                response = await client.get(PATH)
                latencies.append(time.perf_counter() - t0)
                if response.status_code != 200:
                    raise RuntimeError(f"GET {PATH}: HTTP {response.status_code}")

        started = time.perf_counter()
        await asyncio.gather(*(worker(c, k) for c, k in zip(clients, per_task, strict=True)))
        elapsed = time.perf_counter() - started
    finally:
        for client in clients:
            await client.aclose()
    return summarize(latencies, elapsed)


def concurrent(make_client, n: int, warmup: int, concurrency: int) -> dict:
    return asyncio.run(_concurrent(make_client, n, warmup, concurrency))


def summarize(latencies: list[float], elapsed: float) -> dict:
    ms = [x * 1000 for x in latencies]
    return {"p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
            "rps": len(ms) / elapsed}


def clients_for(stack: BenchStack) -> dict[str, tuple]:
    """label → (sync client factory, async client factory)."""
    public = stack.listener("main", "public")
    limits = httpx.Limits(max_keepalive_connections=1, max_connections=1)
    if public.get("path"):
        uds = public["path"]
        direct = (
            lambda: httpx.Client(base_url="http://localhost", transport=httpx.HTTPTransport(uds=uds), timeout=10),
            lambda: httpx.AsyncClient(base_url="http://localhost", transport=httpx.AsyncHTTPTransport(uds=uds),
                                      timeout=10),
        )
        direct_label = "direct (unix socket)"
    else:
        url = f"http://{public['host']}:{public['port']}"
        direct = (lambda: httpx.Client(base_url=url, timeout=10, limits=limits),
                  lambda: httpx.AsyncClient(base_url=url, timeout=10, limits=limits))
        direct_label = "direct (TCP)"
    nginx = (lambda: httpx.Client(base_url=stack.base_url, timeout=10, limits=limits),
             lambda: httpx.AsyncClient(base_url=stack.base_url, timeout=10, limits=limits))
    return {direct_label: direct, "via nginx (TCP)": nginx}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions of every measurement (default 3)")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per measurement")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients (0: skip)")
    args = parser.parse_args()
    print_header("proxy overhead: GET /_matrix/client/versions", args)

    load = LoadLog()
    # (stack label, path label, mode) → list of summaries
    samples: dict[tuple[str, str, str], list[dict]] = {}
    order: list[tuple[str, str, str]] = []
    for stack_label, extra in (("TCP listeners", {}), ("unix sockets", {"SYNAPSE_PUBLIC_UNIX_SOCKETS": "1"})):
        with BenchStack("", prefix="sw-bp-", **extra) as stack:
            print(f"  {stack_label}: starting a monolith", file=sys.stderr, flush=True)
            stack.start()
            targets = clients_for(stack)
            for run in range(args.runs):
                for path_label, (sync_factory, async_factory) in targets.items():
                    # B023: these closures are called (and dropped) within this iteration, below
                    modes = [("sequential", lambda: sequential(sync_factory, args.requests, args.warmup))]  # noqa: B023
                    if args.concurrency:
                        modes.append((f"{args.concurrency} concurrent",
                                      lambda: concurrent(async_factory, args.requests, args.warmup,  # noqa: B023
                                                         args.concurrency)))
                    for mode, measure in modes:
                        key = (stack_label, path_label, mode)
                        if key not in samples:
                            samples[key] = []
                            order.append(key)
                        busy = load.wait_quiet()
                        with CpuWindow() as window:
                            result = measure()
                        result["foreign"] = window.foreign
                        samples[key].append(result)
                        print(f"  run {run + 1}: {stack_label} / {path_label} / {mode}: p50 {result['p50']:.3f} ms, "
                              f"{result['rps']:.0f} req/s (CPU busy {busy:.2f} cores before; "
                              f"other work {window.foreign:.2f} cores during)", file=sys.stderr, flush=True)
            stack.stop()

    rows = []
    for key in order:
        runs = samples[key]
        rows.append([*key, *(fmt(median([r[s] for r in runs]), 3) for s in ("p50", "p90", "p99")),
                     fmt(median([r["rps"] for r in runs]), 0), fmt(max(r["foreign"] for r in runs), 2)])
    print_table(["stack", "client talks to", "mode", "p50 ms", "p90 ms", "p99 ms", "req/s", "other CPU max"], rows,
                title=f"GET {PATH}, {args.requests} requests per measurement, median of {args.runs} runs")

    # nginx's cost per request: median latency via nginx minus direct, per stack and mode.
    rows = []
    for stack_label in dict.fromkeys(k[0] for k in order):
        for mode in dict.fromkeys(k[2] for k in order):
            direct = [k for k in order if k[0] == stack_label and k[2] == mode and k[1].startswith("direct")]
            via = [k for k in order if k[0] == stack_label and k[2] == mode and k[1].startswith("via")]
            if not direct or not via:
                continue
            d = median([r["p50"] for r in samples[direct[0]]])
            v = median([r["p50"] for r in samples[via[0]]])
            dr = median([r["rps"] for r in samples[direct[0]]])
            vr = median([r["rps"] for r in samples[via[0]]])
            rows.append([stack_label, mode, fmt(v - d, 3), f"{(v - d) / d * 100:+.0f}%",
                         f"{(vr - dr) / dr * 100:+.0f}%"])
    print_table(["stack", "mode", "nginx adds (p50 ms)", "latency", "req/s"], rows,
                title="nginx vs direct (p50 latency difference; relative change in latency and throughput)")
    print(load.summary())
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
