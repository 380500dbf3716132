"""Message send throughput and send → /sync delivery latency: monolith vs a worker set.

Per topology: a fresh stack (embedded PostgreSQL) whose homeserver.yaml gets rate limits lifted before
its first start (common.NO_RATE_LIMITS). Users are registered through the shared-secret admin API
(/_synapse/admin/v1/register, HMAC-SHA1 over the nonce). Everything goes through nginx on the public port.

For each N in --clients: N sender users each create their own public room (one room per sender; the
receiver joins every one of them: --rooms shared puts everyone in one room instead). One receiver
long-polls /sync (timeout 10 s, a filter for m.room.message, presence off; the filter is unique per round,
see sync_filter). The N senders then each send --messages messages one after another
(PUT /rooms/{id}/send/m.room.message/{txn}), all N at once.

The receiver behaves like a Matrix client: when a room's timeline comes back `limited` (Synapse left
events out between the previous sync and the timeline's prev_batch), it fills the gap with GET /messages
from prev_batch back to the previous next_batch (--no-gap-fill: the old client, which skipped them).
After each round every room is read back through GET /messages and every acknowledged event classified:
  delivered      seen in a /sync timeline (live) or in a gap fill
  undelivered    in the room, but the receiver never saw it (neither /sync nor a gap fill)
  lost           PUT /send answered with an event_id, but the event is not in the room
--diagnose explains limited timelines and undelivered events from the stack's own records.

  sends/s        all messages / (last send answered - first send started)
  send ms        time for one PUT /send to be answered
  delivery ms    when the event first appears in the receiver's /sync response, minus when its PUT /send
                 was answered (can be slightly negative: the sync may return before the sender's response);
                 events first seen in a gap fill are counted apart ("gap-filled", "gap-fill max ms")
Each N is measured --runs times with fresh rooms; rates are medians over runs, latencies are pooled.

    /opt/synapse-workers/venv/bin/python bench/messaging.py --runs 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import shutil
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


def sync_filter(tag: str) -> str:
    """The receiver's /sync filter: m.room.message timelines only (limit 200 asked; Synapse caps it at its
    `filter_timeline_limit`, default 100, so a room timeline is `limited` once more than 100 events arrive
    between two syncs, and then the client has to fill the gap). The never-matching presence `not_senders`
    entry makes the filter, and so Synapse's sync response cache key (user, timeout, since, filter, ...),
    unique per round: otherwise the round's first /sync (no since, timeout 0) is the same request as the
    previous round's and, within `caches.sync_response_cache_duration` (default 2 minutes), Synapse answers
    it from that cache: the receiver then replays every earlier round's /sync responses and meets its new
    rooms as "newly joined" (a limited timeline) instead of starting after its joins."""
    return json.dumps({
        "room": {
            "timeline": {"limit": 200, "types": ["m.room.message"]},
            "state": {"types": []},
            "ephemeral": {"types": []},
            "account_data": {"types": []},
        },
        "presence": {"types": [], "not_senders": [f"@bench-{tag}:invalid"]},
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


MESSAGE_FILTER = json.dumps({"types": ["m.room.message"]}, separators=(",", ":"))


def room_position(token: str) -> tuple[int, dict[int, int]]:
    """The room part of a sync token (next_batch, prev_batch, /messages start/end): "s123" (one writer)
    or "m123~1.456~2.460" (several event persisters: the minimum position, then instance id.position for
    the writers that are ahead of it). Returns (minimum, {instance id: position})."""
    room = token.split("_", 1)[0]
    if room.startswith("m"):
        minimum, *rest = room[1:].split("~")
        return int(minimum), {int(i): int(p) for i, p in (item.split(".") for item in rest)}
    if room.startswith("s"):
        return int(room[1:]), {}
    if room.startswith("t"):  # topological tokens from /messages: t<depth>-<stream>
        return int(room.split("-")[1]), {}
    raise ValueError(f"unknown token {token!r}")


def after(position: tuple[int, int], token: str) -> bool:
    """Is the event at (instance id, stream ordering) after the token (i.e. not yet covered by it)?"""
    instance, stream = position
    minimum, writers = room_position(token)
    return stream > writers.get(instance, minimum)


async def read_room(user: User, room: str, wanted: set[str]) -> set[str]:
    """Event ids of the room's m.room.message events, newest first through GET /messages dir=b, until
    every id in `wanted` is accounted for or the room's start is reached."""
    seen: set[str] = set()
    params = {"dir": "b", "limit": 100, "filter": MESSAGE_FILTER}
    for _ in range(200):  # a bound: 20,000 events
        body = await user.call("GET", f"/_matrix/client/v3/rooms/{room}/messages", params=params)
        seen.update(event["event_id"] for event in body.get("chunk", []))
        if wanted <= seen or "end" not in body:
            break
        params["from"] = body["end"]
    return seen


