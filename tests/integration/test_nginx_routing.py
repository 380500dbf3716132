"""Real nginx, generated config, stub upstreams: every request must reach the right process.

For each topology: generate the deployment (`synapse-workers generate`), put a stub HTTP server on every
process's public listener (TCP or unix socket, as the plan says), start nginx from the generated
nginx.conf, send requests to the public port and check which stub answered. Expectations come from our
own request table (request_table.py, written from the reference docs), never from catalog.py.

nginx runs once per topology (module-scoped registry); everything started is stopped at module teardown,
also on failure.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import string
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from synapse_workers import cli
from synapse_workers.load import load_plan
from synapse_workers.routing import explain
from tests.conftest import free_port, isolated_env
from tests.integration.request_table import GROUPS, PRIVATE, REQUESTS, Req
from tests.support.nginx import NGINX, Nginx
from tests.support.stubs import stubs_for_plan, wait_connectable

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists(NGINX), reason=f"nginx not installed ({NGINX})"),
]

SYNC2 = "synchrotron:2, event_persister:2, media_repository, stream_writers=typing+to_device+receipts"
COMPLEMENT = (
    "event_persister:2, background_worker, event_creator, user_dir, media_repository, federation_inbound, "
    "federation_reader, federation_sender, synchrotron, client_reader, appservice, pusher, device_lists:2, "
    "stream_writers=account_data+presence+receipts+to_device+typing"
)
READERS = "client_reader:2, push_rules, thread_subscriptions, account_data"
UNIX = "synchrotron:2, client_reader, media_repository, federation_inbound, event_creator, typing+to_device"
STICKY = "synchrotron:2, federation_inbound:2, event_creator:2, federation_reader:2, receipts:2"
INITIAL_SPLIT = "synchrotron:2, initial_synchrotron:2, client_reader"

# name -> extra environment ({root} is the topology's temp dir).
TOPOLOGIES: dict[str, dict[str, str]] = {
    "monolith": {"SYNAPSE_WORKER_TYPES": ""},
    "sync2": {"SYNAPSE_WORKER_TYPES": SYNC2},
    "complement": {"SYNAPSE_WORKER_TYPES": COMPLEMENT},
    "full": {"SYNAPSE_WORKER_TYPES": "full"},
    "readers": {"SYNAPSE_WORKER_TYPES": READERS},
    "unix": {
        "SYNAPSE_WORKER_TYPES": UNIX,
        "SYNAPSE_PUBLIC_UNIX_SOCKETS": "1",
        "SYNAPSE_MAX_UPLOAD_SIZE": "1M",
        "NGINX_LISTEN_UNIX_SOCKET": "{root}/public.sock",
    },
    "sticky": {"SYNAPSE_WORKER_TYPES": STICKY},
    "initial": {"SYNAPSE_WORKER_TYPES": INITIAL_SPLIT},
    "initial_only": {"SYNAPSE_WORKER_TYPES": "initial_synchrotron, event_creator, client_reader"},
}
ROUTING_TOPOLOGIES = ("monolith", "sync2", "complement", "full", "readers", "unix", "sticky", "initial", "initial_only")
BODY = b'{"test": true}'


# ------------------------------------------------------------------------------------------------------
# Deployments: generate, stubs, nginx
# ------------------------------------------------------------------------------------------------------


def make_env(root: Path, extra: dict[str, str]) -> dict[str, str]:
    """Like conftest's base_env (module-scoped here, so built by hand), plus the topology's variables."""
    env = {**isolated_env(root), "POSTGRES_PASSWORD": "not-a-real-password"}
    env.update({k: v.format(root=root) for k, v in extra.items()})
    return env


class Deployment:
    """One generated topology with stubs and a running nginx."""

    def __init__(self, name: str, extra: dict[str, str]) -> None:
        self.name = name
        self._stack = ExitStack()
        try:
            self.root = Path(tempfile.mkdtemp(prefix="sw-", dir="/tmp"))
            self._stack.callback(shutil.rmtree, self.root, ignore_errors=True)
            # Started as root, nginx workers run as `nobody`: like the real runtime dir (/run/...), the tree
            # must be traversable so they can reach unix-socket upstreams (mkdtemp makes it 0700).
            os.chmod(self.root, 0o755)
            self.env = make_env(self.root, extra)
            assert cli.main(["generate"], env=self.env) == 0, f"generate failed for {name}"
            self.plan = load_plan(self.env)
            self.fleet = self._stack.enter_context(stubs_for_plan(self.plan))
            for stub in self.fleet.stubs.values():
                wait_connectable(stub.address)
            self.nginx = self._stack.enter_context(Nginx(self.plan.layout.nginx_conf, str(self.root / "nginx.log")))
            self.base = f"http://127.0.0.1:{self.plan.public.port}"
            wait_connectable(f"127.0.0.1:{self.plan.public.port}")
            self.client = self._stack.enter_context(httpx.Client(timeout=10))
        except BaseException:
            self._stack.close()
            raise

    def close(self) -> None:
        self._stack.close()

    # -- requests --------------------------------------------------------------------------------------

    def send(self, method: str, path: str, *, client: httpx.Client | None = None, base: str | None = None,
             headers: dict[str, str] | None = None, content: bytes | None = None) -> httpx.Response:
        if content is None and method in ("POST", "PUT"):
            content = BODY
        return (client or self.client).request(method, (base or self.base) + path, headers=headers,
                                                content=content)

    def answer(self, method: str, path: str, **kwargs) -> dict:
        """Send, require a stub's 200, return its JSON."""
        resp = self.send(method, path, **kwargs)
        assert resp.status_code == 200, f"{self.name}: {method} {path} -> {resp.status_code}\n{self.nginx.log()}"
        return resp.json()

    def check(self, req: Req, **kwargs) -> list[str]:
        """Send one table request; return the problems found (empty: routed as the docs say)."""
        where = f"[{self.name}] {req.method} {req.path} ({req.group}: {req.note})"
        label, wanted = expected_processes(self.plan, req.want)
        before = len(self.fleet.hits)
        resp = self.send(req.method, req.path, **kwargs)
        problems = []
        if resp.request.url.raw_path != req.path.encode():
            problems.append(f"{where}: the test client sent {resp.request.url.raw_path!r}, not the table's path")
        if resp.status_code != 200:
            return [*problems, f"{where}: HTTP {resp.status_code} from nginx, expected a stub's 200"]
        body = resp.json()
        got = body["process"]
        if got not in wanted:
            problems.append(f"{where}: answered by {got}, expected {label} ({', '.join(sorted(wanted))})")
        if body["method"] != req.method or body["raw_path"] != req.path:
            problems.append(f"{where}: upstream saw {body['request_line']!r}, expected {req.method} {req.path} "
                            "byte for byte")
        hits = len(self.fleet.hits) - before
        if hits != 1:
            problems.append(f"{where}: {hits} upstream hits, expected exactly 1")
        emulated = explain(self.plan, req.method, req.path)
        if got not in emulated["servers"]:
            problems.append(f"{where}: `routes` says upstream {emulated['upstream']} {emulated['servers']} "
                            f"(rule {emulated.get('rule')}), nginx chose {got}")
        return problems


