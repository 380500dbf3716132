"""A real stack under more requests than it serves at once (issue 16): the public /health under a flood.

Real nginx, real Synapse (fork mode, embedded PostgreSQL), one stack for the module. Every request is timed by a
minimal asyncio HTTP/1.1 client (one connection per request, all opened before any request is sent), so 2,000
requests in flight cost the test little CPU of the 2 it shares with the stack.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.matrix import PASSWORD, register, registration_secret, unlimited
from tests.support.stack import Stack, make_root, stack_env

pytestmark = pytest.mark.integration

WORKERS = "synchrotron, initial_synchrotron"
# Small bounds so that a test can fill a pool: long-polls hold the sync pools' requests for LONG_POLL_MS.
POOL_LIMITS = "synchrotron=4, initial_synchrotron=3"
LONG_POLL_MS = 4000
AGGREGATOR_HEADER = "X-Synapse-Workers-Aggregator"


@dataclass
class Answer:
    status: int  # 0: no answer (connection refused, reset or closed without a status line)
    seconds: float  # from the request's first byte sent to the last byte of the answer
    connect_seconds: float
    headers: dict[str, str]
    body: bytes
    error: str = ""


async def _request(host: str, port: int, path: str, go: asyncio.Event, connected: list[int],
                   headers: str = "") -> Answer:
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        return Answer(0, 0.0, time.monotonic() - started, {}, b"", f"connect: {exc!r}")
    connect = time.monotonic() - started
    connected[0] += 1
    await go.wait()
    sent = time.monotonic()
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
        error = ""
    except OSError as exc:
        raw, error = b"", repr(exc)
    finally:
        writer.close()
    took = time.monotonic() - sent
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1."):
        return Answer(0, took, connect, {}, raw, error or "no status line")
    fields = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    if fields.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return Answer(int(lines[0].split()[1]), took, connect, fields, body)


def _dechunk(data: bytes) -> bytes:
    """A chunked HTTP/1.1 body (RFC 9112 7.1), whole."""
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)


async def _flood(host: str, port: int, path: str, count: int, headers: str = "") -> list[Answer]:
    """`count` connections opened first (all held at once), then one request on each, sent together."""
    go = asyncio.Event()
    connected = [0]
    tasks = [asyncio.create_task(_request(host, port, path, go, connected, headers)) for _ in range(count)]
    deadline = time.monotonic() + 30
    while connected[0] < count and time.monotonic() < deadline and not all(t.done() for t in tasks):
        await asyncio.sleep(0.01)
    go.set()
    return list(await asyncio.gather(*tasks))


def flood(port: int, path: str, count: int, headers: str = "") -> list[Answer]:
    return asyncio.run(_flood("127.0.0.1", port, path, count, headers))


async def _keep_asking(port: int, path: str, clients: int, seconds: float) -> tuple[dict[int, int], float, int]:
    """`clients` keep-alive connections each asking `path` again as soon as answered, for `seconds`:
    (status → count, slowest answer, answers)."""
    statuses: dict[int, int] = {}
    slowest = 0.0
    deadline = time.monotonic() + seconds

    async def client() -> None:
        nonlocal slowest
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                sent = time.monotonic()
                writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next(int(line.split(":", 1)[1]) for line in lines
                              if line.lower().startswith("content-length:"))
                await reader.readexactly(length)
                slowest = max(slowest, time.monotonic() - sent)
                status = int(lines[0].split()[1])
                statuses[status] = statuses.get(status, 0) + 1
                if any(line.lower() == "connection: close" for line in lines):  # nginx's keepalive_requests
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return statuses, slowest, sum(statuses.values())


def _enough_descriptors(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 256
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.fail(f"this test holds {count} connections: RLIMIT_NOFILE's hard limit {hard} is too low")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# Client endpoints peers route to workers that Synapse 1.163.2 registers only behind these switches.
EXPERIMENTAL = {"msc4143_enabled": True, "msc3814_enabled": True, "msc4306_enabled": True}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    root = make_root("sw-pressure-")
    running = Stack(stack_env(root, WORKERS, SYNAPSE_LAUNCH_MODE="fork", SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK="1",
                              NGINX_POOL_LIMITS=POOL_LIMITS))
    try:
        generated = running.cli("generate")
        assert generated.returncode == 0, generated.stderr
        homeserver = Path(running.env["SYNAPSE_CONFIG_DIR"], "homeserver.yaml")
        config = yaml.safe_load(homeserver.read_text())
        config["experimental_features"] = EXPERIMENTAL
        homeserver.write_text(yaml.safe_dump(config, sort_keys=False))  # in place: its owner and mode stay
        running.start(300)
        yield running
    finally:
        running.close(root)
        shutil.rmtree(root, ignore_errors=True)


def plan_json(stack: Stack) -> dict:
    result = stack.cli("plan", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def aggregator_counters(stack: Stack) -> tuple[int, int]:
    """(requests, refreshes) the launcher's aggregator has seen, asked on its loopback port (this request counts)."""
    plan = plan_json(stack)
    answer = httpx.get(f"http://127.0.0.1:{plan['health_port']}/health", timeout=10)
    fields = dict(part.split("=") for part in answer.headers[AGGREGATOR_HEADER].split())
    return int(fields["requests"]), int(fields["refreshes"])


