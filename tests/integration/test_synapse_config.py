"""Synapse's own config loader (and nginx -t) over many topologies, through the real `synapse-workers check`.

A) for each topology: `plan --json`, then `check` must exit 0 and report OK for nginx and for every
   process of the plan; the rendered YAML must hold the invariants Synapse and our security model rely on,
   and every log config must load with logging.config.dictConfig. Negative controls prove the checker
   reports what Synapse refuses.
B) an existing homeserver.yaml written by Synapse itself (`--generate-config`) is used as is and never
   modified.
C) what a variable means reaches the running Synapse: every process's --config-path list is loaded by
   Synapse's loader and the parsed config object is compared with the variable's documented meaning;
   nginx's body limit and Synapse's upload limit agree after the variable changes; SYNAPSE_LOG_CONFIG.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from synapse_workers import catalog
from synapse_workers.load import load_plan
from synapse_workers.synapse_check import check_process
from tests.conftest import isolated_env

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "synapse-workers")
PYTHON = sys.executable
WORKER_APP = "synapse.app.generic_worker"

COMPLEMENT = (
    "event_persister:2, background_worker, event_creator, user_dir, media_repository, federation_inbound, "
    "federation_reader, federation_sender, synchrotron, client_reader, appservice, pusher, device_lists:2, "
    "stream_writers=account_data+presence+receipts+to_device+typing"
)
SMALL = "synchrotron:2, event_persister:2, media_repository, stream_writers=typing+to_device+receipts"
MERGED_NAMED = (
    "w=typing+account_data+presence+to_device+push_rules, r=receipts:2, thread_subscriptions:2, "
    "media_repository:2, user_dir:2, federation_sender:3, pusher:2"
)
DROP = None  # a value that removes the variable from base_env

TOPOLOGIES: dict[str, dict[str, str | None]] = {
    "monolith": {},
    "small": {"SYNAPSE_WORKER_TYPES": SMALL},
    "complement": {"SYNAPSE_WORKER_TYPES": COMPLEMENT},
    "full": {"SYNAPSE_WORKER_TYPES": "full"},
    "merged_named": {"SYNAPSE_WORKER_TYPES": MERGED_NAMED},
    "unix_sockets": {"SYNAPSE_WORKER_TYPES": SMALL, "SYNAPSE_PUBLIC_UNIX_SOCKETS": "1",
                     "SYNAPSE_HTTP_REPLICATION_UNIX_SOCKETS": "1"},
    "metrics": {"SYNAPSE_WORKER_TYPES": SMALL, "SYNAPSE_METRICS": "1"},
    "metrics_unix": {"SYNAPSE_WORKER_TYPES": SMALL, "SYNAPSE_METRICS": "1", "SYNAPSE_METRICS_UNIX_SOCKETS": "1"},
    "embedded_db": {"SYNAPSE_WORKER_TYPES": SMALL, "SYNAPSE_DATABASE": "embedded", "POSTGRES_PASSWORD": DROP},
    "sqlite_monolith": {"SYNAPSE_DATABASE": "sqlite", "POSTGRES_PASSWORD": DROP},
    "logs_to_disk": {"SYNAPSE_WORKER_TYPES": SMALL, "SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK": "1"},
}


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def make_env(base: dict[str, str], **overrides: str | None) -> dict[str, str]:
    env = dict(base)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    # A clean environment: nothing from the developer's shell (SYNAPSE_*) leaks in; nginx is in sbin.
    env["PATH"] = os.pathsep.join([str(VENV_BIN), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin",
                                   "/sbin", "/bin"])
    if os.environ.get("PYTHONPATH"):  # e.g. coverage or a patched checkout
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def plan_json(env: dict[str, str]) -> dict:
    result = run_cli(env, "plan", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def process_names(plan: dict) -> list[str]:
    return [plan["main"]["name"], *(w["name"] for w in plan["workers"])]


def assert_check_ok(env: dict[str, str], plan: dict) -> str:
    """`synapse-workers check` exits 0 and says OK for nginx and for every process of the plan."""
    result = run_cli(env, "check")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"check failed ({result.returncode}):\n{output}"
    lines = result.stdout.splitlines()
    assert "FAILED" not in output, output
    assert any(re.fullmatch(r"nginx: OK \(.*\)", line) for line in lines), output
    for name in process_names(plan):
        assert f"{name}: OK" in lines, f"no OK line for process {name}:\n{output}"
    reported = [line.split(":")[0] for line in lines if line.endswith(": OK") and not line.startswith("check")]
    assert sorted(reported) == sorted(process_names(plan)), (reported, process_names(plan))
    assert lines[-1] == "check: OK", output
    return result.stdout


def load_yaml(path: str) -> dict:
    return yaml.safe_load(Path(path).read_text()) or {}


def endpoint(listener: dict) -> dict:
    """What an instance_map entry pointing at this listener looks like."""
    if "path" in listener:
        return {"path": listener["path"]}
    return {"host": listener["bind_addresses"][0], "port": listener["port"]}


def names(listener: dict) -> set[str]:
    return {n for res in listener.get("resources") or [] for n in res.get("names", [])}


PUBLIC_RESOURCES = {"client", "federation", "media"}


# ---------------------------------------------------------------------------------------------------
# A) topologies
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_topology_passes_synapse_and_nginx_checks(topology, base_env, tmp_root):
    env = make_env(base_env, **TOPOLOGIES[topology])
    plan = plan_json(env)
    if "SYNAPSE_WORKER_TYPES" in TOPOLOGIES[topology]:
        assert plan["workers"], "expected workers"
    assert_check_ok(env, plan)
    check_rendered_synapse_yaml(plan, env)
    check_log_configs(plan, env)
    database = load_yaml(plan["homeserver_yaml"]["path"])["database"]
    if env.get("SYNAPSE_DATABASE") == "sqlite":
        assert database["name"] == "sqlite3"
        assert database["args"]["database"].startswith(env["SYNAPSE_DATA_DIR"]), database
    else:
        assert database["name"] == "psycopg2", database
        if env.get("SYNAPSE_DATABASE") == "embedded":
            assert "password" not in database["args"], "the embedded database needs no password in the config"


def check_rendered_synapse_yaml(plan: dict, env: dict[str, str]) -> None:
    files = plan["files"]
    shared = load_yaml(files["shared_config"])
    main = load_yaml(files["main_config"])
    workers = {w["name"]: load_yaml(w["config_files"][-1]) for w in plan["workers"]}
    listeners = {"main": main["listeners"], **{n: doc["worker_listeners"] for n, doc in workers.items()}}

    # Every process: the log config the plan names, worker identity.
    assert main["log_config"] == plan["main"]["log_config"]
    assert "worker_app" not in main and "worker_name" not in main
    for w in plan["workers"]:
        doc = workers[w["name"]]
        assert doc["worker_app"] == WORKER_APP
        assert doc["worker_name"] == w["name"]
        assert doc["worker_log_config"] == w["log_config"]
        assert Path(w["config_files"][-1]).stem == w["name"]

    for name, lst_list in listeners.items():
        for lst in lst_list:
            assert lst["type"] == "http", (name, lst)  # `metrics`/`replication` listener types are refused
            res = names(lst)
            # Public listeners sit behind nginx: Synapse must trust X-Forwarded-For there.
            if res & PUBLIC_RESOURCES:
                assert lst.get("x_forwarded") is True, (name, lst)
            # Replication is never reachable from outside: loopback TCP or a unix socket, never mixed
            # with a public resource.
            if "replication" in res:
                assert res == {"replication"}, (name, lst)
                assert "path" in lst or lst["bind_addresses"] == ["127.0.0.1"], (name, lst)
            if "path" not in lst:
                assert all(a in ("127.0.0.1", "::1") for a in lst["bind_addresses"]), (name, lst)
            if "metrics" in res:
                assert res == {"metrics"}, (name, lst)

    if not plan["workers"]:
        assert "instance_map" not in shared and "stream_writers" not in shared
        assert not any("replication" in names(lst) for lst in main["listeners"])
        return

    instance_map = shared["instance_map"]
    main_repl = [lst for lst in main["listeners"] if "replication" in names(lst)]
    assert len(main_repl) == 1 and instance_map["main"] == endpoint(main_repl[0])
    assert shared["redis"]["enabled"] is True

    stream_writers = shared.get("stream_writers", {})
    assert set(stream_writers) <= set(catalog.STREAMS), stream_writers
    writers = set()
    for stream, instances in stream_writers.items():
        assert isinstance(instances, list) and instances, (stream, instances)
        assert "main" not in instances, f"stream_writers.{stream} names 'main' (Synapse calls it 'master')"
        if stream in catalog.SINGLE_WRITER_STREAMS:
            assert len(instances) == 1, (stream, instances)
        for inst in instances:
            writers.add(inst)
            assert inst in instance_map, f"stream writer {inst} ({stream}) has no instance_map entry"
            repl = [lst for lst in listeners[inst] if "replication" in names(lst)]
            assert len(repl) == 1, f"stream writer {inst} ({stream}) needs exactly one replication listener"
            assert instance_map[inst] == endpoint(repl[0]), (inst, instance_map[inst], repl[0])
    assert set(instance_map) == {"main"} | writers, "instance_map lists a process that is not a stream writer"
    assert stream_writers == plan["stream_writers"]
    for key, value in plan["duties"].items():
        assert shared[key] == value, (key, shared.get(key), value)

    if env.get("SYNAPSE_METRICS") == "1":
        assert shared["enable_metrics"] is True
        for name, lst_list in listeners.items():
            assert sum("metrics" in names(lst) for lst in lst_list) == 1, f"{name} has no metrics listener"
            for lst in lst_list:
                if "metrics" in names(lst) and env.get("SYNAPSE_METRICS_UNIX_SOCKETS") == "1":
                    assert "path" in lst  # an http listener with the metrics resource: Synapse accepts it
    if env.get("SYNAPSE_PUBLIC_UNIX_SOCKETS") == "1":
        for name, lst_list in listeners.items():
            assert all("path" in lst for lst in lst_list if names(lst) & PUBLIC_RESOURCES), name
    if env.get("SYNAPSE_HTTP_REPLICATION_UNIX_SOCKETS") == "1":
        assert all("path" in entry for entry in instance_map.values()), instance_map


# A child process, because dictConfig replaces the root logger's handlers (pytest's included).
_DICTCONFIG_SCRIPT = r"""
import json, logging, logging.config, sys, yaml
results = {}
for path in json.loads(sys.argv[1]):
    with open(path) as handle:
        cfg = yaml.safe_load(handle)
    logging.config.dictConfig(cfg)
    logging.getLogger("synapse.selftest").warning("dictConfig-ok %s", path, extra={"request": "-"})
    for handler in logging.getLogger().handlers:
        handler.flush()
    results[path] = sorted(type(h).__name__ for h in logging.getLogger().handlers)
    logging.shutdown()
