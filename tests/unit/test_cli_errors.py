"""The real console script with bad environments: exit 2, a clear message, no traceback, nothing touched."""

from __future__ import annotations

import contextlib
import io
import os
import selectors
import signal
import stat
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import yaml

from synapse_workers.cli import main as cli_main

SCRIPT = str(Path(sys.executable).with_name("synapse-workers"))  # the venv running the tests (SW_VENV)
WORKERS = "synchrotron:2, event_persister:2, media_repository, stream_writers=typing+to_device+receipts"


@pytest.fixture
def env(base_env):
    # base_env's random public port can land inside the random internal range; a fixed low port never does.
    return {**base_env, "SYNAPSE_HTTP_PORT": "8008", "SYNAPSE_WORKER_TYPES": WORKERS}


def _clean(env: dict[str, str]) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **env}


def run_script(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    """The installed console script, exec'd: a new interpreter importing everything."""
    return subprocess.run([SCRIPT, *argv], env=_clean(env), capture_output=True, text=True, timeout=60)


def run(env: dict[str, str], *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """What the console script does (`sys.exit(main())`), in a child process forked from this one after the
    imports: its own environment (only `env`), argv, stdin (/dev/null), stdout, stderr and exit status, an
    uncaught exception's traceback on stderr and exit 1, as the exec'd script would. It saves the ~0.2 s of
    interpreter start and imports per call that kept `pytest -m "not integration"` over a minute; `run_script`
    (used by test_console_script_with_bad_env and the other modules' SCRIPT runs) still execs the real one."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            for fd, target in ((null, 0), (out_w, 1), (err_w, 2)):
                os.dup2(fd, target)
            for fd in (null, out_r, out_w, err_r, err_w):
                os.close(fd)
            sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                          errors="backslashreplace", line_buffering=True)
            os.environ.clear()
            os.environ.update(_clean(env))
            sys.argv = [SCRIPT, *argv]
            try:
                code = cli_main()
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for fd in chunks:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired([SCRIPT, *argv], timeout)
            for key, _ in selector.select(left):
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.fd].append(data)
                else:
                    selector.unregister(key.fd)
                    os.close(key.fd)
    _, status = os.waitpid(pid, 0)
    out, err = (b"".join(chunks[fd]).decode().replace("\r\n", "\n") for fd in (out_r, err_r))
    return subprocess.CompletedProcess([SCRIPT, *argv], os.waitstatus_to_exitcode(status), out, err)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every directory and file under root: kind, mode, and bytes for files."""
    result: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISDIR(st.st_mode):
            result[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid)
        elif stat.S_ISLNK(st.st_mode):
            result[rel] = ("link", os.readlink(path))
        else:
            result[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, path.read_bytes())
    return result


# ---- fixtures for cases that need files -----------------------------------------------------------------


def _sqlite_homeserver(root: Path) -> dict[str, str]:
    path = root / "sqlite" / "homeserver.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({
        "server_name": "example.test",
        "database": {"name": "sqlite3", "args": {"database": "/data/homeserver.db"}},
    }))
    return {"SYNAPSE_CONFIG_PATH": str(path)}


def _no_database_homeserver(root: Path) -> dict[str, str]:
    # No database block at all means Synapse's default: SQLite.
    path = root / "nodb" / "homeserver.yaml"
    path.parent.mkdir()
    path.write_text("server_name: example.test\n")
    return {"SYNAPSE_CONFIG_PATH": str(path)}


def _list_homeserver(root: Path) -> dict[str, str]:
    path = root / "list" / "homeserver.yaml"
    path.parent.mkdir()
    path.write_text("- just\n- a list\n")
    return {"SYNAPSE_CONFIG_PATH": str(path)}


def _broken_yaml_homeserver(root: Path) -> dict[str, str]:
    path = root / "broken" / "homeserver.yaml"
    path.parent.mkdir()
    path.write_text("server_name: [unclosed\n")
    return {"SYNAPSE_CONFIG_PATH": str(path)}