@pytest.mark.parametrize("count", [300, 2000])
def test_a_flood_of_public_health_requests_is_answered_200_within_a_second(stack: Stack, count: int):
    _enough_descriptors(count)
    port = int(stack.env["SYNAPSE_HTTP_PORT"])
    requests_before, refreshes_before = aggregator_counters(stack)
    started = time.monotonic()
    answers = flood(port, "/health", count)
    took = time.monotonic() - started
    requests_after, refreshes_after = aggregator_counters(stack)

    statuses: dict[int, int] = {}
    for answer in answers:
        statuses[answer.status] = statuses.get(answer.status, 0) + 1
    slowest = max(answer.seconds for answer in answers)
    errors = sorted({answer.error for answer in answers if answer.error})
    assert statuses == {200: count}, (statuses, took, errors, stack.tail(20))
    assert slowest < 1.0, sorted(answer.seconds for answer in answers)[-10:]
    assert all(answer.body == b"OK" for answer in answers)
    # What a client sees: no counters, nothing an outer cache would keep.
    assert all(AGGREGATOR_HEADER.lower() not in answer.headers for answer in answers)
    assert all(answer.headers.get("cache-control") == "no-store" for answer in answers)
    # nginx asked the aggregator about once a second of the flood (plus the first), never once per request:
    # minus our own request after the flood.
    reached = requests_after - requests_before - 1
    print(f"/health x{count}: slowest {slowest:.3f}s, flood {took:.2f}s, aggregator reached {reached} times")
    assert reached <= int(took) + 2, (reached, took)
    assert refreshes_after - refreshes_before <= int(took) + 3, (refreshes_after - refreshes_before, took)


def test_a_sustained_flood_reaches_the_aggregator_about_once_a_second(stack: Stack):
    """300 clients asking /health back to back for 5 s (thousands of requests): each answered 200 within a
    second, and the aggregator asked about once a second."""
    port = int(stack.env["SYNAPSE_HTTP_PORT"])
    requests_before, _ = aggregator_counters(stack)
    started = time.monotonic()
    statuses, slowest, answered = asyncio.run(_keep_asking(port, "/health", 300, 5.0))
    took = time.monotonic() - started
    requests_after, _ = aggregator_counters(stack)
    reached = requests_after - requests_before - 1
    print(f"/health sustained: {answered} answers in {took:.1f}s, slowest {slowest:.3f}s, aggregator reached {reached}")
    assert statuses == {200: answered} and answered > 1000, statuses
    assert slowest < 1.0, slowest
    assert reached <= int(took) + 2, (reached, took)


def test_the_public_health_follows_the_stack_within_seconds(stack: Stack):
    """The copy nginx keeps is at most a second old while the verdict is quick: a worker that stops answering
    turns the public /health 503 within its checks' timeout (3 s) plus the copy's second, and back."""
    import os
    import signal

    from tests.support.stack import wait_for

    pid = stack.processes()["synchrotron1"]
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert wait_for(lambda: httpx.get(f"{stack.base_url}/health", timeout=5).status_code == 503, 10, 0.1)
        turned = time.monotonic() - started
        assert turned < 3 + 1 + 1.5, turned
        body = httpx.get(f"{stack.base_url}/health", timeout=5).json()
        assert "synchrotron1" in body["unhealthy"], body
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_for(lambda: httpx.get(f"{stack.base_url}/health", timeout=5).status_code == 200, 10, 0.1)


# ---- nginx's copy of the verdict, with the aggregator in front of stub processes ------------------------------


