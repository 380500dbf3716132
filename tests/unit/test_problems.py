"""Problems as data: the variable (or YAML path) at fault, what was expected and found, and `check --json`.

The expectations name the variables by hand, independently of the code: a problem about COTURN_MIN_PORT must
say so in its subject, not only in its sentence."""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest

from synapse_workers import start_warnings
from synapse_workers.errors import File, Problem, UserError, Variable, YamlPath
from synapse_workers.settings import VARIABLES, load_settings

from .test_cli_errors import CASES, SCRIPT, _prepare, snapshot

SRC = Path(__file__).resolve().parents[2] / "src" / "synapse_workers"


def _literal_subjects() -> list[tuple[str, int, str]]:
    """Every `Variable("NAME")` (or `Var("NAME")`, settings' alias) written in the source: file, line, name."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("Variable", "Var")
                and len(node.args) == 1
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found.append((path.name, node.lineno, node.args[0].value))
    return found


def test_every_variable_a_problem_names_in_the_source_is_in_the_registry():
    """A typo in a name fails here, for every branch, not only for the branches a test reaches."""
    subjects = _literal_subjects()
    assert len(subjects) > 30  # settings, start_warnings, workers, homeserver, run/... make problems this way
    unknown = [s for s in subjects if s[2] not in VARIABLES]
    assert unknown == []
    tables = (*start_warnings.GENERATION_ONLY, *start_warnings.NEEDS_METRICS, *start_warnings.NEEDS_COTURN)
    assert all(isinstance(v, Variable) for v in (*tables, *start_warnings.NEEDS_EXTERNAL_POSTGRES))


def test_a_name_outside_the_registry_cannot_be_a_subject():
    with pytest.raises(ValueError, match="SYNAPSE_SERVERNAME"):
        Variable("SYNAPSE_SERVERNAME")


def test_a_problem_is_its_sentence():
    problem = Problem("X is wrong.", Variable("SYNAPSE_HTTP_PORT"), expected="a port", found="'x'")
    assert problem == "X is wrong." and f"{problem}" == "X is wrong."
    assert UserError(problem).details[0].subject == Variable("SYNAPSE_HTTP_PORT")
    assert UserError("a plain sentence").details[0].subject is None


# env -> (subject, related) each problem must carry, in order; values stated by hand.
BAD = [
    ({"SYNAPSE_HTTP_PORT": "http"}, [("SYNAPSE_HTTP_PORT", [])]),
    ({"SYNAPSE_TLS_CERT": "/c.pem"}, [("SYNAPSE_TLS_KEY", ["SYNAPSE_TLS_CERT"])]),
    ({"COTURN_MIN_PORT": "50000", "COTURN_MAX_PORT": "40000"}, [("COTURN_MIN_PORT", ["COTURN_MAX_PORT"])]),
    ({"SYNAPSE_DATABASE": "postgres"}, [("POSTGRES_PASSWORD", ["SYNAPSE_DATABASE"])]),
    ({"SYNAPSE_PLACEMENT": "main=a"}, [("SYNAPSE_HOSTS", ["SYNAPSE_PLACEMENT"])]),
    (
        {"SYNAPSE_HOSTS": "a=10.0.0.1", "SYNAPSE_PLACEMENT": "main=b", "SYNAPSE_ENABLE_COMPRESSOR": "on"},
        [("SYNAPSE_PLACEMENT", ["SYNAPSE_HOSTS"]), ("SYNAPSE_ENABLE_COMPRESSOR", ["SYNAPSE_HOSTS"])],
    ),
    (
        {"SYNAPSE_COMPRESSOR_CHUNK_SIZE": "10", "SYNAPSE_COMPRESSOR_LEVELS": "100,50"},
        [("SYNAPSE_COMPRESSOR_CHUNK_SIZE", ["SYNAPSE_COMPRESSOR_LEVELS"])],
    ),
    (
        {"NGINX_PROXY_BUFFER_SIZE_BYTES": "8192", "NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES": "4096"},
        [("NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES", ["NGINX_PROXY_BUFFER_SIZE_BYTES"])],
    ),
]


@pytest.mark.parametrize(("env", "want"), BAD, ids=[next(iter(env)) for env, _ in BAD])
def test_a_refused_environment_names_its_variables_as_data(env, want):
    with pytest.raises(UserError) as info:
        load_settings({"SYNAPSE_SERVER_NAME": "example.test", "SYNAPSE_REPORT_STATS": "no", **env})
    details = info.value.details
    got = [(str(p.subject), [v.name for v in p.related]) for p in details]
    assert got == want, info.value.problems
    for problem in details:
        assert problem.expected and problem.found is not None, problem
        assert all(v.name in VARIABLES for v in problem.variables)


def test_a_secret_is_never_found_in_a_problem():
    with pytest.raises(UserError) as info:
        load_settings({"SYNAPSE_MACAROON_SECRET_KEY": "tooshort"})
    (problem,) = info.value.details
    assert problem.subject == Variable("SYNAPSE_MACAROON_SECRET_KEY") and problem.found == "<hidden>"
    assert "tooshort" not in json.dumps(problem.as_json())


def _check_json(env: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict]:
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **env}
    result = subprocess.run([SCRIPT, "check", "--json"], env=clean, capture_output=True, text=True, timeout=120)
    return result, json.loads(result.stdout)  # stdout is one JSON object, whatever the outcome


def test_check_json_lists_the_problems_of_a_bad_environment(base_env, tmp_root):
    env = {
        **base_env,
        "SYNAPSE_HTTP_PORT": "http",
        "SYNAPSE_TLS_CERT": "/certs/fullchain.pem",
        "COTURN_MIN_PORT": "50000",
        "COTURN_MAX_PORT": "40000",
        "SYNAPSE_WORKERS_TYPES": "synchrotron",  # a typo: a warning, beside the refusal
    }
    before = snapshot(tmp_root)
    result, report = _check_json(env)
    assert result.returncode == 2 and report["exit_code"] == 2 and report["ok"] is False
    assert report["checks"] == []
    assert [p["subject"] for p in report["problems"]] == [{"variable": "SYNAPSE_HTTP_PORT"}]
    (port,) = report["problems"]
    assert port["found"] == "'http'" and "whole number from 1 to 65535" in port["expected"]
    assert port["message"] in result.stderr  # the sentence is said as without --json
    (typo,) = report["warnings"]
    assert typo["found"] == "SYNAPSE_WORKERS_TYPES" and typo["related"] == ["SYNAPSE_WORKER_TYPES"]
    assert snapshot(tmp_root) == before

    # With each value valid, the checks across variables are next: every one of them at once.
    env["SYNAPSE_HTTP_PORT"] = "8008"
    result, report = _check_json(env)
    assert result.returncode == 2
    subjects = [(p["subject"], p["related"]) for p in report["problems"]]
    assert subjects == [
        ({"variable": "SYNAPSE_TLS_KEY"}, ["SYNAPSE_TLS_CERT"]),
        ({"variable": "COTURN_MIN_PORT"}, ["COTURN_MAX_PORT"]),
    ]
    assert report["problems"][1]["found"] == "50000"


def test_check_json_lists_warnings_of_a_passing_check(base_env, tmp_root):
    """Settings that do nothing here (start_warnings), a typo'd name, and a homeserver.yaml key: warnings with
    their subjects, beside the checks that ran; the exit code is check's own (0)."""
    data = tmp_root / "data"
    data.mkdir()
    (data / "my-log.yaml").write_text("version: 1\n")
    env = {
        **base_env,
        "SYNAPSE_HTTP_PORT": "8008",
        "COTURN_PORT": "3479",
        "SYNAPSE_WORKER_TYPE": "synchrotron",
        "SYNAPSE_CONFIG_DIR": str(data),
        "SYNAPSE_DATA_DIR": str(data),
    }
    result, report = _check_json(env)
    assert result.returncode == 0, result.stderr
    assert report["ok"] is True and report["exit_code"] == 0 and report["problems"] == []
    by_subject = {json.dumps(w["subject"]): w for w in report["warnings"]}
    coturn = by_subject['{"variable": "COTURN_PORT"}']
    assert coturn["related"] == ["SYNAPSE_ENABLE_BUILTIN_COTURN"] and coturn["expected"] == (
        "SYNAPSE_ENABLE_BUILTIN_COTURN=on"
    )
    typo = next(w for w in report["warnings"] if w["subject"] is None)
    assert typo["found"] == "SYNAPSE_WORKER_TYPE" and typo["related"] == ["SYNAPSE_WORKER_TYPES"]
    for warning in report["warnings"]:
        assert f"synapse-workers: warning: {warning['message']}" in result.stderr
    names = [c["name"] for c in report["checks"]]
    assert names == ["nginx", "main"] and all(c["ok"] for c in report["checks"])
    assert "check: OK" not in result.stdout  # the human lines are not mixed into the JSON

    # The user's homeserver.yaml, now there: a key of it that is not used is a warning about its YAML path.
    config = data / "homeserver.yaml"
    config.write_text(config.read_text() + f"\nlog_config: {data / 'my-log.yaml'}\n")
    result, report = _check_json(env)
    assert result.returncode == 0, result.stderr
    (log_config,) = [w for w in report["warnings"] if w["subject"] and "path" in w["subject"]]
    assert log_config["subject"] == {"file": str(config), "path": "log_config"}
    assert log_config["related"] == ["SYNAPSE_LOG_CONFIG", "SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK"]


