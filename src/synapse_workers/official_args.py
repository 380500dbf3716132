"""Arguments written for the official image (`matrixdotorg/synapse`), read as a start of the stack. Pure.

Unraid pastes a template's Post Arguments after the image name, so they replace the image's CMD (`run`) and
reach our entrypoint. Templates written for the official image carry its start.py's words (`run`,
`migrate_config`) and Synapse's own options (`-m synapse.app.homeserver`, `--config-path /data/homeserver.yaml`,
`--keys-directory /data`). Those are taken as `run` (`migrate_config`: `generate`, which is what it means), with
a warning naming exactly what was ignored. Only an argument list that starts with such a word or an option of
Synapse's is translated; every command of ours (`run`, `env`, `plan`, `generate`, ...) is parsed as always.

`--config-path FILE`: the official image starts Synapse with exactly that file, so it is honoured as
SYNAPSE_CONFIG_PATH when that variable is unset (or names the same file); a SYNAPSE_CONFIG_PATH naming another
file, or several config files, is refused (exit 2): one of them would be silently ignored.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import Argument, Problem, UserError, Variable
from .settings import VARIABLES

HOMESERVER_MODULE = "synapse.app.homeserver"

# Synapse 1.163's command-line options (synapse/config/_base.py and the sections' add_arguments) that change
# nothing here: the stack already does what they ask (keys are generated when missing, nothing daemonizes), or
# they matter only with --generate-config. Value: whether the option takes a value.
IGNORED: dict[str, bool] = {
    "--keys-directory": True,
    "--config-directory": True,
    "--data-directory": True,
    "-H": True,
    "--server-name": True,
    "--report-stats": True,
    "--generate-keys": False,
    "--generate-missing-configs": False,
    "--generate-missing-and-run": False,
    "--open-private-ports": False,
    "--enable-metrics": False,
    "-D": False,
    "--daemonize": False,
    "--print-pidfile": False,
    "-n": False,
    "--no-redirect-stdio": False,
    "--no-secrets-in-config": False,
}
_LOG_CONFIG = Variable("SYNAPSE_LOG_CONFIG")
# Options whose meaning the stack cannot keep by ignoring them: refused, with what to do instead.
REFUSED: dict[str, tuple[bool, str]] = {
    "--generate-config": (
        False,
        f"it writes a new homeserver.yaml and exits: use `generate` (with {Variable('SYNAPSE_SERVER_NAME')} and "
        f"{Variable('SYNAPSE_REPORT_STATS')}) instead",
    ),
    "-d": (True, "it replaces the database: set `database` in homeserver.yaml instead"),
    "--database-path": (True, "it replaces the database: set `database` in homeserver.yaml instead"),
    "--enable-registration": (False, "set `enable_registration` in homeserver.yaml instead"),
    "--manhole": (True, "synapse-workers starts no manhole (use the admin API instead): drop the option"),
    "-f": (True, f"every process has its own log config: see {_LOG_CONFIG} instead"),
    "--log-file": (True, f"every process has its own log config: see {_LOG_CONFIG} instead"),
}
CONFIG_PATH = ("-c", "--config-path")
OFFICIAL_MODES = ("run", "migrate_config")  # start.py's `generate` is ours too, and means the same


@dataclass(frozen=True)
class Translation:
    """What to do instead of the given arguments: our own argv, variables to set, warnings to print."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def translate(argv: list[str], env: Mapping[str, str]) -> Translation | None:
    """None: the arguments are ours (or not the official image's), parse them as they are. UserError: they are
    the official image's but cannot be followed without silently dropping what they ask."""
    if not argv:
        return None
    first = argv[0]
    if first == "migrate_config":
        ignored = shlex.join(argv)
        return Translation(
            ["generate"],
            warnings=[
                f"`{ignored}` is the official image's (write homeserver.yaml from the environment, then exit): "
                "doing `generate` instead, which writes homeserver.yaml from the environment when there is none, "
                "and every other config file, then exits."
            ],
        )
    if first == "run":
        ours, synapse = _split_host(argv[1:])
        if not any(_known(word) for word in synapse):
            return None  # `run`, `run --host NAME`, `run --help`: ours (argparse answers anything else, as always)
        return _start(["run", *ours], synapse, env, given="run " + shlex.join(synapse))
    if first.startswith("-") and first not in ("-h", "--help", "--version") and _known(first):
        return _start(["run"], argv, env, given=shlex.join(argv))
    return None


def starts_stack(argv: list[str], env: Mapping[str, str]) -> bool:
    """Whether these arguments end in `run` (the entrypoint asks, before its one-time step for `run`)."""
    try:
        translation = translate(argv, env)
    except UserError:
        return False
    if translation is None:
        return not argv or argv[0] == "run"
    return translation.argv[:1] == ["run"]


def _known(word: str) -> bool:
    name = word.split("=", 1)[0]
    if name in IGNORED or name in REFUSED or name in CONFIG_PATH or name == "-m":
        return True
    return word.startswith(("-m", "-c")) and not word.startswith("--")  # -msynapse.app.homeserver, -c/data/x


def _split_host(words: list[str]) -> tuple[list[str], list[str]]:
    """Our own `--host NAME` (run's only option) apart from the rest."""
    ours: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(words):
        if words[i] == "--host" and i + 1 < len(words):
            ours += words[i : i + 2]
            i += 2
            continue
        if words[i].startswith("--host="):
            ours.append(words[i])
        else:
            rest.append(words[i])
        i += 1
    return ours, rest