print("RESULT " + json.dumps(results))
"""


def check_log_configs(plan: dict, env: dict[str, str]) -> None:
    processes = [plan["main"], *plan["workers"]]
    paths = [p["log_config"] for p in processes]
    for path in paths:
        cfg = load_yaml(path)
        assert cfg["version"] == 1
        handlers, formatters = cfg["handlers"], cfg.get("formatters", {})
        assert handlers, path
        for hname, handler in handlers.items():
            assert "class" in handler, (path, hname)
            if "formatter" in handler:
                assert handler["formatter"] in formatters, (path, hname)
            if "target" in handler:
                assert handler["target"] in handlers, (path, hname)
            if "filename" in handler:
                assert Path(handler["filename"]).parent.is_dir(), (path, handler["filename"])
        roots = cfg["root"]["handlers"]
        assert roots and set(roots) <= set(handlers), (path, roots)
        for lname, logger in (cfg.get("loggers") or {}).items():
            assert set(logger.get("handlers", [])) <= set(handlers), (path, lname)
        to_disk = [h for h in handlers.values() if "filename" in h]
        if env.get("SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK") == "1":
            assert to_disk, f"{path}: SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK=1 but no file handler"
            assert all(h["filename"].startswith(env["SYNAPSE_DATA_DIR"]) for h in to_disk), to_disk
        else:
            assert not to_disk, f"{path}: logs to disk without SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK"

    result = subprocess.run([PYTHON, "-c", _DICTCONFIG_SCRIPT, json.dumps(paths)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.splitlines()[-1].removeprefix("RESULT "))
    assert sorted(loaded) == sorted(paths)
    for path in paths:
        assert f"dictConfig-ok {path}" in result.stdout, f"{path}: the console handler printed nothing"
    if env.get("SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK") == "1":
        for proc in processes:
            log_file = Path(env["SYNAPSE_DATA_DIR"], "logs", f"{proc['name']}.log")
            assert log_file.is_file() and "dictConfig-ok" in log_file.read_text(), log_file


# ---------------------------------------------------------------------------------------------------
# A) negative controls: the checker reports what Synapse refuses
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def generated_small(base_env):
    env = make_env(base_env, SYNAPSE_WORKER_TYPES=SMALL)
    result = run_cli(env, "generate")
    assert result.returncode == 0, result.stderr
    return load_plan(env)


def _tamper(path: str, change) -> None:
    doc = load_yaml(path)
    change(doc)
    Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))


def test_checker_accepts_the_untampered_files(generated_small):
    for proc in generated_small.processes:
        assert check_process(proc.app, list(proc.config_files)) is None, proc.name


def test_checker_reports_missing_instance_map_main(generated_small):
    plan = generated_small
    _tamper(plan.layout.shared_config, lambda doc: doc["instance_map"].pop("main"))
    worker = plan.process("synchrotron1")
    error = check_process(worker.app, list(worker.config_files))
    assert error is not None and "instance_map" in error and "main" in error, error


def test_checker_reports_two_typing_writers(generated_small):
    plan = generated_small
    _tamper(plan.layout.shared_config,
            lambda doc: doc["stream_writers"].update(typing=["event_persister1", "event_persister2"]))
    for proc in (plan.main, plan.process("synchrotron1")):
        error = check_process(proc.app, list(proc.config_files))
        assert error is not None and "typing" in error, (proc.name, error)


def test_checker_reports_main_named_as_a_stream_writer(generated_small):
    plan = generated_small
    _tamper(plan.layout.shared_config, lambda doc: doc["stream_writers"].update(typing=["main"]))
    worker = plan.process("synchrotron1")
    error = check_process(worker.app, list(worker.config_files))
    assert error is not None and "main" in error, error


def test_checker_reports_unix_socket_metrics_listener(generated_small):
    plan = generated_small
    worker = plan.process("synchrotron1")

    def metrics_type(doc):
        doc["worker_listeners"].append({"type": "metrics", "path": f"{plan.layout.sockets_dir}/m.sock"})
        doc["enable_metrics"] = True

    _tamper(worker.config_files[-1], metrics_type)
    error = check_process(worker.app, list(worker.config_files))
    assert error is not None and "unix socket" in error, error


def test_check_subprocess_protocol_fails_on_tampered_files(generated_small):
    """What `synapse-workers check` runs: a FAILED line for the broken process and exit status 1."""
    plan = generated_small
    _tamper(plan.layout.shared_config, lambda doc: doc["instance_map"].pop("main"))
    procs = [{"name": p.name, "app": p.app, "config_files": list(p.config_files)} for p in plan.processes]
    result = subprocess.run([PYTHON, "-m", "synapse_workers.synapse_check"], input=json.dumps(procs),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    reports = {r["name"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(reports) == {p.name for p in plan.processes}
    assert reports["main"]["ok"] is True  # main does not need instance_map.main
    for proc in plan.workers:
        assert reports[proc.name]["ok"] is False and "instance_map" in reports[proc.name]["error"], proc.name


# ---------------------------------------------------------------------------------------------------
# B) an existing homeserver.yaml, generated by Synapse itself
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synapse_generated():
    """homeserver.yaml from `python -m synapse.app.homeserver --generate-config` (SQLite, port 8008)."""
    root = Path(tempfile.mkdtemp(prefix="sw-hs-", dir="/tmp"))
    try:
        config = root / "homeserver.yaml"
        result = subprocess.run(
            [PYTHON, "-m", "synapse.app.homeserver", "--server-name", "example.test", "--config-path", str(config),
             "--generate-config", "--report-stats=no", "--data-directory", str(root)],
            capture_output=True, text=True, timeout=120, cwd=root,
        )
        assert result.returncode == 0, result.stderr
        text = config.read_text()
        assert "name: sqlite3" in text and "port: 8008" in text, text
        postgres = re.sub(
            r"database:\n  name: sqlite3\n  args:\n    database: [^\n]*\n",
            "database:\n  name: psycopg2\n  args:\n    user: synapse\n    password: not-a-real-password\n"
            "    dbname: synapse\n    host: db.invalid\n    cp_min: 1\n    cp_max: 5\n",
            text,
        )
        assert postgres != text, "could not find the sqlite3 database block to replace"
        if os.geteuid() == 0:  # as the official image leaves its data dir: Synapse's user (991) owns it
            os.chmod(root, 0o755)
            for path in [root, *root.iterdir()]:
                os.chown(path, 991, 991)
        yield {"sqlite": text, "postgres": postgres, "dir": root}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _existing_env(base_env, path: Path, **overrides: str | None) -> dict[str, str]:
    """No SYNAPSE_SERVER_NAME, port or database variables: everything comes from the user's file."""
    wanted: dict[str, str | None] = {
        "SYNAPSE_CONFIG_PATH": str(path),
        "SYNAPSE_SERVER_NAME": DROP,
        "SYNAPSE_REPORT_STATS": DROP,
        "SYNAPSE_HTTP_PORT": DROP,
        "POSTGRES_PASSWORD": DROP,
    }
    wanted.update(overrides)
    return make_env(base_env, **wanted)


