"""run/backup.py and run/restore.py on temp dirs (fast): a SQLite monolith's data dir is backed up (the whole
pipeline but pg_dump), its manifest checked against hashes computed here, verify catches tampering, media are hard
links to the previous backup when unchanged, --keep removes only our oldest complete backups, and restore puts
everything back (paths moved) or refuses with nothing changed. PostgreSQL and the real stack:
tests/integration/test_backup.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
from pathlib import Path

import pytest
import yaml

from synapse_workers.errors import UserError
from synapse_workers.run import backup as bk
from synapse_workers.run import restore as rs
from tests.unit.test_cli_errors import run, snapshot


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_server(root: Path) -> tuple[bk.Sources, Path]:
    """A monolith's data dir on SQLite: homeserver.yaml naming absolute paths, keys, a database, media, and what a
    backup leaves out (the cluster dir, logs)."""
    data = root / "data"
    (data / "media_store" / "local_content" / "ab").mkdir(parents=True)
    (data / "postgres").mkdir()
    (data / "postgres" / "PG_VERSION").write_text("15\n")
    (data / "logs").mkdir()
    (data / "logs" / "main.log").write_text("a log line\n")
    (data / "homeserver.yaml").write_text(
        yaml.safe_dump(
            {
                "server_name": "example.test",
                "database": {"name": "sqlite3", "args": {"database": f"{data}/homeserver.db"}},
                "media_store_path": f"{data}/media_store",
                "signing_key_path": f"{data}/example.test.signing.key",
                "log_config": f"{data}/example.test.log.config",
            }
        )
    )
    (data / "example.test.signing.key").write_text("ed25519 a_abcd c2VjcmV0\n")
    os.chmod(data / "example.test.signing.key", 0o600)
    (data / "example.test.log.config").write_text("version: 1\n")
    (data / ".ported-marker").write_text("part C's marker lives here\n")
    (data / "media_store" / "local_content" / "ab" / "cdef").write_bytes(b"\x89PNG" + bytes(range(256)) * 40)
    (data / "media_store" / "local_content" / "ab" / "ghij").write_bytes(b"second file")
    db = sqlite3.connect(data / "homeserver.db")
    db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT)")
    db.executemany("INSERT INTO events (body) VALUES (?)", [(f"message {i}",) for i in range(500)])
    db.commit()
    db.close()
    sources = bk.Sources(
        server_name="example.test",
        data_dir=str(data),
        config_path=str(data / "homeserver.yaml"),
        media_store=str(data / "media_store"),
        runtime_dir=str(root / "run"),
        skip=frozenset(
            {
                str(data / "postgres"),
                str(data / "media_store"),
                str(data / "logs"),
                str(data / "homeserver.yaml"),
                *(str(data / "homeserver.db") + s for s in ("", "-wal", "-shm", "-journal")),
            }
        ),
        extras=(),
        database=bk.Database("sqlite", {}, str(data / "homeserver.db")),
    )
    return sources, data


def backup_now(sources: bk.Sources, out: Path) -> tuple[Path, bk.Outcome]:
    outcome = bk.Outcome(started=0.0)
    path = bk.make_backup(sources, str(out), bk.Progress(io.StringIO()), outcome)
    return path, outcome


@pytest.fixture
def server(tmp_path):
    return make_server(tmp_path)


@pytest.fixture
def next_second(monkeypatch):
    """Backups one second apart without waiting for the clock (the real naming waits for a new stamp)."""
    clock = [1_800_000_000.0]

    def new_name(output: Path) -> tuple[float, str]:
        clock[0] += 1
        return clock[0], bk.stamp(clock[0])

    monkeypatch.setattr(bk, "_new_name", new_name)


def test_a_backup_holds_every_file_with_its_hash_and_nothing_it_must_leave_out(server, tmp_path):
    sources, data = server
    path, outcome = backup_now(sources, tmp_path / "backups")
    assert bk.STAMP.fullmatch(path.name) and path.parent == tmp_path / "backups"
    assert [p.name for p in (tmp_path / "backups").iterdir()] == [path.name]  # no .partial- left
    manifest = json.loads((path / "manifest.json").read_text())
    files = {f["path"]: f for f in manifest["files"]}
    assert set(files) == {
        "database.sqlite",
        "config/homeserver.yaml",
        "data/example.test.signing.key",
        "data/example.test.log.config",
        "data/.ported-marker",
        "media/local_content/ab/cdef",
        "media/local_content/ab/ghij",
    }
    for name, entry in files.items():
        assert entry["sha256"] == sha(path / name), name
        assert entry["size"] == (path / name).stat().st_size, name
    assert (path / "data/example.test.signing.key").read_bytes() == (data / "example.test.signing.key").read_bytes()
    assert files["data/example.test.signing.key"]["mode"] == 0o600
    assert manifest["server_name"] == "example.test" and manifest["format"] == 1
    assert manifest["database"]["kind"] == "sqlite"
    copy = sqlite3.connect(path / "database.sqlite")
    assert copy.execute("SELECT count(*), max(body) FROM events").fetchone() == (500, "message 99")
    copy.close()
    assert bk.verify(path) == []
    assert (outcome.files, outcome.media_copied, outcome.media_linked) == (7, 2, 0)
    assert outcome.bytes == sum(f["size"] for f in manifest["files"])


def test_unchanged_media_are_hard_links_to_the_previous_backup_and_new_ones_copies(server, tmp_path, next_second):
    sources, data = server
    first, _ = backup_now(sources, tmp_path / "backups")
    (data / "media_store" / "local_content" / "ab" / "new1").write_bytes(b"uploaded later")
    second, outcome = backup_now(sources, tmp_path / "backups")
    assert second != first
    old, new = first / "media/local_content/ab/cdef", second / "media/local_content/ab/cdef"
    assert os.stat(old).st_ino == os.stat(new).st_ino and os.stat(new).st_nlink == 2
    assert os.stat(second / "media/local_content/ab/new1").st_nlink == 1
    assert (outcome.media_linked, outcome.media_copied) == (2, 1)
    assert bk.verify(second) == [] and bk.verify(first) == []
    # A file rewritten in place (other size/mtime) is copied, not linked.
    (data / "media_store" / "local_content" / "ab" / "ghij").write_bytes(b"changed, longer content")
    third, outcome = backup_now(sources, tmp_path / "backups")
    changed = "media/local_content/ab/ghij"
    assert os.stat(third / changed).st_ino != os.stat(second / changed).st_ino
    assert (third / "media/local_content/ab/ghij").read_bytes() == b"changed, longer content"
    assert (outcome.media_linked, outcome.media_copied) == (2, 1)


def test_verify_names_every_difference(server, tmp_path):
    sources, _ = server
    path, _ = backup_now(sources, tmp_path / "backups")
    target = path / "data/example.test.signing.key"
    target.write_text(target.read_text().replace("a", "b"))  # same size, other bytes
    (path / "media/local_content/ab/ghij").unlink()
    (path / "data/intruder").write_text("x")
    (path / "config/homeserver.yaml").write_text("longer than before " * 50)
    problems = bk.verify(path)
    assert any(p.startswith("content differs: data/example.test.signing.key") for p in problems), problems
    assert "missing: media/local_content/ab/ghij" in problems
    assert "extra file (not in the manifest): data/intruder" in problems
    assert any(p.startswith("size differs: config/homeserver.yaml") for p in problems), problems
    assert len(problems) == 4
    assert run({}, "backup", "--verify", str(path)).returncode == 1
    (path / "manifest.json").unlink()
    assert bk.verify(path)[0].endswith("is missing or not a synapse-workers backup manifest (format 1)")


def test_verify_from_the_command_line(server, tmp_path):
    sources, _ = server
    path, _ = backup_now(sources, tmp_path / "backups")
    ok = run({}, "backup", "--verify", str(path))
    assert ok.returncode == 0 and f"{path}: OK (7 files" in ok.stderr, ok.stderr
    (path / "media/local_content/ab/cdef").write_bytes(b"tampered")
    bad = run({}, "backup", "--verify", str(path))
    assert bad.returncode == 1
    assert "size differs: media/local_content/ab/cdef" in bad.stderr and "FAILED (1 differences)" in bad.stderr


def test_keep_removes_only_our_oldest_complete_backups(tmp_path):
    out = tmp_path / "backups"
    for name in ("20260101T000000Z", "20260102T000000Z", "20260103T000000Z"):
        (out / name).mkdir(parents=True)
        (out / name / "manifest.json").write_text(json.dumps({"format": 1, "files": []}))
    (out / "20250101T000000Z").mkdir()  # a stamp without a manifest: not a backup of ours
    (out / ".partial-20250102T000000Z").mkdir()
    (out / "photos").mkdir()
    (out / "20250103T000000Z").mkdir()
    (out / "20250103T000000Z" / "manifest.json").write_text("{not json")
    removed = bk.prune(out, 1)
    assert [p.name for p in removed] == ["20260101T000000Z", "20260102T000000Z"]
    assert sorted(p.name for p in out.iterdir()) == [
        ".partial-20250102T000000Z", "20250101T000000Z", "20250103T000000Z", "20260103T000000Z", "photos",
    ]  # fmt: skip
    assert bk.prune(out, 5) == []


def test_a_failed_backup_leaves_no_partial_dir(server, tmp_path):
    sources, data = server
    (data / "homeserver.db").unlink()
    with pytest.raises(bk.BackupError, match="does not exist"):
        backup_now(sources, tmp_path / "backups")
    assert list((tmp_path / "backups").iterdir()) == []


def test_two_backups_exclude_each_other(tmp_path):
    lock = str(tmp_path / "backup.lock")
    with bk.exclusive(lock), pytest.raises(bk.BackupError) as caught, bk.exclusive(lock):
        pass
    assert caught.value.code == bk.LOCKED and "another backup is in progress" in str(caught.value)


def test_the_outcome_is_written_only_where_a_state_dir_exists(tmp_path):
    outcome = bk.Outcome(started=1.0, finished=2.0, ok=True, path="/x", bytes=3, files=4, media_linked=5)
    bk.write_status(str(tmp_path / "missing" / "backup.json"), outcome)
    assert not (tmp_path / "missing").exists()
    bk.write_status(str(tmp_path / "backup.json"), outcome)
    assert json.loads((tmp_path / "backup.json").read_text()) == {
        "started": 1.0, "finished": 2.0, "ok": True, "error": None, "path": "/x", "bytes": 3, "files": 4,
        "media_linked": 5, "media_copied": 0,
    }  # fmt: skip


def test_paths_move_with_their_directories_only():
    mapping = {"/data": "/srv/new", "/run/sw": "/run/other"}
    text = (
        "a: /data/x.key\nb: '/data'\nc: /database/y\nd: /run/sw/postgresql\ne: [/data/m, /old/data/z]\n# /data/c\n"
    )
    assert rs.rewrite_paths(text, mapping) == (
        "a: /srv/new/x.key\nb: '/srv/new'\nc: /database/y\nd: /run/other/postgresql\ne: [/srv/new/m, /old/data/z]\n"
        "# /srv/new/c\n"
    )
    assert rs.relocate("/data/media/x", {"/data": "/a", "/data/media": "/m"}) == "/m/x"
    assert rs.relocate("/elsewhere/f", mapping) == "/elsewhere/f"


def restore_env(target: Path, **extra: str) -> dict[str, str]:
    return {
        "SYNAPSE_DATA_DIR": str(target / "data"),
        "SYNAPSE_CONFIG_DIR": str(target / "data"),
        "SYNAPSE_RUNTIME_DIR": str(target / "run"),
        **extra,
    }


def test_restore_puts_every_file_back_with_paths_moved(server, tmp_path):
    sources, data = server
    path, _ = backup_now(sources, tmp_path / "backups")
    target = tmp_path / "elsewhere"
    code = rs.run_restore(restore_env(target), str(path), io.StringIO())
    assert code == 0
    new = target / "data"
    doc = yaml.safe_load((new / "homeserver.yaml").read_text())
    assert doc["media_store_path"] == f"{new}/media_store"
    assert doc["database"]["args"]["database"] == f"{new}/homeserver.db"
    assert doc["signing_key_path"] == f"{new}/example.test.signing.key"
    for name in ("example.test.signing.key", ".ported-marker", "media_store/local_content/ab/cdef"):
        assert (new / name).read_bytes() == (data / name).read_bytes(), name
    assert (new / "example.test.signing.key").stat().st_mode & 0o777 == 0o600
    db = sqlite3.connect(new / "homeserver.db")
    assert db.execute("SELECT count(*) FROM events").fetchone() == (500,)
    db.close()
    assert not (new / "postgres").exists() and not (new / "logs").exists()
    if os.geteuid() == 0:
        assert {(new / n).stat().st_uid for n in ("homeserver.db", "media_store", "example.test.signing.key")} == {991}


def test_restore_refuses_with_nothing_changed(server, tmp_path):
    sources, _ = server
    path, _ = backup_now(sources, tmp_path / "backups")
    target = tmp_path / "busy"
    (target / "data").mkdir(parents=True)
    (target / "data" / "something").write_text("mine")
    before = snapshot(target)
    result = run(restore_env(target), "restore", str(path))
    assert result.returncode == 2
    assert f"SYNAPSE_DATA_DIR='{target}/data' is not empty" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(target) == before
    other = tmp_path / "other"
    with pytest.raises(UserError, match="is a backup of 'example.test'"):
        rs.run_restore(restore_env(other, SYNAPSE_SERVER_NAME="other.test"), str(path), io.StringIO())
    (path / "data/example.test.signing.key").write_text("ed25519 a_abcd forged!!\n")
    with pytest.raises(UserError, match="fails verification"):
        rs.run_restore(restore_env(other), str(path), io.StringIO())
    assert not other.exists()


def test_backup_needs_a_destination_and_a_sane_keep(tmp_path):
    result = run({}, "backup")
    assert result.returncode == 2 and "backup: expected -o DIR" in result.stderr, result.stderr
    result = run({}, "backup", "-o", str(tmp_path), "--keep", "0")
    assert result.returncode == 2 and "--keep 0: expected a number of backups to keep, at least 1" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_password_reaches_pg_dump_only_through_a_private_passfile():
    db = bk.Connected("db.example", 5432, "synapse", "synapse", "pa:ss\\word's", 15, {"sslmode": "require"})
    assert "word" not in db.conninfo() and db.conninfo() == (
        "host='db.example' port='5432' dbname='synapse' user='synapse' sslmode='require'"
    )
    with bk.passfile(db.password) as path:
        assert path is not None
        assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(os.path.dirname(path)).st_mode & 0o077 == 0
        assert Path(path).read_text() == "*:*:*:*:pa\\:ss\\\\word's\n"  # libpq's escapes
    assert not os.path.exists(path)


def official_sqlite_server(root: Path) -> dict[str, str]:
    """A SQLite monolith as the official image leaves it, plus an appservice registration outside the data dir."""
    from tests.conftest import isolated_env

    data = root / "data"
    (data / "media_store" / "local_content" / "xy").mkdir(parents=True)
    (data / "media_store" / "local_content" / "xy" / "zzz").write_bytes(b"media bytes")
    appservice = root / "appservices" / "bridge.yaml"
    appservice.parent.mkdir()
    appservice.write_text("id: bridge\nurl: http://localhost:9000\nas_token: a\nhs_token: b\nsender_localpart: br\n"
                          "namespaces: {users: [], aliases: [], rooms: []}\n")
    (data / "homeserver.yaml").write_text(yaml.safe_dump({
        "server_name": "localhost",
        "listeners": [{"port": 8008, "type": "http", "x_forwarded": True,
                       "resources": [{"names": ["client", "federation"], "compress": False}]}],
        "database": {"name": "sqlite3", "args": {"database": f"{data}/homeserver.db"}},
        "media_store_path": f"{data}/media_store",
        "report_stats": False,
        "signing_key_path": f"{data}/localhost.signing.key",
        "app_service_config_files": [str(appservice)],
    }))
    (data / "localhost.signing.key").write_text("ed25519 a_abcd dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3Q\n")
    db = sqlite3.connect(data / "homeserver.db")
    db.execute("CREATE TABLE users (name TEXT)")
    db.execute("INSERT INTO users VALUES ('@alice:localhost')")
    db.commit()
    db.close()
    return {**isolated_env(root, server_name="localhost"), "SYNAPSE_CONFIG_PATH": str(data / "homeserver.yaml")}


def test_a_sqlite_monolith_through_the_commands(tmp_path):
    env = official_sqlite_server(tmp_path / "old")
    out = tmp_path / "backups"
    made = run(env, "backup", "-o", str(out))
    assert made.returncode == 0, made.stderr
    assert "database: SQLite copy of" in made.stderr and "done: " in made.stderr
    backup = bk.complete_backups(out)[0]
    manifest = json.loads((backup / "manifest.json").read_text())
    names = {f["path"] for f in manifest["files"]}
    assert {"database.sqlite", "config/homeserver.yaml", "data/localhost.signing.key", "files/0/bridge.yaml",
            "media/local_content/xy/zzz"} == names
    bridge = str(tmp_path / "old/appservices/bridge.yaml")
    assert manifest["extras"] == [{"file": "files/0/bridge.yaml", "path": bridge}]
    assert manifest["database"]["kind"] == "sqlite"
    assert run({}, "backup", "--verify", str(backup)).returncode == 0
    new_env = {**env, "SYNAPSE_DATA_DIR": str(tmp_path / "new/data"), "SYNAPSE_CONFIG_DIR": str(tmp_path / "new/data"),
               "SYNAPSE_CONFIG_PATH": str(tmp_path / "new/data/homeserver.yaml"),
               "SYNAPSE_RUNTIME_DIR": str(tmp_path / "new/run")}
    restored = run(new_env, "restore", str(backup))
    assert restored.returncode == 0, restored.stderr
    doc = yaml.safe_load((tmp_path / "new/data/homeserver.yaml").read_text())
    assert doc["database"]["args"]["database"] == str(tmp_path / "new/data/homeserver.db")
    assert doc["app_service_config_files"] == [str(tmp_path / "old/appservices/bridge.yaml")]  # there, identical
    db = sqlite3.connect(tmp_path / "new/data/homeserver.db")
    assert db.execute("SELECT name FROM users").fetchall() == [("@alice:localhost",)]
    db.close()
    assert (tmp_path / "new/data/media_store/local_content/xy/zzz").read_bytes() == b"media bytes"


def test_pg_dump_is_the_newest_installed_majors_not_the_clusters_own(tmp_path, monkeypatch):
    """pg_dump dumps its own major and older servers, never newer ones: a cluster of 14 beside 14's and 15's binaries
    (and 16's psql alone) is dumped with 15's pg_dump, although it runs with its own 14's (postgres_bin)."""
    from synapse_workers.run import postgres

    def program(major: str, name: str, executable: bool = True) -> str:
        path = tmp_path / "pg" / major / "bin" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755 if executable else 0o644)
        return str(path)

    for major in ("9.6", "14", "15"):
        program(major, "postgres")
    program("9.6", "pg_dump")  # PG_VERSION's form before 10: older than 14
    own, newest = program("14", "pg_dump"), program("15", "pg_dump")
    program("16", "psql")  # a newer client without pg_dump
    program("17", "pg_dump", executable=False)  # not a program
    program("tools", "pg_dump")  # not a major
    monkeypatch.setattr(postgres, "PG_ROOT", str(tmp_path / "pg"))
    cluster = tmp_path / "cluster"
    cluster.mkdir()
    (cluster / "PG_VERSION").write_text("14\n")
    assert postgres.postgres_bin(str(cluster)) == os.path.dirname(own)  # the cluster runs with its own binaries
    assert bk.pg_tool("pg_dump", 14) == (newest, 15)
    assert bk.pg_tool("pg_dump", 15) == (newest, 15)
    assert bk.pg_tool("pg_dump") == (newest, 15)
    with pytest.raises(bk.BackupError, match=r"pg_dump 15 \(.*/15/bin/pg_dump\) cannot work with a PostgreSQL 16"):
        bk.pg_tool("pg_dump", 16)


