"""Faults, without processes: which routes main may stand in for, the rendered fallbacks, the nginx start step.

The real behaviour (real nginx, stub upstreams, a SIGKILLed master, supervisord) is in
tests/integration/test_nginx_faults.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

import pytest

from synapse_workers import catalog
from synapse_workers.load import load_plan
from synapse_workers.plan import MAIN, UNAVAILABLE
from synapse_workers.programs import programs
from synapse_workers.render.nginx import render_nginx
from synapse_workers.run import nginx_start

BINARIES = {"nginx": "/usr/sbin/nginx", "setpriv": "/usr/bin/setpriv", "redis-server": "/usr/bin/redis-server"}
WORKERS = "synchrotron, typing, media_repository, event_creator, client_reader"
START_STEP = (sys.executable, "-m", "synapse_workers.run.nginx_start")


def plan_for(base_env, spec: str):
    return load_plan({**base_env, "SYNAPSE_WORKER_TYPES": spec})


def when_down(plan) -> dict[str, str | None]:
    return {route.rule.id: route.when_down for route in plan.routes}


# ------------------------------------------------------------------------------------------------------
# Who stands in for a down pool
# ------------------------------------------------------------------------------------------------------


def test_a_role_that_switches_a_feature_off_on_main_cannot_have_main_stand_in():
    for role in catalog.ROLES.values():
        switched_off = [key for key, value in role.shared_config if value is False]
        if switched_off:
            assert not role.main_can_stand_in, (role.name, switched_off)
    assert catalog.ROLES["media_repository"].main_can_stand_in is False
    assert catalog.ROLES["synchrotron"].main_can_stand_in is True


def test_when_down_per_route(base_env):
    decided = when_down(plan_for(base_env, WORKERS))
    # Main serves these too: it stands in.
    for rid in ("sync", "events", "initial_sync", "sliding_sync", "event_send", "create_room", "profile",
                "key_upload", "client_reads", "versions"):
        assert decided[rid] == MAIN, rid
    # HARD routes and the media repository (off on main): a fast 503.
    for rid in ("typing", "media", "media_admin", "media_quarantine", "push_rules", "delayed_events"):
        assert decided[rid] == UNAVAILABLE, rid
    # Routes that go to main anyway: nothing to fall back to.
    for rid in ("to_device", "receipts", "federation_send", "user_directory"):
        assert decided[rid] is None, rid


def test_a_monolith_has_no_fallback(base_env):
    plan = plan_for(base_env, "")
    assert set(when_down(plan).values()) == {None}
    conf = next(iter(render_nginx(plan, plan.settings.nginx).values()))
    assert "error_page 502" not in conf and "$sw_resend_unsafe" not in conf
    assert "@sw_main" not in conf and "@sw_unavailable" not in conf and "@sw_down_" not in conf
    assert "proxy_connect_timeout 5s;" in conf


def test_the_decision_is_data(base_env, monkeypatch):
    """No role name in the planner: a role that main cannot stand in for turns its routes to 503."""
    role = catalog.ROLES["synchrotron"]
    monkeypatch.setitem(catalog.ROLES, "synchrotron", dataclasses.replace(role, main_can_stand_in=False))
    assert when_down(plan_for(base_env, "synchrotron"))["sync"] == UNAVAILABLE


def test_a_split_route_takes_the_strictest_of_its_roles(base_env, monkeypatch):
    """account_data: writes to the account_data writer, reads to a client reader; both must allow main."""
    assert when_down(plan_for(base_env, "account_data, client_reader"))["account_data"] == MAIN
    role = catalog.ROLES["account_data"]
    monkeypatch.setitem(catalog.ROLES, "account_data", dataclasses.replace(role, main_can_stand_in=False))
    assert when_down(plan_for(base_env, "account_data, client_reader"))["account_data"] == UNAVAILABLE


# ------------------------------------------------------------------------------------------------------
# The rendered nginx.conf
# ------------------------------------------------------------------------------------------------------


def _locations(conf: str) -> dict[str, str]:
    """route id -> the body of its `location ~` block."""
    found = re.findall(r"# (\w+): [^\n]*\n\s*location ~ \"[^\n]*\" \{\n(.*?)\n\s*\}", conf, re.S)
    return dict(found)


def test_each_worker_route_says_what_happens_when_its_pool_is_down(base_env):
    plan = plan_for(base_env, WORKERS)
    conf = next(iter(render_nginx(plan, plan.settings.nginx).values()))
    bodies = _locations(conf)
    assert set(bodies) == {route.rule.id for route in plan.routes}
    for route in plan.routes:
        body = bodies[route.rule.id]
        assert body.strip().startswith("set $sw_pool "), route.rule.id  # then proxy_pass (NGINX_POOL_LIMITS)
        assert "proxy_pass http://" in body, route.rule.id
        fallbacks = [page for page in re.findall(r"error_page (.*);", body) if page != "429 = @sw_limited"]
        expected = {MAIN: ["502 504 = @sw_main"], UNAVAILABLE: ["502 504 =503 @sw_unavailable"], None: []}
        assert fallbacks == expected[route.when_down], route.rule.id
    main = re.search(r"location @sw_main \{(.*?)\n        \}", conf, re.S).group(1)
    assert "proxy_pass http://main;" in main and "return 502;" in main
    unavailable = re.search(r"location @sw_unavailable \{(.*?)\n        \}", conf, re.S).group(1)
    assert "add_header Retry-After 5 always;" in unavailable and "return 503 " in unavailable
    assert "proxy_connect_timeout 5s;" in conf
    assert "proxy_next_upstream error timeout;" in conf  # no non_idempotent: a sent POST is never resent


def test_unbuffered_bodies_are_never_resent_to_main(base_env):
    buffered_plan = plan_for(base_env, "synchrotron")
    buffered = next(iter(render_nginx(buffered_plan, buffered_plan.settings.nginx).values()))
    assert "$sw_body_streamed" not in buffered
    plan = load_plan({**base_env, "SYNAPSE_WORKER_TYPES": "synchrotron", "NGINX_PROXY_REQUEST_BUFFERING": "off"})
    conf = next(iter(render_nginx(plan, plan.settings.nginx).values()))
    main = re.search(r"location @sw_main \{(.*?)\n        \}", conf, re.S).group(1)
    check = main.index("if ($sw_body_streamed) {")
    assert main.index("add_header Retry-After 5 always;", check) < main.index("return 503 '{", check)
    assert check < main.index("proxy_pass http://main;")


# ------------------------------------------------------------------------------------------------------
# The nginx program and its start step
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_root", [True, False])
def test_the_nginx_program_starts_with_the_start_step(base_env, as_root):
    plan = plan_for(base_env, "synchrotron")
    (nginx,) = [p for p in programs(plan, as_root=as_root, binaries=BINARIES) if p.name == "nginx"]
    assert nginx.command == (*START_STEP, "/usr/sbin/nginx", "-c", plan.layout.nginx_conf, "-g", "daemon off;")
    assert nginx.user is None  # binds the public port as root; nginx drops its workers to nobody itself
    conf = next(iter(render_nginx(plan, plan.settings.nginx).values()))
    assert nginx_start.pid_file_of(conf) == f"{plan.layout.nginx_dir}/nginx.pid"


def test_arguments_and_pid_file():
    assert nginx_start.conf_argument(["-c", "/x/nginx.conf", "-g", "daemon off;"]) == "/x/nginx.conf"
    assert nginx_start.conf_argument(["-c/x/nginx.conf"]) == "/x/nginx.conf"
    assert nginx_start.conf_argument(["-g", "daemon off;"]) is None
    assert nginx_start.pid_file_of("worker_processes 1;\npid /run/x/nginx.pid;\n") == "/run/x/nginx.pid"
    assert nginx_start.pid_file_of('  pid "/run/x/nginx.pid" ;') == "/run/x/nginx.pid"
    assert nginx_start.pid_file_of("# pid /run/x/nginx.pid;\nworker_processes 1;") is None


@pytest.mark.parametrize("text, pid", [("1234\n", 1234), ("", None), ("abc", None), ("1", None), ("-5", None)])
def test_read_pid(tmp_path, text, pid):
    path = tmp_path / "nginx.pid"
    path.write_text(text)
    assert nginx_start.read_pid(str(path)) == pid
    assert nginx_start.read_pid(str(tmp_path / "missing.pid")) is None


def test_no_pid_file_no_search(tmp_path):
    conf = tmp_path / "nginx.conf"
    conf.write_text("events {}\n")  # no pid directive: nginx's compiled-in default is not ours
    assert nginx_start.clear_leftovers("/usr/sbin/nginx", nginx_start.read_conf(["-c", str(conf)])) == []
    conf.write_text(f"pid {tmp_path}/nginx.pid;\n")  # names a pid file that does not exist
    assert nginx_start.clear_leftovers("/usr/sbin/nginx", nginx_start.read_conf(["-c", str(conf)])) == []


class FakeProc:
    """A /proc tree: stat (state, ppid, pgrp), comm, cmdline, exe."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, pid: int, pgid: int, title: str, comm: str = "nginx", exe: str | None = "/usr/sbin/nginx",
            state: str = "S") -> None:
        base = self.root / str(pid)
        base.mkdir()
        (base / "stat").write_text(f"{pid} ({comm}) {state} 1 {pgid} {pgid} 0 -1 4194560 0 0 0 0\n")
        (base / "comm").write_text(f"{comm}\n")
        (base / "cmdline").write_bytes(title.encode() + b"\0")
        if exe is not None:
            os.symlink(exe, base / "exe")