def _homeserver_file(root: Path, name: str, data: bytes) -> dict[str, str]:
    """An existing homeserver.yaml of the user's (external PostgreSQL), with `data` appended."""
    path = root / name / "homeserver.yaml"
    path.parent.mkdir()
    head = b"server_name: example.test\ndatabase: {name: psycopg2, args: {host: db, password: hunter2}}\n"
    path.write_bytes(head + data)
    return {"SYNAPSE_CONFIG_PATH": str(path)}


def _listeners_a_port(root: Path) -> dict[str, str]:
    return _homeserver_file(root, "listeners-int", b"listeners: 8008\n")  # was a TypeError traceback


def _resources_a_string(root: Path) -> dict[str, str]:
    # was an AttributeError traceback
    return _homeserver_file(root, "resources-str", b"listeners:\n  - {port: 8008, type: http, resources: client}\n")


def _not_utf8(root: Path) -> dict[str, str]:
    return _homeserver_file(root, "latin1", b"# caf\xe9\nenable_metrics: false\n")  # was a UnicodeDecodeError


def _server_name_a_number(root: Path) -> dict[str, str]:
    path = root / "number" / "homeserver.yaml"
    path.parent.mkdir()
    path.write_text("server_name: 12345\ndatabase: {name: psycopg2, args: {host: db}}\n")  # was "has no server_name"
    return {"SYNAPSE_CONFIG_PATH": str(path)}


def _empty_config_dir(root: Path) -> dict[str, str]:
    return {"SYNAPSE_CONFIG_DIR": str(root / "fresh-config")}


def _missing_cert(root: Path) -> dict[str, str]:
    key = root / "tls.key"
    key.write_text("key")
    return {"SYNAPSE_TLS_CERT": str(root / "missing.crt"), "SYNAPSE_TLS_KEY": str(key)}


def _cert_without_key(root: Path) -> dict[str, str]:
    cert = root / "tls.crt"
    cert.write_text("cert")
    return {"SYNAPSE_TLS_CERT": str(cert)}


def _tls_on_the_exporter(root: Path) -> dict[str, str]:
    cert, key = root / "tls.crt", root / "tls.key"
    cert.write_text("cert")
    key.write_text("key")
    return {"SYNAPSE_TLS_CERT": str(cert), "SYNAPSE_TLS_KEY": str(key), **EXPORTER, "SYNAPSE_TLS_PORT": "30008"}


def _tls_listener(root: Path, **files: str) -> Path:
    """A homeserver.yaml with a client listener and a `tls: true` federation listener on 8448."""
    path = root / "tls-listener" / "homeserver.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({
        "server_name": "example.test",
        "database": {"name": "psycopg2", "args": {"user": "synapse", "host": "db", "database": "synapse"}},
        "listeners": [
            {"port": 8008, "type": "http", "resources": [{"names": ["client"]}]},
            {"port": 8448, "type": "http", "tls": True, "resources": [{"names": ["federation"]}]},
        ],
        **files,
    }))
    return path


def _tls_listener_without_key(root: Path) -> dict[str, str]:
    cert = root / "tls.crt"
    cert.write_text("cert")
    return {"SYNAPSE_CONFIG_PATH": str(_tls_listener(root, tls_certificate_path=str(cert)))}


def _tls_listener_unreadable_cert(root: Path) -> dict[str, str]:
    key = root / "tls.key"
    key.write_text("key")
    files = {"tls_certificate_path": str(root / "missing.crt"), "tls_private_key_path": str(key)}
    return {"SYNAPSE_CONFIG_PATH": str(_tls_listener(root, **files))}


def _no(_root):
    return {}


# The PostgreSQL exporter (SYNAPSE_METRICS + its switch; POSTGRES_PASSWORD names an external database) is on base+8.
EXPORTER = {"SYNAPSE_METRICS": "yes", "SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT": "yes", "SYNAPSE_WORKER_TYPES": "",
            "SYNAPSE_INTERNAL_PORT_BASE": "30000"}


