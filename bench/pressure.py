"""Latency of incremental syncs, sends and logins while initial syncs flood the server (issue 16): with the
initial-sync pool and its bound, and with today's routing, in the same run.

Two stacks, one after the other (fork mode, embedded PostgreSQL):

  split   SYNAPSE_WORKER_TYPES="synchrotron, initial_synchrotron, event_creator, client_reader",
          NGINX_POOL_LIMITS="initial_synchrotron=<--limit>": initial syncs on their own process, at most
          --limit at once, the rest told 429 (the flood's clients wait retry_after_ms, as Matrix clients do)
  today   SYNAPSE_WORKER_TYPES="synchrotron, event_creator, client_reader": every sync on the synchrotron (its
          default bound, 2000, is never reached here)

In each, a "heavy" user is in --rooms rooms (created by that user, rate limits lifted through the admin API) and
logs in --clients times (a device each: Synapse shares one computation between identical concurrent syncs of one
device). A "light" user is in one small room. Two windows of --seconds each:

  idle    no flood
  flood   --clients initial syncs of the heavy user at once, each started again as soon as answered

Throughout, one probe loop (one request at a time): the light user's incremental /sync (timeout=0; the
synchrotron), a message send (the event_creator), a password login (client_reader; Synapse's login rate
limits lifted in homeserver.yaml) and the public /health (a probe that is not 200 counts as an error). Per
window and probe: count, p50/p90/max ms; for the flood: initial syncs answered 200, 429, otherwise; the CPU
other processes of the machine used meanwhile (cores). ~3 minutes with the defaults.

    /opt/synapse-workers/venv/bin/python bench/pressure.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CpuWindow, fmt, make_root, percentile, print_header, print_table, stack_env  # noqa: E402
from tests.support.matrix import PASSWORD, register, registration_secret, unlimited  # noqa: E402
from tests.support.stack import Stack  # noqa: E402

TOPOLOGIES = {
    "split": "synchrotron, initial_synchrotron, event_creator, client_reader",
    "today": "synchrotron, event_creator, client_reader",
}


def login(base: str, user: str) -> str:
    body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": PASSWORD}
    return httpx.post(f"{base}/_matrix/client/v3/login", json=body, timeout=120).raise_for_status().json()[
        "access_token"
    ]


class Flooder(threading.Thread):
    """One device of the heavy user: initial syncs back to back; after a 429, waits retry_after_ms."""

    def __init__(self, base: str, token: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.base, self.token, self.stop = base, token, stop
        self.ok: list[float] = []
        self.limited = 0
        self.other = 0

    def run(self) -> None:
        with httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.token}"}, timeout=600) as http:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    response = http.get("/_matrix/client/v3/sync", params={"timeout": "0"})
                except httpx.HTTPError:
                    self.other += 1
                    continue
                if response.status_code == 200:
                    self.ok.append(time.monotonic() - started)
                elif response.status_code == 429:
                    self.limited += 1
                    self.stop.wait(response.json().get("retry_after_ms", 1000) / 1000)
                else:
                    self.other += 1


class Prober(threading.Thread):
    """The light user's requests, one at a time: incremental sync, send, login."""

    def __init__(self, base: str, token: str, user: str, room: str, since: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.base, self.token, self.user, self.room, self.since, self.stop = base, token, user, room, since, stop
        self.samples: list[tuple[str, float, float]] = []  # (probe, started, seconds)
        self.errors: dict[str, int] = {}

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.base, headers=headers, timeout=120) as http:
            n = 0
            while not self.stop.is_set():
                for probe in ("incremental sync", "send", "login", "public /health"):
                    started = time.monotonic()
                    try:
                        if probe == "incremental sync":
                            response = http.get("/_matrix/client/v3/sync", params={"since": self.since, "timeout": "0"})
                        elif probe == "send":
                            path = f"/_matrix/client/v3/rooms/{quote(self.room)}/send/m.room.message/probe-{n}"
                            response = http.put(path, json={"msgtype": "m.text", "body": f"probe {n}"})
                        elif probe == "public /health":
                            response = httpx.get(f"{self.base}/health", timeout=120)
                        else:
                            body = {"type": "m.login.password", "password": PASSWORD,
                                    "identifier": {"type": "m.id.user", "user": self.user}}
                            response = httpx.post(f"{self.base}/_matrix/client/v3/login", json=body, timeout=120)
                        ok = response.status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    if ok:
                        self.samples.append((probe, started, time.monotonic() - started))
                    else:
                        self.errors[probe] = self.errors.get(probe, 0) + 1
                    n += 1
                self.stop.wait(0.2)


