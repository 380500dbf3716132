#!/usr/bin/env python3
"""Before moving to another Synapse release: what would differ? (docs/synapse-upgrade.md)

    /opt/synapse-workers/venv/bin/python scripts/synapse_release_check.py 1.164.0

installs matrix-synapse==VERSION into a scratch venv (pip from PyPI, a few minutes; `--venv DIR` reuses one) and
compares it with the Synapse this project is pinned to (the one installed beside synapse-workers, the running
interpreter's), changing nothing in the tree:

1. the worker map: what Synapse's generic worker registers (`synapse._scripts.generate_workers_map` and the
   registrations behind it, tests/support/synapse_map.py), endpoints added and removed;
2. the catalogue (src/synapse_workers/catalog.py) against it: catalogue examples routed to workers that the
   candidate no longer registers, new worker endpoints and where the catalogue would send them, KEPT_ON_MAIN
   entries matching nothing, stream writers;
3. config options: the string keys Synapse's config classes read (synapse/config/*.py, read with `ast`) that
   appear or disappear, and which of the keys our generated configuration emits change status;
4. loading: every generated config of a few deployments through the candidate's `HomeServerConfig.load_config`
   (src/synapse_workers/synapse_check.py, as `synapse-workers check` does), next to the pinned Synapse's answer.

Exit 0: nothing differs; 1: differences (the report lists them); 2: the candidate could not be installed or run.
A developer tool: not part of the installed package. The comparison functions are pure (tests/unit/
test_release_check.py runs them on fixture data).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.support.synapse_map: the map parser the catalogue test uses

from tests.support.synapse_map import (  # noqa: E402
    MapEntry,
    Registration,
    parse_workers_map,
    run_raw_registrations,
    run_workers_map,
    sample_path,
)

from synapse_workers import catalog  # noqa: E402
from synapse_workers.load import load_plan  # noqa: E402
from synapse_workers.plan import MAIN, Plan  # noqa: E402
from synapse_workers.routing import explain  # noqa: E402

# stdlib + synapse only: runs in any venv, as source (`-c`): run as a file, its directory would come first on
# sys.path and our package's modules would shadow the standard library's (secrets.py).
SYNAPSE_CHECK = REPO / "src" / "synapse_workers" / "synapse_check.py"

# Every role, so that a path lands on main only when no role is meant to serve it (as in the catalogue test).
ALL_ROLES = ", ".join(catalog.ROLES)
# Config switches that make Synapse register servlets the catalogue routes (the map reflects the config).
EXTRA_CONFIG = {"experimental_features": {"msc4306_enabled": True}}

# Deployments whose generated configuration must load: (name, variables beyond the common ones).
SCENARIOS: tuple[tuple[str, dict[str, str]], ...] = (
    ("monolith, SQLite", {"SYNAPSE_DATABASE": "sqlite"}),
    ("monolith, PostgreSQL, metrics", {"SYNAPSE_METRICS": "yes"}),
    ("every role", {"SYNAPSE_WORKER_TYPES": ALL_ROLES}),
    (
        "workers over unix sockets",
        {
            "SYNAPSE_WORKER_TYPES": "synchrotron:2, event_persister:2, media_repository, "
            "stream_writers=typing+to_device+receipts",
            "SYNAPSE_METRICS": "yes",
            "SYNAPSE_METRICS_UNIX_SOCKETS": "yes",
            "SYNAPSE_HTTP_REPLICATION_UNIX_SOCKETS": "yes",
            "SYNAPSE_PUBLIC_UNIX_SOCKETS": "yes",
        },
    ),
)

# Under these keys of our YAML the children are names we choose (worker names), not Synapse's options.
NAME_MAPS = ("instance_map",)
# Under these, the children are stream names: checked against the candidate's WriterLocations instead.
STREAM_MAPS = ("stream_writers",)
KEY_NAME = re.compile(r"^[a-z_][a-z0-9_.]*$")


# ---------------------------------------------------------------------------------------------------
# Pure comparisons (tested on fixture data in tests/unit/test_release_check.py)
# ---------------------------------------------------------------------------------------------------


def config_literals(source: str) -> set[str]:
    """The string keys a config module reads: `x.get("k")`, `x.pop("k")`, `x.setdefault("k")`, `x["k"]` and
    `"k" in x`. A heuristic (a key built at run time is missed), but the same heuristic on both releases."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        key: ast.expr | None = None
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "pop", "setdefault")
            and node.args
        ):
            key = node.args[0]
        elif isinstance(node, ast.Subscript):
            key = node.slice
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            key = node.left
        if isinstance(key, ast.Constant) and isinstance(key.value, str) and KEY_NAME.match(key.value):
            found.add(key.value)
    return found