def _options(words: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """(option, value) pairs in Synapse's syntax (`--opt VALUE`, `--opt=VALUE`, `-cVALUE`), and the words that
    are not Synapse's options."""
    pairs: list[tuple[str, str | None]] = []
    unknown: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        name, joined = word, None
        if word.startswith("--") and "=" in word:
            name, joined = word.split("=", 1)
        elif word.startswith(("-m", "-c", "-d", "-f", "-H")) and not word.startswith("--") and len(word) > 2:
            name, joined = word[:2], word[2:]
        takes = name in ("-m", *CONFIG_PATH) or IGNORED.get(name, False) or REFUSED.get(name, (False, ""))[0]
        if name not in IGNORED and name not in REFUSED and name not in CONFIG_PATH and name != "-m":
            unknown.append(word)
            i += 1
            continue
        if takes and joined is None:
            if i + 1 >= len(words):
                unknown.append(word)
                break
            joined = words[i + 1]
            i += 1
        pairs.append((name, joined))
        i += 1
    return pairs, unknown


CONFIG_PATH_VAR = Variable("SYNAPSE_CONFIG_PATH")
CONFIG_DIR_VAR = Variable("SYNAPSE_CONFIG_DIR")
WORKER_TYPES = Variable("SYNAPSE_WORKER_TYPES")


def _start(argv: list[str], words: list[str], env: Mapping[str, str], given: str) -> Translation:
    pairs, unknown = _options(words)
    problems: list[str] = []
    if unknown:
        problems.append(
            Problem(
                f"{shlex.join(unknown)}: not an argument of synapse-workers nor of the official Synapse image. "
                "Expected a command of ours (`synapse-workers --help` lists them); arguments a template carried for "
                "the official image (`-m synapse.app.homeserver`, `--config-path FILE`) may simply be removed.",
                Argument(shlex.join(unknown)),
                expected="a command of synapse-workers, or the official image's arguments",
                found=shlex.join(unknown),
            )
        )
    for name, value in pairs:
        if name == "-m" and value != HOMESERVER_MODULE:
            problems.append(
                Problem(
                    f"-m {value}: this image runs main and every worker itself ({WORKER_TYPES}), in one container; "
                    f"expected no -m, or -m {HOMESERVER_MODULE}. Run one container of it, not one per worker.",
                    Argument(f"-m {value}"),
                    expected=f"no -m, or -m {HOMESERVER_MODULE}",
                    found=f"-m {value}",
                    related=(WORKER_TYPES,),
                )
            )
        elif name in REFUSED:
            shown = name if value is None else f"{name} {value}"
            problems.append(
                Problem(
                    f"{shown} (an option of Synapse's) cannot be followed here: {REFUSED[name][1]}.",
                    Argument(shown),
                    expected="no such option",
                    found=shown,
                )
            )
    updates, notes = _config_path([v for n, v in pairs if n in CONFIG_PATH and v is not None], env, problems)
    if problems:
        raise UserError(*problems)
    warnings: list[str] = [
        Problem(
            f"ignored the arguments `{given}`, written for the official Synapse image (e.g. an Unraid template's "
            "Post Arguments): this image starts main, its workers and nginx itself (`run`); remove them from the "
            "template.",
            Argument(given),
            expected="no arguments, or a command of synapse-workers",
            found=given,
        )
    ]
    return Translation(argv, updates, warnings + notes)


def _config_path(paths: list[str], env: Mapping[str, str], problems: list[str]) -> tuple[dict[str, str], list[str]]:
    if not paths:
        return {}, []
    if len(set(paths)) > 1:
        problems.append(
            Problem(
                f"--config-path given {len(paths)} times ({', '.join(paths)}): synapse-workers reads one "
                f"homeserver.yaml ({CONFIG_PATH_VAR}). Expected the settings merged into one file, and that file "
                "alone.",
                Argument("--config-path"),
                expected="one --config-path",
                found=", ".join(paths),
                related=(CONFIG_PATH_VAR,),
            )
        )
        return {}, []
    path = paths[0]
    if not os.path.isabs(path):
        problems.append(
            Problem(
                f"--config-path {path}: expected an absolute path, such as /data/homeserver.yaml.",
                Argument(f"--config-path {path}"),
                expected="an absolute path",
                found=path,
            )
        )
        return {}, []
    given = (env.get(CONFIG_PATH_VAR.name) or "").strip()
    config_dir = (env.get(CONFIG_DIR_VAR.name) or "").strip() or str(VARIABLES[CONFIG_DIR_VAR.name].default)
    used = given or f"{config_dir}/homeserver.yaml"
    if os.path.normpath(path) == os.path.normpath(used):
        return {}, []  # the file we read anyway
    if given:
        problems.append(
            Problem(
                f"--config-path {path} and {CONFIG_PATH_VAR}={given} name different files: expected one "
                f"homeserver.yaml. Remove the argument, or set {CONFIG_PATH_VAR} to the file you mean.",
                Argument(f"--config-path {path}"),
                expected=f"the file of {CONFIG_PATH_VAR} ({given})",
                found=path,
                related=(CONFIG_PATH_VAR,),
            )
        )
        return {}, []
    return {CONFIG_PATH_VAR.name: path}, [
        Problem(
            f"--config-path {path}: used as {CONFIG_PATH_VAR}={path} (the official image starts Synapse with that "
            f"file); set {CONFIG_PATH_VAR} instead of the argument.",
            Argument(f"--config-path {path}"),
            expected=f"{CONFIG_PATH_VAR} instead",
            found=path,
            related=(CONFIG_PATH_VAR,),
        )
    ]


if __name__ == "__main__":  # scripts/container-entrypoint.sh: exit 0 when its arguments start the stack
    import sys

    sys.exit(0 if starts_stack(sys.argv[1:], os.environ) else 1)
