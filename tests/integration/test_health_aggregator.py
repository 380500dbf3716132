"""The public /health is not an amplifier: hammering it costs the processes behind it a bounded number of
checks. Real sockets: the aggregator in front of stub health listeners that count what reaches them."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from synapse_workers.programs import Health
from synapse_workers.run.health import Aggregator
from tests.conftest import free_port
from tests.support.stubs import StubFleet, wait_connectable

PROCESSES = ("main", "synchrotron1", "event_persister1")


def test_a_burst_of_health_requests_is_served_from_one_check_per_second():
    with StubFleet() as fleet:
        checks = {}
        for name in PROCESSES:
            address = f"127.0.0.1:{free_port()}"
            fleet.add(name, address)
            wait_connectable(address)
            checks[name] = Health("http", f"http://{address}/health")
        port = free_port()
        aggregator = Aggregator(checks, port, ttl=1.0, max_clients=8)
        aggregator.start()
        try:
            url = f"http://127.0.0.1:{port}/health"
            started = time.monotonic()

            def ask(_: int) -> int:
                with httpx.Client() as client:
                    return sum(client.get(url, timeout=10).status_code == 200 for _ in range(10))

            with ThreadPoolExecutor(32) as pool:
                answers = list(pool.map(ask, range(32)))  # 320 requests, 32 at a time
            took = time.monotonic() - started
        finally:
            aggregator.stop()
        per_process = {name: sum(1 for h in fleet.hits if h.process == name) for name in PROCESSES}
    # One refresh per second at most (plus the first): the 320 requests never became 960 checks.
    bound = int(took) + 2
    assert all(count <= bound for count in per_process.values()), (per_process, took)
    assert sum(answers) >= 100, answers  # most answered 200 from the cache; the rest a quick 503 "busy"


def test_the_verdict_names_the_failing_process():
    with StubFleet() as fleet:
        address = f"127.0.0.1:{free_port()}"
        fleet.add("main", address)
        wait_connectable(address)
        checks = {"main": Health("http", f"http://{address}/health"),
                  "gone1": Health("http", f"http://127.0.0.1:{free_port()}/health")}
        port = free_port()
        aggregator = Aggregator(checks, port, ttl=0.1)
        aggregator.start()
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        finally:
            aggregator.stop()
    assert response.status_code == 503
    assert set(response.json()["unhealthy"]) == {"gone1"}


# A health listener whose one thread spins on the CPU for a while before each answer: a Synapse reactor stuck in
# work (busy), or, stopped with SIGSTOP, one that does nothing at all (hung).
BUSY_SERVER = """
import sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        end = time.monotonic() + float(sys.argv[2])
        while time.monotonic() < end:
            pass
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_a_busy_process_is_not_called_dead_but_a_hung_one_is():
    """A check that times out (3 s) while its process spins on the CPU is healthy (busy); the same process
    stopped (no CPU at all) is failing; without its pid nothing tells them apart (failing)."""
    import os
    import signal
    import subprocess
    import sys

    from synapse_workers.run.health import check_all

    port = free_port()
    busy = subprocess.Popen([sys.executable, "-c", BUSY_SERVER, str(port), "6"])
    try:
        wait_connectable(f"127.0.0.1:{port}")
        checks = {"worker1": Health("http", f"http://127.0.0.1:{port}/health")}
        started = time.monotonic()
        assert check_all(checks, {"worker1": busy.pid}) == {"worker1": None}
        assert time.monotonic() - started >= 2.5  # it did time out: the answer takes 6 s
        time.sleep(6)  # the spinning answer of that check is over
        assert check_all(checks)["worker1"].startswith("ReadTimeout")
        time.sleep(6)
        os.kill(busy.pid, signal.SIGSTOP)
        try:
            assert check_all(checks, {"worker1": busy.pid})["worker1"].startswith("ReadTimeout")
        finally:
            os.kill(busy.pid, signal.SIGCONT)
    finally:
        busy.kill()
        busy.wait()
