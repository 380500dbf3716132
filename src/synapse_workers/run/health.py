"""Health checks for every kind of program, the stack-wide check, and the /health aggregator."""

from __future__ import annotations

import json
import os
import shlex
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from ..plan import Plan
from ..programs import Health, child_environment, synapse_health
from ..render.nginx import HEALTH_STALE_SECONDS

TIMEOUT = 3.0
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# How nginx may keep the aggregator's answer (render/nginx.py caches the public /health): fresh for one second;
# while one request refreshes it, the others get the previous answer, for at most HEALTH_STALE_SECONDS more.
CACHE_CONTROL = f"max-age=1, stale-while-revalidate={HEALTH_STALE_SECONDS}"
COUNTERS_HEADER = "X-Synapse-Workers-Aggregator"


_client: httpx.Client | None = None
_client_lock = threading.Lock()


def _http() -> httpx.Client:
    """One shared keep-alive client: a new client per check costs ~20 ms of CPU (TLS context set-up)."""
    global _client
    with _client_lock:
        if _client is None:
            _client = httpx.Client(limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
        return _client


def check(health: Health, timeout: float = TIMEOUT) -> str | None:
    """None when healthy, else a short reason."""
    try:
        if health.kind == "http":
            try:
                response = _http().get(health.target, timeout=timeout)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                # A kept-alive connection that went bad under us (the process restarted, or the shared pool lost
                # it: seen as EBADF under a flood): once more, on a new connection. A process that is down
                # fails again at once (connection refused); a hung one times out.
                response = _http().get(health.target, timeout=timeout)
            return None if response.status_code == 200 else f"HTTP {response.status_code}"
        if health.kind == "redis":
            with _connect(health.target, timeout) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
            # Several hosts: Redis has a password, and asks for it: it answers, which is all health asks.
            return None if reply.startswith((b"+PONG", b"-NOAUTH")) else f"unexpected reply {reply[:20]!r}"
        if health.kind == "tcp":
            with _connect(health.target, timeout):
                return None
        if health.kind == "stun":
            return stun_binding(health.target, timeout)
        if health.kind == "command":
            argv = shlex.split(health.target)
            result = subprocess.run(
                argv, check=False, timeout=timeout + 2, capture_output=True, env=child_environment(os.environ)
            )
            return None if result.returncode == 0 else f"{os.path.basename(argv[0])} exit {result.returncode}"
    except (OSError, httpx.HTTPError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return f"unknown health check {health.kind}"


def _connect(target: str, timeout: float) -> socket.socket:
    """A connected stream socket to a unix socket path or to host:port."""
    if target.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: str | tuple[str, int] = target
    else:
        host, port = target.rsplit(":", 1)
        host = host.strip("[]")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        address = (host, int(port))
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


STUN_MAGIC_COOKIE = 0x2112A442
STUN_BINDING_REQUEST, STUN_BINDING_SUCCESS = 0x0001, 0x0101


def stun_binding(target: str, timeout: float = TIMEOUT) -> str | None:
    """A STUN binding request (RFC 5389) over UDP to host:port: None when a success response with our
    transaction id comes back (what turnutils_stunclient does, with a timeout of our own)."""
    host, port = target.rsplit(":", 1)
    host = host.strip("[]")
    transaction = os.urandom(12)
    request = struct.pack("!HHI", STUN_BINDING_REQUEST, 0, STUN_MAGIC_COOKIE) + transaction
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((host, int(port)))
        sock.sendall(request)
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                reply = sock.recv(2048)
            except TimeoutError:
                return f"no STUN answer from {target} within {timeout:g}s"
            except OSError as exc:  # nothing listens there (ICMP port unreachable)
                return f"{type(exc).__name__}: {exc}"
            if len(reply) >= 20 and reply[8:20] == transaction:
                kind, _length, cookie = struct.unpack("!HHI", reply[:8])
                if kind == STUN_BINDING_SUCCESS and cookie == STUN_MAGIC_COOKIE:
                    return None
                return f"STUN answer 0x{kind:04x} instead of a binding success"


def synapse_checks(plan: Plan) -> dict[str, Health]:
    """What the launcher's /health asks: every Synapse process of this host's slice. On nginx's host, the public
    /health, every process of the deployment: the remote ones are asked on their health listeners (reachable from
    the deployment's hosts), never assumed healthy."""
    procs = plan.processes if plan.local("nginx") else plan.local_processes
    return {proc.name: synapse_health(proc) for proc in procs}


def public_health(plan: Plan) -> Health:
    return Health("http", f"{plan.public.local_url}/health")


# A process whose health check timed out but that used this much CPU meanwhile is busy (its reactor stuck in
# work), not hung (stopped, deadlocked: no CPU at all): it counts as healthy, so that a server under more load
# than it can take is not called dead by the public /health or `synapse-workers health` (Docker's check).
BUSY_CPU_SECONDS = 0.5


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process of this host (/proc/<pid>/stat), None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_all(checks: dict[str, Health], pids: Mapping[str, int] | None = None) -> dict[str, str | None]:
    """Every check at once: name → None (healthy) or why not. With `pids` (name → pid on this host), a check that
    timed out while its process used at least BUSY_CPU_SECONDS of CPU counts as healthy (busy, not hung)."""
    known = {name: pid for name, pid in (pids or {}).items() if pid and name in checks}
    before = {name: cpu_seconds(pid) for name, pid in known.items()}
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(checks)))) as pool:
        results = dict(zip(checks, pool.map(check, checks.values()), strict=True))
    for name, pid in known.items():
        why, used = results[name], before[name]
        if why is not None and why.startswith("ReadTimeout") and used is not None:
            now = cpu_seconds(pid)
            if now is not None and now - used >= BUSY_CPU_SECONDS:
                results[name] = None
    return results