@pytest.mark.parametrize("buffering", ["on", "off"])
def test_the_first_flood_waits_for_one_verdict_and_a_dead_aggregator_shows_within_seconds(buffering: str):
    """With stubs for the processes: 300 requests before any verdict exists reach the aggregator once (the
    others wait for that one); once the aggregator is gone, nginx's copy is served at most 5 s past its second,
    then clients see that nothing answers (502), however often they ask. NGINX_PROXY_BUFFERING=off (nginx keeps
    no copy of an unbuffered answer) changes nothing here."""
    from synapse_workers.programs import Health
    from synapse_workers.run.health import Aggregator
    from tests.integration.test_nginx_routing import Deployment
    from tests.support.stubs import wait_connectable

    dep = Deployment("health-copy", {"SYNAPSE_WORKER_TYPES": "", "NGINX_PROXY_BUFFERING": buffering})
    try:
        main = dep.fleet.stubs["main"].address
        aggregator = Aggregator({"main": Health("http", f"http://{main}/health")}, dep.plan.health_port, ttl=0.0)
        aggregator.start()
        try:
            wait_connectable(f"127.0.0.1:{dep.plan.health_port}")
            answers = flood(dep.plan.public.port, "/health", 300)
            assert {answer.status for answer in answers} == {200}, dep.nginx.log()[-2000:]
            assert aggregator.requests == 1, aggregator.requests
            assert max(answer.seconds for answer in answers) < 1.0
        finally:
            aggregator.stop()
        stopped = time.monotonic()
        seen = []
        while time.monotonic() - stopped < 15:
            status = httpx.get(f"{dep.base}/health", timeout=5).status_code
            seen.append((round(time.monotonic() - stopped, 2), status))
            if status != 200:
                break
            time.sleep(0.05)
        print(f"aggregator gone: public /health {seen[-1][1]} after {seen[-1][0]}s")
        assert seen[-1][1] == 502, seen[-5:]
        assert seen[-1][0] < 1 + 5 + 1.5, seen[-5:]
    finally:
        dep.close()


# ---- the initial-sync pool, with real Synapse processes ------------------------------------------------------


def _served_by(stack: Stack, marker: str) -> str:
    """The process whose public port nginx's access log names for the one request whose line holds `marker`."""
    plan = plan_json(stack)
    ports = {f"127.0.0.1:{lst['port']}": proc["name"] for proc in [plan["main"], *plan["workers"]]
             for lst in proc["listeners"] if lst["kind"] == "public"}
    log = Path(stack.env["SYNAPSE_DATA_DIR"], "logs", "nginx-access.log")
    lines = [line for line in log.read_text().splitlines() if marker in line]
    assert len(lines) == 1, lines
    upstream = lines[0].split("upstream=", 1)[1].split()[0]
    return ports[upstream]


def test_initial_syncs_are_served_by_the_initial_pool_and_incremental_ones_by_synchrotron(stack: Stack):
    """Real Synapse behind real nginx: an initial /sync (and full_state=true, /events without from, initialSync)
    is answered 200 by initial_synchrotron1, the incremental one by synchrotron1, as nginx's access log shows."""
    secret = registration_secret(stack.env["SYNAPSE_DATA_DIR"])
    user = register(stack.base_url, secret, f"initial{int(time.time())}")
    headers = {"Authorization": f"Bearer {user['access_token']}"}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=60) as client:
        first = client.get("/_matrix/client/v3/sync", params={"timeout": "0", "set_presence": "offline",
                                                                "filter": '{"room":{"timeline":{"limit":1}}}'})
        assert first.status_code == 200, first.text
        since = first.json()["next_batch"]
        requests = {
            "initial": ("/_matrix/client/v3/sync", {"timeout": "0", "set_presence": "offline"}),
            "full_state": ("/_matrix/client/v3/sync", {"since": since, "full_state": "true", "timeout": "0"}),
            "incremental": ("/_matrix/client/v3/sync", {"since": since, "timeout": "0"}),
            "events_initial": ("/_matrix/client/v3/events", {"timeout": "0"}),
            "global_initial_sync": ("/_matrix/client/v3/initialSync", {"limit": "1"}),
        }
        served = {}
        for name, (path, params) in requests.items():
            answer = client.get(path, params={**params, "marker": name})
            assert answer.status_code == 200, (name, answer.status_code, answer.text)
            time.sleep(0.2)  # nginx writes its access log line once the answer is sent
            served[name] = _served_by(stack, f"marker={name}")
    assert served == {"initial": "initial_synchrotron1", "full_state": "initial_synchrotron1",
                      "incremental": "synchrotron1", "events_initial": "initial_synchrotron1",
                      "global_initial_sync": "initial_synchrotron1"}, served