def measure(name: str, workers: str, args) -> list[list]:
    root = make_root(f"sw-bpressure-{name}-")
    extra = {"NGINX_POOL_LIMITS": f"initial_synchrotron={args.limit}"} if "initial_synchrotron" in workers else {}
    env = stack_env(root, workers, SYNAPSE_LAUNCH_MODE=os.environ.get("SW_LAUNCH_MODE", "fork"), **extra)
    stack = Stack(env)
    stop_probe, stop_flood = threading.Event(), threading.Event()
    rows: list[list] = []
    try:
        # Synapse's login rate limits (per address and account) would answer the probe's logins 429 themselves.
        generated = stack.cli("generate")
        if generated.returncode != 0:
            raise RuntimeError(generated.stderr)
        homeserver = Path(env["SYNAPSE_CONFIG_DIR"], "homeserver.yaml")
        config = yaml.safe_load(homeserver.read_text())
        unlimited_rate = {"per_second": 1000, "burst_count": 1000}
        config["rc_login"] = {"address": unlimited_rate, "account": unlimited_rate, "failed_attempts": unlimited_rate}
        homeserver.write_text(yaml.safe_dump(config, sort_keys=False))  # in place: its owner and mode stay
        stack.start()
        base = stack.base_url
        secret = registration_secret(root / "data")
        admin = register(base, secret, "admin", admin=True)
        heavy, light = register(base, secret, "heavy"), register(base, secret, "light")
        for user in (heavy, light):
            unlimited(base, admin["access_token"], user["user_id"])
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {heavy['access_token']}"},
                          timeout=120) as http:
            for i in range(args.rooms):
                http.post("/_matrix/client/v3/createRoom", json={"name": f"room {i}"}).raise_for_status()
        light_headers = {"Authorization": f"Bearer {light['access_token']}"}
        room = httpx.post(f"{base}/_matrix/client/v3/createRoom", headers=light_headers, json={}, timeout=120)
        room_id = room.raise_for_status().json()["room_id"]
        since = httpx.get(f"{base}/_matrix/client/v3/sync", params={"timeout": "0"}, headers=light_headers,
                          timeout=120).raise_for_status().json()["next_batch"]
        tokens = [login(base, "heavy") for _ in range(args.clients)]
        prober = Prober(base, light["access_token"], "light", room_id, since, stop_probe)
        prober.start()
        time.sleep(2)  # warm-up
        flooders: list[Flooder] = []
        for window in ("idle", "flood"):
            with CpuWindow() as cpu:
                start = time.monotonic()
                if window == "flood":
                    flooders = [Flooder(base, token, stop_flood) for token in tokens]
                    for flooder in flooders:
                        flooder.start()
                time.sleep(args.seconds)
                end = time.monotonic()
            for probe in ("incremental sync", "send", "login", "public /health"):
                values = [s * 1000 for p, t, s in prober.samples if p == probe and start <= t < end]
                rows.append([name, window, probe, len(values), fmt(percentile(values, 50)),
                             fmt(percentile(values, 90)), fmt(max(values) if values else None), fmt(cpu.foreign, 2)])
        stop_flood.set()
        stop_probe.set()
        for thread in (*flooders, prober):
            thread.join(600)
        done = [s * 1000 for f in flooders for s in f.ok]
        rows.append([name, "flood", f"initial syncs: {len(done)} x 200 (p50 {fmt(percentile(done, 50))} ms), "
                     f"{sum(f.limited for f in flooders)} x 429, {sum(f.other for f in flooders)} other", "", "", "",
                     "", ""])
        if prober.errors:
            rows.append([name, "", f"probe errors: {prober.errors}", "", "", "", "", ""])
    finally:
        stop_flood.set()
        stop_probe.set()
        stack.close(root)
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=150, help="rooms of the heavy user")
    parser.add_argument("--clients", type=int, default=8, help="concurrent initial syncs in the flood")
    parser.add_argument("--limit", type=int, default=2, help="NGINX_POOL_LIMITS for initial_synchrotron (split)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each window")
    args = parser.parse_args()
    print_header("latency during an initial-sync flood, split and bounded vs today's routing (bench/pressure.py)",
                 args)
    rows = []
    for name, workers in TOPOLOGIES.items():
        rows.extend(measure(name, workers, args))
    print_table(["stack", "window", "probe", "n", "p50 ms", "p90 ms", "max ms", "other CPU"], rows,
                title=f"heavy user in {args.rooms} rooms, {args.clients} concurrent initial syncs; split: "
                f"initial_synchrotron={args.limit}")


if __name__ == "__main__":
    main()
