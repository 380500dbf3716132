"""The command as an admin uses it from a shell: one run names every problem, pipes, `status`/`health`
from the runtime dir alone. Runs the real console script; nothing is started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from synapse_workers.layout import make_layout
from synapse_workers.programs import Health
from synapse_workers.run.status import ProcessStatus, StackStatus, write_status

SCRIPT = str(Path(sys.executable).with_name("synapse-workers"))  # the venv running the tests (SW_VENV)


def run(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **env}
    return subprocess.run([SCRIPT, *argv], env=clean, capture_output=True, text=True, timeout=60)


def test_one_run_lists_every_problem(base_env):
    """A bad port, a bad worker type and a bad switch: all three in one run, each naming its variable."""
    env = {**base_env, "SYNAPSE_HTTP_PORT": "0", "SYNAPSE_WORKER_TYPES": "synchrotron, typng",
           "SYNAPSE_METRICS": "maybe"}
    result = run(env, "plan")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("synapse-workers: error:")]
    assert len(errors) == 3, result.stderr
    text = "\n".join(errors)
    assert "SYNAPSE_HTTP_PORT='0'" in text and "SYNAPSE_METRICS='maybe'" in text
    assert "SYNAPSE_WORKER_TYPES" in text and "'typng'" in text and "Did you mean 'typing'" in text
    assert "Traceback" not in result.stderr


def test_one_run_lists_files_and_ports_together(base_env, tmp_root):
    env = {**base_env, "SYNAPSE_TLS_CERT": str(tmp_root / "missing.pem"), "SYNAPSE_TLS_KEY": str(tmp_root / "k"),
           "SYNAPSE_INTERNAL_PORT_BASE": "30000", "SYNAPSE_HTTP_PORT": "30011",
           "SYNAPSE_WORKER_TYPES": "synchrotron:2"}
    # (More than 255 workers are refused by the worker list itself, so the port range no longer overflows.)
    result = run(env, "plan")
    assert result.returncode == 2
    assert "SYNAPSE_TLS_CERT=" in result.stderr and "SYNAPSE_TLS_KEY=" in result.stderr
    assert "SYNAPSE_HTTP_PORT=30011" in result.stderr and "SYNAPSE_INTERNAL_PORT_BASE=30000" in result.stderr


def test_a_closed_pipe_is_a_quiet_exit(base_env):
    result = subprocess.run(f"{SCRIPT} env | head -n 1", shell=True, capture_output=True, text=True, timeout=60,
                            env={"PATH": os.environ["PATH"], **base_env})
    assert result.stdout.count("\n") == 1
    assert result.stderr == "", result.stderr


def test_status_without_a_stack_names_the_runtime_dir(tmp_root):
    result = run({"SYNAPSE_RUNTIME_DIR": str(tmp_root / "run")}, "status")
    assert result.returncode == 2
    assert "SYNAPSE_RUNTIME_DIR=" in result.stderr and "synapse-workers run" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_root / "run").exists()  # looking changes nothing
    bad = run({"SYNAPSE_RUNTIME_DIR": "relative/dir"}, "health")
    assert bad.returncode == 2 and "SYNAPSE_RUNTIME_DIR='relative/dir' is invalid" in bad.stderr


def test_status_of_a_stopped_stack_says_so(tmp_root):
    """What a stopped stack left behind is shown as stopped: no launcher holds the runtime dir's lock."""
    layout = make_layout(str(tmp_root), "/data")
    Path(layout.state_dir).mkdir()
    started = time.time() - 90
    write_status(layout, StackStatus(
        launcher_pid=1, server_name="example.test", public_health=Health("http", "http://127.0.0.1:1/health"),
        processes=(ProcessStatus("main", 4242, "RUNNING", started, 2, "boom", Health("http", "http://x/health")),),
    ))
    result = run({"SYNAPSE_RUNTIME_DIR": str(tmp_root)}, "status", "--json")
    assert result.returncode == 3, result.stderr
    assert json.loads(result.stdout) == [
        {"name": "main", "pid": 0, "state": "STOPPED", "uptime_s": 0.0, "restarts": 2, "last_error": "boom"}
    ]
    text = run({"SYNAPSE_RUNTIME_DIR": str(tmp_root)}, "status")
    assert text.returncode == 3 and "not running" in text.stdout
    health = run({"SYNAPSE_RUNTIME_DIR": str(tmp_root)}, "health")
    assert health.returncode == 1 and "not running" in health.stdout


def test_unknown_variables_are_warned_about_with_the_closest_name(base_env):
    env = {**base_env, "SYNAPSE_WORKER_TYPE": "synchrotron", "NGINX_KEEPALIVE_CONNECTION_MULTIPLIER": "2",
           "POSTGRES_PASWORD": "x", "SYNAPSE_CACHE_FACTOR": "2.0", "SYNAPSE_CACHE_FACTOR_GETEVENT": "3"}
    result = run(env, "plan")
    assert result.returncode == 0, result.stderr  # a warning, not an error: the stack still starts
    warnings = [line for line in result.stderr.splitlines() if line.startswith("synapse-workers: warning:")]
    assert len(warnings) == 3, result.stderr  # Synapse's own SYNAPSE_CACHE_FACTOR* are not ours to judge
    text = "\n".join(warnings)
    assert "SYNAPSE_WORKER_TYPE is not a variable" in text and "Did you mean SYNAPSE_WORKER_TYPES?" in text
    # The original image's documentation spells this one without UPSTREAM_.
    assert "Did you mean NGINX_UPSTREAM_KEEPALIVE_CONNECTION_MULTIPLIER?" in text
    assert "Did you mean POSTGRES_PASSWORD?" in text and "'x'" not in text  # names only, never values


def test_health_reports_a_down_add_on_without_failing(tmp_root):
    """An add-on (Prometheus, an exporter) that is down is printed, but the exit code (the container's
    HEALTHCHECK) follows nginx and the Synapse processes only (a worker that is down does fail it)."""
    import fcntl
    import http.server
    import threading

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ok = f"http://127.0.0.1:{server.server_address[1]}/health"
    with SocketClosedPort() as dead:
        layout = make_layout(str(tmp_root), "/data")
        Path(layout.state_dir).mkdir()

        def status(addon: bool) -> None:
            write_status(layout, StackStatus(
                launcher_pid=1, server_name="example.test", public_health=Health("http", ok),
                processes=(
                    ProcessStatus("main", 1, "RUNNING", time.time(), 0, "", Health("http", ok)),
                    ProcessStatus("prometheus", 0, "FATAL", 0, 3, "crash loop",
                                  Health("http", f"http://127.0.0.1:{dead}/-/ready"), addon=addon),
                ),
            ))

        with open(layout.lock_file, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a launcher holds the runtime dir: the stack counts as running
            try:
                status(addon=True)
                result = run({"SYNAPSE_RUNTIME_DIR": str(tmp_root)}, "health")
                assert result.returncode == 0, result.stdout + result.stderr
                assert "main: OK" in result.stdout and "prometheus: FAILED" in result.stdout
                assert "(not essential)" in result.stdout
                status(addon=False)  # the same failure in a Synapse process decides
                assert run({"SYNAPSE_RUNTIME_DIR": str(tmp_root)}, "health").returncode == 1
            finally:
                server.shutdown()


class SocketClosedPort:
    """A loopback port nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        pass
