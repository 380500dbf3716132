"""scripts/synapse_release_check.py's comparisons on fixture data (the full run installs a Synapse release: manual,
docs/synapse-upgrade.md). The expectations are written out by hand from the fixtures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from synapse_workers.load import load_plan
from tests.support.synapse_map import MapEntry, Registration

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "synapse_release_check.py"


@pytest.fixture(scope="module")
def rc():
    spec = importlib.util.spec_from_file_location("synapse_release_check", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


CONFIG_SOURCE = '''
class RoomConfig(Config):
    section = "room"

    def read_config(self, config, **kwargs):
        self.a = config.get("encryption_enabled_by_default_for_room_type", "off")
        self.b = config["default_power_level_content_override"]
        extra = config.pop("forgotten_room_retention_period", None)
        if "room_list_publication_rules" in config:
            pass
        self.c = config.setdefault("not an option", 1)
        self.d = config.get(name)  # built at run time: not seen
        if self.a is None:
            raise ConfigError("encryption_enabled_by_default_for_room_type must be one of ...", ("x",))
        if extra:
            raise ConfigError(f"forgotten_room_retention_period {extra} is too " "short")
        raise ValueError("not a refusal")
'''


def test_config_literals_are_the_keys_read(rc):
    assert rc.config_literals(CONFIG_SOURCE) == {
        "encryption_enabled_by_default_for_room_type",
        "default_power_level_content_override",
        "forgotten_room_retention_period",
        "room_list_publication_rules",
    }


def test_config_refusals_are_the_config_error_messages(rc):
    assert rc.config_refusals(CONFIG_SOURCE) == {
        "encryption_enabled_by_default_for_room_type must be one of ...",
        "forgotten_room_retention_period {} is too short",
    }


def test_writer_streams_are_the_writer_locations_attributes(rc):
    source = '''
@attr.s
class WriterLocations:
    """Docs."""
    events: list[str] = attr.ib(default=["master"])
    typing: list[str] = attr.ib(default=["master"])
    def helper(self) -> None: ...

class Other:
    receipts: list[str] = []
'''
    assert rc.writer_streams(source) == {"events", "typing"}
    assert rc.writer_streams("class Nothing: pass\n") == set()


def test_emitted_keys_name_options_not_our_names(rc):
    doc = {
        "server_name": "example.test",
        "listeners": [{"port": 1, "resources": [{"names": ["client"]}]}],
        "instance_map": {"main": {"host": "127.0.0.1", "port": 2}},
        "stream_writers": {"typing": ["stream_writers1"]},
        "redis": {"enabled": True},
    }
    assert rc.emitted_keys([doc, {"redis": {"port": 6379}}]) == {
        "server_name",
        "listeners", "listeners[].port", "listeners[].resources", "listeners[].resources[].names",
        "instance_map", "instance_map.<main>.host", "instance_map.<main>.port",
        "stream_writers",  # its keys are stream names, compared with WriterLocations instead
        "redis", "redis.enabled", "redis.port",
    }


def test_option_differences_flag_what_we_emit(rc):
    emitted = {"redis", "redis.enabled", "task_scheduler", "task_scheduler.max_concurrent_tasks", "listeners[].port",
               "instance_map.<main>.port"}
    pinned = {"redis", "enabled", "task_scheduler", "max_concurrent_tasks", "port", "old_option"}
    candidate = {"redis", "enabled", "port", "brand_new"}
    diff = rc.option_differences(emitted, pinned, candidate)
    assert diff.new_in_candidate == ["brand_new"]
    assert diff.gone_in_candidate == ["max_concurrent_tasks", "old_option", "task_scheduler"]
    assert diff.emitted_gone == ["task_scheduler", "task_scheduler.max_concurrent_tasks"]
    assert diff.emitted_new == []
    assert rc.option_differences({"brand_new"}, pinned, candidate).emitted_new == ["brand_new"]


SYNC = Registration("GET", "^/_matrix/client/(r0|v3|unstable)/sync$", "^/_matrix/client/(r0|v3|unstable)/sync$",
                    "SyncRestServlet")
VERSIONS = Registration("GET", "^/_matrix/client/versions$", "^/_matrix/client/versions$", "VersionsRestServlet")
NEW = Registration("POST", "^/_matrix/client/unstable/org.example.msc9999/(?P<room_id>[^/]*)/poke$",
                   "^/_matrix/client/unstable/org.example.msc9999/.*/poke$", "PokeServlet")


def _entries(*regs: Registration) -> list[MapEntry]:
    return [MapEntry("Client", frozenset({r.method}), r.printed) for r in regs]


def test_map_differences(rc):
    moved = Registration(VERSIONS.method, VERSIONS.pattern, VERSIONS.printed, "VersionsServletV2")
    diff = rc.map_differences([SYNC, VERSIONS], [moved, NEW], _entries(SYNC, VERSIONS), _entries(VERSIONS, NEW))
    assert diff.added == [NEW] and diff.removed == [SYNC] and diff.moved == [(VERSIONS, moved)]
    assert diff.printed_added == _entries(NEW) and diff.printed_removed == _entries(SYNC)
    same = rc.map_differences([SYNC], [SYNC], _entries(SYNC), _entries(SYNC))
    assert (same.added, same.removed, same.moved, same.printed_added, same.printed_removed) == ([], [], [], [], [])


def test_catalogue_differences_against_a_real_plan(rc, base_env):
    # A plan deploying every role: /sync goes to a synchrotron (without since: the initial one), /versions and the
    # invented endpoint to main.
    plan = load_plan({**base_env, "SYNAPSE_WORKER_TYPES": rc.ALL_ROLES})
    diff = rc.map_differences([SYNC, VERSIONS], [VERSIONS, NEW], [], [])
    streams = {"events", "typing", "to_device", "account_data", "receipts", "presence", "push_rules",
               "device_lists", "thread_subscriptions", "brand_new_stream"}  # quarantined_media_changes missing
    cat = rc.catalogue_differences(plan, diff, [SYNC, VERSIONS], [VERSIONS, NEW], streams)
    assert cat.unregistered_examples == [  # each example of the rule, its query string aside
        "GET /_matrix/client/v3/sync (rule sync)",
        "GET /_matrix/client/v3/sync?since=s72594_4483_1934&timeout=30000 (rule sync)",
        "GET /_matrix/client/v3/sync?since=s72594_4483_1934&full_state=true (rule sync)",
    ]
    assert cat.new_endpoints == [("POST /_matrix/client/unstable/org.example.msc9999/x/poke", "PokeServlet", "main")]
    assert cat.removed_routed == [("GET /_matrix/client/r0/sync", "SyncRestServlet", "initial_synchrotron")]
    # no fixture registration matches any KEPT_ON_MAIN entry but the key server's (not in the map)
    assert len(cat.stale_kept_on_main) == 5 and "^/_matrix/key/v2/server" not in cat.stale_kept_on_main
    assert cat.streams_unknown == ["quarantined_media_changes"] and cat.streams_new == ["brand_new_stream"]


def test_load_differences(rc):
    pinned = {"a/main": None, "a/synchrotron1": None, "b/main": "Error in configuration at 'x'"}
    candidate = {"a/main": None, "a/synchrotron1": "Error in configuration at 'stream_writers.y'",
                 "b/main": "Error in configuration at 'x'"}
    assert rc.load_differences(pinned, candidate) == [
        "a/synchrotron1: pinned OK, candidate \"Error in configuration at 'stream_writers.y'\"",
        "b/main: pinned \"Error in configuration at 'x'\", candidate \"Error in configuration at 'x'\"",
    ]
    assert rc.load_differences({"a/main": None}, {"a/main": None}) == []
