"""The embedded cluster's major against the installed binaries (PG_VERSION and /usr/lib/postgresql/<major>/bin as
data: a tree made here), upgrade-postgres's refusals before it changes anything, and the external database's
connection budget (the numbers of the warning)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
from twisted.enterprise.adbapi import ConnectionPool

from synapse_workers.cli import _warn_start
from synapse_workers.cli import main as cli_main
from synapse_workers.errors import File, UserError
from synapse_workers.load import load_plan
from synapse_workers.plan import POSTGRES_CP_MAX, postgres_max_connections
from synapse_workers.run import pgupgrade, postgres
from synapse_workers.run.preflight import ServerLimits, _pool_max, connection_problem

NAMES = tuple(dict.fromkeys(pgupgrade.NEEDED_OLD + pgupgrade.NEEDED_NEW))


def _fake_bindir(root: Path, major: str, version: str | None = None) -> Path:
    """A bin dir whose programs answer `-V` as PostgreSQL's `postgres -V` does."""
    bindir = root / major / "bin"
    bindir.mkdir(parents=True)
    for name in NAMES:
        script = bindir / name
        script.write_text(f"#!/bin/sh\necho 'postgres (PostgreSQL) {version or major + '.3'}'\n")
        script.chmod(0o755)
    return bindir


@pytest.fixture
def embedded(base_env, tmp_path, monkeypatch):
    """An embedded-cluster plan and a PG_ROOT of our own (no major installed yet)."""
    pg_root = tmp_path / "postgresql"
    pg_root.mkdir()
    monkeypatch.setattr(postgres, "PG_ROOT", str(pg_root))
    env = {k: v for k, v in base_env.items() if k != "POSTGRES_PASSWORD"}
    plan = load_plan(env)
    assert plan.postgres is not None
    return plan, pg_root, env


def _cluster(plan, major: str) -> Path:
    data = Path(plan.postgres.data_dir)
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text(f"{major}\n")
    return data


def test_a_new_cluster_gets_the_newest_major_and_an_existing_one_its_own(embedded):
    plan, pg_root, _ = embedded
    for major in ("9.6", "14", "15"):
        _fake_bindir(pg_root, major)
    assert list(postgres.installed_majors()) == ["9.6", "14", "15"]  # numeric order, not text order
    assert postgres.postgres_bin(plan.postgres.data_dir) == f"{pg_root}/15/bin"  # no cluster yet
    _cluster(plan, "14")
    assert postgres.postgres_bin(plan.postgres.data_dir) == f"{pg_root}/14/bin"
    assert postgres.version_problems(plan) == []
    warning = postgres.version_warning(plan)
    assert warning is not None and "is PostgreSQL 14: it runs with 14's binaries" in warning
    assert "PostgreSQL 15 is installed too" in warning and "`synapse-workers upgrade-postgres`" in warning
    assert warning.subject == File(plan.postgres.data_dir)


def test_a_cluster_of_a_major_not_installed_is_refused_naming_both(embedded):
    plan, pg_root, _ = embedded
    _fake_bindir(pg_root, "15")
    data = _cluster(plan, "14")
    (problem,) = postgres.version_problems(plan)
    assert f"The embedded PostgreSQL cluster in {data} was made by PostgreSQL 14" in problem
    assert f"PostgreSQL 15's binaries ({pg_root}/15/bin)" in problem
    assert "`synapse-workers upgrade-postgres`" in problem and "`synapse-workers restore PATH`" in problem
    assert problem.subject == File(str(data)) and problem.found == "a cluster of PostgreSQL 14; binaries here: 15"
    assert postgres.version_warning(plan) is None
    assert postgres.postgres_bin(str(data)) == f"{pg_root}/15/bin"  # what find_binaries names; never started


def test_a_cluster_newer_than_every_binary_is_refused_without_an_upgrade(embedded):
    plan, pg_root, _ = embedded
    _fake_bindir(pg_root, "15")
    _cluster(plan, "18")
    (problem,) = postgres.version_problems(plan)
    assert "made by PostgreSQL 18, newer than the binaries installed here (PostgreSQL 15" in problem
    assert "upgrade-postgres" not in problem


def test_no_cluster_or_the_same_major_is_no_problem(embedded):
    plan, pg_root, _ = embedded
    _fake_bindir(pg_root, "15")
    assert postgres.version_problems(plan) == [] and postgres.version_warning(plan) is None
    _cluster(plan, "15")
    assert postgres.version_problems(plan) == [] and postgres.version_warning(plan) is None


def test_check_refuses_the_cluster_before_writing(embedded, capsys):
    plan, pg_root, env = embedded
    _fake_bindir(pg_root, "15")
    _cluster(plan, "14")
    assert cli_main(["check"], env) == 2
    assert "was made by PostgreSQL 14" in capsys.readouterr().err
    assert not os.path.exists(plan.layout.shared_config)


def test_binary_major_reads_postgres_version(tmp_path):
    assert pgupgrade.binary_major(str(_fake_bindir(tmp_path, "14", "14.22"))) == "14"
    assert pgupgrade.binary_major(str(_fake_bindir(tmp_path, "9.6", "9.6.24"))) == "9.6"
    assert pgupgrade.binary_major(str(tmp_path / "nothing")) is None


