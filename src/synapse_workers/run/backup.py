"""Backups of a running stack (`synapse-workers backup -o DIR [--keep N]`) and their check (`backup --verify`).

A backup is a directory `DIR/<UTC stamp>/` (written as `DIR/.partial-<stamp>/`, renamed once complete):

    manifest.json     every other file: relative path, size, sha256, mode; format, versions, server_name,
                      the database (kind, PostgreSQL major of the dump), where each part came from (`roots`)
    database.dump     PostgreSQL: one `pg_dump --format=custom` snapshot (embedded cluster or external database,
                      connected as Synapse is: its own config files' `database` section, password via a passfile)
    database.sqlite   SQLite: a consistent copy made with SQLite's online backup API
    config/homeserver.yaml
    data/...          the data dir's files except the cluster dir, the media store, logs/, Prometheus's database
                      (and the live SQLite file, copied above)
    files/<n>/<name>  files outside the data dir that the server reads: its log config, appservice registrations,
                      key files (their original paths are in the manifest's `extras`)
    media/...         the media store; a file unchanged since the newest complete backup in DIR (same size and
                      modification time as that manifest records) is a hard link to that backup's copy

Every run, ok or failed, writes its outcome to `state/backup.json` (Layout.backup_status) when the runtime dir's
state dir exists; a flock on `state/backup.lock` keeps two runs apart. pg_dump and the copy run at a lower CPU and
I/O priority (nice 10, best-effort I/O class level 7), and so does the embedded cluster's backend serving the dump.
Restore: run/restore.py.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .. import __version__
from ..catalog import SYNAPSE_VERSION
from ..plan import Plan
from ..programs import child_environment
from ..secrets import passfile_line
from . import flock
from .flock import LOCKED

FORMAT = 1
MANIFEST = "manifest.json"
PARTIAL = ".partial-"
DUMP = "database.dump"
SQLITE_COPY = "database.sqlite"
CONFIG_FILE = "config/homeserver.yaml"
APPLICATION_NAME = "synapse-workers backup"  # pg_stat_activity names the dump's backend so
NICE = 10
STAMP = re.compile(r"\d{8}T\d{6}Z")
STALE_NOTE = (
    "port-sqlite moved this server's SQLite database into the embedded PostgreSQL: its database is database.dump. "
    "The SQLite file (stale_copy, among the data dir's files) is as it was at the port; it is kept so that the "
    "server can go back to SQLite by removing the marker (without what was written since the port)"
)
CHUNK = 1 << 20


class BackupError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def stamp(when: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


# ---- progress -------------------------------------------------------------------------------------------------


class Progress:
    """Lines on stderr: `say` always, `tick` at most every `interval` seconds (long steps)."""

    def __init__(self, stream: TextIO | None = None, interval: float = 2.0, prefix: str = "backup"):
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.prefix = prefix
        self._last = 0.0

    def say(self, text: str) -> None:
        print(f"synapse-workers: {self.prefix}: {text}", file=self.stream, flush=True)
        self._last = time.monotonic()

    def tick(self, text: Callable[[], str]) -> None:
        if time.monotonic() - self._last >= self.interval:
            self.say(text())


def mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


# ---- files and manifests --------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One file of a backup: its path relative to the backup dir, size, sha256, mode and (the source's) mtime."""

    path: str
    size: int
    sha256: str
    mode: int = 0o600
    mtime_ns: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "mode": self.mode,
            "mtime_ns": self.mtime_ns,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(
            str(data["path"]), int(data["size"]), str(data["sha256"]), int(data.get("mode", 0o600)),
            int(data.get("mtime_ns", 0)),
        )  # fmt: skip


def hash_file(path: str | Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def copy_file(source: str | Path, target: Path, on_block: Callable[[int], None] | None = None) -> tuple[int, str]:
    """Copy (a new file, never over one), hashing what is written; fsynced. Returns (size, sha256)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as src, open(target, "xb") as dst:
        while block := src.read(CHUNK):
            digest.update(block)
            dst.write(block)
            size += len(block)
            if on_block is not None:
                on_block(len(block))
        dst.flush()
        os.fsync(dst.fileno())
    return size, digest.hexdigest()


def safe_relative(path: str) -> bool:
    """A manifest path: relative, normalised, inside the backup dir."""
    return (
        bool(path) and not path.startswith("/") and os.path.normpath(path) == path and not path.startswith("..")
    ) and path != MANIFEST


def read_manifest(backup: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete backup of ours, or None (missing, unreadable, not ours)."""
    try:
        with open(Path(backup) / MANIFEST, encoding="utf-8") as handle:
            doc = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), list):
        return None
    return doc


