"""One run of synapse_auto_compressor (the `compress-state` job, or `synapse-workers compress-state` now).

`python -m synapse_workers.run.compressor --config FILE... --chunk-size N --chunks N --levels L --lock PATH`

1. Takes an exclusive flock on PATH for the whole run: a second run (scheduled or by hand) is refused at once
   (exit 75) instead of compressing the same rooms twice.
2. Connects as Synapse does: the `database` section of main's config files (homeserver.yaml, or shared.yaml's
   with several hosts; psycopg2 arguments: libpq reads the password from the passfile we wrote, or takes the
   user's own `password`). SQLite: refused (exit 2).
3. Cleans up before the run, in one transaction, counting what it removes: the state groups of rooms that are
   provably gone (no row in `rooms`, no event left in `events`: what Synapse left behind when a room was purged,
   before element-hq/synapse#18024), and the compressor's own saved progress for rooms where it names a state
   group that no longer exists (Synapse deleted it: a purged room or purged history). Resuming from such a group
   is the compressor's known panic ("Missing <group>", rust-synapse-compress-state issues #78, #79); without its
   progress the compressor starts that room over.
4. Calls the library (`synapse_auto_compressor.compress_state_events_table`, the PyPI wheel's pyo3 module: it
   ships no binary) with a URL built in memory; the password never reaches an argument, the environment, a file
   or a log line (every log line and error message is filtered for it).
5. Logs what the compressor's progress tables (`state_compressor_*`) record afterwards.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import quote

import yaml

from . import flock

log = logging.getLogger("synapse_workers.compressor")

# Rooms whose state groups are orphaned: not in `rooms` (purged) and without a single event left.
GONE_ROOMS = """
CREATE TEMP TABLE sw_gone_rooms ON COMMIT DROP AS
    SELECT DISTINCT sg.room_id FROM state_groups AS sg
    WHERE NOT EXISTS (SELECT 1 FROM rooms AS r WHERE r.room_id = sg.room_id)
      AND NOT EXISTS (SELECT 1 FROM events AS e WHERE e.room_id = sg.room_id)
"""
ORPHANED_GROUPS = """
CREATE TEMP TABLE sw_orphaned_groups ON COMMIT DROP AS
    SELECT id FROM state_groups WHERE room_id IN (SELECT room_id FROM sw_gone_rooms)
"""
DELETES = (
    ("state_groups_state", "DELETE FROM state_groups_state WHERE state_group IN (SELECT id FROM sw_orphaned_groups)"),
    ("state_group_edges", "DELETE FROM state_group_edges WHERE state_group IN (SELECT id FROM sw_orphaned_groups)"),
    ("state_groups", "DELETE FROM state_groups WHERE id IN (SELECT id FROM sw_orphaned_groups)"),
)
# The compressor's own saved state for rooms where a state group it saved (the last one it compressed, a level's
# head) no longer exists: Synapse deleted it (room purged, history purged). Resuming from it is the known panic
# ("Missing <group>", issue #78); without it the compressor starts that room over.
STALE_ROOMS = """
CREATE TEMP TABLE sw_stale_rooms ON COMMIT DROP AS
    SELECT p.room_id FROM state_compressor_progress AS p
    WHERE NOT EXISTS (SELECT 1 FROM state_groups AS sg WHERE sg.id = p.last_compressed)
    UNION
    SELECT s.room_id FROM state_compressor_state AS s
    WHERE s.current_head IS NOT NULL AND NOT EXISTS (SELECT 1 FROM state_groups AS sg WHERE sg.id = s.current_head)
"""
COMPRESSOR_TABLES = ("state_compressor_state", "state_compressor_progress")


class Redact(logging.Filter):
    """Keeps a secret out of every record, whoever logged it (the Rust library logs through pyo3-log)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: list[str] = []

    def hide(self, secret: str | None) -> None:
        if secret:
            self.secrets += [secret, quote(secret, safe="")]

    def clean(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "<hidden>")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.clean(record.getMessage())
        record.args = None
        return True


REDACT = Redact()


class CompressorError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def exclusive(path: str) -> AbstractContextManager[None]:
    """The compressor's lock (Layout.compressor_lock): scheduled and manual runs never overlap."""
    return flock.exclusive(path, "another compressor run", CompressorError)


def database_section(config_paths: list[str]) -> tuple[str, dict[str, Any], str]:
    """Synapse's database engine name, its `args` and the file they come from, as Synapse derives them from its
    config files (a later file's `database` replaces an earlier one's, as Synapse merges top-level keys). The
    backup (run/backup.py) reads the database this way too."""
    database: Any = {}
    config_path = config_paths[0]
    for path in config_paths:
        try:
            with open(path, encoding="utf-8") as handle:
                doc = yaml.safe_load(handle) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CompressorError(f"cannot read {path}: {exc}") from None
        if isinstance(doc, dict) and "database" in doc:
            database, config_path = doc["database"] or {}, path
    name = database.get("name", "sqlite3") if isinstance(database, dict) else "sqlite3"
    args = (database.get("args") if isinstance(database, dict) else None) or {}
    return str(name), dict(args), config_path


