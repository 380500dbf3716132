"""`synapse-workers port-sqlite`: homeserver.yaml's SQLite database into the embedded PostgreSQL cluster, once.

A data dir from the official image runs Synapse on SQLite; workers need PostgreSQL. This ports the database with
Synapse's own `synapse_port_db`, as Synapse's user, into the embedded cluster under the data dir (started here
with a temporary postmaster on a private socket dir: the stack must not run), and only when the port completed
writes the marker (`Layout.sqlite_port_marker`). With the marker, `load` describes the file's sqlite3 database as
the embedded cluster and shared.yaml sets the cluster's `database` section over the file's: the user's
homeserver.yaml is never edited.

What is never changed: the user's homeserver.yaml and the SQLite file (synapse_port_db reads a copy made here, in
`Layout.sqlite_port_dir`, because opening an SQLite database may write to it; its sha256 is compared before and
after). A failed or interrupted port drops the partly filled `synapse` database (every attempt also starts from an
empty one: synapse_port_db needs an empty or consistent target) and writes no marker, so the server runs from
SQLite as before. `--force` (marker present) removes the marker first and starts over from the SQLite file.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import yaml

from .. import __version__, catalog
from ..errors import Argument, File, Problem, UserError, Variable
from ..files import ensure_secrets
from ..homeserver import embedded_database
from ..layout import RUNTIME_MARKER
from ..load import load_plan, read_sqlite_port
from ..plan import Plan
from ..programs import child_environment, setpriv_prefix
from ..settings import load_settings
from . import postgres
from .binaries import find

MARKER_FORMAT = 1
RUNTIME_DIR, HOSTS = Variable("SYNAPSE_RUNTIME_DIR"), Variable("SYNAPSE_HOSTS")
CONFIG_PATH, PORT_SQLITE = Variable("SYNAPSE_CONFIG_PATH"), Variable("SYNAPSE_PORT_SQLITE")
PORT_DB = (sys.executable, "-m", "synapse._scripts.synapse_port_db")  # Synapse's own, from our venv
PROGRESS_EVERY = 5.0  # seconds between two summaries of synapse_port_db's per-table lines
QUIET_EVERY = 15.0  # seconds without a line of synapse_port_db's before we say it still runs


def say(line: str) -> None:
    print(f"synapse-workers: port-sqlite: {line}", file=sys.stderr, flush=True)


# ---- the command ------------------------------------------------------------------------------------------


def port_command(env: Mapping[str, str], host: str | None, force: bool) -> int:
    """`synapse-workers port-sqlite [--force]`: 0 ported, 1 the port failed (nothing changed), 2 refused."""
    plan = load_plan(env, host, port_target=True)
    _refusals(plan, force)
    with _runtime_lock(plan):
        return _port(plan, force)


def port_at_start(env: Mapping[str, str], host: str | None) -> int | None:
    """SYNAPSE_PORT_SQLITE=on at `run`: port first when homeserver.yaml says sqlite3 and there is no marker yet
    (the SQLite refusal for workers never comes then). None: nothing to do, start as usual; else the exit code."""
    try:
        if not load_settings(env).database.port_sqlite:
            return None
    except UserError:
        return None  # `run` itself reports bad variables, all at once
    plan = load_plan(env, host, port_target=True)
    port = plan.homeserver.sqlite_port
    if port is None or os.path.exists(plan.layout.sqlite_port_marker):
        return None  # not SQLite, or ported already
    say(f"{PORT_SQLITE} is on and {plan.homeserver.path} uses SQLite: porting it before anything starts.")
    code = port_command(env, host, force=False)
    if code != 0:
        say(f"the stack does not start: the port did not complete ({PORT_SQLITE}=on asks for it).")
    return code


def _refusals(plan: Plan, force: bool) -> None:
    hs, layout = plan.homeserver, plan.layout
    if plan.multi_host:
        raise UserError(
            Problem(
                f"port-sqlite: {HOSTS} is set: expected one host. Port on main's host without {HOSTS} first, then "
                f"copy {layout.sqlite_port_marker} with the other files main's host made.",
                HOSTS,
                expected="unset (port on one host)",
                found="several hosts",
            )
        )
    if not hs.exists:
        raise UserError(
            Problem(
                f"port-sqlite: there is no {hs.path} ({CONFIG_PATH}): nothing to port. Expected the homeserver.yaml "
                "of a server on SQLite (the official image's /data/homeserver.yaml).",
                CONFIG_PATH,
                expected="an existing homeserver.yaml with a sqlite3 database",
                found=f"no {hs.path}",
            )
        )
    if hs.sqlite_port is None:
        raise UserError(
            Problem(
                f"port-sqlite: {hs.path} ({CONFIG_PATH}) does not use SQLite (its database is PostgreSQL already): "
                "nothing to port.",
                File(hs.path),
                expected="database: {name: sqlite3}",
                found="a PostgreSQL database",
                related=(CONFIG_PATH,),
            )
        )
    sqlite = hs.sqlite_port.sqlite_database
    assert sqlite is not None
    marker = None if force else read_sqlite_port(layout.sqlite_port_marker)  # --force: even an unreadable one
    if marker is not None:
        raise UserError(
            Problem(
                f"port-sqlite: already ported: {layout.sqlite_port_marker} records a port of {marker.sqlite_database} "
                f"at {marker.ported_at}, and the server runs on the embedded PostgreSQL since. Nothing was done. "
                "`port-sqlite --force` starts over from the SQLite file: everything the server wrote to PostgreSQL "
                "since that port is lost.",
                Argument("--force"),
                expected="no port yet, or --force",
                found=f"a port made at {marker.ported_at}",
            )
        )
    if not os.path.isfile(sqlite):
        raise UserError(
            Problem(
                f"port-sqlite: the SQLite database {sqlite} (database.args.database in {hs.path}) is not a file: "
                "nothing to port.",
                File(sqlite),
                expected="the server's SQLite database file",
                found="no such file",
                related=(CONFIG_PATH,),
            )
        )
    if postgres.version_problems(plan):  # an existing cluster these binaries cannot open
        raise UserError(*postgres.version_problems(plan))


@contextmanager
def _runtime_lock(plan: Plan) -> Iterator[None]:
    """The launcher's lock (`run/supervise.lock_runtime_dir`'s file): no stack runs on this data dir while we port
    (exit 2 when one does), and none starts before we are done."""
    layout = plan.layout
    runtime = Path(layout.runtime_dir)
    runtime.mkdir(parents=True, exist_ok=True)
    if not (runtime / RUNTIME_MARKER).exists():  # load_plan found it new, empty or ours: it is ours from now on
        (runtime / RUNTIME_MARKER).write_text(
            "Created by synapse-workers: everything here is regenerated on every start.\n"
        )
    handle = open(layout.lock_file, "a")  # noqa: SIM115 (held for the port: that is the lock)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                Problem(
                    f"port-sqlite: a stack is running on this data dir (`synapse-workers run` holds "
                    f"{RUNTIME_DIR}={layout.runtime_dir!r}): stop it first; nothing was done.",
                    RUNTIME_DIR,
                    expected="no running stack",
                    found="a running `synapse-workers run`",
                )
            ) from None
        yield
    finally:
        handle.close()


# ---- the port ---------------------------------------------------------------------------------------------


class Interrupted(BaseException):  # noqa: N818 (a signal, not an error of ours)
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclass
class Progress:
    """synapse_port_db's own lines ("Copying to postgres...", "events: 45% (450/1000)") summarised on stderr."""

    started: float = field(default_factory=time.monotonic)
    tables: dict[str, tuple[int, int]] = field(default_factory=dict)  # table → (done, total)
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=25))
    last: float = field(default_factory=time.monotonic)  # when we last said something

    STATE = re.compile(r"^(?P<state>[A-Z][^:]*)\.\.\.$")
    TABLE = re.compile(r"^(?P<table>\w+): (?P<perc>\d+)% \((?P<done>\d+)/(?P<total>\d+)\)$")

    def line(self, text: str, now: float) -> None:
        text = text.rstrip("\n")
        state = self.STATE.match(text)
        table = self.TABLE.match(text)
        if state:
            self.last = now
            say(f"{state['state']}... ({now - self.started:.0f} s)")
        elif table:
            done, total = int(table["done"]), int(table["total"])
            self.tables[table["table"]] = (done, total)
            if now - self.last >= PROGRESS_EVERY:
                self.last = now
                finished = sum(1 for d, t in self.tables.values() if d >= t)
                rows = sum(d for d, _ in self.tables.values())
                say(
                    f"copying: {finished} of {len(self.tables)} tables started so far are done, {rows} rows; "
                    f"{table['table']} {table['perc']}% ({done}/{total})"
                )
        elif text.strip():
            self.tail.append(text)

    def quiet(self, now: float) -> None:
        """No line for a while (PostgreSQL's background updates take a minute even for a small database)."""
        if now - self.last >= QUIET_EVERY:
            self.last = now
            say(f"still running ({now - self.started:.0f} s)")

    def summary(self) -> str:
        rows = sum(d for d, _ in self.tables.values())
        return f"{rows} rows in {len(self.tables)} tables"


