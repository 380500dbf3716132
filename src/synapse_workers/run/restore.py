"""`synapse-workers restore PATH`: a backup (run/backup.py) put back where the environment says.

The target is named by the environment as for `run` (SYNAPSE_DATA_DIR, SYNAPSE_CONFIG_PATH, SYNAPSE_RUNTIME_DIR,
SYNAPSE_MEDIA_STORE_PATH, UID/GID). Refused (exit 2, nothing written) when the data dir is not empty,
homeserver.yaml or a non-empty media store already exists there, the backup fails verification, SYNAPSE_SERVER_NAME
names another server, the dump is of a newer PostgreSQL major than the target (or written by a newer pg_dump than
the installed pg_restore reads: run/postgres.dump_major_problems), or (an external database) the target database is
not empty. Otherwise every file is put back (paths in homeserver.yaml and our log config moved from the backed-up
server's directories to the target's), owned by Synapse's UID/GID, and the database restored: the embedded cluster
is created (run/postgres.py: initdb, role and database with the restored password) and `pg_restore` fills it through
a temporary postmaster on a private socket dir; an external database is filled by `pg_restore` as Synapse's user;
SQLite is a file like the others. A restore that fails after it began writing removes what it wrote (the target is
empty again).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import yaml

from ..errors import Argument, File, Problem, UserError, Variable
from ..homeserver import GENERATED_LOG_CONFIG
from ..layout import make_layout
from ..programs import child_environment
from ..settings import Settings, load_settings
from .backup import (
    CONFIG_FILE,
    DUMP,
    SQLITE_COPY,
    BackupError,
    Progress,
    connect,
    conninfo,
    hash_file,
    passfile,
    pg_tool,
    read_manifest,
    run_pg_tool,
    verify,
)

DATA_DIR, CONFIG_PATH = Variable("SYNAPSE_DATA_DIR"), Variable("SYNAPSE_CONFIG_PATH")
SERVER_NAME, MEDIA_STORE = Variable("SYNAPSE_SERVER_NAME"), Variable("SYNAPSE_MEDIA_STORE_PATH")
BACKUP = Argument("PATH")


# ---- where things go ------------------------------------------------------------------------------------------


def _norm(path: str) -> str:
    return os.path.normpath(path)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def relocation(roots: Mapping[str, Any], settings: Settings) -> dict[str, str]:
    """Backed-up server's directory → the target's (identity entries dropped): data dir, config dir, runtime dir
    (the embedded cluster's socket dir is under it), media store."""
    core = settings.core
    data, target_data = _norm(roots["data_dir"]), _norm(core.data_dir)
    mapping = {
        data: target_data,
        os.path.dirname(_norm(roots["config_path"])): os.path.dirname(_norm(core.homeserver_config_path)),
        _norm(roots["runtime_dir"]): _norm(core.runtime_dir),
    }
    media = _norm(roots["media_store"])
    if settings.homeserver.media_store_path:
        mapping[media] = _norm(settings.homeserver.media_store_path)
    elif _inside(media, data):
        mapping[media] = target_data + media[len(data) :]
    return {k: v for k, v in mapping.items() if k != v}


def relocate(path: str, mapping: Mapping[str, str]) -> str:
    """A path of the backed-up server at the target (longest matching directory first)."""
    path = _norm(path)
    for old in sorted(mapping, key=len, reverse=True):
        if _inside(path, old):
            return mapping[old] + path[len(old) :]
    return path


MARKER_PATHS = ("sqlite_database", "postgres_data_dir")  # port-sqlite's marker: absolute paths of the server


def rewrite_marker(text: str, mapping: Mapping[str, str], config: str) -> str:
    """port-sqlite's marker (Layout.sqlite_port_marker) with its paths moved as homeserver.yaml's are: `load` refuses
    a marker naming another SQLite file than homeserver.yaml does. A marker we cannot read stays as it is (`run`
    then names it)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    if not isinstance(doc, dict):
        return text
    for key in MARKER_PATHS:
        if isinstance(doc.get(key), str):
            doc[key] = relocate(doc[key], mapping)
    if isinstance(doc.get("homeserver_yaml"), str):
        doc["homeserver_yaml"] = config
    return json.dumps(doc, indent=2) + "\n"


def rewrite_paths(text: str, mapping: Mapping[str, str]) -> str:
    """Text (homeserver.yaml, our log config) with every path under a moved directory moved; comments kept."""
    if not mapping:
        return text
    olds = sorted(mapping, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w./-])(" + "|".join(re.escape(o) for o in olds) + r")(?=[/\s\"',\]}]|$)", re.M)
    return pattern.sub(lambda m: mapping[m.group(1)], text)


@dataclass(frozen=True)
class Target:
    """Where each file of the backup goes (absolute path), and the relocated homeserver.yaml."""

    places: dict[str, str]  # manifest path → target path (database.dump: not a file of the server)
    rewritten: dict[str, str]  # manifest path → its new text (paths moved)
    homeserver: dict[str, Any]  # the relocated homeserver.yaml, parsed
    media: str
    skip_existing: frozenset[str]  # extras already there with the same content


def plan_target(backup: Path, doc: dict[str, Any], settings: Settings) -> tuple[Target, list[Problem]]:
    """Where everything goes and what refuses the restore (nothing written)."""
    core = settings.core
    roots = doc["roots"]
    mapping = relocation(roots, settings)
    data, config = _norm(core.data_dir), _norm(core.homeserver_config_path)
    media = relocate(roots["media_store"], mapping)
    extras = {e["file"]: e["path"] for e in doc.get("extras", [])}
    sqlite = doc["database"].get("path")
    source_text = (backup / CONFIG_FILE).read_text(encoding="utf-8")
    text = rewrite_paths(source_text, mapping)
    try:
        homeserver = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(Problem(f"{backup / CONFIG_FILE} cannot be read as YAML: {exc}", BACKUP)) from None
    log_config = homeserver.get("log_config") if isinstance(homeserver, dict) else None
    marker = make_layout(core.runtime_dir, data).sqlite_port_marker
    places: dict[str, str] = {}
    rewritten = {CONFIG_FILE: text}
    for raw in doc["files"]:
        name = raw["path"]
        if name == DUMP:
            continue
        if name == CONFIG_FILE:
            places[name] = config
        elif name == SQLITE_COPY:
            places[name] = relocate(sqlite, mapping)
        elif name.startswith("data/"):
            places[name] = os.path.join(data, name[len("data/") :])
        elif name.startswith("media/"):
            places[name] = os.path.join(media, name[len("media/") :])
        elif name in extras:
            places[name] = relocate(extras[name], mapping)
        else:
            raise UserError(Problem(f"{backup}: the manifest lists {name}, which no part of a backup holds", BACKUP))
        if isinstance(log_config, str) and places[name] == _norm(log_config):
            original = (backup / name).read_text(encoding="utf-8", errors="replace")
            if original.startswith(GENERATED_LOG_CONFIG):  # ours: its log file paths move too
                rewritten[name] = rewrite_paths(original, mapping)
        if places[name] == marker:
            rewritten[name] = rewrite_marker((backup / name).read_text(encoding="utf-8"), mapping, config)
    problems: list[Problem] = []
    if os.path.isdir(data) and os.listdir(data):
        problems.append(
            Problem(
                f"{DATA_DIR}={data!r} is not empty: restore puts a backup into an empty (or new) data dir only, "
                "so that nothing there is overwritten or mixed with the backup's files.",
                DATA_DIR,
                expected="an empty or missing directory",
                found=f"{len(os.listdir(data))} entries",
            )
        )
    elif os.path.exists(data) and not os.path.isdir(data):
        problems.append(Problem(f"{DATA_DIR}={data!r} is not a directory.", DATA_DIR, expected="a directory"))
    if os.path.lexists(config) and not _inside(config, data):
        problems.append(
            Problem(
                f"{CONFIG_PATH}={config!r} already exists: restore writes the backup's homeserver.yaml there and "
                "overwrites none. Move it away, or point the variable at a new path.",
                CONFIG_PATH,
                expected="no file there yet",
                found="an existing file",
            )
        )
    if not _inside(media, data) and os.path.isdir(media) and os.listdir(media):
        problems.append(
            Problem(
                f"The media store {media!r} (where the backup's media go: {MEDIA_STORE}, or the backed-up path) is "
                "not empty.",
                MEDIA_STORE,
                expected="an empty or missing directory",
                found=f"{len(os.listdir(media))} entries",
            )
        )
    skip = set()
    for name, path in places.items():
        if _inside(path, data) or _inside(path, media) or path == config or not os.path.lexists(path):
            continue
        if os.path.isfile(path) and hash_file(path)[1] == hash_file(backup / name)[1]:
            skip.add(name)  # an appservice file or log config already there, identical
            continue
        problems.append(
            Problem(
                f"{path} exists and differs from the backup's copy ({name}): restore overwrites nothing.",
                File(path),
                expected="no file, or the same content",
                found="a different file",
            )
        )
    target = Target(places, rewritten, homeserver if isinstance(homeserver, dict) else {}, media, frozenset(skip))
    return target, problems


# ---- writing, with a way back ---------------------------------------------------------------------------------


class Undo:
    """What this restore created (files, then directories), removed again when it fails."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def mkdirs(self, path: str, owner: tuple[int, int] | None) -> None:
        missing = []
        here = _norm(path)
        while not os.path.lexists(here):
            missing.append(here)
            here = os.path.dirname(here)
        for directory in reversed(missing):
            os.mkdir(directory, 0o755)
            self.paths.append(directory)
            if owner is not None:
                os.chown(directory, *owner)

    def rollback(self) -> None:
        for path in reversed(self.paths):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)