MASTER = "nginx: master process /usr/sbin/nginx -c /run/sw/nginx/nginx.conf -g daemon off;"
WORKER = "nginx: worker process"


def _leftovers(proc: FakeProc, old: int = 100, me: int = 999) -> list[int]:
    return nginx_start.leftovers("/usr/sbin/nginx", "/run/sw/nginx/nginx.conf", old, proc.root, me=me)


def test_leftovers_of_a_killed_master(tmp_path):
    proc = FakeProc(tmp_path)
    proc.add(101, 100, WORKER)
    proc.add(102, 100, WORKER)
    proc.add(103, 100, "nginx: cache manager process")
    proc.add(104, 100, "sleep 60", comm="sleep", exe="/usr/bin/sleep")  # not nginx: never
    proc.add(105, 100, WORKER, exe="/opt/other/nginx")  # another nginx binary: not ours
    proc.add(106, 100, WORKER, state="Z")  # already dead
    proc.add(201, 200, WORKER)  # another group
    proc.add(999, 100, WORKER)  # this process (cannot happen, never killed anyway)
    assert _leftovers(proc) == [101, 102, 103]


def test_leftovers_with_the_master_alive(tmp_path):
    proc = FakeProc(tmp_path)
    proc.add(100, 100, MASTER)
    proc.add(101, 100, WORKER)
    assert _leftovers(proc) == [100, 101]


