"""Chaos under load: clients chat through the public port while processes of the stack are SIGKILLed.

`run_chaos()` starts a stack (embedded PostgreSQL, Redis, main + workers, nginx), registers N users who all
join one room, and runs per user a sender (sequential `PUT /send/m.room.message/{txn}`; on an error or a
timeout it retries the *same* txn id until a 200 with an event_id) and a `/sync` long-poll loop. Meanwhile it
SIGKILLs, one after another, each program in `kills` (PIDs from `synapse-workers status --json`), each only
when the stack is healthy again (`synapse-workers health` exits 0 and `status` shows every program up, the
killed one with a new PID) and the clients have had `between` more sends acknowledged. Then it stops the
load, lets the /sync loops catch up, reads the room back as every member through `GET /messages?dir=b` down
to the room's start, checks delivery, stops the stack with SIGTERM and looks for leftovers.

Every wait is bounded: each request (`request_timeout`; a /sync gets its long-poll time on top), each wait
for health or acknowledgements, and the whole chaos phase (`budget`). The stack and its temp root are
removed in all cases (also when something raises). `bench/chaos.py` prints the result as tables;
`tests/integration/test_chaos.py` asserts on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx

from tests.support.matrix import register, registration_secret
from tests.support.stack import SW, Stack, make_root, stack_env, wait_for

WORKERS = "synchrotron, event_persister, stream_writers=typing+to_device+receipts+account_data+presence"
KILLS = ("synchrotron1", "event_persister1", "stream_writers1", "main", "redis", "nginx", "postgres")
KIND = {
    "synchrotron1": "synchrotron",
    "event_persister1": "event persister",
    "stream_writers1": "stream writer (merged)",
    "main": "main",
    "redis": "Redis",
    "nginx": "nginx (master)",
    "postgres": "PostgreSQL (postmaster)",
}
# Synapse's default rate limits would throttle the senders (rc_message: 10 burst, then 0.2/s): lifted in
# homeserver.yaml before the first start (`run` never rewrites an existing homeserver.yaml).
NO_RATE_LIMITS = {
    "rc_message": {"per_second": 10000, "burst_count": 10000},
    "rc_joins": {"local": {"per_second": 10000, "burst_count": 10000},
                 "remote": {"per_second": 10000, "burst_count": 10000}},
    "rc_joins_per_room": {"per_second": 10000, "burst_count": 10000},
    "rc_room_creation": {"per_second": 10000, "burst_count": 10000},
}
MESSAGES_ONLY = json.dumps({"types": ["m.room.message"]}, separators=(",", ":"))
SYNC_FILTER = json.dumps({
    "room": {"timeline": {"limit": 50, "types": ["m.room.message"]}, "state": {"types": []},
             "ephemeral": {"types": []}, "account_data": {"types": []}},
    "presence": {"types": []}, "account_data": {"types": []},
}, separators=(",", ":"))
SYNC_POLL_MS = 10_000


# ---- results ------------------------------------------------------------------------------------------------

@dataclass
class Attempt:
    """One HTTP request of a sender (times in seconds since the load started)."""

    sender: int
    seq: int
    txn: str
    started: float
    duration: float
    outcome: str  # "ok", "HTTP 502", "timeout", or an exception name
    event_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass
class SyncCall:
    client: int
    started: float
    duration: float
    outcome: str


@dataclass
class Kill:
    program: str
    kind: str
    pid: int = 0
    at: float = float("nan")  # seconds since the load started
    new_pid: int = 0
    first_ack_s: float | None = None  # kill → first acknowledged send of a request started after the kill
    health_s: float | None = None  # kill → `health` exit 0 with the program back under a new PID
    failed: int = 0  # failed send attempts that ended between this kill and the next one (or the end)
    timeouts: int = 0
    max_request_s: float = 0.0  # the longest send attempt that ended in that window
    in_flight: int = 0  # send attempts started before the kill that ended after it (hit mid-request)
    sync_errors: int = 0
    error: str = ""


@dataclass
class MemberCheck:
    user_id: str
    events: int = 0  # m.room.message events read back through /messages
    lost: list[str] = field(default_factory=list)  # acknowledged event_ids missing
    duplicate_ids: list[str] = field(default_factory=list)  # event_ids appearing more than once
    duplicate_bodies: list[str] = field(default_factory=list)  # one message body under several event ids
    out_of_order: list[str] = field(default_factory=list)  # a sender's sequence numbers not increasing
    unexpected: list[str] = field(default_factory=list)  # bodies we never sent or with the wrong sender
    sync_missing: int = 0  # acknowledged events never seen via /sync (+ gap fill of limited timelines)
    sync_redelivered: int = 0  # events a later /sync handed out again


@dataclass
class ChaosResult:
    clients: int
    request_timeout: float
    sync_bound: float
    kills: list[Kill] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    syncs: list[SyncCall] = field(default_factory=list)
    acked: dict[tuple[int, int], str] = field(default_factory=dict)  # (sender, seq) → event_id
    unacked: list[tuple[int, int]] = field(default_factory=list)  # given up on at the end (bounded wait)
    members: list[MemberCheck] = field(default_factory=list)
    load_seconds: float = 0.0
    start_seconds: float = 0.0
    final_health: str = ""  # "" when `health` exited 0 at the end, else its output
    stop_code: int | None = None
    stop_seconds: float = float("nan")
    leftovers: dict[int, str] = field(default_factory=dict)
    aborted: str = ""  # why the kill sequence stopped early (a program not back, the budget spent...)
    log_tail: str = ""

    # -- totals
    @property
    def failed(self) -> list[Attempt]:
        return [a for a in self.attempts if not a.ok]

    @property
    def error_rate(self) -> float:
        return len(self.failed) / len(self.attempts) if self.attempts else float("nan")

    @property
    def timeouts(self) -> int:
        return sum(a.outcome == "timeout" for a in self.attempts)

    @property
    def sync_timeouts(self) -> int:
        return sum(s.outcome == "timeout" for s in self.syncs)

    @property
    def sync_errors(self) -> int:
        return sum(s.outcome != "ok" for s in self.syncs)

    @property
    def max_request_s(self) -> float:
        return max((a.duration for a in self.attempts), default=0.0)

    @property
    def max_sync_s(self) -> float:
        return max((s.duration for s in self.syncs), default=0.0)

    @property
    def retried_acks(self) -> int:
        """Messages acknowledged only after at least one failed attempt (the same txn id sent again)."""
        tries = Counter((a.sender, a.seq) for a in self.attempts)
        return sum(tries[key] > 1 for key in self.acked)

    def total(self, name: str) -> int:
        return sum(len(getattr(m, name)) if isinstance(getattr(m, name), list) else getattr(m, name)
                   for m in self.members)

    def outcomes(self) -> Counter:
        return Counter(a.outcome for a in self.failed)

    def summary(self) -> str:
        """A few lines for a test's output: each kill's recovery, then the totals."""
        lines = [f"{k.program:17} pid {k.pid:>7} at +{k.at:5.1f}s: first ack {_s(k.first_ack_s)}, health OK "
                 f"{_s(k.health_s)}, {k.in_flight} sends in flight, {k.failed} failed (max "
                 f"{k.max_request_s:.2f}s), {k.sync_errors} sync errors{'; ' + k.error if k.error else ''}"
                 for k in self.kills]
        lines.append(f"{len(self.acked)} acknowledged, {len(self.attempts)} attempts, {len(self.failed)} failed "
                     f"({100 * self.error_rate:.1f} %: {dict(self.outcomes())}), max send {self.max_request_s:.2f}s, "
                     f"{len(self.syncs)} syncs ({self.sync_errors} errors, max {self.max_sync_s:.1f}s); read back: "
                     f"{[m.events for m in self.members]} events per member; stop exit {self.stop_code} in "
                     f"{self.stop_seconds:.1f}s")
        return "\n".join(lines)

    def problems(self) -> list[str]:
        """Every broken guarantee, in words (empty: all held)."""
        found = []
        if self.aborted:
            found.append(f"kill sequence aborted: {self.aborted}")
        for kill in self.kills:
            if kill.error and kill.error != self.aborted:
                found.append(f"{kill.program}: {kill.error}")
        if not self.members:
            found.append("the room was not read back")
        for name in ("lost", "duplicate_ids", "duplicate_bodies", "out_of_order", "unexpected"):
            for member in self.members:
                items = getattr(member, name)
                if items:
                    found.append(f"{member.user_id}: {len(items)} {name.replace('_', ' ')}: {items[:5]}")
        for member in self.members:
            if member.sync_missing or member.sync_redelivered:
                found.append(f"{member.user_id} via /sync: {member.sync_missing} acknowledged events never delivered, "
                             f"{member.sync_redelivered} delivered twice")
        if self.unacked:
            found.append(f"{len(self.unacked)} messages never acknowledged: {self.unacked[:5]}")
        if self.timeouts:
            found.append(f"{self.timeouts} send requests hit the {self.request_timeout:.0f}s bound")
        if self.sync_timeouts:
            found.append(f"{self.sync_timeouts} /sync requests hit the {self.sync_bound:.0f}s bound")
        if self.final_health:
            found.append(f"not healthy at the end: {self.final_health}")
        if self.stop_code != 0:
            found.append(f"stop exit code {self.stop_code}")
        if self.leftovers:
            found.append(f"left running after the stop: {self.leftovers}")
        return found


# ---- the run ------------------------------------------------------------------------------------------------

def run_chaos(
    clients: int = 6,
    kills: tuple[str, ...] | list[str] = KILLS,
    between: int = 12,
    send_interval: float = 0.25,
    request_timeout: float = 20.0,
    budget: float = 300.0,
    recover_timeout: float = 120.0,
    start_timeout: float = 300.0,
    worker_types: str = WORKERS,
    log: Callable[[str], None] = print,
) -> ChaosResult:
    """Start a stack, chat through it while killing `kills` one by one, verify, stop it; always clean up.

    between: acknowledged sends (all clients together) required after each recovery before the next kill.
    send_interval: pause of each sender after an acknowledged message. budget: bound of the whole chaos phase
    (kills and recoveries; the final drain and read-back have their own bounds)."""
    root = make_root("sw-chaos-")
    env = stack_env(root, worker_types)
    stack = Stack(env)
    result = ChaosResult(clients, request_timeout, SYNC_POLL_MS / 1000 + request_timeout)
    try:
        _generate(env)
        started = time.monotonic()
        stack.start(start_timeout)
        result.start_seconds = time.monotonic() - started
        log(f"chaos: stack ready in {result.start_seconds:.1f}s ({worker_types}); root {root}")
        users = _register(stack, clients)
        asyncio.run(_Chaos(stack, users, result, kills, between, send_interval, request_timeout, budget,
                           recover_timeout, log).run())
        health = stack.cli("health", timeout=60)
        result.final_health = "" if health.returncode == 0 else (health.stdout + health.stderr).strip()
        if stack.proc is not None and stack.proc.poll() is None:
            result.stop_code, result.stop_seconds = stack.stop(timeout=60)
            result.leftovers = {pid: _cmdline(pid) for pid in stack.leftovers()}
        else:
            result.stop_code = stack.proc.returncode if stack.proc else None
        log(f"chaos: stopped with exit code {result.stop_code} in {result.stop_seconds:.1f}s")
    finally:
        result.log_tail = stack.tail(80)
        try:
            stack.kill()
            wait_for(lambda: not stack.leftovers(), 10)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return result


def _generate(env: dict[str, str]) -> None:
    done = subprocess.run([SW, "generate"], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"synapse-workers generate failed:\n{done.stdout}\n{done.stderr}")
    with open(Path(env["SYNAPSE_CONFIG_DIR"], "homeserver.yaml"), "a", encoding="utf-8") as handle:
        handle.write("\n# Added by tests/support/chaos.py: the load must not be rate-limited.\n")
        for key, value in NO_RATE_LIMITS.items():
            handle.write(f"{key}: {json.dumps(value)}\n")  # JSON is valid YAML


def _register(stack: Stack, clients: int) -> list[dict]:
    secret = registration_secret(stack.env["SYNAPSE_DATA_DIR"], stack.env["SYNAPSE_SERVER_NAME"])
    tag = uuid.uuid4().hex[:4]
    return [register(stack.base_url, secret, f"chaos{i}-{tag}") for i in range(clients)]


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


class _Chaos:
    def __init__(self, stack: Stack, users: list[dict], result: ChaosResult, kills, between: int,
                 send_interval: float, request_timeout: float, budget: float, recover_timeout: float, log):
        self.stack, self.users, self.result = stack, users, result
        self.kills, self.between, self.interval = list(kills), between, send_interval
        self.timeout, self.budget, self.recover_timeout, self.log = request_timeout, budget, recover_timeout, log
        self.run_id = uuid.uuid4().hex[:6]
        self.t0 = time.monotonic()
        self.stop_sending = asyncio.Event()
        self.stop_syncing = asyncio.Event()
        self.delivered: list[Counter] = [Counter() for _ in users]  # per client: event_id → times via /sync
        self.sending: dict[int, float] = {}  # sender → when its request in flight started
        self.clients: list[httpx.AsyncClient] = []
        self.room = ""

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- setup
    async def run(self) -> None:
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=4)
        self.clients = [httpx.AsyncClient(base_url=self.stack.base_url, limits=limits,
                                          timeout=httpx.Timeout(self.timeout),
                                          headers={"Authorization": f"Bearer {u['access_token']}"})
                        for u in self.users]
        try:
            await self._room()
            sinces = [await self._initial_sync(c) for c in self.clients]
            self.t0 = time.monotonic()
            senders = [asyncio.create_task(self._sender(i)) for i in range(len(self.clients))]
            syncers = [asyncio.create_task(self._syncer(i, since)) for i, since in enumerate(sinces)]
            try:
                await self._kill_sequence()
            finally:
                await self._drain(senders)
                self.result.load_seconds = self.now()
                await self._catch_up(syncers)
            self._attribute()
            self.result.members = [await self._check_member(i) for i in range(len(self.clients))]
        finally:
            for client in self.clients:
                await client.aclose()

    async def _call(self, client: httpx.AsyncClient, method: str, path: str, tries: int = 5, **kwargs) -> dict:
        """A set-up or read-back request: the stack is healthy then, but retry a little anyway."""
        last = ""
        for attempt in range(tries):
            try:
                response = await asyncio.wait_for(client.request(method, path, **kwargs), self.timeout)
                if response.status_code == 200:
                    return response.json()
                last = f"HTTP {response.status_code} {response.text[:200]}"
            except (httpx.HTTPError, TimeoutError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(0.5 * (attempt + 1))
        raise RuntimeError(f"{method} {path}: {last}")

    async def _room(self) -> None:
        body = {"preset": "public_chat", "name": f"chaos {self.run_id}"}
        self.room = (await self._call(self.clients[0], "POST", "/_matrix/client/v3/createRoom", json=body))["room_id"]
        for client in self.clients[1:]:
            await self._call(client, "POST", f"/_matrix/client/v3/join/{quote(self.room)}", json={})

    async def _initial_sync(self, client: httpx.AsyncClient) -> str:
        params = {"filter": SYNC_FILTER, "timeout": "0"}
        return (await self._call(client, "GET", "/_matrix/client/v3/sync", params=params))["next_batch"]

    # -- load
    def body(self, sender: int, seq: int) -> str:
        return f"chaos {self.run_id} sender {sender} seq {seq}"

    async def _sender(self, i: int) -> None:
        client, result = self.clients[i], self.result
        seq = 0
        while not self.stop_sending.is_set():
            seq += 1
            txn = f"{self.run_id}-{i}-{seq}"
            path = f"/_matrix/client/v3/rooms/{quote(self.room)}/send/m.room.message/{txn}"
            content = {"msgtype": "m.text", "body": self.body(i, seq)}
            backoff = 0.2
            while True:  # the same txn id until acknowledged (cancelled by _drain if that takes too long)
                started = self.now()
                event_id, outcome = None, "ok"
                self.sending[i] = started
                try:
                    response = await asyncio.wait_for(client.put(path, json=content), self.timeout)
                    if response.status_code == 200 and "event_id" in response.json():
                        event_id = response.json()["event_id"]
                    else:
                        outcome = f"HTTP {response.status_code}"
                except (httpx.TimeoutException, TimeoutError):
                    outcome = "timeout"
                except (httpx.HTTPError, ValueError) as exc:  # connection refused/reset, bad JSON
                    outcome = type(exc).__name__
                finally:
                    self.sending.pop(i, None)
                result.attempts.append(Attempt(i, seq, txn, started, self.now() - started, outcome, event_id))
                if event_id:
                    result.acked[(i, seq)] = event_id
                    break
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            await asyncio.sleep(self.interval)

    async def _syncer(self, i: int, since: str) -> None:
        client, bound = self.clients[i], self.result.sync_bound
        backoff = 0.2
        while not self.stop_syncing.is_set():
            started = self.now()
            outcome = "ok"
            try:
                response = await asyncio.wait_for(client.get("/_matrix/client/v3/sync", params={
                    "since": since, "timeout": str(SYNC_POLL_MS), "filter": SYNC_FILTER}), bound)
                if response.status_code != 200:
                    outcome = f"HTTP {response.status_code}"
                else:
                    body = response.json()
                    room = body.get("rooms", {}).get("join", {}).get(self.room)
                    events: list[str] = []
                    if room:
                        timeline = room.get("timeline", {})
                        events = [e["event_id"] for e in timeline.get("events", [])]
                        if timeline.get("limited"):  # what a client does with a gap: fill it via /messages
                            events = await self._gap(client, timeline["prev_batch"], since) + events
                    for event_id in set(events):
                        self.delivered[i][event_id] += 1
                    since = body["next_batch"]
            except (httpx.TimeoutException, TimeoutError):
                outcome = "timeout"
            except (httpx.HTTPError, ValueError, KeyError, RuntimeError) as exc:
                outcome = type(exc).__name__
            self.result.syncs.append(SyncCall(i, started, self.now() - started, outcome))
            if outcome != "ok":
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            else:
                backoff = 0.2

    async def _gap(self, client: httpx.AsyncClient, prev_batch: str, since: str) -> list[str]:
        ids: list[str] = []
        params = {"dir": "b", "from": prev_batch, "to": since, "limit": "100", "filter": MESSAGES_ONLY}
        for _ in range(100):
            body = await self._call(client, "GET", f"/_matrix/client/v3/rooms/{quote(self.room)}/messages",
                                    tries=1, params=params)
            ids += [e["event_id"] for e in body.get("chunk", [])]
            if "end" not in body or not body.get("chunk"):
                break
            params["from"] = body["end"]
        return ids

    # -- faults
    def remaining(self) -> float:
        return self.budget - self.now()

    def acks(self) -> int:
        return len(self.result.acked)

    async def _cli(self, *args: str, timeout: float = 30) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(SW, *args, env=self.stack.env, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return -1, f"synapse-workers {' '.join(args)}: no answer in {timeout}s"
        return proc.returncode or 0, out.decode(errors="replace")

    async def _status(self) -> dict[str, dict]:
        code, out = await self._cli("status", "--json")
        if code != 0:
            raise RuntimeError(f"status --json exited {code}: {out}")
        return {row["name"]: row for row in json.loads(out)}

    async def _healthy(self, program: str | None = None, old_pid: int = 0) -> str:
        """"" when `health` exits 0 and `status` shows every program up (program under a new PID)."""
        code, out = await self._cli("health")
        if code != 0:
            return out.strip().replace("\n", "; ")
        rows = await self._status()
        down = [f"{n} {r['state']}" for n, r in rows.items()
                if r["state"] not in ("STARTING", "RUNNING") or not r["pid"]]
        if down:
            return "down: " + ", ".join(down)
        if program and rows[program]["pid"] in (0, old_pid):
            return f"{program} still has the old pid"
        return ""

    async def _wait(self, what: str, timeout: float, check) -> float | None:
        """Poll `check` (async, returns "" when done) until done; returns when, or None (and records why)."""
        deadline = min(self.now() + timeout, self.budget)
        last = ""
        while True:
            if self.stack.proc is not None and self.stack.proc.poll() is not None:
                self.result.aborted = (f"`synapse-workers run` exited with code {self.stack.proc.returncode} "
                                       f"while waiting for {what}")
                return None
            last = await check()
            if not last:
                return self.now()
            if self.now() >= deadline:
                why = "the budget is spent" if deadline == self.budget else f"not within {timeout:.0f}s"
                self.result.aborted = f"{what}: {why} (last: {last[:300]})"
                return None
            await asyncio.sleep(0.25)

    async def _kill_sequence(self) -> None:
        for program in self.kills:
            if await self._wait("a healthy stack before the next kill", self.recover_timeout, self._healthy) is None:
                return
            target = self.acks() + self.between
            if await self._wait(f"{self.between} acknowledged sends", self.recover_timeout,
                                self._acked(target)) is None:
                return
            rows = await self._status()
            kill = Kill(program, KIND.get(program, program), pid=rows[program]["pid"])
            await self._mid_request()
            self.result.kills.append(kill)
            os.kill(kill.pid, signal.SIGKILL)
            kill.at = self.now()
            self.log(f"chaos: +{kill.at:.1f}s SIGKILL {program} (pid {kill.pid}); {self.acks()} acknowledged so far")
            back = await self._wait(f"{program} back and healthy", self.recover_timeout,
                                    lambda p=program, pid=kill.pid: self._healthy(p, pid))
            if back is None:
                kill.error = self.result.aborted
                return
            kill.health_s = back - kill.at
            kill.new_pid = (await self._status())[program]["pid"]
            first = await self._wait(f"a send acknowledged after killing {program}", self.recover_timeout,
                                     self._acked_after(kill.at))
            if first is None:
                kill.error = self.result.aborted
                return
            kill.first_ack_s = self._first_ack(kill.at) - kill.at
            self.log(f"chaos: {program} back (pid {kill.new_pid}): healthy after {kill.health_s:.1f}s, first "
                     f"acknowledged send after {kill.first_ack_s:.1f}s")
        if await self._wait("a healthy stack after the last kill", self.recover_timeout, self._healthy) is not None:
            target = self.acks() + self.between
            await self._wait(f"{self.between} acknowledged sends at the end", self.recover_timeout,
                             self._acked(target))

    async def _mid_request(self, within: float = 5.0, into: float = 0.01) -> None:
        """Wait (bounded) until a send has been in flight for `into` seconds, so the kill hits a request
        that a process is working on (the case where a retried txn id could turn into a duplicate)."""
        deadline = self.now() + within
        while self.now() < deadline:
            if any(self.now() - started >= into for started in self.sending.values()):
                return
            await asyncio.sleep(0.002)

    def _acked(self, target: int):
        async def check() -> str:
            return "" if self.acks() >= target else f"{self.acks()} of {target} acknowledged"
        return check

    def _first_ack(self, after: float) -> float | None:
        done = [a.started + a.duration for a in self.result.attempts if a.ok and a.started >= after]
        return min(done) if done else None

    def _acked_after(self, after: float):
        async def check() -> str:
            return "" if self._first_ack(after) is not None else "no acknowledged send since the kill"
        return check

    def _attribute(self) -> None:
        """Send attempts and /sync errors to the kill in whose window [kill, next kill) the client saw them
        end (a request in flight when the process died fails after the kill)."""
        kills = self.result.kills
        for n, kill in enumerate(kills):
            end = kills[n + 1].at if n + 1 < len(kills) else float("inf")
            window = [a for a in self.result.attempts if kill.at <= a.started + a.duration < end]
            kill.failed = sum(not a.ok for a in window)
            kill.timeouts = sum(a.outcome == "timeout" for a in window)
            kill.max_request_s = max((a.duration for a in window), default=0.0)
            kill.in_flight = sum(a.started < kill.at for a in window)
            kill.sync_errors = sum(1 for s in self.result.syncs
                                   if kill.at <= s.started + s.duration < end and s.outcome != "ok")

    # -- the end
    async def _drain(self, senders: list[asyncio.Task]) -> None:
        """Stop starting new messages; a message in flight still retries until acknowledged (bounded)."""
        self.stop_sending.set()
        _, pending = await asyncio.wait(senders, timeout=max(self.recover_timeout, 3 * self.timeout))
        for task in pending:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        tried = {(a.sender, a.seq) for a in self.result.attempts}
        self.result.unacked = sorted(tried - set(self.result.acked))
        self.log(f"chaos: load stopped at +{self.now():.1f}s: {self.acks()} acknowledged, "
                 f"{len(self.result.attempts)} attempts, {len(self.result.failed)} failed")

    async def _catch_up(self, syncers: list[asyncio.Task]) -> None:
        """Let every /sync loop see every acknowledged event (bounded), then stop them."""
        wanted = set(self.result.acked.values())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(wanted <= set(d) for d in self.delivered):
            await asyncio.sleep(0.5)
        self.stop_syncing.set()
        _, pending = await asyncio.wait(syncers, timeout=self.result.sync_bound + 5)
        for task in pending:
            task.cancel()
        await asyncio.gather(*syncers, return_exceptions=True)

    async def _check_member(self, i: int) -> MemberCheck:
        """Read the whole room back as member i (GET /messages dir=b down to the start) and check it."""
        client, result = self.clients[i], self.result
        check = MemberCheck(self.users[i]["user_id"])
        events: list[dict] = []
        params = {"dir": "b", "limit": "100", "filter": MESSAGES_ONLY}
        for _ in range(1000):
            body = await self._call(client, "GET", f"/_matrix/client/v3/rooms/{quote(self.room)}/messages",
                                    params=params)
            events += body.get("chunk", [])
            if "end" not in body or not body.get("chunk"):
                break
            params["from"] = body["end"]
        events.reverse()  # oldest first
        check.events = len(events)
        ids = Counter(e["event_id"] for e in events)
        check.duplicate_ids = sorted(e for e, n in ids.items() if n > 1)
        check.lost = sorted(set(result.acked.values()) - set(ids))
        bodies: dict[str, set[str]] = {}
        last_seq: dict[int, int] = {}
        senders = {u["user_id"]: n for n, u in enumerate(self.users)}
        for event in events:
            text = event.get("content", {}).get("body", "")
            bodies.setdefault(text, set()).add(event["event_id"])
            parts = text.split()
            if len(parts) != 6 or parts[1] != self.run_id or senders.get(event["sender"]) != int(parts[3]):
                check.unexpected.append(f"{event['event_id']} from {event['sender']}: {text!r}")
                continue
            sender, seq = int(parts[3]), int(parts[5])
            if result.acked.get((sender, seq), event["event_id"]) != event["event_id"]:
                check.unexpected.append(f"{event['event_id']}: {text!r} acknowledged as {result.acked[(sender, seq)]}")
            if seq <= last_seq.get(sender, 0):
                check.out_of_order.append(f"sender {sender}: seq {seq} after {last_seq[sender]}")
            last_seq[sender] = max(seq, last_seq.get(sender, 0))
        check.duplicate_bodies = sorted(t for t, found in bodies.items() if len(found) > 1)
        delivered = self.delivered[i]
        check.sync_missing = sum(1 for e in result.acked.values() if e not in delivered)
        check.sync_redelivered = sum(1 for n in delivered.values() if n > 1)
        return check


__all__ = ["KILLS", "KIND", "WORKERS", "Attempt", "ChaosResult", "Kill", "MemberCheck", "run_chaos"]
