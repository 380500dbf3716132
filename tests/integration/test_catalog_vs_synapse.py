"""The worker catalogue (catalog.RULES / KEPT_ON_MAIN) against the installed Synapse's own worker map.

`python -m synapse._scripts.generate_workers_map` lists, per category, the path regexes a generic worker
registers (client, federation and key servlets; no media, /_synapse/admin or /_synapse/client). We check:

1. forward: every catalogue example routed to a worker role is registered by a generic worker for its
   method (unless the map cannot know, see WRITER_ONLY_METHODS), and the role has the listener resource
   the path needs;
2. reverse: every regex in the map, turned into a concrete path, is either routed to a worker by the
   `all roles` plan, or deliberately kept on main (catalog.KEPT_ON_MAIN or ALLOWED_ON_MAIN below).

The map prints named groups as `.*` (`rooms/.*/.*$` is really `rooms/{id}/(join|invite|...)`, and a GET
`.*$` line is really `pushrules/.*`), which would make both directions vague. So next to the printed map we
list the registrations behind it with the script's own functions (tests/support/synapse_map.py), match
examples against those, and draw samples from them; the two are checked to describe the same regexes.

After a Synapse upgrade, a failure here lists exactly which endpoints moved. Run with -s for the tables.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from synapse_workers import catalog
from synapse_workers.load import load_plan
from synapse_workers.plan import MAIN
from synapse_workers.routing import explain, normalise
from tests.support.synapse_map import (
    MapEntry,
    Registration,
    parse_workers_map,
    run_raw_registrations,
    run_workers_map,
    sample_path,
)

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "synapse-workers")

# Every role, so a path lands on main only when no role is meant to serve it.
ALL_ROLES = (
    "client_reader, federation_reader, federation_inbound, synchrotron, initial_synchrotron, sliding_synchrotron, "
    "event_creator, "
    "user_dir, media_repository, account_data, presence, receipts, to_device, typing, push_rules, device_lists, "
    "thread_subscriptions, event_persister, background_worker, pusher, federation_sender, appservice, "
    "frontend_proxy"
)

# Config switches that make Synapse register servlets the catalogue routes (the map reflects the config).
# Thread subscriptions (MSC4306/MSC4308), MatrixRTC transports (MSC4143), dehydrated devices (MSC3814).
EXTRA_CONFIG = {"experimental_features": {"msc4306_enabled": True, "msc4143_enabled": True, "msc3814_enabled": True}}

# Endpoints a generic worker registers that the catalogue leaves on main although catalog.KEPT_ON_MAIN does
# not list them: (regex as the map prints it, servlet class) → why. Keep this short and honest.
ALLOWED_ON_MAIN: dict[tuple[str, str], str] = {
    ("^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/.*/.*$", "RoomMembershipRestServlet"):
        "PUT rooms/{id}/{action}/{txnId}: Synapse-only idempotent form; docs/workers.md ends at the action",
    ("^/_matrix/client/(api/v1|r0|v3|unstable)/createRoom/.*$", "RoomCreateRestServlet"):
        "PUT createRoom/{txnId}: Synapse-only idempotent form; docs/workers.md lists createRoom$ only",
    ("^/_matrix/client/(api/v1|r0|v3|unstable)/events/.*$", "EventRestServlet"):
        "GET events/{eventId}: deprecated pre-r0 API; docs/workers.md lists events$ only",
    ("^/_matrix/client/unstable/im.nheko.summary/rooms/.*/summary$", "RoomSummaryRestServlet"):
        "older MSC3266 unstable path; docs/workers.md lists im.nheko.summary/summary/ only",
}

# The map drops WORKERS_DENIED_METHODS for every worker, but the named stream writer does register them.
# (role, method) → the Synapse class attribute this relies on (asserted, so an upgrade re-opens the question).
WRITER_ONLY_METHODS = {
    ("push_rules", "PUT"): ("synapse.rest.client.push_rule", "PushRuleRestServlet"),
    ("push_rules", "DELETE"): ("synapse.rest.client.push_rule", "PushRuleRestServlet"),
}

# KEPT_ON_MAIN entries for paths the map does not enumerate.
NOT_IN_MAP = {"^/_matrix/key/v2/server": "KeyResource on every federation listener, not a servlet in the map"}

MEDIA_ADMIN = re.compile(
    r"^/_synapse/admin/v1/(purge_media_cache|quarantine_media/|media/|(room|user|users)/.*/media)"
)


def required_resource(path: str) -> str:
    """The listener resource a generic worker needs to serve `path`."""
    if path.startswith(("/_matrix/media/", "/_matrix/client/v1/media/", "/_matrix/federation/v1/media/")):
        return catalog.MEDIA
    if MEDIA_ADMIN.search(path):
        return catalog.MEDIA
    if path.startswith(("/_matrix/federation/", "/_matrix/key/")):
        return catalog.FEDERATION
    return catalog.CLIENT  # /_matrix/client, /_synapse/admin, /_synapse/client, /_synapse/mas


def in_map_scope(path: str) -> bool:
    """Whether generate_workers_map enumerates this path (client/federation/key servlets, no media)."""
    if path.startswith(("/_matrix/media/", "/_matrix/client/v1/media/")):
        return False
    return path.startswith(("/_matrix/client/", "/_matrix/federation/", "/_matrix/key/"))


# ---------------------------------------------------------------------------------------------------
# Fixtures: one map and one all-roles plan per module
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_root():
    root = Path(tempfile.mkdtemp(prefix="sw-map-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _env(root: Path, **extra: str) -> dict[str, str]:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "SYNAPSE_SERVER_NAME": "example.test",
        "SYNAPSE_REPORT_STATS": "no",
        "SYNAPSE_CONFIG_DIR": str(root / "data"),
        "SYNAPSE_DATA_DIR": str(root / "data"),
        "SYNAPSE_RUNTIME_DIR": str(root / "run"),
        "SYNAPSE_INTERNAL_PORT_BASE": "20000",
        "SYNAPSE_HTTP_PORT": "8008",
        "SYNAPSE_HTTP_BIND_ADDRESS": "127.0.0.1",
    }
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def merged_config(module_root) -> Path:
    """One config file as Synapse's main process would see it: homeserver.yaml + shared.yaml + main.yaml."""
    root = module_root / "monolith"
    env = _env(root, SYNAPSE_DATABASE="sqlite")
    result = subprocess.run([CLI, "generate"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    plan = load_plan(env)
    merged: dict = {}
    for path in plan.main.config_files:  # later files override earlier ones per top-level key
        merged.update(yaml.safe_load(Path(path).read_text()) or {})
    merged.update(EXTRA_CONFIG)
    database = merged["database"]["args"]["database"]
    assert merged["database"]["name"] == "sqlite3" and database.startswith(str(module_root)), database
    target = module_root / "merged.yaml"
    target.write_text(yaml.safe_dump(merged, sort_keys=False))
    return target


@pytest.fixture(scope="module")
def workers_map(merged_config) -> list[MapEntry]:
    entries = parse_workers_map(run_workers_map(str(merged_config), python=sys.executable))
    assert len(entries) > 80, f"suspiciously small workers map: {len(entries)} entries"
    return entries


@pytest.fixture(scope="module")
def registrations(merged_config, workers_map) -> list[Registration]:
    """What the map summarises, unsimplified; checked to be exactly the printed map."""
    regs = run_raw_registrations(str(merged_config), python=sys.executable)
    printed = {e.regex for e in workers_map}
    assert {r.printed for r in regs} == printed, "raw registrations and the printed map disagree"
    return regs


@pytest.fixture(scope="module")
def all_roles_plan(module_root):
    plan = load_plan(_env(module_root / "all", POSTGRES_PASSWORD="not-used", SYNAPSE_WORKER_TYPES=ALL_ROLES))
    deployed = {r for w in plan.workers for r in w.roles}
    assert deployed == set(catalog.ROLES), f"ALL_ROLES misses {sorted(set(catalog.ROLES) - deployed)}"
    return plan


@pytest.fixture(scope="module")
def one_role_plans(module_root) -> dict[str, object]:
    """One plan per role, each with a single worker carrying only that role."""
    return {role: load_plan(_env(module_root / "one", POSTGRES_PASSWORD="not-used", SYNAPSE_WORKER_TYPES=role))
            for role in catalog.ROLES}


# ---------------------------------------------------------------------------------------------------
# The parser itself (cheap, guards the comparisons below)
# ---------------------------------------------------------------------------------------------------


def test_parser_reads_categories_methods_and_merges_lines():
    text = (
        "# Sync requests\n^/_matrix/client/(r0|v3|unstable)/sync$\n\n\n"
        "# Delayed\n^/a$\n\nGET    ^/b/.*$\nHEAD   ^/b/.*$\n\n"
    )
    entries = parse_workers_map(text)
    assert entries == [
        MapEntry("Sync requests", None, "^/_matrix/client/(r0|v3|unstable)/sync$"),
        MapEntry("Delayed", None, "^/a$"),
        MapEntry("Delayed", frozenset({"GET", "HEAD"}), "^/b/.*$"),
    ]
    assert entries[2].allows("get") and not entries[2].allows("POST") and entries[0].allows("DELETE")
    with pytest.raises(ValueError):
        parse_workers_map("^/orphan$\n")


@pytest.mark.parametrize(
    ("regex", "sample"),
    [
        ("^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/typing/.*$", "/_matrix/client/api/v1/rooms/x/typing/x"),
        ("^/_matrix/client/(v1|unstable)/rooms/.*/relations/.*(/.*(/.*)?)?$",
         "/_matrix/client/v1/rooms/x/relations/x/x/x"),
        ("^/_matrix/client/unstable/org\\.matrix\\.msc4140/delayed_events/.*/restart$",
         "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/x/restart"),
        ("^/_matrix/federation/v1/send/.*/?$", "/_matrix/federation/v1/send/x/"),
        ("^/_matrix/key/v2/query/.*(/.*)?$", "/_matrix/key/v2/query/x/x"),
        ("^/a/[^/]+/b/[^/]*$", "/a/x/b/x"),
    ],
)
def test_sample_path(regex, sample):
    assert sample_path(regex) == sample


# ---------------------------------------------------------------------------------------------------
# 1. Forward: what the catalogue sends to workers, Synapse's generic worker registers
# ---------------------------------------------------------------------------------------------------


def _serving_roles(one_role_plans, method: str, path: str) -> list[str]:
    """Roles some deployment sends METHOD PATH to: asked of the planner, one single-role deployment per role."""
    return [role for role, plan in one_role_plans.items() if explain(plan, method, path)["upstream"] != MAIN]


def test_serving_roles_follow_the_docs(one_role_plans):
    """Guards the helper above: docs/workers.md §3.1, §3.2 and §5, written out."""
    def roles(method, path):
        return set(_serving_roles(one_role_plans, method, path))

    assert roles("GET", "/_matrix/client/v3/pushrules/") == {"push_rules", "client_reader_non_room"}
    assert roles("PUT", "/_matrix/client/v3/pushrules/global/room/!r:x") == {"push_rules"}
    assert roles("POST", "/_matrix/client/v3/keys/upload") == {"device_lists", "frontend_proxy",
                                                                "client_reader_non_room"}
    assert roles("POST", "/_matrix/client/v3/createRoom") == {"event_creator", "client_reader_non_room"}
    assert roles("GET", "/_synapse/admin/v2/users/@u:x") == {"client_reader_non_room"}
    assert roles("PUT", "/_synapse/admin/v2/users/@u:x") == set()
    assert roles("GET", "/_matrix/client/v3/sync") == {"synchrotron", "initial_synchrotron"}
    assert roles("GET", "/_matrix/client/v3/sync?since=s1_2") == {"synchrotron"}
    assert roles("GET", "/_matrix/client/v3/sync?since=s1_2&full_state=true") == {"synchrotron", "initial_synchrotron"}
    assert roles("GET", "/_matrix/client/v3/events?from=s1_2") == {"synchrotron"}
    assert roles("POST", "/_matrix/client/v3/logout") == set()


def _writer_only(role: str, method: str, path: str, registrations: list[Registration]) -> str | None:
    """The servlet class when METHOD PATH is registered for workers with other methods only because the
    class denies METHOD on every worker except its stream writer."""
    if (role, method) not in WRITER_ONLY_METHODS:
        return None
    module, cls = WRITER_ONLY_METHODS[role, method]
    servlet = getattr(importlib.import_module(module), cls)
    if method not in getattr(servlet, "WORKERS_DENIED_METHODS", ()):
        return None
    if not any(r.servlet == cls and re.search(r.pattern, path) for r in registrations):
        return None
    return cls


def test_catalogue_examples_are_registered_on_generic_workers(workers_map, registrations, one_role_plans):
    failures, rows = [], []
    for rule in catalog.RULES:
        assert rule.examples, f"rule {rule.id} has no examples to check"
        for example in rule.examples:
            method, path = example.split(" ", 1)
            if not re.search(rule.pattern, normalise(path)):
                failures.append(f"example {example!r} of rule {rule.id} does not match its pattern {rule.pattern}")
                continue
            for role in _serving_roles(one_role_plans, method, path):
                need = required_resource(normalise(path))
                resources = catalog.ROLES[role].resources
                if need not in resources:
                    failures.append(f"catalog routes {example} to role {role} (rule {rule.id}), which has no "
                                    f"{need!r} listener resource (has {resources})")
                if not {catalog.CLIENT, catalog.FEDERATION} & set(resources):
                    continue  # no HTTP API at all: reported above
                if not in_map_scope(path):
                    rows.append((rule.id, role, example, "not in map (media, admin, /_synapse)"))
                    continue
                plain = path.split("?", 1)[0]  # a query class (catalog.Query) picks the pool, not the servlet
                hits = [r for r in registrations if r.matches(method, plain)]
                printed = [e for e in workers_map if e.matches(method, plain)]
                if hits:
                    assert any(e.regex == hits[0].printed for e in printed), (example, hits[0])
                    rows.append((rule.id, role, example, f"{hits[0].servlet}: {hits[0].printed}"))
                    continue
                writer_only = _writer_only(role, method, path, registrations)
                if writer_only:
                    rows.append((rule.id, role, example, f"{writer_only}: writer only (WORKERS_DENIED_METHODS)"))
                    continue
                failures.append(f"catalog routes {example} to role {role} (rule {rule.id}) but Synapse's "
                                f"generic worker does not register it")
    _print_table("catalogue example -> Synapse generic worker", ("rule", "role", "example", "registered by"), rows)
    assert not failures, "\n".join(failures)


def test_writer_only_exemptions_still_hold():
    for (role, method), (module, cls) in WRITER_ONLY_METHODS.items():
        servlet = getattr(importlib.import_module(module), cls)
        assert method in getattr(servlet, "WORKERS_DENIED_METHODS", ()), (
            f"{cls} no longer denies {method} on workers: drop the WRITER_ONLY_METHODS entry for {role}")


# ---------------------------------------------------------------------------------------------------
# 2. Reverse: what Synapse's generic worker registers, the catalogue routes (or keeps on main on purpose)
# ---------------------------------------------------------------------------------------------------


def _samples(entry: MapEntry, registrations: list[Registration]) -> list[tuple[str, str, str]]:
    """(method, concrete path, servlet) for one printed map line, from the registrations behind it.

    The printed regex alone would do for most lines, but it collapses named groups (`rooms/.*/.*$` is the
    membership servlet's `rooms/{id}/(join|invite|...)`), so samples come from the real patterns."""
    found = {(r.method, sample_path(r.plain), r.servlet) for r in registrations
             if r.printed == entry.regex and entry.allows(r.method)}
    assert found, f"no registration behind map line {entry.describe()}"
    for _, path, _ in found:
        assert re.search(entry.regex, path), (entry.regex, path)
    return sorted(found)


def _kept(sample: str) -> list[str]:
    return [k for k in catalog.KEPT_ON_MAIN if re.search(k, sample)]


def test_every_workerisable_endpoint_is_routed_or_deliberately_kept_on_main(workers_map, registrations,
                                                                              all_roles_plan):
    uncovered, rows = [], []
    allowed_seen: set[tuple[str, str]] = set()
    for entry in workers_map:
        for method, sample, servlet in _samples(entry, registrations):
            result = explain(all_roles_plan, method, sample)
            row = (entry.category, f"{method} {sample}", servlet)
            if result["upstream"] != MAIN:
                rows.append((*row, result["upstream"], result.get("rule") or ""))
            elif _kept(sample):
                rows.append((*row, MAIN, "KEPT_ON_MAIN"))
            elif (entry.regex, servlet) in ALLOWED_ON_MAIN:
                allowed_seen.add((entry.regex, servlet))
                rows.append((*row, MAIN, "allowed: " + ALLOWED_ON_MAIN[entry.regex, servlet]))
            else:
                uncovered.append(f"{method} {sample}  ({servlet}; map: {entry.describe()}; "
                                 f"category {entry.category!r})")
    _print_table("Synapse worker map -> all-roles plan",
                 ("category", "sample", "servlet", "upstream", "rule / reason"), rows)
    assert not uncovered, (
        "Synapse's generic worker registers endpoints the catalogue neither routes to a worker nor keeps on "
        "main on purpose (route them in catalog.RULES, or list them in catalog.KEPT_ON_MAIN with a reason):\n  "
        + "\n  ".join(uncovered)
    )
    stale = sorted(set(ALLOWED_ON_MAIN) - allowed_seen)
    assert not stale, f"ALLOWED_ON_MAIN entries no longer in the map, or no longer landing on main: {stale}"


def test_kept_on_main_entries_exist_in_synapse_and_stay_on_main(registrations, all_roles_plan):
    samples = sorted({(r.method, sample_path(r.plain)) for r in registrations})
    rows = []
    for kept in catalog.KEPT_ON_MAIN:
        if kept in NOT_IN_MAP:
            rows.append((kept, "-", NOT_IN_MAP[kept]))
            continue
        matched = [(m, s) for m, s in samples if re.search(kept, s)]
        assert matched, (f"catalog.KEPT_ON_MAIN entry {kept!r} matches nothing Synapse's generic worker registers: "
                         "stale or misspelt (compare with the worker map)")
        for method, sample in matched:
            result = explain(all_roles_plan, method, sample)
            assert result["upstream"] == MAIN, f"{sample} is in KEPT_ON_MAIN but routed to {result['upstream']}"
            rows.append((kept, f"{method} {sample}", MAIN))
    _print_table("catalog.KEPT_ON_MAIN", ("entry", "sample from Synapse", "upstream"), rows)


# ---------------------------------------------------------------------------------------------------


def _print_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A plain table for `pytest -s` (captured otherwise, shown on failure)."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [min(70, max([len(h)] + [len(r[i]) for r in rows])) for i, h in enumerate(header)]
    print(f"\n== {title}: {len(rows)} rows (Synapse {catalog.SYNAPSE_VERSION}) ==")
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
