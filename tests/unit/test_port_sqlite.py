"""A ported SQLite database (`port-sqlite`'s marker in the data dir): what the plan, shared.yaml, the access check,
the SQLite-only refusals and `plan --json` make of it, with the user's homeserver.yaml never written. Fast: no port
runs here (tests/integration/test_port_sqlite.py ports a real server). Synapse's own config merge
(`read_config_files`: later --config-path files win per top-level key) is the oracle of which database it uses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from synapse.config._base import read_config_files

from synapse_workers.cli import main as cli_main
from synapse_workers.errors import File, UserError
from synapse_workers.files import write_files
from synapse_workers.load import load_plan
from synapse_workers.render import render_all
from synapse_workers.run import access
from synapse_workers.run.port_sqlite import Progress, cluster_problems
from tests.conftest import isolated_env

MARKER = "synapse-workers-postgres.json"


def official(root: Path, database: dict | None = None, **extra: str) -> tuple[Path, dict[str, str]]:
    """The official image's data dir (homeserver.yaml on SQLite), our env naming it; no marker yet."""
    data = root / "data"
    data.mkdir()
    doc = {
        "server_name": "example.test",
        "listeners": [{"port": 8008, "type": "http", "resources": [{"names": ["client", "federation"]}]}],
        "database": database or {"name": "sqlite3", "args": {"database": f"{data}/homeserver.db"}},
        "signing_key_path": f"{data}/example.test.signing.key",
        "media_store_path": f"{data}/media_store",
        "report_stats": False,
    }
    (data / "homeserver.yaml").write_text(yaml.safe_dump(doc))
    (data / "homeserver.db").write_bytes(b"SQLite format 3\x00")
    env = {**isolated_env(root), "SYNAPSE_CONFIG_PATH": str(data / "homeserver.yaml"), **extra}
    del env["SYNAPSE_SERVER_NAME"]
    return data, env


def mark(data: Path, sqlite: str | None = None, ported_at: str = "2026-12-06T04:00:00Z") -> Path:
    marker = data / MARKER
    marker.write_text(json.dumps({"sqlite_database": sqlite or str(data / "homeserver.db"), "ported_at": ported_at}))
    return marker


def synapse_database(plan, files: dict[str, str], tmp: Path) -> dict:
    """The `database` section main's Synapse reads: its config files merged as Synapse merges them."""
    written = []
    for path in plan.main.config_files:
        if path == plan.homeserver.path:
            written.append(path)
            continue
        copy = tmp / f"{len(written)}.yaml"
        copy.write_text(files[path])
        written.append(str(copy))
    return read_config_files(written)["database"]


def test_without_the_marker_the_file_is_sqlite_and_workers_are_refused_naming_the_command_and_the_switch(tmp_root):
    data, env = official(tmp_root)
    plan = load_plan(env)
    assert plan.homeserver.database == "sqlite" and plan.postgres is None and plan.homeserver.sqlite_port is None
    with pytest.raises(UserError) as refused:
        load_plan({**env, "SYNAPSE_WORKER_TYPES": "synchrotron"})
    (problem,) = refused.value.problems
    assert "`synapse-workers port-sqlite`" in problem and "SYNAPSE_PORT_SQLITE=on" in problem
    assert [v.name for v in refused.value.details[0].related] == ["SYNAPSE_PORT_SQLITE"]
    with pytest.raises(UserError) as refused:  # `check`/`plan` with the switch on: `run` would port first
        load_plan({**env, "SYNAPSE_WORKER_TYPES": "synchrotron", "SYNAPSE_PORT_SQLITE": "on"})
    assert "SYNAPSE_PORT_SQLITE is on: `synapse-workers run` ports it before anything starts" in str(refused.value)


