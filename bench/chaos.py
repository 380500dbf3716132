"""Chaos under load: recovery time per killed process kind and the error rate clients saw.

One stack (`synchrotron, event_persister, stream_writers=typing+to_device+receipts+account_data+presence`,
embedded PostgreSQL, Redis, nginx). --clients users chat in one room through the public port: each sends
messages one after another (PUT /send with a txn id; on an error or timeout the same txn id again, until
acknowledged) and long-polls /sync. Meanwhile each program of --kills is SIGKILLed in turn, each only once
the stack is healthy again and --between more sends were acknowledged. Afterwards the room is read back as
every member through /messages and checked: every acknowledged event exactly once, per-sender order, no
duplicated body. The driver is tests/support/chaos.py (tests/integration/test_chaos.py asserts on it).

  to first ack   kill → the first acknowledged send among requests started after the kill
  to health OK   kill → `synapse-workers health` exits 0 and `status` shows the program back (new PID)
  in flight      send attempts that had started before the kill and ended after it (the driver waits, up
                 to 5 s, until a send has been in flight for 10 ms before it kills: a request mid-way)
  failed         send attempts that ended between this kill and the next one and failed (HTTP error,
                 connection error or timeout); each was retried with the same txn id

    /opt/synapse-workers/venv/bin/python bench/chaos.py --clients 6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt, percentile, print_header, print_table  # noqa: E402  (also puts the repo on sys.path)
from tests.support.chaos import KILLS, WORKERS, run_chaos  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6, help="users chatting in the room (default 6)")
    parser.add_argument("--between", type=int, default=12,
                        help="acknowledged sends (all clients) after each recovery before the next kill")
    parser.add_argument("--interval", type=float, default=0.25, help="each sender's pause after an ack (s)")
    parser.add_argument("--request-timeout", type=float, default=20.0, help="bound of one send request (s)")
    parser.add_argument("--budget", type=float, default=300.0, help="bound of the whole chaos phase (s)")
    parser.add_argument("--kills", default=",".join(KILLS), help="programs to SIGKILL, in order")
    args = parser.parse_args()
    print_header("chaos: SIGKILL under load, recovery and delivery", args)

    result = run_chaos(clients=args.clients, kills=[k.strip() for k in args.kills.split(",") if k.strip()],
                       between=args.between, send_interval=args.interval, request_timeout=args.request_timeout,
                       budget=args.budget, log=lambda line: print(line, file=sys.stderr, flush=True))

    rows = [[k.kind, k.program, f"+{k.at:.1f}", fmt(k.first_ack_s), fmt(k.health_s), k.in_flight, k.failed,
             k.timeouts, fmt(k.max_request_s, 2), k.sync_errors, k.error or "-"] for k in result.kills]
    print_table(["killed (SIGKILL)", "program", "at s", "to first ack s", "to health OK s", "sends in flight",
                 "failed sends", "timeouts", "max send s", "sync errors", "problem"], rows,
                title=f"Recovery per killed process ({WORKERS}; {args.clients} clients)")

    durations = [a.duration for a in result.attempts]
    ok_durations = [a.duration for a in result.attempts if a.ok]
    totals = [
        ["load duration s", fmt(result.load_seconds)],
        ["messages acknowledged", len(result.acked)],
        ["send attempts", len(result.attempts)],
        ["failed attempts", len(result.failed)],
        ["error rate", f"{100 * result.error_rate:.1f} %"],
        ["acknowledged after a retry", result.retried_acks],
        ["send p50 / p99 / max s (all attempts)",
         f"{fmt(percentile(durations, 50), 3)} / {fmt(percentile(durations, 99), 2)} / {fmt(result.max_request_s, 2)}"],
        ["send p50 s (acknowledged)", fmt(percentile(ok_durations, 50), 3)],
        [f"sends over the {args.request_timeout:.0f}s bound", result.timeouts],
        ["/sync requests / errors", f"{len(result.syncs)} / {result.sync_errors}"],
        [f"/sync max s (bound {result.sync_bound:.0f}s) / over the bound",
         f"{fmt(result.max_sync_s, 1)} / {result.sync_timeouts}"],
        ["lost (all members)", result.total("lost")],
        ["duplicate event ids / bodies", f"{result.total('duplicate_ids')} / {result.total('duplicate_bodies')}"],
        ["per-sender order violations", result.total("out_of_order")],
        ["acked but never seen via /sync (+gap fill)", result.total("sync_missing")],
        ["events redelivered by /sync", result.total("sync_redelivered")],
        ["never acknowledged (given up at the end)", len(result.unacked)],
        ["stack start s / stop s (exit code)",
         f"{fmt(result.start_seconds)} / {fmt(result.stop_seconds)} ({result.stop_code})"],
        ["healthy at the end / leftovers", f"{'yes' if not result.final_health else 'NO'} / {len(result.leftovers)}"],
    ]
    print_table(["total", "value"], totals)
    outcomes = ", ".join(f"{name} {n}" for name, n in result.outcomes().most_common())
    print(f"failed attempts by outcome: {outcomes or 'none'}")
    problems = result.problems()
    print("guarantees: " + ("all held" if not problems else "BROKEN:\n  " + "\n  ".join(problems)))
    if problems:
        print("stack log (last lines):\n" + result.log_tail)
    print()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
