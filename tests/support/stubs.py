"""Stub upstream HTTP servers: stand-ins for Synapse processes behind the generated nginx.

Each stub answers any method on any path with 200 (after `X-Stub-Delay` seconds when the request sends that
header: a slow request or a long-poll) and a JSON body naming the process and echoing what it received: the raw
request line (method + target exactly as sent by nginx) and the X-Forwarded-For,
X-Forwarded-Proto and Host headers. Every request is also recorded, so tests can assert that a path
never reached any upstream.

Stubs speak HTTP/1.1 with keep-alive (nginx keeps idle upstream connections), listen on TCP or on a unix
socket, and run in daemon threads; `StubFleet.close()` stops them all.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any


@dataclass(frozen=True)
class Hit:
    process: str
    method: str
    raw_path: str
    headers: dict[str, str]
    body_length: int


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stub"
    sys_version = ""
    # One buffered write per response (flushed by BaseHTTPRequestHandler), and no Nagle delay on TCP:
    # otherwise headers and body go out in two segments and every request waits for a delayed ACK.
    wbufsize = 64 * 1024

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # The server instance carries: stub_name (str), stub_record (callable).

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet; unix peers have no address
        pass

    def address_string(self) -> str:
        return "unix" if isinstance(self.client_address, (str, bytes)) else str(self.client_address[0])

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _answer(self) -> None:
        body = self._read_body()
        server = self.server
        # A request that asks for it is held this many seconds first (a slow request, a long-poll).
        if delay := self.headers.get("X-Stub-Delay"):
            time.sleep(float(delay))
        # The target exactly as received: http.server rewrites a leading "//" in self.path (gh-87389).
        target = self.requestline.split(" ")[1] if self.requestline.count(" ") == 2 else self.path
        hit = Hit(
            process=server.stub_name,  # type: ignore[attr-defined]
            method=self.command,
            raw_path=target,
            headers={k.lower(): v for k, v in self.headers.items()},
            body_length=len(body),
        )
        server.stub_record(hit)  # type: ignore[attr-defined]
        payload = json.dumps(
            {
                "process": hit.process,
                "request_line": self.requestline,
                "method": hit.method,
                "raw_path": hit.raw_path,
                "x_forwarded_for": self.headers.get("X-Forwarded-For"),
                "x_forwarded_proto": self.headers.get("X-Forwarded-Proto"),
                "host": self.headers.get("Host"),
                "body_length": hit.body_length,
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Stub-Process", hit.process)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def __getattr__(self, name: str):
        # do_GET, do_PUT, do_WHATEVER: every method gets the same answer.
        if name.startswith("do_"):
            return self._answer
        raise AttributeError(name)


class _TCPStub(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


class _UnixStub(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False


class StubServer:
    """One stub process: `address` is "host:port" or "unix:/path" (the plan's Listener.address form)."""

    def __init__(self, name: str, address: str, record) -> None:
        self.name = name
        self.address = address
        if address.startswith("unix:"):
            path = address[len("unix:"):]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if os.path.exists(path):
                os.unlink(path)
            self.server: socketserver.BaseServer = _UnixStub(path, _Handler)
            # Like Synapse's default unix listener mode: nginx workers (not root) must be able to connect.
            os.chmod(path, 0o666)
            self.path: str | None = path
        else:
            host, port = address.rsplit(":", 1)
            self.server = _TCPStub((host, int(port)), _Handler)
            self.path = None
        self.server.stub_name = name  # type: ignore[attr-defined]
        self.server.stub_record = record  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name=f"stub-{name}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)


class StubFleet:
    """Stubs for a set of processes, sharing one hit log."""

    def __init__(self) -> None:
        self.stubs: dict[str, StubServer] = {}
        self._hits: list[Hit] = []
        self._lock = threading.Lock()

    def _record(self, hit: Hit) -> None:
        with self._lock:
            self._hits.append(hit)

    def add(self, name: str, address: str) -> StubServer:
        stub = StubServer(name, address, self._record)
        self.stubs[name] = stub
        return stub

    @property
    def hits(self) -> list[Hit]:
        with self._lock:
            return list(self._hits)

    def clear(self) -> None:
        with self._lock:
            self._hits.clear()

    def close(self) -> None:
        errors = []
        for stub in self.stubs.values():
            try:
                stub.close()
            except Exception as exc:  # keep closing the others
                errors.append(exc)
        self.stubs.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> StubFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stubs_for_plan(plan) -> StubFleet:
    """A stub on every process's public listener (processes without one get none)."""
    fleet = StubFleet()
    try:
        for proc in plan.processes:
            listener = proc.listener("public")
            if listener is not None:
                fleet.add(proc.name, listener.address)
    except BaseException:
        fleet.close()
        raise
    return fleet


def wait_connectable(address: str, timeout: float = 5.0) -> None:
    """Block until something accepts connections at host:port or unix:/path."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            if address.startswith("unix:"):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(address[len("unix:"):])
            else:
                host, port = address.rsplit(":", 1)
                socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
