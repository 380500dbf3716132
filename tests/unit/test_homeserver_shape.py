"""A user's homeserver.yaml with a wrong shape at any key we read: exit 2 naming the file and the YAML path, no
traceback, nothing on disk changed.

The keys come from `homeserver_keys.KEYS` (so a key added there is covered here), but what each one accepts is
stated again below, independently, from Synapse 1.163.2's config code; the wrong values are generated from
that statement, not from the validator.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_workers.cli import main as cli_main
from synapse_workers.homeserver_keys import KEYS, LISTENER_TYPES, RESOURCES

from .test_cli_errors import SCRIPT, snapshot

# A file with every key we read, each with a value Synapse 1.163.2 accepts.
GOOD: dict[str, Any] = {
    "server_name": "example.test",
    "listeners": [
        {
            "port": 8118,
            "type": "http",
            "tls": False,
            "x_forwarded": True,
            "bind_addresses": ["127.0.0.1"],
            "resources": [{"names": ["client", "federation"], "compress": False}],
        },
        {"port": 9118, "type": "metrics", "bind_address": "127.0.0.1"},
    ],
    "database": {
        "name": "psycopg2",
        "args": {"user": "synapse", "password": "hunter2", "host": "db", "port": 5432, "database": "synapse"},
    },
    "redis": {"enabled": False},
    "enable_metrics": False,
    "max_upload_size": "50M",
    "signing_key_path": "/data/example.test.signing.key",
    "app_service_config_files": [],
    "log_config": "/data/example.test.log.config",
    "media_store_path": "/data/media_store",
    "tls_certificate_path": "/data/tls.crt",
    "tls_private_key_path": "/data/tls.key",
}

# What Synapse accepts at each path, said again here: (kind, null accepted). Kinds are defined by WRONG below
# ("text or empty": Synapse reads "" as unset there).
ACCEPTS: dict[str, tuple[str, bool]] = {
    "server_name": ("server name", False),  # synapse.util.stringutils.parse_and_validate_server_name
    "listeners": ("list", False),  # server.py: "Expected a list"
    "listeners[]": ("mapping", False),  # parse_listener_def: "Expected a dictionary"
    "listeners[].type": ("listener type", False),  # KNOWN_LISTENER_TYPES
    "listeners[].port": ("port", True),  # instance_of(int); null: no port (then a path)
    "listeners[].path": ("text", True),
    "listeners[].tls": ("boolean", True),
    "listeners[].bind_addresses": ("list", False),  # instance_of(list)
    "listeners[].bind_addresses[]": ("text", False),
    "listeners[].bind_address": ("text or empty", True),
    "listeners[].resources": ("list", False),  # iterated, each item HttpResourceConfig(**item)
    "listeners[].resources[]": ("mapping", False),
    "listeners[].resources[].names": ("list", False),  # deep_iterable(in_(KNOWN_RESOURCES))
    "listeners[].resources[].names[]": ("resource name", False),
    "listeners[].resources[].compress": ("boolean", True),  # optional(instance_of(bool))
    "database": ("mapping", True),  # falsy: SQLite
    "database.name": ("database engine", False),  # "sqlite3" or "psycopg2"
    "database.args": ("mapping", False),  # psycopg2.connect(**args)
    "database.args.host": ("text or empty", True),
    "database.args.port": ("port", True),
    "database.args.database": ("text or empty", True),  # psycopg2's dbname, SQLite's file
    "redis": ("mapping", True),  # `or {}`
    "redis.enabled": ("boolean", True),
    "enable_metrics": ("boolean", True),
    "max_upload_size": ("size", False),  # Config.parse_size
    "signing_key_path": ("text", True),  # null: <config dir>/<server name>.signing.key
    "app_service_config_files": ("list", False),  # appservice.py: a list of strings
    "app_service_config_files[]": ("text", False),
    "log_config": ("text or empty", True),
    "media_store_path": ("text", False),  # ensure_directory(None) fails
    "tls_certificate_path": ("text or empty", True),
    "tls_private_key_path": ("text or empty", True),
    "registration_shared_secret_path": ("text or empty", True),  # read_file(path): a path string
    "macaroon_secret_key_path": ("text or empty", True),
    "form_secret_path": ("text or empty", True),
    "recaptcha_private_key_path": ("text or empty", True),
    "turn_shared_secret_path": ("text or empty", True),
}

_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12)
_numbers = st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False))
_containers = st.one_of(
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["a", "names", "port"]), st.integers(), max_size=2),
)
_not_text = st.one_of(st.booleans(), _numbers, _containers)
_any = st.one_of(_not_text, _text)

WRONG = {
    "list": st.one_of(st.booleans(), _numbers, _text, st.dictionaries(_text, st.integers(), max_size=2)),
    "mapping": st.one_of(st.booleans(), _numbers, _text, st.lists(st.integers(), max_size=2)),
    "boolean": st.one_of(_numbers, _text, _containers),  # "false" would switch it on in Synapse
    "text": st.one_of(_not_text, st.just("")),
    "text or empty": _not_text,  # Synapse reads "" as unset there (`if path:`, abspath(""))
    "port": st.one_of(
        st.booleans(),
        st.integers(max_value=0),
        st.integers(min_value=65536),
        st.floats(allow_nan=False, allow_infinity=False),
        _text.filter(lambda t: not (t.isascii() and t.isdigit() and 1 <= int(t) <= 65535)),
        _containers,
    ),
    "size": st.one_of(
        st.booleans(),
        st.integers(max_value=0),
        st.floats(allow_nan=False, allow_infinity=False),
        _text.filter(lambda t: not re.fullmatch(r"0*[1-9][0-9]*[KMGT]?", t)),
        _containers,
    ),
    "server name": st.one_of(_not_text, _text.map(lambda t: t + " /")),  # a space or slash is never in one
    "listener type": st.one_of(_not_text, st.sampled_from(["replication", "HTTP", "https", ""])),
    "resource name": st.one_of(_not_text, _text.filter(lambda t: t not in RESOURCES)),
    "database engine": st.one_of(_not_text, st.sampled_from(["psycopg", "postgres", "sqlite", ""])),
}


def _concrete(path: str) -> str:
    return path.replace("[]", "[0]")


def _with_value(path: str, value: Any) -> dict[str, Any]:
    """GOOD with `value` at `path` (the first item for each `[]`)."""
    doc = copy.deepcopy(GOOD)
    tokens = re.findall(r"\[\]|[^.\[\]]+", path)
    node: Any = doc
    for token in tokens[:-1]:
        node = node[0] if token == "[]" else node[token]
    if tokens[-1] == "[]":
        node[:1] = [value]  # app_service_config_files is empty in GOOD
    else:
        node[tokens[-1]] = value
    return doc


def test_every_key_read_has_an_independent_expectation():
    assert sorted(k.path for k in KEYS) == sorted(ACCEPTS)


def test_listener_types_and_resources_are_synapses():
    from synapse.config.server import KNOWN_LISTENER_TYPES, KNOWN_RESOURCES

    assert set(LISTENER_TYPES) == KNOWN_LISTENER_TYPES and set(RESOURCES) == KNOWN_RESOURCES


@pytest.fixture
def deployment(base_env, tmp_root):
    """A generated deployment; SYNAPSE_CONFIG_PATH names a file of the user's outside it."""
    config = tmp_root / "mine" / "homeserver.yaml"
    config.parent.mkdir()
    env = {**base_env, "SYNAPSE_WORKER_TYPES": "synchrotron", "SYNAPSE_HTTP_PORT": "8008"}
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["generate"], env=env) == 0
    env.pop("SYNAPSE_SERVER_NAME")  # the file's is used
    (tmp_root / "data" / "homeserver.yaml").unlink()  # the generated one: the user's file is used from now on
    config.write_text(yaml.safe_dump(GOOD))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli_main(["generate"], env={**env, "SYNAPSE_CONFIG_PATH": str(config)}) == 0, "GOOD is not good"
    return {**env, "SYNAPSE_CONFIG_PATH": str(config)}, config, tmp_root