def expected_processes(plan, want: tuple[str, ...]) -> tuple[str, set[str]]:
    """The first type/role of the preference list that the topology deploys, else main.

    A process has a name when it is one of its roles or one of its declared types (shorthands such as
    client_reader are declared types; their roles are client_reader_room / client_reader_non_room)."""
    for name in want:
        procs = {w.name for w in plan.workers if name in w.roles or name in w.types}
        if procs:
            return name, procs
    return "main", {"main"}


class Registry:
    def __init__(self) -> None:
        self.deployments: dict[str, Deployment] = {}

    def get(self, name: str, extra: dict[str, str] | None = None) -> Deployment:
        if name not in self.deployments:
            self.deployments[name] = Deployment(name, TOPOLOGIES[name] if extra is None else extra)
        return self.deployments[name]

    def close(self) -> None:
        errors = []
        for dep in self.deployments.values():
            try:
                dep.close()
            except Exception as exc:
                errors.append(exc)
        self.deployments.clear()
        if errors:
            raise errors[0]


@pytest.fixture(scope="module")
def deployments():
    registry = Registry()
    try:
        yield registry
    finally:
        registry.close()


@pytest.fixture(scope="module")
def tls_deployment(deployments):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not installed (apt-get install openssl): cannot make a test certificate")
    certs = Path(tempfile.mkdtemp(prefix="sw-tls-", dir="/tmp"))
    try:
        cert, key = certs / "cert.pem", certs / "key.pem"
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost"],
            check=True, capture_output=True, timeout=60,
        )
        os.chmod(certs, 0o755)
        extra = {
            "SYNAPSE_WORKER_TYPES": "client_reader, media_repository, federation_inbound",
            "SYNAPSE_TLS_CERT": str(cert),
            "SYNAPSE_TLS_KEY": str(key),
            "SYNAPSE_TLS_PORT": str(free_port()),
        }
        dep = deployments.get("tls", extra)
        wait_connectable(f"127.0.0.1:{dep.plan.public.tls_port}")
        with httpx.Client(verify=False, timeout=10) as tls_client:
            yield dep, tls_client, f"https://127.0.0.1:{dep.plan.public.tls_port}"
    finally:
        shutil.rmtree(certs, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------
# The request table, per topology and docs group
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("topology", ROUTING_TOPOLOGIES)
def test_request_table(deployments, topology, group):
    dep = deployments.get(topology)
    problems = [p for req in REQUESTS if req.group == group for p in dep.check(req)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("topology", ROUTING_TOPOLOGIES)
def test_topology_exercises_workers(deployments, topology):
    """Guard against a vacuous pass: with workers deployed, a good part of the table must leave main."""
    dep = deployments.get(topology)
    to_workers = [r for r in REQUESTS if expected_processes(dep.plan, r.want)[0] != "main"]
    if topology == "monolith":
        assert not dep.plan.workers and not to_workers
    else:
        assert len(to_workers) >= 30, (topology, len(to_workers))
    assert len(REQUESTS) >= 200


def test_every_docs_group_is_covered():
    required = {"sync", "federation", "federation inbound", "client api", "admin", "encryption",
                "registration and login", "event sending", "user directory", "MSC4140", "push rules",
                "account data", "presence", "messages", "sso", "media", "stream writers", "main only"}
    assert required <= set(GROUPS)
    paths = {r.path for r in REQUESTS}
    assert any("%21room%3Aexample.org" in p for p in paths)
    assert any("%40user%3Aexample.org" in p for p in paths)
    assert any("%24event" in p for p in paths)


def test_full_table_over_tls(tls_deployment):
    dep, tls_client, base = tls_deployment
    problems = [p for req in REQUESTS for p in dep.check(req, client=tls_client, base=base)]
    assert not problems, "\n".join(problems)


def test_table_over_nginx_unix_socket(deployments):
    dep = deployments.get("unix")
    sock = dep.plan.public.unix_socket
    assert sock and os.path.exists(sock), sock
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=10) as uds_client:
        problems = [p for req in REQUESTS for p in dep.check(req, client=uds_client, base="http://localhost")]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------------
# Internal paths, headers, body size
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["monolith", "complement", "unix"])
def test_internal_paths_are_refused(deployments, topology):
    dep = deployments.get(topology)
    before = len(dep.fleet.hits)
    for method, path in PRIVATE:
        resp = dep.send(method, path)
        assert resp.status_code == 404, (method, path, resp.status_code, resp.text[:200])
        assert "X-Stub-Process" not in resp.headers, (method, path)
        assert explain(dep.plan, method, path)["status"] == 404, (method, path)
    assert dep.fleet.hits[before:] == []


