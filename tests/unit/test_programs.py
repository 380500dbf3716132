"""Plan → supervised programs and supervisord.conf (pure; nothing is started here)."""

from __future__ import annotations

import configparser

from synapse_workers.load import load_plan
from synapse_workers.programs import STAGE_NAMES, SeparateProcesses, child_environment, programs
from synapse_workers.render.redis import render_redis
from synapse_workers.render.supervisor import GROUP_NAME, render_supervisor

BINARIES = {
    "nginx": "/usr/sbin/nginx",
    "setpriv": "/usr/bin/setpriv",
    "redis-server": "/usr/bin/redis-server",
    "postgres": "/usr/lib/postgresql/15/bin/postgres",
    "pg_isready": "/usr/lib/postgresql/15/bin/pg_isready",
}
PG_USER = ("postgres", 101, 104)


def plan_for(base_env, spec, **extra):
    # One supervisord program per Synapse process (fork mode's single program: tests/unit/test_zygote.py).
    env = {**base_env, "SYNAPSE_WORKER_TYPES": spec, "SYNAPSE_LAUNCH_MODE": "process", **extra}
    return load_plan(env)


def test_stages_and_order(base_env):
    env = {k: v for k, v in base_env.items() if k != "POSTGRES_PASSWORD"}  # embedded database
    plan = plan_for(env, "synchrotron:2, event_persister")
    progs = programs(plan, as_root=True, binaries=BINARIES, postgres_user=PG_USER)
    by_stage = {STAGE_NAMES[p.stage]: [] for p in progs}
    for p in progs:
        by_stage[STAGE_NAMES[p.stage]].append(p.name)
    assert by_stage == {
        "postgres": ["postgres"],
        "redis": ["redis"],
        "main": ["main"],
        "workers": ["synchrotron1", "synchrotron2", "event_persister1"],
        "nginx": ["nginx"],
    }
    assert not [p.name for p in progs if p.addon]  # only coturn, Prometheus and exporters are add-ons
    critical = {p.name for p in progs if p.critical}
    assert critical == {"postgres", "redis", "main", "nginx"}


def test_monolith_with_external_database_has_no_redis_or_postgres(base_env):
    progs = programs(plan_for(base_env, ""), as_root=False, binaries=BINARIES)
    assert [p.name for p in progs] == ["main", "nginx"]


def test_privileges_dropped_only_as_root(base_env):
    plan = plan_for(base_env, "synchrotron", UID="1234", GID="5678")
    as_root = {p.name: p for p in programs(plan, as_root=True, binaries=BINARIES)}
    assert as_root["main"].command[:5] == ("/usr/bin/setpriv", "--reuid=1234", "--regid=5678", "--clear-groups", "--")
    assert as_root["redis"].command[1] == "--reuid=1234"
    # binds the public port and drops to nobody itself: not wrapped in setpriv (the start step execs nginx)
    assert as_root["nginx"].command[3] == "/usr/sbin/nginx" and "/usr/bin/setpriv" not in as_root["nginx"].command
    as_user = {p.name: p for p in programs(plan, as_root=False, binaries=BINARIES)}
    assert as_user["main"].command[0] != "/usr/bin/setpriv"


def test_synapse_command_comes_from_the_launcher(base_env):
    plan = plan_for(base_env, "synchrotron")
    worker = plan.process("synchrotron1")
    command = SeparateProcesses("/venv/bin/python").command(plan, worker)
    assert command[:3] == ("/venv/bin/python", "-m", "synapse.app.generic_worker")
    assert command[3::2] == ("--config-path",) * 3
    assert command[4::2] == worker.config_files

    class Fake:
        def command(self, plan, proc):
            return ("fork-launcher", proc.name)

        def arrange(self, plan, synapse):  # each Synapse process its own program, as SeparateProcesses
            return synapse

    progs = {p.name: p for p in programs(plan, as_root=False, binaries=BINARIES, launcher=Fake())}
    assert progs["synchrotron1"].command == ("fork-launcher", "synchrotron1")


