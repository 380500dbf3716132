"""Fork mode: the zygote's restart policy (pure), its program row, the output listener's handling of its lines."""

from __future__ import annotations

import configparser
import os
import signal
import subprocess
import sys
from pathlib import Path

from synapse_workers.load import load_plan
from synapse_workers.programs import STAGE_MAIN, flatten, programs
from synapse_workers.render.supervisor import render_supervisor
from synapse_workers.run import logprefix
from synapse_workers.run.zygote import (
    NAME,
    STARTRETRIES,
    Child,
    ChildSpec,
    decode_specs,
    due,
    encode_specs,
    exited,
    spawned,
)
from tests.support.stack import SW
from tests.unit.test_programs import BINARIES

SIGKILLED = 9  # a wait status: killed by SIGKILL
EXIT_1 = 1 << 8


def spec(start_secs: int = 5) -> ChildSpec:
    return ChildSpec("synchrotron1", ("/py", "-m", "synapse.app.generic_worker", "--config-path", "/a.yaml"),
                     start_secs, 15)


def running_child(now: float = 100.0) -> Child:
    child = Child(spec(), wanted=True)
    spawned(child, 4242, now - 10, 0.0)
    assert due(child, now) is None and child.state == "RUNNING"
    return child


def test_specs_round_trip_and_name_the_app():
    specs = [spec(), ChildSpec("main", ("/py", "-m", "synapse.app.homeserver", "--config-path", "/h y.yaml"), 5, 15)]
    assert decode_specs(encode_specs(specs)) == specs
    assert [s.app for s in specs] == ["synapse.app.generic_worker", "synapse.app.homeserver"]


def test_a_child_that_ran_is_forked_again_at_once():
    child = running_child()
    exited(child, SIGKILLED, 101.0)
    assert (child.state, child.pid, child.exit_status) == ("EXITED", 0, -1)
    assert due(child, 101.0) == "spawn"


def test_a_failed_start_backs_off_one_two_three_seconds_then_is_fatal():
    child = Child(spec(start_secs=5), wanted=True)
    now = 0.0
    for attempt in range(1, STARTRETRIES + 1):
        spawned(child, 1000 + attempt, now, 0.0)
        exited(child, EXIT_1, now + 1)  # before start_secs: a failed start
        assert (child.state, child.exit_status) == ("BACKOFF", 1)
        assert due(child, now + 1 + attempt - 0.01) is None
        now = now + 1 + attempt
        assert due(child, now) == "spawn"
    spawned(child, 2000, now, 0.0)
    exited(child, EXIT_1, now + 1)
    assert child.state == "FATAL" and due(child, now + 100) is None


def test_running_resets_the_backoff():
    child = Child(spec(start_secs=5), wanted=True)
    spawned(child, 1, 0.0, 0.0)
    exited(child, EXIT_1, 1.0)
    assert child.backoff == 1
    spawned(child, 2, 2.0, 0.0)
    assert due(child, 7.0) is None and (child.state, child.backoff) == ("RUNNING", 0)


def test_a_stopped_child_stays_stopped_and_a_slow_one_is_killed():
    child = running_child()
    child.state, child.kill_at, child.wanted = "STOPPING", 115.0, False
    assert due(child, 110.0) is None
    assert due(child, 115.0) == "kill"
    exited(child, SIGKILLED, 115.1)
    assert child.state == "STOPPED" and due(child, 200.0) is None


def test_fork_mode_is_one_program_that_forks_every_synapse_process(base_env):
    plan = load_plan({**base_env, "SYNAPSE_WORKER_TYPES": "synchrotron, event_persister",
                      "SYNAPSE_LAUNCH_MODE": "fork"})
    progs = programs(plan, as_root=True, binaries=BINARIES)
    assert [p.name for p in progs] == ["redis", NAME, "nginx"]
    zygote = progs[1]
    assert zygote.stage == STAGE_MAIN and zygote.critical
    assert zygote.command[:5] == ("/usr/bin/setpriv", "--reuid=991", "--regid=991", "--clear-groups", "--")
    assert zygote.command[6:8] == ("-m", "synapse_workers.run.zygote")
    assert [c.name for c in zygote.children] == ["main", "synchrotron1", "event_persister1"]
    # The children's commands are what separate processes would run (and what they show in ps).
    process_plan = load_plan({**base_env, "SYNAPSE_WORKER_TYPES": "synchrotron, event_persister",
                              "SYNAPSE_LAUNCH_MODE": "process"})
    separate = {p.name: p for p in programs(process_plan, as_root=False, binaries=BINARIES)}
    for child in zygote.children:
        assert child.command == separate[child.name].command
        assert child.health == separate[child.name].health
    assert decode_specs(zygote.command[-1]) == [ChildSpec(c.name, c.command, 5, 15) for c in zygote.children]
    assert [p.name for p in flatten(progs)] == ["redis", NAME, "main", "synchrotron1", "event_persister1", "nginx"]
    # supervisord knows only the zygote.
    (text,) = render_supervisor(plan.layout, progs, as_root=True).values()
    assert f"[program:{NAME}]" in text and "[program:main]" not in text and "[program:synchrotron1]" not in text