def test_with_the_marker_the_embedded_cluster_is_the_database_layered_over_the_untouched_file(tmp_root):
    data, env = official(tmp_root, SYNAPSE_WORKER_TYPES="synchrotron,event_persister")
    mark(data)
    before = (data / "homeserver.yaml").read_bytes()
    plan = load_plan(env)
    hs = plan.homeserver
    assert (hs.database, hs.sqlite_database) == ("postgres", None)
    assert hs.database_host == plan.layout.postgres_socket_dir == f"{tmp_root}/run/postgresql"
    assert plan.postgres is not None and plan.postgres.data_dir == f"{data}/postgres"
    files = render_all(plan)
    assert str(data / "homeserver.yaml") not in {**files.managed, **files.once}
    database = synapse_database(plan, files.managed, tmp_root)
    assert database == {
        "name": "psycopg2",
        "txn_limit": 10000,
        "args": {
            "user": "synapse",
            "dbname": "synapse",
            "host": f"{tmp_root}/run/postgresql",
            "passfile": f"{data}/embedded_postgres.pgpass",
            "cp_min": 1,
            "cp_max": 5,
        },
    }
    write_files(plan, files)
    assert (data / "homeserver.yaml").read_bytes() == before
    assert (data / "embedded_postgres.pgpass").stat().st_mode & 0o777 == 0o600  # the passfile it names exists


def test_without_the_marker_shared_yaml_sets_no_database(tmp_root):
    data, env = official(tmp_root)
    plan = load_plan(env)
    database = synapse_database(plan, render_all(plan).managed, tmp_root)
    assert database == {"name": "sqlite3", "args": {"database": f"{data}/homeserver.db"}}


def test_several_hosts_layer_the_cluster_over_tcp(tmp_root):
    data, env = official(
        tmp_root,
        SYNAPSE_WORKER_TYPES="synchrotron",
        SYNAPSE_HOSTS="a=10.0.0.1,b=10.0.0.2",
        SYNAPSE_PLACEMENT="synchrotron=b",
    )
    mark(data)
    plan = load_plan(env, "a")
    database = synapse_database(plan, render_all(plan).managed, tmp_root)
    assert database["args"]["host"] == "10.0.0.1" and database["args"]["port"] == 5432


def test_plan_json_shows_the_port(tmp_root, capsys):
    data, env = official(tmp_root)
    assert cli_main(["plan", "--json"], env) == 0
    assert json.loads(capsys.readouterr().out)["sqlite_port"] is None
    marker = mark(data)
    assert cli_main(["plan", "--json"], env) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sqlite_port"] == {
        "marker": str(marker),
        "sqlite_database": str(data / "homeserver.db"),
        "ported_at": "2026-12-06T04:00:00Z",
    }
    assert shown["postgres"]["data_dir"] == f"{data}/postgres"
    assert cli_main(["plan"], env) == 0
    ported = f"  database: the embedded PostgreSQL, ported from {data}/homeserver.db at 2026-12-06T04:00:00Z"
    assert ported in capsys.readouterr().out.splitlines()


def test_a_marker_of_another_sqlite_file_is_refused(tmp_root):
    data, env = official(tmp_root)
    marker = mark(data, sqlite="/elsewhere/homeserver.db")
    with pytest.raises(UserError) as refused:
        load_plan(env)
    (detail,) = refused.value.details
    assert detail.subject == File(str(marker)) and "'/elsewhere/homeserver.db'" in str(detail)
    assert "port-sqlite --force" in str(detail)


@pytest.mark.parametrize("text", ["{", "[]", '{"sqlite_database": 1}'])
def test_an_unreadable_marker_is_refused(tmp_root, text):
    data, env = official(tmp_root)
    (data / MARKER).write_text(text)
    with pytest.raises(UserError) as refused:
        load_plan(env)
    (detail,) = refused.value.details
    assert detail.subject == File(str(data / MARKER)) and "cannot be read" in str(detail)


def test_a_postgres_homeserver_yaml_ignores_a_marker(tmp_root):
    """The user's own database section names PostgreSQL: the file wins, the marker says nothing more."""
    database = {"name": "psycopg2", "args": {"host": "db.example", "user": "s", "password": "x", "dbname": "s"}}
    data, env = official(tmp_root, database)
    mark(data)
    plan = load_plan(env)
    assert plan.homeserver.sqlite_port is None and plan.postgres is None
    assert "database" not in yaml.safe_load(render_all(plan).managed[plan.layout.shared_config])


