"""Message send throughput and send → /sync delivery latency: monolith vs a worker set.

Per topology: a fresh stack (embedded PostgreSQL) whose homeserver.yaml gets rate limits lifted before
its first start (common.NO_RATE_LIMITS). Users are registered through the shared-secret admin API
(/_synapse/admin/v1/register, HMAC-SHA1 over the nonce). Everything goes through nginx on the public port.

For each N in --clients: N sender users each create their own public room (one room per sender; the
receiver joins every one of them: --rooms shared puts everyone in one room instead). One receiver
long-polls /sync (timeout 10 s, a filter for m.room.message, presence off). The N senders then each send
--messages messages one after another (PUT /rooms/{id}/send/m.room.message/{txn}), all N at once.
  sends/s        all messages / (last send answered - first send started)
  send ms        time for one PUT /send to be answered
  delivery ms    when the event first appears in the receiver's /sync response, minus when its PUT /send
                 was answered (can be slightly negative: the sync may return before the sender's response)
Each N is measured --runs times with fresh rooms; rates are medians over runs, latencies are pooled.

    /opt/synapse-workers/venv/bin/python bench/messaging.py --runs 2
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import sys
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import NO_RATE_LIMITS, BenchStack, CpuWindow, LoadLog, fmt, median, percentile, print_header, print_table  # noqa: E402

TOPOLOGIES = {
    "monolith": "",
    "workers": "synchrotron:2, event_persister:2, event_creator, stream_writers=typing+to_device+receipts",
}
SYNC_FILTER = json.dumps({
    "room": {
        "timeline": {"limit": 200, "types": ["m.room.message"]},
        "state": {"types": []},
        "ephemeral": {"types": []},
        "account_data": {"types": []},
    },
    "presence": {"types": []},
    "account_data": {"types": []},
}, separators=(",", ":"))
TIMEOUT = httpx.Timeout(60.0)


class User:
    def __init__(self, base_url: str, user_id: str, token: str):
        self.user_id = user_id
        self.client = httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT,
                                        headers={"Authorization": f"Bearer {token}"})

    async def call(self, method: str, path: str, **kwargs) -> dict:
        response = await self.client.request(method, path, **kwargs)
        if response.status_code != 200:
            raise RuntimeError(f"{method} {path} as {self.user_id}: HTTP {response.status_code} {response.text[:300]}")
        return response.json()


async def register(base_url: str, secret: str, username: str) -> User:
    password = uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT) as client:
        nonce = (await client.get("/_synapse/admin/v1/register")).json()["nonce"]
        mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
        for part in (nonce, username, password):
            mac.update(part.encode())
            mac.update(b"\x00")
        mac.update(b"notadmin")
        response = await client.post("/_synapse/admin/v1/register", json={
            "nonce": nonce, "username": username, "password": password, "admin": False, "mac": mac.hexdigest(),
        })
        if response.status_code != 200:
            raise RuntimeError(f"register {username}: HTTP {response.status_code} {response.text[:300]}")
        body = response.json()
    return User(base_url, body["user_id"], body["access_token"])


async def one_round(receiver: User, senders: list[User], messages: int, shared: bool, tag: str) -> dict:
    # Rooms: one per sender (the receiver joins all), or one shared room for everyone.
    if shared:
        room = (await senders[0].call("POST", "/_matrix/client/v3/createRoom",
                                      json={"preset": "public_chat", "name": f"bench {tag}"}))["room_id"]
        rooms = [room] * len(senders)
        for user in [*senders[1:], receiver]:
            await user.call("POST", f"/_matrix/client/v3/join/{room}", json={})
    else:
        rooms = []
        for i, sender in enumerate(senders):
            rooms.append((await sender.call("POST", "/_matrix/client/v3/createRoom",
                                            json={"preset": "public_chat", "name": f"bench {tag} {i}"}))["room_id"])
        for room in rooms:
            await receiver.call("POST", f"/_matrix/client/v3/join/{room}", json={})
    watched = set(rooms)
    since = (await receiver.call("GET", "/_matrix/client/v3/sync",
                                 params={"filter": SYNC_FILTER, "timeout": 0, "set_presence": "offline"}))["next_batch"]

    arrived: dict[str, float] = {}
    done: dict[str, float] = {}
    send_ms: list[float] = []
    limited = 0
    limited_rooms: set[str] = set()
    room_of: dict[str, str] = {}
    expected = len(senders) * messages

    async def receive() -> None:
        nonlocal since, limited
        while True:
            body = await receiver.call("GET", "/_matrix/client/v3/sync", params={
                "filter": SYNC_FILTER, "since": since, "timeout": 10000, "set_presence": "offline"})
            now = time.monotonic()
            since = body["next_batch"]
            for room_id, room in body.get("rooms", {}).get("join", {}).items():
                if room_id not in watched:
                    continue
                timeline = room.get("timeline", {})
                if timeline.get("limited"):
                    limited += 1
                    limited_rooms.add(room_id)
                for event in timeline.get("events", []):
                    arrived.setdefault(event["event_id"], now)

    async def send(sender: User, room: str, index: int) -> None:
        for k in range(messages):
            t0 = time.monotonic()
            body = await sender.call(
                "PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message/{tag}-{index}-{k}",
                json={"msgtype": "m.text", "body": f"bench {tag} sender {index} message {k}"})
            t1 = time.monotonic()
            done[body["event_id"]] = t1
            room_of[body["event_id"]] = room
            send_ms.append((t1 - t0) * 1000)

    receiver_task = asyncio.create_task(receive())
    await asyncio.sleep(0.2)  # let the receiver's long poll reach the server
    started = time.monotonic()
    try:
        await asyncio.gather(*(send(s, r, i) for i, (s, r) in enumerate(zip(senders, rooms))))
        finished = time.monotonic()
        # wait (at most 30 s) for the receiver to have seen every event, then stop its long poll
        while not all(e in arrived for e in done) and time.monotonic() - finished < 30:
            if receiver_task.done():
                receiver_task.result()  # raises what went wrong
            await asyncio.sleep(0.01)
    finally:
        receiver_task.cancel()
        try:
            await receiver_task
        except asyncio.CancelledError:
            pass

    delivery = [(arrived[e] - t) * 1000 for e, t in done.items() if e in arrived]
    for event_id in [e for e in done if e not in arrived]:
        room = room_of[event_id]
        # Is the event there at all? (A plain read of the room, not /sync.)
        try:
            await receiver.call("GET", f"/_matrix/client/v3/rooms/{room}/event/{event_id}")
            stored = "readable via /rooms/{id}/event"
        except RuntimeError as exc:
            stored = f"not readable: {exc}"
        print(f"    missing from /sync: {event_id} in {room} (room timeline limited in some sync: "
              f"{room in limited_rooms}; {stored})", file=sys.stderr, flush=True)
    return {
        "sent": len(done), "expected": expected, "rate": len(done) / (finished - started),
        "send_ms": send_ms, "delivery_ms": delivery, "missing": len(done) - len(delivery), "limited": limited,
    }


async def run_topology(stack: BenchStack, clients: list[int], messages: int, runs: int, shared: bool,
                       load: LoadLog) -> dict[int, dict]:
    secret = stack.secret("registration")
    base = stack.base_url
    receiver = await register(base, secret, f"rx{uuid.uuid4().hex[:6]}")
    senders = [await register(base, secret, f"tx{i}-{uuid.uuid4().hex[:6]}") for i in range(max(clients))]
    results: dict[int, dict] = {}
    try:
        for n in clients:
            rates, send_ms, delivery, missing, limited, foreign = [], [], [], 0, 0, []
            for run in range(runs):
                busy = load.wait_quiet()
                with CpuWindow() as window:
                    r = await one_round(receiver, senders[:n], messages, shared, f"n{n}r{run}{uuid.uuid4().hex[:4]}")
                foreign.append(window.foreign)
                rates.append(r["rate"])
                send_ms += r["send_ms"]
                delivery += r["delivery_ms"]
                missing += r["missing"]
                limited += r["limited"]
                print(f"    N={n} run {run + 1}: {r['rate']:.1f} sends/s, delivery p50 "
                      f"{percentile(r['delivery_ms'], 50):.0f} ms, missing {r['missing']} "
                      f"(CPU busy {busy:.2f} cores before; other work {window.foreign:.2f} cores during)", file=sys.stderr, flush=True)
            results[n] = {"rate": median(rates), "rate_min": min(rates), "rate_max": max(rates),
                          "send_ms": send_ms, "delivery_ms": delivery, "missing": missing, "limited": limited,
                          "foreign": max(foreign)}
    finally:
        for user in [receiver, *senders]:
            await user.client.aclose()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="repetitions per N (default 2)")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent senders")
    parser.add_argument("--messages", type=int, default=25, help="messages per sender per run")
    parser.add_argument("--rooms", choices=("per-sender", "shared"), default="per-sender")
    parser.add_argument("--only", choices=list(TOPOLOGIES), action="append")
    args = parser.parse_args()
    clients = [int(x) for x in args.clients.split(",") if x.strip()]
    print_header("messaging: send throughput and /sync delivery latency", args)

    load = LoadLog()
    all_results: dict[str, dict] = {}
    first_starts: dict[str, float] = {}
    for name, workers in TOPOLOGIES.items():
        if args.only and name not in args.only:
            continue
        print(f"  {name}: starting ({workers or 'no workers'})", file=sys.stderr, flush=True)
        with BenchStack(workers, homeserver_extra=NO_RATE_LIMITS, prefix="sw-bg-") as stack:
            first_starts[name] = stack.start()
            all_results[name] = asyncio.run(
                run_topology(stack, clients, args.messages, args.runs, args.rooms == "shared", load))
            stack.stop()

    rows = []
    for name, per_n in all_results.items():
        for n, r in per_n.items():
            rows.append([
                name, n, n * args.messages, fmt(r["rate"]), f"{r['rate_min']:.1f}-{r['rate_max']:.1f}",
                fmt(percentile(r["send_ms"], 50), 0), fmt(percentile(r["send_ms"], 90), 0),
                fmt(percentile(r["delivery_ms"], 50), 0), fmt(percentile(r["delivery_ms"], 90), 0),
                fmt(max(r["delivery_ms"], default=float("nan")), 0), r["missing"], fmt(r["foreign"], 2),
            ])
    rooms = "one room per sender" if args.rooms == "per-sender" else "one shared room"
    print_table(
        ["topology", "senders", "msgs/run", "sends/s", "sends/s min-max", "send p50 ms", "send p90 ms",
         "delivery p50 ms", "delivery p90 ms", "delivery max ms", "missing", "other CPU max"],
        rows, title=f"Messages through nginx, {rooms}, receiver long-polling /sync; {args.runs} runs per row",
    )
    for name, workers in TOPOLOGIES.items():
        if name in first_starts:
            print(f"{name}: {workers or 'no workers'} (first start {first_starts[name]:.1f}s)")
    limited = sum(r["limited"] for per_n in all_results.values() for r in per_n.values())
    if limited:
        print(f"note: {limited} room timelines in /sync responses came back 'limited' (Synapse paginated them from "
              "the database);\n      the 'missing' column counts sent events the receiver never saw.")
    print(load.summary())
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
