"""Before the start, every path Synapse's user needs is checked as that user (run/access.py).

Real files owned by root and a real UID (991, Synapse's in tests: the tests run as root), a forked child that
drops privileges as setpriv does; the expected commands are written out by hand."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from synapse_workers.errors import YamlPath
from synapse_workers.load import load_plan
from synapse_workers.run import access
from synapse_workers.run.access import LAUNCHER, READ, READ_WRITE, SYNAPSE, WRITE_DIR, Fact, Need, problems
from tests.conftest import isolated_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="checks as another user need root")

UID = 991


@pytest.fixture
def root(tmp_root):
    os.chmod(tmp_root, 0o755)  # mkdtemp's 0700 would stop UID 991 on the way to everything
    return tmp_root


def homeserver(root: Path, **extra) -> dict[str, str]:
    """An official image's data dir: homeserver.yaml naming its signing key, media store, SQLite database and
    log config under /data (here root/data), everything owned by 991 as the official image's chown leaves it."""
    data = root / "data"
    data.mkdir()
    doc = {
        "server_name": "example.test",
        "listeners": [{"port": 8008, "type": "http", "resources": [{"names": ["client", "federation"]}]}],
        "database": {"name": "sqlite3", "args": {"database": f"{data}/homeserver.db"}},
        "signing_key_path": f"{data}/example.test.signing.key",
        "media_store_path": f"{data}/media_store",
        "log_config": f"{data}/example.test.log.config",
        **extra,
    }
    (data / "homeserver.yaml").write_text(yaml.safe_dump(doc))
    (data / "example.test.signing.key").write_text("ed25519 a_abcd xxxx\n")
    (data / "homeserver.db").write_text("")
    (data / "media_store").mkdir()
    for path in [data, *data.iterdir()]:
        os.chown(path, UID, UID)
    os.chmod(data / "example.test.signing.key", 0o600)
    env = isolated_env(root)
    env["SYNAPSE_CONFIG_PATH"] = str(data / "homeserver.yaml")
    return env


def check(env: dict[str, str]) -> list[str]:
    return access.check(load_plan(env), as_root=True)


def test_an_official_image_data_dir_passes(root):
    assert check(homeserver(root)) == []


def test_a_signing_key_made_by_root_is_named_with_its_chown(root):
    env = homeserver(root)
    key = root / "data" / "example.test.signing.key"
    os.chown(key, 0, 0)
    found = check(env)
    assert found == [
        f"{key} (signing_key_path in {root}/data/homeserver.yaml) is not accessible to UID=991/GID=991 (Synapse's "
        f"user): it cannot read it. Run as root: `chown 991:991 {key}`."
    ]
    assert (key.stat().st_uid, key.stat().st_mode & 0o777) == (0, 0o600)  # nothing re-owned


def test_a_problem_names_the_homeserver_yaml_key_or_variable_its_path_comes_from(root):
    """The data of each problem (check --json): the key of the user's file the path was read from."""
    env = homeserver(root)
    key = root / "data" / "example.test.signing.key"
    os.chown(key, 0, 0)
    os.chown(root / "data" / "media_store", 0, 0)
    found = check(env)
    assert [p.subject for p in found[:2]] == [
        YamlPath(f"{root}/data/homeserver.yaml", "signing_key_path"),
        YamlPath(f"{root}/data/homeserver.yaml", "media_store_path"),
    ]
    assert found[0].found == str(key) and "can read" in found[0].expected
    assert found[2].subject is None  # the summary of every command: about no one path


def test_a_root_owned_data_dir_without_media_store_names_every_problem_at_once(root):
    env = homeserver(root)
    data = root / "data"
    (data / "media_store").rmdir()
    os.chown(data, 0, 0)
    found = check(env)
    media = f"{data}/media_store"
    assert found[0].startswith(f"{media} (media_store_path in {data}/homeserver.yaml) does not exist, ")
    assert f"`mkdir -p {media} && chown 991:991 {media}`" in found[0]
    assert found[1] == (  # SQLite writes its journal next to the database
        f"{data} (the directory of {data}/homeserver.db, the SQLite database in {data}/homeserver.yaml) is not "
        f"accessible to UID=991/GID=991 (Synapse's user): it cannot write in it. Run as root: "
        f"`chown 991:991 {data}`."
    )
    assert found[-1].endswith(f"`mkdir -p {media} && chown 991:991 {media}` && `chown 991:991 {data}`")
    assert not (data / "media_store").exists()