def listing(root: str | Path, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, str]]:
    """(absolute path, path relative to root) of every regular file under root, sorted; symlinks, sockets and the
    absolute paths in `skip` (files or whole directories) are left out."""
    root = os.path.normpath(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if os.path.join(dirpath, d) not in skip and not os.path.islink(os.path.join(dirpath, d))
        )
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if path in skip:
                continue
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
            except FileNotFoundError:  # gone meanwhile (a live data dir)
                continue
            yield path, os.path.relpath(path, root)


def verify(backup: str | Path) -> list[str]:
    """What differs between a backup dir and its manifest: every file rechecked (size, sha256), nothing missing,
    nothing extra. [] when it is intact."""
    backup = Path(backup)
    if not backup.is_dir():
        return [f"{backup} is not a directory"]
    doc = read_manifest(backup)
    if doc is None:
        return [f"{backup / MANIFEST} is missing or not a synapse-workers backup manifest (format {FORMAT})"]
    problems: list[str] = []
    wanted: dict[str, Entry] = {}
    for raw in doc["files"]:
        try:
            entry = Entry.from_json(raw)
        except (KeyError, TypeError, ValueError):
            problems.append(f"manifest entry not understood: {raw!r}")
            continue
        if not safe_relative(entry.path):
            problems.append(f"manifest names a path outside the backup: {entry.path!r}")
            continue
        wanted[entry.path] = entry
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(backup):
        for name in sorted(filenames) + sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))):
            path = os.path.join(dirpath, name)
            relative = os.path.relpath(path, backup)
            if relative == MANIFEST:
                continue
            if not stat.S_ISREG(os.lstat(path).st_mode):
                problems.append(f"not a regular file: {relative}")
                continue
            found.add(relative)
    for relative in sorted(found - set(wanted)):
        problems.append(f"extra file (not in the manifest): {relative}")
    for relative, entry in sorted(wanted.items()):
        if relative not in found:
            problems.append(f"missing: {relative}")
            continue
        size, digest = hash_file(backup / relative)
        if size != entry.size:
            problems.append(f"size differs: {relative} (manifest {entry.size} bytes, found {size})")
        elif digest != entry.sha256:
            problems.append(f"content differs: {relative} (sha256 {digest}, manifest {entry.sha256})")
    return problems