def _generate(env: dict[str, str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["generate"], env=env)
    return code, out.getvalue(), err.getvalue()


def _wrong_value(data: st.DataObject) -> tuple[str, Any]:
    path = data.draw(st.sampled_from(sorted(ACCEPTS)), label="path")
    kind, null_ok = ACCEPTS[path]
    strategy = WRONG[kind] if null_ok else st.one_of(WRONG[kind], st.none())
    return path, data.draw(strategy, label="value")


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_wrong_shape_anywhere_exits_2_naming_the_path(deployment, data):
    env, config, root = deployment
    path, value = _wrong_value(data)
    config.write_text(yaml.safe_dump(_with_value(path, value)))
    before = snapshot(root)
    code, out, err = _generate(env)
    assert code == 2, (path, value, err)
    assert "Traceback" not in out + err
    assert f"{config} (SYNAPSE_CONFIG_PATH) at '{_concrete(path)}': expected " in err, (path, value, err)
    assert "hunter2" not in err
    assert snapshot(root) == before


@pytest.mark.parametrize("path", ["server_name", "listeners[].type"])
def test_missing_required_key_is_named(deployment, path):
    env, config, root = deployment
    doc = _with_value(path, None)
    parent = doc if path == "server_name" else doc["listeners"][0]
    del parent[path.rsplit(".", 1)[-1]]
    config.write_text(yaml.safe_dump(doc))
    before = snapshot(root)
    code, _out, err = _generate(env)
    assert code == 2 and "Traceback" not in err
    assert f"at '{_concrete(path)}': expected" in err and "it is missing" in err
    assert snapshot(root) == before


@pytest.mark.parametrize(
    "path, value",
    [("listeners[].port", True), ("listeners[].resources[].names", "client"), ("database.args.port", "5432x")],
)
def test_console_script_with_a_wrong_shape(deployment, path, value):
    env, config, root = deployment
    config.write_text(yaml.safe_dump(_with_value(path, value)))
    before = snapshot(root)
    result = subprocess.run([SCRIPT, "check"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"synapse-workers: error: {config} (SYNAPSE_CONFIG_PATH) at '{_concrete(path)}'")
    assert snapshot(root) == before


@pytest.mark.parametrize(
    "path, value",
    [
        ("max_upload_size", 4096),
        ("listeners[].port", None),  # with a path instead
        ("database", None),
        ("redis", None),
        ("enable_metrics", None),
        ("database.args.port", "5433"),
        ("listeners[].resources[].compress", None),
        ("listeners[].tls", None),
    ],
)
def test_what_synapse_accepts_is_accepted(deployment, path, value):
    env, config, _root = deployment
    doc = _with_value(path, value)
    if path == "listeners[].port":
        doc["listeners"][0]["path"] = "/run/synapse-main.sock"
    if path == "database":
        env = {**env, "SYNAPSE_WORKER_TYPES": ""}  # SQLite: a monolith
    config.write_text(yaml.safe_dump(doc))
    code, _out, err = _generate(env)
    assert code == 0, err


def test_upload_limit_set_by_the_variable_is_not_read_from_the_file(deployment):
    """shared.yaml sets max_upload_size over the file's: Synapse never reads the file's value then."""
    env, config, _root = deployment
    config.write_text(yaml.safe_dump({**GOOD, "max_upload_size": "lots"}))
    assert _generate({**env, "SYNAPSE_MAX_UPLOAD_SIZE": "20M"})[0] == 0
    code, _out, err = _generate(env)
    assert code == 2 and "at 'max_upload_size'" in err


def test_yaml_error_quotes_no_line_of_the_file(deployment):
    env, config, _root = deployment
    config.write_text(yaml.safe_dump(GOOD).replace("password: hunter2", "password: [hunter2"))
    code, _out, err = _generate(env)
    assert code == 2 and "cannot be read as YAML" in err and str(config) in err
    assert "hunter2" not in err


def test_several_problems_are_reported_at_once(deployment):
    env, config, _root = deployment
    config.write_text(yaml.safe_dump({**GOOD, "enable_metrics": "false", "redis": {"enabled": 1}, "listeners": 8008}))
    code, _out, err = _generate(env)
    assert code == 2
    assert [line.split(" at ")[1].split(":")[0] for line in err.splitlines()] == [
        "'listeners'",
        "'redis.enabled'",
        "'enable_metrics'",
    ]


def test_unreadable_homeserver_is_named(deployment):
    env, config, root = deployment
    if Path("/proc/self/status").read_text().find("Uid:\t0\t") >= 0:
        pytest.skip("root reads any file")
    config.chmod(0)
    code, _out, err = _generate(env)
    assert code == 2 and f"{config} (SYNAPSE_CONFIG_PATH) cannot be read" in err


def test_every_key_file_read_is_checked():
    """homeserver.KEY_FILE_KEYS (the secret files checked before a start) are all in the table."""
    from synapse_workers.homeserver import KEY_FILE_KEYS

    assert set(KEY_FILE_KEYS) <= set(ACCEPTS)


# The official image's docker/conf/homeserver.yaml as its start.py renders it (SYNAPSE_SERVER_NAME=example.com,
# POSTGRES_PASSWORD set, TLS on), the file people move to us: every key we read in the shapes it writes.
OFFICIAL = """
tls_certificate_path: "/data/example.com.tls.crt"
tls_private_key_path: "/data/example.com.tls.key"
server_name: "example.com"
pid_file: /homeserver.pid
web_client: False
log_config: "/data/example.com.log.config"
listeners:
  -
    port: 8448
    bind_addresses: ['::']
    type: http
    tls: true
    x_forwarded: false
    resources:
      - names: [client]
        compress: true
      - names: [federation]  # Federation APIs
        compress: false
  - port: 8008
    tls: false
    bind_addresses: ['::']
    type: http
    x_forwarded: false
    resources:
      - names: [client]
        compress: true
      - names: [federation]
        compress: false
database:
  name: "psycopg2"
  args:
    user: "synapse"
    password: "hunter2"
    database: "synapse"
    host: "db"
    port: "5432"
    cp_min: 5
    cp_max: 10
media_store_path: "/data/media"
max_upload_size: "50M"
enable_metrics: False
report_stats: False
app_service_config_files:
    - "/data/bridge.yaml"
macaroon_secret_key: "x"
signing_key_path: "/data/example.com.signing.key"
"""


def test_the_official_images_file_has_every_shape_we_read():
    from synapse_workers.homeserver_keys import check_shape

    assert check_shape(yaml.safe_load(OFFICIAL), "homeserver.yaml") == []
    empty_log_config = yaml.safe_load(OFFICIAL.replace('log_config: "/data/example.com.log.config"', 'log_config: ""'))
    assert check_shape(empty_log_config, "homeserver.yaml") == []  # {{ SYNAPSE_LOG_CONFIG }} unset