def test_a_root_owned_data_dir_is_fine_when_synapse_writes_nothing_in_it(root):
    """PostgreSQL, and the media store already Synapse's: Synapse only passes through the data dir."""
    env = homeserver(root, database={"name": "psycopg2", "args": {"user": "synapse", "host": "db"}})
    data = root / "data"
    (data / "homeserver.db").unlink()
    os.chown(data, 0, 0)
    os.chmod(data, 0o755)
    assert check({**env, "POSTGRES_PASSWORD": "x" * 16}) == []
    os.chmod(data, 0o750)  # now 991 (other) cannot even enter it
    assert check({**env, "POSTGRES_PASSWORD": "x" * 16})[0] == (
        f"{data} (SYNAPSE_DATA_DIR) is not accessible to UID=991/GID=991 (Synapse's user): it cannot enter it. "
        f"Run as root: `chown 991:991 {data}`."
    )


def test_supplementary_groups_are_dropped_as_setpriv_drops_them(root):
    """root:root 0640: root's own group would read it; Synapse runs with --clear-groups, so it cannot."""
    env = homeserver(root)
    key = root / "data" / "example.test.signing.key"
    os.chown(key, UID, 0)
    os.chmod(key, 0o040)  # group root may read, the owner may not
    assert 0 in os.getgroups() or os.getgid() == 0
    assert len(check(env)) == 1
    os.chown(key, 0, UID)  # group GID=991 may read: Synapse's primary group counts
    assert check(env) == []


def test_a_directory_on_the_way_that_cannot_be_entered(root):
    env = homeserver(root)
    data = root / "data"
    os.chmod(root, 0o750)  # root-owned, group root: 991 falls in "other"
    found = check(env)
    assert found[0] == (
        f"{data} (SYNAPSE_DATA_DIR) is not accessible to UID=991/GID=991 (Synapse's user): it cannot enter "
        f"{root} on the way. Run as root: `chmod o+x {root}`."
    )
    assert len([line for line in found if line.endswith(f"`chmod o+x {root}`.")]) == 1  # named once
    assert found[-1].startswith("synapse-workers changes the owner of nothing it did not create.") is False


def test_media_written_by_root_is_named_with_a_recursive_chown(root):
    """The original synapse-workers image ran Synapse as root: its media dirs are root's."""
    env = homeserver(root)
    media = root / "data" / "media_store"
    (media / "local_content" / "ab").mkdir(parents=True)
    os.chown(media / "local_content", UID, UID)
    found = check(env)
    assert found == [
        f"{media} (media_store_path in {root}/data/homeserver.yaml) holds directories UID=991/GID=991 (Synapse's "
        f"user) cannot write in ({media}/local_content/ab): uploads and thumbnails there would fail. "
        f"Run as root: `chown -R 991:991 {media}`."
    ]


def test_an_unwritable_sqlite_database_and_appservice_and_log_files(root):
    data = root / "data"
    env = homeserver(root, app_service_config_files=[f"{root}/bridge.yaml"])
    (root / "bridge.yaml").write_text("id: bridge\n")
    os.chmod(root / "bridge.yaml", 0o600)  # root's
    os.chown(data / "homeserver.db", 0, 0)
    log_config = root / "log.yaml"
    log_config.write_text(yaml.safe_dump({"version": 1, "handlers": {"file": {"filename": f"{root}/logs/hs.log"}}}))
    env["SYNAPSE_LOG_CONFIG"] = str(log_config)
    found = check(env)
    assert f"{data}/homeserver.db (the SQLite database in {data}/homeserver.yaml) is not accessible to " \
           "UID=991/GID=991 (Synapse's user): it cannot write it." in found[0]
    assert found[1] == (
        f"{root}/bridge.yaml (an application service registration file) is not accessible to UID=991/GID=991 "
        f"(Synapse's user): it cannot read it. Run as root: `chown 991:991 {root}/bridge.yaml`."
    )
    assert found[2].startswith(f"{root}/logs/hs.log (a log file SYNAPSE_LOG_CONFIG's handlers write) does not exist, ")
    assert f"Run as root: `chown 991:991 {root}`." in found[2]