def _port(plan: Plan, force: bool) -> int:
    hs, layout, core = plan.homeserver, plan.layout, plan.settings.core
    assert hs.sqlite_port is not None and hs.sqlite_port.sqlite_database is not None and plan.postgres is not None
    sqlite = hs.sqlite_port.sqlite_database
    as_root = os.geteuid() == 0
    setpriv = find("setpriv") if as_root else ""
    started = time.time()
    size = os.path.getsize(sqlite)
    say(f"porting {sqlite} ({size / 1024**2:.1f} MiB) into the embedded PostgreSQL in {plan.postgres.data_dir}.")
    before = _sha256(sqlite)
    if force and os.path.exists(layout.sqlite_port_marker):
        os.unlink(layout.sqlite_port_marker)  # from now on the server is on SQLite until this port completes
        say(f"--force: removed {layout.sqlite_port_marker}; the embedded database is made again from {sqlite}.")
    work = Path(layout.sqlite_port_dir)
    socket_dir = tempfile.mkdtemp(prefix="synapse-workers-port-")
    owner = None
    postmaster: subprocess.Popen[bytes] | None = None
    child: subprocess.Popen[bytes] | None = None
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def interrupted(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    for signum in previous:
        signal.signal(signum, interrupted)
    owned = (core.uid, core.gid, as_root)
    try:
        try:
            copy = _copy_sqlite(sqlite, work, core.uid, core.gid, as_root)
            for path in ensure_secrets(plan):  # the embedded cluster's passfile (Synapse's user reads it)
                if as_root:
                    os.chown(path, core.uid, core.gid)
            port_plan = replace(plan, postgres=replace(plan.postgres, socket_dir=socket_dir))
            owner = postgres.prepare_cluster(port_plan, as_root, setpriv)
            if as_root:  # the cluster's owner makes the socket, Synapse's group reaches it, nobody else
                os.chown(socket_dir, owner.pw_uid, core.gid)
            os.chmod(socket_dir, 0o750 if as_root else 0o700)
            postmaster = _start_postmaster(port_plan, owner, as_root, setpriv, work)
            _psql(port_plan, owner, as_root, setpriv, "DROP DATABASE IF EXISTS synapse;")  # start from empty
            postgres.ensure_database(port_plan, owner, as_root, setpriv)
            config = work / "postgres.yaml"
            _write_private(config, _port_config(plan, socket_dir, work, core.uid, core.gid, as_root), *owned)
            progress = Progress()
            command = [*(setpriv_prefix(setpriv, core.uid, core.gid) if as_root else ()), *PORT_DB]
            command += ["--sqlite-database", str(copy), "--postgres-config", str(config)]
            say("running synapse_port_db (Synapse's own port script) as Synapse's user; its progress follows.")
            child = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=work,
                env={**child_environment(os.environ), "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # a Ctrl-C reaches us, and we stop it in order
            )
            assert child.stdout is not None
            _follow(child.stdout, progress)
            code = child.wait()
            child = None
            if code != 0:
                how = f"was killed ({signal.Signals(-code).name})" if code < 0 else f"exited {code}"
                raise PortError(f"synapse_port_db {how}", list(progress.tail))
            if _sha256(sqlite) != before:
                raise PortError(
                    f"{sqlite} changed while it was ported (is a Synapse still running on it?): the copy ported is "
                    "not the server's latest state",
                    [],
                    sqlite_changed=True,
                )
            _stop_postmaster(postmaster)
            postmaster = None
        except (Exception, Interrupted) as exc:
            for signum in previous:  # the clean-up is short and bounded: a second signal does not cut it off
                signal.signal(signum, signal.SIG_IGN)
            if child is not None:
                _stop_child(child)
            dropped = False
            if postmaster is not None and owner is not None and postmaster.poll() is None:
                dropped = _drop(replace(plan, postgres=replace(plan.postgres, socket_dir=socket_dir)), owner, setpriv)
            if postmaster is not None:
                _stop_postmaster(postmaster)
            if isinstance(exc, UserError):  # refused before the port began (no postgres user, say): said as such
                raise
            _failed(plan, sqlite, before, exc, dropped)
            if isinstance(exc, Interrupted):
                return 128 + exc.signum
            if isinstance(exc, PortError | subprocess.CalledProcessError | RuntimeError | OSError):
                return 1
            raise
        for signum in previous:  # the port is complete: a signal now does not cut the marker's writing off
            signal.signal(signum, signal.SIG_IGN)
        _write_marker(plan, sqlite, before, size, started)
        say(
            f"done in {time.time() - started:.0f} s: {progress.summary()} ported. {layout.sqlite_port_marker} records "
            f"it; from now on the server runs on the embedded PostgreSQL (shared.yaml sets its database over "
            f"{hs.path}, which is unchanged, as is {sqlite}). Workers may be set now."
        )
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(socket_dir, ignore_errors=True)


class PortError(Exception):
    def __init__(self, what: str, tail: list[str], sqlite_changed: bool = False):
        super().__init__(what)
        self.what, self.tail, self.sqlite_changed = what, tail, sqlite_changed


def _failed(plan: Plan, sqlite: str, before: str, exc: BaseException, dropped: bool) -> None:
    """What happened, and that nothing changed (said on stderr)."""
    hs = plan.homeserver
    if isinstance(exc, Interrupted):
        what = f"the port was interrupted ({signal.Signals(exc.signum).name})"
    elif isinstance(exc, PortError):
        what = exc.what
        for line in exc.tail[-15:]:
            print(f"  | {line}", file=sys.stderr)
    else:
        what = f"{type(exc).__name__}: {exc}"
    database = (
        "the partly filled PostgreSQL database was dropped"
        if dropped
        else "a partly filled PostgreSQL database, if any, is made empty again by the next port"
    )
    if isinstance(exc, PortError) and exc.sqlite_changed:
        untouched = f"{hs.path} is unchanged and no marker was written"
    else:
        untouched = (
            f"{hs.path} and {sqlite} are as they were (sha256 {before[:12]}... unchanged) and no marker was written"
        )
    say(
        f"FAILED: {what}. Nothing changed: {untouched}; {database}. The server still runs from SQLite (without "
        "workers). Fix the cause and run `synapse-workers port-sqlite` again."
    )


def _copy_sqlite(sqlite: str, work: Path, uid: int, gid: int, as_root: bool) -> Path:
    """The SQLite file (and its write-ahead log, when one is left) copied into a fresh scratch dir of Synapse's
    user: synapse_port_db opens what it ports read-write (schema checks, WAL), never the original."""
    if work.exists():
        shutil.rmtree(work)  # a port that was killed left it: ours (Layout.sqlite_port_dir)
    work.mkdir(mode=0o700)
    if as_root:
        os.chown(work, uid, gid)
    copy = work / "homeserver.db"
    for suffix in ("", "-wal"):
        if suffix and not os.path.exists(sqlite + suffix):
            continue
        shutil.copyfile(sqlite + suffix, f"{copy}{suffix}")
        if as_root:
            os.chown(f"{copy}{suffix}", uid, gid)
    return copy


def _follow(stream: IO[bytes], progress: Progress) -> None:
    """synapse_port_db's output, line by line, until it closes; a word when it is quiet for long."""
    fd, pending = stream.fileno(), b""
    while True:
        readable, _, _ = select.select([fd], [], [], 1.0)
        now = time.monotonic()
        if not readable:
            progress.quiet(now)
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for raw in lines:
            progress.line(raw.decode("utf-8", "replace"), now)
    if pending:
        progress.line(pending.decode("utf-8", "replace"), time.monotonic())


def _port_config(plan: Plan, socket_dir: str, work: Path, uid: int, gid: int, as_root: bool) -> str:
    """synapse_port_db's --postgres-config: the embedded cluster over the private socket (password from the
    passfile), and what Synapse's config loader requires besides, none of it the server's own: a throwaway signing
    key and macaroon key (the port copies tables; it signs nothing), no key server (it fetches nothing); its media
    store setting is a scratch dir (the loader creates it; the port copies no media: the media store stays as it
    is and serves the same files)."""
    from signedjson.key import generate_signing_key, write_signing_keys

    key = work / "port.signing.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        write_signing_keys(handle, [generate_signing_key("port")])
    if as_root:
        os.chown(key, uid, gid)
    config = {
        "server_name": plan.homeserver.server_name,
        "signing_key_path": str(key),
        "macaroon_secret_key": secrets.token_hex(32),
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "media_store_path": str(work / "media_store"),
        # PostgreSQL's background updates run first, batch after batch; nobody else uses the database meanwhile, so
        # no pause of a second between two batches (a live server's default): a minute less for a new database.
        "background_updates": {"sleep_duration_ms": 1, "background_update_duration_ms": 500},
        "database": embedded_database(plan.secrets, socket_dir),
    }
    return yaml.safe_dump(config, sort_keys=False)


def _write_private(path: Path, text: str, uid: int, gid: int, as_root: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    if as_root:
        os.chown(path, uid, gid)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _owner_prefix(owner: Any, as_root: bool, setpriv: str) -> list[str]:
    return list(setpriv_prefix(setpriv, owner.pw_uid, owner.pw_gid)) if as_root else []


def _start_postmaster(plan: Plan, owner: Any, as_root: bool, setpriv: str, work: Path) -> subprocess.Popen[bytes]:
    """The embedded cluster, on the private socket dir only (no TCP), until the port is done."""
    assert plan.postgres is not None
    bindir = _bindir(plan)
    log: IO[bytes] = open(work / "postgres.log", "wb")  # noqa: SIM115 (the child keeps its own copy)
    with log:
        postmaster = subprocess.Popen(
            [
                *_owner_prefix(owner, as_root, setpriv),
                f"{bindir}/postgres",
                "-D",
                plan.postgres.data_dir,
                "-c",
                "listen_addresses=",
                "-c",
                f"unix_socket_directories={plan.postgres.socket_dir}",
                "-c",
                f"max_connections={plan.postgres.max_connections}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd="/",
            env=child_environment(os.environ),
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if postmaster.poll() is not None:
            text = (work / "postgres.log").read_text(errors="replace").strip().splitlines()
            raise PortError(f"the embedded PostgreSQL did not start (exit {postmaster.returncode})", text[-10:])
        ready = subprocess.run(
            [f"{bindir}/pg_isready", "-q", "-h", plan.postgres.socket_dir, "-d", "postgres", "-t", "1"],
            check=False,
            env=child_environment(os.environ),
        )
        if ready.returncode == 0:
            return postmaster
        time.sleep(0.2)
    _stop_postmaster(postmaster)
    raise PortError("the embedded PostgreSQL did not become ready within 60 s", [])


def _bindir(plan: Plan) -> str:
    assert plan.postgres is not None
    return postgres.postgres_bin(plan.postgres.data_dir)  # the cluster's own major's binaries


def _stop_postmaster(postmaster: subprocess.Popen[bytes]) -> None:
    """PostgreSQL's fast shutdown (SIGINT: every session ends, a checkpoint is written)."""
    if postmaster.poll() is None:
        postmaster.send_signal(signal.SIGINT)
        try:
            postmaster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            postmaster.kill()
            postmaster.wait()


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=5)  # the whole clean-up stays within `docker stop`'s 10 s
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def _psql(plan: Plan, owner: Any, as_root: bool, setpriv: str, sql: str) -> None:
    """SQL as the cluster's owner (peer authentication) over the private socket, on stdin."""
    assert plan.postgres is not None
    result = postgres.psql_as_owner(_bindir(plan), plan.postgres.socket_dir, owner, as_root, setpriv, sql)
    if result.returncode != 0:
        raise RuntimeError(f"psql: {result.stderr.strip()}")


def _drop(plan: Plan, owner: Any, setpriv: str) -> bool:
    try:
        _psql(plan, owner, os.geteuid() == 0, setpriv, "DROP DATABASE IF EXISTS synapse WITH (FORCE);")
    except (RuntimeError, OSError) as exc:
        say(f"could not drop the partly filled database ({exc}); the next port starts from an empty one anyway.")
        return False
    return True


def _write_marker(plan: Plan, sqlite: str, sha256: str, size: int, started: float) -> None:
    """Atomically (a temporary file renamed over it), 0644: what was ported, when, from which file."""
    assert plan.postgres is not None
    layout = plan.layout
    now = datetime.now(UTC)
    data = {
        "format": MARKER_FORMAT,
        "what": "the SQLite database below was ported into the embedded PostgreSQL cluster by "
        "`synapse-workers port-sqlite`; while this file exists, a homeserver.yaml naming that SQLite file runs on "
        "the cluster (remove it to serve from SQLite again: what was written since is only in PostgreSQL)",
        "homeserver_yaml": plan.homeserver.path,
        "sqlite_database": sqlite,
        "sqlite_size": size,
        "sqlite_sha256": sha256,
        "postgres_data_dir": plan.postgres.data_dir,
        "postgres_database": "synapse",
        "ported_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": round(time.time() - started, 1),
        "synapse_version": catalog.SYNAPSE_VERSION,
        "synapse_workers_version": __version__,
    }
    target = Path(layout.sqlite_port_marker)
    fd, temporary = tempfile.mkstemp(prefix=".synapse-workers-postgres.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# ---- at start: a marker whose cluster is gone --------------------------------------------------------------


def cluster_problems(plan: Plan) -> list[Problem]:
    """A marker (the server's history is in the embedded cluster) but no cluster under the data dir: starting
    would make an empty database and serve an empty server. Refused (exit 2) before anything starts."""
    port = plan.homeserver.sqlite_port
    if port is None or port.ported_at is None or plan.postgres is None or not plan.local("postgres"):
        return []
    if os.path.exists(os.path.join(plan.postgres.data_dir, "PG_VERSION")):
        return []
    return [
        Problem(
            f"{port.marker} records that {port.sqlite_database} was ported into the embedded PostgreSQL at "
            f"{port.ported_at}, but {plan.postgres.data_dir} holds no cluster: the server's history since is not "
            "there, and starting would serve an empty server. Nothing was started. Restore the cluster (or a backup "
            f"into an empty data dir), or remove {port.marker} to serve from SQLite again (what was written since "
            "the port is lost), or `synapse-workers port-sqlite --force` to port the SQLite file again.",
            File(plan.postgres.data_dir),
            expected="the embedded cluster the SQLite database was ported into",
            found="no cluster (no PG_VERSION)",
        )
    ]