def test_forwarded_headers(deployments):
    dep = deployments.get("sync2")
    for path, proc in (("/_matrix/client/v3/sync", "synchrotron"), ("/_matrix/client/versions", "main")):
        body = dep.answer("GET", path)
        assert body["process"].startswith(proc)
        assert body["x_forwarded_for"] == "127.0.0.1"
        assert body["x_forwarded_proto"] == "http"
        assert body["host"] == f"127.0.0.1:{dep.plan.public.port}"
        # A client's own forwarding headers are replaced (no SYNAPSE_TRUSTED_PROXIES: see test_forwarding.py).
        body = dep.answer("GET", path, headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7",
                                                "Host": "matrix.example.test"})
        assert body["x_forwarded_proto"] == "http"
        assert body["x_forwarded_for"] == "127.0.0.1"
        assert body["host"] == "matrix.example.test"


def test_forwarded_proto_over_tls(tls_deployment):
    dep, tls_client, base = tls_deployment
    body = dep.answer("GET", "/_matrix/media/v3/config", client=tls_client, base=base)
    assert body["process"] == "media_repository1"
    assert body["x_forwarded_proto"] == "https"
    assert body["x_forwarded_for"] == "127.0.0.1"
    body = dep.answer("PUT", "/_matrix/federation/v1/send/1", client=tls_client, base=base)
    assert body["process"] == "federation_inbound1"