def complete_backups(directory: str | Path) -> list[Path]:
    """The complete backups in a destination, oldest first: `<stamp>` directories holding our manifest."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STAMP.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted((p for p in found if read_manifest(p) is not None), key=lambda p: p.name)


def prune(directory: str | Path, keep: int) -> list[Path]:
    """Remove the oldest complete backups beyond `keep`; anything else in the directory is left alone."""
    backups = complete_backups(directory)
    removed = backups[: max(0, len(backups) - keep)]
    for path in removed:
        shutil.rmtree(path)
    return removed


# ---- what a backup holds --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    kind: str  # "postgres" or "sqlite"
    args: dict[str, Any]  # psycopg2 arguments (PostgreSQL)
    sqlite_path: str | None = None
    embedded: bool = False  # our cluster under the data dir


@dataclass(frozen=True)
class Sources:
    """Where the parts of a backup come from (a running stack's plan, read once)."""

    server_name: str
    data_dir: str
    config_path: str
    media_store: str
    runtime_dir: str
    skip: frozenset[str]  # absolute paths under the data dir not copied as data/ (dirs or files)
    extras: tuple[str, ...]  # files outside the data dir the server reads
    database: Database
    ported: dict[str, Any] | None = None  # `port-sqlite`'s marker: the sqlite3 file's database is the embedded cluster

    def roots(self) -> dict[str, Any]:
        return {
            "data_dir": self.data_dir,
            "config_path": self.config_path,
            "media_store": self.media_store,
            "runtime_dir": self.runtime_dir,
            "sqlite": self.database.sqlite_path,
        }


def _absolute(path: str) -> str:
    """A path of homeserver.yaml as Synapse resolves it (relative to its working directory, as run/access.py)."""
    return os.path.normpath(os.path.join(os.getcwd(), path))


def _inside(path: str, root: str) -> bool:
    path, root = os.path.normpath(path), os.path.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def sources(plan: Plan, output: str) -> Sources:
    """What to back up: from the plan and Synapse's own config files (the database as Synapse connects to it)."""
    from .compressor import CompressorError, database_section

    hs, core, layout = plan.homeserver, plan.settings.core, plan.layout
    if not hs.exists:
        raise BackupError(f"{hs.path} does not exist: there is no server to back up yet", 2)
    data_dir = os.path.normpath(core.data_dir)
    media = _absolute(hs.media_store_path or "media_store")
    configs = [p for p in plan.main.config_files if os.path.exists(p)]
    try:
        name, args, where = database_section(configs)
    except CompressorError as exc:
        raise BackupError(str(exc)) from None
    sqlite_path = None
    if name == "sqlite3":
        sqlite_path = _absolute(str(args.get("database") or "homeserver.db"))
        database = Database("sqlite", {}, sqlite_path)
    elif name in ("psycopg2", "psycopg"):
        pg_args = {k: v for k, v in args.items() if not k.startswith("cp_")}
        database = Database("postgres", pg_args, embedded=plan.postgres is not None)
    else:
        raise BackupError(f"{where}: database engine {name!r} is neither psycopg2 nor sqlite3")
    skip = {
        layout.postgres_data_dir,
        media,
        layout.logs_on_disk,
        layout.prometheus_data,
        os.path.normpath(output),
        os.path.normpath(core.runtime_dir),
        os.path.normpath(core.homeserver_config_path),
    }
    if sqlite_path:
        skip |= {sqlite_path + suffix for suffix in ("", "-wal", "-shm", "-journal")}
    extras = [hs.log_config, hs.user_log_config, hs.signing_key_path, *(p for _, p in hs.key_files)]
    extras += [*plan.app_service_config_files]
    wanted = []
    for extra in extras:
        if not extra:
            continue
        path = _absolute(extra)
        if not _inside(path, data_dir) and path not in wanted and os.path.isfile(path) and path not in skip:
            wanted.append(path)
    ported = None
    if hs.sqlite_port is not None and hs.sqlite_port.sqlite_database is not None:
        stale = os.path.normpath(hs.sqlite_port.sqlite_database)
        kept = _inside(stale, data_dir) and os.path.isfile(stale)  # then listing() copies it as a data file
        ported = {
            "marker": f"data/{os.path.relpath(layout.sqlite_port_marker, data_dir)}",
            "sqlite_database": stale,
            "ported_at": hs.sqlite_port.ported_at,
            "stale_copy": f"data/{os.path.relpath(stale, data_dir)}" if kept else None,
            "note": STALE_NOTE,
        }
    return Sources(
        server_name=hs.server_name,
        data_dir=data_dir,
        config_path=os.path.normpath(core.homeserver_config_path),
        media_store=media,
        runtime_dir=os.path.normpath(core.runtime_dir),
        skip=frozenset(os.path.normpath(p) for p in skip),
        extras=tuple(wanted),
        database=database,
        ported=ported,
    )


# ---- priority -------------------------------------------------------------------------------------------------

IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "i686": 289, "armv7l": 314}
IOPRIO_BEST_EFFORT_LOWEST = (2 << 13) | 7  # IOPRIO_CLASS_BE, level 7


def lower_priority(pid: int = 0) -> None:
    """nice 10 and the lowest best-effort I/O priority for a process (0: this one, inherited by its children).
    Never fails: a priority we cannot set leaves the backup slower for others, not broken."""
    try:
        current = os.getpriority(os.PRIO_PROCESS, pid)
        if current < NICE:
            os.setpriority(os.PRIO_PROCESS, pid, NICE)
    except OSError:
        pass
    number = IOPRIO_SET.get(platform.machine())
    if number is None:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(number, 1, pid, IOPRIO_BEST_EFFORT_LOWEST)  # IOPRIO_WHO_PROCESS
    except (OSError, AttributeError):
        pass