def test_the_compressor_and_compress_state_follow_the_effective_database(tmp_root, capsys):
    data, env = official(tmp_root, SYNAPSE_ENABLE_COMPRESSOR="on")
    with pytest.raises(UserError) as refused:
        load_plan(env)
    assert "`synapse-workers port-sqlite`" in refused.value.problems[0]
    assert cli_main(["compress-state"], {**env, "SYNAPSE_ENABLE_COMPRESSOR": "off"}) == 2
    assert "uses SQLite" in capsys.readouterr().err
    mark(data)
    assert [job.name for job in load_plan(env).jobs] == ["compress-state"]
    assert cli_main(["compress-state"], env) == 1  # on PostgreSQL now: only the stack is not running
    assert "start the stack first" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="the access check probes as Synapse's user")
def test_the_access_check_needs_the_sqlite_file_only_without_the_marker(tmp_root):
    os.chmod(tmp_root, 0o755)
    data, env = official(tmp_root)
    wanted = {need.path for need in access.needs(load_plan(env), "/")}
    assert str(data / "homeserver.db") in wanted
    mark(data)
    wanted = {need.path for need in access.needs(load_plan(env), "/")}
    assert str(data / "homeserver.db") not in wanted


def test_a_marker_without_its_cluster_refuses_to_start_an_empty_server(tmp_root):
    data, env = official(tmp_root)
    assert cluster_problems(load_plan(env)) == []  # on SQLite
    mark(data)
    (problem,) = cluster_problems(load_plan(env))
    assert problem.subject == File(f"{data}/postgres") and "holds no cluster" in problem
    (data / "postgres").mkdir()
    (data / "postgres" / "PG_VERSION").write_text("15\n")
    assert cluster_problems(load_plan(env)) == []


def test_port_sqlite_refusals_change_nothing(tmp_root, capsys):
    data, env = official(tmp_root)
    marker = mark(data)
    assert cli_main(["port-sqlite"], env) == 2
    err = capsys.readouterr().err
    assert "port-sqlite: already ported" in err and "--force" in err
    assert json.loads(marker.read_text())["ported_at"] == "2026-12-06T04:00:00Z"
    assert not (data / "postgres").exists() and not (tmp_root / "run").exists()

    marker.unlink()
    (data / "homeserver.db").unlink()
    assert cli_main(["port-sqlite"], env) == 2
    assert "is not a file: nothing to port" in capsys.readouterr().err

    (tmp_root / "pg").mkdir()
    other, env = official(tmp_root / "pg", {"name": "psycopg2", "args": {"host": "db.example"}})
    assert cli_main(["port-sqlite"], env) == 2
    assert "does not use SQLite" in capsys.readouterr().err
    assert not (other / "postgres").exists()


def test_progress_summarises_synapse_port_db_output(capsys):
    progress = Progress(started=100.0, last=100.0)
    progress.line("Preparing sqlite3...\n", 101.0)
    progress.line("2026-12-06 04:00:00,000 - synapse.storage - 1 - INFO - a log line\n", 101.5)
    progress.line("events: 10% (100/1000)\n", 102.0)  # within 5 s of the last word: kept, not said
    progress.line("events: 100% (1000/1000)\n", 107.0)
    progress.line("users: 50% (1/2)\n", 108.0)
    progress.quiet(130.0)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "synapse-workers: port-sqlite: Preparing sqlite3... (1 s)",
        "synapse-workers: port-sqlite: copying: 1 of 1 tables started so far are done, 1000 rows; events 100% "
        "(1000/1000)",
        "synapse-workers: port-sqlite: still running (30 s)",
    ]
    assert list(progress.tail) == ["2026-12-06 04:00:00,000 - synapse.storage - 1 - INFO - a log line"]
    assert progress.summary() == "1001 rows in 2 tables"


def test_the_switch_warns_when_there_is_nothing_to_port(tmp_root):
    from synapse_workers.start_warnings import Facts, start_warnings

    def said(env: dict[str, str]) -> list[str]:
        return [w for w in start_warnings(load_plan(env), env, Facts()) if "SYNAPSE_PORT_SQLITE" in w]

    data, env = official(tmp_root, SYNAPSE_PORT_SQLITE="on")
    assert said(env) == []  # SQLite: run ports it first
    mark(data)
    assert said(env) == []  # ported: it did its job
    (tmp_root / "pg").mkdir()
    _, env = official(tmp_root / "pg", {"name": "psycopg2", "args": {"host": "db.example"}}, SYNAPSE_PORT_SQLITE="on")
    (warning,) = said(env)
    assert "does nothing" in warning and "uses PostgreSQL" in warning