def test_upgrade_refusals_change_nothing(embedded, tmp_path):
    plan, pg_root, _ = embedded
    _fake_bindir(pg_root, "15")
    data = _cluster(plan, "14")

    def refused(old_bindir: str | None = None) -> str:
        with pytest.raises(UserError) as caught:
            pgupgrade.upgrade(plan, os.geteuid() == 0, "/usr/bin/setpriv", old_bindir, link=False)
        return str(caught.value)

    assert "needs PostgreSQL 14's server binaries" in refused() and "postgresql-14" in refused()
    other = _fake_bindir(tmp_path / "other", "13")
    assert "holds PostgreSQL 13, but the cluster was made by PostgreSQL 14" in refused(str(other))
    assert "pg_controldata is missing" in refused(str(_partial(tmp_path)))
    old = _fake_bindir(tmp_path / "old", "14")
    (data.parent / "postgres.old-14").mkdir()
    assert "postgres.old-14 exists (an earlier upgrade kept it)" in refused(str(old))
    (pg_root / "15" / "bin" / "pg_upgrade").unlink()
    assert "PostgreSQL 15's pg_upgrade missing from" in refused(str(old))
    assert sorted(p.name for p in data.parent.iterdir()) == ["postgres", "postgres.old-14"]
    assert [p.name for p in data.iterdir()] == ["PG_VERSION"]


def _partial(tmp_path: Path) -> Path:
    bindir = _fake_bindir(tmp_path / "partial", "14")
    (bindir / "pg_controldata").unlink()
    return bindir


def test_upgrade_of_no_embedded_cluster_is_refused(base_env):
    plan = load_plan(base_env)  # external PostgreSQL
    with pytest.raises(UserError, match="upgrades the embedded PostgreSQL cluster, and this deployment has none"):
        pgupgrade.upgrade(plan, False, "/usr/bin/setpriv", None, link=False)


# ---- the external database's connection budget ----------------------------------------------------------


def test_our_pool_size_is_synapse_s_default():
    # No cp_max in homeserver.yaml: Synapse passes none to Twisted's ConnectionPool, whose own default applies.
    assert ConnectionPool.max == POSTGRES_CP_MAX


@pytest.mark.parametrize(
    ("workers", "limits", "expected"),
    [
        # 21 processes x 5 + 20 = 125 > 100 - 3 reserved - 0 others = 97
        ("synchrotron:20", ServerLimits(100, 3, 0), "97 left for Synapse, but 21 Synapse processes x cp_max 5 + "
         "20 headroom = 125 connections"),
        # 2 processes x 5 + 20 = 30 > 40 - 3 - 10 = 27: other clients count
        ("synchrotron", ServerLimits(40, 3, 10), "27 left for Synapse, but 2 Synapse processes x cp_max 5 + "
         "20 headroom = 30 connections"),
        ("synchrotron", ServerLimits(100, 3, 10), None),  # 30 <= 87
        ("synchrotron:20", ServerLimits(125, 0, 0), None),  # exactly enough (a superuser: nothing reserved)
    ],
)
def test_a_server_too_small_for_the_pools_is_named_with_the_numbers(base_env, workers, limits, expected):
    plan = load_plan({**base_env, "SYNAPSE_WORKER_TYPES": workers})
    problem = connection_problem(plan, "db:5432", POSTGRES_CP_MAX, limits)
    if expected is None:
        assert problem is None
        return
    assert problem is not None and expected in problem, problem
    assert f"PostgreSQL at db:5432 has max_connections={limits.max_connections}" in problem
    needed = int(expected.split(" = ")[1].split()[0])
    assert f"to at least {needed + limits.reserved + limits.others}" in problem
    assert "cp_max" in problem and "SYNAPSE_WORKER_TYPES" in problem


def test_the_embedded_rule_and_the_external_check_agree(base_env):
    # The embedded cluster of 21 processes gets max_connections=125: an external server of that size is enough.
    plan = load_plan({**base_env, "SYNAPSE_WORKER_TYPES": "synchrotron:20"})
    size = postgres_max_connections(len(plan.processes))
    assert size == 125
    assert connection_problem(plan, "db", POSTGRES_CP_MAX, ServerLimits(size, 0, 0)) is None
    assert connection_problem(plan, "db", POSTGRES_CP_MAX, ServerLimits(size - 1, 0, 0)) is not None


def test_cp_max_comes_from_homeserver_yaml(tmp_path):
    path = tmp_path / "homeserver.yaml"
    path.write_text("database:\n  name: psycopg2\n  args:\n    cp_max: 10\n")
    assert _pool_max(str(path)) == 10
    path.write_text("database:\n  name: psycopg2\n  args:\n    user: synapse\n")
    assert _pool_max(str(path)) == POSTGRES_CP_MAX


def test_run_and_check_say_the_older_cluster_warning(embedded, capsys):
    plan, pg_root, env = embedded
    for major in ("14", "15"):
        _fake_bindir(pg_root, major)
    _cluster(plan, "14")
    args = argparse.Namespace(warnings=[])
    _warn_start(plan, env, args)  # what run and check say before they start or write anything
    assert postgres.version_warning(plan) in args.warnings
    assert "synapse-workers: warning: The embedded PostgreSQL cluster in" in capsys.readouterr().err
