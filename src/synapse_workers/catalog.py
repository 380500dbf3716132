"""The worker catalogue for Synapse 1.163.2, as data: roles, shorthands, presets and routes.

Everything that changes with a Synapse release lives here. `tests/integration/test_catalog_vs_synapse.py`
checks it against the installed Synapse's own worker map, so an upgrade shows exactly what moved.

Sources: Synapse docs/workers.md (1.163.2), the stream-writer rules in synapse/config/workers.py, and
behaviour confirmed against a running 1.163.2 (see docs/design.md for which routes are HARD: any other
process answers them with an error).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

SYNAPSE_VERSION = "1.163.2"

# Streams Synapse lets exactly one instance write (ConfigError otherwise), and those it lets shard.
SINGLE_WRITER_STREAMS = ("account_data", "presence", "push_rules", "to_device", "typing")
MULTI_WRITER_STREAMS = ("device_lists", "events", "quarantined_media_changes", "receipts", "thread_subscriptions")
STREAMS = tuple(sorted(SINGLE_WRITER_STREAMS + MULTI_WRITER_STREAMS))

# Listener resources a role can need. "replication" is added by the planner for stream writers.
CLIENT, FEDERATION, MEDIA = "client", "federation", "media"

# Shared-config duties that name workers (synapse/config/workers.py).
LIST_DUTIES = ("pusher_instances", "federation_sender_instances")
ONE_NAME_DUTIES = (
    "run_background_tasks_on",
    "notify_appservices_from_worker",
    "update_user_directory_from_worker",
    "media_instance_running_background_jobs",
)


@dataclass(frozen=True)
class Role:
    name: str
    summary: str
    resources: tuple[str, ...] = ()
    streams: tuple[str, ...] = ()
    duty: str | None = None  # one of LIST_DUTIES / ONE_NAME_DUTIES
    max_instances: int | None = None  # Synapse-enforced (or single-name config key)
    # Config effects (ESS's `responsibleForMedia` and friends): keys set in shared.yaml when a process with
    # this role is deployed, and keys set in the config of each process that has the role.
    shared_config: tuple[tuple[str, object], ...] = ()
    own_config: tuple[tuple[str, object], ...] = ()
    # Main serves this role's endpoints too, so nginx may send them to main while every process of the role
    # is down. False when deploying the role switches the feature off on main (see `shared_config`).
    main_can_stand_in: bool = True
    # Another role that serves the same endpoints and answers them first while every process of this role is
    # down (main after it, when main can stand in for that one).
    stand_in: str | None = None
    # nginx's proxy_read_timeout for this role's requests, when it must be longer than NGINX_PROXY_READ_TIMEOUT.
    read_timeout: str | None = None
    # Requests the whole pool of this role (all its processes) holds in flight before nginx answers 429
    # (NGINX_POOL_LIMITS overrides it). Seed values, not yet measured (docs/benchmarks.md will say).
    pool_limit: int = 500

    @property
    def is_writer(self) -> bool:
        return bool(self.streams)


# nginx's proxy_read_timeout for an initial sync (see Role.read_timeout).
INITIAL_SYNC_READ_TIMEOUT = "10m"
# The pool name of main in NGINX_POOL_LIMITS, and its default bound (a seed value, like Role.pool_limit's).
MAIN_POOL = "main"
MAIN_POOL_LIMIT = 250
# The role whose long-polls (/sync) main holds itself when none of its processes is deployed (a monolith).
LONG_POLLS = "synchrotron"


def main_pool_limit(deployed: Iterable[str]) -> int:
    """main's default bound: MAIN_POOL_LIMIT, plus the sync pool's when main serves /sync itself (no synchrotron
    deployed: every client's long-poll waits on main)."""
    return MAIN_POOL_LIMIT + (0 if LONG_POLLS in deployed else ROLES[LONG_POLLS].pool_limit)


def _writer(name: str, stream: str, summary: str, extra: tuple[str, ...] = ()) -> Role:
    single = 1 if stream in SINGLE_WRITER_STREAMS else None
    return Role(name, summary, (CLIENT, *extra), (stream,), max_instances=single)


ROLES: dict[str, Role] = {
    r.name: r
    for r in (
        # Long-polls: each holds a request for up to its timeout (30 s for most clients) while doing little.
        Role("synchrotron", "/sync, /events and initialSync, sticky per user", (CLIENT,), pool_limit=2000),
        Role(
            "initial_synchrotron",
            "initial syncs: /sync without since or with full_state=true, /events without from, initialSync; "
            "sticky per user (incremental syncs stay on synchrotron)",
            (CLIENT,),
            stand_in="synchrotron",
            # A large account's first sync (hundreds of rooms) can take minutes to compute, and much memory.
            read_timeout=INITIAL_SYNC_READ_TIMEOUT,
            pool_limit=50,
        ),
        Role("sliding_synchrotron", "sliding sync (MSC3575 simplified), sticky per user", (CLIENT,), pool_limit=2000),
        Role("client_reader_room", "room-scoped client reads (members, state, context, /messages, ...)", (CLIENT,)),
        Role("client_reader_non_room", "other client reads: login, register, keys, devices, versions, ...", (CLIENT,)),
        Role("federation_reader_room", "room-scoped federation requests (state, backfill, joins, ...)", (FEDERATION,)),
        Role("federation_reader_non_room", "other federation reads: version, query, event, keys, ...", (FEDERATION,)),
        Role("federation_inbound", "inbound federation transactions (/send), sticky per origin", (FEDERATION,)),
        Role("event_creator", "event sending: send, state, redact, membership, createRoom, profile", (CLIENT,)),
        Role("frontend_proxy", "legacy frontend proxy: key uploads", (CLIENT,)),
        Role(
            "user_dir",
            "user directory search; the first one also updates the directory",
            (CLIENT,),
            duty="update_user_directory_from_worker",
        ),
        Role(
            "media_repository",
            "media up/download, thumbnails, media admin and quarantine",
            (CLIENT, FEDERATION, MEDIA),
            ("quarantined_media_changes",),
            duty="media_instance_running_background_jobs",
            # main stops serving media; the media workers turn it back on for themselves
            shared_config=(("enable_media_repo", False),),
            own_config=(("enable_media_repo", True),),
            main_can_stand_in=False,  # enable_media_repo is off on main: media requests there would 404
        ),
        Role("pusher", "sends push notifications", duty="pusher_instances"),
        Role("federation_sender", "sends outbound federation", duty="federation_sender_instances"),
        Role("appservice", "talks to application services", duty="notify_appservices_from_worker", max_instances=1),
        Role("background_worker", "runs background tasks", duty="run_background_tasks_on", max_instances=1),
        Role("event_persister", "persists events (stream writer for events)", streams=("events",)),
        _writer("account_data", "account_data", "writes account data and tags"),
        _writer("presence", "presence", "writes presence"),
        _writer("receipts", "receipts", "writes receipts and read markers"),
        _writer("to_device", "to_device", "writes to-device messages"),
        _writer("typing", "typing", "writes typing notifications"),
        _writer("push_rules", "push_rules", "writes push rules"),
        _writer("device_lists", "device_lists", "writes device lists, device and key uploads"),
        _writer("thread_subscriptions", "thread_subscriptions", "writes thread subscriptions (MSC4306)"),
    )
}

# Names a user may write that stand for several roles (kept as written in `types`).
SHORTHANDS: dict[str, tuple[str, ...]] = {
    "client_reader": ("client_reader_non_room", "client_reader_room"),
    "federation_reader": ("federation_reader_non_room", "federation_reader_room"),
    "room_reader": ("client_reader_room", "federation_reader_room"),
    "general_reader": ("client_reader_non_room", "federation_reader_non_room"),
}

# `full`: the seed image's preset, one process of each.
FULL_PRESET: tuple[str, ...] = (
    "account_data",
    "background_worker",
    "event_creator",
    "event_persister",
    "federation_inbound",
    "federation_reader",
    "federation_sender",
    "frontend_proxy",
    "media_repository",
    "presence",
    "pusher",
    "receipts",
    "to_device",
    "typing",
    "synchrotron",
    "user_dir",
)

TYPE_NAMES: tuple[str, ...] = tuple(sorted((*ROLES, *SHORTHANDS)))


def expand_type(name: str) -> tuple[str, ...]:
    """A declared type name → the roles it stands for."""
    return SHORTHANDS.get(name, (name,))


# ---------------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------------

ANY = None  # a branch for every method
READ = frozenset({"GET", "HEAD"})

# Balancing keys (how nginx spreads a route over several processes of one role).
ROUND_ROBIN, BY_USER, BY_ROOM, BY_ORIGIN = None, "user", "room", "origin"


@dataclass(frozen=True)
class Query:
    """A class of requests to one location told apart by their query string. nginx cannot match a query in a
    `location`: it joins the values of `args` with ':' as its `$arg_<name>` variables give them (the first
    occurrence, the name matched without case, the value as sent, empty when absent) and the request is in the
    class when one of `patterns` matches (a `map`; `routing.py` evaluates the same)."""

    name: str
    args: tuple[str, ...]
    patterns: tuple[str, ...]
    why: str


# An initial sync: no `since` (or an empty one), or `full_state=true` (Synapse's parse_boolean takes only
# true/false); the initial /events: no `from`.
INITIAL_SYNC = Query(
    "initial_sync", ("since", "full_state"), ("^:", ":true$"), "an initial sync (no since, or full_state=true)"
)
INITIAL_EVENTS = Query("initial_events", ("from",), ("^$",), "an initial events request (no from)")


@dataclass(frozen=True)
class Branch:
    """For requests with one of `methods` (None: any), and in the class `query` when one is given (such branches
    are tried first, whatever the method), the first deployed role of `roles` serves."""

    methods: frozenset[str] | None
    roles: tuple[str, ...]
    query: Query | None = None


@dataclass(frozen=True)
class Rule:
    """One nginx location: a regex from the docs, who serves it, how it is balanced."""

    id: str
    group: str
    pattern: str
    branches: tuple[Branch, ...]
    balance: str | None = ROUND_ROBIN
    hard: bool = False  # any other process answers with an error (500/404/405)
    why: str = ""
    examples: tuple[str, ...] = field(default=())  # "METHOD /path" samples, used by the checks

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r for b in self.branches for r in b.roles))