# ---- the database ---------------------------------------------------------------------------------------------


def pg_tool(name: str, server_major: int | None = None) -> tuple[str, int]:
    """The PostgreSQL client program `name` of the newest major installed (Debian's PG_ROOT/<major>/bin), and that
    major: never the embedded cluster's own binaries when it is older (run/postgres.postgres_bin), since a pg_dump
    dumps servers of its own major and older ones, never newer ones, and a pg_restore reads the archives of its own
    and older pg_dumps. Refused when the newest is older than the server."""
    from .postgres import PG_ROOT, major_key

    found = []
    for path in glob.glob(f"{PG_ROOT}/*/bin/{name}"):
        key = major_key(path.split("/")[-3])
        if key and os.access(path, os.X_OK):
            found.append((key, path))
    if not found:
        on_path = shutil.which(name)
        if on_path is None:
            raise BackupError(f"{name} is not installed (apt-get install postgresql-client)")
        out = subprocess.run([on_path, "--version"], capture_output=True, text=True, check=False).stdout
        match = re.search(r"(\d+)(?:\.\d+)?", out)
        found.append(((int(match.group(1)) if match else 0,), on_path))
    key, path = max(found)
    major = key[0]
    if server_major is not None and major < server_major:
        raise BackupError(
            f"{name} {major} ({path}) cannot work with a PostgreSQL {server_major} server: install PostgreSQL "
            f"{server_major}'s client programs (postgresql-client-{server_major}) where this runs"
        )
    return path, major


def conninfo(**values: Any) -> str:
    """A libpq keyword/value connection string (never with a password: that is the passfile's)."""
    parts = []
    for key, value in values.items():
        if value is None or value == "":
            continue
        text = str(value).replace("\\", "\\\\").replace("'", "\\'")
        parts.append(f"{key}='{text}'")
    return " ".join(parts)


@contextmanager
def passfile(password: str | None) -> Iterator[str | None]:
    """A 0600 libpq passfile in a private temp dir for the duration (None without a password)."""
    if password is None:
        yield None
        return
    directory = tempfile.mkdtemp(prefix="sw-pgpass-")
    try:
        path = os.path.join(directory, "pgpass")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(passfile_line(password))
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_pg_tool(
    command: list[str],
    appname: str,
    pgpassfile: str | None,
    progress: Progress,
    tick: Callable[[], str],
    meanwhile: Callable[[], None] = lambda: None,
) -> tuple[int, str]:
    """pg_dump/pg_restore with the password only in a passfile (PGPASSFILE names it), progress ticks while it
    runs (`meanwhile` is called on each), its stderr kept with any password masked: (exit code, stderr)."""
    from .compressor import REDACT

    env = child_environment(os.environ)
    env["PGAPPNAME"] = appname
    if pgpassfile:
        env["PGPASSFILE"] = pgpassfile
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=errors, cwd="/")
        while proc.poll() is None:
            meanwhile()
            progress.tick(tick)
            time.sleep(0.2)
        errors.seek(0)
        return proc.returncode, REDACT.clean(errors.read().strip())


SSL_KEYS = ("sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl")


@dataclass
class Connected:
    """What libpq settled on for Synapse's database arguments (the password only to write a passfile)."""

    host: str
    port: int
    user: str
    dbname: str
    password: str | None
    server_major: int
    extra: dict[str, Any] = field(default_factory=dict)

    def conninfo(self) -> str:
        return conninfo(host=self.host, port=self.port, dbname=self.dbname, user=self.user, **self.extra)

    @property
    def where(self) -> str:
        return f"database {self.dbname!r} on {self.host}:{self.port} (user {self.user!r})"


def connect(args: dict[str, Any]) -> tuple[Any, Connected]:
    from .compressor import REDACT, CompressorError
    from .compressor import connect as compressor_connect

    try:
        conn = compressor_connect(args)
    except CompressorError as exc:
        raise BackupError(str(exc)) from None
    info = conn.info
    REDACT.hide(info.password)
    extra = {k: args[k] for k in SSL_KEYS if args.get(k)}
    found = Connected(
        info.host, info.port, info.user, info.dbname, info.password or None, conn.server_version // 10000, extra
    )
    return conn, found


