"""SYNAPSE_WORKER_TYPES → declared worker processes.

Grammar: a comma list of `[name=]type[+type...][:count]`, or `full` for the preset. Empty: a monolith.
Unnamed workers are named `<types sorted, joined by +><n>`, named ones `<name><n>`, counting per base name.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass

from . import catalog
from .errors import Problem, UserError, Variable

VAR = Variable("SYNAPSE_WORKER_TYPES")
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*[A-Za-z_+-]|[A-Za-z]")  # no trailing digit: we append one
MAX_COUNT = 64
# More workers than any deployment could use: matrix.org ran on the order of a hundred across many machines;
# 255 workers cost 10-22 GiB at idle alone (41-88 MiB each, docs/benchmarks.md) and are likelier a typo
# (`:64` on every type) than a plan. A list that fits under it but not the machine is warned about at
# `check` and `run` (memory.py).
MAX_WORKERS = 255  # + main: 256 Synapse processes
RESERVED_NAMES = ("main", "master")


@dataclass(frozen=True)
class Worker:
    name: str
    types: tuple[str, ...]  # as declared, shorthands kept
    roles: tuple[str, ...]  # expanded and sorted

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(sorted({s for r in self.roles for s in catalog.ROLES[r].streams}))


def parse_workers(spec: str) -> tuple[Worker, ...]:
    items = _items(spec)
    bases: dict[str, tuple[str, ...]] = {}
    counters: Counter[str] = Counter()
    workers: list[Worker] = []
    for item in items:
        name, types, count = _parse_item(item)
        base = name or "+".join(sorted(types))
        key = tuple(sorted(types))
        if bases.setdefault(base, key) != key:
            raise UserError(
                Problem(
                    f"{VAR}: the worker name {base!r} is used for two different type lists "
                    f"({'+'.join(bases[base])} and {'+'.join(key)}): give each its own name.",
                    VAR,
                    expected="one type list per worker name",
                    found=item,
                )
            )
        roles = tuple(sorted({r for t in types for r in catalog.expand_type(t)}))
        for _ in range(count):
            counters[base] += 1
            workers.append(Worker(f"{base}{counters[base]}", types, roles))
    if len(workers) > MAX_WORKERS:
        raise UserError(
            Problem(
                f"{VAR}: {len(workers)} workers (with main, {len(workers) + 1} Synapse processes): expected at most "
                f"{MAX_WORKERS}. More cannot be useful: they would need {len(workers) * 41 // 1024} GiB or more at "
                "idle alone (docs/benchmarks.md). Check the counts (:N) and presets in the list.",
                VAR,
                expected=f"at most {MAX_WORKERS} workers",
                found=f"{len(workers)} workers",
            )
        )
    _check_instances(workers)
    return tuple(workers)


def _items(spec: str) -> list[str]:
    items: list[str] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue  # tolerate a trailing comma or doubled separators
        if item.lower() == "full":
            items.extend(catalog.FULL_PRESET)
        elif re.fullmatch(r"(?i)([^=]*=)?\s*full\s*(:.*)?", item):
            raise UserError(
                Problem(
                    f"{VAR}: {item!r}: full is a preset of 16 workers and takes no name or count.",
                    VAR,
                    expected="full alone",
                    found=item,
                )
            )
        else:
            items.append(item)
    return items


def _parse_item(item: str) -> tuple[str | None, tuple[str, ...], int]:
    name: str | None = None
    rest = item
    if "=" in rest:
        name, rest = (part.strip() for part in rest.split("=", 1))
        if not NAME_RE.fullmatch(name) or name.lower() in RESERVED_NAMES:
            expected = (
                "letters, digits, _, + or -, starting with a letter and not ending in a digit (a number is "
                "appended), and not main/master"
            )
            raise UserError(
                Problem(
                    f"{VAR}: {item!r} has an invalid worker name {name!r}: expected {expected}.",
                    VAR,
                    expected=expected,
                    found=name,
                )
            )
    count = 1
    if ":" in rest:
        rest, count_text = (part.strip() for part in rest.rsplit(":", 1))
        if not re.fullmatch(r"[0-9]+", count_text) or int(count_text) > MAX_COUNT:
            expected = f"a whole number from 0 to {MAX_COUNT} (0 leaves the item out)"
            raise UserError(
                Problem(
                    f"{VAR}: {item!r} has an invalid count {count_text!r}: expected {expected}.",
                    VAR,
                    expected=expected,
                    found=count_text,
                )
            )
        count = int(count_text)
    types = tuple(t.strip().lower() for t in rest.split("+"))
    for t in types:
        if t not in catalog.TYPE_NAMES:
            raise UserError(_unknown_type(item, t))
    dupes = sorted(t for t, n in Counter(types).items() if n > 1)
    if dupes:
        raise UserError(
            Problem(
                f"{VAR}: {item!r} lists {', '.join(dupes)} more than once.",
                VAR,
                expected="each type once per item",
                found=item,
            )
        )
    return name, types, count


def _unknown_type(item: str, word: str) -> Problem:
    if not word:
        return Problem(
            f"{VAR}: {item!r} has an empty worker type: expected type names joined by '+'.",
            VAR,
            expected="type names joined by '+'",
            found=item,
        )
    close = difflib.get_close_matches(word, catalog.TYPE_NAMES + ("full",), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return Problem(
        f"{VAR}: unknown worker type {word!r} in {item!r}.{hint} Known types: "
        + ", ".join(catalog.TYPE_NAMES)
        + ", and the preset full.",
        VAR,
        expected="one of " + ", ".join(catalog.TYPE_NAMES) + ", or full",
        found=word,
    )


def _check_instances(workers: list[Worker]) -> None:
    problems = []
    for role in catalog.ROLES.values():
        if role.max_instances is None:
            continue
        holders = [w.name for w in workers if role.name in w.roles]
        if len(holders) > role.max_instances:
            what = f"the {role.streams[0]} stream has exactly one writer" if role.streams else role.duty
            problems.append(
                Problem(
                    f"{VAR}: {role.name!r} can run on only one worker (Synapse: {what}), "
                    f"but {len(holders)} are declared: {', '.join(holders)}.",
                    VAR,
                    expected=f"at most one worker with {role.name}",
                    found=", ".join(holders),
                )
            )
    if problems:
        raise UserError(*problems)
