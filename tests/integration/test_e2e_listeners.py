"""End to end, real Synapse: a data dir whose homeserver.yaml has, besides its client listener, a separate
federation listener and a `tls: true` federation+keys listener (the "historical 8448"), moved under
`synapse-workers run` unchanged. Federation keeps working on those ports: Synapse's own key and version answers
come back there, a client request is refused as Synapse refuses it on a federation-only listener.
"""

from __future__ import annotations

import os
import shutil
import ssl

import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.support.certs import self_signed
from tests.support.stack import Stack, make_root, stack_env

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the data dir is Synapse's user's (UID 991), as the images leave it"),
]

SIGNING_KEY = "ed25519 a_abcd dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3Q\n"  # a 32-byte seed, key id a_abcd
UNRECOGNIZED = {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}


@pytest.fixture(scope="module")
def stack():
    root = make_root("sw-e2e-listeners-")
    data = root / "data"
    data.mkdir()
    env = stack_env(root, "", SYNAPSE_CONFIG_PATH=str(data / "homeserver.yaml"))
    base = int(env["SYNAPSE_INTERNAL_PORT_BASE"])
    taken = {int(env["SYNAPSE_HTTP_PORT"]), int(env["PROMETHEUS_PORT"])}
    ports: list[int] = []
    while len(ports) < 2:
        port = free_port()
        if port not in taken and not base <= port < base + 120:
            ports.append(port)
            taken.add(port)
    federation, tls = ports
    cert, key = self_signed(data, "localhost")
    (data / "homeserver.yaml").write_text(yaml.safe_dump({
        "server_name": "localhost",
        "report_stats": False,
        "listeners": [
            {"port": int(env["SYNAPSE_HTTP_PORT"]), "type": "http", "x_forwarded": True,
             "bind_addresses": ["127.0.0.1"], "resources": [{"names": ["client"], "compress": False}]},
            {"port": federation, "type": "http", "bind_addresses": ["127.0.0.1"],
             "resources": [{"names": ["federation"], "compress": False}]},
            {"port": tls, "type": "http", "tls": True, "bind_addresses": ["127.0.0.1"],
             "resources": [{"names": ["federation", "keys"]}]},
        ],
        "tls_certificate_path": str(cert),
        "tls_private_key_path": str(key),
        "database": {"name": "sqlite3", "args": {"database": f"{data}/homeserver.db"}},
        "media_store_path": f"{data}/media_store",
        "signing_key_path": f"{data}/localhost.signing.key",
        "trusted_key_servers": [],
    }))
    (data / "localhost.signing.key").write_text(SIGNING_KEY)
    for path in [data, *data.iterdir()]:
        os.chown(path, 991, 991)
    os.chmod(data / "localhost.signing.key", 0o600)
    running = Stack(env)
    try:
        running.start(300)
        running.federation_url = f"http://127.0.0.1:{federation}"  # type: ignore[attr-defined]
        running.tls_url = f"https://127.0.0.1:{tls}"  # type: ignore[attr-defined]
        running.cert = str(cert)  # type: ignore[attr-defined]
        yield running
    finally:
        running.close(root)


def test_plan_shows_the_listeners(stack):
    plan = stack.cli("plan")
    assert plan.returncode == 0, plan.stderr
    assert f"listeners[1]: port {stack.federation_url.rsplit(':', 1)[1]} on 127.0.0.1: federation" in plan.stdout
    assert f"listeners[2]: port {stack.tls_url.rsplit(':', 1)[1]} (TLS) on 127.0.0.1: federation+keys" in plan.stdout


def test_federation_listener_answers_key_and_federation_requests(stack):
    with httpx.Client(timeout=10) as client:
        keys = client.get(f"{stack.federation_url}/_matrix/key/v2/server")
        assert keys.status_code == 200, keys.text
        assert keys.json()["server_name"] == "localhost" and "ed25519:a_abcd" in keys.json()["verify_keys"]
        version = client.get(f"{stack.federation_url}/_matrix/federation/v1/version")
        assert version.status_code == 200, version.text
        assert version.json()["server"] == {"name": "Synapse", "version": "1.163.2"}
        refused = client.get(f"{stack.federation_url}/_matrix/client/versions")
        assert refused.status_code == 404 and refused.json() == UNRECOGNIZED
        # The same request on the client listener (nginx's public port) is Synapse's.
        assert "versions" in client.get(f"{stack.base_url}/_matrix/client/versions").json()


def test_tls_listener_serves_the_files_certificate(stack):
    context = ssl.create_default_context(cafile=stack.cert)
    with httpx.Client(timeout=10, verify=context) as client:
        keys = client.get(f"{stack.tls_url}/_matrix/key/v2/server")
        assert keys.status_code == 200, keys.text
        assert keys.json()["server_name"] == "localhost"
        version = client.get(f"{stack.tls_url}/_matrix/federation/v1/version")
        assert version.status_code == 200 and version.json()["server"]["name"] == "Synapse"
        refused = client.post(f"{stack.tls_url}/_matrix/client/v3/login", json={})
        assert refused.status_code == 404 and refused.json() == UNRECOGNIZED


def test_sigterm_stops_everything(stack):
    code, _took = stack.stop(timeout=30)
    assert code == 0, stack.tail()
    assert not stack.leftovers()
    shutil.rmtree(stack.root / "run", ignore_errors=True)