# (id, overrides, variables to remove, setup, strings stderr must contain)
CASES = [
    ("unknown-type", {"SYNAPSE_WORKER_TYPES": "synchrotorn:2"}, (), _no,
     ["SYNAPSE_WORKER_TYPES", "synchrotorn", "Did you mean 'synchrotron'?"]),
    ("bad-count", {"SYNAPSE_WORKER_TYPES": "pusher:-1"}, (), _no, ["SYNAPSE_WORKER_TYPES", "'-1'"]),
    ("reserved-name", {"SYNAPSE_WORKER_TYPES": "main=pusher"}, (), _no, ["SYNAPSE_WORKER_TYPES", "'main'"]),
    ("singleton-twice", {"SYNAPSE_WORKER_TYPES": "typing:2"}, (), _no,
     ["SYNAPSE_WORKER_TYPES", "'typing' can run on only one worker"]),
    ("singleton-via-merged", {"SYNAPSE_WORKER_TYPES": "a=typing+to_device, b=typing+presence"}, (), _no,
     ["SYNAPSE_WORKER_TYPES", "'typing'", "a1, b1"]),
    ("one-name-two-lists", {"SYNAPSE_WORKER_TYPES": "a=pusher, a=synchrotron"}, (), _no,
     ["SYNAPSE_WORKER_TYPES", "two different type lists"]),
    ("bad-boolean", {"SYNAPSE_METRICS": "maybe"}, (), _no, ["SYNAPSE_METRICS='maybe'", "expected"]),
    # Synapse itself would die at import on this value (strtobool), with a traceback in every process's log.
    ("bad-boolean-asyncio", {"SYNAPSE_ASYNC_IO_REACTOR": "maybe"}, (), _no,
     ["SYNAPSE_ASYNC_IO_REACTOR='maybe'", "expected"]),
    ("bad-boolean-keepalive", {"NGINX_CLIENT_KEEPALIVE_ENABLE": "sometimes"}, (), _no,
     ["NGINX_CLIENT_KEEPALIVE_ENABLE='sometimes'"]),
    ("report-stats-true", {"SYNAPSE_REPORT_STATS": "true"}, (), _no, ["SYNAPSE_REPORT_STATS='true'", "'yes' or 'no'"]),
    ("bad-port", {"SYNAPSE_HTTP_PORT": "99999"}, (), _no, ["SYNAPSE_HTTP_PORT='99999'", "65535"]),
    ("port-in-internal-range", {"SYNAPSE_INTERNAL_PORT_BASE": "30000", "SYNAPSE_HTTP_PORT": "30011"}, (), _no,
     ["SYNAPSE_HTTP_PORT=30011", "SYNAPSE_INTERNAL_PORT_BASE=30000"]),
    ("postgres-port", {"POSTGRES_PORT": "70000"}, (), _no, ["POSTGRES_PORT='70000'"]),
    # The exporter's port used to be chosen after the port checks: each of these passed.
    ("exporter-on-http-port", {**EXPORTER, "SYNAPSE_INTERNAL_PORT_BASE": "8000"}, (), _no,
     ["SYNAPSE_HTTP_PORT=8008", "SYNAPSE_INTERNAL_PORT_BASE=8000+8 (postgres_exporter's metrics listener)",
      "both use port 8008"]),
    ("prometheus-on-exporter", {**EXPORTER, "PROMETHEUS_PORT": "30008"}, (), _no,
     ["PROMETHEUS_PORT=30008", "SYNAPSE_INTERNAL_PORT_BASE=30000+8 (postgres_exporter's metrics listener)"]),
    ("tls-port-on-exporter", {}, (), _tls_on_the_exporter,
     ["SYNAPSE_TLS_PORT=30008", "SYNAPSE_INTERNAL_PORT_BASE=30000+8 (postgres_exporter's metrics listener)"]),
    ("gzip-level", {"NGINX_GZIP_COMP_LEVEL": "10"}, (), _no, ["NGINX_GZIP_COMP_LEVEL='10'", "from 1 to 9"]),
    ("read-timeout", {"NGINX_PROXY_READ_TIMEOUT": "abc"}, (), _no, ["NGINX_PROXY_READ_TIMEOUT='abc'"]),
    ("upload-size", {"SYNAPSE_MAX_UPLOAD_SIZE": "lots"}, (), _no, ["SYNAPSE_MAX_UPLOAD_SIZE='lots'"]),
    ("log-level", {"SYNAPSE_LOG_LEVEL": "LOUD"}, (), _no, ["SYNAPSE_LOG_LEVEL='LOUD'"]),
    ("relative-runtime-dir", {"SYNAPSE_RUNTIME_DIR": "run"}, (), _no, ["SYNAPSE_RUNTIME_DIR='run'", "absolute"]),
    ("busy-buffers", {"NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES": "1024"}, (), _no, ["NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES"]),
    ("temp-file-write-size", {"NGINX_PROXY_TEMP_FILE_WRITE_SIZE_BYTES": "1024"}, (), _no,
     ["NGINX_PROXY_TEMP_FILE_WRITE_SIZE_BYTES"]),
    ("several-at-once", {"SYNAPSE_METRICS": "maybe", "POSTGRES_PORT": "0", "SYNAPSE_LOG_LEVEL": "LOUD"}, (), _no,
     ["SYNAPSE_METRICS", "POSTGRES_PORT", "SYNAPSE_LOG_LEVEL"]),
    ("postgres-without-password", {"SYNAPSE_DATABASE": "postgres"}, ("POSTGRES_PASSWORD",), _empty_config_dir,
     ["SYNAPSE_DATABASE=postgres", "POSTGRES_PASSWORD"]),
    ("server-name-missing", {}, ("SYNAPSE_SERVER_NAME",), _empty_config_dir, ["SYNAPSE_SERVER_NAME is required"]),
    ("report-stats-missing", {}, ("SYNAPSE_REPORT_STATS",), _empty_config_dir, ["SYNAPSE_REPORT_STATS is required"]),
    ("server-name-differs", {"SYNAPSE_SERVER_NAME": "other.test"}, (), _no,
     ["SYNAPSE_SERVER_NAME='other.test'", "'example.test'"]),
    ("workers-on-sqlite", {}, (), _sqlite_homeserver, ["SYNAPSE_WORKER_TYPES needs PostgreSQL", "SQLite"]),
    ("workers-on-default-sqlite", {}, (), _no_database_homeserver, ["SYNAPSE_WORKER_TYPES needs PostgreSQL"]),
    ("workers-on-sqlite-generated", {"SYNAPSE_DATABASE": "sqlite"}, (), _empty_config_dir,
     ["SYNAPSE_WORKER_TYPES needs PostgreSQL", "SYNAPSE_DATABASE=sqlite"]),
    ("homeserver-not-a-mapping", {}, (), _list_homeserver, ["SYNAPSE_CONFIG_PATH", "not a YAML mapping"]),
    ("homeserver-broken-yaml", {}, (), _broken_yaml_homeserver, ["SYNAPSE_CONFIG_PATH", "cannot be read as YAML"]),
    ("homeserver-listeners-int", {}, (), _listeners_a_port,
     ["listeners-int/homeserver.yaml (SYNAPSE_CONFIG_PATH) at 'listeners': expected a list", "the integer 8008"]),
    ("homeserver-resources-string", {}, (), _resources_a_string,
     ["resources-str/homeserver.yaml (SYNAPSE_CONFIG_PATH) at 'listeners[0].resources': expected a list of mappings "
      "with 'names'", "found the string 'client'"]),
    ("homeserver-not-utf8", {}, (), _not_utf8,
     ["latin1/homeserver.yaml (SYNAPSE_CONFIG_PATH) is not UTF-8", "0xe9 on line 3", "expected a UTF-8"]),
    ("homeserver-server-name-number", {}, (), _server_name_a_number,
     ["number/homeserver.yaml (SYNAPSE_CONFIG_PATH) at 'server_name': expected a server name", "the integer 12345"]),
    ("tls-cert-without-key", {}, (), _cert_without_key, ["SYNAPSE_TLS_CERT", "SYNAPSE_TLS_KEY"]),
    ("tls-cert-missing", {}, (), _missing_cert, ["SYNAPSE_TLS_CERT=", "existing file"]),
    ("tls-listener-without-key", {}, (), _tls_listener_without_key,
     ["tls-listener/homeserver.yaml (SYNAPSE_CONFIG_PATH) at 'listeners[1].tls'", "'tls_private_key_path' is not set"]),
    ("tls-listener-unreadable-cert", {}, (), _tls_listener_unreadable_cert,
     ["tls-listener/homeserver.yaml (SYNAPSE_CONFIG_PATH) at 'tls_certificate_path'", "missing.crt' cannot be read"]),
    ("appservice-dir-missing", {"SYNAPSE_AS_REGISTRATION_DIR": "/nonexistent/appservices"}, (), _no,
     ["SYNAPSE_AS_REGISTRATION_DIR='/nonexistent/appservices'"]),
    ("appservice-file-missing", {"SYNAPSE_APPSERVICES": "/nonexistent/bridge.yaml"}, (), _no,
     ["SYNAPSE_APPSERVICES", "/nonexistent/bridge.yaml"]),
]


