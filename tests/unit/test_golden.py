"""Golden files: the exact rendered output for two fixed topologies, and `export kubernetes|compose` of the
workers topology (every file the export writes, with fixed stand-in secrets).

A diff here means the generated configuration changed. If the change is intended, regenerate with

    SW_UPDATE_GOLDEN=1 /opt/synapse-workers/venv/bin/python -m pytest -q tests/unit/test_golden.py

and review `git diff tests/unit/golden/` before committing. An updating run compares nothing, so it
reports every golden case as skipped (never passed), and under CI (`CI` set) it refuses to write and fails.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from synapse_workers.load import load_plan
from synapse_workers.render import render_all
from synapse_workers.render.compose import render_compose
from synapse_workers.render.export import make_export
from synapse_workers.render.kubernetes import render_kubernetes

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path("/tmp/sw-golden")  # fixed, never written to by these tests: rendering is pure
UPDATE = os.environ.get("SW_UPDATE_GOLDEN") == "1"
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

TOPOLOGIES = {
    "monolith": "",
    "workers": "synchrotron:2, event_persister:2, media_repository, stream_writers=typing+to_device+receipts",
}


def _env(base_env, name: str) -> dict[str, str]:
    root = ROOT / name
    return {
        **base_env,
        "SYNAPSE_SERVER_NAME": "example.test",
        "SYNAPSE_REPORT_STATS": "no",
        "POSTGRES_PASSWORD": "golden-password",
        "SYNAPSE_CONFIG_DIR": f"{root}/data",
        "SYNAPSE_DATA_DIR": f"{root}/data",
        "SYNAPSE_RUNTIME_DIR": f"{root}/run",
        "SYNAPSE_INTERNAL_PORT_BASE": "30000",
        "SYNAPSE_HTTP_PORT": "8008",
        "SYNAPSE_HTTP_BIND_ADDRESS": "0.0.0.0",
        "PROMETHEUS_PORT": "9090",
        "SYNAPSE_WORKER_TYPES": TOPOLOGIES[name],
    }


def _render(base_env, name: str) -> dict[str, str]:
    env = _env(base_env, name)
    if (ROOT / name).exists():
        # A leftover homeserver.yaml (e.g. from a manual `generate`) would change the output.
        shutil.rmtree(ROOT / name)
    plan = load_plan(env)
    assert not plan.homeserver.exists
    managed = render_all(plan).managed
    files = {
        "shared.yaml": managed[plan.layout.shared_config],
        "main.yaml": managed[plan.layout.main_config],
        "nginx.conf": managed[plan.layout.nginx_conf],
    }
    if plan.workers:
        files["stream_writers1.yaml"] = managed[plan.process("stream_writers1").config_files[-1]]
    return files


CASES = [
    ("monolith", "shared.yaml"),
    ("monolith", "main.yaml"),
    ("monolith", "nginx.conf"),
    ("workers", "shared.yaml"),
    ("workers", "main.yaml"),
    ("workers", "stream_writers1.yaml"),
    ("workers", "nginx.conf"),
]


@pytest.mark.parametrize("topology, filename", CASES)
def test_golden(base_env, topology, filename):
    actual = _render(base_env, topology)[filename]
    golden = GOLDEN / topology / filename
    if UPDATE:
        if IN_CI:
            pytest.fail("SW_UPDATE_GOLDEN=1 under CI: golden files are updated by hand and reviewed, never in CI")
        changed = not golden.exists() or golden.read_text(encoding="utf-8") != actual
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual, encoding="utf-8")
        state = "updated" if changed else "rewritten unchanged"
        pytest.skip(f"golden/{topology}/{filename} {state}, not compared: review `git diff tests/unit/golden/`")
    assert golden.exists(), f"{golden} is missing: run with SW_UPDATE_GOLDEN=1 to create it"
    expected = golden.read_text(encoding="utf-8")
    if actual != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), actual.splitlines(keepends=True),
            fromfile=f"golden/{topology}/{filename}", tofile="rendered", n=2))
        pytest.fail(f"rendered {filename} differs from the golden file (SW_UPDATE_GOLDEN=1 to accept):\n{diff[:6000]}")


# Facts the golden files must show, written from the README and docs/workers.md (not from the golden files):
# internal ports from SYNAPSE_INTERNAL_PORT_BASE=30000 (main base+0..4, workers from base+10 in declaration
# order), loopback only, replication and metrics refused on the public port.


def _upstream_servers(conf: str, name: str) -> list[str]:
    block = re.search(rf"upstream {name} \{{(.*?)\}}", conf, re.S).group(1)
    return re.findall(r"^\s*server (\S+) ", block, re.M)


def _listeners(doc: dict) -> list[tuple[int, list[str]]]:
    listeners = doc.get("listeners") or doc["worker_listeners"]
    for lst in listeners:
        assert lst["bind_addresses"] == ["127.0.0.1"], lst
    return [(lst["port"], [n for r in lst["resources"] for n in r["names"]]) for lst in listeners]


def _refuses_internal_paths(conf: str) -> bool:
    return all(re.search(rf"location \^~ {p} \{{\s*return 404;", conf) for p in ("/_synapse/replication",
                                                                                 "/_synapse/metrics"))


def test_monolith_facts(base_env):
    files = _render(base_env, "monolith")
    assert yaml.safe_load(files["shared.yaml"]) == {}  # nothing to share without workers
    main = yaml.safe_load(files["main.yaml"])
    assert _listeners(main) == [(30000, ["client", "federation"]), (30002, [])]  # public, health; no replication
    assert main["log_config"] == "/tmp/sw-golden/monolith/run/synapse/log/main.log.config"
    conf = files["nginx.conf"]
    assert "listen 0.0.0.0:8008 so_keepalive=on backlog=4096;" in conf
    assert "client_max_body_size 52428800;" in conf  # SYNAPSE_MAX_UPLOAD_SIZE default 50M
    assert re.findall(r"^\s*upstream (\S+) \{", conf, re.M) == ["main"]
    assert _upstream_servers(conf, "main") == ["127.0.0.1:30000"]
    assert _refuses_internal_paths(conf)


def test_workers_facts(base_env):
    files = _render(base_env, "workers")
    shared = yaml.safe_load(files["shared.yaml"])
    assert shared["instance_map"] == {
        "main": {"host": "127.0.0.1", "port": 30001},
        "event_persister1": {"host": "127.0.0.1", "port": 30014},
        "event_persister2": {"host": "127.0.0.1", "port": 30016},
        "media_repository1": {"host": "127.0.0.1", "port": 30019},
        "stream_writers1": {"host": "127.0.0.1", "port": 30022},
    }
    assert shared["stream_writers"] == {
        "events": ["event_persister1", "event_persister2"], "quarantined_media_changes": ["media_repository1"],
        "receipts": ["stream_writers1"], "to_device": ["stream_writers1"], "typing": ["stream_writers1"],
    }
    assert shared["redis"] == {"enabled": True, "path": "/tmp/sw-golden/workers/run/sockets/redis.sock"}
    assert shared["enable_media_repo"] is False
    assert shared["media_instance_running_background_jobs"] == "media_repository1"
    assert "pusher_instances" not in shared and "run_background_tasks_on" not in shared
    main = yaml.safe_load(files["main.yaml"])
    assert _listeners(main) == [(30000, ["client", "federation"]), (30001, ["replication"]), (30002, [])]
    worker = yaml.safe_load(files["stream_writers1.yaml"])
    assert (worker["worker_app"], worker["worker_name"]) == ("synapse.app.generic_worker", "stream_writers1")
    assert _listeners(worker) == [(30021, ["client"]), (30022, ["replication"]), (30023, [])]
    assert worker["worker_log_config"] == "/tmp/sw-golden/workers/run/synapse/log/stream_writers1.log.config"
    conf = files["nginx.conf"]
    assert "listen 0.0.0.0:8008 so_keepalive=on backlog=4096;" in conf
    assert _upstream_servers(conf, "main") == ["127.0.0.1:30000"]
    for name in ("typing", "to_device", "receipts"):
        assert _upstream_servers(conf, name) == ["127.0.0.1:30021"], name
    assert _upstream_servers(conf, "media_repository") == ["127.0.0.1:30018"]
    assert _upstream_servers(conf, "synchrotron_by_user") == ["127.0.0.1:30010", "127.0.0.1:30012"]
    assert "hash $sw_user consistent;" in conf
    assert _refuses_internal_paths(conf)
    # HARD stream-writer routes come before the broad account-data pattern (docs: first regex wins).
    typing = conf.index('rooms/.*/typing" {\n            set $sw_pool typing;\n'
                        '            error_page 429 = @sw_limited;\n            proxy_pass http://typing;')
    assert typing < conf.index("/sendToDevice/") < conf.index("/pushrules/") < conf.index("/.*/(tags|account_data)")


# ---- exports: every file `export kubernetes|compose` writes, for the workers topology with metrics ------------

EXPORTS = {"kubernetes": "export-kubernetes", "compose": "export-compose"}
EXPORT_IMAGE = "registry.example/synapse-workers:golden"


def _export(base_env, target: str) -> dict[str, tuple[str, int]]:
    env = {**_env(base_env, "workers"), "SYNAPSE_METRICS": "1"}
    if (ROOT / "workers").exists():
        shutil.rmtree(ROOT / "workers")
    plan = load_plan(env)
    export = make_export(plan, target)
    # Stand-ins for the secrets `export` reads or makes (a libpq passfile line for the database's).
    secrets = {path: f"golden-{os.path.basename(path)}-secret\n" for path in export.secret_files()}
    secrets[plan.secrets.external_postgres] = "*:*:*:*:golden-password\n"
    if target == "kubernetes":
        return render_kubernetes(export, secrets, EXPORT_IMAGE)
    return render_compose(export, secrets, "golden-password", EXPORT_IMAGE)


def _export_golden_files(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text(encoding="utf-8") for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("target", EXPORTS)
def test_export_golden(base_env, target):
    files = _export(base_env, target)
    directory = GOLDEN / EXPORTS[target]
    for name, (_text, mode) in files.items():  # as the README says: secrets private, the rest readable
        secret = name == "secret.yaml" or name.startswith("secrets/")
        assert mode == (0o600 if secret else 0o644), name
    actual = {name: text for name, (text, _mode) in files.items()}
    if UPDATE:
        if IN_CI:
            pytest.fail("SW_UPDATE_GOLDEN=1 under CI: golden files are updated by hand and reviewed, never in CI")
        if directory.exists():
            shutil.rmtree(directory)
        for name, text in actual.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(text, encoding="utf-8")
        pytest.skip(f"golden/{EXPORTS[target]} rewritten, not compared: review `git diff tests/unit/golden/`")
    expected = _export_golden_files(directory)
    assert sorted(actual) == sorted(expected), "the export writes other files than the golden directory holds"
    diffs = []
    for name in sorted(actual):
        if actual[name] != expected[name]:
            diffs.append("".join(difflib.unified_diff(
                expected[name].splitlines(keepends=True), actual[name].splitlines(keepends=True),
                fromfile=f"golden/{EXPORTS[target]}/{name}", tofile="rendered", n=2)))
    if diffs:
        pytest.fail(f"export {target} differs from the golden files (SW_UPDATE_GOLDEN=1 to accept):\n"
                    + "".join(diffs)[:6000])


def test_export_golden_facts(base_env):
    """Facts stated from the README's export section, not from the golden files."""
    manifests = list(yaml.safe_load_all(_export(base_env, "kubernetes")["synapse-workers.yaml"][0]))
    workloads = {o["metadata"]["name"]: o["spec"].get("replicas") for o in manifests if o["kind"] == "StatefulSet"}
    assert workloads == {
        "synapse-main": 1, "synapse-synchrotron": 2, "synapse-event-persister": 2, "synapse-media-repository": 1,
        "synapse-stream-writers": 1,
    }
    compose = yaml.safe_load(_export(base_env, "compose")["compose.yaml"][0])
    assert set(compose["services"]) == {
        "synapse-init", "synapse-main", "synapse-synchrotron-0", "synapse-synchrotron-1",
        "synapse-event-persister-0", "synapse-event-persister-1", "synapse-media-repository-0",
        "synapse-stream-writers-0", "synapse-nginx", "synapse-postgres", "synapse-redis",
    }
    assert compose["services"]["synapse-nginx"]["ports"] == ["8008:8008"]  # only nginx publishes a port


def test_golden_env_ignores_base_env_randomness(base_env):
    """The golden environment overrides every path and port base_env randomises."""
    env = _env(base_env, "workers")
    for key, value in base_env.items():
        if key not in ("SYNAPSE_SERVER_NAME", "SYNAPSE_REPORT_STATS"):
            assert env[key] != value, f"{key} from base_env leaks into the golden environment"


def test_golden_files_are_all_used():
    if UPDATE:
        pytest.skip("regenerating")
    on_disk = {str(p.relative_to(GOLDEN)) for p in GOLDEN.rglob("*") if p.is_file()}
    exports = {f"{EXPORTS[t]}/{name}" for t in EXPORTS for name in _export_golden_files(GOLDEN / EXPORTS[t])}
    assert exports, "the export golden directories are missing"
    assert on_disk == {f"{topology}/{filename}" for topology, filename in CASES} | exports
