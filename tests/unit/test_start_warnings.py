"""Settings that silently do nothing are named at start (start_warnings.py: plan → warnings, pure)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

from synapse_workers.load import load_plan
from synapse_workers.start_warnings import Facts, facts_here, start_warnings
from tests.conftest import isolated_env as _isolated_env

TEMPLATE = Path(__file__).parents[2] / "contrib" / "unraid" / "synapse-workers.xml"
IN_CONTAINER = Facts(in_container=True)


def isolated_env(root: Path) -> dict[str, str]:
    """The tests' isolated environment without its PROMETHEUS_PORT (which, without SYNAPSE_METRICS, is itself
    a setting that does nothing)."""
    env = _isolated_env(root)
    del env["PROMETHEUS_PORT"]
    return env


def warnings(env: dict[str, str], facts: Facts = IN_CONTAINER) -> list[str]:
    return start_warnings(load_plan(env), env, facts)


def existing(root: Path, **doc) -> dict[str, str]:
    data = root / "data"
    data.mkdir(exist_ok=True)
    path = data / "homeserver.yaml"
    path.write_text(yaml.safe_dump({"server_name": "example.test", **doc}))
    return {**isolated_env(root), "SYNAPSE_CONFIG_PATH": str(path)}


def test_an_unraid_template_left_at_its_defaults_warns_about_nothing(tmp_root):
    """Unraid passes every Variable with its Default (unraid-dockerman.md): defaults never warn, in a container."""
    env = {
        config.get("Target"): config.get("Default") or ""
        for config in ET.parse(TEMPLATE).getroot().iter("Config")
        if config.get("Type") == "Variable"
    }
    env.update(isolated_env(tmp_root))
    assert warnings(env) == []
    assert warnings({**env, **existing(tmp_root)}) == []  # a migrated server: generation-only defaults too


def test_exporter_switches_without_metrics(tmp_root):
    env = {
        **isolated_env(tmp_root),
        "SYNAPSE_WORKER_TYPES": "synchrotron",
        "SYNAPSE_ENABLE_REDIS_METRIC_EXPORT": "on",
        "SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT": "yes",
        "PROMETHEUS_PORT": "9191",
    }
    assert warnings(env) == [
        "SYNAPSE_ENABLE_REDIS_METRIC_EXPORT, SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT and PROMETHEUS_PORT do nothing "
        "without SYNAPSE_METRICS=on (the built-in Prometheus, the metrics listeners and the exporters all come "
        "with it)."
    ]
    env["SYNAPSE_METRICS"] = "on"
    assert warnings(env) == []


def test_the_redis_exporter_of_a_monolith_does_nothing(tmp_root):
    env = {**isolated_env(tmp_root), "SYNAPSE_METRICS": "on", "SYNAPSE_ENABLE_REDIS_METRIC_EXPORT": "on"}
    assert warnings(env) == [
        "SYNAPSE_ENABLE_REDIS_METRIC_EXPORT does nothing: the stack runs Redis only with workers "
        "(SYNAPSE_WORKER_TYPES)."
    ]


def test_builtin_coturn_in_a_container_without_an_external_ip(tmp_root):
    env = {**isolated_env(tmp_root), "SYNAPSE_ENABLE_BUILTIN_COTURN": "on"}
    found = warnings(env)
    assert len(found) == 1
    assert found[0].startswith("SYNAPSE_ENABLE_BUILTIN_COTURN is on in a container without COTURN_EXTERNAL_IP")
    assert "Set COTURN_EXTERNAL_IP" in found[0]
    assert warnings(env, Facts(in_container=False)) == []  # on a host, coturn sees the host's own addresses
    assert warnings({**env, "COTURN_EXTERNAL_IP": "203.0.113.7"}) == []


def test_coturn_settings_without_coturn(tmp_root):
    env = {**isolated_env(tmp_root), "COTURN_EXTERNAL_IP": "203.0.113.7", "COTURN_PORT": "3478"}  # 3478: default
    assert warnings(env) == ["COTURN_EXTERNAL_IP does nothing without SYNAPSE_ENABLE_BUILTIN_COTURN=on."]


def test_generation_only_variables_with_an_existing_file(tmp_root):
    env = {
        **existing(tmp_root),
        "SYNAPSE_ENABLE_REGISTRATION": "on",
        "SYNAPSE_URL_PREVIEW_ENABLED": "true",
        "SYNAPSE_ALLOW_GUEST": "off",  # the default: says nothing
    }
    path = f"{tmp_root}/data/homeserver.yaml"
    assert warnings(env) == [
        f"SYNAPSE_ENABLE_REGISTRATION and SYNAPSE_URL_PREVIEW_ENABLED do nothing: {path} exists, and these are read "
        f"only to generate it. Change the same settings in {path} instead (enable_registration, url_preview_enabled)."
    ]


def test_the_files_own_log_config_is_named_with_how_to_apply_it(tmp_root):
    log_config = tmp_root / "data" / "example.test.log.config"
    env = existing(tmp_root, log_config=str(log_config))
    log_config.write_text("version: 1\n")
    found = warnings(env)
    assert len(found) == 1
    assert found[0].startswith(f"log_config {log_config} in {tmp_root}/data/homeserver.yaml is not used: every process")
    assert f"set SYNAPSE_LOG_CONFIG={log_config}" in found[0]
    env["SYNAPSE_LOG_CONFIG"] = str(log_config)  # applied to every process: nothing to say
    assert warnings(env, facts_here(load_plan(env), env)) == []
    del env["SYNAPSE_LOG_CONFIG"]
    assert warnings(env, Facts(file_log_config_is_ours=True)) == []  # the one we generated with the file


def test_a_log_config_variable_naming_no_file(tmp_root):
    env = {**existing(tmp_root), "SYNAPSE_LOG_CONFIG": f"{tmp_root}/nowhere.yaml"}
    assert warnings(env) == [
        f"SYNAPSE_LOG_CONFIG={tmp_root}/nowhere.yaml does nothing: it is not an existing file, so every process "
        "keeps its own generated log config."
    ]


def test_other_combinations_that_do_nothing(tmp_root):
    env = {
        **isolated_env(tmp_root),
        "SYNAPSE_TLS_PORT": "8449",
        "SYNAPSE_HTTP_REPLICATION_UNIX_SOCKETS": "on",
        "NGINX_DISABLE_LOGROTATE": "on",
        "SYNAPSE_TURN_SECRET": "a-long-enough-turn-secret-0123456789",
        "POSTGRES_HOST": "db.example",
    }
    found = warnings(env)
    assert [w.split(" ")[0] for w in found] == [
        "SYNAPSE_TURN_SECRET",
        "POSTGRES_HOST",
        "SYNAPSE_TLS_PORT",
        "SYNAPSE_HTTP_REPLICATION_UNIX_SOCKETS",
        "NGINX_DISABLE_LOGROTATE",
    ]


def test_container_facts_from_the_environment(tmp_root):
    env = isolated_env(tmp_root)
    assert facts_here(load_plan(env), {**env, "container": "podman"}).in_container