def _case_env(base: dict[str, str], root: Path) -> dict[str, str]:
    """base_env with its directories moved under root (so several cases can live side by side)."""
    return {**base, "SYNAPSE_HTTP_PORT": "8008", "SYNAPSE_WORKER_TYPES": WORKERS,
            "SYNAPSE_CONFIG_DIR": str(root / "data"), "SYNAPSE_DATA_DIR": str(root / "data"),
            "SYNAPSE_RUNTIME_DIR": str(root / "run")}


def _prepare(base: dict[str, str], root: Path, case) -> tuple[dict[str, str], dict]:
    """Generate a good deployment under root, return the bad env for `case` and a snapshot of root."""
    _, overrides, removed, setup, _ = case
    root.mkdir(parents=True, exist_ok=True)
    good = _case_env(base, root)
    extra = setup(root)
    assert cli_main(["generate"], env=good) == 0
    before = snapshot(root)
    assert any(name.endswith("nginx.conf") for name in before)
    bad = {k: v for k, v in {**good, **extra, **overrides}.items() if k not in removed}
    return bad, before


def _check(case, code: int, out: str, err: str, root: Path, before: dict) -> list[str]:
    case_id, *_, expected = case
    problems = []
    if code != 2:
        problems.append(f"exit code {code}, expected 2")
    if "Traceback" in err or "Traceback" in out:
        problems.append("a traceback was printed")
    if not err.startswith("synapse-workers: error: "):
        problems.append("stderr does not start with 'synapse-workers: error: '")
    problems += [f"stderr lacks {text!r}" for text in expected if text not in err]
    if "not-a-real-password" in out + err or "hunter2" in out + err:
        problems.append("the database password was echoed")
    if snapshot(root) != before:
        problems.append("files under the runtime/data dirs changed")
    return [f"[{case_id}] {p}\n    stderr: {err.strip()[:400]}" for p in problems]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_env_exits_2_and_changes_nothing(base_env, tmp_root, capsys, case):
    """In-process (fast, one test per case); the console script itself runs every case below."""
    bad, before = _prepare(base_env, tmp_root / "case", case)
    capsys.readouterr()
    code = cli_main(["generate"], env=bad)
    captured = capsys.readouterr()
    problems = _check(case, code, captured.out, captured.err, tmp_root / "case", before)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "argv",
    [["generate"], ["plan", "--json"], ["routes", "GET", "no-leading-slash"], ["no-such-command"]],
)
def test_the_forked_run_answers_as_the_exec_d_script(base_env, argv):
    """`run` (forked after the imports) is a stand-in for the console script: same exit status and output, for
    success, a bad variable (exit 2), argparse's usage error and a UserError of a subcommand."""
    env = {**base_env, "SYNAPSE_WORKER_TYPES": "synchrotron:2, nonsense"} if argv == ["generate"] else base_env
    forked, real = run(env, *argv), run_script(env, *argv)
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)