# ---- bounds per pool: past the limit, 429 at once --------------------------------------------------------------


@pytest.fixture(scope="module")
def user(stack: Stack) -> dict:
    """A registered user, its headers, and a since token (from an initial sync)."""
    secret = registration_secret(stack.env["SYNAPSE_DATA_DIR"])
    answer = register(stack.base_url, secret, f"bounded{int(time.time())}")
    headers = {"Authorization": f"Bearer {answer['access_token']}"}
    first = httpx.get(f"{stack.base_url}/_matrix/client/v3/sync", params={"timeout": "0"}, headers=headers,
                      timeout=60)
    assert first.status_code == 200, first.text
    return {**answer, "headers": headers, "since": first.json()["next_batch"]}


@pytest.mark.parametrize(
    "pool, limit, path",
    [
        ("synchrotron", 4, "/_matrix/client/v3/sync?since={since}&timeout={ms}"),  # incremental long-polls
        ("initial_synchrotron", 3, "/_matrix/client/v3/events?timeout={ms}"),  # initial class (no from), long-polls
    ],
)
def test_past_its_limit_a_pool_answers_429_at_once_and_the_others_keep_serving(stack, user, pool, limit, path):
    """K concurrent long-polls on one pool: exactly `limit` are held (answered 200 once the long-poll ends), every
    other one gets 429 within a second, with Retry-After and Matrix's M_LIMIT_EXCEEDED body; meanwhile main
    (versions, login), the other sync pool and /health answer 200 as usual."""
    count = 12
    target = path.format(since=user["since"], ms=LONG_POLL_MS)
    auth = f"Authorization: {user['headers']['Authorization']}\r\n"
    port = int(stack.env["SYNAPSE_HTTP_PORT"])
    other = ("/_matrix/client/v3/events?timeout=0" if pool == "synchrotron"
             else f"/_matrix/client/v3/sync?since={user['since']}&timeout=0")

    async def scenario() -> tuple[list[Answer], dict[str, int], float]:
        flood_task = asyncio.create_task(_flood("127.0.0.1", port, target, count, auth))
        await asyncio.sleep(1.0)  # the flood is in: the pool is full while its long-polls last
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as client:
            started = time.monotonic()
            meanwhile = {
                "versions": (await client.get("/_matrix/client/versions")).status_code,
                "login": (await client.post("/_matrix/client/v3/login", json={
                    "type": "m.login.password", "identifier": {"type": "m.id.user", "user": user["user_id"]},
                    "password": PASSWORD})).status_code,
                "other_sync_pool": (await client.get(other, headers=user["headers"])).status_code,
                "health": (await client.get("/health")).status_code,
                "same_pool": (await client.get(target, headers=user["headers"])).status_code,
            }
            took = time.monotonic() - started
        return await flood_task, meanwhile, took

    answers, meanwhile, took = asyncio.run(scenario())
    held = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status == 429]
    assert len(held) == limit and len(refused) == count - limit, sorted(a.status for a in answers)
    assert all(a.seconds >= LONG_POLL_MS / 1000 - 0.5 for a in held), [a.seconds for a in held]
    assert max(a.seconds for a in refused) < 1.0, [a.seconds for a in refused]
    for answer in refused:
        assert answer.headers.get("retry-after", "").isdigit() and int(answer.headers["retry-after"]) >= 1
        assert answer.headers.get("content-type", "").startswith("application/json")
        body = json.loads(answer.body)
        assert body["errcode"] == "M_LIMIT_EXCEEDED" and body["retry_after_ms"] == 1000 * int(
            answer.headers["retry-after"]), body
        assert pool in body["error"], body
    assert meanwhile == {"versions": 200, "login": 200, "other_sync_pool": 200, "health": 200, "same_pool": 429}, \
        meanwhile
    assert took < 2.0, took
    # The pool took requests again once its long-polls ended.
    again = httpx.get(f"{stack.base_url}{path.format(since=user['since'], ms=0)}", headers=user["headers"],
                      timeout=30)
    assert again.status_code == 200, again.text


