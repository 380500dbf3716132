"""The plan answers "what", a section only tunes "how" (docs/design.md): a derived fact (the media store, where
logs go on disk, PostgreSQL's max_connections, whom nginx trusts) is decided once, in the plan, and every output
that names it agrees; the config renderers read no settings section except the one they are handed."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import yaml

import synapse_workers.render as render_package
from synapse_workers.files import write_files
from synapse_workers.load import load_plan
from synapse_workers.render import render_all
from synapse_workers.render.compose import render_compose
from synapse_workers.render.export import make_export
from synapse_workers.render.kubernetes import render_kubernetes

RENDER = Path(render_package.__file__).parent
# The renderers of the container's own configs (the export targets and the dispatcher, render/__init__.py, pick
# sections for them).
CONFIG_RENDERERS = (
    "nginx",
    "synapse",
    "prometheus",
    "coturn",
    "logrotate",
    "scheduler",
    "redis",
    "supervisor",
    "nftables",
)


@pytest.mark.parametrize("module", CONFIG_RENDERERS)
def test_a_config_renderer_reads_no_settings_through_the_plan(module):
    tree = ast.parse((RENDER / f"{module}.py").read_text())
    reads = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "settings"]
    assert reads == [], f"render/{module}.py reads `.settings` on lines {reads}: take the section as a parameter"


def _compose(plan):
    export = make_export(plan, "compose")
    secrets = dict.fromkeys(export.secret_files(), "stand-in-secret-value\n")
    secrets[plan.secrets.external_postgres] = "*:*:*:*:stand-in\n"
    files = render_compose(export, secrets, "stand-in", "registry.example/sw:test")
    return yaml.safe_load(files["compose.yaml"][0])


def _kubernetes_media_mounts(plan) -> set[str]:
    export = make_export(plan, "kubernetes")
    secrets = dict.fromkeys(export.secret_files(), "stand-in-secret-value\n")
    secrets[plan.secrets.external_postgres] = "*:*:*:*:stand-in\n"
    text = render_kubernetes(export, secrets, "registry.example/sw:test")["synapse-workers.yaml"][0]
    return {
        mount["mountPath"]
        for doc in yaml.safe_load_all(text)
        if doc and doc["kind"] == "StatefulSet"
        for container in doc["spec"]["template"]["spec"]["containers"]
        for mount in container.get("volumeMounts", [])
        if mount["name"] == "media"
    }


@pytest.mark.parametrize("given", [None, "elsewhere/media"])
def test_the_media_store_is_one_path_everywhere(base_env, tmp_root, given):
    env = {**base_env, "SYNAPSE_WORKER_TYPES": "synchrotron"}
    expected = f"{env['SYNAPSE_DATA_DIR']}/media_store"
    if given is not None:
        expected = str(tmp_root / given)
        env["SYNAPSE_MEDIA_STORE_PATH"] = expected
    plan = load_plan(env)
    assert plan.media_store == expected
    files = render_all(plan)
    assert yaml.safe_load(files.once[plan.homeserver.path][0])["media_store_path"] == expected
    assert f"synapse-media:{expected}" in _compose(plan)["services"]["synapse-main"]["volumes"]
    assert _kubernetes_media_mounts(plan) == {expected}
    assert not os.path.exists(expected)
    write_files(plan, files)
    assert os.path.isdir(expected)  # created for Synapse, where its homeserver.yaml says


@pytest.mark.parametrize("on_disk", ["0", "1"])
def test_logs_on_disk_is_one_decision(base_env, on_disk):
    env = {**base_env, "SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK": on_disk, "SYNAPSE_WORKER_TYPES": "synchrotron"}
    plan = load_plan(env)
    logs = f"{env['SYNAPSE_DATA_DIR']}/logs"
    assert plan.disk_logs == (logs if on_disk == "1" else None)
    managed = render_all(plan).managed
    nginx = managed[plan.layout.nginx_conf]
    assert (f"access_log {logs}/nginx-access.log" in nginx) == (on_disk == "1")
    log_config = yaml.safe_load(managed[plan.main.log_config])
    assert ("file" in log_config["handlers"]) == (on_disk == "1")
    if on_disk == "1":
        assert log_config["handlers"]["file"]["filename"] == f"{logs}/main.log"
        assert plan.layout.logrotate_conf in managed


@pytest.mark.parametrize(("workers", "expected"), [("synchrotron", 100), ("synchrotron:20", 125)])
def test_postgres_max_connections_is_the_same_rule_for_the_embedded_cluster_and_compose(base_env, workers, expected):
    # Each of 1 + N Synapse processes opens up to 5 connections, plus 20 for psql and the compressor, at least 100:
    # 21 processes -> 125.
    embedded = {k: v for k, v in base_env.items() if k != "POSTGRES_PASSWORD"}
    plan = load_plan({**embedded, "SYNAPSE_DATABASE": "embedded", "SYNAPSE_WORKER_TYPES": workers})
    assert plan.postgres is not None and plan.postgres.max_connections == expected
    external = load_plan({**base_env, "SYNAPSE_WORKER_TYPES": workers})
    command = _compose(external)["services"]["synapse-postgres"]["command"]
    assert command == ["postgres", "-c", f"max_connections={expected}"]


def test_nginx_trusts_the_proxies_of_the_public_listener(base_env):
    plan = load_plan({**base_env, "SYNAPSE_TRUSTED_PROXIES": "10.0.0.0/8,unix:"})
    assert plan.public.trusted_proxies == ("10.0.0.0/8", "unix:")
    nginx = render_all(plan).managed[plan.layout.nginx_conf]
    assert "set_real_ip_from 10.0.0.0/8;" in nginx and "set_real_ip_from unix:;" in nginx