async def backfill(user: User, room: str, prev_batch: str, to: str) -> list[str]:
    """What a Matrix client does with a `limited` sync timeline: GET /messages backwards from the
    timeline's prev_batch to the previous sync's next_batch, so the gap is filled. Returns event ids."""
    ids: list[str] = []
    params = {"dir": "b", "from": prev_batch, "to": to, "limit": 100, "filter": MESSAGE_FILTER}
    for _ in range(200):
        body = await user.call("GET", f"/_matrix/client/v3/rooms/{room}/messages", params=params)
        ids += [event["event_id"] for event in body.get("chunk", [])]
        if "end" not in body:  # Synapse omits `end` once it reached `to` (or the room's start)
            break
        params["from"] = body["end"]
    return ids


async def one_round(receiver: User, senders: list[User], messages: int, shared: bool, tag: str,
                    fill_gaps: bool = True, diagnose=None) -> dict:
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
    sync_filter_json = sync_filter(tag)
    first = {"filter": sync_filter_json, "timeout": 0, "set_presence": "offline"}
    since = (await receiver.call("GET", "/_matrix/client/v3/sync", params=first))["next_batch"]

    arrived: dict[str, float] = {}   # event id -> when the receiver first had it (live /sync or gap fill)
    via_gap: set[str] = set()        # ... of which first seen through a gap fill (/messages after `limited`)
    done: dict[str, float] = {}
    send_ms: list[float] = []
    room_of: dict[str, str] = {}
    expected = len(senders) * messages
    # Every /sync response, for the evidence: its since/next_batch, and per watched room whether the
    # timeline was limited, its prev_batch and the event ids it carried.
    sync_log: list[dict] = []
    gap_fills = 0

    async def receive() -> None:
        nonlocal since, gap_fills
        while True:
            request_since = since
            asked = time.monotonic()
            body = await receiver.call("GET", "/_matrix/client/v3/sync", params={
                "filter": sync_filter_json, "since": request_since, "timeout": 10000, "set_presence": "offline"})
            now = time.monotonic()
            since = body["next_batch"]
            entry = {"asked": asked, "at": now, "since": request_since, "next_batch": since, "rooms": {}}
            sync_log.append(entry)
            gaps = []
            for room_id, room in body.get("rooms", {}).get("join", {}).items():
                if room_id not in watched:
                    continue
                timeline = room.get("timeline", {})
                ids = [event["event_id"] for event in timeline.get("events", [])]
                entry["rooms"][room_id] = {"limited": bool(timeline.get("limited")),
                                           "prev_batch": timeline.get("prev_batch"), "events": ids}
                for event_id in ids:
                    arrived.setdefault(event_id, now)
                if timeline.get("limited") and timeline.get("prev_batch") and fill_gaps:
                    gaps.append((room_id, timeline["prev_batch"]))
            if gaps:
                # Events between request_since and each prev_batch were left out of this response.
                filled = await asyncio.gather(*(backfill(receiver, r, prev, request_since) for r, prev in gaps))
                now = time.monotonic()
                gap_fills += len(gaps)
                for (room_id, _), ids in zip(gaps, filled, strict=True):
                    entry["rooms"][room_id]["gap_fill"] = ids
                    for event_id in ids:
                        if event_id not in arrived:
                            arrived[event_id] = now
                            via_gap.add(event_id)

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
        await asyncio.gather(*(send(s, r, i) for i, (s, r) in enumerate(zip(senders, rooms, strict=True))))
        finished = time.monotonic()
        # wait (at most 30 s) for the receiver to have seen every event, then stop its long poll
        while not all(e in arrived for e in done) and time.monotonic() - finished < 30:
            if receiver_task.done():
                receiver_task.result()  # raises what went wrong
            await asyncio.sleep(0.01)
    finally:
        receiver_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver_task

    # Read every room back (GET /messages, not /sync) and classify each acknowledged event:
    #   live         first seen in a /sync timeline
    #   gap fill     first seen through /messages after a `limited` /sync timeline
    #   undelivered  in the room, but the receiver never saw it (neither /sync nor a gap fill)
    #   lost         PUT /send answered with this event_id, but the event is not in the room
    in_room: set[str] = set()
    for room in sorted(set(room_of.values())):
        in_room |= await read_room(receiver, room, {e for e, r in room_of.items() if r == room})
    live = [(arrived[e] - t) * 1000 for e, t in done.items() if e in arrived and e not in via_gap]
    gap = [(arrived[e] - t) * 1000 for e, t in done.items() if e in via_gap]
    undelivered = [e for e in done if e not in arrived and e in in_room]
    lost = [e for e in done if e not in in_room]
    limited = [(i, room_id) for i, entry in enumerate(sync_log)
               for room_id, r in entry["rooms"].items() if r["limited"]]
    for event_id in undelivered + lost:
        room = room_of[event_id]
        kind = "LOST (not in the room)" if event_id in lost else "UNDELIVERED (in the room, never seen by /sync)"
        print(f"    {kind}: {event_id} in {room}; limited timelines for this room in sync responses "
              f"{[i for i, r in limited if r == room]}", file=sys.stderr, flush=True)
    if diagnose is not None:
        await diagnose(receiver, sync_log, room_of, done, set(undelivered + lost), limited)
    return {
        "sent": len(done), "expected": expected, "rate": len(done) / (finished - started),
        "send_ms": send_ms, "delivery_ms": live, "gap_ms": gap, "gap_filled": len(gap),
        "undelivered": len(undelivered), "lost": len(lost), "limited": len(limited), "syncs": len(sync_log),
        "gap_fills": gap_fills,
    }