def test_the_launch_mode_decides_the_programs(base_env):
    plan = load_plan({**base_env, "SYNAPSE_WORKER_TYPES": "synchrotron"})
    names = [p.name for p in programs(plan, as_root=False, binaries=BINARIES)]
    assert plan.settings.core.launch_mode in ("process", "fork")
    expected = ["redis", "main", "synchrotron1", "nginx"] if plan.settings.core.launch_mode == "process" else [
        "redis", NAME, "nginx"]
    assert names == expected


def test_forked_lines_get_their_own_name_and_capture(tmp_path: Path):
    lines = [b"main|hello", b"synchrotron1|GET /sync?access_token=x", b"synapse|forked main (pid 3)",
             b"Traceback (most recent call last):", b"../../etc/passwd|x"]
    named = logprefix.split_forked(lines)
    assert named == [(b"main", b"hello"), (b"synchrotron1", b"GET /sync?access_token=x"),
                     (b"synapse", b"forked main (pid 3)"), (b"synapse", b"Traceback (most recent call last):"),
                     (b"synapse", b"../../etc/passwd|x")]
    captures = logprefix.Captures(str(tmp_path))
    captures.write(b"main", [b"one", b"two"])
    captures.write(b"main", [b"three"])
    assert (tmp_path / "main.log").read_bytes() == b"one\ntwo\nthree\n"


