"""Matrix client helpers for end-to-end tests: a real client (matrix-nio) plus plain httpx.

Everything goes through the stack's public port. Users are registered with the shared-secret admin API
(`/_synapse/admin/v1/register`), logged in with nio, and exercised by `scenario()`, which checks one
feature at a time and records how long each took.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    LoginResponse,
    MemoryDownloadResponse,
    PresenceGetResponse,
    PresenceSetResponse,
    ProfileSetDisplayNameResponse,
    ReceiptEvent,
    RoomCreateResponse,
    RoomInviteResponse,
    RoomLeaveResponse,
    RoomMessageText,
    RoomSendResponse,
    RoomTypingResponse,
    SyncResponse,
    ToDeviceResponse,
    TypingNoticeEvent,
    UnknownToDeviceEvent,
    UpdateReceiptMarkerResponse,
    UploadResponse,
)
from nio.event_builders import ToDeviceMessage

# A long timeline: a default sync returns at most 10 events per room and would drop some as "limited".
SYNC_FILTER = {"room": {"timeline": {"limit": 100}}}
PASSWORD = "correct horse battery staple"


# ---- registration ---------------------------------------------------------------------------------------

def registration_secret(data_dir: str | Path, server_name: str = "localhost") -> str:
    """The shared secret `run` generated (homeserver.secret_paths: <data>/<server>.registration.key)."""
    return Path(data_dir, f"{server_name}.registration.key").read_text().strip()


def register(base_url: str, secret: str, localpart: str, password: str = PASSWORD, admin: bool = False) -> dict:
    """Register with the shared-secret admin API; returns Synapse's answer (user_id, access_token, ...)."""
    url = f"{base_url}/_synapse/admin/v1/register"
    with httpx.Client(timeout=30) as http:
        nonce = http.get(url).raise_for_status().json()["nonce"]
        mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(),
                                 b"admin" if admin else b"notadmin"]))
        body = {"nonce": nonce, "username": localpart, "password": password, "admin": admin,
                "mac": mac.hexdigest()}
        response = http.post(url, json=body)
    if response.status_code != 200:
        raise AssertionError(f"register {localpart}: HTTP {response.status_code} {response.text}")
    return response.json()


def upload_media(base_url: str, token: str, files: dict[str, bytes]) -> dict[str, bytes]:
    """Upload each file (name → content) through the media API; returns content URI → the bytes sent."""
    uploaded = {}
    for name, content in files.items():
        response = httpx.post(f"{base_url}/_matrix/media/v3/upload", params={"filename": name}, content=content,
                              headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
                              timeout=60)
        uploaded[response.raise_for_status().json()["content_uri"]] = content
    return uploaded


def unlimited(base_url: str, admin_token: str, user_id: str) -> None:
    """Admin API: no rate limiting at all for user_id (a zero override disables every limiter for them)."""
    response = httpx.post(f"{base_url}/_synapse/admin/v1/users/{quote(user_id)}/override_ratelimit",
                          json={"messages_per_second": 0, "burst_count": 0},
                          headers={"Authorization": f"Bearer {admin_token}"}, timeout=30)
    if response.status_code != 200:
        raise AssertionError(f"override_ratelimit {user_id}: HTTP {response.status_code} {response.text}")


# ---- nio ------------------------------------------------------------------------------------------------

def expect(response, kind):
    """nio returns error objects instead of raising: fail with the server's message."""
    if not isinstance(response, kind):
        raise AssertionError(f"expected {kind.__name__}, got {type(response).__name__}: {response}")
    return response


async def login(base_url: str, localpart: str, password: str = PASSWORD, server_name: str = "localhost",
                device_name: str = "e2e") -> AsyncClient:
    config = AsyncClientConfig(encryption_enabled=False, store_sync_tokens=False, request_timeout=60,
                               max_timeouts=2)
    client = AsyncClient(base_url, f"@{localpart}:{server_name}", config=config)
    try:
        expect(await client.login(password, device_name=device_name), LoginResponse)
    except BaseException:
        await client.close()
        raise
    return client