def test_each_request_counts_against_the_pool_that_serves_it():
    """With stubs that hold a request as long as it asks (X-Stub-Delay): main at its bound answers 429 for what
    only main serves, including the write of a method-split route, while the read of that route (a client_reader's)
    and the sync pools answer; an initial sync counts against the initial pool only, an incremental one against
    synchrotron."""
    from tests.integration.test_nginx_routing import Deployment

    dep = Deployment("bounds", {"SYNAPSE_WORKER_TYPES": "synchrotron, initial_synchrotron, client_reader",
                                "NGINX_POOL_LIMITS": "main=3, initial_synchrotron=2"})
    try:
        port = dep.plan.public.port
        hold = "X-Stub-Delay: 2\r\n"

        async def scenario(path: str, count: int, meanwhile: dict[str, tuple[str, str]]):
            flood_task = asyncio.create_task(_flood("127.0.0.1", port, path, count, hold))
            await asyncio.sleep(0.7)
            async with httpx.AsyncClient(base_url=dep.base, timeout=10) as client:
                seen = {name: (await client.request(method, target, content=b"{}" if method == "PUT" else None))
                        .status_code for name, (method, target) in meanwhile.items()}
            return await flood_task, seen

        answers, seen = asyncio.run(scenario("/nowhere", 8, {
            "push rules read (client_reader)": ("GET", "/_matrix/client/v3/pushrules/"),
            "push rules write (main)": ("PUT", "/_matrix/client/v3/pushrules/global/room/%21r%3Ax"),
            "initial sync": ("GET", "/_matrix/client/v3/sync"),
            "incremental sync": ("GET", "/_matrix/client/v3/sync?since=s1"),
        }))
        assert sorted(a.status for a in answers) == [200] * 3 + [429] * 5
        assert all(a.seconds < 1.0 for a in answers if a.status == 429)
        assert all(a.seconds >= 1.5 for a in answers if a.status == 200)
        assert seen == {"push rules read (client_reader)": 200, "push rules write (main)": 429,
                        "initial sync": 200, "incremental sync": 200}, seen

        answers, seen = asyncio.run(scenario("/_matrix/client/v3/sync?timeout=0", 5, {
            "incremental sync": ("GET", "/_matrix/client/v3/sync?since=s1"),
            "initialSync": ("GET", "/_matrix/client/v3/initialSync"),
            "main": ("GET", "/nowhere"),
        }))
        assert sorted(a.status for a in answers) == [200] * 2 + [429] * 3
        assert all(json.loads(a.body)["errcode"] == "M_LIMIT_EXCEEDED" for a in answers if a.status == 429)
        assert "initial_synchrotron pool" in json.loads(next(a.body for a in answers if a.status == 429))["error"]
        assert seen == {"incremental sync": 200, "initialSync": 429, "main": 200}, seen
    finally:
        dep.close()


def test_a_request_a_stand_in_serves_counts_once_against_the_pool_it_was_sent_to():
    """The initial pool down (its stubs closed before any request): initial syncs go to the synchrotron, still
    bounded by the initial pool's limit, and the synchrotron's own bound is left to incremental syncs."""
    from tests.integration.test_nginx_routing import Deployment

    dep = Deployment("bounds-down", {"SYNAPSE_WORKER_TYPES": "synchrotron, initial_synchrotron",
                                     "NGINX_POOL_LIMITS": "initial_synchrotron=2, synchrotron=3"})
    try:
        dep.fleet.stubs.pop("initial_synchrotron1").close()
        port = dep.plan.public.port

        async def scenario():
            initial = asyncio.create_task(_flood("127.0.0.1", port, "/_matrix/client/v3/sync", 5,
                                                 "X-Stub-Delay: 2\r\n"))
            await asyncio.sleep(0.7)
            incremental = await _flood("127.0.0.1", port, "/_matrix/client/v3/sync?since=s1", 3,
                                       "X-Stub-Delay: 0.5\r\n")
            return await initial, incremental

        initial, incremental = asyncio.run(scenario())
        assert sorted(a.status for a in initial) == [200] * 2 + [429] * 3
        held = [json.loads(a.body)["process"] for a in initial if a.status == 200]
        assert held == ["synchrotron1"] * 2, held
        assert [a.status for a in incremental] == [200] * 3  # the synchrotron's 3 were all free
    finally:
        dep.close()


# ---- endpoints peers route to workers: where a running generic worker serves them ------------------------------