@pytest.mark.parametrize("leader", [
    ("python -m something", "python", "/usr/bin/python3"),  # the pid was reused by someone else
    ("nginx: master process /usr/sbin/nginx -c /etc/nginx/nginx.conf", "nginx", "/usr/sbin/nginx"),  # not ours
    ("nginx: worker process", "nginx", "/usr/sbin/nginx"),  # a worker cannot lead our group
])
def test_a_stale_pid_file_kills_nothing(tmp_path, leader):
    title, comm, exe = leader
    proc = FakeProc(tmp_path)
    proc.add(100, 100, title, comm=comm, exe=exe)
    proc.add(101, 100, WORKER)
    assert _leftovers(proc) == []


def test_an_unreadable_exe_still_needs_the_nginx_name_and_title(tmp_path):
    proc = FakeProc(tmp_path)
    proc.add(101, 100, WORKER, exe=None)
    proc.add(102, 100, "nginx: worker process", comm="bash", exe=None)
    proc.add(103, 100, "bash", exe=None)
    assert _leftovers(proc) == [101]


def test_routes_explains_what_happens_while_the_worker_is_down(tmp_root):
    from synapse_workers.load import load_plan
    from synapse_workers.routing import explain
    from tests.conftest import isolated_env

    env = {**isolated_env(tmp_root), "POSTGRES_PASSWORD": "x", "SYNAPSE_HTTP_PORT": "8008",
           "SYNAPSE_WORKER_TYPES": "synchrotron, typing, media_repository"}
    plan = load_plan(env)
    assert "main answers instead" in explain(plan, "GET", "/_matrix/client/v3/sync")["when_down"]
    assert "503" in explain(plan, "PUT", "/_matrix/client/v3/rooms/!r:x/typing/@u:x")["when_down"]
    assert "503" in explain(plan, "GET", "/_matrix/media/v3/download/x/y")["when_down"]
    assert explain(plan, "GET", "/_matrix/client/v3/profile/@u:x")["when_down"] is None  # main serves it
