"""Synapse's own worker map: run `synapse._scripts.generate_workers_map` and parse what it prints.

The script (shipped in the matrix-synapse wheel, not as a console script) registers every client,
federation and key servlet on a mock main process and a mock generic worker, and prints, per servlet
CATEGORY, the path regexes the generic worker registers:

    # Category name
    ^/path/regex$                  <- every method main registers for that path
    <blank>
    GET    ^/other/regex$          <- only these methods (the worker lacks some that main has)
    <blank>

Named groups are printed as `.*`, so `(?P<path>pushrules/.*)` becomes `.*`. Media, /_synapse/admin,
/_synapse/client (SSO, MAS) and /_synapse/mas are not enumerated. The script needs ONE merged YAML
config and opens its database (SQLite is fine).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

METHOD_LINE = re.compile(r"^([A-Z]+)\s+(\^.*)$")


@dataclass(frozen=True)
class MapEntry:
    category: str
    methods: frozenset[str] | None  # None: any method
    regex: str

    def allows(self, method: str) -> bool:
        return self.methods is None or method.upper() in self.methods

    def matches(self, method: str, path: str) -> bool:
        return self.allows(method) and re.search(self.regex, path) is not None

    def describe(self) -> str:
        methods = "|".join(sorted(self.methods)) + " " if self.methods else ""
        return f"{methods}{self.regex}"


def run_workers_map(config_path: str, python: str = sys.executable, timeout: float = 120) -> str:
    """stdout of generate_workers_map for one merged config file; raises with stderr on failure."""
    result = subprocess.run(
        [python, "-m", "synapse._scripts.generate_workers_map", "--config-path", config_path],
        capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(os.path.abspath(config_path)),
    )
    if result.returncode != 0:
        raise RuntimeError(f"generate_workers_map failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def parse_workers_map(text: str) -> list[MapEntry]:
    """(category, methods or None, regex) per regex, methods of repeated lines merged, in output order."""
    merged: dict[tuple[str, str], set[str] | None] = {}
    category: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            category = line.lstrip("#").strip()
            continue
        if category is None:
            raise ValueError(f"workers map line before any '# category' heading: {raw!r}")
        if line.startswith("^"):
            methods, regex = None, line
        else:
            found = METHOD_LINE.match(line)
            if not found:
                raise ValueError(f"unexpected workers map line: {raw!r}")
            methods, regex = {found.group(1)}, found.group(2)
        key = (category, regex)
        if key in merged:
            previous = merged[key]
            merged[key] = None if previous is None or methods is None else previous | methods
        else:
            merged[key] = methods
    entries = [MapEntry(cat, None if m is None else frozenset(m), rx) for (cat, rx), m in merged.items()]
    for entry in entries:
        re.compile(entry.regex)  # every printed regex must be a valid Python regex
    return entries


# ---------------------------------------------------------------------------------------------------
# The registrations behind the map, unsimplified
# ---------------------------------------------------------------------------------------------------

# The map prints `(?P<membership_action>join|invite|...)` as `.*`, so `rooms/.*/.*$` matches far more than
# Synapse registers. This runs the same enumeration the script uses (its own functions) and prints, per
# (method, raw pattern) the generic worker registers, the simplified form the map prints.
_RAW_SCRIPT = """
import json, sys, yaml
from synapse.config.homeserver import HomeServerConfig
from synapse._scripts import generate_workers_map as g
config = HomeServerConfig()
config.parse_config_dict(yaml.safe_load(open(sys.argv[1])), "", "")
worker = g.get_registered_paths_for_default("synapse.app.generic_worker", config)
rows = sorted((m, p, g.GROUP_PATTERN.sub(r".*", p), getattr(d.servlet_class, "__name__", "?"))
              for (m, p), d in worker.items())
print(json.dumps(rows))
"""


@dataclass(frozen=True)
class Registration:
    method: str
    pattern: str  # as registered (Python named groups)
    printed: str  # as the map prints it
    servlet: str

    def matches(self, method: str, path: str) -> bool:
        return self.method == method.upper() and re.search(self.pattern, path) is not None

    @property
    def plain(self) -> str:
        """The pattern with named groups turned into plain groups (what sample_path understands)."""
        return re.sub(r"\(\?P<[^>]+>", "(", self.pattern)


def run_raw_registrations(config_path: str, python: str = sys.executable, timeout: float = 120) -> list[Registration]:
    result = subprocess.run([python, "-c", _RAW_SCRIPT, config_path], capture_output=True, text=True,
                            timeout=timeout, cwd=os.path.dirname(os.path.abspath(config_path)))
    if result.returncode != 0:
        raise RuntimeError(f"raw worker registrations failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return [Registration(*row) for row in json.loads(result.stdout.strip().splitlines()[-1])]


# ---------------------------------------------------------------------------------------------------
# A concrete path for a map regex
# ---------------------------------------------------------------------------------------------------

_WILDCARDS = (".*", ".+", "[^/]*", "[^/]+")


def sample_path(regex: str) -> str:
    """One concrete path the regex matches: wildcards → `x`, groups → their first alternative.

    Optional parts (`(...)?`, `/?`) are kept once; `^`/`$` are dropped; `\\.` becomes `.`.
    Checked: the result matches the regex (ValueError otherwise)."""
    body = regex
    if body.startswith("^"):
        body = body[1:]
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    path = _synth(body)
    if not re.search(regex, path):
        raise ValueError(f"sample {path!r} does not match {regex!r}")
    return path


def _synth(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        wildcard = next((w for w in _WILDCARDS if text.startswith(w, i)), None)
        if wildcard:
            out.append("x")
            i += len(wildcard)
        elif text[i] == "\\":
            out.append(text[i + 1])
            i += 2
        elif text[i] == "(":
            end = _closing(text, i)
            inner = text[i + 1:end]
            if inner.startswith("?:"):
                inner = inner[2:]
            out.append(_synth(_alternatives(inner)[0]))
            i = end + 1
        elif text[i] in "?*+":
            i += 1  # quantifier on the previous atom: keep the atom once
        elif text[i] in "^$":
            i += 1
        elif text[i] == "[":
            end = text.index("]", i + 1)
            chars = text[i + 1:end].lstrip("^")
            out.append("x" if text[i + 1] == "^" else chars[0])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _closing(text: str, start: int) -> int:
    depth = 0
    i = start
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unbalanced parenthesis in {text!r}")


def _alternatives(text: str) -> list[str]:
    parts, depth, current, i = [], 0, [], 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            current.append(text[i:i + 2])
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        if c == "|" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    parts.append("".join(current))
    return parts