def _r(
    rid: str,
    group: str,
    pattern: str,
    *roles: str,
    balance: str | None = ROUND_ROBIN,
    hard: bool = False,
    why: str = "",
    examples: Iterable[str] = (),
) -> Rule:
    return Rule(rid, group, pattern, (Branch(ANY, tuple(roles)),), balance, hard, why, tuple(examples))


def _split(
    rid: str,
    group: str,
    pattern: str,
    all_roles: Iterable[str],
    read_roles: Iterable[str],
    balance: str | None = ROUND_ROBIN,
    hard: bool = False,
    why: str = "",
    examples: Iterable[str] = (),
) -> Rule:
    """Writes only to `all_roles` (else main); reads also to `read_roles`."""
    branches = (Branch(ANY, tuple(all_roles)), Branch(READ, tuple(read_roles)))
    return Rule(rid, group, pattern, branches, balance, hard, why, tuple(examples))


def _initial(rid: str, pattern: str, query: Query, examples: Iterable[str]) -> Rule:
    """A sync route whose initial requests (`query`) go to the initial-sync pool, the rest to synchrotron."""
    branches = (Branch(ANY, ("initial_synchrotron",), query), Branch(ANY, ("synchrotron",)))
    why = f"{query.why} to initial_synchrotron, the rest (incremental) to synchrotron"
    return Rule(rid, "sync", pattern, branches, BY_USER, why=why, examples=tuple(examples))