def test_the_listener_prefixes_forked_lines_with_their_names(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    payload = b"processname:synapse groupname:stack pid:1 channel:stdout\nmain|a access_token=s3cret\nsynchrotron1|b\n"
    header = (f"ver:3.0 server:supervisor serial:1 pool:logs poolserial:1 eventname:PROCESS_LOG_STDOUT "
              f"len:{len(payload)}\n")
    env = {**os.environ, "SUPERVISOR_SERVER_URL": f"unix://{state}/supervisor.sock"}
    result = subprocess.run([sys.executable, "-m", "synapse_workers.run.logprefix"], input=header.encode() + payload,
                            capture_output=True, env=env, timeout=30)
    assert result.stderr.decode().splitlines() == [
        f"{'main':18}| a access_token=<redacted>",
        f"{'synchrotron1':18}| b",
    ]
    assert (state / "main.log").read_text() == "a access_token=<redacted>\n"
    assert (state / "synchrotron1.log").read_text() == "b\n"


def _listener(state: Path, *args: str, name: str = "nginx", lines: bytes = b"") -> subprocess.CompletedProcess:
    payload = f"processname:{name} groupname:stack pid:1 channel:stdout\n".encode() + lines
    header = (f"ver:3.0 server:supervisor serial:1 pool:logs poolserial:1 eventname:PROCESS_LOG_STDOUT "
              f"len:{len(payload)}\n")
    env = {**os.environ, "SUPERVISOR_SERVER_URL": f"unix://{state}/supervisor.sock"}
    return subprocess.run([sys.executable, "-m", "synapse_workers.run.logprefix", *args],
                          input=header.encode() + payload, capture_output=True, env=env, timeout=30)


def test_the_listener_writes_masked_programs_files_itself(tmp_path: Path):
    """nginx's error log quotes request lines: its capture and its disk copy come from the listener, masked."""
    state, logs = tmp_path / "state", tmp_path / "logs"
    state.mkdir()
    logs.mkdir()
    line = b'[error] client intended to send too large body, request: "POST /x?access_token=s3cret HTTP/1.1"\n'
    result = _listener(state, "--masked", f"nginx={logs}/nginx-error.log", lines=line)
    masked = '[error] client intended to send too large body, request: "POST /x?access_token=<redacted> HTTP/1.1"\n'
    assert result.stderr.decode() == f"{'nginx':18}| {masked}"
    assert (state / "nginx.log").read_text() == masked
    assert (logs / "nginx-error.log").read_text() == masked
    # a program supervisord captures itself: the listener writes no file for it
    _listener(state, "--masked", f"nginx={logs}/nginx-error.log", name="redis", lines=b"ready\n")
    assert not (state / "redis.log").exists() and sorted(p.name for p in logs.iterdir()) == ["nginx-error.log"]


def test_a_copy_is_reopened_once_logrotate_has_renamed_it(tmp_path: Path):
    path = tmp_path / "nginx-error.log"
    copy = logprefix.Copy(str(path))
    copy.write([b"before"])
    path.rename(tmp_path / "nginx-error.log.1")  # what logrotate does (nocreate)
    copy.write([b"after"])
    assert (tmp_path / "nginx-error.log.1").read_bytes() == b"before\n"
    assert path.read_bytes() == b"after\n"
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")  # never followed (the logs dir belongs to Synapse's user)
    copy.write([b"lost"])
    assert not (tmp_path / "elsewhere").exists()


def test_supervisord_keeps_no_raw_copy_of_nginx_output(base_env):
    plan = load_plan({**base_env, "SYNAPSE_WORKER_TYPES": "synchrotron", "SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK": "1"})
    (text,) = render_supervisor(plan.layout, programs(plan, False, BINARIES), as_root=False).values()
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read_string(text)
    assert parser.get("program:nginx", "stdout_logfile") == "NONE"
    assert parser.get("program:redis", "stdout_logfile").endswith("/logs/redis.log")
    command = parser.get("eventlistener:logs", "command")
    assert command.endswith(f"-m synapse_workers.run.logprefix --masked nginx={plan.layout.nginx_error_log}")


def test_mask_output_masks_and_keeps_the_exit_status():
    """`synapse-workers mask-output -- CMD` (the exported nginx containers' command): CMD's stdout and stderr on
    stderr with tokens masked, its exit status; a missing CMD says so, exit 127 as in a shell."""
    script = 'echo "GET /x?access_token=s3cret HTTP/1.1"; echo "Authorization: Bearer s3cret" >&2; exit 3'
    result = subprocess.run([SW, "mask-output", "--", "sh", "-c", script], capture_output=True, timeout=30)
    assert result.returncode == 3 and result.stdout == b""
    assert result.stderr == b"GET /x?access_token=<redacted> HTTP/1.1\nAuthorization: Bearer <redacted>\n"
    missing = subprocess.run([SW, "mask-output", "--", "/nonexistent/nginx"], capture_output=True, timeout=30)
    assert missing.returncode == 127 and b"/nonexistent/nginx" in missing.stderr
    empty = subprocess.run([SW, "mask-output"], capture_output=True, timeout=30)
    assert empty.returncode == 2 and b"expected a command" in empty.stderr


def test_mask_output_forwards_signals():
    """What Kubernetes or Compose sends the container's first process reaches the command (nginx: QUIT to finish
    requests in flight, USR1 to reopen its logs)."""
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGQUIT, lambda *a: (print('quit access_token=zz', flush=True), sys.exit(7)))\n"
            "print('ready', flush=True)\n"
            "time.sleep(30)\n")
    proc = subprocess.Popen([SW, "mask-output", "--", sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None and proc.stderr.readline() == b"ready\n"
        proc.send_signal(signal.SIGQUIT)
        assert proc.wait(timeout=30) == 7
        assert proc.stderr.read() == b"quit access_token=<redacted>\n"
    finally:
        proc.kill()
        proc.wait()


def test_a_child_shows_its_own_command_line():
    code = (
        "import ctypes, os, sys, time\n"
        "from synapse_workers.run.zygote import set_title\n"
        "set_title(['python', '-m', 'synapse.app.generic_worker', '--config-path', '/x/w1.yaml'], 'worker_name_long1',"
        " ctypes.CDLL(None))\n"
        "print(open('/proc/self/cmdline','rb').read().rstrip(b'\\0').split(b'\\0'))\n"
        "print(open('/proc/self/comm').read().strip())\n"
    )
    padding = ["x" * 200]  # the parent's argv area holds every child's argv
    result = subprocess.run([sys.executable, "-c", code, *padding], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    args, comm = result.stdout.splitlines()
    assert args == str([b"python", b"-m", b"synapse.app.generic_worker", b"--config-path", b"/x/w1.yaml"])
    assert comm == "worker_name_lon"
