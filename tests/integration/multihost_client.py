"""A Matrix client (httpx) that the multi-host test runs inside a network namespace of its own.

    ip netns exec NS python -m tests.integration.multihost_client COMMAND  < request.json  > result.json

The test process stays in the root namespace (which must never send to the simulated hosts' addresses), so
every request to the deployment is made from here. Secrets come on stdin, never as arguments.

Commands: `setup` (register an admin user with the shared secret, lift its rate limit, create a room),
`send` (send messages once each, then retry the unacknowledged ones with the same transaction id),
`read` (every message of the room via /messages, and via /sync), `probe` (which TCP ports accept a connection).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from urllib.parse import quote

import httpx

from tests.support.matrix import register, unlimited


def setup(req: dict) -> dict:
    base = req["base"]
    user = register(base, req["secret"], "alice", admin=True)
    token = user["access_token"]
    unlimited(base, token, user["user_id"])
    headers = {"Authorization": f"Bearer {token}"}
    room = httpx.post(f"{base}/_matrix/client/v3/createRoom", json={"name": "hosts"}, headers=headers, timeout=60)
    room.raise_for_status()
    return {"token": token, "room_id": room.json()["room_id"], "user_id": user["user_id"]}


def _send_one(http: httpx.Client, req: dict, txn: str, timeout: float) -> str | None:
    url = f"{req['base']}/_matrix/client/v3/rooms/{quote(req['room_id'])}/send/m.room.message/{txn}"
    try:
        response = http.put(url, json={"msgtype": "m.text", "body": txn}, timeout=timeout)
    except httpx.HTTPError:
        return None
    return response.json()["event_id"] if response.status_code == 200 else None


def send(req: dict) -> dict:
    """Each message once (`count`, every `interval` s, `timeout` s each); then every message not acknowledged is
    sent again with its own transaction id (Synapse answers a repeated one with the same event) until
    `retry_for` s have passed. Returns per transaction id: first attempt's event id (or None) and the final one."""
    headers = {"Authorization": f"Bearer {req['token']}"}
    first: dict[str, str | None] = {}
    with httpx.Client(headers=headers) as http:
        for i in range(req["count"]):
            started = time.monotonic()
            txn = f"{req['prefix']}-{i:03d}"
            first[txn] = _send_one(http, req, txn, req["timeout"])
            time.sleep(max(0.0, req["interval"] - (time.monotonic() - started)))
        final = dict(first)
        deadline = time.monotonic() + req["retry_for"]
        while time.monotonic() < deadline and any(v is None for v in final.values()):
            for txn in [t for t, v in final.items() if v is None]:
                final[txn] = _send_one(http, req, txn, req["timeout"])
            if any(v is None for v in final.values()):
                time.sleep(1)
    return {"first": first, "final": final}


def read(req: dict) -> dict:
    """Every m.room.message of the room, oldest first, through /messages; and what one /sync shows."""
    headers = {"Authorization": f"Bearer {req['token']}"}
    room = quote(req["room_id"])
    found = []
    with httpx.Client(headers=headers, timeout=60) as http:
        token = None
        while True:
            params = {"dir": "b", "limit": "100", **({"from": token} if token else {})}
            page = http.get(f"{req['base']}/_matrix/client/v3/rooms/{room}/messages", params=params)
            page.raise_for_status()
            body = page.json()
            found += [e for e in body.get("chunk", []) if e.get("type") == "m.room.message"]
            token = body.get("end")
            if not body.get("chunk") or not token:
                break
        sync_filter = json.dumps({"room": {"timeline": {"limit": 200}}})
        sync = http.get(f"{req['base']}/_matrix/client/v3/sync", params={"filter": sync_filter})
        sync.raise_for_status()
        timeline = sync.json().get("rooms", {}).get("join", {}).get(req["room_id"], {}).get("timeline", {})
    messages = [{"event_id": e["event_id"], "body": e["content"].get("body")} for e in reversed(found)]
    synced = [e["event_id"] for e in timeline.get("events", []) if e.get("type") == "m.room.message"]
    return {"messages": messages, "synced": synced}


def probe(req: dict) -> dict:
    result = {}
    for host, port in req["targets"]:
        try:
            with socket.create_connection((host, port), timeout=req.get("timeout", 3)):
                result[f"{host}:{port}"] = "open"
        except OSError as exc:
            result[f"{host}:{port}"] = type(exc).__name__
    return result


COMMANDS = {"setup": setup, "send": send, "read": read, "probe": probe}

if __name__ == "__main__":
    request = json.loads(sys.stdin.read())
    json.dump(COMMANDS[sys.argv[1]](request), sys.stdout)