C = "^/_matrix/client/(api/v1|r0|v3|unstable)"  # the docs' usual client prefix
C3 = "^/_matrix/client/(r0|v3|unstable)"
F = "^/_matrix/federation"
NONROOM, ROOM = "client_reader_non_room", "client_reader_room"
FNONROOM, FROOM = "federation_reader_non_room", "federation_reader_room"

# Order matters: nginx tries regex locations in file order and the first match wins. Routes that fail
# on the wrong process (HARD) and method-sensitive ones come first, broad `.*` patterns last.
RULES: tuple[Rule, ...] = (
    # --- stream writers whose endpoints fail anywhere else -------------------------------------------
    _r(
        "typing",
        "stream writers",
        C + "/rooms/.*/typing",
        "typing",
        hard=True,
        why="only the typing writer accepts typing (others answer 500)",
        examples=["PUT /_matrix/client/v3/rooms/!r:x/typing/@u:x"],
    ),
    _r(
        "to_device",
        "stream writers",
        C3 + "/sendToDevice/",
        "to_device",
        hard=True,
        why="only the to_device writer accepts sendToDevice (others answer 500)",
        examples=["PUT /_matrix/client/v3/sendToDevice/m.test/txn1"],
    ),
    _r(
        "receipts",
        "stream writers",
        C3 + "/rooms/.*/(receipt|read_markers)",
        "receipts",
        balance=BY_ROOM,
        hard=True,
        why="only a receipts writer accepts receipts and read markers (others answer 500)",
        examples=[
            "POST /_matrix/client/v3/rooms/!r:x/receipt/m.read/$e",
            "POST /_matrix/client/v3/rooms/!r:x/read_markers",
        ],
    ),
    _r(
        "thread_subscriptions",
        "stream writers",
        "^/_matrix/client/unstable/io\\.element\\.msc4306/",
        "thread_subscriptions",
        hard=True,
        why="only a thread_subscriptions writer accepts subscription writes (others answer 500)",
        examples=["PUT /_matrix/client/unstable/io.element.msc4306/rooms/!r:x/thread/$e/subscription"],
    ),
    _r(
        "thread_subscriptions_list",
        "stream writers",
        "^/_matrix/client/unstable/io\\.element\\.msc4308/thread_subscriptions$",
        "thread_subscriptions",
        NONROOM,
        why="MSC4308 list of thread subscriptions (GET; experimental_features.msc4306_enabled): generic workers "
        "register it",
        examples=["GET /_matrix/client/unstable/io.element.msc4308/thread_subscriptions?dir=b"],
    ),
    _r(
        "media_quarantine",
        "media",
        "^/_synapse/admin/v1/(quarantine_media/|room/.*/media/quarantine$|"
        "user/.*/media/quarantine$|media/quarantine/|media/unquarantine/)",
        "media_repository",
        hard=True,
        why="quarantine needs a quarantined_media_changes writer running the media repo",
        examples=[
            "POST /_synapse/admin/v1/media/quarantine/x/abc",
            "POST /_synapse/admin/v1/room/!r:x/media/quarantine",
        ],
    ),
    # --- method-sensitive -----------------------------------------------------------------------------
    _split(
        "push_rules",
        "push rules",
        C + "/pushrules/",
        ["push_rules"],
        [NONROOM],
        hard=True,
        why="any worker reads push rules; writes need the push_rules writer (others answer 500)",
        examples=[
            "GET /_matrix/client/v3/pushrules/",
            "PUT /_matrix/client/v3/pushrules/global/room/!r:x",
            "DELETE /_matrix/client/v3/pushrules/global/override/x",
        ],
    ),
    _r(
        "delayed_events_restart",
        "MSC4140",
        "^/_matrix/client/unstable/org\\.matrix\\.msc4140/delayed_events/[^/]+/restart$",
        NONROOM,
        why="restart is workerisable since 1.144",
        examples=["POST /_matrix/client/unstable/org.matrix.msc4140/delayed_events/abc/restart"],
    ),
    _split(
        "delayed_events",
        "MSC4140",
        "^/_matrix/client/unstable/org\\.matrix\\.msc4140/delayed_events(/[^/]+)?$",
        [],
        [NONROOM],
        hard=True,
        why="GET works on workers; POST /{id} is main-only (worker 405)",
        examples=[
            "GET /_matrix/client/unstable/org.matrix.msc4140/delayed_events",
            "POST /_matrix/client/unstable/org.matrix.msc4140/delayed_events/abc",
        ],
    ),
    _split(
        "admin_user_v2",
        "admin",
        "^/_synapse/admin/v2/users/[^/]+$",
        [],
        [NONROOM],
        hard=True,
        why="GET works on workers; PUT is main-only (worker 405)",
        examples=["GET /_synapse/admin/v2/users/@u:x", "PUT /_synapse/admin/v2/users/@u:x"],
    ),
    Rule(
        "admin_room_v1",
        "admin",
        "^/_synapse/admin/v1/rooms/[^/]+$",
        (Branch(frozenset({"GET", "HEAD", "DELETE"}), (NONROOM,)),),
        hard=True,
        why="GET and DELETE work on workers; other methods stay on main",
        examples=("GET /_synapse/admin/v1/rooms/!r:x", "DELETE /_synapse/admin/v1/rooms/!r:x"),
    ),
    # --- media ----------------------------------------------------------------------------------------
    _r(
        "media",
        "media",
        "^/_matrix/(media|client/v1/media|federation/v1/media)/",
        "media_repository",
        hard=True,
        why="with media workers, main has enable_media_repo off and answers media with 404",
        examples=[
            "POST /_matrix/media/v3/upload",
            "GET /_matrix/client/v1/media/download/x/abc",
            "GET /_matrix/federation/v1/media/download/abc",
            "GET /_matrix/media/v3/config",
        ],
    ),
    _r(
        "media_admin",
        "media",
        "^/_synapse/admin/v1/(purge_media_cache$|room/.*/media|user/.*/media|media/|users/.*/media$)",
        "media_repository",
        hard=True,
        why="media admin runs where the media repo runs",
        examples=[
            "POST /_synapse/admin/v1/purge_media_cache",
            "GET /_synapse/admin/v1/users/@u:x/media",
            "GET /_synapse/admin/v1/room/!r:x/media",
            "DELETE /_synapse/admin/v1/media/x/abc",
        ],
    ),
    # --- sync -----------------------------------------------------------------------------------------
    _initial(
        "sync",
        "^/_matrix/client/(r0|v3)/sync$",
        INITIAL_SYNC,
        examples=[
            "GET /_matrix/client/v3/sync",
            "GET /_matrix/client/v3/sync?since=s72594_4483_1934&timeout=30000",
            "GET /_matrix/client/v3/sync?since=s72594_4483_1934&full_state=true",
        ],
    ),
    _initial(
        "events",
        "^/_matrix/client/(api/v1|r0|v3)/events$",
        INITIAL_EVENTS,
        examples=["GET /_matrix/client/v3/events", "GET /_matrix/client/v3/events?from=s1&timeout=30000"],
    ),
    _r(
        "initial_sync",
        "sync",
        "^/_matrix/client/(api/v1|r0|v3)/initialSync$",
        "initial_synchrotron",
        "synchrotron",
        balance=BY_USER,
        examples=["GET /_matrix/client/v3/initialSync"],
    ),
    _r(
        "room_initial_sync",
        "sync",
        "^/_matrix/client/(api/v1|r0|v3)/rooms/[^/]+/initialSync$",
        "initial_synchrotron",
        "synchrotron",
        balance=BY_USER,
        examples=["GET /_matrix/client/v3/rooms/!r:x/initialSync"],
    ),
    _r(
        "sliding_sync",
        "sync",
        "^/_matrix/client/unstable/org\\.matrix\\.simplified_msc3575/sync$",
        "sliding_synchrotron",
        "synchrotron",
        balance=BY_USER,
        why="registered on generic workers, not listed in docs/workers.md",
        examples=["POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync"],
    ),
    # --- federation -----------------------------------------------------------------------------------
    _r(
        "federation_send",
        "federation",
        F + "/v1/send/",
        "federation_inbound",
        balance=BY_ORIGIN,
        why="one origin's transactions to one process, in order",
        examples=["PUT /_matrix/federation/v1/send/txn1"],
    ),
    _r(
        "federation_room",
        "federation",
        F + "/(v1/(state|state_ids|backfill|get_missing_events|make_join|"
        "make_leave|make_knock|send_knock|event_auth|timestamp_to_event|exchange_third_party_invite)/|"
        "(v1|v2)/(send_join|send_leave|invite)/)",
        FROOM,
        balance=BY_ROOM,
        examples=[
            "GET /_matrix/federation/v1/state/!r:x",
            "GET /_matrix/federation/v1/make_join/!r:x/@u:y",
            "PUT /_matrix/federation/v2/send_join/!r:x/$e",
            "PUT /_matrix/federation/v2/invite/!r:x/$e",
            "GET /_matrix/federation/v1/backfill/!r:x",
            "POST /_matrix/federation/v1/get_missing_events/!r:x",
        ],
    ),
    _r(
        "federation_other",
        "federation",
        F + "/v1/(version$|event/|publicRooms|query/|user/devices/|hierarchy/)",
        FNONROOM,
        examples=[
            "GET /_matrix/federation/v1/version",
            "GET /_matrix/federation/v1/event/$e",
            "GET /_matrix/federation/v1/query/profile",
            "GET /_matrix/federation/v1/user/devices/@u:x",
            "GET /_matrix/federation/v1/hierarchy/!r:x",
            "GET /_matrix/federation/v1/publicRooms",
        ],
    ),
    _r("key_query", "federation", "^/_matrix/key/v2/query", FNONROOM, examples=["POST /_matrix/key/v2/query"]),
    # --- event sending (before the broad account-data patterns: `rooms/.*/state/m.tag/tags`) ----------
    _r(
        "event_send",
        "event sending",
        C + "/(rooms/.*/(redact|send|state/)|rooms/.*/(join|invite|leave|ban|unban|kick)$|join/|knock/)",
        "event_creator",
        balance=BY_ROOM,
        examples=[
            "PUT /_matrix/client/v3/rooms/!r:x/send/m.room.message/t1",
            "PUT /_matrix/client/v3/rooms/!r:x/state/m.room.topic/",
            "POST /_matrix/client/v3/rooms/!r:x/invite",
            "POST /_matrix/client/v3/join/%23a:x",
            "PUT /_matrix/client/v3/rooms/!r:x/redact/$e/t1",
        ],
    ),
    _r(
        "create_room",
        "event sending",
        C + "/createRoom$",
        "event_creator",
        NONROOM,
        examples=["POST /_matrix/client/v3/createRoom"],
    ),
    _r(
        "profile",
        "event sending",
        C + "/profile/",
        "event_creator",
        NONROOM,
        examples=["GET /_matrix/client/v3/profile/@u:x", "PUT /_matrix/client/v3/profile/@u:x/displayname"],
    ),
    # --- device lists and keys ------------------------------------------------------------------------
    _r(
        "key_upload",
        "encryption",
        C + "/keys/(upload|device_signing/upload$|signatures/upload$)",
        "device_lists",
        "frontend_proxy",
        NONROOM,
        examples=["POST /_matrix/client/v3/keys/upload", "POST /_matrix/client/v3/keys/device_signing/upload"],
    ),
    _r(
        "devices",
        "encryption",
        C + "/(devices(/|$)|delete_devices$)",
        "device_lists",
        NONROOM,
        examples=[
            "GET /_matrix/client/v3/devices",
            "PUT /_matrix/client/v3/devices/DEV",
            "POST /_matrix/client/v3/delete_devices",
        ],
    ),
    _r(
        "dehydrated_device",
        "encryption",
        "^/_matrix/client/unstable/org\\.matrix\\.msc3814\\.v1/dehydrated_device(/[^/]+/events)?$",
        "device_lists",
        NONROOM,
        why="MSC3814 dehydrated devices (experimental_features.msc3814_enabled): generic workers register them; "
        "a device and its keys, like /devices",
        examples=[
            "GET /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device",
            "PUT /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device",
            "DELETE /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device",
            "POST /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device/DEV/events",
        ],
    ),
    _r(
        "rtc_transports",
        "client api",
        "^/_matrix/client/unstable/org\\.matrix\\.msc4143/rtc/transports$",
        NONROOM,
        why="MatrixRTC / Element Call transports (MSC4143, experimental_features.msc4143_enabled): generic workers "
        "register it (it reads the config)",
        examples=["GET /_matrix/client/unstable/org.matrix.msc4143/rtc/transports"],
    ),
    _r(
        "keys",
        "encryption",
        C3 + "/(keys/(query|changes|claim)$|room_keys/)",
        NONROOM,
        examples=["POST /_matrix/client/v3/keys/query", "GET /_matrix/client/v3/room_keys/version"],
    ),
    # --- user directory -------------------------------------------------------------------------------
    _r(
        "user_directory",
        "user directory",
        C3 + "/user_directory/search$",
        "user_dir",
        examples=["POST /_matrix/client/v3/user_directory/search"],
    ),
    # --- room-scoped client reads ---------------------------------------------------------------------
    _r(
        "messages",
        "room reads",
        C + "/rooms/.*/messages$",
        ROOM,
        balance=BY_ROOM,
        why="pagination for one room must stay on one process",
        examples=["GET /_matrix/client/v3/rooms/!r:x/messages"],
    ),
    _r(
        "room_reads",
        "room reads",
        C + "/rooms/.*/(joined_members$|context/.*$|members$|state$|event/|aliases)",
        ROOM,
        balance=BY_ROOM,
        examples=[
            "GET /_matrix/client/v3/rooms/!r:x/members",
            "GET /_matrix/client/v3/rooms/!r:x/state",
            "GET /_matrix/client/v3/rooms/!r:x/context/$e",
            "GET /_matrix/client/v3/rooms/!r:x/event/$e",
        ],
    ),
    _r(
        "room_reads_v1",
        "room reads",
        "^/_matrix/client/(v1|unstable)/rooms/.*/(hierarchy$|relations/|threads$|timestamp_to_event$)",
        ROOM,
        balance=BY_ROOM,
        examples=[
            "GET /_matrix/client/v1/rooms/!r:x/hierarchy",
            "GET /_matrix/client/v1/rooms/!r:x/relations/$e",
            "GET /_matrix/client/v1/rooms/!r:x/threads",
        ],
    ),
    _r(
        "room_aliases_unstable",
        "room reads",
        "^/_matrix/client/unstable/.*/rooms/.*/aliases",
        ROOM,
        balance=BY_ROOM,
        examples=["GET /_matrix/client/unstable/org.matrix.msc2432/rooms/!r:x/aliases"],
    ),
    _r(
        "room_summary",
        "room reads",
        "^/_matrix/client/(v1/room_summary/|unstable/im\\.nheko\\.summary/summary/)",
        ROOM,
        balance=BY_ROOM,
        examples=["GET /_matrix/client/v1/room_summary/!r:x"],
    ),
    # --- other client reads ---------------------------------------------------------------------------
    _r(
        "client_reads",
        "client reads",
        C + "/(publicRooms$|voip/turnServer$|joined_rooms$|search$|directory/room/.*$|login$)",
        NONROOM,
        examples=[
            "GET /_matrix/client/v3/publicRooms",
            "GET /_matrix/client/v3/joined_rooms",
            "POST /_matrix/client/v3/search",
            "POST /_matrix/client/v3/login",
            "GET /_matrix/client/v3/directory/room/%23a:x",
        ],
    ),
    _r(
        "client_reads_v3",
        "client reads",
        C3 + "/(account/(3pid|whoami|deactivate)$|user/.*/filter(/|$)|"
        "capabilities$|notifications$|register$|register/available$|password_policy$)",
        NONROOM,
        examples=[
            "GET /_matrix/client/v3/account/whoami",
            "GET /_matrix/client/v3/capabilities",
            "POST /_matrix/client/v3/register",
            "GET /_matrix/client/v3/user/@u:x/filter/1",
        ],
    ),
    _r(
        "versions",
        "client reads",
        "^/_matrix/client/(versions$|v1/register/m\\.login\\.registration_token/validity$)",
        NONROOM,
        examples=["GET /_matrix/client/versions"],
    ),
    _r(
        "mas",
        "client reads",
        "^/_synapse/mas/",
        NONROOM,
        why="only used with matrix_authentication_service",
        examples=["GET /_synapse/mas/is_localpart_available"],
    ),
    # --- broad patterns last --------------------------------------------------------------------------
    _split(
        "account_data",
        "account data",
        C3 + "/.*/(tags|account_data)",
        ["account_data"],
        [NONROOM],
        why="reads anywhere; writes prefer the account_data writer",
        examples=[
            "PUT /_matrix/client/v3/user/@u:x/account_data/m.test",
            "GET /_matrix/client/v3/user/@u:x/rooms/!r:x/tags",
        ],
    ),
    _split(
        "presence",
        "presence",
        C + "/presence/",
        ["presence"],
        [NONROOM],
        why="reads anywhere; writes prefer the presence writer",
        examples=["PUT /_matrix/client/v3/presence/@u:x/status", "GET /_matrix/client/v3/presence/@u:x/status"],
    ),
)