class Diagnosis:
    """--diagnose: explain every limited timeline and every event the receiver did not get, from the
    stack's own records: each event's writer and stream position (the `events` table, read-only) against
    the room positions of the sync tokens, and which Synapse process answered each /sync (stack log)."""

    def __init__(self, stack: BenchStack):
        self.stack = stack

    def _query(self, sql: str, args: tuple) -> list[tuple]:
        import psycopg2  # Synapse's own driver, in the venv
        import yaml

        config = yaml.safe_load(Path(self.stack.env["SYNAPSE_CONFIG_DIR"], "homeserver.yaml").read_text())
        db = {k: v for k, v in config["database"]["args"].items() if not k.startswith("cp_")}
        with psycopg2.connect(**db) as conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    def _served_by(self) -> dict[str, str]:
        """since token -> the Synapse process(es) whose request log lines carry it (the stack log)."""
        try:
            text = self.stack.stack.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return {}
        served: dict[str, set[str]] = {}
        for line in text.splitlines():
            if "/sync?" in line and "since=" in line:
                since = line.split("since=", 1)[1].split("&", 1)[0].split(" ", 1)[0]
                served.setdefault(since, set()).add(line.split("|", 1)[0].strip())
        return {k: ",".join(sorted(v)) for k, v in served.items()}

    async def __call__(self, receiver: User, sync_log: list[dict], room_of: dict[str, str], done: dict[str, float],
                       missing: set[str], limited: list[tuple[int, str]]) -> None:
        out = sys.stderr
        instances = dict(self._query("SELECT instance_name, instance_id FROM instance_map", ()))
        served = self._served_by()
        counts: dict[str, int] = {}
        for entry in sync_log:
            who = served.get(entry["since"], "?")
            counts[who] = counts.get(who, 0) + 1
        first_seen: dict[str, int] = {}
        for i, entry in enumerate(sync_log):
            for room_id in entry["rooms"]:
                first_seen.setdefault(room_id, i)
        t0 = sync_log[0]["asked"] if sync_log else 0.0
        print(f"    diagnose: {len(sync_log)} sync responses, answered by {counts}; event persister ids "
              f"{instances}", file=out)
        for i, room_id in limited:
            r = sync_log[i]["rooms"][room_id]
            print(f"    diagnose: sync #{i} room {room_id}: limited, {len(r['events'])} events, "
                  f"first response with this room: {first_seen[room_id] == i}, since "
                  f"{sync_log[i]['since'].split('_')[0]} prev_batch {(r['prev_batch'] or '-').split('_')[0]} "
                  f"next_batch {sync_log[i]['next_batch'].split('_')[0]}, gap fill {len(r.get('gap_fill', []))} "
                  f"events; sync asked +{sync_log[i]['asked'] - t0:.3f}s answered +{sync_log[i]['at'] - t0:.3f}s; "
                  f"this room's sends acked before it was asked: "
                  f"{sum(1 for e, rm in room_of.items() if rm == room_id and done[e] < sync_log[i]['asked'])}, "
                  f"first ack +{min(done[e] for e, rm in room_of.items() if rm == room_id) - t0:.3f}s", file=out)
        if not missing:
            self._positions_without_rows(missing)
            return
        copy = Path(f"/tmp/messaging-diagnose-{uuid.uuid4().hex[:6]}.log")
        try:
            shutil.copy(self.stack.stack.log_path, copy)
            print(f"    diagnose: stack log copied to {copy}", file=out)
        except (OSError, AttributeError):
            pass
        delivered_in = {e: i for i, entry in enumerate(sync_log) for r in entry["rooms"].values() for e in r["events"]}

        def fate(e: str, typ: str) -> str:
            return f"#{delivered_in[e]}" if e in delivered_in else ("MISSING" if e in missing else typ)

        rows = self._query("SELECT event_id, instance_name, stream_ordering, topological_ordering, room_id "
                           "FROM events WHERE event_id = ANY(%s)", (list(missing),))
        for event_id, instance, stream, depth, room_id in rows:
            position = (instances.get(instance, -1), stream)
            print(f"    diagnose: {event_id}: room {room_id}, written by {instance} (id {position[0]}) at stream "
                  f"{stream}, depth {depth}; PUT /send answered at +{done[event_id] - t0:.3f}s", file=out)
            for i, entry in enumerate(sync_log):
                if after(position, entry["since"]) and not after(position, entry["next_batch"]):
                    r = entry["rooms"].get(room_id)
                    what = ("room absent from the response" if r is None else
                            f"room present, limited={r['limited']}, {len(r['events'])} events, "
                            f"event included: {event_id in r['events']}")
                    print(f"      covered by sync #{i} (asked +{entry['asked'] - t0:.3f}s, answered "
                          f"+{entry['at'] - t0:.3f}s; since {entry['since'].split('_')[0]} -> next_batch "
                          f"{entry['next_batch'].split('_')[0]}; served by {served.get(entry['since'], '?')}, "
                          f"rooms in it: {len(entry['rooms'])}): {what}", file=out)
            # the neighbours: every event of the stream around it, and which sync delivered them
            near = self._query("SELECT stream_ordering, instance_name, event_id, type FROM events "
                               "WHERE stream_ordering BETWEEN %s AND %s ORDER BY stream_ordering",
                               (stream - 6, stream + 10))
            print("      stream around it (position:persister:sync that delivered it): " + ", ".join(
                f"{so}:{inst}:{fate(e, typ)}" for so, inst, e, typ in near), file=out)
        for event_id in missing - {row[0] for row in rows}:
            print(f"    diagnose: {event_id}: not in the events table at all", file=out)
        self._positions_without_rows(missing)
        out.flush()

    def _positions_without_rows(self, missing: set[str]) -> None:
        """Every `Sending position for events: A -> B` an event persister logged (a POSITION command: "my
        position advanced, no rows to send") whose range (A, B] holds events that persister wrote: those
        events never reach the other processes' replication handlers (no RDATA row)."""
        try:
            text = self.stack.stack.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return
        found = []
        for line in text.splitlines():
            match = re.match(r"^(\S+)\s*\| (\S+ \S+) .*Sending position for events: (\d+) -> (\d+)$", line)
            if match:
                found.append((match.group(1), match.group(2), int(match.group(3)), int(match.group(4))))
        rows = self._query("SELECT instance_name, stream_ordering, event_id FROM events WHERE stream_ordering > 0", ())
        by_position = {(inst, so): e for inst, so, e in rows}
        hits = [(who, when, a, b, [(so, by_position[(who, so)]) for so in range(a + 1, b + 1)
                                   if (who, so) in by_position]) for who, when, a, b in found]
        hits = [h for h in hits if h[4]]
        print(f"    diagnose: stack so far: {len(found)} POSITION commands on the events stream; {len(hits)} of them "
              "skipped over events written by the same persister (never sent as RDATA rows):", file=sys.stderr)
        for who, when, a, b, events in hits:
            print(f"      {who} {when}: POSITION {a} -> {b} over its own " + ", ".join(
                f"{so} {e}{' (undelivered)' if e in missing else ''}" for so, e in events), file=sys.stderr)