# The console script costs a Python start-up per run: these cases (at least one of each kind) also go through it.
SCRIPT_CASES = [c for c in CASES if c[0] in {
    "unknown-type", "singleton-twice", "singleton-via-merged", "bad-boolean", "report-stats-true", "bad-port",
    "port-in-internal-range", "gzip-level", "several-at-once", "temp-file-write-size", "server-name-missing",
    "server-name-differs", "workers-on-sqlite", "homeserver-not-a-mapping", "tls-cert-without-key",
    "tls-cert-missing", "appservice-dir-missing", "exporter-on-http-port", "tls-listener-without-key",
    "homeserver-listeners-int", "homeserver-not-utf8",
}]


@pytest.mark.parametrize("case", SCRIPT_CASES, ids=[c[0] for c in SCRIPT_CASES])
def test_console_script_with_bad_env(base_env, tmp_root, case):
    """The real `synapse-workers generate`: exit 2, the variable named, no traceback, nothing touched."""
    root = tmp_root / "case"
    bad, before = _prepare(base_env, root, case)
    result = run_script(bad, "generate")
    problems = _check(case, result.returncode, result.stdout, result.stderr, root, before)
    assert not problems, "\n".join(problems)


def test_script_cases_are_enough():
    assert len(SCRIPT_CASES) >= 12 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    "command", [["plan"], ["plan", "--json"], ["check"], ["routes", "GET", "/_matrix/client/v3/sync"]]
)
def test_other_commands_report_bad_env_the_same_way(env, tmp_root, command):
    result = run({**env, "SYNAPSE_WORKER_TYPES": "typing:2"}, *command)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "SYNAPSE_WORKER_TYPES" in result.stderr
    assert result.stdout == ""
    assert not (tmp_root / "run").exists() and not (tmp_root / "data").exists()