def test_raw_uri_is_forwarded_unchanged(deployments):
    dep = deployments.get("sync2")
    for method, path, proc in (
        ("PUT", "/_matrix/client/v3/rooms/%21a%3Aexample.org/typing/%40u%3Aexample.org?x=%2F%21&y=a+b",
         "stream_writers1"),
        ("GET", "/_matrix/client/v3/rooms/%21a%2Fb%3Aexample.org/event/%24e%2Fv?access_token=a%2Fb", "main"),
        ("GET", "/_matrix/media/v3/download/example.org/a%2Fb%20c?allow_redirect=true", "media_repository1"),
        ("GET", "//_matrix///client/v3/sync?since=%2F", None),
    ):
        body = dep.answer(method, path)
        assert body["raw_path"] == path
        assert body["request_line"] == f"{method} {path} HTTP/1.1"
        if proc:
            assert body["process"] == proc, (path, body["process"])
        else:
            assert body["process"].startswith("synchrotron")


def test_max_upload_size(deployments):
    dep = deployments.get("unix")
    assert dep.plan.public.max_body_size == 1024 * 1024
    before = len(dep.fleet.hits)
    resp = dep.send("POST", "/_matrix/media/v3/upload", content=b"x" * (2 * 1024 * 1024))
    assert resp.status_code == 413
    assert dep.fleet.hits[before:] == []
    body = dep.answer("POST", "/_matrix/media/v3/upload", content=b"x" * (100 * 1024))
    assert body["process"] == "media_repository1"
    assert body["body_length"] == 100 * 1024


def test_cli_routes_agrees_with_nginx(deployments, capsys):
    """The `routes` command itself (not only plan.explain) names the process nginx picks."""
    dep = deployments.get("complement")
    sample = [r for r in REQUESTS if r.group in ("stream writers", "push rules", "MSC4140", "media", "sso")]
    for req in sample:
        body = dep.answer(req.method, req.path)
        capsys.readouterr()
        assert cli.main(["routes", "--json", req.method, req.path], env=dep.env) == 0
        result = json.loads(capsys.readouterr().out)
        assert body["process"] in result["servers"], (req, result)


# ------------------------------------------------------------------------------------------------------
# Stickiness
# ------------------------------------------------------------------------------------------------------

RNG = random.Random(4242)