class Aggregator:
    """Serves GET /health on 127.0.0.1:<port>: 200 only when main and every worker are healthy.

    nginx answers the public /health from here, so it means the same as `synapse-workers health`. nginx keeps
    the answer (render/nginx.py: `Cache-Control` below, one request to populate it at a time), so a flood of
    public /health requests costs about one request here per second. Behind that, a request never fans out by
    itself: the verdict is reused while younger than `ttl` seconds (from the start of the refresh that made it),
    at most one refresh runs at a time (requests that arrive meanwhile wait for it and share it), and at most
    `max_clients` requests are served at once (more get 503 at once, which nginx does not keep).

    `requests` and `refreshes` count what reached it; each answer carries them (`COUNTERS_HEADER`, which nginx
    does not pass on)."""

    def __init__(
        self,
        checks: dict[str, Health],
        port: int,
        ttl: float = 1.0,
        max_clients: int = 8,
        metrics: Callable[[], str] | None = None,
        pids: Callable[[], Mapping[str, int]] | None = None,
    ):
        self.checks = checks
        # The processes' pids on this host, as the launcher last saw them (check_all: busy is not hung).
        self.pids = pids
        # GET /metrics: this text (Prometheus's exposition format; the scheduled backups', run/backup_report.py).
        # nginx passes only /health on: /metrics stays on loopback.
        self.metrics = metrics
        self.ttl = ttl
        self.requests = 0
        self.refreshes = 0
        self._verdict: dict[str, str] | None = None
        self._at = 0.0  # when the refresh that made _verdict started
        self._refresh = threading.Lock()
        self._count = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_clients)
        aggregator = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                if aggregator.metrics is not None and self.path.split("?")[0] == "/metrics":
                    self._answer(200, METRICS_CONTENT_TYPE, aggregator.metrics().encode(), "no-store")
                    return
                with aggregator._count:
                    aggregator.requests += 1
                if not aggregator._slots.acquire(blocking=False):
                    self._answer(503, "text/plain", b"busy", "no-store")
                    return
                try:
                    failing = aggregator.verdict()
                finally:
                    aggregator._slots.release()
                if failing:
                    self._answer(503, "application/json", json.dumps({"unhealthy": failing}).encode())
                else:
                    self._answer(200, "text/plain", b"OK")

            def _answer(self, status: int, content_type: str, body: bytes, cache: str = CACHE_CONTROL) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", cache)
                self.send_header(COUNTERS_HEADER, f"requests={aggregator.requests} refreshes={aggregator.refreshes}")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server naming)
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    def verdict(self) -> dict[str, str]:
        """The failing processes (empty: healthy), from a refresh that started at most `ttl` seconds before this
        call (with ttl 0: one that started after it was asked)."""
        asked = time.monotonic()
        if self._verdict is not None and self._at >= asked - self.ttl:
            return self._verdict
        with self._refresh:  # one refresh at a time; who waited here may find one that started after it asked
            if self._verdict is None or self._at < asked - self.ttl:
                started = time.monotonic()
                results = check_all(self.checks, self.pids() if self.pids else None)
                self._verdict = {name: why for name, why in results.items() if why}
                self._at = started
                self.refreshes += 1
            return self._verdict

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