def put_files(backup: Path, doc: dict[str, Any], target: Target, owner: tuple[int, int] | None, undo: Undo) -> int:
    """Every file at its place (mode and mtime from the manifest; Synapse's owner as root). Returns bytes written."""
    written = 0
    undo.mkdirs(target.media, owner)
    entries = {raw["path"]: raw for raw in doc["files"]}
    for name, path in sorted(target.places.items()):
        if name in target.skip_existing:
            continue
        undo.mkdirs(os.path.dirname(path), owner)
        undo.paths.append(path)
        if name in target.rewritten:
            with open(path, "x", encoding="utf-8") as handle:
                handle.write(target.rewritten[name])
        else:
            with open(backup / name, "rb") as src, open(path, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        raw = entries[name]
        os.chmod(path, int(raw.get("mode", 0o600)))
        if raw.get("mtime_ns"):
            os.utime(path, ns=(int(raw["mtime_ns"]), int(raw["mtime_ns"])))
        if owner is not None:
            os.chown(path, *owner)
        written += os.path.getsize(path)
    return written


# ---- the database ---------------------------------------------------------------------------------------------


def _external_args(
    target: Target, backup: Path, doc: dict[str, Any], settings: Settings
) -> tuple[dict[str, Any], str | None]:
    """psycopg2 arguments for the restored homeserver.yaml's external database, and the backup's copy of the
    passfile it names (read before that file is restored) — or POSTGRES_PASSWORD when the environment gives it."""
    db = target.homeserver.get("database") or {}
    args = {k: v for k, v in (db.get("args") or {}).items() if not str(k).startswith("cp_")}
    named = args.get("passfile")
    password = settings.database.password
    if password is not None and named:
        args.pop("passfile")
        return args, password.get_secret_value()
    if named:
        for name, path in target.places.items():
            if path == _norm(str(named)):
                args["passfile"] = str(backup / name)
    return args, None


def _external_check(
    args: dict[str, Any], password: str | None, path: str, dump: Mapping[str, Any]
) -> tuple[str, str | None]:
    """The target database's conninfo and password, refused (exit 2) unless it answers, is empty, and is of the
    dump's major or newer."""
    import psycopg2

    from . import postgres

    if password is not None:
        args = {**args, "password": password}
    try:
        conn, db = connect(args)
    except BackupError as exc:
        raise UserError(Problem(f"restore: {exc}", BACKUP, expected="a reachable, empty target database")) from None
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' "
                "AND n.nspname NOT LIKE 'pg_temp%'"
            )
            relations = int(cur.fetchone()[0])
    except psycopg2.Error as exc:
        raise UserError(Problem(f"restore: cannot inspect the {db.where}: {exc}", BACKUP)) from None
    finally:
        conn.close()
    if relations:
        raise UserError(
            Problem(
                f"restore: the {db.where} is not empty ({relations} tables, sequences or indexes): a backup is "
                "restored into an empty database only. Drop and recreate it (CREATE DATABASE ... OWNER ...; "
                "ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0), or name another one in "
                "homeserver.yaml's database section.",
                BACKUP,
                expected="an empty database",
                found=f"{relations} relations in {db.dbname!r}",
            )
        )
    refusal = postgres.dump_major_problems(
        path, dump.get("postgres_major"), dump.get("pg_dump_major"), f"the {db.where}", db.server_major,
        _restore_tool(), BACKUP,
    )  # fmt: skip
    if refusal:
        raise UserError(*refusal)
    return db.conninfo(), db.password


