"""Our own request table for the nginx routing tests, written from the reference docs, not from catalog.py.

Source: /work/shared/reference/synapse-workers-facts.md (Synapse 1.163.2 docs/workers.md endpoint lists
§3.1-3.5, stream writers §4, method-sensitive routes §5, main-only servlets §8, nginx semantics §11).

Each request names where it must land as a preference list of worker types/roles: the first one the
topology deploys serves it; when none is deployed, main does. An empty list means main, always.
Names are matched against a process's roles and its declared types (so `client_reader` as declared and
its roles `client_reader_room` / `client_reader_non_room` both work).

Paths are sent byte for byte as written here (percent-encoding kept) and must reach the upstream unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    want: tuple[str, ...]  # preference list; () = main
    note: str
    group: str


# Preference lists (where the docs allow a choice, the more specific worker comes first).
MAIN: tuple[str, ...] = ()
SYNC = ("synchrotron",)
# An initial sync (no since, or full_state=true; /events without from; initialSync): its own pool when deployed.
INITIAL = ("initial_synchrotron", "synchrotron")
SLIDING = ("sliding_synchrotron", "synchrotron")
FED_ROOM = ("federation_reader_room",)
FED_OTHER = ("federation_reader_non_room",)
FED_INBOUND = ("federation_inbound",)
CLIENT = ("client_reader_non_room",)
ROOM = ("client_reader_room",)
CREATOR = ("event_creator",)
CREATOR_OR_CLIENT = ("event_creator", "client_reader_non_room")
DEVICES = ("device_lists", "client_reader_non_room")
KEY_UPLOAD = ("device_lists", "frontend_proxy", "client_reader_non_room")
USER_DIR = ("user_dir",)
MEDIA = ("media_repository",)
TYPING = ("typing",)
TO_DEVICE = ("to_device",)
RECEIPTS = ("receipts",)
THREADS = ("thread_subscriptions",)
PUSH_WRITE = ("push_rules",)
PUSH_READ = ("push_rules", "client_reader_non_room")
ACCOUNT_WRITE = ("account_data",)
ACCOUNT_READ = ("account_data", "client_reader_non_room")
PRESENCE_WRITE = ("presence",)
PRESENCE_READ = ("presence", "client_reader_non_room")

ROOM_ID = "%21room%3Aexample.org"  # !room:example.org, percent-encoded as most clients send it
ROOM_RAW = "!room:example.org"
USER_ID = "%40user%3Aexample.org"
USER_RAW = "@user:example.org"
EVENT_ID = "%24event%3Aexample.org"
EVENT_RAW = "$event:example.org"
ALIAS = "%23alias%3Aexample.org"
C = "/_matrix/client/v3"
R0 = "/_matrix/client/r0"
V1 = "/_matrix/client/v1"
UNSTABLE = "/_matrix/client/unstable"
FED = "/_matrix/federation"
ADMIN = "/_synapse/admin"
MSC4140 = f"{UNSTABLE}/org.matrix.msc4140/delayed_events"


def _group(group: str, *rows: tuple) -> list[Req]:
    return [Req(method, path, want, note, group) for method, path, want, note in rows]


REQUESTS: list[Req] = [
    # ---------------------------------------------------------------- §3.1 sync
    *_group(
        "sync",
        ("GET", f"{C}/sync", INITIAL, "v3 sync without since: initial"),
        ("GET", f"{C}/sync?timeout=0&filter=0", INITIAL, "sync without since, other parameters: initial"),
        ("GET", f"{R0}/sync?since=s72594_4483_1934&timeout=30000", SYNC, "r0 sync with a since token"),
        ("GET", f"{C}/sync?since=s72594_4483_1934&full_state=true", INITIAL, "full_state=true: initial"),
        ("GET", f"{C}/sync?full_state=false&since=s72594_4483_1934", SYNC, "full_state=false: incremental"),
        ("GET", f"{C}/sync?since=&timeout=0", INITIAL, "an empty since: initial"),
        ("GET", f"{C}/sync?timeout=0&xsince=s1", INITIAL, "a parameter ending in since is not since"),
        ("GET", f"{C}/events?from=s1", SYNC, "legacy /events with from"),
        ("GET", "/_matrix/client/api/v1/events", INITIAL, "api/v1 /events without from: initial"),
        ("GET", f"{R0}/initialSync", INITIAL, "global initialSync"),
        ("GET", f"{C}/rooms/{ROOM_ID}/initialSync", INITIAL, "room initialSync, encoded room ID"),
        ("GET", f"{C}/rooms/{ROOM_RAW}/initialSync", INITIAL, "room initialSync, raw room ID"),
        ("GET", f"{C}/rooms/%21a%2Fb%3Aexample.org/initialSync", MAIN,
         "an encoded / inside the ID decodes to a separator: rooms/[^/]+/initialSync fails (§11), main"),
        ("POST", f"{UNSTABLE}/org.matrix.simplified_msc3575/sync", SLIDING,
         "sliding sync: registered on generic workers (§8), routed by this project"),
        ("GET", "/_matrix/client/v3/sync/extra", MAIN, "sync$ is anchored"),
    ),
    # ---------------------------------------------------------------- §3.1 federation requests
    *_group(
        "federation",
        ("GET", f"{FED}/v1/version", FED_OTHER, "version"),
        ("GET", f"{FED}/v1/event/{EVENT_ID}", FED_OTHER, "event"),
        ("GET", f"{FED}/v1/state/{ROOM_ID}?event_id={EVENT_ID}", FED_ROOM, "state"),
        ("GET", f"{FED}/v1/state_ids/{ROOM_RAW}?event_id={EVENT_ID}", FED_ROOM, "state_ids"),
        ("GET", f"{FED}/v1/backfill/{ROOM_ID}?v={EVENT_ID}&limit=10", FED_ROOM, "backfill"),
        ("POST", f"{FED}/v1/get_missing_events/{ROOM_ID}", FED_ROOM, "get_missing_events"),
        ("GET", f"{FED}/v1/publicRooms", FED_OTHER, "publicRooms GET"),
        ("POST", f"{FED}/v1/publicRooms", FED_OTHER, "publicRooms POST"),
        ("GET", f"{FED}/v1/query/profile?user_id={USER_ID}&field=displayname", FED_OTHER, "query"),
        ("GET", f"{FED}/v1/query/directory?room_alias={ALIAS}", FED_OTHER, "query directory"),
        ("GET", f"{FED}/v1/make_join/{ROOM_ID}/%40remote%3Aremote.example?ver=10", FED_ROOM, "make_join"),
        ("GET", f"{FED}/v1/make_leave/{ROOM_ID}/%40remote%3Aremote.example", FED_ROOM, "make_leave"),
        ("PUT", f"{FED}/v1/send_join/{ROOM_ID}/{EVENT_ID}", FED_ROOM, "send_join v1"),
        ("PUT", f"{FED}/v2/send_join/{ROOM_ID}/{EVENT_ID}", FED_ROOM, "send_join v2"),
        ("PUT", f"{FED}/v1/send_leave/{ROOM_ID}/{EVENT_ID}", FED_ROOM, "send_leave v1"),
        ("PUT", f"{FED}/v2/send_leave/{ROOM_ID}/{EVENT_ID}", FED_ROOM, "send_leave v2"),
        ("GET", f"{FED}/v1/make_knock/{ROOM_ID}/%40remote%3Aremote.example?ver=7", FED_ROOM, "make_knock"),
        ("PUT", f"{FED}/v1/send_knock/{ROOM_ID}/{EVENT_ID}", FED_ROOM, "send_knock"),
        ("PUT", f"{FED}/v1/invite/{ROOM_ID}/{EVENT_ID}", FED_ROOM, "invite v1"),
        ("PUT", f"{FED}/v2/invite/{ROOM_ID}/{EVENT_ID}", FED_ROOM, "invite v2"),
        ("GET", f"{FED}/v1/event_auth/{ROOM_ID}/{EVENT_ID}", FED_ROOM, "event_auth"),
        ("GET", f"{FED}/v1/timestamp_to_event/{ROOM_ID}?dir=f&ts=1", FED_ROOM, "timestamp_to_event"),
        ("PUT", f"{FED}/v1/exchange_third_party_invite/{ROOM_ID}", FED_ROOM, "exchange_third_party_invite"),
        ("GET", f"{FED}/v1/user/devices/{USER_ID}", FED_OTHER, "user/devices"),
        ("POST", "/_matrix/key/v2/query", FED_OTHER, "key query (batch)"),
        ("GET", "/_matrix/key/v2/query/remote.example", FED_OTHER, "key query (one server)"),
        ("GET", f"{FED}/v1/hierarchy/{ROOM_ID}?suggested_only=false", FED_OTHER, "hierarchy"),
        ("GET", "/_matrix/key/v2/server", MAIN, "own keys: kept on main (§8)"),
        ("POST", f"{FED}/v1/user/keys/query", MAIN, "user/keys/query: not in workers.md, kept on main (§8)"),
        ("POST", f"{FED}/v1/user/keys/claim", MAIN, "user/keys/claim: kept on main (§8)"),
        ("GET", f"{FED}/v1/openid/userinfo?access_token=abc", MAIN, "openid/userinfo: kept on main (§8)"),
        ("GET", f"{FED}/unstable/rooms/{ROOM_ID}/complexity", MAIN, "room complexity: kept on main (§8)"),
        ("PUT", f"{FED}/v2/send/1700000000002", MAIN, "there is no v2 /send: main"),
    ),
    # ---------------------------------------------------------------- §3.1 inbound federation /send
    *_group(
        "federation inbound",
        ("PUT", f"{FED}/v1/send/1700000000001", FED_INBOUND, "transaction"),
        ("PUT", f"{FED}/v1/send/txn%2F1", FED_INBOUND, "txn ID with an encoded slash"),
    ),
    # ---------------------------------------------------------------- §3.1 client API
    *_group(
        "client api",
        ("POST", f"{C}/createRoom", CREATOR_OR_CLIENT, "createRoom"),
        ("POST", f"{R0}/createRoom", CREATOR_OR_CLIENT, "createRoom r0"),
        ("GET", f"{C}/publicRooms", CLIENT, "publicRooms"),
        ("POST", f"{R0}/publicRooms", CLIENT, "publicRooms POST r0"),
        ("GET", f"{C}/rooms/{ROOM_ID}/joined_members", ROOM, "joined_members"),
        ("GET", f"{C}/rooms/{ROOM_ID}/context/{EVENT_ID}?limit=10", ROOM, "context"),
        ("GET", f"{C}/rooms/{ROOM_ID}/members?at=s1", ROOM, "members"),
        ("GET", f"{C}/rooms/{ROOM_RAW}/members", ROOM, "members, raw room ID"),
        ("GET", f"{C}/rooms/{ROOM_ID}/state", ROOM, "full state (no trailing slash)"),
        ("GET", f"{V1}/rooms/{ROOM_ID}/hierarchy", ROOM, "hierarchy"),
        ("GET", f"{V1}/rooms/{ROOM_ID}/relations/{EVENT_ID}/m.thread", ROOM, "relations v1"),
        ("GET", f"{UNSTABLE}/rooms/{ROOM_ID}/relations/{EVENT_ID}", ROOM, "relations unstable"),
        ("GET", f"{V1}/rooms/{ROOM_ID}/threads", ROOM, "threads"),
        ("GET", f"{UNSTABLE}/im.nheko.summary/summary/{ALIAS}", ROOM, "nheko room summary"),
        ("GET", f"{V1}/room_summary/{ROOM_ID}?via=example.org", ROOM, "room_summary"),
        ("GET", f"{C}/account/3pid", CLIENT, "account/3pid GET"),
        ("GET", f"{C}/account/whoami", CLIENT, "whoami"),
        ("POST", f"{C}/account/deactivate", CLIENT, "deactivate"),
        ("POST", f"{C}/delete_devices", DEVICES, "delete_devices"),
        ("GET", f"{C}/devices", DEVICES, "devices list"),
        ("GET", f"{C}/devices/ABCDEFGH", DEVICES, "one device"),
        ("PUT", f"{C}/devices/ABCDEFGH", DEVICES, "rename device"),
        ("DELETE", f"{C}/devices/ABCDEFGH", DEVICES, "delete device"),
        # Registered on generic workers when homeserver.yaml's experimental_features enable them (Synapse 1.163.2).
        ("GET", f"{UNSTABLE}/org.matrix.msc3814.v1/dehydrated_device", DEVICES, "MSC3814 dehydrated device"),
        ("PUT", f"{UNSTABLE}/org.matrix.msc3814.v1/dehydrated_device", DEVICES, "MSC3814 store dehydrated device"),
        ("DELETE", f"{UNSTABLE}/org.matrix.msc3814.v1/dehydrated_device", DEVICES, "MSC3814 delete"),
        ("POST", f"{UNSTABLE}/org.matrix.msc3814.v1/dehydrated_device/ABCDEFGH/events", DEVICES,
         "MSC3814 the dehydrated device's to-device events"),
        ("GET", f"{UNSTABLE}/org.matrix.msc3814.v1/dehydrated_device/ABCDEFGH/events/x", MAIN,
         "MSC3814: nothing under events/"),
        ("GET", f"{UNSTABLE}/org.matrix.msc4143/rtc/transports", CLIENT, "MatrixRTC transports (MSC4143)"),
        ("GET", "/_matrix/client/versions", CLIENT, "versions"),
        ("GET", f"{C}/voip/turnServer", CLIENT, "turnServer"),
        ("GET", f"{C}/rooms/{ROOM_ID}/event/{EVENT_ID}", ROOM, "one event"),
        ("GET", f"{C}/joined_rooms", CLIENT, "joined_rooms"),
        ("GET", f"{V1}/rooms/{ROOM_ID}/timestamp_to_event?dir=b&ts=1", ROOM, "timestamp_to_event"),
        ("GET", f"{C}/rooms/{ROOM_ID}/aliases", ROOM, "aliases"),
        ("GET", f"{UNSTABLE}/org.matrix.msc2432/rooms/{ROOM_ID}/aliases", ROOM, "aliases unstable/.*"),
        ("POST", f"{C}/search?next_batch=x", CLIENT, "search"),
        ("GET", f"{C}/user/{USER_ID}/filter/1", CLIENT, "filter GET"),
        ("POST", f"{C}/user/{USER_ID}/filter", CLIENT, "filter POST"),
        ("GET", f"{C}/directory/room/{ALIAS}", CLIENT, "alias lookup"),
        ("PUT", f"{C}/directory/room/{ALIAS}", CLIENT, "alias create"),
        ("GET", f"{C}/capabilities", CLIENT, "capabilities"),
        ("GET", f"{C}/notifications?limit=5", CLIENT, "notifications"),
        ("POST", f"{V1}/appservice/bridge/ping", MAIN, "appservice ping: kept on main (§8)"),
    ),
    # ---------------------------------------------------------------- §3.1 admin + §5 method-sensitive admin
    *_group(
        "admin",
        ("GET", f"{ADMIN}/v1/rooms/{ROOM_ID}", CLIENT, "room details"),
        ("DELETE", f"{ADMIN}/v1/rooms/{ROOM_ID}", CLIENT, "room delete (v1)"),
        ("PUT", f"{ADMIN}/v1/rooms/{ROOM_ID}", MAIN, "only GET/DELETE are workerisable (§5)"),
        ("GET", f"{ADMIN}/v1/rooms", MAIN, "room list: not [^/]+"),
        ("GET", f"{ADMIN}/v1/rooms/{ROOM_ID}/members", MAIN, "room members admin: main"),
        ("GET", f"{ADMIN}/v2/users/{USER_ID}", CLIENT, "§3.2: GET v2 user is worker-safe"),
        ("PUT", f"{ADMIN}/v2/users/{USER_ID}", MAIN, "§5: PUT v2 user is main-only (worker 405)"),
        ("GET", f"{ADMIN}/v2/users?from=0&limit=10", MAIN, "user list"),
        ("GET", f"{ADMIN}/v1/server_version", MAIN, "other admin APIs: main"),
    ),
    # ---------------------------------------------------------------- §3.1 encryption
    *_group(
        "encryption",
        ("POST", f"{C}/keys/query", CLIENT, "keys/query"),
        ("GET", f"{C}/keys/changes?from=a&to=b", CLIENT, "keys/changes"),
        ("POST", f"{R0}/keys/claim", CLIENT, "keys/claim"),
        ("GET", f"{C}/room_keys/version", CLIENT, "room_keys version"),
        ("PUT", f"{C}/room_keys/keys/{ROOM_ID}?version=1", CLIENT, "room_keys upload"),
        ("POST", f"{C}/keys/upload", KEY_UPLOAD, "keys/upload"),
        ("POST", f"{R0}/keys/upload/DEVICEID", KEY_UPLOAD, "legacy keys/upload/{device} (unanchored)"),
        ("POST", f"{C}/keys/device_signing/upload", KEY_UPLOAD, "cross-signing keys"),
        ("POST", f"{C}/keys/signatures/upload", KEY_UPLOAD, "signatures"),
    ),
    # ---------------------------------------------------------------- §3.1 registration / login
    *_group(
        "registration and login",
        ("GET", f"{C}/login", CLIENT, "login flows"),
        ("POST", f"{C}/login", CLIENT, "login"),
        ("POST", "/_matrix/client/api/v1/login", CLIENT, "login api/v1"),
        ("POST", f"{C}/register", CLIENT, "register"),
        ("GET", f"{C}/register/available?username=alice", CLIENT, "register/available"),
        ("GET", f"{V1}/register/m.login.registration_token/validity?token=abc", CLIENT, "token validity"),
        ("GET", f"{C}/password_policy", CLIENT, "password_policy"),
        ("POST", f"{C}/register/email/requestToken", MAIN, "§8: main-only"),
        ("POST", f"{V1}/login/get_token", MAIN, "§8: login/get_token main-only"),
    ),
    # ---------------------------------------------------------------- §3.1 event sending
    *_group(
        "event sending",
        ("PUT", f"{C}/rooms/{ROOM_ID}/redact/{EVENT_ID}/txn1", CREATOR, "redact"),
        ("PUT", f"{C}/rooms/{ROOM_ID}/send/m.room.message/txn2", CREATOR, "send"),
        ("PUT", f"{C}/rooms/{ROOM_RAW}/send/m.room.message/t%2Fx", CREATOR, "send, raw room, %2F txn"),
        ("PUT", f"{C}/rooms/{ROOM_ID}/state/m.room.topic/", CREATOR, "state with empty key"),
        ("PUT", f"{C}/rooms/{ROOM_ID}/state/m.room.member/{USER_ID}", CREATOR, "state with a key"),
        ("GET", f"{C}/rooms/{ROOM_ID}/state/m.room.name/", CREATOR, "state read (docs group: any method)"),
        ("POST", f"{C}/rooms/{ROOM_ID}/join", CREATOR, "join by room"),
        ("POST", f"{C}/rooms/{ROOM_ID}/invite", CREATOR, "invite"),
        ("POST", f"{C}/rooms/{ROOM_ID}/leave", CREATOR, "leave"),
        ("POST", f"{C}/rooms/{ROOM_ID}/ban", CREATOR, "ban"),
        ("POST", f"{C}/rooms/{ROOM_ID}/unban", CREATOR, "unban"),
        ("POST", f"{C}/rooms/{ROOM_ID}/kick", CREATOR, "kick"),
        ("POST", f"{C}/join/{ALIAS}?server_name=example.org", CREATOR, "join by alias"),
        ("POST", f"{C}/knock/{ROOM_ID}", CREATOR, "knock"),
        ("GET", f"{C}/profile/{USER_ID}", CREATOR_OR_CLIENT, "profile GET"),
        ("PUT", f"{C}/profile/{USER_ID}/displayname", CREATOR_OR_CLIENT, "profile PUT"),
    ),
    # ---------------------------------------------------------------- §3.1 user directory
    *_group(
        "user directory",
        ("POST", f"{C}/user_directory/search", USER_DIR, "search"),
        ("POST", f"{R0}/user_directory/search", USER_DIR, "search r0"),
    ),
    # ---------------------------------------------------------------- §3.1 MSC4140 + §5
    *_group(
        "MSC4140",
        ("GET", MSC4140, CLIENT, "list"),
        ("GET", f"{MSC4140}/abcdef", CLIENT, "one delayed event (1.163+)"),
        ("POST", f"{MSC4140}/abcdef", MAIN, "legacy update is main-only (worker 405)"),
        ("POST", f"{MSC4140}/abcdef/restart", CLIENT, "restart is workerisable (1.144+)"),
        ("POST", f"{MSC4140}/abcdef/cancel", MAIN, "cancel: main-only (worker 404)"),
        ("POST", f"{MSC4140}/abcdef/send", MAIN, "send: main-only (worker 404)"),
    ),
    *_group(
        "MAS",
        ("GET", "/_synapse/mas/is_localpart_available?localpart=alice", CLIENT, "^/_synapse/mas/"),
    ),
    # ---------------------------------------------------------------- §3.2 GET-only groups + §4 writers + §5
    *_group(
        "push rules",
        ("GET", f"{C}/pushrules/", PUSH_READ, "read"),
        ("GET", f"{R0}/pushrules/global/override/.m.rule.master", PUSH_READ, "read one rule"),
        ("PUT", f"{C}/pushrules/global/room/{ROOM_ID}", PUSH_WRITE, "write: writer or main (HARD)"),
        ("DELETE", f"{C}/pushrules/global/override/myrule", PUSH_WRITE, "delete: writer or main (HARD)"),
        ("PUT", f"{C}/pushrules/global/override/myrule/enabled", PUSH_WRITE, "enable"),
        ("PUT", f"{C}/pushrules/global/content/tags", PUSH_WRITE,
         "rule ID 'tags': must NOT go to account_data's .*/tags"),
        ("PUT", f"{C}/pushrules/global/room/x/tags/actions", PUSH_WRITE, "a /tags/ segment inside a push rule"),
    ),
    *_group(
        "account data",
        ("GET", f"{C}/user/{USER_ID}/account_data/m.direct", ACCOUNT_READ, "read"),
        ("PUT", f"{C}/user/{USER_ID}/account_data/m.direct", ACCOUNT_WRITE, "write"),
        ("GET", f"{C}/user/{USER_ID}/rooms/{ROOM_ID}/tags", ACCOUNT_READ, "tags read"),
        ("PUT", f"{C}/user/{USER_ID}/rooms/{ROOM_ID}/tags/m.favourite", ACCOUNT_WRITE, "tag write"),
        ("DELETE", f"{C}/user/{USER_ID}/rooms/{ROOM_ID}/tags/u.work", ACCOUNT_WRITE, "tag delete"),
        ("PUT", f"{C}/user/{USER_ID}/rooms/{ROOM_ID}/account_data/m.fully_read", ACCOUNT_WRITE,
         "room account data write"),
        ("GET", f"{UNSTABLE}/user/{USER_ID}/account_data/m.x", ACCOUNT_READ, "unstable prefix"),
    ),
    *_group(
        "presence",
        ("GET", f"{C}/presence/{USER_ID}/status", PRESENCE_READ, "read"),
        ("PUT", f"{C}/presence/{USER_ID}/status", PRESENCE_WRITE, "write"),
        ("GET", f"/_matrix/client/api/v1/presence/{USER_ID}/status", PRESENCE_READ, "api/v1"),
    ),
    # ---------------------------------------------------------------- §3.3 pagination
    *_group(
        "messages",
        ("GET", f"{C}/rooms/{ROOM_ID}/messages?dir=b&from=t1-2_3&limit=10", ROOM, "encoded room"),
        ("GET", f"{R0}/rooms/{ROOM_RAW}/messages?dir=f", ROOM, "raw room, r0"),
        ("GET", f"{UNSTABLE}/rooms/{ROOM_ID}/messages", ROOM, "unstable"),
    ),
    # ---------------------------------------------------------------- §3.4 SSO: stays on main
    *_group(
        "sso",
        ("GET", f"{C}/login/sso/redirect?redirectUrl=https%3A%2F%2Fapp.example%2F%3Fa%3D1", MAIN, "redirect"),
        ("GET", f"{R0}/login/sso/redirect/oidc-github?redirectUrl=https%3A%2F%2Fapp.example", MAIN,
         "redirect to one IdP"),
        ("GET", "/_synapse/client/pick_idp?redirectUrl=https%3A%2F%2Fapp.example&idp=oidc", MAIN, "pick_idp"),
        ("GET", "/_synapse/client/pick_username/account_details", MAIN, "pick_username"),
        ("GET", "/_synapse/client/new_user_consent", MAIN, "consent"),
        ("POST", "/_synapse/client/sso_register", MAIN, "sso_register"),
        ("GET", "/_synapse/client/oidc/callback?code=c&state=s", MAIN, "OIDC callback"),
        ("POST", "/_synapse/client/saml2/authn_response", MAIN, "SAML"),
        ("GET", f"{C}/login/cas/ticket?redirectUrl=https%3A%2F%2Fapp.example&ticket=t", MAIN, "CAS"),
    ),
    # ---------------------------------------------------------------- §3.5 media
    *_group(
        "media",
        ("POST", "/_matrix/media/v3/upload?filename=a%20b.png", MEDIA, "upload"),
        ("GET", "/_matrix/media/v3/download/example.org/abcDEF", MEDIA, "download"),
        ("GET", "/_matrix/media/r0/thumbnail/example.org/abcDEF?width=32&height=32", MEDIA, "thumbnail r0"),
        ("GET", "/_matrix/media/v3/config", MEDIA, "config"),
        ("GET", "/_matrix/media/v3/preview_url?url=https%3A%2F%2Fexample.org%2F", MEDIA, "preview"),
        ("GET", f"{V1}/media/download/example.org/abcDEF", MEDIA, "authenticated download"),
        ("GET", f"{V1}/media/thumbnail/example.org/abcDEF?width=64&height=64", MEDIA, "authenticated thumbnail"),
        ("GET", f"{V1}/media/config", MEDIA, "authenticated config"),
        ("GET", f"{FED}/v1/media/download/abcDEF", MEDIA, "federation download"),
        ("GET", f"{FED}/v1/media/thumbnail/abcDEF?width=32&height=32", MEDIA, "federation thumbnail"),
        ("POST", f"{ADMIN}/v1/purge_media_cache?before_ts=1", MEDIA, "purge cache"),
        ("GET", f"{ADMIN}/v1/room/{ROOM_ID}/media", MEDIA, "room media list"),
        ("GET", f"{ADMIN}/v1/users/{USER_ID}/media", MEDIA, "user media list (D2)"),
        ("DELETE", f"{ADMIN}/v1/users/{USER_ID}/media", MEDIA, "user media delete (D2)"),
        ("GET", f"{ADMIN}/v1/media/example.org/abcDEF", MEDIA, "media info"),
        ("DELETE", f"{ADMIN}/v1/media/example.org/abcDEF", MEDIA, "media delete"),
        ("POST", f"{ADMIN}/v1/media/example.org/delete?before_ts=1", MEDIA, "bulk delete"),
        ("POST", f"{ADMIN}/v1/media/protect/abcDEF", MEDIA, "protect"),
        ("GET", f"{ADMIN}/v1/media/quarantine_changes", MEDIA, "quarantine changes list"),
        # Quarantine: a quarantined_media_changes writer running the media repo (HARD).
        ("POST", f"{ADMIN}/v1/quarantine_media/{ROOM_ID}", MEDIA, "quarantine a room's media"),
        ("POST", f"{ADMIN}/v1/room/{ROOM_ID}/media/quarantine", MEDIA, "room quarantine"),
        ("POST", f"{ADMIN}/v1/user/{USER_ID}/media/quarantine", MEDIA, "user quarantine"),
        ("POST", f"{ADMIN}/v1/media/quarantine/example.org/abcDEF", MEDIA, "quarantine one"),
        ("POST", f"{ADMIN}/v1/media/unquarantine/example.org/abcDEF", MEDIA, "unquarantine one"),
    ),
    # ---------------------------------------------------------------- §4 stream writers
    *_group(
        "stream writers",
        ("PUT", f"{C}/rooms/{ROOM_ID}/typing/{USER_ID}", TYPING, "typing (HARD)"),
        ("PUT", f"/_matrix/client/api/v1/rooms/{ROOM_RAW}/typing/{USER_RAW}", TYPING, "typing api/v1 raw IDs"),
        ("PUT", f"{C}/sendToDevice/m.room.encrypted/txn3", TO_DEVICE, "to-device (HARD)"),
        ("PUT", f"{R0}/sendToDevice/m.room_key_request/txn%2F4", TO_DEVICE, "to-device r0, %2F txn"),
        ("POST", f"{C}/rooms/{ROOM_ID}/receipt/m.read/{EVENT_ID}", RECEIPTS, "receipt (HARD)"),
        ("POST", f"{C}/rooms/{ROOM_ID}/receipt/m.read.private/{EVENT_ID}", RECEIPTS, "private receipt"),
        ("POST", f"{C}/rooms/{ROOM_ID}/read_markers", RECEIPTS, "read markers (HARD)"),
        ("PUT", f"{UNSTABLE}/io.element.msc4306/rooms/{ROOM_ID}/thread/{EVENT_ID}/subscription", THREADS,
         "thread subscription write (HARD)"),
        ("DELETE", f"{UNSTABLE}/io.element.msc4306/rooms/{ROOM_ID}/thread/{EVENT_ID}/subscription", THREADS,
         "thread subscription delete"),
        ("GET", f"{UNSTABLE}/io.element.msc4308/thread_subscriptions?dir=b&limit=10",
         ("thread_subscriptions", "client_reader_non_room"), "MSC4308 the list of thread subscriptions"),
    ),
    # ---------------------------------------------------------------- §8 main-only endpoints (sample)
    *_group(
        "main only",
        ("GET", f"{C}/auth/m.login.recaptcha/fallback/web?session=abc", MAIN, "UIA fallback (D1)"),
        ("POST", f"{R0}/auth/m.login.terms/fallback/web", MAIN, "UIA fallback POST (D1)"),
        ("POST", f"{C}/rooms/{ROOM_ID}/forget", MAIN, "forget"),
        ("POST", f"{C}/rooms/{ROOM_ID}/upgrade", MAIN, "upgrade"),
        ("POST", f"{C}/rooms/{ROOM_ID}/report/{EVENT_ID}", MAIN, "report event"),
        ("POST", f"{C}/rooms/{ROOM_ID}/report", MAIN, "report room"),
        ("POST", f"{C}/users/{USER_ID}/report", MAIN, "report user"),
        ("GET", f"{C}/pushers", MAIN, "pushers list"),
        ("POST", f"{C}/pushers/set", MAIN, "pushers/set"),
        ("POST", f"{C}/logout", MAIN, "logout"),
        ("POST", f"{C}/logout/all", MAIN, "logout/all"),
        ("POST", f"{C}/account/password", MAIN, "password change"),
        ("POST", f"{C}/account/password/email/requestToken", MAIN, "password reset token"),
        ("POST", f"{C}/account/3pid/add", MAIN, "3pid add"),
        ("POST", f"{C}/account/3pid/bind", MAIN, "3pid bind"),
        ("POST", f"{C}/refresh", MAIN, "refresh"),
        ("POST", f"{C}/user/{USER_ID}/openid/request_token", MAIN, "openid token"),
        ("GET", f"{C}/thirdparty/protocols", MAIN, "thirdparty"),
        ("GET", f"{V1}/mutual_rooms?user_id={USER_ID}", MAIN, "mutual_rooms"),
        ("PUT", f"{C}/directory/list/room/{ROOM_ID}", MAIN, "room directory visibility"),
        ("GET", f"{C}/admin/whois/{USER_ID}", MAIN, "client whois"),
        ("GET", f"{ADMIN}/v1/whois/{USER_ID}", MAIN, "admin whois"),
        ("GET", f"{ADMIN}/v1/register", MAIN, "shared-secret register nonce"),
        ("POST", f"{ADMIN}/v1/register", MAIN, "shared-secret register"),
        ("POST", f"{ADMIN}/v1/purge_history/{ROOM_ID}", MAIN, "purge history"),
        ("POST", f"{ADMIN}/v1/purge_history/{ROOM_ID}/{EVENT_ID}", MAIN, "purge history up to an event"),
        ("GET", f"{ADMIN}/v1/purge_history_status/abc", MAIN, "purge status"),
        ("POST", f"{ADMIN}/v1/deactivate/{USER_ID}", MAIN, "admin deactivate"),
        ("POST", f"{ADMIN}/v1/reset_password/{USER_ID}", MAIN, "admin reset password"),
        ("POST", f"{UNSTABLE}/org.matrix.msc4108/rendezvous", MAIN, "rendezvous"),
        ("GET", "/.well-known/matrix/server", MAIN, "well-known server"),
        ("GET", "/.well-known/matrix/client", MAIN, "well-known client"),
        ("GET", "/", MAIN, "root"),
        ("GET", "/_synapse/client/password_reset/email/submit_token?token=t", MAIN, "other /_synapse/client"),
    ),
    # ---------------------------------------------------------------- §11 normalisation edge cases
    *_group(
        "normalisation",
        ("GET", f"//_matrix//client/v3/rooms/{ROOM_ID}/members", ROOM, "// is merged for matching, kept upstream"),
        ("GET", f"{C}/rooms/%21room%3Aexample.org/context/%24ev%2Fwith%2Fslashes", ROOM,
         "%2F inside an event ID: still context/.*"),
        ("PUT", f"{C}/rooms/{ROOM_ID}/send/m.room.message/txn?ts=1&x=%2F%21", CREATOR,
         "query string never affects the route and is kept raw"),
    ),
]

# Internal-only paths: 404 from nginx, never forwarded (§10).
PRIVATE: list[tuple[str, str]] = [
    ("POST", "/_synapse/replication/send_event/abc"),
    ("GET", "/_synapse/replication"),
    ("GET", "/_synapse/metrics"),
    ("GET", "/_synapse/metrics?name=x"),
    ("GET", "/_synapse/%72eplication/send_event/abc"),  # encoded 'r': nginx matches the decoded URI
    ("GET", "//_synapse//metrics"),
    ("PUT", "/_synapse/replication/presence_set_state/%40user%3Aexample.org"),
]

GROUPS: tuple[str, ...] = tuple(dict.fromkeys(r.group for r in REQUESTS))