RULES_BY_ID = {rule.id: rule for rule in RULES}

# Paths no public request may reach: they are only on internal listeners anyway; nginx also refuses them.
PRIVATE_PREFIXES = ("/_synapse/replication", "/_synapse/metrics")

# What Synapse mounts on an `http` listener for each resource name (synapse/app/homeserver.py
# _configure_named_resource and _listener_http; prefixes from synapse/api/urls.py): the URL prefixes a user's
# extra listener (homeserver.yaml `listeners[i].resources`) answers; nginx serves those on its port, through
# the same routes as the public port. Every http listener also answers /health. A prefix mounted only with a
# feature on (`/_synapse/mas`, `/_matrix/saml2`, `/_matrix/consent`) is listed anyway: where the feature is
# off, main answers it as Synapse would on such a listener (404 M_UNRECOGNIZED). Everything else under a
# parent of a mounted prefix (`/_matrix/client/...` on a federation-only listener) is Synapse's
# UnrecognizedRequestResource: 404 {"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}; anything
# else is Twisted's plain 404.
_MEDIA = ("/_matrix/media/r0", "/_matrix/media/v3", "/_matrix/media/v1")  # MEDIA_R0/V3, LEGACY_MEDIA_PREFIX
LISTENER_RESOURCES: dict[str, tuple[str, ...]] = {
    "client": (
        "/_matrix/client",  # CLIENT_API_PREFIX
        "/.well-known",
        "/_synapse/admin",
        "/_synapse/client",  # build_synapse_client_resource_tree (SSO pages, password reset, rendezvous, ...)
        "/_synapse/mas",  # with MAS
        "/_matrix/saml2",  # with SAML2
        "/_matrix/static",  # "static" is mounted with "client"
        *_MEDIA,  # media is mounted with "client" (when the process can load the media repository)
    ),
    "federation": ("/_matrix/federation", "/_matrix/key", *_MEDIA),  # keys and media come with federation
    "keys": ("/_matrix/key",),  # SERVER_KEY_PREFIX
    # The media servlet groups only: federation media download/thumbnail and the client v1 media endpoints.
    "media": (*_MEDIA, "/_matrix/federation/v1/media", "/_matrix/client/v1/media"),
    "openid": ("/_matrix/federation/v1/openid",),  # the "openid" federation servlet group: userinfo
    "static": ("/_matrix/static",),  # STATIC_PREFIX; also what `/` redirects to
    "consent": ("/_matrix/consent",),
    "health": (),  # /health is on every http listener
}
# Resource names whose listeners nginx does not serve from outside: internal (Synapse's own wiring per
# process: SYNAPSE_METRICS for metrics; replication between our processes).
INTERNAL_RESOURCES = ("metrics", "replication")
# With one of these, Synapse redirects `/` to the static page (RootOptionsRedirectResource(STATIC_PREFIX)).
ROOT_REDIRECT_RESOURCES = ("client", "static")
UNRECOGNIZED_BODY = '{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}'

# Endpoints generic workers register that we keep on main on purpose (see docs/design.md).
KEPT_ON_MAIN = (
    "^/_matrix/client/v1/appservice/.*/ping$",
    "^/_matrix/federation/v1/user/keys/(query|claim)$",
    "^/_matrix/federation/v1/openid/userinfo$",
    "^/_matrix/federation/v1/3pid/onbind$",
    "^/_matrix/federation/unstable/rooms/.*/complexity$",  # a federation endpoint (RoomComplexityServlet)
    "^/_matrix/key/v2/server",
)