def access_token(localpart: str) -> str:
    """A Synapse-style token: syt_<unpadded base64 localpart>_<20 letters>_<6 alnum crc>."""
    b64 = base64.b64encode(localpart.encode()).decode().rstrip("=")
    rand = "".join(RNG.choices(string.ascii_letters, k=20))
    crc = "".join(RNG.choices(string.ascii_letters + string.digits, k=6))
    return f"syt_{b64}_{rand}_{crc}"


def _sync_process(dep: Deployment, token: str, in_query: bool = False, since: str | None = None) -> str:
    query = []
    if since:
        query.append(f"since={since}")
    if in_query:
        query.append(f"access_token={token}")
    path = "/_matrix/client/v3/sync" + ("?" + "&".join(query) if query else "")
    headers = None if in_query else {"Authorization": f"Bearer {token}"}
    return dep.answer("GET", path, headers=headers)["process"]


def test_sync_is_sticky_per_user(deployments):
    dep = deployments.get("sync2")
    synchrotrons = {"synchrotron1", "synchrotron2"}
    token = access_token("alice")
    seen = {_sync_process(dep, token, since=f"s{i}_1") for i in range(20)}
    assert len(seen) == 1 and seen <= synchrotrons, seen
    alice = seen.pop()
    # Another device (another token) of the same user, and the access_token query form.
    for _ in range(5):
        other = access_token("alice")
        assert _sync_process(dep, other) == alice
        assert _sync_process(dep, other, in_query=True) == alice
    assert _sync_process(dep, token, in_query=True, since="s9_9") == alice
    # The other sync endpoints follow the same key.
    for path in ("/_matrix/client/v3/events", "/_matrix/client/r0/initialSync",
                 "/_matrix/client/v3/rooms/%21room%3Aexample.org/initialSync"):
        assert dep.answer("GET", path, headers={"Authorization": f"Bearer {token}"})["process"] == alice
    # Across users both synchrotrons work, and header and query forms always agree.
    used = set()
    for i in range(40):
        user_token = access_token(f"user{i}.{RNG.randrange(10**6)}")
        via_header = _sync_process(dep, user_token)
        assert _sync_process(dep, user_token, in_query=True) == via_header, user_token
        used.add(via_header)
    assert used == synchrotrons


INITIAL_PATHS = (
    "/_matrix/client/v3/sync",
    "/_matrix/client/v3/sync?since=s1_2&full_state=true",
    "/_matrix/client/v3/events",
    "/_matrix/client/r0/initialSync",
    "/_matrix/client/v3/rooms/%21room%3Aexample.org/initialSync",
)
INCREMENTAL_PATHS = ("/_matrix/client/v3/sync?since=s1_2&timeout=0", "/_matrix/client/v3/events?from=s1_2")


def test_initial_syncs_are_sticky_per_user_on_their_own_pool(deployments):
    """One user's initial requests (every kind) reach one initial_synchrotron, by header or query token; the
    same user's incremental syncs one synchrotron; across users both of each pool work."""
    dep = deployments.get("initial")
    initial, incremental = {"initial_synchrotron1", "initial_synchrotron2"}, {"synchrotron1", "synchrotron2"}
    used_initial, used_incremental = set(), set()
    for i in range(40):
        token = access_token(f"user{i}.{RNG.randrange(10**6)}")
        headers = {"Authorization": f"Bearer {token}"}
        first = {dep.answer("GET", path, headers=headers)["process"] for path in INITIAL_PATHS}
        sep = "&" if "?" in INITIAL_PATHS[1] else "?"
        first.add(dep.answer("GET", f"{INITIAL_PATHS[1]}{sep}access_token={token}")["process"])
        assert len(first) == 1 and first <= initial, first
        then = {dep.answer("GET", path, headers=headers)["process"] for path in INCREMENTAL_PATHS}
        assert len(then) == 1 and then <= incremental, then
        used_initial |= first
        used_incremental |= then
    assert used_initial == initial and used_incremental == incremental


