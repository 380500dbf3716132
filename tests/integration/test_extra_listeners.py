"""Real nginx, stub upstreams: the extra listeners of an existing homeserver.yaml.

The file has a client listener (nginx's public port), a federation-only listener and a `tls: true` federation+keys
listener with the file's certificate. On the federation listeners, what Synapse 1.163.2 mounts for `federation`
(synapse/app/homeserver.py `_configure_named_resource`: /_matrix/federation, /_matrix/key and the media prefixes;
written out below, not taken from catalog.py) reaches the process the request table names, exactly as on the
public port; everything else gets what Synapse answers there: 404, and under /_matrix
{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}, with no upstream reached.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
import yaml

from synapse_workers import cli
from synapse_workers.load import load_plan
from tests.conftest import free_port, isolated_env
from tests.integration.request_table import PRIVATE, REQUESTS, Req
from tests.integration.test_nginx_routing import BODY, expected_processes
from tests.support.certs import self_signed
from tests.support.nginx import NGINX, Nginx
from tests.support.stubs import stubs_for_plan, wait_connectable

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists(NGINX), reason=f"nginx not installed ({NGINX})"),
]

WORKERS = "federation_inbound, federation_reader, client_reader, synchrotron, media_repository"
# What Synapse mounts on a listener with resources [federation] (and [federation, keys]).
FEDERATION_MOUNTS = ("/_matrix/federation", "/_matrix/key", "/_matrix/media/r0", "/_matrix/media/v3",
                     "/_matrix/media/v1")
UNRECOGNIZED = {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}


class Stack:
    def __init__(self) -> None:
        self._stack = ExitStack()
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise

    def _start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sw-", dir="/tmp"))
        self._stack.callback(shutil.rmtree, self.root, ignore_errors=True)
        os.chmod(self.root, 0o755)
        self.env = {**isolated_env(self.root), "POSTGRES_PASSWORD": "not-a-real-password",
                    "SYNAPSE_WORKER_TYPES": WORKERS}
        base = int(self.env["SYNAPSE_INTERNAL_PORT_BASE"])
        taken = {int(self.env["SYNAPSE_HTTP_PORT"]), int(self.env["PROMETHEUS_PORT"])}
        ports = []
        while len(ports) < 2:
            port = free_port()
            if port not in taken and not base <= port < base + 120:
                ports.append(port)
                taken.add(port)
        self.federation_port, self.tls_port = ports
        tls = self.root / "tls"
        tls.mkdir()
        self.cert, key = self_signed(tls)
        data = self.root / "data"
        data.mkdir()
        (data / "homeserver.yaml").write_text(yaml.safe_dump({
            "server_name": "example.test",
            "database": {"name": "psycopg2", "args": {"user": "synapse", "host": "db", "database": "synapse"}},
            "tls_certificate_path": str(self.cert),
            "tls_private_key_path": str(key),
            "listeners": [
                {"port": int(self.env["SYNAPSE_HTTP_PORT"]), "type": "http", "x_forwarded": True,
                 "bind_addresses": ["127.0.0.1"], "resources": [{"names": ["client"]}]},
                {"port": self.federation_port, "type": "http", "bind_addresses": ["127.0.0.1"],
                 "resources": [{"names": ["federation"]}]},
                {"port": self.tls_port, "type": "http", "tls": True, "bind_addresses": ["127.0.0.1"],
                 "resources": [{"names": ["federation", "keys"]}]},
                {"port": free_port(), "type": "metrics", "bind_addresses": ["127.0.0.1"]},
            ],
        }))
        assert cli.main(["generate"], env=self.env) == 0
        self.plan = load_plan(self.env)
        assert [x.port for x in self.plan.extra_listeners] == [self.federation_port, self.tls_port]
        self.fleet = self._stack.enter_context(stubs_for_plan(self.plan))
        for stub in self.fleet.stubs.values():
            wait_connectable(stub.address)
        self.nginx = self._stack.enter_context(Nginx(self.plan.layout.nginx_conf, str(self.root / "nginx.log")))
        for port in (self.plan.public.port, self.federation_port, self.tls_port):
            wait_connectable(f"127.0.0.1:{port}")
        self.http = self._stack.enter_context(httpx.Client(timeout=10))
        # Verified against the file's own certificate: the handshake only succeeds if nginx serves it.
        context = ssl.create_default_context(cafile=str(self.cert))
        self.https = self._stack.enter_context(httpx.Client(timeout=10, verify=context))

    def close(self) -> None:
        self._stack.close()

    def send(self, client: httpx.Client, base: str, method: str, path: str) -> httpx.Response:
        content = BODY if method in ("POST", "PUT") else None
        return client.request(method, base + path, content=content)

    def check(self, req: Req, client: httpx.Client, base: str) -> list[str]:
        where = f"[{base}] {req.method} {req.path} ({req.group})"
        path = unquote(req.path.split("?", 1)[0])
        before = len(self.fleet.hits)
        resp = self.send(client, base, req.method, req.path)
        hits = len(self.fleet.hits) - before
        if path.startswith(FEDERATION_MOUNTS):
            label, wanted = expected_processes(self.plan, req.want)
            if resp.status_code != 200 or hits != 1:
                return [f"{where}: HTTP {resp.status_code}, {hits} upstream hits; expected {label}'s 200"]
            got = resp.json()["process"]
            return [] if got in wanted else [f"{where}: answered by {got}, expected {label} ({sorted(wanted)})"]
        problems = []
        if resp.status_code != 404 or hits:
            problems.append(f"{where}: HTTP {resp.status_code}, {hits} upstream hits; expected nginx's 404")
        elif path.startswith("/_matrix/") and resp.json() != UNRECOGNIZED:
            problems.append(f"{where}: body {resp.text[:200]!r}, expected Synapse's M_UNRECOGNIZED")
        return problems


@pytest.fixture(scope="module")
def stack():
    running = Stack()
    try:
        yield running
    finally:
        running.close()


# The normalisation group's paths are about nginx's URI handling (tested on the public port), not listeners.
TABLE = [r for r in REQUESTS if r.group != "normalisation"]


def test_the_table_has_both_kinds():
    mounted = [r for r in TABLE if unquote(r.path.split("?")[0]).startswith(FEDERATION_MOUNTS)]
    assert len(mounted) >= 30 and len(TABLE) - len(mounted) >= 100


def test_federation_listener_answers_federation_and_refuses_the_rest(stack):
    base = f"http://127.0.0.1:{stack.federation_port}"
    problems = [p for req in TABLE for p in stack.check(req, stack.http, base)]
    assert not problems, "\n".join(problems) + "\n" + stack.nginx.log()


def test_key_and_federation_requests_reach_their_processes(stack):
    """The two requests a remote server sends first, and a client request, on the federation port."""
    base = f"http://127.0.0.1:{stack.federation_port}"
    key = stack.send(stack.http, base, "GET", "/_matrix/key/v2/server")
    assert key.status_code == 200 and key.json()["process"] == "main"
    version = stack.send(stack.http, base, "GET", "/_matrix/federation/v1/version")
    assert version.status_code == 200 and version.json()["process"] == "federation_reader1"
    send = stack.send(stack.http, base, "PUT", "/_matrix/federation/v1/send/1")
    assert send.status_code == 200 and send.json()["process"] == "federation_inbound1"
    sync = stack.send(stack.http, base, "GET", "/_matrix/client/v3/sync")
    assert sync.status_code == 404 and sync.json() == UNRECOGNIZED
    assert sync.headers["content-type"] == "application/json"
    # On the public port the same client request is served (the client listener serves everything).
    public = stack.send(stack.http, f"http://127.0.0.1:{stack.plan.public.port}", "GET", "/_matrix/client/v3/sync")
    assert public.status_code == 200 and public.json()["process"] == "synchrotron1"


def test_internal_paths_are_refused_on_the_extra_listener(stack):
    base = f"http://127.0.0.1:{stack.federation_port}"
    before = len(stack.fleet.hits)
    for method, path in PRIVATE:
        assert stack.send(stack.http, base, method, path).status_code == 404, (method, path)
    assert stack.fleet.hits[before:] == []


def test_tls_listener_serves_with_the_files_certificate(stack):
    base = f"https://127.0.0.1:{stack.tls_port}"
    key = stack.send(stack.https, base, "GET", "/_matrix/key/v2/server")
    assert key.status_code == 200 and key.json()["process"] == "main"
    assert key.json()["x_forwarded_proto"] == "https"
    version = stack.send(stack.https, base, "GET", "/_matrix/federation/v1/version")
    assert version.status_code == 200 and version.json()["process"] == "federation_reader1"
    refused = stack.send(stack.https, base, "POST", "/_matrix/client/v3/login")
    assert refused.status_code == 404 and refused.json() == UNRECOGNIZED
    # Plain HTTP on the TLS port is not served as HTTP.
    assert stack.http.get(f"http://127.0.0.1:{stack.tls_port}/_matrix/key/v2/server").status_code == 400


def test_tls_listener_table(stack):
    base = f"https://127.0.0.1:{stack.tls_port}"
    problems = [p for req in TABLE for p in stack.check(req, stack.https, base)]
    assert not problems, "\n".join(problems)
