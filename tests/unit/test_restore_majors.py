"""restore across PostgreSQL majors (run/postgres.dump_major_problems): a backup's dump goes into its own major or
a newer one, with a pg_restore at least as new as the pg_dump that wrote it; anything else is refused (exit 2, both
majors named) before a file is written, instead of failing after initdb with pg_restore's "unsupported version
(1.16) in file header". The dump route into a newer major, end to end with real PostgreSQL 15 and 18:
tests/integration/test_postgres_dump_route.py."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from synapse_workers.errors import Argument
from synapse_workers.run import backup as bk
from synapse_workers.run import postgres
from tests.unit.test_backup import backup_now, make_server, restore_env
from tests.unit.test_cli_errors import run

PATH = Argument("PATH")
TOOL = ("/usr/lib/postgresql/15/bin/pg_restore", 15)


def problems(dumped, written_by, target_major, tool=TOOL):
    return postgres.dump_major_problems("/b/x", dumped, written_by, "the target", target_major, tool, PATH)


@pytest.mark.parametrize(("dumped", "written_by", "target"), [(15, 15, 15), (14, 15, 15), (15, 15, 18), (9, 9, 15)])
def test_a_dump_goes_into_its_own_major_or_a_newer_one(dumped, written_by, target):
    tool = (TOOL[0], max(written_by, target))
    assert problems(dumped, written_by, target, tool) == []


def test_an_older_server_is_refused_naming_both_majors():
    [problem] = problems(18, 18, 15)  # one problem: the server's, though pg_restore 15 could not read it either
    assert problem.startswith("restore: /b/x holds a dump of a PostgreSQL 18 database, but the target is PostgreSQL 15")
    assert "Nothing was restored" in problem and "where PostgreSQL 18 or newer is installed" in problem
    assert (problem.expected, problem.found, problem.subject) == ("PostgreSQL 18 or newer", "PostgreSQL 15", PATH)


def test_a_pg_restore_older_than_the_pg_dump_is_refused():
    [problem] = problems(15, 18, 15)  # a 15 database dumped by pg_dump 18 (a machine with 15 and 18 installed)
    assert "written by pg_dump 18, which pg_restore 15 (/usr/lib/postgresql/15/bin/pg_restore) cannot read" in problem
    assert "postgresql-client-18" in problem
    assert (problem.expected, problem.found) == ("pg_restore 18 or newer", "pg_restore 15")


def test_a_manifest_without_majors_is_not_refused():
    assert problems(None, None, 15) == [] and problems(15, None, 15) == [] and problems(None, 18, 18, None) == []


def as_postgres_backup(path: Path, dumped: int, written_by: int) -> None:
    """A backup of the SQLite server turned into one of an embedded cluster's dump made elsewhere: database.dump
    in place of the SQLite copy, the manifest's database naming the majors (verify still passes)."""
    doc = json.loads((path / bk.MANIFEST).read_text())
    (path / bk.SQLITE_COPY).unlink()
    dump = b"PGDMP\x01\x10\x00 a custom-format archive of another major"
    (path / bk.DUMP).write_bytes(dump)
    entry = next(e for e in doc["files"] if e["path"] == bk.SQLITE_COPY)
    entry.update(path=bk.DUMP, size=len(dump), sha256=hashlib.sha256(dump).hexdigest())
    doc["database"] = {"kind": "postgres", "embedded": True, "file": bk.DUMP, "postgres_major": dumped,
                       "pg_dump_major": written_by, "dbname": "synapse"}
    (path / bk.MANIFEST).write_text(json.dumps(doc))
    assert bk.verify(path) == []


@pytest.fixture
def newest() -> int:
    majors = postgres.installed_majors()
    if not majors:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql: scripts/install.sh)")
    if os.geteuid() == 0:
        postgres.cluster_owner(True)  # the postgres user, as the embedded cluster needs
    return postgres.major_key(list(majors)[-1])[0]


def test_restore_of_a_newer_majors_dump_is_refused_before_anything_is_written(tmp_path, newest):
    sources, _ = make_server(tmp_path)
    path, _ = backup_now(sources, tmp_path / "backups")
    as_postgres_backup(path, newest + 3, newest + 3)
    target = tmp_path / "new"
    result = run(restore_env(target), "restore", str(path))
    assert result.returncode == 2, result.stderr
    assert (f"holds a dump of a PostgreSQL {newest + 3} database, but the embedded cluster restore would make here "
            f"(the newest PostgreSQL installed, {postgres.PG_ROOT}/") in result.stderr, result.stderr
    assert f"is PostgreSQL {newest}: a dump restores into the same or a newer major only" in result.stderr
    assert "Traceback" not in result.stderr
    assert not target.exists()