def test_supervisord_conf_parses_and_groups_every_program(base_env):
    env = {k: v for k, v in base_env.items() if k != "POSTGRES_PASSWORD"}
    plan = plan_for(env, "synchrotron, event_persister", SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK="1")
    progs = programs(plan, as_root=True, binaries=BINARIES, postgres_user=PG_USER)
    (text,) = render_supervisor(plan.layout, progs, as_root=True).values()
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read_string(text)
    names = [p.name for p in progs]
    assert parser.get(f"group:{GROUP_NAME}", "programs").split(",") == names
    for program in progs:
        section = f"program:{program.name}"
        assert parser.get(section, "autostart") == "false"  # the launcher starts stages itself
        assert parser.get(section, "stdout_events_enabled") == "true"  # feeds the prefixing listener
    assert parser.get("program:nginx", "stopsignal") == "QUIT"
    assert parser.get("program:postgres", "stopsignal") == "INT"
    assert parser.get("program:redis", "stdout_logfile").endswith("/data/logs/redis.log")
    # nginx writes data/logs/nginx-{access,error}.log itself: its captured output is not copied there too
    assert "/data/logs/" not in parser.get("program:nginx", "stdout_logfile")
    assert "daemon off;" in parser.get("program:nginx", "command")
    assert parser.get("supervisord", "user") == "root"
    (as_user,) = render_supervisor(plan.layout, progs, as_root=False).values()
    assert "user=root" not in as_user


def test_redis_conf_is_socket_only_without_persistence(base_env):
    plan = plan_for(base_env, "synchrotron")
    text = render_redis(plan)[plan.layout.redis_conf]
    assert "port 0" in text.splitlines()
    assert f"unixsocket {plan.redis.path}" in text
    assert 'save ""' in text and "appendonly no" in text


def test_jemalloc_is_preloaded_into_synapse_processes_only(base_env):
    """SYNAPSE_MALLOC=jemalloc: `run` finds the library (binaries["jemalloc"]); each Synapse program (or, forked,
    the zygote whose children inherit it) preloads it with one arena and no thread cache; nothing else does."""
    library = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    for mode, synapse_programs in (("process", {"main", "synchrotron1"}), ("fork", {"synapse"})):
        plan = load_plan({**base_env, "SYNAPSE_WORKER_TYPES": "synchrotron", "SYNAPSE_LAUNCH_MODE": mode})
        rows = programs(plan, False, {**BINARIES, "jemalloc": library})
        preloaded = {p.name for p in rows if "LD_PRELOAD" in p.env}
        assert preloaded == synapse_programs, (mode, preloaded)
        for row in rows:
            if row.name in preloaded:
                assert row.env["LD_PRELOAD"] == library
                assert row.env["MALLOC_CONF"] == "narenas:1,tcache:false"
        # SYNAPSE_MALLOC=system: `run` puts no library in binaries, and nothing is preloaded.
        assert not any("LD_PRELOAD" in p.env for p in programs(plan, False, BINARIES))


def test_malloc_default_is_jemalloc_in_fork_mode_only(base_env):
    """Measured: jemalloc saves memory with forked processes and costs some with separate ones."""
    cases = [("fork", "auto", True), ("process", "auto", False), ("process", "jemalloc", True),
             ("fork", "system", False)]
    for mode, malloc, expected in cases:
        plan = load_plan({**base_env, "SYNAPSE_LAUNCH_MODE": mode, "SYNAPSE_MALLOC": malloc})
        assert plan.settings.core.jemalloc is expected, (mode, malloc)


def test_asyncio_reactor_reaches_the_synapse_processes_only_as_1(base_env):
    """SYNAPSE_ASYNC_IO_REACTOR in any of our boolean spellings: Synapse parses it with strtobool at import (which
    rejects an empty value), so the Synapse programs (forked: the zygote) get "1"; no other program gets it, and
    it is absent when off."""
    for mode, synapse_programs in (("process", {"main", "synchrotron1"}), ("fork", {"synapse"})):
        for value, expected in (("yes", "1"), ("T", "1"), ("", None), ("off", None)):
            env = {**base_env, "SYNAPSE_WORKER_TYPES": "synchrotron", "SYNAPSE_LAUNCH_MODE": mode,
                   "SYNAPSE_ASYNC_IO_REACTOR": value}
            rows = programs(load_plan(env), False, BINARIES)
            given = {p.name: p.env.get("SYNAPSE_ASYNC_IO_REACTOR") for p in rows if "SYNAPSE_ASYNC_IO_REACTOR" in p.env}
            assert given == (dict.fromkeys(synapse_programs, expected) if expected else {}), (mode, value, given)
            assert "SYNAPSE_ASYNC_IO_REACTOR" not in child_environment(env)  # never inherited as typed
