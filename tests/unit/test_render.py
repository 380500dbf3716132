"""Renderers: determinism, what lands in each file, and what must never land there."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synapse_workers.cli import main as cli_main
from synapse_workers.errors import UserError
from synapse_workers.files import write_files
from synapse_workers.load import load_plan
from synapse_workers.render import render_all

BIG = "synchrotron:2, event_persister:2, media_repository, stream_writers=typing+to_device+receipts"
WIDE = ("full, synchrotron:2, event_persister:2, client_reader:2, push_rules, device_lists:2, "
        "thread_subscriptions, appservice, user_dir:2, pusher:2, federation_sender:2, media_repository:2")


@pytest.fixture
def env(base_env):
    # base_env's random public port can land inside the random internal range; a fixed low port never does.
    return {**base_env, "SYNAPSE_HTTP_PORT": "8008"}


def rendered(env, spec="", **extra):
    plan = load_plan({**env, "SYNAPSE_WORKER_TYPES": spec, **extra})
    return plan, render_all(plan)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def directive(conf: str, name: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"^\s*{name}\s+([^;]*);", conf, re.M)]


# ---- determinism ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["", BIG, WIDE])
def test_same_env_renders_identical_files_in_fresh_dirs(env, tmp_root, spec):
    env = {**env, "SYNAPSE_WORKER_TYPES": spec, "SYNAPSE_METRICS": "1"}
    snapshots = []
    for _ in range(2):
        shutil.rmtree(tmp_root / "run", ignore_errors=True)
        shutil.rmtree(tmp_root / "data", ignore_errors=True)
        plan = load_plan(env)
        managed = render_all(plan).managed
        assert cli_main(["generate"], env=env) == 0
        on_disk = tree(tmp_root / "run")
        for path, text in managed.items():
            assert on_disk[str(Path(path).relative_to(tmp_root / "run"))] == text.encode()
        snapshots.append(on_disk)
    assert snapshots[0] == snapshots[1]


def test_rendering_does_not_depend_on_hash_seed(env):
    """Seed bug P12 (nginx location order from set iteration): render in processes with different hash seeds."""
    code = (
        "import sys, json, hashlib\n"
        "from synapse_workers.load import load_plan\n"
        "from synapse_workers.render import render_all\n"
        "env = json.loads(sys.stdin.read())\n"
        "m = render_all(load_plan(env)).managed\n"
        "print(json.dumps({k: hashlib.sha256(v.encode()).hexdigest() for k, v in sorted(m.items())}))\n"
    )
    import json

    env = {**env, "SYNAPSE_WORKER_TYPES": WIDE, "SYNAPSE_METRICS": "yes"}
    outputs = set()
    for seed in ("0", "1", "12345"):
        result = subprocess.run(
            [sys.executable, "-c", code], input=json.dumps(env), capture_output=True, text=True, timeout=60,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": seed},
        )
        assert result.returncode == 0, result.stderr
        outputs.add(result.stdout)
    assert len(outputs) == 1


BIG_PROCESSES = ("main", "synchrotron1", "synchrotron2", "event_persister1", "event_persister2", "media_repository1",
                 "stream_writers1")


def test_managed_files_cover_every_process(env):
    """README: <runtime>/synapse/{shared.yaml,main.yaml,workers/*.yaml,log/*.log.config}, nginx/, redis/."""
    plan, files = rendered(env, BIG)
    runtime = env["SYNAPSE_RUNTIME_DIR"]
    expected = {f"{runtime}/synapse/shared.yaml", f"{runtime}/synapse/main.yaml", f"{runtime}/nginx/nginx.conf",
                f"{runtime}/redis/redis.conf"}
    expected |= {f"{runtime}/synapse/workers/{name}.yaml" for name in BIG_PROCESSES if name != "main"}
    expected |= {f"{runtime}/synapse/log/{name}.log.config" for name in BIG_PROCESSES}
    assert expected <= set(files.managed)
    assert all(path.startswith(runtime + "/") for path in files.managed)
    for text in files.managed.values():
        assert text.endswith("\n")


# ---- Synapse YAML ---------------------------------------------------------------------------------------


def test_worker_yaml(env):
    plan, files = rendered(env, BIG)
    doc = yaml.safe_load(files.managed[plan.process("stream_writers1").config_files[-1]])
    assert doc["worker_app"] == "synapse.app.generic_worker"
    assert doc["worker_name"] == "stream_writers1"
    assert doc["worker_log_config"] == env["SYNAPSE_RUNTIME_DIR"] + "/synapse/log/stream_writers1.log.config"
    kinds = [lst["resources"][0]["names"] if lst["resources"] else [] for lst in doc["worker_listeners"]]
    assert kinds == [["client"], ["replication"], []]


@pytest.mark.parametrize("spec", ["", BIG])
def test_only_public_listeners_trust_x_forwarded(env, spec):
    """Seed bug P13: worker listeners behind nginx need x_forwarded; internal ones must not trust it."""
    plan, files = rendered(env, spec, SYNAPSE_METRICS="yes")
    for proc in plan.processes:
        doc = yaml.safe_load(files.managed[proc.config_files[-1]])
        listeners = doc.get("listeners") or doc.get("worker_listeners")
        assert len(listeners) == len(proc.listeners)
        for lst, planned in zip(listeners, proc.listeners, strict=True):
            assert lst["x_forwarded"] is (planned.kind == "public"), (proc.name, lst)
            assert lst["type"] == "http"


MIB = 1024 * 1024


def existing_homeserver(env, *lines: str) -> Path:
    path = Path(env["SYNAPSE_CONFIG_DIR"]) / "homeserver.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = "server_name: example.test\ndatabase: {name: psycopg2, args: {}}\n"
    path.write_text(doc + "".join(f"{line}\n" for line in lines))
    return path


def test_max_upload_size_in_shared_yaml_when_the_variable_is_set(env):
    """README: SYNAPSE_MAX_UPLOAD_SIZE is Synapse's limit and nginx's client_max_body_size, on every start."""
    plan, files = rendered(env, BIG)  # unset, new install: the generated homeserver.yaml carries the default
    assert "max_upload_size" not in yaml.safe_load(files.managed[plan.layout.shared_config])
    assert yaml.safe_load(files.once[plan.homeserver.path][0])["max_upload_size"] == "50M"
    assert directive(files.managed[plan.layout.nginx_conf], "client_max_body_size") == [str(50 * MIB)]
    for spec in ("", BIG):
        plan, files = rendered(env, spec, SYNAPSE_MAX_UPLOAD_SIZE="1G")
        assert yaml.safe_load(files.managed[plan.layout.shared_config])["max_upload_size"] == "1G"
        assert directive(files.managed[plan.layout.nginx_conf], "client_max_body_size") == [str(1024 * MIB)]


@pytest.mark.parametrize("line, variable, in_shared, limit", [
    ("max_upload_size: 10M", None, None, 10 * MIB),  # the user's own value stands, and nginx follows it
    ("max_upload_size: 4096", None, None, 4096),
    ("max_upload_size: 2G", None, None, 2048 * MIB),
    ("", None, None, 50 * MIB),  # none in the file: Synapse's default
    ("max_upload_size: 10M", "20M", "20M", 20 * MIB),  # set: the variable wins for both
    ("max_upload_size: lots", "20M", "20M", 20 * MIB),  # Synapse never reads the file's value then
])
def test_existing_homeserver_upload_limit_is_nginx_limit(env, line, variable, in_shared, limit):
    existing_homeserver(env, line)
    extra = {"SYNAPSE_MAX_UPLOAD_SIZE": variable} if variable else {}
    plan, files = rendered(env, BIG, **extra)
    assert yaml.safe_load(files.managed[plan.layout.shared_config]).get("max_upload_size") == in_shared
    assert plan.public.max_body_size == limit
    assert directive(files.managed[plan.layout.nginx_conf], "client_max_body_size") == [str(limit)]


@pytest.mark.parametrize("value", ["lots", "0", "-5M", "1.5M", "[1]"])
def test_existing_homeserver_unreadable_upload_limit_is_refused(env, value):
    path = existing_homeserver(env, f"max_upload_size: {value}")
    with pytest.raises(UserError) as exc:
        rendered(env, BIG)
    assert str(path) in str(exc.value) and "max_upload_size" in str(exc.value)


def test_existing_synapse_log_config_is_every_process_log_config(env, tmp_root):
    mine = tmp_root / "mine.log.config"
    mine.write_text("version: 1\n")
    plan, files = rendered(env, BIG, SYNAPSE_LOG_CONFIG=str(mine))
    assert yaml.safe_load(files.managed[plan.layout.main_config])["log_config"] == str(mine)
    for proc in plan.workers:
        assert yaml.safe_load(files.managed[proc.config_files[-1]])["worker_log_config"] == str(mine), proc.name
    assert yaml.safe_load(files.once[plan.homeserver.path][0])["log_config"] == str(mine)
    write_files(plan, files)
    assert mine.read_text() == "version: 1\n"  # the user's file is never written to


def test_missing_synapse_log_config_keeps_per_process_log_configs(env, tmp_root):
    named = str(tmp_root / "data" / "named.log.config")
    plan, files = rendered(env, BIG, SYNAPSE_LOG_CONFIG=named)
    runtime = env["SYNAPSE_RUNTIME_DIR"]
    assert yaml.safe_load(files.managed[plan.layout.main_config])["log_config"] == (
        f"{runtime}/synapse/log/main.log.config")
    for proc in plan.workers:
        doc = yaml.safe_load(files.managed[proc.config_files[-1]])
        assert doc["worker_log_config"] == f"{runtime}/synapse/log/{proc.name}.log.config"
    # Its documented meaning: the path a generated homeserver.yaml names.
    assert yaml.safe_load(files.once[plan.homeserver.path][0])["log_config"] == named


def test_metrics_listeners(env):
    plan, files = rendered(env, "pusher", SYNAPSE_METRICS="on")
    shared = yaml.safe_load(files.managed[plan.layout.shared_config])
    assert shared["enable_metrics"] is True
    for proc in plan.processes:
        metrics = proc.listener("metrics")
        assert metrics is not None and metrics.resources == ("metrics",)
    plan, files = rendered(env, "pusher")
    assert all(proc.listener("metrics") is None for proc in plan.processes)
    assert "enable_metrics" not in yaml.safe_load(files.managed[plan.layout.shared_config])


def test_generated_headers_mark_files_as_generated(env):
    plan, files = rendered(env, BIG)
    for path in (plan.layout.shared_config, plan.layout.main_config, plan.layout.nginx_conf):
        assert files.managed[path].startswith("# Generated by synapse-workers")


def test_homeserver_yaml_is_a_once_file_with_private_mode(env):
    plan, files = rendered(env, BIG)
    text, mode = files.once[plan.homeserver.path]
    assert mode == 0o600
    doc = yaml.safe_load(text)
    assert doc["server_name"] == "example.test"
    assert doc["report_stats"] is False
    # The external database's password is a secret like the others: not in the file, in a libpq passfile.
    assert env["POSTGRES_PASSWORD"] not in text and "password" not in doc["database"]["args"]
    assert doc["database"]["args"]["passfile"] == env["SYNAPSE_DATA_DIR"] + "/external_postgres.pgpass"


def test_external_database_password_file(env, tmp_root):
    """libpq's passfile format: host:port:database:user:password with ':' and '\\' escaped by a backslash."""
    env = {**env, "POSTGRES_PASSWORD": r"pa:ss\word"}
    plan = load_plan({**env, "SYNAPSE_WORKER_TYPES": ""})
    write_files(plan, render_all(plan))
    passfile = Path(env["SYNAPSE_DATA_DIR"], "external_postgres.pgpass")
    assert passfile.read_text() == "*:*:*:*:pa\\:ss\\\\word\n"
    assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
    # A new POSTGRES_PASSWORD replaces it on the next run: the variable stays the one place to change it.
    plan = load_plan({**env, "SYNAPSE_WORKER_TYPES": "", "POSTGRES_PASSWORD": "new"})
    write_files(plan, render_all(plan))
    assert passfile.read_text() == "*:*:*:*:new\n"


def test_no_once_files_when_homeserver_yaml_exists(env):
    path = Path(env["SYNAPSE_CONFIG_DIR"]) / "homeserver.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump({"server_name": "example.test", "database": {"name": "psycopg2", "args": {}}}))
    plan, files = rendered(env, BIG)
    assert plan.homeserver.exists and files.once == {}


SECRETS = {
    "POSTGRES_PASSWORD": "pg-SECRET-value-1",
    "SYNAPSE_MACAROON_SECRET_KEY": "macaroon-SECRET-value-2",
    "SYNAPSE_REGISTRATION_SHARED_SECRET": "registration-SECRET-value-3",
    "SYNAPSE_FORM_SECRET": "form-SECRET-value-4",
    "SYNAPSE_TURN_SECRET": "turn-SECRET-value-5",
    "SYNAPSE_TURN_URIS": "turn:turn.example.test:3478",
}


def test_secrets_never_reach_managed_files(env):
    plan, files = rendered({**env, **SECRETS}, WIDE, SYNAPSE_METRICS="yes")
    for path, text in files.managed.items():
        for var, value in SECRETS.items():
            if "SECRET" in value:
                assert value not in text, (var, path)
    # The once-written homeserver.yaml references secret files, not values (besides the DB password).
    hs_text = files.once[plan.homeserver.path][0]
    for var in ("SYNAPSE_MACAROON_SECRET_KEY", "SYNAPSE_REGISTRATION_SHARED_SECRET", "SYNAPSE_FORM_SECRET",
                "SYNAPSE_TURN_SECRET"):
        assert SECRETS[var] not in hs_text, var


def test_secrets_never_reach_cli_output(env, capsys):
    env = {**env, **SECRETS, "SYNAPSE_WORKER_TYPES": BIG}
    for argv in (["plan"], ["plan", "--json"], ["env"], ["routes", "GET", "/_matrix/client/v3/sync"], ["generate"]):
        assert cli_main(argv, env=env) == 0, argv
        out = capsys.readouterr()
        for value in SECRETS.values():
            if "SECRET" in value:
                assert value not in out.out + out.err, (argv, value)


def test_env_secrets_end_up_in_private_files(env, tmp_root):
    env = {**env, **SECRETS, "SYNAPSE_WORKER_TYPES": "pusher"}
    assert cli_main(["generate"], env=env) == 0
    data = tmp_root / "data"
    for name, var in (("example.test.macaroon.key", "SYNAPSE_MACAROON_SECRET_KEY"),
                      ("example.test.registration.key", "SYNAPSE_REGISTRATION_SHARED_SECRET"),
                      ("example.test.form.key", "SYNAPSE_FORM_SECRET"),
                      ("example.test.turn.key", "SYNAPSE_TURN_SECRET")):
        path = data / name
        assert path.read_text().strip() == SECRETS[var]
        assert path.stat().st_mode & 0o777 == 0o600
    assert (data / "homeserver.yaml").stat().st_mode & 0o777 == 0o600
    assert (data / "worker_replication.key").stat().st_mode & 0o777 == 0o600


# ---- log configs ----------------------------------------------------------------------------------------


def test_log_level_applies_to_every_process(env):
    plan, files = rendered(env, BIG, SYNAPSE_LOG_LEVEL="warning")
    for proc in plan.processes:
        doc = yaml.safe_load(files.managed[proc.log_config])
        assert doc["root"]["level"] == "WARNING"
        assert doc["loggers"]["synapse.storage.SQL"]["level"] == "WARNING"


def test_logs_on_disk_one_file_per_process(env):
    plan, files = rendered(env, BIG, SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK="yes")
    filenames = set()
    for proc in plan.processes:
        doc = yaml.safe_load(files.managed[proc.log_config])
        filenames.add(doc["handlers"]["file"]["filename"])
        assert "buffer" in doc["root"]["handlers"]
    assert len(filenames) == len(plan.processes)
    assert f"{env['SYNAPSE_DATA_DIR']}/logs/main.log" in filenames


# ---- nginx ----------------------------------------------------------------------------------------------


def test_nginx_locations_follow_the_plan_routes(env):
    plan, files = rendered(env, WIDE)
    conf = files.managed[plan.layout.nginx_conf]
    patterns = re.findall(r'^\s*location ~ "([^"]*)" \{', conf, re.M)
    assert patterns == [route.rule.pattern for route in plan.routes]
    for prefix in ("/_synapse/replication", "/_synapse/metrics"):
        block = re.search(rf"location \^~ {re.escape(prefix)} \{{\s*return 404;", conf)
        assert block, prefix
    assert conf.index("/_synapse/replication") < conf.index("location ~ ")


def test_nginx_method_maps_for_split_routes(env):
    plan, files = rendered(env, "client_reader")
    conf = files.managed[plan.layout.nginx_conf]
    block = re.search(r"map \$request_method \$sw_route_push_rules \{(.*?)\}", conf, re.S).group(1)
    entries = dict(line.strip().rstrip(";").split() for line in block.strip().splitlines())
    assert entries == {"GET": "client_reader_non_room", "HEAD": "client_reader_non_room", "default": "main"}
    assert re.search(r'pushrules/" \{\s*set \$sw_pool \$sw_pool_push_rules;(\s*error_page [^;]*;)*\s*proxy_pass '
                     r'http://\$sw_route_push_rules;', conf)
    # The pool the request counts against (NGINX_POOL_LIMITS) follows the same methods.
    block = re.search(r"map \$request_method \$sw_pool_push_rules \{(.*?)\}", conf, re.S).group(1)
    entries = dict(line.strip().rstrip(";").split() for line in block.strip().splitlines())
    assert entries == {"GET": "client_reader_non_room", "HEAD": "client_reader_non_room", "default": "main"}


def test_nginx_public_listen_and_body_limit(env):
    plan, files = rendered(env, "", SYNAPSE_HTTP_BIND_ADDRESS="127.0.0.1", SYNAPSE_MAX_UPLOAD_SIZE="2048M",
                           NGINX_LISTEN_UNIX_SOCKET="/tmp/sw-test-public.sock")
    conf = files.managed[plan.layout.nginx_conf]
    assert directive(conf, "client_max_body_size") == [str(2048 * 1024 * 1024)]
    listens = directive(conf, "listen")
    assert "127.0.0.1:8008 so_keepalive=on backlog=4096" in listens  # a burst of connections waits, not retries
    assert "unix:/tmp/sw-test-public.sock" in listens
    assert not any("ssl" in listen for listen in listens)


def test_nginx_tls(env, tmp_root):
    cert, key = tmp_root / "tls.crt", tmp_root / "tls.key"
    cert.write_text("cert")
    key.write_text("key")
    plan, files = rendered(env, "", SYNAPSE_TLS_CERT=str(cert), SYNAPSE_TLS_KEY=str(key), SYNAPSE_TLS_PORT="8449")
    conf = files.managed[plan.layout.nginx_conf]
    assert any(listen.endswith(":8449 ssl so_keepalive=on backlog=4096") for listen in directive(conf, "listen"))
    assert directive(conf, "ssl_certificate") == [str(cert)]
    assert directive(conf, "ssl_certificate_key") == [str(key)]


def test_nginx_upstream_keepalive(env):
    plan, files = rendered(env, BIG, NGINX_UPSTREAM_KEEPALIVE_CONNECTION_MULTIPLIER="3",
                           NGINX_UPSTREAM_KEEPALIVE_TIMEOUT_SECONDS="30")
    conf = files.managed[plan.layout.nginx_conf]
    sync = re.search(r"upstream synchrotron_by_user \{(.*?)\}", conf, re.S).group(1)
    assert "hash $sw_user consistent;" in sync
    assert "keepalive 12;" in sync  # 2 servers × 2 × 3
    assert "keepalive_timeout 30s;" in sync
    main = re.search(r"upstream main \{(.*?)\}", conf, re.S).group(1)
    assert "keepalive 6;" in main
    assert 'proxy_set_header Connection "";' in conf

    plan, files = rendered(env, BIG, NGINX_UPSTREAM_KEEPALIVE_ENABLE="no")
    conf = files.managed[plan.layout.nginx_conf]
    assert not re.search(r"^\s*keepalive \d+;", conf, re.M)
    assert 'Connection ""' not in conf


def test_nginx_server_lines_use_max_fails(env):
    plan, files = rendered(env, BIG, NGINX_UPSTREAM_SERVER_MAX_FAILS="0", NGINX_UPSTREAM_SERVER_FAIL_TIMEOUT="7")
    conf = files.managed[plan.layout.nginx_conf]
    servers = [line for line in conf.splitlines() if line.strip().startswith("server ") and "{" not in line]
    assert servers and all(line.rstrip().endswith("max_fails=0 fail_timeout=7;") for line in servers)
    addresses = {line.split()[1] for line in servers}
    public = {p.listener("public").address for p in plan.processes if p.listener("public")}
    assert addresses <= public


def test_nginx_tunables_pass_through(env):
    plan, files = rendered(env, "", NGINX_WORKER_PROCESSES="4", NGINX_WORKER_CONNECTIONS="4096",
                           NGINX_GZIP_COMP_LEVEL="5", NGINX_GZIP_HTTP_VERSION="1.0", NGINX_GZIP_MIN_LENGTH="1000",
                           NGINX_PROXY_READ_TIMEOUT="5m", NGINX_PROXY_REQUEST_BUFFERING="off")
    conf = files.managed[plan.layout.nginx_conf]
    assert directive(conf, "worker_processes") == ["4"]
    assert directive(conf, "worker_connections") == ["4096"]
    # Each proxied connection holds two descriptors: the process's own limit must not cap worker_connections.
    assert int(directive(conf, "worker_rlimit_nofile")[0]) >= 2 * 4096
    assert directive(conf, "gzip_comp_level") == ["5"]
    assert directive(conf, "gzip_http_version") == ["1.0"]
    assert directive(conf, "gzip_min_length") == ["1000"]
    assert directive(conf, "proxy_read_timeout")[0] == "5m"  # http's; the public /health has its own
    assert directive(conf, "proxy_request_buffering") == ["off"]


def test_nginx_paths_stay_under_the_runtime_dir(env):
    plan, files = rendered(env, BIG)
    conf = files.managed[plan.layout.nginx_conf]
    runtime = env["SYNAPSE_RUNTIME_DIR"]
    for name in ("pid", "client_body_temp_path", "proxy_temp_path"):
        (value,) = directive(conf, name)
        assert value.startswith(runtime + "/nginx/"), name


# ---- unit tests stay light --------------------------------------------------------------------------------


def test_rendering_does_not_import_synapse(env):
    """Planning and rendering stay light (checked in a fresh interpreter: other test packages may import Synapse)."""
    import json

    code = (
        "import sys, json\n"
        "from synapse_workers.load import load_plan\n"
        "from synapse_workers.render import render_all\n"
        "render_all(load_plan(json.loads(sys.stdin.read())))\n"
        "print(sorted(m for m in sys.modules if m == 'synapse' or m.startswith('synapse.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], input=json.dumps({**env, "SYNAPSE_WORKER_TYPES": WIDE}),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_ipv6_bind_address_is_bracketed(env):
    plan, files = rendered(env, "", SYNAPSE_HTTP_BIND_ADDRESS="::1")
    assert "[::1]:8008 so_keepalive=on backlog=4096" in directive(files.managed[plan.layout.nginx_conf], "listen")


def test_a_generated_log_config_named_by_synapse_log_config_stays_ours(env, tmp_root):
    """SYNAPSE_LOG_CONFIG names a missing file: a new install creates it; the next start must not take that
    generated file for the user's own (SYNAPSE_LOG_LEVEL would stop applying, workers would share it)."""
    path = tmp_root / "data" / "mine.log.config"
    env = {**env, "SYNAPSE_LOG_CONFIG": str(path), "SYNAPSE_WORKER_TYPES": "synchrotron"}
    plan = load_plan(env)
    write_files(plan, render_all(plan))
    assert path.is_file()
    again = load_plan(env)
    assert again.homeserver.user_log_config is None
    worker = yaml.safe_load(render_all(again).managed[again.process("synchrotron1").config_files[-1]])
    assert worker["worker_log_config"] == str(tmp_root / "run" / "synapse" / "log" / "synchrotron1.log.config")
    yaml.safe_load(path.read_text())  # still a log config Synapse can read


# ---- render parameters (an export renders with them; nothing edits a rendered text) --------------------------


@pytest.mark.parametrize("header", ["", "# one line\n", "# one\n# two\n", "# one\n# two\n# three\n"])
def test_dump_keeps_every_key_under_any_header(header):
    from synapse_workers.render.synapse import dump

    doc = {"server_name": "example.test", "listeners": [{"port": 8008}], "report_stats": False}
    text = dump(doc, header=header)
    assert text.startswith(header)
    assert yaml.safe_load(text) == doc  # the first key too: a header is never cut off by counting lines
    assert list(yaml.safe_load(text)) == list(doc)


def test_generated_homeserver_yaml_is_its_header_and_every_key(env):
    from synapse_workers.homeserver import generated_homeserver
    from synapse_workers.render import HOMESERVER_HEADER, render_homeserver
    from synapse_workers.render.synapse import log_config

    plan, files = rendered(env, BIG)
    doc = generated_homeserver(
        plan.settings, plan.secrets, plan.layout.postgres_socket_dir, plan.public.port, plan.media_store
    )
    assert list(doc)[0] == "server_name"
    text, mode = files.once[plan.homeserver.path]
    assert (text, mode) == render_homeserver(plan)[plan.homeserver.path]
    assert text.startswith(HOMESERVER_HEADER) and "rewritten on every start" not in text  # the user's file, not ours
    assert yaml.safe_load(text) == doc
    log_text, log_mode = files.once[doc["log_config"]]
    assert log_mode == 0o644 and log_text.startswith("#") and yaml.safe_load(log_text) == log_config(
        plan, plan.main, plan.settings.logging
    )


def test_nginx_health_upstream_is_a_parameter(env):
    """`/health` of every server block (the public one and a homeserver.yaml listener's) asks the launcher by
    default, the given address (an export's main) otherwise."""
    from synapse_workers.render.nginx import render_nginx

    path = Path(env["SYNAPSE_CONFIG_DIR"]) / "homeserver.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    client = {"port": 8008, "type": "http", "x_forwarded": True, "resources": [{"names": ["client"]}]}
    federation = {"port": 8448, "type": "http", "resources": [{"names": ["federation"]}]}
    database = {"name": "psycopg2", "args": {"user": "synapse", "password": "x", "host": "db", "database": "synapse"}}
    path.write_text(yaml.safe_dump({"server_name": "example.test", "database": database,
                                    "listeners": [client, federation]}))
    plan = load_plan({k: v for k, v in env.items() if k != "SYNAPSE_HTTP_PORT"})
    assert len(plan.extra_listeners) == 1

    def health_targets(conf: str) -> list[str]:
        return re.findall(r"location = /health \{\s*proxy_pass http://([^;]+);", conf)

    default = render_nginx(plan, plan.settings.nginx)[plan.layout.nginx_conf]
    assert health_targets(default) == [f"127.0.0.1:{plan.health_port}"] * 2
    given = render_nginx(plan, plan.settings.nginx, health_upstream="synapse-main:8080")[plan.layout.nginx_conf]
    assert health_targets(given) == ["synapse-main:8080"] * 2
    assert given.replace("synapse-main:8080", f"127.0.0.1:{plan.health_port}") == default  # nothing else differs


def test_shared_yaml_redis_password_is_a_parameter(env):
    """Redis over TCP (several hosts) asks for our key file's password; an export's Redis has none."""
    from dataclasses import replace

    from synapse_workers.plan import Redis
    from synapse_workers.render.synapse import shared_config

    plan = load_plan({**env, "SYNAPSE_WORKER_TYPES": "synchrotron"})
    tcp = replace(plan, redis=Redis(external=False, path=None, host="10.0.0.5", port=6380))
    assert shared_config(tcp)["redis"] == {
        "enabled": True, "host": "10.0.0.5", "port": 6380, "password_path": plan.secrets.redis,
    }
    assert shared_config(tcp, redis_password=False)["redis"] == {"enabled": True, "host": "10.0.0.5", "port": 6380}
    # A unix socket (one host) is unchanged by it.
    assert shared_config(plan, redis_password=False)["redis"] == shared_config(plan)["redis"]
    assert shared_config(plan)["redis"] == {"enabled": True, "path": plan.redis.path}


def test_the_initial_pool_has_its_own_location_read_timeout_and_stand_ins(env):
    plan, files = rendered(env, "synchrotron:2, initial_synchrotron")
    conf = files.managed[plan.layout.nginx_conf]
    sync = re.search(r'location ~ "\^/_matrix/client/\(r0\|v3\)/sync\$" \{(.*?)\n        \}', conf, re.S).group(1)
    assert "proxy_read_timeout" not in sync  # incremental syncs keep NGINX_PROXY_READ_TIMEOUT
    assert "if ($sw_q_initial_sync)" in sync and "proxy_pass http://synchrotron_by_user;" in sync
    initial = re.search(r"location @sw_q_sync \{(.*?)\n        \}", conf, re.S).group(1)
    assert "proxy_pass http://initial_synchrotron;" in initial and "proxy_read_timeout 10m;" in initial
    assert "error_page 502 504 = @sw_down_synchrotron_by_user;" in initial
    down = re.search(r"location @sw_down_synchrotron_by_user \{(.*?)\n        \}", conf, re.S).group(1)
    assert "error_page 502 504 = @sw_main;" in down
    assert "proxy_read_timeout 10m;" in down  # standing in for initial syncs, with their timeout
    assert '"~^:" 1;' in conf and '"~:true$" 1;' in conf  # map "$arg_since:$arg_full_state"
    assert re.search(r'map "\$arg_from" \$sw_q_initial_events \{\s*default 0;\s*"" 1;', conf)


def test_each_pool_is_bounded_in_nginx(env):
    plan, files = rendered(env, "synchrotron, initial_synchrotron", NGINX_POOL_LIMITS="synchrotron=5, main=3")
    conf = files.managed[plan.layout.nginx_conf]
    assert set(directive(conf, "limit_conn")) == {"sw_pool_main 3", "sw_pool_synchrotron 5",
                                                    "sw_pool_initial_synchrotron 50"}
    assert directive(conf, "limit_conn_status") == ["429"]
    limited = re.search(r"location @sw_limited \{(.*?)\n        \}", conf, re.S).group(1)
    assert "add_header Retry-After 2 always;" in limited and '"errcode":"M_LIMIT_EXCEEDED"' in limited
    assert '"retry_after_ms":2000' in limited
    # Every location that counts a request against a pool and has error pages of its own keeps the 429 one
    # (error_page is not inherited then); a stand-in's location counts nothing again.
    for block in re.findall(r"\n        location [^{]*\{(.*?)\n        \}", conf, re.S):
        if "set $sw_pool" in block and "error_page" in block:
            assert "error_page 429 = @sw_limited;" in block, block