async def run_topology(stack: BenchStack, clients: list[int], messages: int, runs: int, shared: bool,
                       load: LoadLog, fill_gaps: bool = True, diagnose: bool = False) -> dict[int, dict]:
    secret = stack.secret("registration")
    base = stack.base_url
    receiver = await register(base, secret, f"rx{uuid.uuid4().hex[:6]}")
    senders = [await register(base, secret, f"tx{i}-{uuid.uuid4().hex[:6]}") for i in range(max(clients))]
    diagnosis = Diagnosis(stack) if diagnose else None
    counters = ("gap_filled", "undelivered", "lost", "limited", "syncs", "gap_fills")
    results: dict[int, dict] = {}
    try:
        for n in clients:
            rates, send_ms, delivery, gap_ms, foreign, per_run = [], [], [], [], [], []
            totals = dict.fromkeys(counters, 0)
            for run in range(runs):
                busy = load.wait_quiet()
                with CpuWindow() as window:
                    r = await one_round(receiver, senders[:n], messages, shared,
                                        f"n{n}r{run}{uuid.uuid4().hex[:4]}", fill_gaps, diagnosis)
                foreign.append(window.foreign)
                rates.append(r["rate"])
                send_ms += r["send_ms"]
                delivery += r["delivery_ms"]
                gap_ms += r["gap_ms"]
                for key in counters:
                    totals[key] += r[key]
                per_run.append(f"{r['undelivered']}/{r['lost']}")
                print(f"    N={n} run {run + 1}: {r['rate']:.1f} sends/s, delivery p50 "
                      f"{percentile(r['delivery_ms'], 50):.0f} ms; {r['syncs']} syncs, {r['limited']} limited "
                      f"timelines, {r['gap_filled']} events first seen by gap fill; undelivered {r['undelivered']}, "
                      f"lost {r['lost']} (CPU busy {busy:.2f} cores before; other work {window.foreign:.2f} cores "
                      f"during)", file=sys.stderr, flush=True)
            results[n] = {"rate": median(rates), "rate_min": min(rates), "rate_max": max(rates),
                          "send_ms": send_ms, "delivery_ms": delivery, "gap_ms": gap_ms, **totals,
                          "per_run": per_run, "foreign": max(foreign)}
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
    parser.add_argument("--no-gap-fill", action="store_true",
                        help="do not fill limited /sync timelines with /messages (the old, incorrect client)")
    parser.add_argument("--diagnose", action="store_true",
                        help="explain limited timelines and undelivered/lost events (stream positions from the "
                             "database, the Synapse process that answered each /sync)")
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
            all_results[name] = asyncio.run(run_topology(
                stack, clients, args.messages, args.runs, args.rooms == "shared", load,
                fill_gaps=not args.no_gap_fill, diagnose=args.diagnose))
            stack.stop()

    rows = []
    for name, per_n in all_results.items():
        for n, r in per_n.items():
            rows.append([
                name, n, n * args.messages, fmt(r["rate"]), f"{r['rate_min']:.1f}-{r['rate_max']:.1f}",
                fmt(percentile(r["send_ms"], 50), 0), fmt(percentile(r["send_ms"], 90), 0),
                fmt(percentile(r["delivery_ms"], 50), 0), fmt(percentile(r["delivery_ms"], 90), 0),
                fmt(max(r["delivery_ms"], default=float("nan")), 0), r["limited"], r["gap_filled"],
                fmt(max(r["gap_ms"], default=float("nan")), 0), " ".join(r["per_run"]), r["undelivered"], r["lost"],
                fmt(r["foreign"], 2),
            ])
    rooms = "one room per sender" if args.rooms == "per-sender" else "one shared room"
    client = "no gap fill (--no-gap-fill)" if args.no_gap_fill else "limited timelines filled via /messages"
    print_table(
        ["topology", "senders", "msgs/run", "sends/s", "sends/s min-max", "send p50 ms", "send p90 ms",
         "delivery p50 ms", "delivery p90 ms", "delivery max ms", "limited", "gap-filled", "gap-fill max ms",
         "undeliv/lost per run", "undelivered", "lost", "other CPU max"],
        rows, title=f"Messages through nginx, {rooms}, receiver long-polling /sync ({client}); "
                    f"{args.runs} runs per row",
    )
    for name, workers in TOPOLOGIES.items():
        if name in first_starts:
            print(f"{name}: {workers or 'no workers'} (first start {first_starts[name]:.1f}s)")
    print("delivery: live /sync only. limited: room timelines /sync returned with limited=true. gap-filled: events\n"
          "the receiver first got from /messages after such a timeline (latency: gap-fill max ms). undelivered: in\n"
          "the room (read back via /messages) but never seen by the receiver; lost: PUT /send gave an event_id, but\n"
          "the event is not in the room.")
    print(load.summary())
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