async def sync_until(client: AsyncClient, found: Callable[[SyncResponse], bool], timeout: float = 30.0,
                     what: str = "event", poll_ms: int = 2000) -> SyncResponse:
    """Incremental /sync (long-poll) until `found(response)` holds; each response is offered once."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        response = await client.sync(timeout=poll_ms, sync_filter=SYNC_FILTER)
        last = response
        if isinstance(response, SyncResponse):
            if found(response):
                return response
        else:
            await asyncio.sleep(0.5)  # an error (e.g. a worker restarting behind nginx): retry
    raise AssertionError(f"{client.user_id} did not see the {what} via /sync within {timeout}s (last: {last})")


def timeline(response: SyncResponse, room_id: str) -> list:
    room = response.rooms.join.get(room_id)
    return list(room.timeline.events) if room else []


def ephemeral(response: SyncResponse, room_id: str) -> list:
    room = response.rooms.join.get(room_id)
    return list(room.ephemeral) if room else []


async def send_text(client: AsyncClient, room_id: str, body: str) -> str:
    response = expect(await client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body}),
                      RoomSendResponse)
    return response.event_id


async def send_and_receive(sender: AsyncClient, receiver: AsyncClient, room_id: str, bodies: list[str],
                           timeout: float = 30.0) -> list[str]:
    """Send every body from `sender`; `receiver` must see them all via /sync. Returns the event ids."""
    event_ids = [await send_text(sender, room_id, body) for body in bodies]
    wanted, seen = set(bodies), set()

    def got_all(response: SyncResponse) -> bool:
        seen.update(e.body for e in timeline(response, room_id) if isinstance(e, RoomMessageText))
        return wanted <= seen

    await sync_until(receiver, got_all, timeout, what=f"{len(bodies)} messages (missing {wanted - seen})")
    return event_ids


def client_api(client: AsyncClient, method: str, path: str, **kwargs) -> httpx.Response:
    """A plain-HTTP client API call with the nio client's access token (for what nio does not wrap)."""
    with httpx.Client(base_url=client.homeserver, timeout=30) as http:
        return http.request(method, path, headers={"Authorization": f"Bearer {client.access_token}"}, **kwargs)