def test_tls_files_of_a_tls_listener_are_checked_for_nginx_not_synapse(root):
    data = root / "data"
    listeners = [
        {"port": 8008, "type": "http", "resources": [{"names": ["client"]}]},
        {"port": 8448, "type": "http", "tls": True, "resources": [{"names": ["federation"]}]},
    ]
    env = homeserver(root, listeners=listeners, tls_certificate_path=f"{data}/tls.crt",
                     tls_private_key_path=f"{data}/tls.key")
    (data / "tls.crt").write_text("cert")
    (data / "tls.key").write_text("key")
    os.chmod(data / "tls.key", 0o600)  # root's, 0600: nginx's master (root) reads it, Synapse never does
    plan = load_plan(env)
    wanted = access.needs(plan, "/")
    assert Need(f"{data}/tls.key", READ, f"tls_private_key_path in {data}/homeserver.yaml", who=LAUNCHER) in wanted
    assert access.check(plan, as_root=True) == []
    os.unlink(data / "tls.crt")
    assert access.check(plan, as_root=True) == [
        f"{data}/tls.crt (tls_certificate_path in {data}/homeserver.yaml) does not exist: expected an existing file."
    ]


# ---- the pure decision, on facts written by hand ----------------------------------------------------------


def _dir(uid=0, gid=0, mode=0o755, w=False, x=True) -> Fact:
    return Fact(True, True, uid, gid, mode, True, w, x)


def test_the_permission_class_of_a_blocking_directory_is_the_one_that_applies():
    need = Need("/srv/data", WRITE_DIR, "SYNAPSE_DATA_DIR")
    for owner, group, klass in ((UID, 0, "u"), (0, UID, "g"), (0, 0, "o")):
        facts = {
            (SYNAPSE, "/"): _dir(),
            (SYNAPSE, "/srv"): _dir(owner, group, 0o600, x=False),
            (SYNAPSE, "/srv/data"): _dir(UID, UID, w=True),
        }
        assert problems([need], facts, UID, UID) == [
            "/srv/data (SYNAPSE_DATA_DIR) is not accessible to UID=991/GID=991 (Synapse's user): it cannot "
            f"enter /srv on the way. Run as root: `chmod {klass}+x /srv`."
        ]


def test_missing_paths_we_create_are_fine_and_others_are_named():
    facts = {(SYNAPSE, "/"): _dir(), (SYNAPSE, "/data"): _dir(), (SYNAPSE, "/data/x"): Fact(False)}
    assert problems([Need("/data/x", WRITE_DIR, "ours", ours=True)], facts, UID, UID) == []
    assert problems([Need("/data/x", READ, "an appservice")], facts, UID, UID) == [
        "/data/x (an appservice) does not exist: expected an existing file."
    ]
    assert problems([Need("/data/x", READ_WRITE, "a db", create=True)], facts, UID, UID) == [
        "/data/x (a db) does not exist, and UID=991/GID=991 (Synapse's user) cannot create it: /data does "
        "not let it write. Run as root: `chown 991:991 /data`."
    ]


def test_a_new_sqlite_install_in_a_data_dir_we_create(tmp_root):
    """A generated SQLite homeserver in a data dir that does not exist yet: we create the dir for Synapse's
    user, so the database's future parent is not the root-owned dir above it."""
    os.chmod(tmp_root, 0o755)
    env = {**isolated_env(tmp_root), "SYNAPSE_DATABASE": "sqlite"}
    assert not (tmp_root / "data").exists()
    assert check(env) == []
    (tmp_root / "data").mkdir()  # now it exists, root's: Synapse could not create homeserver.db there
    assert f"`chown 991:991 {tmp_root}/data`" in check(env)[0]