def _place(tmp_root: Path, text: str) -> tuple[Path, bytes]:
    folder = tmp_root / "user-config"
    folder.mkdir()
    path = folder / "homeserver.yaml"
    path.write_text(text)
    os.chmod(path, 0o640)
    if os.geteuid() == 0:
        os.chown(path, 991, 991)  # Synapse's user reads it (run and check verify that before anything starts)
    return path, path.read_bytes()


def _fingerprint(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mode, st.st_uid, st.st_mtime_ns


def test_existing_postgres_homeserver_with_workers(synapse_generated, base_env, tmp_root):
    path, _ = _place(tmp_root, synapse_generated["postgres"])
    before = _fingerprint(path)
    env = _existing_env(base_env, path, SYNAPSE_WORKER_TYPES=SMALL)
    plan = plan_json(env)
    assert plan["server_name"] == "example.test"
    assert plan["homeserver_yaml"] == {"path": str(path), "exists": True}
    assert plan["public"]["port"] == 8008  # the port the user's own listener had: nginx takes it over
    main_public = [lst for lst in plan["main"]["listeners"] if lst["kind"] == "public"]
    assert len(main_public) == 1 and main_public[0]["host"] == "127.0.0.1"
    base = int(env["SYNAPSE_INTERNAL_PORT_BASE"])
    assert main_public[0]["port"] != 8008 and base <= main_public[0]["port"] < base + 1000
    assert plan["main"]["config_files"][0] == str(path)
    for worker in plan["workers"]:
        assert worker["config_files"][0] == str(path)

    assert_check_ok(env, plan)

    assert _fingerprint(path) == before, "synapse-workers modified the user's homeserver.yaml"
    assert path.read_text() == synapse_generated["postgres"]
    main_yaml = load_yaml(plan["files"]["main_config"])
    assert all(lst.get("port") != 8008 for lst in main_yaml["listeners"]), main_yaml["listeners"]
    assert not any(p.name.startswith("example.test.") for p in path.parent.iterdir()), "secrets written next to it"


def test_existing_sqlite_homeserver_with_workers_is_refused(synapse_generated, base_env, tmp_root):
    path, before = _place(tmp_root, synapse_generated["sqlite"])
    env = _existing_env(base_env, path, SYNAPSE_WORKER_TYPES=SMALL)
    result = run_cli(env, "check")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "PostgreSQL" in result.stderr and "SQLite" in result.stderr and str(path) in result.stderr, result.stderr
    assert path.read_bytes() == before


def test_existing_homeserver_with_another_server_name_is_refused(synapse_generated, base_env, tmp_root):
    path, before = _place(tmp_root, synapse_generated["postgres"])
    env = _existing_env(base_env, path, SYNAPSE_WORKER_TYPES=SMALL, SYNAPSE_SERVER_NAME="other.test")
    result = run_cli(env, "check")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "other.test" in result.stderr and "example.test" in result.stderr, result.stderr
    assert path.read_bytes() == before


def test_existing_sqlite_homeserver_as_monolith(synapse_generated, base_env, tmp_root):
    path, _ = _place(tmp_root, synapse_generated["sqlite"])
    before = _fingerprint(path)
    env = _existing_env(base_env, path)
    plan = plan_json(env)
    assert plan["workers"] == [] and plan["public"]["port"] == 8008
    assert_check_ok(env, plan)
    assert _fingerprint(path) == before


# ---------------------------------------------------------------------------------------------------
# C) what a variable means, as the running Synapse sees it: each process's --config-path list loaded by
#    Synapse's own loader, assertions on the parsed config object. Expected values come from the README.
# ---------------------------------------------------------------------------------------------------

VARS_TOPOLOGY = "synchrotron"  # main and a generic worker, both loading the media repository
VARS_PROCESSES = ["main", "synchrotron1"]


def synapse_config(proc):
    """The config object the process would run with: HomeServerConfig.load_config over its --config-path
    list, as synapse.app.homeserver / generic_worker do (after the same checks `synapse-workers check` makes)."""
    from synapse.config.homeserver import HomeServerConfig

    error = check_process(proc.app, list(proc.config_files))
    assert error is None, f"Synapse refuses {proc.name}'s config: {error}"
    argv = [arg for path in proc.config_files for arg in ("--config-path", path)]
    with contextlib.redirect_stdout(io.StringIO()):
        return HomeServerConfig.load_config("Synapse Homeserver" if proc.is_main else "Synapse worker", argv)


def attribute(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def effective_log_config(config, proc) -> str | None:
    """The file synapse.config.logger.setup_logging loads: worker_log_config on a worker, else log_config."""
    return config.worker.worker_log_config if not proc.is_main else config.logging.log_config


def generate(env: dict[str, str]):
    result = run_cli(env, "generate")
    assert result.returncode == 0, result.stdout + result.stderr
    return load_plan(env)


def nginx_body_limit(plan) -> int:
    found = re.findall(r"^\s*client_max_body_size\s+([0-9]+);", Path(plan.layout.nginx_conf).read_text(), re.M)
    assert len(found) == 1, found
    return int(found[0])


@dataclass(frozen=True)
class VarCase:
    variable: str
    value: str  # "{root}" is the case's own directory
    attribute: str  # on Synapse's parsed HomeServerConfig
    expected: object  # with the variable set
    default: object  # with the variable unset ("{data}" is SYNAPSE_DATA_DIR)
    baseline: str | None = DROP  # the variable's value in the "unset" run (SYNAPSE_REPORT_STATS is required)


MIB = 1024 * 1024
VAR_CASES = [
    VarCase("SYNAPSE_ENABLE_REGISTRATION", "yes", "registration.enable_registration", True, False),
    # "open registration (also sets enable_registration_without_verification: really open)"
    VarCase("SYNAPSE_ENABLE_REGISTRATION", "yes", "registration.enable_registration_without_verification",
            True, False),
    VarCase("SYNAPSE_ALLOW_GUEST", "yes", "registration.allow_guest_access", True, False),
    # unset: Synapse's own default, https://<server name>/; set: the URL, with the trailing slash Synapse adds
    VarCase("SYNAPSE_PUBLIC_BASEURL", "https://matrix.example.test", "server.public_baseurl",
            "https://matrix.example.test/", "https://example.test/"),
    VarCase("SYNAPSE_SERVE_SERVER_WELLKNOWN", "yes", "server.serve_server_wellknown", True, False),
    VarCase("SYNAPSE_URL_PREVIEW_ENABLED", "yes", "media.url_preview_enabled", True, False),
    # Synapse's sizes: K = 1024
    VarCase("SYNAPSE_EVENT_CACHE_SIZE", "20K", "caches.event_cache_size", 20 * 1024, 10 * 1024),
    VarCase("SYNAPSE_MEDIA_STORE_PATH", "{root}/elsewhere/media", "media.media_store_path",
            "{root}/elsewhere/media", "{data}/media_store"),
    VarCase("SYNAPSE_MAX_UPLOAD_SIZE", "100M", "media.max_upload_size", 100 * MIB, 50 * MIB),
    VarCase("SYNAPSE_REPORT_STATS", "yes", "metrics.report_stats", True, False, baseline="no"),
    # TURN settings are in shared.yaml on every start, only when there is a TURN server to point at.
    VarCase("SYNAPSE_ENABLE_BUILTIN_COTURN", "yes", "voip.turn_uris",
            ["turn:example.test:3478?transport=udp", "turn:example.test:3478?transport=tcp"], []),
    VarCase("SYNAPSE_TURN_URIS", "turns:turn.example.test:5349", "voip.turn_uris",
            ["turns:turn.example.test:5349"], []),
]


@pytest.fixture(scope="module")
def generated_with():
    """generate(**variables) → (env, plan, directory): one generated stack per distinct environment, each
    in its own directory (a new install every time), shared by the tests of this module."""
    root = Path(tempfile.mkdtemp(prefix="sw-vars-", dir="/tmp"))
    cache: dict[tuple, tuple] = {}

    def make(**variables: str | None):
        key = tuple(sorted(variables.items(), key=lambda kv: kv[0]))
        if key not in cache:
            folder = root / str(len(cache))
            base = {**isolated_env(folder), "POSTGRES_PASSWORD": "not-a-real-password"}
            values = {k: (v.format(root=folder) if v is not None else v) for k, v in variables.items()}
            env = make_env(base, SYNAPSE_WORKER_TYPES=VARS_TOPOLOGY, **values)
            cache[key] = (env, generate(env), folder)
        return cache[key]

    try:
        yield make
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _var_params():
    for case in VAR_CASES:
        for state in ("set", "unset"):
            for process in VARS_PROCESSES:
                yield pytest.param(case, state, process,
                                   id=f"{case.variable}-{case.attribute}-{state}-{process}")


@pytest.mark.parametrize("case, state, process", list(_var_params()))
def test_generation_variable_reaches_synapse(generated_with, case, state, process):
    value = case.value if state == "set" else case.baseline
    env, plan, folder = generated_with(**{case.variable: value})
    config = synapse_config(plan.process(process))
    expected = case.expected if state == "set" else case.default
    if isinstance(expected, str):
        expected = expected.format(root=folder, data=env["SYNAPSE_DATA_DIR"])
    assert attribute(config, case.attribute) == expected, (case.variable, value, process)


# SYNAPSE_MAX_UPLOAD_SIZE: nginx's client_max_body_size and Synapse's max_upload_size agree on every start.

UPLOAD_TOPOLOGIES = {
    "synchrotron": ["main", "synchrotron1"],  # no media worker: main and the worker both serve media
    "media_repository": ["media_repository1"],  # main has enable_media_repo off
}


def assert_upload_limits(plan, expected: int) -> list[str]:
    """nginx's limit and every media-serving process's max_upload_size are `expected`; returns those processes."""
    assert nginx_body_limit(plan) == expected
    serving = []
    for proc in plan.processes:
        config = synapse_config(proc)
        if config.media.can_load_media_repo:
            serving.append(proc.name)
            assert config.media.max_upload_size == expected, (proc.name, config.media.max_upload_size, expected)
    return serving


@pytest.mark.parametrize("topology", list(UPLOAD_TOPOLOGIES))
def test_max_upload_size_change_after_generation_reaches_synapse_and_nginx(base_env, topology):
    steps = [
        ("100M", 100 * MIB),  # the first start: homeserver.yaml is generated with it
        ("20M", 20 * MIB),  # changed later: Synapse follows, not only nginx
        ("1G", 1024 * MIB),
        (DROP, 100 * MIB),  # unset: the generated homeserver.yaml's own value, for both
    ]
    for value, expected in steps:
        env = make_env(base_env, SYNAPSE_WORKER_TYPES=topology, SYNAPSE_MAX_UPLOAD_SIZE=value)
        plan = generate(env)
        assert sorted(assert_upload_limits(plan, expected)) == sorted(UPLOAD_TOPOLOGIES[topology]), value
    assert "max_upload_size: 100M" in Path(plan.homeserver.path).read_text(), "homeserver.yaml was modified"


@pytest.mark.parametrize("line, variable, expected", [
    ("max_upload_size: 10M", DROP, 10 * MIB),  # the user's own limit, for nginx too
    ("max_upload_size: 12345", DROP, 12345),
    ("", DROP, 50 * MIB),  # none in the file: Synapse's default (50M), for nginx too
    ("max_upload_size: 10M", "20M", 20 * MIB),  # the variable, set: wins for both
])
def test_existing_homeserver_max_upload_size_reaches_synapse_and_nginx(synapse_generated, base_env, tmp_root,
                                                                        line, variable, expected):
    path, before = _place(tmp_root, synapse_generated["postgres"] + f"\n{line}\n")
    env = _existing_env(base_env, path, SYNAPSE_WORKER_TYPES=VARS_TOPOLOGY, SYNAPSE_MAX_UPLOAD_SIZE=variable)
    plan = generate(env)
    assert sorted(assert_upload_limits(plan, expected)) == VARS_PROCESSES
    assert path.read_bytes() == before


# SYNAPSE_LOG_CONFIG: an existing file is every process's log config.

USER_LOG_CONFIG = """\
version: 1
formatters:
  plain: {format: "%(name)s %(levelname)s %(message)s"}
handlers:
  console: {class: logging.StreamHandler, formatter: plain, stream: "ext://sys.stderr"}
root: {level: WARNING, handlers: [console]}
disable_existing_loggers: false
"""


@pytest.mark.parametrize("process", VARS_PROCESSES)
def test_existing_synapse_log_config_is_every_process_log_config(base_env, tmp_root, process):
    user_log = tmp_root / "mine.log.config"
    user_log.write_text(USER_LOG_CONFIG)
    env = make_env(base_env, SYNAPSE_WORKER_TYPES=VARS_TOPOLOGY, SYNAPSE_LOG_CONFIG=str(user_log))
    plan = generate(env)
    proc = plan.process(process)
    assert effective_log_config(synapse_config(proc), proc) == str(user_log)
    assert load_yaml(plan.homeserver.path)["log_config"] == str(user_log)  # a generated file names it too
    assert user_log.read_text() == USER_LOG_CONFIG


@pytest.mark.parametrize("process", VARS_PROCESSES)
def test_missing_synapse_log_config_is_only_named_in_the_generated_homeserver(base_env, tmp_root, process):
    named = str(tmp_root / "data" / "named.log.config")
    env = make_env(base_env, SYNAPSE_WORKER_TYPES=VARS_TOPOLOGY, SYNAPSE_LOG_CONFIG=named)
    plan = generate(env)
    proc = plan.process(process)
    # Our per-process log config under the runtime dir (README: synapse/log/*.log.config), not the named one.
    assert effective_log_config(synapse_config(proc), proc) == (
        f"{env['SYNAPSE_RUNTIME_DIR']}/synapse/log/{process}.log.config")
    assert load_yaml(plan.homeserver.path)["log_config"] == named