def test_yaml_path_reads_like_synapse_config_error():
    assert str(YamlPath("/data/homeserver.yaml", "listeners[0].port")) == "/data/homeserver.yaml at 'listeners[0].port'"


def test_a_port_in_use_names_its_variable_as_data(base_env):
    import socket

    from synapse_workers.load import load_plan
    from synapse_workers.run.preflight import check_ports

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {**base_env, "SYNAPSE_HTTP_PORT": str(port)}  # base_env binds to loopback
        problems = [p for p in check_ports(load_plan(env)) if f":{port} " in p]
    (problem,) = problems
    assert problem.subject == Variable("SYNAPSE_HTTP_PORT") and problem.expected == "a port free on this machine"
    assert problem.found == f"127.0.0.1:{port} is in use by another program"


def test_check_json_reports_a_failed_check_with_its_error(base_env, tmp_root):
    """A homeserver.yaml Synapse's own loader refuses (url previews without an IP blacklist): exit 1 as without
    --json, the process's check not ok with Synapse's error, and no problem of ours (the input is well-formed)."""
    data = tmp_root / "data"
    data.mkdir()
    env = {**base_env, "SYNAPSE_HTTP_PORT": "8008", "SYNAPSE_CONFIG_DIR": str(data), "SYNAPSE_DATA_DIR": str(data)}
    result, report = _check_json(env)  # generates homeserver.yaml
    assert result.returncode == 0, result.stderr
    config = data / "homeserver.yaml"
    config.write_text(config.read_text() + "\nurl_preview_enabled: true\n")
    result, report = _check_json(env)
    assert result.returncode == 1 and report["exit_code"] == 1 and report["ok"] is False
    assert report["problems"] == []
    main = next(c for c in report["checks"] if c["name"] == "main")
    assert main["ok"] is False and "url_preview_ip_range_blacklist" in main["error"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_refusal_of_a_bad_environment_names_its_subject(base_env, tmp_root, capsys, case):
    """test_cli_errors' bad environments: each problem's subject is a registry variable, a key of the user's
    homeserver.yaml, a file or an argument, and the sentence names it; none is left without one."""
    from synapse_workers.load import load_plan

    bad, _ = _prepare(base_env, tmp_root / "case", case)
    capsys.readouterr()
    with pytest.raises(UserError) as info:
        load_plan(bad)
    for problem in info.value.details:
        assert all(v.name in VARIABLES for v in problem.variables)
        assert problem.subject is not None, problem
        named = problem.subject.path if isinstance(problem.subject, YamlPath) else str(problem.subject)
        assert named in problem, problem
        assert problem.expected, problem


def test_placement_keys_are_checked_in_settings_with_their_subject(base_env):
    """SYNAPSE_PLACEMENT against the worker list: settings.placement_key_problems, which plan._placement calls."""
    from synapse_workers.load import load_plan

    env = {
        **base_env,
        "SYNAPSE_WORKER_TYPES": "synchrotron, a=pusher+federation_sender",
        "SYNAPSE_HOSTS": "front=10.0.0.1,back=10.0.0.2",
        "SYNAPSE_PLACEMENT": "synchrotorn=back,pusher=front,federation_sender=back",
    }
    with pytest.raises(UserError) as info:
        load_plan(env, "front")
    unknown, split = info.value.details
    assert (unknown.subject, unknown.found, unknown.related) == (
        Variable("SYNAPSE_PLACEMENT"),
        "synchrotorn",
        (Variable("SYNAPSE_WORKER_TYPES"),),
    )
    assert "a1" in split and split.found == "pusher=front, federation_sender=back"


# A port two settings ask for: the owner named first is the subject, the other's variables are related.
CLASHES = [
    (
        {"SYNAPSE_ENABLE_BUILTIN_COTURN": "on", "COTURN_PORT": "8008", "SYNAPSE_HTTP_PORT": "8008"},
        "COTURN_PORT=8008 and SYNAPSE_HTTP_PORT=8008 both use port 8008 (tcp)",
        ("COTURN_PORT", ["SYNAPSE_HTTP_PORT"]),
    ),
    (
        {"SYNAPSE_METRICS": "yes", "PROMETHEUS_PORT": "8008", "SYNAPSE_HTTP_PORT": "8008"},
        "PROMETHEUS_PORT=8008 and SYNAPSE_HTTP_PORT=8008 both use port 8008 (tcp)",
        ("PROMETHEUS_PORT", ["SYNAPSE_HTTP_PORT"]),
    ),
    (
        {"SYNAPSE_INTERNAL_PORT_BASE": "30000", "SYNAPSE_HTTP_PORT": "30002"},
        "SYNAPSE_HTTP_PORT=30002 and SYNAPSE_INTERNAL_PORT_BASE=30000+2 (main's health listener) both use port 30002",
        ("SYNAPSE_HTTP_PORT", ["SYNAPSE_INTERNAL_PORT_BASE"]),
    ),
    (
        {"SYNAPSE_INTERNAL_PORT_BASE": "30000", "SYNAPSE_HTTP_PORT": "30005", "SYNAPSE_WORKER_TYPES": "synchrotron"},
        "SYNAPSE_HTTP_PORT=30005 collides with the internal ports 30000-",
        ("SYNAPSE_HTTP_PORT", ["SYNAPSE_INTERNAL_PORT_BASE"]),
    ),
]


@pytest.mark.parametrize(("env", "sentence", "want"), CLASHES, ids=["coturn", "prometheus", "internal", "range"])
def test_a_port_clash_names_both_owners_as_data(base_env, env, sentence, want):
    from synapse_workers.load import load_plan

    with pytest.raises(UserError) as info:
        load_plan({**base_env, **env})
    (problem,) = info.value.details
    assert problem.startswith(sentence), problem
    assert (str(problem.subject), [v.name for v in problem.related]) == want
    assert problem.expected and problem.found


def test_check_json_names_a_listener_of_homeserver_yaml_by_its_yaml_path(base_env, tmp_root):
    """The user's homeserver.yaml: an http listener on the public port is a clash whose subject is its YAML path
    (SYNAPSE_HTTP_PORT related); a metrics listener, not served, is a warning about its YAML path."""
    import yaml

    data = tmp_root / "data"
    data.mkdir()
    env = {**base_env, "SYNAPSE_HTTP_PORT": "8008", "SYNAPSE_CONFIG_DIR": str(data), "SYNAPSE_DATA_DIR": str(data)}
    result, report = _check_json(env)  # generates homeserver.yaml
    assert result.returncode == 0, result.stderr
    config = data / "homeserver.yaml"
    original = yaml.safe_load(config.read_text())
    assert len(original["listeners"]) == 1

    clash = {"port": 8008, "type": "http", "bind_addresses": ["127.0.0.1"], "resources": [{"names": ["client"]}]}
    config.write_text(yaml.safe_dump({**original, "listeners": [*original["listeners"], clash]}))
    result, report = _check_json(env)
    assert result.returncode == 2 and report["exit_code"] == 2, result.stderr
    (problem,) = report["problems"]
    assert problem["message"].startswith(
        f"listeners[1].port=8008 in {config} and SYNAPSE_HTTP_PORT=8008 both use port 8008 (tcp)"
    )
    assert problem["subject"] == {"file": str(config), "path": "listeners[1].port"}
    assert problem["related"] == ["SYNAPSE_HTTP_PORT"]

    metrics = {"port": 9000, "type": "metrics", "bind_addresses": ["127.0.0.1"]}
    config.write_text(yaml.safe_dump({**original, "listeners": [*original["listeners"], metrics]}))
    result, report = _check_json(env)
    assert result.returncode == 0, result.stderr
    (warning,) = [w for w in report["warnings"] if w["subject"] == {"file": str(config), "path": "listeners[1]"}]
    assert warning["message"].startswith(f"{config}: listeners[1] (type: metrics, port 9000) is not served")
    assert warning["related"] == ["SYNAPSE_METRICS"] and warning["found"] == "type: metrics"
    assert f"synapse-workers: warning: {warning['message']}" in result.stderr


def test_a_host_without_the_copied_files_names_the_first_missing_one(base_env):
    """Several hosts: a host other than main's refuses to start without homeserver.yaml copied from main's."""
    from synapse_workers.load import load_plan

    env = {
        **base_env,
        "SYNAPSE_WORKER_TYPES": "synchrotron",
        "SYNAPSE_HOSTS": "front=10.0.0.1,back=10.0.0.2",
        "SYNAPSE_PLACEMENT": "main=front,synchrotron=back",
    }
    with pytest.raises(UserError) as info:
        load_plan(env, "back")
    (problem,) = info.value.details
    config = f"{base_env['SYNAPSE_CONFIG_DIR']}/homeserver.yaml"
    assert problem.startswith(f"--host back: {config}")
    assert problem.subject == File(config) and problem.related == (Variable("SYNAPSE_HOSTS"),)


def test_jemalloc_missing_names_synapse_malloc(monkeypatch):
    from synapse_workers.run import binaries

    monkeypatch.setattr(binaries, "JEMALLOC_PATHS", ("/nonexistent/libjemalloc.so.2",))
    with pytest.raises(UserError) as info:
        binaries.find_jemalloc()
    (problem,) = info.value.details
    assert problem.startswith("SYNAPSE_MALLOC (jemalloc, or auto in fork mode) needs libjemalloc.so.2")
    assert (
        problem.subject == Variable("SYNAPSE_MALLOC")
        and problem.found == "no libjemalloc.so.2 in /nonexistent/libjemalloc.so.2"
    )