def test_restore_moves_the_paths_of_port_sqlites_marker_with_homeserver_yamls(server, tmp_path):
    """The marker names the SQLite file it was ported from; `load` refuses one naming another file than
    homeserver.yaml does, so restore moves its paths as homeserver.yaml's (the rest of it byte for byte the same)."""
    sources, data = server
    marker = {
        "format": 1,
        "homeserver_yaml": f"{data}/homeserver.yaml",
        "sqlite_database": f"{data}/homeserver.db",
        "sqlite_sha256": "ab" * 32,
        "postgres_data_dir": f"{data}/postgres",
        "ported_at": "2026-12-06T04:00:00Z",
    }
    (data / "synapse-workers-postgres.json").write_text(json.dumps(marker, indent=2) + "\n")
    path, _ = backup_now(sources, tmp_path / "backups")
    target = tmp_path / "elsewhere"
    assert rs.run_restore(restore_env(target), str(path), io.StringIO()) == 0
    new = target / "data"
    moved = json.loads((new / "synapse-workers-postgres.json").read_text())
    assert moved == {
        **marker,
        "homeserver_yaml": f"{new}/homeserver.yaml",
        "sqlite_database": f"{new}/homeserver.db",
        "postgres_data_dir": f"{new}/postgres",
    }
    doc = yaml.safe_load((new / "homeserver.yaml").read_text())
    assert doc["database"]["args"]["database"] == moved["sqlite_database"]