# (method, path, status): a generic worker of Synapse 1.163.2 serves it (with the switches above), so without a
# token it answers 401 (one checks its body first: 400 M_BAD_JSON for an empty one), never 404/405; the catalogue
# routes each to a worker (tests/integration/request_table.py says which).
SERVED_BY_WORKERS = (
    ("GET", "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports", 401),
    ("GET", "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device", 401),
    ("PUT", "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device", 400),
    ("DELETE", "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device", 401),
    ("POST", "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device/ABCDEFGH/events", 401),
    ("GET", "/_matrix/client/unstable/io.element.msc4308/thread_subscriptions?dir=b", 401),
    ("PUT", "/_matrix/client/unstable/io.element.msc4306/rooms/%21r%3Alocalhost/thread/%24e/subscription", 401),
)
# Controls: what a generic worker does not serve answers 404 or 405 without a token (main answers 401).
NOT_SERVED_BY_WORKERS = (
    ("POST", "/_matrix/client/v3/logout"),
    ("POST", "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports"),
)


def test_a_running_worker_serves_the_endpoints_routed_to_workers(stack: Stack):
    plan = plan_json(stack)
    worker = next(w for w in plan["workers"] if w["name"] == "synchrotron1")
    port = next(lst["port"] for lst in worker["listeners"] if lst["kind"] == "public")
    main = f"http://127.0.0.1:{next(lst['port'] for lst in plan['main']['listeners'] if lst['kind'] == 'public')}"
    with httpx.Client(timeout=30) as client:
        for method, path, status in SERVED_BY_WORKERS:
            answer = client.request(method, f"http://127.0.0.1:{port}{path}", content=b"{}")
            assert answer.status_code == status, (method, path, answer.status_code, answer.text)
            if status == 400:
                assert answer.json()["errcode"] == "M_BAD_JSON", answer.text
        for method, path in NOT_SERVED_BY_WORKERS:
            answer = client.request(method, f"http://127.0.0.1:{port}{path}", content=b"{}")
            assert answer.status_code in (404, 405), (method, path, answer.status_code, answer.text)
            assert client.request(method, f"{main}{path}", content=b"{}").status_code in (401, 405), (method, path)


HEAVY_ROOMS = 100


def test_concurrent_initial_syncs_of_a_large_account_beyond_the_bound(stack: Stack):
    """A user in HEAVY_ROOMS rooms (rate limits lifted through the admin API): 10 of its initial syncs at once on
    an initial pool bounded at 3: exactly 3 are computed and answered 200 (with every room), the other 7 get 429
    within a second, with Retry-After and M_LIMIT_EXCEEDED; an incremental sync meanwhile answers 200."""
    secret = registration_secret(stack.env["SYNAPSE_DATA_DIR"])
    admin = register(stack.base_url, secret, f"admin{int(time.time())}", admin=True)
    heavy = register(stack.base_url, secret, f"heavy{int(time.time())}")
    unlimited(stack.base_url, admin["access_token"], heavy["user_id"])
    headers = {"Authorization": f"Bearer {heavy['access_token']}"}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=120) as client:
        for i in range(HEAVY_ROOMS):
            client.post("/_matrix/client/v3/createRoom", json={"name": f"room {i}"}).raise_for_status()
        since = client.get("/_matrix/client/v3/sync", params={"timeout": "0", "filter": '{"room":{"rooms":[]}}'},
                           ).raise_for_status().json()["next_batch"]
    port = int(stack.env["SYNAPSE_HTTP_PORT"])
    auth = f"Authorization: Bearer {heavy['access_token']}\r\n"

    async def scenario() -> tuple[list[Answer], int, float]:
        flood_task = asyncio.create_task(_flood("127.0.0.1", port, "/_matrix/client/v3/sync?timeout=0", 10, auth))
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=60) as client:
            started = time.monotonic()
            status = (await client.get("/_matrix/client/v3/sync", params={"since": since, "timeout": "0"})).status_code
            took = time.monotonic() - started
        return await flood_task, status, took

    answers, incremental, took = asyncio.run(scenario())
    held = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status == 429]
    print(f"initial syncs of {HEAVY_ROOMS} rooms: 200 in {sorted(round(a.seconds, 2) for a in held)} s, 429 in "
          f"at most {max((a.seconds for a in refused), default=0):.3f} s; incremental meanwhile {took:.2f} s")
    assert len(held) == 3 and len(refused) == 7, sorted(a.status for a in answers)
    assert all(len(json.loads(a.body)["rooms"]["join"]) == HEAVY_ROOMS for a in held)
    assert max(a.seconds for a in refused) < 1.0
    assert all(a.headers.get("retry-after") and json.loads(a.body)["errcode"] == "M_LIMIT_EXCEEDED" for a in refused)
    assert incremental == 200
