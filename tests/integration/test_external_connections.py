"""An external PostgreSQL whose max_connections is below what the plan's Synapse processes may open (each its own
pool of cp_max, plus headroom) is named at start with the numbers, read from a real server: a warning, and the
stack still starts."""

from __future__ import annotations

import shutil
import subprocess

import psycopg2
import pytest

from synapse_workers.files import write_files
from synapse_workers.load import load_plan
from synapse_workers.render import render_all
from synapse_workers.run.preflight import check_external_database
from tests.support.pgcluster import BIN, PgCluster
from tests.support.stack import Stack, make_root, stack_env


@pytest.fixture
def root():
    path = make_root("sw-conn-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _warnings(env: dict[str, str]) -> list[str]:
    plan = load_plan(env)
    write_files(plan, render_all(plan))
    said: list[str] = []
    assert check_external_database(plan, print, lambda: False, wait=10, warn=said.append) == []  # never refused
    return said


def test_a_server_too_small_for_the_plan_is_named_with_its_numbers(root):
    # 5 Synapse processes x cp_max 5 + 20 = 45 connections; the server leaves 30 - 3 (superusers') = 27.
    with PgCluster(max_connections=30) as pg:
        (warning,) = _warnings(stack_env(root, "synchrotron:4", **pg.env()))
    assert f"PostgreSQL at 127.0.0.1:{pg.port} has max_connections=30 (3 reserved for superusers, " in warning
    assert "27 left for Synapse, but 5 Synapse processes x cp_max 5 + 20 headroom = 45 connections" in warning
    assert "to at least 48" in warning  # 45 + the 3 reserved (+ other clients' 0)


def test_other_clients_connections_count(root):
    # 2 processes x 5 + 20 = 30: enough room in 50 (47 for us) until another application holds 20 of them.
    with PgCluster(max_connections=50) as pg:
        env = stack_env(root, "synchrotron", **pg.env())
        assert _warnings(env) == []
        sql = "CREATE ROLE other LOGIN PASSWORD 'other-password';"
        subprocess.run(pg._as_owner([f"{BIN}/psql", "-X", "-q", "-h", str(pg.socket_dir), "-p", str(pg.port),
                                     "-U", pg.owner.pw_name, "-d", "postgres", "-c", sql]), check=True, cwd="/")
        with open(pg.data_dir / "pg_hba.conf", "a") as hba:
            hba.write("host    all   other   127.0.0.1/32   scram-sha-256\n")
        subprocess.run(pg._as_owner([f"{BIN}/pg_ctl", "-D", str(pg.data_dir), "reload"]), check=True, cwd="/",
                       capture_output=True)
        held = []
        try:
            for _ in range(20):
                held.append(psycopg2.connect(host=pg.host, port=pg.port, user="other", password="other-password",
                                             dbname="postgres"))
            (warning,) = _warnings(env)
        finally:
            for connection in held:
                connection.close()
    assert "(3 reserved for superusers, 20 held by other clients now): 27 left for Synapse" in warning
    assert "2 Synapse processes x cp_max 5 + 20 headroom = 30 connections" in warning and "at least 53" in warning


def test_the_stack_still_starts_and_says_the_warning(root):
    with PgCluster(max_connections=30) as pg:
        env = stack_env(root, "synchrotron", **pg.env())
        stack = Stack(env)
        try:
            stack.start()
            log = stack.log_path.read_text()
            code, _ = stack.stop()
        finally:
            stack.close()
    assert code == 0
    assert "synapse-workers: warning: PostgreSQL at 127.0.0.1" in log
    assert "2 Synapse processes x cp_max 5 + 20 headroom = 30 connections" in log