def _restore_tool() -> tuple[str, int]:
    """pg_restore (the newest installed) and its major, refused (exit 2) before anything is written when missing."""
    try:
        return pg_tool("pg_restore")
    except BackupError as exc:
        raise UserError(Problem(f"restore: {exc}", BACKUP, expected="pg_restore installed")) from None


def pg_restore(dump: Path, dsn: str, password: str | None, passfile_path: str | None, progress: Progress) -> None:

    tool, major = pg_tool("pg_restore")
    progress.say(f"database: pg_restore {major} of {dump.name} ({dump.stat().st_size / (1 << 20):.1f} MiB)")
    started = time.monotonic()
    command = [
        tool, "--no-password", "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction",
        f"--dbname={dsn}", str(dump),
    ]  # fmt: skip
    with passfile(password) as temporary:
        code, text = run_pg_tool(
            command,
            "synapse-workers restore",
            temporary or passfile_path,
            progress,
            lambda: f"database: restoring, {time.monotonic() - started:.0f} s",
        )
    if code != 0:
        raise BackupError(f"pg_restore failed (exit {code}): {text}")
    progress.say(f"database: restored in {time.monotonic() - started:.1f} s")


@contextmanager
def temporary_postmaster(data_dir: str, socket_dir: str, owner: Any, as_root: bool, setpriv: str) -> Iterator[None]:
    """The embedded cluster started on a private socket dir (no TCP) for the restore; stopped afterwards."""
    from . import postgres

    bindir = postgres.postgres_bin()
    prefix = postgres._as_owner(owner, as_root, setpriv)
    log = os.path.join(socket_dir, "postmaster.log")
    env = child_environment(os.environ)
    options = f"-k {socket_dir} -c listen_addresses=''"
    start = [*prefix, f"{bindir}/pg_ctl", "-D", data_dir, "-l", log, "-w", "-t", "120", "-o", options, "start"]
    result = subprocess.run(start, capture_output=True, text=True, cwd="/", env=env, check=False)
    try:
        if result.returncode != 0:
            tail = Path(log).read_text(errors="replace")[-2000:] if os.path.exists(log) else ""
            raise BackupError(f"the embedded cluster did not start for the restore: {result.stderr.strip()} {tail}")
        yield
    finally:
        stop = [*prefix, f"{bindir}/pg_ctl", "-D", data_dir, "-m", "fast", "-w", "-t", "120", "stop"]
        if result.returncode == 0:
            subprocess.run(stop, capture_output=True, text=True, cwd="/", env=env, check=False)