def test_initial_syncs_fall_back_to_the_sync_pool_then_to_main():
    """The initial pool down (its stubs closed before any request): the user's own synchrotron answers; the sync
    pool down too: main answers everything."""
    with ExitStack() as stack:
        dep = Deployment("initial-down", {"SYNAPSE_WORKER_TYPES": INITIAL_SPLIT})
        stack.callback(dep.close)
        token = access_token("bob")
        headers = {"Authorization": f"Bearer {token}"}
        for name in ("initial_synchrotron1", "initial_synchrotron2"):
            dep.fleet.stubs.pop(name).close()
        incremental = {dep.answer("GET", path, headers=headers)["process"] for path in INCREMENTAL_PATHS}
        assert len(incremental) == 1 and incremental <= {"synchrotron1", "synchrotron2"}, incremental
        for path in INITIAL_PATHS:
            started = time.monotonic()
            body = dep.answer("GET", path, headers=headers)
            assert body["process"] in incremental and body["raw_path"] == path, (path, body["process"])
            assert time.monotonic() - started < 2, path
        both = Deployment("sync-pools-down", {"SYNAPSE_WORKER_TYPES": INITIAL_SPLIT})
        stack.callback(both.close)
        for name in ("initial_synchrotron1", "initial_synchrotron2", "synchrotron1", "synchrotron2"):
            both.fleet.stubs.pop(name).close()
        for path in (*INITIAL_PATHS, *INCREMENTAL_PATHS):
            body = both.answer("GET", path, headers=headers)
            assert body["process"] == "main" and body["raw_path"] == path, (path, body["process"])


def test_messages_are_sticky_per_room(deployments):
    dep = deployments.get("readers")
    readers = {"client_reader1", "client_reader2"}
    seen = set()
    for i in range(20):
        room = "!room:example.org" if i % 2 else "%21room%3Aexample.org"
        headers = {"Authorization": f"Bearer {access_token(f'u{i}')}"}
        seen.add(dep.answer("GET", f"/_matrix/client/v3/rooms/{room}/messages?dir=b&from=t{i}",
                            headers=headers)["process"])
    assert len(seen) == 1 and seen <= readers, seen
    used = set()
    for i in range(40):
        raw = f"!r{i}x{RNG.randrange(10**9)}:example.org"
        encoded = raw.replace("!", "%21").replace(":", "%3A")
        a = dep.answer("GET", f"/_matrix/client/r0/rooms/{raw}/messages")["process"]
        b = dep.answer("GET", f"/_matrix/client/v3/rooms/{encoded}/messages?limit=5")["process"]
        assert a == b, raw
        used.add(a)
    assert used == readers


def test_federation_send_is_sticky_per_origin(deployments):
    dep = deployments.get("sticky")
    inbound = {"federation_inbound1", "federation_inbound2"}

    def send(origin: str, txn: str) -> str:
        sig = base64.b64encode(RNG.randbytes(64)).decode().rstrip("=")
        header = (f'X-Matrix origin="{origin}",destination="example.test",key="ed25519:a_Ab12",'
                  f'sig="{sig}"')
        return dep.answer("PUT", f"/_matrix/federation/v1/send/{txn}", headers={"Authorization": header})["process"]

    seen = {send("remote.example", f"17000000{i}") for i in range(20)}
    assert len(seen) == 1 and seen <= inbound, seen
    used = {send(f"server{i}.example", "1") for i in range(40)}
    assert used == inbound


@pytest.mark.parametrize("kind, procs, make", [
    ("event sending", ("event_creator1", "event_creator2"),
     lambda room, i: ("PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message/t{i}")),
    ("membership", ("event_creator1", "event_creator2"),
     lambda room, i: ("POST", f"/_matrix/client/r0/rooms/{room}/invite")),
    ("receipts", ("receipts1", "receipts2"),
     lambda room, i: ("POST", f"/_matrix/client/v3/rooms/{room}/receipt/m.read/%24e{i}")),
    ("federation room requests", ("federation_reader1", "federation_reader2"),
     lambda room, i: ("GET", f"/_matrix/federation/v1/state_ids/{room}?event_id=%24e{i}")),
])
def test_room_keyed_routes_are_sticky(deployments, kind, procs, make):
    dep = deployments.get("sticky")
    seen = set()
    for i in range(12):
        room = "!busy:example.org" if i % 2 else "%21busy%3Aexample.org"
        seen.add(dep.answer(*make(room, i))["process"])
    assert len(seen) == 1 and seen <= set(procs), (kind, seen)
    used = {dep.answer(*make(f"%21r{i}x{RNG.randrange(10**9)}%3Aexample.org", i))["process"] for i in range(40)}
    assert used == set(procs), kind