def database_args(config_paths: list[str]) -> dict[str, Any]:
    """psycopg2.connect() arguments, as Synapse derives them from its config files (cp_* are its pool's)."""
    name, args, config_path = database_section(config_paths)
    if name not in ("psycopg2", "psycopg"):
        raise CompressorError(
            f"{config_path} uses {name}: synapse_auto_compressor works on PostgreSQL only (`synapse-workers "
            "port-sqlite` moves a SQLite database into the embedded PostgreSQL)",
            2,
        )
    return {k: v for k, v in args.items() if not k.startswith("cp_")}


def compressor_url(user: str, password: str | None, host: str, port: int, dbname: str, sslmode: str | None) -> str:
    """A tokio-postgres URL (percent-encoded; a socket directory as the host), built in memory only."""
    credentials = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    url = f"postgresql://{credentials}@{quote(host, safe='')}:{port}/{quote(dbname, safe='')}"
    if sslmode in ("disable", "prefer", "require"):
        url += f"?sslmode={sslmode}"
    return url


def remove_orphans(conn: Any) -> tuple[int, dict[str, int], int]:
    """In one transaction: delete the state groups of rooms that are gone, then the compressor's saved state that
    names deleted state groups. Returns (gone rooms, rows deleted per table, rooms the compressor starts over)."""
    counts: dict[str, int] = {}
    with conn, conn.cursor() as cur:
        cur.execute(GONE_ROOMS)
        cur.execute("SELECT count(*) FROM sw_gone_rooms")
        rooms = int(cur.fetchone()[0])
        cur.execute(ORPHANED_GROUPS)
        for table, sql in DELETES:
            cur.execute(sql)
            counts[table] = cur.rowcount
        cur.execute("SELECT to_regclass('state_compressor_state'), to_regclass('state_compressor_progress')")
        if None in cur.fetchone():  # the compressor has never run here
            return rooms, counts, 0
        cur.execute(STALE_ROOMS)
        cur.execute("SELECT count(*) FROM sw_stale_rooms")
        restarted = int(cur.fetchone()[0])
        for table in COMPRESSOR_TABLES:
            cur.execute(f"DELETE FROM {table} WHERE room_id IN (SELECT room_id FROM sw_stale_rooms)")
    return rooms, counts, restarted


def progress(conn: Any) -> str:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('state_compressor_total_progress')")
        if cur.fetchone()[0] is None:
            return "no progress recorded (state_compressor_total_progress does not exist)"
        cur.execute("SELECT lowest_uncompressed_group FROM state_compressor_total_progress")
        row = cur.fetchone()
        cur.execute("SELECT count(*) FROM state_compressor_progress")
        rooms = int(cur.fetchone()[0])
    lowest = row[0] if row else None
    return f"progress: {rooms} rooms compressed so far, next run starts at state group {lowest}"


def connect(args: dict[str, Any]) -> Any:
    import psycopg2

    REDACT.hide(str(args["password"]) if args.get("password") is not None else None)
    try:
        return psycopg2.connect(**{"connect_timeout": 10, **args})
    except psycopg2.Error as exc:
        where = f"{args.get('host', 'localhost')}:{args.get('port', 5432)}/{args.get('dbname') or args.get('database')}"
        raise CompressorError(f"cannot connect to the database ({where}): {REDACT.clean(str(exc).strip())}") from None


def compress(configs: list[str], chunk_size: int, chunks: int, levels: str) -> None:
    args = database_args(configs)
    conn = connect(args)
    try:
        rooms, counts, restarted = remove_orphans(conn)
        removed = ", ".join(f"{n} from {t}" for t, n in counts.items())
        log.info("purged rooms: %d left state groups behind; removed %s", rooms, removed)
        log.info("deleted state groups: %d rooms' saved compressor progress named one; they start over", restarted)
        info = conn.info
        password = info.password
        REDACT.hide(password)
        url = compressor_url(info.user, password, info.host, info.port, info.dbname, args.get("sslmode"))
    finally:
        conn.close()
    import synapse_auto_compressor

    log.info("compressing: chunk size %d, %d chunks, levels %s", chunk_size, chunks, levels)
    try:
        synapse_auto_compressor.compress_state_events_table(url, chunk_size, levels, chunks)
    except BaseException as exc:  # a Rust panic arrives as pyo3's PanicException, a BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise CompressorError(f"the compressor failed: {REDACT.clean(f'{type(exc).__name__}: {exc}')}") from None
    conn = connect(args)
    try:
        log.info(progress(conn))
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synapse_workers.run.compressor")
    parser.add_argument(
        "--config", action="append", required=True, help="Synapse's config files in order (homeserver.yaml first)"
    )
    parser.add_argument("--chunk-size", type=int, required=True)
    parser.add_argument("--chunks", type=int, required=True)
    parser.add_argument("--levels", required=True)
    parser.add_argument("--lock", required=True)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(REDACT)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        with exclusive(args.lock):
            log.info("lock taken (%s); connecting to the database", args.lock)
            compress(args.config, args.chunk_size, args.chunks, args.levels)
    except CompressorError as exc:
        log.error("%s", exc)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