async def retry_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.5):
    """Call `check` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout}s")
        await asyncio.sleep(interval)


# ---- the scenario ---------------------------------------------------------------------------------------

@dataclass
class ScenarioResult:
    room_id: str = ""
    event_ids: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    user_directory_reindex: int = 0  # times bob had to be re-indexed before the directory found him


class _Timer:
    def __init__(self, result: ScenarioResult):
        self.result = result

    def step(self, name: str):
        result = self.result

        class Step:
            def __enter__(self):
                self.started = time.monotonic()

            def __exit__(self, *exc):
                result.timings[name] = round(time.monotonic() - self.started, 2)

        return Step()


async def scenario(base_url: str, data_dir: str | Path, server_name: str = "localhost") -> ScenarioResult:
    """Two users, one room, every feature a client uses day to day. Raises AssertionError on the first failure."""
    result = ScenarioResult()
    timer = _Timer(result)
    secret = registration_secret(data_dir, server_name)
    with timer.step("register"):
        admin_token = register(base_url, secret, "alice", admin=True)["access_token"]
        register(base_url, secret, "bob")
        # Synapse's default rate limits (rc_message: 10 burst then 1 per 5 s; rc_presence: 1 per 10 s)
        # would make the scenario mostly wait: exempt both users, as an admin would for a bot.
        for localpart in ("alice", "bob"):
            unlimited(base_url, admin_token, f"@{localpart}:{server_name}")
    with timer.step("login"):
        alice = await login(base_url, "alice", server_name=server_name, device_name="alice-e2e")
        bob = await login(base_url, "bob", server_name=server_name, device_name="bob-e2e")
    try:
        await _scenario(alice, bob, result, timer)
    finally:
        await alice.close()
        await bob.close()
    return result


async def _scenario(alice: AsyncClient, bob: AsyncClient, result: ScenarioResult, timer: _Timer) -> None:
    nonce = secrets.token_hex(4)

    with timer.step("room"):
        room_id = expect(await alice.room_create(name="e2e room"), RoomCreateResponse).room_id
        result.room_id = room_id
        expect(await alice.room_invite(room_id, bob.user_id), RoomInviteResponse)
        expect(await bob.join(room_id), JoinResponse)
        # Both start from a sync position that already includes the join.
        await sync_until(alice, lambda r: room_id in r.rooms.join, 30, "room")
        await sync_until(bob, lambda r: room_id in r.rooms.join, 30, "room")

    with timer.step("messages"):
        bodies = [f"message {i} {nonce}" for i in range(10)]
        result.event_ids = await send_and_receive(alice, bob, room_id, bodies)

    with timer.step("media"):
        payload = secrets.token_bytes(64 * 1024) + b"end"
        upload, _ = await alice.upload(lambda *_: io.BytesIO(payload), content_type="application/octet-stream",
                                       filename="e2e.bin", filesize=len(payload))
        mxc = expect(upload, UploadResponse).content_uri
        download = expect(await bob.download(mxc), MemoryDownloadResponse)
        assert download.body == payload, "downloaded media differs from the upload"

    with timer.step("typing"):
        expect(await alice.room_typing(room_id, True, timeout=30000), RoomTypingResponse)
        await sync_until(bob, lambda r: any(isinstance(e, TypingNoticeEvent) and alice.user_id in e.users
                                            for e in ephemeral(r, room_id)), 30, "m.typing")
        expect(await alice.room_typing(room_id, False), RoomTypingResponse)

    with timer.step("receipts"):
        last_event = result.event_ids[-1]
        expect(await bob.update_receipt_marker(room_id, last_event), UpdateReceiptMarkerResponse)

        def bob_read(response: SyncResponse) -> bool:
            return any(isinstance(e, ReceiptEvent)
                       and any(r.user_id == bob.user_id and r.event_id == last_event for r in e.receipts)
                       for e in ephemeral(response, room_id))

        await sync_until(alice, bob_read, 30, "m.receipt")

    with timer.step("to_device"):
        content = {"nonce": nonce, "hello": "bob"}
        message = ToDeviceMessage("org.example.e2e", bob.user_id, bob.device_id, content)
        expect(await alice.to_device(message), ToDeviceResponse)

        def got_it(response: SyncResponse) -> bool:
            return any(isinstance(e, UnknownToDeviceEvent) and e.type == "org.example.e2e"
                       and e.source.get("content") == content and e.sender == alice.user_id
                       for e in response.to_device_events)

        await sync_until(bob, got_it, 30, "to-device message")

    with timer.step("presence"):
        for state in ("unavailable", "online"):
            status = f"{state} {nonce}"
            expect(await alice.set_presence(state, status_msg=status), PresenceSetResponse)

            async def seen(reader: AsyncClient = bob, state: str = state, status: str = status) -> bool:
                got = await reader.get_presence(alice.user_id)
                return isinstance(got, PresenceGetResponse) and got.presence == state and got.status_msg == status

            await retry_until(seen, 15, f"bob reads alice's presence {state!r}")

    with timer.step("account_data"):
        path = f"/_matrix/client/v3/user/{quote(alice.user_id)}/account_data/org.example.e2e"
        value = {"nonce": nonce, "list": [1, 2, 3]}
        put = client_api(alice, "PUT", path, json=value)
        assert put.status_code == 200, put.text
        got = client_api(alice, "GET", path)
        assert got.status_code == 200 and got.json() == value, got.text

    with timer.step("user_directory"):
        misses = 0

        async def finds_bob() -> bool:
            nonlocal misses
            response = client_api(alice, "POST", "/_matrix/client/v3/user_directory/search",
                                  json={"search_term": "bob", "limit": 10})
            assert response.status_code == 200, response.text
            if any(u["user_id"] == bob.user_id for u in response.json()["results"]):
                return True
            misses += 1
            if misses % 3 == 0:
                await _reindex_in_directory(alice, bob, room_id, misses)
                result.user_directory_reindex += 1
            return False

        await retry_until(finds_bob, 40, "alice finds bob in the user directory", interval=1)

    with timer.step("federation_version"):
        with httpx.Client(timeout=30) as http:
            response = http.get(f"{alice.homeserver}/_matrix/federation/v1/version")
        assert response.status_code == 200, response.text
        assert response.json()["server"]["name"] == "Synapse", response.text


async def _reindex_in_directory(alice: AsyncClient, bob: AsyncClient, room_id: str, n: int) -> None:
    """Make Synapse index bob again: a new join (who shares a room) and a profile change (his entry).

    Works around a Synapse race on fresh installs: the directory's initial population (a background
    update running in the first seconds after the first start) truncates the directory tables, then
    refills them from snapshots of users and rooms taken before it began, and resumes incremental
    processing only after them. Users and joins that land in between are lost until the next join or
    profile change (seen with the small worker set: bob missing from `user_directory`, or the pair missing
    from `users_who_share_private_rooms`, for good)."""
    expect(await bob.room_leave(room_id), RoomLeaveResponse)
    expect(await alice.room_invite(room_id, bob.user_id), RoomInviteResponse)
    expect(await bob.join(room_id), JoinResponse)
    expect(await bob.set_displayname(f"Bob {n}"), ProfileSetDisplayNameResponse)


async def check_still_works(base_url: str, room_id: str, server_name: str = "localhost", label: str = "again",
                            timeout: float = 60.0) -> None:
    """Existing users log in again; alice's message reaches bob via /sync; the room is still joined."""
    alice = await login(base_url, "alice", server_name=server_name, device_name=f"alice-{label}")
    bob = await login(base_url, "bob", server_name=server_name, device_name=f"bob-{label}")
    try:
        rooms = await alice.joined_rooms()
        assert room_id in getattr(rooms, "rooms", []), f"alice no longer in {room_id}: {rooms}"
        await sync_until(bob, lambda r: room_id in r.rooms.join, timeout, "room (initial sync)")
        await send_and_receive(alice, bob, room_id, [f"{label} {secrets.token_hex(4)}"], timeout)
    finally:
        await alice.close()
        await bob.close()