ROOM_HISTORY = (  # a room's state and history over federation: one reader's caches answer concurrent duplicates
    ("GET", "/_matrix/federation/v1/state/{room}?event_id=%24e1"),
    ("GET", "/_matrix/federation/v1/state_ids/{room}?event_id=%24e1"),
    ("POST", "/_matrix/federation/v1/get_missing_events/{room}"),
    ("GET", "/_matrix/federation/v1/backfill/{room}?v=%24e1&limit=10"),
    ("GET", "/_matrix/federation/v1/event_auth/{room}/%24e1"),
)


def test_one_rooms_federation_history_requests_share_one_reader(deployments):
    """state, state_ids, get_missing_events, backfill and event_auth of one room reach one federation reader
    (hashed by room, whoever asks); across rooms both readers work."""
    dep = deployments.get("sticky")
    used = set()
    for i in range(30):
        room = f"%21h{i}x{RNG.randrange(10**9)}%3Aexample.org"
        seen = {dep.answer(method, path.format(room=room))["process"] for method, path in ROOM_HISTORY}
        assert len(seen) == 1 and seen <= {"federation_reader1", "federation_reader2"}, (room, seen)
        used |= seen
    assert used == {"federation_reader1", "federation_reader2"}


# ------------------------------------------------------------------------------------------------------
# Method-sensitive routes with HEAD and OPTIONS; the emulation on encoded dot segments
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, want",
    [
        ("HEAD", "/_synapse/admin/v1/rooms/%21room%3Aexample.org", "client_reader"),
        ("HEAD", "/_synapse/admin/v2/users/%40user%3Aexample.org", "client_reader"),
        ("HEAD", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events", "client_reader"),
        ("HEAD", "/_matrix/client/v3/pushrules/", "push_rules"),
        ("HEAD", "/_matrix/client/v3/user/%40user%3Aexample.org/account_data/m.x", "account_data"),
        ("OPTIONS", "/_synapse/admin/v2/users/%40user%3Aexample.org", "main"),  # CORS preflight
        ("OPTIONS", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/abc", "main"),
        ("PATCH", "/_synapse/admin/v1/rooms/%21room%3Aexample.org", "main"),
    ],
)
def test_other_methods_on_method_sensitive_routes(deployments, method, path, want):
    dep = deployments.get("readers")
    resp = dep.send(method, path)
    assert resp.status_code == 200
    got = resp.headers["X-Stub-Process"]
    assert got == want or (want != "main" and got.startswith(want)), (method, path, got)
    assert got in explain(dep.plan, method, path)["servers"]


@pytest.mark.parametrize("path", [
    "/_synapse/replication/%2E%2E/admin/v1/server_version",  # nginx: /_synapse/admin/... -> main
    "/_synapse/admin/%2e%2e/replication/x",  # nginx: /_synapse/replication/x -> refused
    "/_matrix/client/v3/foo/%2E%2E/sync",  # nginx: /_matrix/client/v3/sync -> synchrotron
])
def test_routes_emulation_on_encoded_dot_segments(deployments, path):
    dep = deployments.get("sync2")
    resp = dep.send("GET", path)
    emulated = explain(dep.plan, "GET", path)
    if resp.status_code == 404 and "X-Stub-Process" not in resp.headers:
        assert emulated["status"] == 404
    else:
        assert resp.headers["X-Stub-Process"] in emulated["servers"]