def dump_postgres(database: Database, target: Path, progress: Progress) -> dict[str, Any]:
    """One `pg_dump --format=custom` of Synapse's database into target: one snapshot, whatever runs meanwhile."""
    try:
        conn, db = connect(database.args)
    except BackupError as exc:
        if database.embedded:
            raise BackupError(f"{exc} (the embedded cluster runs while the stack runs: synapse-workers run)") from None
        raise
    try:
        conn.autocommit = True
        tool, tool_major = pg_tool("pg_dump", db.server_major)
        progress.say(f"database: pg_dump {tool_major} of the PostgreSQL {db.server_major} {db.where}")
        reniced = not database.embedded  # an external server's backends are not ours to renice

        def renice() -> None:
            nonlocal reniced
            if not reniced:
                reniced = _renice_backend(conn)

        started = time.monotonic()
        with passfile(db.password) as pgpass:
            command = [tool, "--format=custom", "--no-password", f"--file={target}", f"--dbname={db.conninfo()}"]
            code, text = run_pg_tool(
                command, APPLICATION_NAME, pgpass, progress, lambda: f"database: {mib(_size(target))} written", renice
            )
        if code != 0:
            raise BackupError(f"pg_dump failed (exit {code}) on the {db.where}: {text}")
        progress.say(f"database: {mib(_size(target))} in {time.monotonic() - started:.1f} s")
        return {
            "kind": "postgres",
            "embedded": database.embedded,
            "file": DUMP,
            "postgres_major": db.server_major,
            "pg_dump_major": tool_major,
            "dbname": db.dbname,
        }
    finally:
        conn.close()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _renice_backend(conn: Any) -> bool:
    """The embedded cluster's backend serving pg_dump (found by its application_name) at our priority."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (APPLICATION_NAME,))
            pids = [int(row[0]) for row in cur.fetchall()]
    except Exception:  # noqa: BLE001 - a query that fails only leaves the priority as it was
        return True
    for pid in pids:
        lower_priority(pid)
    return bool(pids)


def copy_sqlite(path: str, target: Path, progress: Progress) -> dict[str, Any]:
    """A consistent copy of a live SQLite database through SQLite's online backup API."""
    if not os.path.isfile(path):
        raise BackupError(f"the SQLite database {path} does not exist")
    source = sqlite3.connect(path, timeout=30)
    copy = sqlite3.connect(target)
    try:

        def step(status: int, remaining: int, total: int) -> None:
            progress.tick(lambda: f"database: SQLite {total - remaining}/{total} pages")

        source.backup(copy, pages=1024, progress=step, sleep=0.01)
    except sqlite3.Error as exc:
        raise BackupError(f"copying the SQLite database {path} failed: {exc}") from None
    finally:
        copy.close()
        source.close()
    progress.say(f"database: SQLite copy of {path}, {mib(_size(target))}")
    return {"kind": "sqlite", "embedded": False, "file": SQLITE_COPY, "postgres_major": None, "path": path}


# ---- one backup -----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What `state/backup.json` records (and the summary line says)."""

    started: float
    finished: float = 0.0
    ok: bool = False
    error: str | None = None
    path: str | None = None
    bytes: int = 0
    files: int = 0
    media_linked: int = 0
    media_copied: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "finished": self.finished,
            "ok": self.ok,
            "error": self.error,
            "path": self.path,
            "bytes": self.bytes,
            "files": self.files,
            "media_linked": self.media_linked,
            "media_copied": self.media_copied,
        }


def write_status(path: str, outcome: Outcome) -> None:
    """Atomically, when the runtime dir's state dir exists (a stack ran here); otherwise nothing."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".backup-")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(outcome.as_json(), handle, indent=2)
            handle.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def exclusive(path: str) -> AbstractContextManager[None]:
    """The backup's lock (Layout.backup_lock): one backup at a time."""
    return flock.exclusive(path, "another backup", BackupError)