def test_bad_env_on_first_start_writes_nothing(env, tmp_root):
    result = run({**env, "SYNAPSE_METRICS": "maybe"}, "generate")
    assert result.returncode == 2
    assert list(tmp_root.iterdir()) == []


def test_routes_usage_error_is_clean(env):
    result = run(env, "routes", "GET", "no-leading-slash")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "routes: expected [METHOD] PATH" in result.stderr


# ---- good runs -------------------------------------------------------------------------------------------


def test_generate_twice_leaves_files_identical(env, tmp_root):
    first = run(env, "generate")
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    before = snapshot(tmp_root)
    second = run(env, "generate")
    assert second.returncode == 0, second.stderr
    assert snapshot(tmp_root) == before
    assert (tmp_root / "run" / "nginx" / "nginx.conf").exists()
    assert not [p for p in (tmp_root / "run").iterdir() if p.name.startswith((".staging-", ".old-", ".tmp"))]


EXISTING = """\
# My own homeserver.yaml: comments, ordering and formatting must survive.
server_name: "example.test"
report_stats: false
listeners:
  - port: 8118
    type: http
    x_forwarded: true
    resources:
      - names: [client, federation]
database:
  name: psycopg2
  args: {user: synapse, password: "hunter2", host: db, database: synapse}
signing_key_path: /data/example.test.signing.key
"""


@pytest.mark.parametrize("workers", ["", WORKERS])
def test_existing_homeserver_yaml_stays_byte_identical(env, tmp_root, workers):
    config = tmp_root / "data" / "homeserver.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(EXISTING)
    os.chmod(config, 0o640)
    before = (config.read_bytes(), config.stat().st_mode, config.stat().st_uid)
    env = {k: v for k, v in env.items() if k not in ("SYNAPSE_REPORT_STATS", "SYNAPSE_HTTP_PORT")}
    env["SYNAPSE_WORKER_TYPES"] = workers
    for _ in range(2):
        result = run(env, "generate")
        assert result.returncode == 0, result.stderr
        assert (config.read_bytes(), config.stat().st_mode, config.stat().st_uid) == before
    main_yaml = yaml.safe_load((tmp_root / "run" / "synapse" / "main.yaml").read_text())
    assert main_yaml["listeners"][0]["port"] == int(env["SYNAPSE_INTERNAL_PORT_BASE"])
    nginx = (tmp_root / "run" / "nginx" / "nginx.conf").read_text()
    assert ":8118 " in nginx  # the user's public port moves to nginx
    assert "hunter2" not in nginx


def test_generate_ok_output_names_the_nginx_file(env, tmp_root):
    result = run(env, "generate")
    assert result.returncode == 0
    assert "main + 6 workers" in result.stdout
    assert str(tmp_root / "run" / "nginx" / "nginx.conf") in result.stdout