def restore_embedded(env: Mapping[str, str], dump: Path, progress: Progress) -> None:
    """initdb (run/postgres.py), the role and database with the restored passfile's password, then pg_restore;
    all on a private socket dir (the runtime dir stays as it was: `run` refuses one holding what it did not make)."""
    from ..load import load_plan
    from . import postgres
    from .binaries import find

    plan = load_plan(env)
    if plan.postgres is None:
        raise BackupError(
            f"the backup holds the embedded cluster's database, but the restored {plan.homeserver.path} does not "
            "name the embedded cluster here"
        )
    as_root = os.geteuid() == 0
    setpriv = find("setpriv") if as_root else ""
    progress.say(f"database: creating the embedded cluster in {plan.postgres.data_dir}")
    socket_dir = tempfile.mkdtemp(prefix="sw-restore-pg-")
    try:
        private = replace(plan, postgres=replace(plan.postgres, socket_dir=socket_dir))
        owner = postgres.prepare_cluster(private, as_root, setpriv)  # initdb; the socket dir made the owner's
        with temporary_postmaster(plan.postgres.data_dir, socket_dir, owner, as_root, setpriv):
            postgres.ensure_database(private, owner, as_root, setpriv)
            dsn = conninfo(host=socket_dir, dbname="synapse", user="synapse")
            pg_restore(dump, dsn, None, plan.secrets.postgres, progress)
            # A dump carries no planner statistics (pg_dump before 18): without them a large server plans badly until
            # autovacuum gets to every table (upgrade-postgres analyzes too).
            analyze = postgres.psql_as_owner(
                postgres.postgres_bin(), socket_dir, owner, as_root, setpriv, "\\connect synapse\nANALYZE;\n"
            )
            if analyze.returncode != 0:
                raise BackupError(f"ANALYZE after the restore failed: {analyze.stderr.strip()}")
            progress.say("database: statistics rebuilt (ANALYZE)")
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


