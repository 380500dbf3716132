"""Forwarding headers and the access log, with the real nginx in front of stub upstreams.

Synapse trusts the first X-Forwarded-For entry on its proxied listeners (`x_forwarded: true`), so what nginx
sends there is the address Synapse records and rate-limits by. A client must not be able to choose it:
nginx believes X-Forwarded-For and X-Forwarded-Proto only from SYNAPSE_TRUSTED_PROXIES (none by default) and
always sends Synapse a single address. The test client connects from 127.0.0.1, so listing a loopback
network makes it a trusted proxy.

With logs on disk, the access log must never hold an access token (`?access_token=` in the request line).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from synapse_workers.errors import UserError
from synapse_workers.settings import load_settings
from tests.integration.test_nginx_routing import Deployment
from tests.support.nginx import NGINX

needs_nginx = pytest.mark.skipif(not os.path.exists(NGINX), reason=f"nginx not installed ({NGINX})")
SCRIPT = str(Path(sys.executable).with_name("synapse-workers"))  # the venv running the tests (SW_VENV)

WORKERS = "synchrotron"
# name -> extra environment ({root} is the deployment's temp dir).
DEPLOYMENTS: dict[str, dict[str, str]] = {
    "untrusted": {"SYNAPSE_WORKER_TYPES": WORKERS, "SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK": "1"},
    "one": {"SYNAPSE_WORKER_TYPES": WORKERS, "SYNAPSE_TRUSTED_PROXIES": "127.0.0.1/32, 10.0.0.0/8, fd00::/8"},
    "loopback": {"SYNAPSE_WORKER_TYPES": WORKERS, "SYNAPSE_TRUSTED_PROXIES": "127.0.0.0/8"},
    "unix": {
        "SYNAPSE_WORKER_TYPES": WORKERS,
        "NGINX_LISTEN_UNIX_SOCKET": "{root}/public.sock",
        "SYNAPSE_TRUSTED_PROXIES": "unix:",
    },
}
# One request to a worker, one to main: the headers are set for every route.
PATHS = (("/_matrix/client/v3/sync", "synchrotron1"), ("/_matrix/client/versions", "main"))


@pytest.fixture(scope="module")
def deployments():
    started: dict[str, Deployment] = {}

    def get(name: str) -> Deployment:
        if name not in started:
            started[name] = Deployment(name, DEPLOYMENTS[name])
        return started[name]

    try:
        yield get
    finally:
        for dep in started.values():
            dep.close()


def forwarded(dep: Deployment, headers: dict[str, str], **kwargs) -> list[tuple[str, str]]:
    """(X-Forwarded-For, X-Forwarded-Proto) as each upstream received them."""
    seen = []
    for path, process in PATHS:
        body = dep.answer("GET", path, headers=headers, **kwargs)
        assert body["process"] == process, (path, body["process"])
        seen.append((body["x_forwarded_for"], body["x_forwarded_proto"]))
    return seen


def everywhere(address: str, proto: str) -> list[tuple[str, str]]:
    return [(address, proto)] * len(PATHS)


# ------------------------------------------------------------------------------------------------------
# X-Forwarded-For / X-Forwarded-Proto
# ------------------------------------------------------------------------------------------------------


@needs_nginx
@pytest.mark.integration
def test_untrusted_client_cannot_choose_its_address_or_scheme(deployments):
    dep = deployments("untrusted")
    forged = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"}
    assert forwarded(dep, forged) == everywhere("127.0.0.1", "http")
    forged = {"X-Forwarded-For": "6.6.6.6, 7.7.7.7", "X-Forwarded-Proto": "http"}
    assert forwarded(dep, forged) == everywhere("127.0.0.1", "http")
    assert forwarded(dep, {}) == everywhere("127.0.0.1", "http")
    assert dep.plan.settings.listen.trusted_proxies == ()


@needs_nginx
@pytest.mark.integration
def test_a_trusted_proxy_passes_the_client_address_and_scheme(deployments):
    dep = deployments("one")
    via_proxy = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"}
    assert forwarded(dep, via_proxy) == everywhere("6.6.6.6", "https")
    # Without the headers the proxy itself is the client, and our own scheme is sent.
    assert forwarded(dep, {}) == everywhere("127.0.0.1", "http")
    # Only a scheme is believed, never arbitrary text.
    odd_scheme = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "gopher"}
    assert forwarded(dep, odd_scheme) == everywhere("6.6.6.6", "http")
    # A chain: the last address that is not a trusted proxy is the client (real_ip_recursive).
    assert forwarded(dep, {"X-Forwarded-For": "6.6.6.6, 7.7.7.7"})[0][0] == "7.7.7.7"
    assert forwarded(dep, {"X-Forwarded-For": "6.6.6.6, 10.1.2.3"})[0][0] == "6.6.6.6"
    assert dep.plan.settings.listen.trusted_proxies == ("127.0.0.1/32", "10.0.0.0/8", "fd00::/8")


@needs_nginx
@pytest.mark.integration
def test_a_chain_through_trusted_loopback_stops_at_the_last_untrusted_hop(deployments):
    dep = deployments("loopback")
    forged = {"X-Forwarded-For": "6.6.6.6, 7.7.7.7", "X-Forwarded-Proto": "https"}
    assert forwarded(dep, forged) == everywhere("7.7.7.7", "https")
    # Trusted hops inside the chain are skipped too.
    assert forwarded(dep, {"X-Forwarded-For": "6.6.6.6, 127.0.0.9"})[0][0] == "6.6.6.6"


@needs_nginx
@pytest.mark.integration
def test_a_trusted_unix_socket_proxy_passes_the_client_address(deployments):
    dep = deployments("unix")
    sock = dep.plan.public.unix_socket
    assert sock and os.path.exists(sock), sock
    forged = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"}
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=10) as uds:
        assert forwarded(dep, forged, client=uds, base="http://localhost") == everywhere("6.6.6.6", "https")
    # The same stack's TCP port is not a trusted proxy.
    assert forwarded(dep, forged) == everywhere("127.0.0.1", "http")


# ------------------------------------------------------------------------------------------------------
# SYNAPSE_TRUSTED_PROXIES values
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, parsed",
    [
        ("", ()),
        ("127.0.0.1", ("127.0.0.1/32",)),
        (" 10.0.0.0/8 ,192.168.0.0/16,, ", ("10.0.0.0/8", "192.168.0.0/16")),
        ("2001:DB8::/32, ::1", ("2001:db8::/32", "::1/128")),
        ("unix:, 10.0.0.0/8, 10.0.0.0/8", ("unix:", "10.0.0.0/8")),
    ],
)
def test_trusted_proxies_are_parsed(value, parsed):
    assert load_settings({"SYNAPSE_TRUSTED_PROXIES": value}).listen.trusted_proxies == parsed


@pytest.mark.parametrize(
    "value", ["10.0.0.0/33", "nonsense", "10.0.0.1/8", "fe80::1%eth0", "10.0.0.0/8 192.168.0.0/16", "unix"]
)
def test_bad_trusted_proxies_are_refused_naming_the_variable(value):
    with pytest.raises(UserError) as err:
        load_settings({"SYNAPSE_TRUSTED_PROXIES": value})
    assert f"SYNAPSE_TRUSTED_PROXIES={value!r} is invalid" in str(err.value)


@pytest.mark.parametrize("value", ["10.0.0.0/33", "nonsense"])
def test_bad_trusted_proxies_exit_2_from_the_console_script(base_env, value):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **base_env}
    env["SYNAPSE_TRUSTED_PROXIES"] = value
    result = subprocess.run([SCRIPT, "plan"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert f"SYNAPSE_TRUSTED_PROXIES={value!r} is invalid" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------------
# The access log
# ------------------------------------------------------------------------------------------------------


def _access_log_lines(dep: Deployment, marker: str, count: int) -> list[str]:
    """The access-log lines containing marker, once there are `count` of them (nginx logs after answering)."""
    path = Path(dep.plan.layout.logs_on_disk) / "nginx-access.log"
    deadline = time.monotonic() + 5
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        lines = [line for line in text.splitlines() if marker in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@needs_nginx
@pytest.mark.integration
@pytest.mark.parametrize(
    "query, logged",
    [
        ("access_token=SECRETTOKEN123", "access_token=<redacted>"),
        ("since=s1_2&access_token=SECRETTOKEN123&timeout=0", "since=s1_2&access_token=<redacted>&timeout=0"),
        ("timeout=0;access_token=SECRETTOKEN123", "timeout=0;access_token=<redacted>"),
        ("access_token=", "access_token=<redacted>"),
        # Anything less plain (Synapse would read the first token; %5F decodes to _) hides the whole query.
        ("access_token=SECRETTOKEN123&access_token=SECRETTOKEN123", "<redacted>"),
        ("a=1&access%5Ftoken=SECRETTOKEN123", "<redacted>"),
        ("a=1&xaccess_token=SECRETTOKEN123", "<redacted>"),
    ],
)
def test_access_log_never_holds_an_access_token(deployments, query, logged):
    dep = deployments("untrusted")
    marker = f"m{time.monotonic_ns()}"
    paths = [f"{path}/{marker}" for path, _ in PATHS]
    for path in paths:
        dep.answer("GET", f"{path}?{query}", headers={"Authorization": "Bearer SECRETTOKEN123"})
    lines = _access_log_lines(dep, marker, len(paths))
    assert len(lines) == len(paths), lines
    for line, path in zip(lines, paths, strict=True):
        assert f'"GET {path}?{logged} HTTP/1.1"' in line, line
    log = (Path(dep.plan.layout.logs_on_disk) / "nginx-access.log").read_text()
    assert "SECRETTOKEN123" not in log


@needs_nginx
@pytest.mark.integration
def test_access_log_keeps_queries_without_tokens(deployments):
    dep = deployments("untrusted")
    marker = f"m{time.monotonic_ns()}"
    path = f"/_matrix/client/v3/sync/{marker}?since=s1_2&filter=%7B%7D"
    dep.answer("GET", path)
    lines = _access_log_lines(dep, marker, 1)
    assert len(lines) == 1 and f'"GET {path} HTTP/1.1"' in lines[0], lines
