"""Every value we read from the user's homeserver.yaml, with the shape we expect, checked once at read time.

`KEYS` is the one table: a YAML path (`listeners[].resources[].names`: `[]` is every item of a list) → what
it must be. `check_shape` walks a parsed file along every path and returns one sentence per value that does
not fit, naming the file and the concrete path (`listeners[0].resources`), like Synapse's ConfigError does.
Whatever reads the file afterwards (homeserver.py, plan.py, run/preflight.py, run/compressor.py) may then
rely on these shapes; a module that starts reading a new key adds its row here.

The shapes follow Synapse 1.163.2's own config code (synapse/config/*.py): what it accepts is accepted, what
it refuses (or crashes on) is refused. One deliberate difference: the switches we read (`enable_metrics`,
`redis.enabled`, `listeners[].tls`, `resources[].compress`) must be YAML booleans (true/false, yes/no), where
Synapse takes any value's truthiness, so that `enable_metrics: "false"` would switch metrics on.
Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from .errors import Problem, YamlPath

# synapse/config/server.py KNOWN_LISTENER_TYPES and KNOWN_RESOURCES (a unit test compares them with Synapse's).
LISTENER_TYPES = ("http", "metrics", "manhole")
RESOURCES = (
    "client",
    "consent",
    "federation",
    "health",
    "keys",
    "media",
    "metrics",
    "openid",
    "replication",
    "static",
)
DATABASE_ENGINES = ("sqlite3", "psycopg2")  # synapse/config/database.py DatabaseConnectionConfig
RESOURCE_KEYS = ("names", "compress")  # HttpResourceConfig's fields: another key is a TypeError in Synapse

# synapse/util/stringutils.py parse_and_validate_server_name: a host (or [IPv6]) and an optional port.
SERVER_NAME_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")
SIZE_RE = re.compile(r"[0-9]+[KMGT]?")


@dataclass(frozen=True)
class Key:
    path: str  # a YAML path; `[]` stands for every item of a list
    expected: str  # the words after "expected"
    ok: Callable[[Any], bool]
    nullable: bool = True  # null means the same as a missing key (Synapse then uses its default)
    required: bool = False  # missing (in a mapping that is there) is refused
    found: Callable[[Any], str] | None = None  # what a wrong mapping has, when "a mapping" would not say


def _string(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _text(value: Any) -> bool:
    """A string, empty allowed: where Synapse reads "" as unset (`if path:`, abspath("") → "")."""
    return isinstance(value, str)


def _bool(value: Any) -> bool:
    return isinstance(value, bool)


def _mapping(value: Any) -> bool:
    return isinstance(value, dict)


def _port(value: Any) -> bool:
    return type(value) is int and 1 <= value <= 65535


def _list(value: Any) -> bool:
    return isinstance(value, list)


def _listener(value: Any) -> bool:
    # synapse/config/server.py parse_listener_def: a port or a unix socket path, never both, never neither.
    return isinstance(value, dict) and (value.get("port") is None) != (value.get("path") is None)


def _resource(value: Any) -> bool:
    return isinstance(value, dict) and all(k in RESOURCE_KEYS for k in value)


def _listener_found(value: Any) -> str:
    if isinstance(value, dict):
        return (
            "a mapping with both 'port' and 'path'" if "port" in value else "a mapping with neither 'port' nor 'path'"
        )
    return describe_value(value)


def _extra_keys(allowed: tuple[str, ...] | None) -> Callable[[Any], str]:
    def found(value: Any) -> str:
        if not isinstance(value, dict):
            return describe_value(value)
        extra = [k for k in value if (k not in allowed if allowed else not isinstance(k, str))]
        return f"a mapping with {_quoted(tuple(extra))}" if extra else describe_value(value)

    return found


def _size(value: Any) -> bool:
    # Synapse's Config.parse_size; 0 or less is no limit nginx could enforce the same way.
    if type(value) is int:
        return value > 0
    return isinstance(value, str) and bool(SIZE_RE.fullmatch(value)) and int(value.rstrip("KMGT")) > 0


def _db_port(value: Any) -> bool:
    # libpq takes a port as a number or as text.
    return _port(value) or (isinstance(value, str) and value.isdigit() and _port(int(value)))


def _quoted(words: tuple[Any, ...]) -> str:
    return ", ".join(repr(w) for w in words)


KEYS: tuple[Key, ...] = (
    Key(
        "server_name",
        "a server name such as example.com (a host name or address, optionally with :port)",
        lambda v: isinstance(v, str) and bool(SERVER_NAME_RE.fullmatch(v)),
        nullable=False,
        required=True,
    ),
    Key("listeners", "a list of listener mappings", _list, nullable=False),
    Key(
        "listeners[]",
        "a listener mapping with 'type' and either 'port' or 'path' (a unix socket), not both",
        _listener,
        nullable=False,
        found=_listener_found,
    ),
    Key(
        "listeners[].type",
        f"one of {_quoted(LISTENER_TYPES)}",
        lambda v: v in LISTENER_TYPES,
        nullable=False,
        required=True,
    ),
    Key("listeners[].port", "a port number from 1 to 65535", _port),
    Key("listeners[].path", "a unix socket path (a string)", _string),
    Key("listeners[].tls", "a boolean (true or false)", _bool),
    Key("listeners[].bind_addresses", "a list of addresses such as ['::', '0.0.0.0']", _list, nullable=False),
    Key("listeners[].bind_addresses[]", "an address (a string) such as 0.0.0.0", _string, nullable=False),
    Key("listeners[].bind_address", "an address (a string) such as 0.0.0.0", _text),
    Key(
        "listeners[].resources",
        "a list of mappings with 'names', such as [{names: [client, federation]}]",
        _list,
        nullable=False,
    ),
    Key(
        "listeners[].resources[]",
        f"a mapping with 'names' (only {_quoted(RESOURCE_KEYS)})",
        _resource,
        nullable=False,
        found=_extra_keys(RESOURCE_KEYS),
    ),
    Key(
        "listeners[].resources[].names", "a list of resource names such as [client, federation]", _list, nullable=False
    ),
    Key(
        "listeners[].resources[].names[]",
        f"one of {_quoted(RESOURCES)}",
        lambda v: v in RESOURCES,
        nullable=False,
    ),
    Key("listeners[].resources[].compress", "a boolean (true or false)", _bool),
    Key("database", "a mapping with 'name' and 'args'", _mapping),
    Key("database.name", f"one of {_quoted(DATABASE_ENGINES)}", lambda v: v in DATABASE_ENGINES, nullable=False),
    Key(
        "database.args",
        "a mapping of connection settings (names as strings)",
        lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
        nullable=False,
        found=_extra_keys(None),
    ),
    Key("database.args.host", "a host name, address or socket directory (a string)", _text),
    Key("database.args.port", "a port number from 1 to 65535", _db_port),
    Key("database.args.database", "a database name, or for sqlite3 a file path (a string)", _text),
    Key("redis", "a mapping of Redis settings", _mapping),
    Key("redis.enabled", "a boolean (true or false)", _bool),
    Key("enable_metrics", "a boolean (true or false)", _bool),
    Key(
        "max_upload_size",
        "a size such as 50M (K, M, G or T) or a number of bytes, above 0",
        _size,
        nullable=False,
    ),
    Key("signing_key_path", "a file path (a string)", _string),
    Key("app_service_config_files", "a list of file paths", _list, nullable=False),
    Key("app_service_config_files[]", "a file path (a string)", _string, nullable=False),
    Key("log_config", "a file path (a string)", _text),
    Key("media_store_path", "a directory path (a string)", _string, nullable=False),
    Key("tls_certificate_path", "a file path (a string)", _text),
    Key("tls_private_key_path", "a file path (a string)", _text),
    # The secret files Synapse reads (homeserver.KEY_FILE_KEYS: checked as Synapse's user before a start).
    Key("registration_shared_secret_path", "a file path (a string)", _text),
    Key("macaroon_secret_key_path", "a file path (a string)", _text),
    Key("form_secret_path", "a file path (a string)", _text),
    Key("recaptcha_private_key_path", "a file path (a string)", _text),
    Key("turn_shared_secret_path", "a file path (a string)", _text),
)

_TOKEN = re.compile(r"\[\]|[^.\[\]]+")


def check_shape(doc: dict[str, Any], where: str, skip: Collection[str] = (), file: str | None = None) -> list[Problem]:
    """One problem per value of `doc` that does not have its key's shape, its subject the file's concrete YAML
    path; `where` names the file in the sentence, `file` is its path (default: `where`). `skip`: top-level keys
    that our own config files set over the user's (Synapse then never reads the file's value)."""
    problems: list[Problem] = []
    file = where if file is None else file
    for key in KEYS:
        *parents, last = _TOKEN.findall(key.path)
        if (parents[0] if parents else last) in skip:
            continue
        for shown, parent in _resolve(doc, parents):
            if last == "[]":
                present = list(enumerate(parent)) if isinstance(parent, list) else []
                children = [(f"{shown}[{i}]", item) for i, item in present]
            elif isinstance(parent, dict):
                path = f"{shown}.{last}" if shown else last
                if last not in parent:
                    if key.required:
                        found = "nothing (it is missing)"
                        problems.append(_problem(where, YamlPath(file, path), key.expected, found))
                    continue
                children = [(path, parent[last])]
            else:
                continue
            for path, value in children:
                if (value is not None or not key.nullable) and not key.ok(value):
                    found = (key.found or describe_value)(value)
                    problems.append(_problem(where, YamlPath(file, path), key.expected, found))
    return problems


def _problem(where: str, subject: YamlPath, expected: str, found: str) -> Problem:
    """Synapse's ConfigError, as a sentence: "<file> at 'a.b[0]': expected ..., found ..."."""
    return Problem(
        f"{where} at {subject.path!r}: expected {expected}, found {found}.", subject, expected=expected, found=found
    )


def _resolve(doc: Any, tokens: list[str]) -> list[tuple[str, Any]]:
    """The values at a path prefix, with their concrete paths ('listeners[0].resources')."""
    nodes: list[tuple[str, Any]] = [("", doc)]
    for token in tokens:
        found: list[tuple[str, Any]] = []
        for shown, value in nodes:
            if token == "[]":
                if isinstance(value, list):
                    found += [(f"{shown}[{i}]", item) for i, item in enumerate(value)]
            elif isinstance(value, dict) and token in value:
                found.append((f"{shown}.{token}" if shown else token, value[token]))
        nodes = found
    return nodes


def describe_value(value: Any) -> str:
    """What a YAML value is, in words (a string's text shortened; a mapping's or list's content never shown)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f"the string {text!r}" if value else "an empty string"
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}" if value else "an empty list"
    return f"a {type(value).__name__} ({str(value)[:40]})"