# ---- the command ----------------------------------------------------------------------------------------------


def run_restore(env: Mapping[str, str], path: str, stream: TextIO | None = None) -> int:
    progress = Progress(stream, prefix="restore")
    settings = load_settings(env)
    backup = Path(path)
    problems = verify(backup)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UserError(
            Problem(
                f"restore: {path} fails verification ({len(problems)} differences): {shown}. Nothing was restored.",
                BACKUP,
                expected="a complete backup whose files match its manifest (backup --verify)",
                found=shown,
            )
        )
    doc = read_manifest(backup)
    assert doc is not None
    server_name = str(doc.get("server_name"))
    wanted = settings.core.server_name
    if wanted and wanted != server_name:
        raise UserError(
            Problem(
                f"{SERVER_NAME}={wanted!r} but {path} is a backup of {server_name!r}: a server keeps its name. "
                f"Unset {SERVER_NAME} or make them equal.",
                SERVER_NAME,
                expected=f"unset, or {server_name!r}",
                found=repr(wanted),
            )
        )
    target, refusals = plan_target(backup, doc, settings)
    if refusals:
        raise UserError(*refusals)
    database = doc["database"]
    external: tuple[str, str | None] | None = None
    if database["kind"] == "postgres" and not database.get("embedded"):
        args, password = _external_args(target, backup, doc, settings)
        external = _external_check(args, password, path, database)
    elif database.get("embedded"):
        from . import postgres

        bindir = postgres.postgres_bin()  # refused (exit 2) before anything is written
        postgres.cluster_owner(os.geteuid() == 0)
        # The cluster restore makes is the newest installed major's: a dump of a newer one is refused here, not
        # after initdb by pg_restore.
        newest = postgres.major_key(list(postgres.installed_majors())[-1])[0]
        target_name = f"the embedded cluster restore would make here (the newest PostgreSQL installed, {bindir})"
        refusal = postgres.dump_major_problems(
            path, database.get("postgres_major"), database.get("pg_dump_major"), target_name, newest,
            _restore_tool(), BACKUP,
        )  # fmt: skip
        if refusal:
            raise UserError(*refusal)
    owner = (settings.core.uid, settings.core.gid) if os.geteuid() == 0 else None
    undo = Undo()
    started = time.monotonic()
    try:
        undo.mkdirs(settings.core.data_dir, owner)
        written = put_files(backup, doc, target, owner, undo)
        progress.say(
            f"files: {len(target.places) - len(target.skip_existing)} put back ({written / (1 << 20):.1f} MiB)"
        )
        if database.get("embedded"):
            undo.paths.append(os.path.join(_norm(settings.core.data_dir), "postgres"))
            restore_embedded(env, backup / DUMP, progress)
        elif external is not None:
            dsn, password = external
            pg_restore(backup / DUMP, dsn, password, None, progress)
    except BaseException as exc:
        undo.rollback()
        if isinstance(exc, BackupError):
            progress.say(f"FAILED: {exc} (what this restore wrote was removed)")
            return exc.code
        raise
    progress.say(
        f"done: {server_name} from {path} into {settings.core.data_dir} in {time.monotonic() - started:.1f} s; "
        "start it with `synapse-workers run`"
    )
    return 0
