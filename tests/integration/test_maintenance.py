"""Scheduled maintenance in a real stack (embedded PostgreSQL, Synapse, nginx, logs on disk):

- the `scheduler` program runs the compressor when its cron expression is due (a minute set ~1 min ahead), logs
  its outcome as `scheduler | ...`, and the compressor's progress tables then record the rooms whose state was
  changed many times through the client API;
- after that run, a saved level head of one room names a state group that no longer exists (what Synapse's
  delayed deletion does after a history purge, 10 minutes later: here the row is pointed at a missing group) and
  the room changes again: the compressor alone then panics with "Missing <group>" (its known crash); another
  room the compressor has worked on is purged through the admin API (Synapse deletes its state groups, the
  compressor's progress still names them) and its state groups as Synapse before element-hq/synapse#18024 left
  them behind are put back (copied before the purge). `synapse-workers compress-state` removes all that, counts
  it, and finishes with 0; the other rooms' state read through the client API (now, and at past events) is
  unchanged;
- a second `compress-state` while one is running (held up by a table lock in PostgreSQL) is refused;
- the scheduler's loop on its own (started before the stack, its jobs due at the next minute): it runs a due job,
  relays its output, reports its exit status, reports a job whose program does not exist and goes on, and stops
  cleanly on SIGTERM;
- nginx's access log rotated by the rotate-logs job's command (logrotate with the generated rules, which reopen
  nginx's log by SIGUSR1) under continuous traffic: every request's line is in the old file or the new one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import httpx
import psycopg2
import pytest

from tests.support.matrix import register, registration_secret, unlimited
from tests.support.stack import SW, Stack, make_root, stack_env, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists("/usr/sbin/logrotate"), reason="logrotate is not installed"),
]

TOPIC_CHANGES = {"busy": 150, "quiet": 40, "doomed": 60}


def _scheduled_minute() -> str:
    """A cron expression due once, 60-120 s from now: after the stack has started and the rooms are filled."""
    when = datetime.now() + timedelta(seconds=120)
    return f"{when.minute} * * * *"


class Env:
    def __init__(self, stack: Stack, root: Path):
        self.stack, self.root = stack, root
        self.data = Path(stack.env["SYNAPSE_DATA_DIR"])
        self.run = Path(stack.env["SYNAPSE_RUNTIME_DIR"])
        self.rooms: dict[str, str] = {}
        self.topic_events: dict[str, list[str]] = {}
        self.token = ""

    def http(self, method: str, path: str, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.request(method, f"{self.stack.base_url}{path}", headers=headers, timeout=60, **kwargs)

    def db(self):
        return psycopg2.connect(
            host=str(self.run / "postgresql"),
            user="synapse",
            dbname="synapse",
            passfile=str(self.data / "embedded_postgres.pgpass"),
        )

    def query(self, sql: str, *args) -> list[tuple]:
        conn = self.db()
        try:
            with conn, conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def fill(self, room: str) -> None:
        """A room whose name and topic change TOPIC_CHANGES[room] times (each change a new state group)."""
        with httpx.Client(
            base_url=self.stack.base_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60
        ) as c:
            created = c.post("/_matrix/client/v3/createRoom", json={"name": room, "preset": "private_chat"})
            assert created.status_code == 200, created.text
            room_id = self.rooms[room] = created.json()["room_id"]
            events = self.topic_events[room] = []
            for i in range(TOPIC_CHANGES[room]):
                kind, body = (
                    ("m.room.topic", {"topic": f"{room} {i}"}) if i % 3 else ("m.room.name", {"name": f"{room} {i}"})
                )
                sent = c.put(f"/_matrix/client/v3/rooms/{quote(room_id)}/state/{kind}/", json=body)
                assert sent.status_code == 200, sent.text
                events.append(sent.json()["event_id"])

    def change(self, room: str, count: int) -> None:
        for i in range(count):
            path = f"/_matrix/client/v3/rooms/{quote(self.rooms[room])}/state/m.room.topic/"
            sent = self.http("PUT", path, json={"topic": f"{room} later {i}"})
            assert sent.status_code == 200, sent.text

    def room_state(self, room: str) -> list[tuple]:
        response = self.http("GET", f"/_matrix/client/v3/rooms/{quote(self.rooms[room])}/state")
        assert response.status_code == 200, response.text
        return _state(response.json())

    def state_at(self, room: str, event_id: str) -> list[tuple]:
        path = f"/_matrix/client/v3/rooms/{quote(self.rooms[room])}/context/{quote(event_id)}"
        response = self.http("GET", path, params={"limit": "0"})
        assert response.status_code == 200, response.text
        return _state(response.json()["state"])


def _state(events: list[dict]) -> list[tuple]:
    """(type, state_key, event_id, content) of each state event: what the state is, without ages."""
    return sorted((e["type"], e["state_key"], e["event_id"], json.dumps(e["content"], sort_keys=True)) for e in events)


@pytest.fixture(scope="module", autouse=True)
def loop():
    """The scheduler's loop on its own, started first (its jobs are due at the next minute, while the stack's
    tests run): a job that prints and fails, and one whose program does not exist."""
    root = Path(tempfile.mkdtemp(prefix="sw-loop-"))
    doc = {
        "heartbeat": str(root / "alive"),
        "jobs": [
            {"name": "hello", "schedule": "* * * * *", "command": ["sh", "-c", "echo hi from the job; exit 3"]},
            {"name": "ghost", "schedule": "* * * * *", "command": [str(root / "no-such-program")]},
        ],
    }
    (root / "jobs.json").write_text(json.dumps(doc))
    with open(root / "out", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "synapse_workers.run.scheduler", str(root / "jobs.json")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc, root
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def env():
    root = make_root("sw-maint-")
    stack = Stack(
        stack_env(
            root,
            "",
            SYNAPSE_ENABLE_COMPRESSOR="1",
            SYNAPSE_COMPRESSOR_SCHEDULE=_scheduled_minute(),
            SYNAPSE_COMPRESSOR_CHUNK_SIZE="100",
            SYNAPSE_COMPRESSOR_CHUNKS="50",
            SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK="1",
        )
    )
    try:
        stack.start(300)
        e = Env(stack, root)
        admin = register(stack.base_url, registration_secret(e.data), "admin", admin=True)
        e.token = admin["access_token"]
        unlimited(stack.base_url, e.token, admin["user_id"])
        for room in TOPIC_CHANGES:
            e.fill(room)
        yield e
    finally:
        stack.close(root)


def log_lines(env: Env, prefix: str) -> list[str]:
    return [line for line in env.stack.log_path.read_text(errors="replace").splitlines() if line.startswith(prefix)]


LEAKED = "syt_dGVzdA_notARealTokenButLooksLikeOne_1a2b3c"


def _error_in_nginx_error_log(env: Env, mark: str) -> None:
    """A request announcing a body over client_max_body_size: nginx answers 413 at once and logs `client intended
    to send too large body` at `error` (its error log keeps `warn` and above), quoting the request line with its
    access token."""
    with socket.create_connection(("127.0.0.1", int(env.stack.env["SYNAPSE_HTTP_PORT"])), timeout=30) as sock:
        sock.sendall(f"POST /_matrix/client/v3/login?mark={mark}&access_token={LEAKED} HTTP/1.1\r\nHost: localhost\r\n"
                     f"Content-Length: {1 << 40}\r\nConnection: close\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")


def test_rotation_under_traffic_loses_no_line(env: Env):
    access_log = env.data / "logs" / "nginx-access.log"
    error_log = env.data / "logs" / "nginx-error.log"
    _error_in_nginx_error_log(env, "before")
    conf = env.run / "scheduler" / "logrotate.conf"
    stop = threading.Event()
    sent: list[int] = []

    def traffic() -> None:
        with httpx.Client(base_url=env.stack.base_url, timeout=30) as client:
            n = 0
            while not stop.is_set():
                assert client.get("/_matrix/client/versions", params={"n": str(n)}).status_code == 200
                sent.append(n)
                n += 1

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: len(sent) > 200, 60, 0.1)
        jobs = json.loads((env.run / "scheduler" / "jobs.json").read_text())["jobs"]
        command = next(j["command"] for j in jobs if j["name"] == "rotate-logs")  # what the scheduler runs daily
        assert command[-1] == str(conf)
        rotated = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert rotated.returncode == 0, rotated.stderr
        mark = len(sent)
        assert wait_for(lambda: len(sent) > mark + 200 and access_log.exists(), 60, 0.1)
        _error_in_nginx_error_log(env, "after")
    finally:
        stop.set()
        thread.join(timeout=30)
    time.sleep(1.5)  # nginx writes a line when the response is done; let the last ones land
    old = (access_log.parent / "nginx-access.log.1").read_text()
    new = access_log.read_text()
    assert not (access_log.parent / "nginx-access.log.1.gz").exists()  # delaycompress
    seen_old = {int(n) for n in re.findall(r"/_matrix/client/versions\?n=(\d+) ", old)}
    seen_new = {int(n) for n in re.findall(r"/_matrix/client/versions\?n=(\d+) ", new)}
    assert seen_old and seen_new, "both files hold requests"
    missing = set(sent) - seen_old - seen_new
    assert not missing, f"{len(missing)} requests have no line: {sorted(missing)[:20]}"
    assert max(seen_old) < max(seen_new)
    # The error log (nginx's stderr, written by the output listener) is rotated with it and reopened: each error
    # in its own file, the token masked there, in the listener's capture and in the stack's output.
    refused = "client intended to send too large body"
    old_errors, new_errors = (error_log.parent / "nginx-error.log.1").read_text(), error_log.read_text()
    for text in (old_errors, new_errors, (env.run / "state" / "nginx.log").read_text(), env.stack.log_path.read_text()):
        assert LEAKED not in text and "access_token=<redacted>" in text
    assert not list((env.run / "state").glob("nginx-*.log"))  # supervisord's own (raw) capture: none
    assert refused in old_errors and "mark=before" in old_errors and "mark=after" not in old_errors, old_errors
    assert refused in new_errors and "mark=after" in new_errors and "mark=before" not in new_errors, new_errors


def test_scheduler_runs_the_due_compressor(env: Env):
    """Due at the minute set at start (the rotation test above runs meanwhile): the scheduler starts it and logs
    how it ended."""
    status = json.loads(env.stack.cli("status", "--json").stdout)
    assert {r["name"]: r["state"] for r in status}.get("scheduler") == "RUNNING", status
    pid = next(r["pid"] for r in status if r["name"] == "scheduler")
    password = (env.data / "embedded_postgres.pgpass").read_text().strip().rsplit(":", 1)[1].encode()
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert password not in environ and password not in _cmdline(Path(f"/proc/{pid}"))
    assert b"POSTGRES_PASSWORD" not in environ
    assert wait_for(
        lambda: any("compress-state: finished OK" in line for line in log_lines(env, "scheduler")), 150, 1
    ), "\n".join(log_lines(env, "scheduler")) or env.stack.tail()
    lines = log_lines(env, "scheduler")
    assert any(re.search(r"scheduler\s+\| compress-state: started \(due ", line) for line in lines), lines
    assert any("synapse_auto_compressor finished" in line for line in lines), lines
    # The progress tables (created by the compressor) record the rooms it worked through.
    compressed = {row[0] for row in env.query("SELECT room_id FROM state_compressor_progress")}
    assert env.rooms["busy"] in compressed, (compressed, env.rooms)
    (lowest,) = env.query("SELECT lowest_uncompressed_group FROM state_compressor_total_progress")
    assert lowest[0] > 0
    assert env.query("SELECT count(*) FROM state_compressor_state")[0][0] > 0


def test_compress_state_cleans_up_after_a_purged_room(env: Env):
    # "quiet" was compressed; Synapse then deletes a state group the compressor saved as a level head (purged
    # history does, 10 minutes later: here the saved head is pointed at a group that no longer exists), and the
    # room changes again, so the next run resumes it from that head.
    quiet = env.rooms["quiet"]
    (gone,) = env.query("SELECT max(id) + 1000 FROM state_groups")[0]
    conn = env.db()
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE state_compressor_state SET current_head = %s WHERE room_id = %s AND current_head IS NOT NULL",
                (gone, quiet),
            )
            assert cur.rowcount >= 1
    finally:
        conn.close()
    env.change("quiet", 10)
    busy_before = env.room_state("busy")
    quiet_before = env.room_state("quiet")
    past = {
        (room, i): env.state_at(room, env.topic_events[room][i])
        for room in ("busy", "quiet")
        for i in range(1, TOPIC_CHANGES[room], 6)
    }
    doomed = env.rooms["doomed"]
    saved = env.query("SELECT count(*) FROM state_compressor_progress WHERE room_id = %s", doomed)[0][0]
    assert saved == 1  # the scheduled run compressed it
    groups = env.query("SELECT id, room_id, event_id FROM state_groups WHERE room_id = %s ORDER BY id", doomed)
    assert len(groups) >= TOPIC_CHANGES["doomed"]
    kept = groups[len(groups) // 2 :]  # the newer half: their predecessors will be missing
    ids = [g[0] for g in kept]
    rows = env.query(
        "SELECT state_group, room_id, type, state_key, event_id FROM state_groups_state WHERE state_group = ANY(%s)",
        ids,
    )
    edges = env.query("SELECT state_group, prev_state_group FROM state_group_edges WHERE state_group = ANY(%s)", ids)

    purged = env.http("DELETE", f"/_synapse/admin/v1/rooms/{quote(doomed)}", json={"purge": True})
    assert purged.status_code == 200, purged.text
    assert env.query("SELECT count(*) FROM state_groups WHERE room_id = %s", doomed)[0][0] == 0  # Synapse's own purge
    conn = env.db()
    try:
        with conn, conn.cursor() as cur:  # what an older Synapse left behind
            cur.executemany("INSERT INTO state_groups (id, room_id, event_id) VALUES (%s, %s, %s)", kept)
            cur.executemany("INSERT INTO state_groups_state VALUES (%s, %s, %s, %s, %s)", rows)
            cur.executemany("INSERT INTO state_group_edges VALUES (%s, %s)", edges)
    finally:
        conn.close()
    assert env.query("SELECT count(*) FROM rooms WHERE room_id = %s", doomed)[0][0] == 0

    # The known crash, first: the compressor alone panics resuming "quiet" from the missing head.
    password = (env.data / "embedded_postgres.pgpass").read_text().strip().rsplit(":", 1)[1]
    url = f"postgresql://synapse:{password}@{quote(str(env.run / 'postgresql'), safe='')}:5432/synapse"
    code = (
        "import logging, sys, synapse_auto_compressor as m\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "m.compress_state_events_table(sys.stdin.read(), 100, '100,50,25', 50)\n"
    )
    # The password goes to this child's stdin only (the test's own process).
    crash = subprocess.run([sys.executable, "-c", code], input=url, capture_output=True, text=True, timeout=120)
    assert crash.returncode != 0 and f"Missing {gone}" in crash.stdout + crash.stderr, crash

    result = env.stack.cli("compress-state", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(
        r"purged rooms: (\d+) left state groups behind; removed (\d+) from state_groups_state, "
        r"(\d+) from state_group_edges, (\d+) from state_groups",
        result.stdout,
    )
    assert match, result.stdout
    assert [int(n) for n in match.groups()] == [1, len(rows), len(edges), len(kept)]
    assert "deleted state groups: 2 rooms' saved compressor progress named one" in result.stdout  # doomed, quiet
    assert "synapse_auto_compressor finished" in result.stdout
    assert password not in result.stdout + result.stderr
    assert env.query("SELECT count(*) FROM state_groups WHERE room_id = %s", doomed)[0][0] == 0
    assert env.query("SELECT count(*) FROM state_group_edges WHERE state_group = ANY(%s)", ids)[0][0] == 0
    compressed = {row[0] for row in env.query("SELECT room_id FROM state_compressor_progress")}
    assert {env.rooms["busy"], env.rooms["quiet"]} <= compressed and doomed not in compressed
    assert env.query("SELECT count(*) FROM state_compressor_state WHERE room_id = %s", doomed)[0][0] == 0

    assert env.room_state("busy") == busy_before and env.room_state("quiet") == quiet_before
    for (room, i), state in past.items():
        assert env.state_at(room, env.topic_events[room][i]) == state
        topics = [json.loads(content)["topic"] for kind, _, _, content in state if kind == "m.room.topic"]
        assert topics == [f"{room} {i}"]  # the state at a topic change holds that topic


def test_second_run_is_refused_while_one_runs(env: Env):
    blocker = env.db()
    seen: list[str] = []
    first: subprocess.Popen | None = None
    try:
        with blocker.cursor() as cur:  # holds the first run up at its first query (it holds its lock by then)
            cur.execute("LOCK TABLE state_groups IN ACCESS EXCLUSIVE MODE")
        first = subprocess.Popen(
            [SW, "compress-state"], env=env.stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=lambda: seen.extend(first.stdout), daemon=True).start()
        assert wait_for(lambda: any("lock taken" in line for line in seen), 60, 0.1), seen
        second = env.stack.cli("compress-state", timeout=60)
        assert second.returncode == 75, second.stdout + second.stderr
        assert "another compressor run is in progress" in second.stdout
        assert first.poll() is None  # still held up by the table lock
        # The running compressor (connected: it holds its lock) has the password in neither argv nor environment.
        password = (env.data / "embedded_postgres.pgpass").read_text().strip().rsplit(":", 1)[1].encode()
        lock = str(env.run / "state" / "compressor.lock").encode()
        runs = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p).count(lock)]
        assert runs, "the compressor process"
        for proc in runs:
            assert b"synapse_workers.run.compressor" in _cmdline(proc)
            assert password not in _cmdline(proc) and password not in (proc / "environ").read_bytes()
    finally:
        blocker.rollback()
        blocker.close()
        code = first.wait(timeout=300) if first is not None else None
    assert wait_for(lambda: any("synapse_auto_compressor finished" in line for line in seen), 10, 0.1), seen
    assert code == 0, "".join(seen)


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_the_loop_alone_runs_due_jobs_and_reports_them(loop):
    proc, root = loop
    lines = lambda: (root / "out").read_text().splitlines()  # noqa: E731
    assert wait_for(lambda: any(line.startswith("hello: FAILED") for line in lines()), 75, 0.5), lines()
    assert proc.poll() is None and scheduler_alive(root / "alive")
    proc.terminate()
    assert proc.wait(timeout=15) == 0  # SIGTERM: a clean stop
    out = lines()
    assert out[0].startswith("hello: scheduled '* * * * *', next run ")
    assert any(re.fullmatch(r"hello: started \(due \d{4}-\d\d-\d\d \d\d:\d\d\)", line) for line in out), out
    assert "hello: hi from the job" in out
    assert any(re.fullmatch(r"hello: FAILED with exit 3 after \d+\.\ds", line) for line in out), out
    assert any(line.startswith("ghost: FAILED to start: ") for line in out), out


def scheduler_alive(heartbeat: Path) -> bool:
    return time.time() - heartbeat.stat().st_mtime < 30