class Writer:
    """Fills a partial backup dir and keeps its manifest entries."""

    def __init__(self, root: Path, progress: Progress):
        self.root = root
        self.progress = progress
        self.entries: list[Entry] = []
        self.new_bytes = 0

    def add(self, source: str, relative: str) -> Entry:
        st = os.stat(source)
        size, digest = copy_file(source, self.root / relative)
        os.chmod(self.root / relative, stat.S_IMODE(st.st_mode))
        self.new_bytes += size
        return self._keep(Entry(relative, size, digest, stat.S_IMODE(st.st_mode), st.st_mtime_ns))

    def add_made(self, relative: str, mode: int = 0o600) -> Entry:
        """A file this backup made itself (the database copy)."""
        path = self.root / relative
        os.chmod(path, mode)
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        size, digest = hash_file(path)
        self.new_bytes += size
        return self._keep(Entry(relative, size, digest, mode, 0))

    def link(self, previous: Path, old: Entry) -> Entry:
        target = self.root / old.path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(previous / old.path, target)
        return self._keep(Entry(old.path, old.size, old.sha256, old.mode, old.mtime_ns))

    def _keep(self, entry: Entry) -> Entry:
        self.entries.append(entry)
        return entry


def _previous_media(output: Path) -> tuple[Path | None, dict[str, Entry]]:
    backups = complete_backups(output)
    if not backups:
        return None, {}
    doc = read_manifest(backups[-1])
    assert doc is not None
    entries = {}
    for raw in doc["files"]:
        try:
            entry = Entry.from_json(raw)
        except (KeyError, TypeError, ValueError):
            continue
        if entry.path.startswith("media/") and safe_relative(entry.path):
            entries[entry.path] = entry
    return backups[-1], entries


def copy_media(writer: Writer, media: str, output: Path, outcome: Outcome) -> None:
    """The media store, incrementally: a file the newest complete backup holds with the same size and mtime is a
    hard link to its copy there (media files are never rewritten in place: Synapse writes a new file per id)."""
    previous, old = _previous_media(output)
    if not os.path.isdir(media):
        writer.progress.say(f"media: {media} does not exist: nothing to copy")
        return
    files = list(listing(media, frozenset({os.path.normpath(str(output))})))  # a destination inside it: not media
    total = len(files)
    writer.progress.say(f"media: {total} files in {media}" + (f" (links into {previous.name})" if previous else ""))
    for done, (path, relative) in enumerate(files, 1):
        name = f"media/{relative}"
        try:
            st = os.stat(path)
        except FileNotFoundError:  # deleted meanwhile (retention, an admin's purge)
            continue
        before = old.get(name)
        linked = False
        if (
            previous is not None
            and before is not None
            and (before.size, before.mtime_ns) == (st.st_size, st.st_mtime_ns)
        ):
            try:
                writer.link(previous, before)
                linked = True
            except OSError:  # another filesystem, or the old copy is gone: copy it instead
                linked = False
        if linked:
            outcome.media_linked += 1
        else:
            writer.add(path, name)
            outcome.media_copied += 1
        counts = f"media: {done}/{total} files ({outcome.media_linked} linked, {outcome.media_copied} copied"
        writer.progress.tick(functools.partial("{}, {} written)".format, counts, mib(writer.new_bytes)))
    writer.progress.say(f"media: {total} files, {outcome.media_linked} linked, {outcome.media_copied} copied")


def _new_name(output: Path) -> tuple[float, str]:
    """A stamp no backup in `output` has yet (two backups within one second: the second waits)."""
    while True:
        now = time.time()
        name = stamp(now)
        if not (output / name).exists() and not (output / f"{PARTIAL}{name}").exists():
            return now, name
        time.sleep(1.05 - now % 1)