def config_refusals(source: str) -> set[str]:
    """The messages of the `ConfigError`s a config module raises (their literal parts; `{}` where a value is
    formatted in): a new one is a configuration the candidate refuses to start with."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args):
            continue
        func = node.exc.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name == "ConfigError":
            text = _literal_text(node.exc.args[0])
            if text.strip():
                found.add(" ".join(text.split()))
    return found


def _literal_text(node: ast.expr) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_literal_text(v) if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        return _literal_text(node.left) + ("" if isinstance(node.op, ast.Mod) else _literal_text(node.right))
    return "{}"


def writer_streams(workers_source: str) -> set[str]:
    """The stream names `stream_writers` accepts: the attributes of synapse/config/workers.py's WriterLocations."""
    for node in ast.walk(ast.parse(workers_source)):
        if isinstance(node, ast.ClassDef) and node.name == "WriterLocations":
            return {
                item.target.id
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    return set()


def key_paths(doc: Any, prefix: str = "") -> Iterator[str]:
    """Every mapping key of a YAML document as a dotted path (`listeners[].resources[].names`)."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            if str(key) in NAME_MAPS and not prefix:
                for name, inner in (value or {}).items():
                    yield from key_paths(inner, f"{path}.<{name}>")
            elif str(key) not in STREAM_MAPS or prefix:
                yield from key_paths(value, path)
    elif isinstance(doc, list):
        for item in doc:
            yield from key_paths(item, f"{prefix}[]")


def emitted_keys(docs: Iterable[Any]) -> set[str]:
    return {path for doc in docs for path in key_paths(doc)}


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1].removesuffix("[]")


@dataclass
class OptionDiff:
    new_in_candidate: list[str]  # keys the candidate's config classes read that the pinned Synapse does not
    gone_in_candidate: list[str]  # keys the pinned Synapse reads that the candidate does not
    emitted_gone: list[str]  # key paths our generated configs emit whose key the candidate no longer reads
    emitted_new: list[str]  # key paths we emit that only the candidate reads (a default we were passing blind)


def option_differences(emitted: set[str], pinned: set[str], candidate: set[str]) -> OptionDiff:
    def status_changed(path: str, ours: set[str], theirs: set[str]) -> bool:
        leaf = _leaf(path)
        return leaf in ours and leaf not in theirs

    return OptionDiff(
        new_in_candidate=sorted(candidate - pinned),
        gone_in_candidate=sorted(pinned - candidate),
        emitted_gone=sorted(p for p in emitted if status_changed(p, pinned, candidate)),
        emitted_new=sorted(p for p in emitted if status_changed(p, candidate, pinned)),
    )


def _key(reg: Registration) -> tuple[str, str]:
    return (reg.method, reg.pattern)


@dataclass
class MapDiff:
    added: list[Registration]
    removed: list[Registration]
    moved: list[tuple[Registration, Registration]]  # same method and pattern, another servlet class
    printed_added: list[MapEntry]
    printed_removed: list[MapEntry]


def map_differences(
    pinned: list[Registration], candidate: list[Registration], pinned_map: list[MapEntry], candidate_map: list[MapEntry]
) -> MapDiff:
    old = {_key(r): r for r in pinned}
    new = {_key(r): r for r in candidate}

    def printed(entry: MapEntry) -> tuple[str, frozenset[str] | None]:
        return (entry.regex, entry.methods)

    old_printed = {printed(e) for e in pinned_map}
    new_printed = {printed(e) for e in candidate_map}
    return MapDiff(
        added=[new[k] for k in sorted(new.keys() - old.keys())],
        removed=[old[k] for k in sorted(old.keys() - new.keys())],
        moved=[(old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k].servlet != new[k].servlet],
        printed_added=[e for e in candidate_map if printed(e) not in old_printed],
        printed_removed=[e for e in pinned_map if printed(e) not in new_printed],
    )


def in_map_scope(path: str) -> bool:
    """Whether generate_workers_map enumerates this path (client/federation/key servlets, no media)."""
    if path.startswith(("/_matrix/media/", "/_matrix/client/v1/media/")):
        return False
    return path.startswith(("/_matrix/client/", "/_matrix/federation/", "/_matrix/key/"))


@dataclass
class CatalogueDiff:
    unregistered_examples: list[str]  # catalogue examples routed to workers: registered now, not by the candidate
    new_endpoints: list[tuple[str, str, str]]  # (METHOD sample, servlet, where the catalogue sends it)
    removed_routed: list[tuple[str, str, str]]  # (METHOD sample, servlet, worker upstream): routed, now gone
    stale_kept_on_main: list[str]  # KEPT_ON_MAIN entries the candidate's worker registers nothing for
    streams_unknown: list[str]  # catalogue streams the candidate's stream_writers does not accept
    streams_new: list[str]  # stream names the candidate accepts that no catalogue role writes


def _registered(regs: list[Registration], method: str, path: str) -> bool:
    return any(r.matches(method, path) for r in regs)


def _where(plan: Plan, method: str, path: str) -> str:
    upstream = str(explain(plan, method, path)["upstream"])
    if upstream == MAIN and any(re.search(k, path) for k in catalog.KEPT_ON_MAIN):
        return "main (KEPT_ON_MAIN)"
    return upstream


def catalogue_differences(
    plan: Plan, diff: MapDiff, pinned: list[Registration], candidate: list[Registration], candidate_streams: set[str]
) -> CatalogueDiff:
    """`plan`: one deploying every role. Only what differs between the pinned Synapse and the candidate."""
    unregistered = []
    for rule in catalog.RULES:
        for example in rule.examples:
            method, path = example.split(" ", 1)
            if not in_map_scope(path) or explain(plan, method, path)["upstream"] == MAIN:
                continue
            plain = path.split("?", 1)[0]  # a query class (catalog.Query) picks the pool, not the servlet
            if _registered(pinned, method, plain) and not _registered(candidate, method, plain):
                unregistered.append(f"{example} (rule {rule.id})")
    new_endpoints = []
    for reg in diff.added:
        sample = sample_path(reg.plain)
        new_endpoints.append((f"{reg.method} {sample}", reg.servlet, _where(plan, reg.method, sample)))
    removed_routed = []
    for reg in diff.removed:
        sample = sample_path(reg.plain)
        if _registered(candidate, reg.method, sample):
            continue  # another registration still serves it
        where = _where(plan, reg.method, sample)
        if not where.startswith(MAIN):
            removed_routed.append((f"{reg.method} {sample}", reg.servlet, where))
    samples = [sample_path(r.plain) for r in candidate]
    stale = [
        k
        for k in catalog.KEPT_ON_MAIN
        if k != "^/_matrix/key/v2/server"  # KeyResource, not in the map
        and not any(re.search(k, s) for s in samples)
    ]
    ours = {s for role in catalog.ROLES.values() for s in role.streams}
    return CatalogueDiff(
        unregistered_examples=unregistered,
        new_endpoints=new_endpoints,
        removed_routed=removed_routed,
        stale_kept_on_main=stale,
        streams_unknown=sorted(ours - candidate_streams) if candidate_streams else [],
        streams_new=sorted(candidate_streams - ours),
    )


def load_differences(pinned: Mapping[str, str | None], candidate: Mapping[str, str | None]) -> list[str]:
    """`scenario/process` → None (loads) or the loader's error, for both releases: the processes whose answer
    differs, and any the candidate refuses."""
    lines = []
    for name in sorted(pinned.keys() | candidate.keys()):
        before, after = pinned.get(name, "not checked"), candidate.get(name, "not checked")
        if after is not None or before is not None:
            lines.append(f"{name}: pinned {_answer(before)}, candidate {_answer(after)}")
    return lines


def _answer(error: str | None) -> str:
    return "OK" if error is None else repr(error)


# ---------------------------------------------------------------------------------------------------
# The edges: a scratch venv, our generator, the two Synapses
# ---------------------------------------------------------------------------------------------------


@dataclass
class Synapse:
    python: str
    version: str = ""
    package: Path = field(default_factory=Path)

    def describe(self) -> None:
        code = "import os, synapse; print(synapse.__version__); print(os.path.dirname(synapse.__file__))"
        result = subprocess.run([self.python, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        self.version, package = result.stdout.split()
        self.package = Path(package)

    def literals(self) -> set[str]:
        return set().union(*(config_literals(p.read_text()) for p in sorted((self.package / "config").glob("*.py"))))

    def refusals(self) -> set[str]:
        return set().union(*(config_refusals(p.read_text()) for p in sorted((self.package / "config").glob("*.py"))))

    def streams(self) -> set[str]:
        return writer_streams((self.package / "config" / "workers.py").read_text())

    def load(self, processes: list[dict[str, Any]], cwd: Path) -> dict[str, str | None]:
        result = subprocess.run(
            [self.python, "-c", SYNAPSE_CHECK.read_text()],
            input=json.dumps(processes),
            capture_output=True,
            text=True,
            timeout=600,
            cwd=cwd,
        )
        answers: dict[str, str | None] = {
            p["name"]: "the loader crashed: " + result.stderr.strip()[-300:] for p in processes
        }
        for line in result.stdout.splitlines():
            report = json.loads(line)
            answers[report["name"]] = report["error"]
        return answers


def install(version: str, venv: Path) -> str:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    print(f"installing matrix-synapse=={version} into {venv} (a few minutes) ...", file=sys.stderr, flush=True)
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"matrix-synapse[postgres,redis]=={version}"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"pip install matrix-synapse=={version} failed:\n{result.stderr[-3000:]}")
    return str(python)


def _env(root: Path, extra: Mapping[str, str]) -> dict[str, str]:
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "SYNAPSE_SERVER_NAME": "example.test",
        "SYNAPSE_REPORT_STATS": "no",
        "POSTGRES_PASSWORD": "release-check",
        "SYNAPSE_CONFIG_DIR": str(root / "data"),
        "SYNAPSE_DATA_DIR": str(root / "data"),
        "SYNAPSE_RUNTIME_DIR": str(root / "run"),
        "SYNAPSE_INTERNAL_PORT_BASE": "20000",
        "SYNAPSE_HTTP_PORT": "8008",
        **extra,
    }


def generate(root: Path, extra: Mapping[str, str]) -> Plan:
    env = _env(root, extra)
    cli = Path(sys.executable).parent / "synapse-workers"
    result = subprocess.run([str(cli), "generate"], env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"synapse-workers generate failed for {extra}:\n{result.stderr}")
    return load_plan(env)


def merged_config(plan: Plan, target: Path, database: Path) -> Path:
    """One config as Synapse's main process sees it (later files override per top-level key), own database."""
    merged: dict[str, Any] = {}
    for path in plan.main.config_files:
        merged.update(yaml.safe_load(Path(path).read_text()) or {})
    merged.update(EXTRA_CONFIG)
    merged["database"] = {"name": "sqlite3", "args": {"database": str(database)}}
    target.write_text(yaml.safe_dump(merged, sort_keys=False))
    return target


def report(title: str, lines: Iterable[str]) -> int:
    rows = list(lines)
    print(f"\n## {title}: {len(rows) or 'none'}")
    for row in rows:
        print(f"- {row}")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version", help="the candidate matrix-synapse release, e.g. 1.164.0")
    parser.add_argument("--venv", type=Path, help="a venv to install it in (kept; reused if it has it already)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="sw-release-", dir="/tmp"))
    os.chmod(scratch, 0o755)
    try:
        venv = args.venv or scratch / "venv"
        candidate = Synapse(str(venv / "bin" / "python"))
        try:
            candidate.describe()
        except (subprocess.CalledProcessError, FileNotFoundError, ValueError):
            candidate.version = ""
        if candidate.version != args.version:
            candidate.python = install(args.version, venv)
            candidate.describe()
        pinned = Synapse(sys.executable)
        pinned.describe()
        return compare(pinned, candidate, scratch, started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def compare(pinned: Synapse, candidate: Synapse, scratch: Path, started: float) -> int:
    print(f"# Synapse {candidate.version} against the pinned {pinned.version} (catalogue {catalog.SYNAPSE_VERSION})")
    differences = 0

    # 1 + 2: the worker map and the catalogue
    mono = generate(scratch / "map", {"SYNAPSE_DATABASE": "sqlite"})
    maps: dict[str, tuple[list[MapEntry], list[Registration]]] = {}
    for label, synapse in (("pinned", pinned), ("candidate", candidate)):
        config = merged_config(mono, scratch / f"merged-{label}.yaml", scratch / f"map-{label}.db")
        maps[label] = (
            parse_workers_map(run_workers_map(str(config), python=synapse.python)),
            run_raw_registrations(str(config), python=synapse.python),
        )
    diff = map_differences(maps["pinned"][1], maps["candidate"][1], maps["pinned"][0], maps["candidate"][0])
    differences += report(
        "Worker map lines added (category: line)", (f"{e.category}: {e.describe()}" for e in diff.printed_added)
    )
    differences += report("Worker map lines removed", (f"{e.category}: {e.describe()}" for e in diff.printed_removed))
    differences += report(
        "Generic worker registrations added", (f"{r.method} {r.pattern} ({r.servlet})" for r in diff.added)
    )
    differences += report(
        "Generic worker registrations removed", (f"{r.method} {r.pattern} ({r.servlet})" for r in diff.removed)
    )
    differences += report(
        "Registrations served by another servlet class",
        (f"{a.method} {a.pattern}: {a.servlet} -> {b.servlet}" for a, b in diff.moved),
    )

    every_role = load_plan(_env(scratch / "all", {"SYNAPSE_WORKER_TYPES": ALL_ROLES}))
    cat = catalogue_differences(every_role, diff, maps["pinned"][1], maps["candidate"][1], candidate.streams())
    differences += report(
        "Catalogue examples sent to workers that the candidate's workers do not register", cat.unregistered_examples
    )
    differences += report(
        "New worker endpoints and where the catalogue sends them today",
        (f"{m} ({servlet}) -> {where}" for m, servlet, where in cat.new_endpoints),
    )
    differences += report(
        "Endpoints the catalogue sends to workers that the candidate's workers no longer register",
        (f"{m} ({servlet}) -> {where}" for m, servlet, where in cat.removed_routed),
    )
    differences += report(
        "KEPT_ON_MAIN entries matching nothing the candidate's workers register", cat.stale_kept_on_main
    )
    differences += report("Catalogue streams the candidate's stream_writers does not know", cat.streams_unknown)
    differences += report("Streams the candidate knows that no catalogue role writes", cat.streams_new)

    # 3 + 4: config options and loading, over every scenario
    plans = [(name, generate(scratch / f"s{i}", extra)) for i, (name, extra) in enumerate(SCENARIOS)]
    docs = []
    processes: list[dict[str, Any]] = []
    for name, plan in plans:
        for proc in plan.local_processes:
            processes.append({"name": f"{name}/{proc.name}", "app": proc.app, "config_files": list(proc.config_files)})
            docs += [yaml.safe_load(Path(f).read_text()) for f in proc.config_files]
    options = option_differences(emitted_keys(docs), pinned.literals(), candidate.literals())
    differences += report(
        "Keys our generated configuration sets that the candidate's config classes no longer read", options.emitted_gone
    )
    differences += report("Keys we set that only the candidate reads", options.emitted_new)
    report(
        "Config keys the candidate reads that the pinned Synapse does not (new options; informative)",
        options.new_in_candidate,
    )
    report(
        "Config keys the pinned Synapse reads that the candidate does not (removed options; informative)",
        options.gone_in_candidate,
    )
    old, new = pinned.refusals(), candidate.refusals()
    report("Configurations only the candidate refuses (its new ConfigErrors; informative)", sorted(new - old))
    report("Configurations only the pinned Synapse refuses (informative)", sorted(old - new))
    answers = {
        label: synapse.load(processes, scratch) for label, synapse in (("pinned", pinned), ("candidate", candidate))
    }
    differences += report(
        f"Generated configs the loaders answer differently or refuse ({len(processes)} processes "
        f"in {len(plans)} deployments)",
        load_differences(answers["pinned"], answers["candidate"]),
    )

    print(f"\n{differences} difference(s) in {time.monotonic() - started:.0f} s")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
