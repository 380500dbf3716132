"""One run of synapse_auto_compressor (the `compress-state` job, or `synapse-workers compress-state` now).

`python -m synapse_workers.run.compressor --config HOMESERVER_YAML --chunk-size N --chunks N --levels L --lock PATH`

1. Takes an exclusive flock on PATH for the whole run: a second run (scheduled or by hand) is refused at once
   (exit 75) instead of compressing the same rooms twice.
2. Connects as Synapse does: the `database` section of homeserver.yaml (psycopg2 arguments; libpq reads the
   password from the passfile we wrote, or takes the user's own `password`). SQLite: refused (exit 2).
3. Removes the state groups of rooms that are provably gone (no row in `rooms`, no event left in `events`): what
   older Synapse versions left behind when a room was purged, on which the compressor panics ("Missing <group>",
   rust-synapse-compress-state issues #78/#79). Their compressor progress rows go too. One transaction; counted.
4. Calls the library (`synapse_auto_compressor.compress_state_events_table`, the PyPI wheel's pyo3 module: it
   ships no binary) with a URL built in memory; the password never reaches an argument, the environment, a file
   or a log line (every log line and error message is filtered for it).
5. Logs what the compressor's progress tables (`state_compressor_*`) record afterwards.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import yaml

LOCKED = 75  # EX_TEMPFAIL (run/scheduler.py reads it)
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
# The compressor's own saved state for a room that no longer exists (its level heads may be gone).
COMPRESSOR_TABLES = ("state_compressor_state", "state_compressor_progress")
STALE_PROGRESS = """
DELETE FROM {table} AS t
WHERE NOT EXISTS (SELECT 1 FROM rooms AS r WHERE r.room_id = t.room_id)
  AND NOT EXISTS (SELECT 1 FROM state_groups AS sg WHERE sg.room_id = t.room_id)
"""


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


@contextmanager
def exclusive(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CompressorError(
                f"another compressor run is in progress (it holds {path}): not starting a second one", LOCKED
            ) from None
        yield
    finally:
        os.close(fd)


def database_args(config_path: str) -> dict[str, Any]:
    """psycopg2.connect() arguments, as Synapse derives them from homeserver.yaml (cp_* are its pool's)."""
    try:
        with open(config_path, encoding="utf-8") as handle:
            doc = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CompressorError(f"cannot read {config_path}: {exc}") from None
    database = doc.get("database") or {}
    name = database.get("name", "sqlite3") if isinstance(database, dict) else "sqlite3"
    if name not in ("psycopg2", "psycopg"):
        raise CompressorError(
            f"{config_path} uses {name}: synapse_auto_compressor works on PostgreSQL only (synapse_port_db moves "
            "a SQLite database to PostgreSQL)",
            2,
        )
    args = database.get("args") or {}
    return {k: v for k, v in args.items() if not k.startswith("cp_")}


def compressor_url(user: str, password: str | None, host: str, port: int, dbname: str, sslmode: str | None) -> str:
    """A tokio-postgres URL (percent-encoded; a socket directory as the host), built in memory only."""
    credentials = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    url = f"postgresql://{credentials}@{quote(host, safe='')}:{port}/{quote(dbname, safe='')}"
    if sslmode in ("disable", "prefer", "require"):
        url += f"?sslmode={sslmode}"
    return url


def remove_orphans(conn: Any) -> tuple[int, dict[str, int]]:
    """Delete the state groups of rooms that are gone, in one transaction: (rooms, rows deleted per table)."""
    counts: dict[str, int] = {}
    with conn, conn.cursor() as cur:
        cur.execute(GONE_ROOMS)
        cur.execute("SELECT count(*) FROM sw_gone_rooms")
        rooms = int(cur.fetchone()[0])
        cur.execute(ORPHANED_GROUPS)
        for table, sql in DELETES:
            cur.execute(sql)
            counts[table] = cur.rowcount
        for table in COMPRESSOR_TABLES:
            cur.execute("SELECT to_regclass(%s)", (table,))
            if cur.fetchone()[0] is not None:
                cur.execute(STALE_PROGRESS.format(table=table))
                counts[table] = cur.rowcount
    return rooms, counts


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


def compress(config: str, chunk_size: int, chunks: int, levels: str) -> None:
    args = database_args(config)
    conn = connect(args)
    try:
        rooms, counts = remove_orphans(conn)
        removed = ", ".join(f"{n} from {t}" for t, n in counts.items())
        log.info("purged rooms: %d left state groups behind; removed %s", rooms, removed)
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
    parser.add_argument("--config", required=True, help="homeserver.yaml (its database section)")
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
            compress(args.config, args.chunk_size, args.chunks, args.levels)
    except CompressorError as exc:
        log.error("%s", exc)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