def make_backup(src: Sources, output: str, progress: Progress, outcome: Outcome) -> Path:
    """Write one complete backup of `src` into `output`; returns its directory. The caller holds the lock."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    started, name = _new_name(out)
    outcome.started = started
    partial = out / f"{PARTIAL}{name}"
    partial.mkdir(mode=0o700)
    try:
        lower_priority()
        writer = Writer(partial, progress)
        if src.database.kind == "postgres":
            database = dump_postgres(src.database, partial / DUMP, progress)
            writer.add_made(DUMP)
            if src.ported is not None:  # the stale SQLite file is copied with the data dir's files, as it is
                database["ported_from_sqlite"] = src.ported
                kept = f" (kept as {src.ported['stale_copy']})" if src.ported["stale_copy"] else ""
                progress.say(
                    f"database: {src.ported['sqlite_database']} was ported into the embedded PostgreSQL at "
                    f"{src.ported['ported_at']}: the dump is the database, the SQLite file is as it was then{kept}"
                )
        else:
            assert src.database.sqlite_path is not None
            database = copy_sqlite(src.database.sqlite_path, partial / SQLITE_COPY, progress)
            writer.add_made(SQLITE_COPY)
        writer.add(src.config_path, CONFIG_FILE)
        count = 0
        for path, relative in listing(src.data_dir, src.skip):
            writer.add(path, f"data/{relative}")
            count += 1
        progress.say(f"data: {count} files from {src.data_dir}")
        extras = []
        for index, path in enumerate(src.extras):
            relative = f"files/{index}/{os.path.basename(path)}"
            writer.add(path, relative)
            extras.append({"file": relative, "path": path})
        copy_media(writer, src.media_store, out, outcome)
        finished = time.time()
        entries = sorted(writer.entries, key=lambda e: e.path)
        manifest = {
            "format": FORMAT,
            "synapse_workers": __version__,
            "synapse": SYNAPSE_VERSION,
            "server_name": src.server_name,
            "started": _iso(started),
            "finished": _iso(finished),
            "started_epoch": started,
            "finished_epoch": finished,
            "postgres_major": database.get("postgres_major"),
            "database": database,
            "roots": src.roots(),
            "extras": extras,
            "files": [e.as_json() for e in entries],
        }
        _write_json(partial / MANIFEST, manifest)
        final = out / name
        partial.rename(final)
        _fsync_dir(out)
        outcome.finished = finished
        outcome.files = len(entries)
        outcome.bytes = sum(e.size for e in entries)
        outcome.path = str(final)
        return final
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    with open(path, "x", encoding="utf-8") as handle:
        json.dump(doc, handle, indent=1, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, 0o600)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_backup(plan: Plan, output: str, keep: int | None, stream: TextIO | None = None) -> int:
    """`synapse-workers backup -o DIR [--keep N]`: exit 0, 1 (failed, said), 75 (another backup runs)."""
    progress = Progress(stream)
    layout = plan.layout
    outcome = Outcome(started=time.time())
    lock = layout.backup_lock if os.path.isdir(layout.state_dir) else os.path.join(output, ".backup.lock")
    try:
        src = sources(plan, output)
        os.makedirs(output, mode=0o700, exist_ok=True)  # backups hold the server's secrets
        with exclusive(lock):
            make_backup(src, output, progress, outcome)
            removed = prune(output, keep) if keep is not None else []
        outcome.ok = True
    except BackupError as exc:
        outcome.error = str(exc)
        outcome.finished = time.time()
        if exc.code != LOCKED:  # the running backup writes its own outcome
            write_status(layout.backup_status, outcome)
        progress.say(f"FAILED: {exc}")
        return exc.code
    except OSError as exc:
        outcome.error = f"{exc.filename or ''}: {exc.strerror or exc}"
        outcome.finished = time.time()
        write_status(layout.backup_status, outcome)
        progress.say(f"FAILED: {outcome.error}")
        return 1
    write_status(layout.backup_status, outcome)
    kept = f"; removed {len(removed)} older backup(s)" if removed else ""
    progress.say(
        f"done: {outcome.path}: {outcome.files} files, {mib(outcome.bytes)} "
        f"({outcome.media_linked} media linked, {outcome.media_copied} copied) in "
        f"{outcome.finished - outcome.started:.1f} s{kept}"
    )
    return 0


def run_verify(path: str, stream: TextIO | None = None) -> int:
    """`synapse-workers backup --verify PATH`: exit 0 when every file matches the manifest, else 1 (each said)."""
    out = stream if stream is not None else sys.stderr
    problems = verify(path)
    for problem in problems:
        print(f"synapse-workers: backup --verify: {problem}", file=out)
    if problems:
        print(f"synapse-workers: backup --verify: {path}: FAILED ({len(problems)} differences)", file=out)
        return 1
    doc = read_manifest(path)
    assert doc is not None
    print(
        f"synapse-workers: backup --verify: {path}: OK ({len(doc['files'])} files, server {doc.get('server_name')}, "
        f"finished {doc.get('finished')})",
        file=out,
    )
    return 0
