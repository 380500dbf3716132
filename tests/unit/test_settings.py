"""Environment → Settings: parsing, validation messages, derived nginx values, and the seed bugs we must not copy."""

from __future__ import annotations

import re

import pytest

from synapse_workers.cli import main as cli_main
from synapse_workers.errors import UserError
from synapse_workers.load import load_plan
from synapse_workers.render import render_all
from synapse_workers.settings import BOOL_NAMES, load_settings

# Every on/off switch the environment has. Written out (not taken from the code) so a switch that silently
# stops being a boolean fails here.
BOOLEAN_VARS = (
    "COTURN_ALLOW_LOOPBACK_PEERS",
    "COTURN_METRICS",
    "NGINX_CLIENT_KEEPALIVE_ENABLE",
    "NGINX_DISABLE_LOGROTATE",
    "NGINX_UPSTREAM_KEEPALIVE_ENABLE",
    "SYNAPSE_ALLOW_GUEST",
    "SYNAPSE_ENABLE_BUILTIN_COTURN",
    "SYNAPSE_ENABLE_COMPRESSOR",
    "SYNAPSE_ENABLE_POSTGRES_METRIC_EXPORT",
    "SYNAPSE_ENABLE_REDIS_METRIC_EXPORT",
    "SYNAPSE_ENABLE_REGISTRATION",
    "SYNAPSE_HTTP_REPLICATION_UNIX_SOCKETS",
    "SYNAPSE_LOG_SENSITIVE",
    "SYNAPSE_METRICS",
    "SYNAPSE_METRICS_UNIX_SOCKETS",
    "SYNAPSE_NO_TLS",
    "SYNAPSE_PUBLIC_UNIX_SOCKETS",
    "SYNAPSE_SERVE_SERVER_WELLKNOWN",
    "SYNAPSE_URL_PREVIEW_ENABLED",
    "SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK",
)
TRUTHY = ("yes", "YES", "y", "Y", "true", "True", "TRUE", "t", "T", "1", "on", "ON", "On", " yes ")
FALSY = ("no", "NO", "n", "N", "false", "False", "FALSE", "f", "F", "0", "off", "OFF", "Off", "")
BAD_BOOLS = ("maybe", "2", "enabled", "-1", "yess", "nope")


def _problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(UserError) as info:
        load_settings(env)
    return info.value.problems


def _one_problem(env: dict[str, str]) -> str:
    problems = _problems(env)
    assert len(problems) == 1, problems
    return problems[0]


def _nginx(env: dict[str, str]) -> str:
    plan = load_plan(env)
    return render_all(plan).managed[plan.layout.nginx_conf]


def _directive(conf: str, name: str) -> list[str]:
    """Arguments of every `name ...;` line in an nginx config."""
    return [m.group(1) for m in re.finditer(rf"^\s*{name}\s+([^;]*);", conf, re.M)]


@pytest.fixture
def env(base_env):
    # base_env's random public port can land inside the random internal range; a fixed low port never does.
    return {**base_env, "SYNAPSE_HTTP_PORT": "8008"}


# ---- booleans -------------------------------------------------------------------------------------------


def test_boolean_list_matches_the_settings_model():
    assert set(BOOLEAN_VARS) <= BOOL_NAMES
    defaults = load_settings({})
    for var in BOOLEAN_VARS:
        assert isinstance(defaults.value(var), bool), var


@pytest.mark.parametrize("var", BOOLEAN_VARS)
@pytest.mark.parametrize("value", TRUTHY)
def test_truthy_values_turn_every_switch_on(var, value):
    assert load_settings({var: value}).value(var) is True


@pytest.mark.parametrize("var", BOOLEAN_VARS)
@pytest.mark.parametrize("value", FALSY)
def test_falsy_values_turn_every_switch_off(var, value):
    assert load_settings({var: value}).value(var) is False


@pytest.mark.parametrize("var", BOOLEAN_VARS)
@pytest.mark.parametrize("value", BAD_BOOLS)
def test_anything_else_is_an_error_not_a_silent_no(var, value):
    problem = _one_problem({var: value})
    assert problem.startswith(f"{var}={value!r} is invalid")
    assert "expected" in problem and "yes" in problem and "off" in problem


@pytest.mark.parametrize(
    "var, default",
    [("NGINX_CLIENT_KEEPALIVE_ENABLE", True), ("NGINX_UPSTREAM_KEEPALIVE_ENABLE", True), ("SYNAPSE_NO_TLS", True),
     ("SYNAPSE_METRICS", False), ("SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK", False), ("SYNAPSE_LOG_SENSITIVE", False)],
)
def test_unset_switches_take_their_default(var, default):
    assert load_settings({}).value(var) is default


@pytest.mark.parametrize("var", ["NGINX_PROXY_BUFFERING", "NGINX_PROXY_REQUEST_BUFFERING"])
def test_on_off_nginx_switches(var):
    assert load_settings({}).value(var) == "on"
    for value in ("off", "OFF", "false", "0", "no"):
        assert load_settings({var: value}).value(var) == "off"
    for value in ("on", "ON", "true", "1", "yes"):
        assert load_settings({var: value}).value(var) == "on"
    assert f"{var}='sometimes' is invalid" in _one_problem({var: "sometimes"})


def test_load_settings_does_not_read_os_environ(monkeypatch):
    monkeypatch.setenv("SYNAPSE_LOG_LEVEL", "LOUD")
    monkeypatch.setenv("SYNAPSE_METRICS", "yes")
    settings = load_settings({})
    assert settings.logging.level == "INFO" and settings.metrics.enabled is False


def test_empty_non_switch_means_unset():
    settings = load_settings({"NGINX_GZIP_COMP_LEVEL": "", "SYNAPSE_LOG_LEVEL": " ", "POSTGRES_PORT": ""})
    assert (settings.nginx.gzip_comp_level, settings.logging.level, settings.database.port) == (1, "INFO", 5432)


# ---- seed bug P6: "0" is off ----------------------------------------------------------------------------


@pytest.mark.parametrize("var", ["SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK", "SYNAPSE_LOG_SENSITIVE"])
def test_zero_is_off_for_the_non_empty_means_on_variables(var):
    assert load_settings({var: "0"}).value(var) is False
    assert load_settings({var: "1"}).value(var) is True


def _log_configs(env):
    plan = load_plan(env)
    managed = render_all(plan).managed
    return plan, managed


def test_write_logs_to_disk_zero_writes_no_log_files(env):
    import yaml

    plan, managed = _log_configs({**env, "SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK": "0"})
    log = yaml.safe_load(managed[plan.main.log_config])
    assert "file" not in log["handlers"] and log["root"]["handlers"] == ["console"]
    assert _directive(managed[plan.layout.nginx_conf], "access_log") == ["off"]

    plan, managed = _log_configs({**env, "SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK": "1"})
    log = yaml.safe_load(managed[plan.main.log_config])
    assert log["handlers"]["file"]["filename"].startswith(env["SYNAPSE_DATA_DIR"] + "/logs/")
    assert _directive(managed[plan.layout.nginx_conf], "access_log") != ["off"]


def test_log_sensitive_zero_keeps_sql_logger_clamped(env):
    import yaml

    def sql_level(extra):
        plan, managed = _log_configs({**env, "SYNAPSE_LOG_LEVEL": "DEBUG", **extra})
        return yaml.safe_load(managed[plan.main.log_config])["loggers"]["synapse.storage.SQL"]["level"]

    assert sql_level({}) == "INFO"
    assert sql_level({"SYNAPSE_LOG_SENSITIVE": "0"}) == "INFO"
    assert sql_level({"SYNAPSE_LOG_SENSITIVE": "1"}) == "DEBUG"


# ---- seed bug P1: client keepalive switch works ---------------------------------------------------------


def _client_keepalive(conf: str) -> list[str]:
    # The http-level directive has a bare number; upstream blocks use "<n>s".
    return re.findall(r"^\s*keepalive_timeout (\d+)\s*;", conf, re.M)


def test_client_keepalive_disabled_renders_timeout_zero(env):
    assert _client_keepalive(_nginx({**env, "NGINX_CLIENT_KEEPALIVE_ENABLE": "false"})) == ["0"]
    assert _client_keepalive(_nginx({**env, "NGINX_CLIENT_KEEPALIVE_ENABLE": "False",
                                     "NGINX_CLIENT_KEEPALIVE_TIMEOUT_SECONDS": "75"})) == ["0"]


def test_client_keepalive_enabled_uses_the_timeout(env):
    assert _client_keepalive(_nginx(env)) == ["60"]
    assert _client_keepalive(_nginx({**env, "NGINX_CLIENT_KEEPALIVE_ENABLE": "true",
                                     "NGINX_CLIENT_KEEPALIVE_TIMEOUT_SECONDS": "75"})) == ["75"]


# ---- SYNAPSE_REPORT_STATS -------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [("yes", True), ("no", False), ("YES", True), ("No", False)])
def test_report_stats_yes_no(value, expected):
    assert load_settings({"SYNAPSE_REPORT_STATS": value}).core.report_stats is expected


@pytest.mark.parametrize("value", ["true", "false", "1", "0", "y", "n", "on", "off", "t"])
def test_report_stats_rejects_everything_but_yes_no(value):
    problem = _one_problem({"SYNAPSE_REPORT_STATS": value})
    assert problem.startswith(f"SYNAPSE_REPORT_STATS={value!r} is invalid: expected")
    assert "'yes' or 'no'" in problem


# ---- invalid values: the message names the variable, the value and what is expected ----------------------

INVALID = [
    ("NGINX_GZIP_COMP_LEVEL", "0", "from 1 to 9"),
    ("NGINX_GZIP_COMP_LEVEL", "10", "from 1 to 9"),
    ("NGINX_GZIP_COMP_LEVEL", "1.5", "from 1 to 9"),
    ("NGINX_PROXY_READ_TIMEOUT", "abc", "nginx time"),
    ("NGINX_PROXY_READ_TIMEOUT", "60 s", "nginx time"),
    ("SYNAPSE_MAX_UPLOAD_SIZE", "lots", "size such as 50M"),
    ("SYNAPSE_MAX_UPLOAD_SIZE", "0", "size such as 50M"),
    ("SYNAPSE_MAX_UPLOAD_SIZE", "-5M", "size such as 50M"),
    ("POSTGRES_PORT", "70000", "from 1 to 65535"),
    ("POSTGRES_PORT", "0", "from 1 to 65535"),
    ("POSTGRES_PORT", "five", "from 1 to 65535"),
    ("SYNAPSE_HTTP_PORT", "-80", "from 1 to 65535"),
    ("SYNAPSE_TLS_PORT", "65536", "from 1 to 65535"),
    ("SYNAPSE_INTERNAL_PORT_BASE", "80", "from 1024 to 64535"),
    ("SYNAPSE_INTERNAL_PORT_BASE", "65000", "from 1024 to 64535"),
    ("SYNAPSE_LOG_LEVEL", "LOUD", "one of CRITICAL, ERROR, WARNING, INFO, DEBUG"),
    ("SYNAPSE_DATA_DIR", "data", "absolute path"),
    ("SYNAPSE_CONFIG_DIR", "./config", "absolute path"),
    ("SYNAPSE_RUNTIME_DIR", "run/sw", "absolute path"),
    ("SYNAPSE_CONFIG_PATH", "homeserver.yaml", "absolute path"),
    ("SYNAPSE_MEDIA_STORE_PATH", "~/media", "absolute path"),
    ("SYNAPSE_TLS_CERT", "cert.pem", "absolute path"),
    ("SYNAPSE_TLS_KEY", "key.pem", "absolute path"),  # a path, not a secret: shown
    ("NGINX_LISTEN_UNIX_SOCKET", "nginx.sock", "absolute path"),
    ("SYNAPSE_APPSERVICES", "/ok.yaml,relative.yaml", "absolute path"),
    ("SYNAPSE_SERVER_NAME", "not a name", "DNS name"),
    ("SYNAPSE_SERVER_NAME", "https://example.com", "DNS name"),
    ("SYNAPSE_PUBLIC_BASEURL", "matrix.example.com", "full URL"),
    ("SYNAPSE_HTTP_BIND_ADDRESS", "localhost", "IPv4 or IPv6"),
    ("COTURN_EXTERNAL_IP", "1.2.3", "IPv4 or IPv6"),
    ("SYNAPSE_DATABASE", "mysql", "embedded"),
    ("SYNAPSE_TURN_URIS", "turn:a b", "turn:"),
    ("SYNAPSE_TURN_URIS", "http://turn.example.com", "turn:"),
    ("SYNAPSE_EVENT_CACHE_SIZE", "lots", "number of entries"),
    ("PROMETHEUS_SCRAPE_INTERVAL", "15", "Prometheus duration"),
    ("PROMETHEUS_STORAGE_RETENTION_TIME", "forever", "Prometheus duration"),
    ("NGINX_WORKER_PROCESSES", "many", "'auto' or a number"),
    ("NGINX_WORKER_PROCESSES", "0", "'auto' or a number"),
    ("NGINX_WORKER_CONNECTIONS", "8", "from 16"),
    ("NGINX_POOL_LIMITS", "synchrotrn=5", "did you mean 'synchrotron'"),
    ("NGINX_POOL_LIMITS", "synchrotron=0", "NUMBER from 1 to 1000000"),
    ("NGINX_POOL_LIMITS", "synchrotron=many", "NUMBER from 1 to 1000000"),
    ("NGINX_POOL_LIMITS", "synchrotron", "POOL=NUMBER pairs"),
    ("NGINX_POOL_LIMITS", "main=5, main=6", "given twice"),
    ("NGINX_POOL_LIMITS", "client_reader=5, client_reader_room=6", "given twice"),
    ("NGINX_GENERAL_PAGE_SIZE_BYTES", "4k", "whole number"),
    ("NGINX_GENERAL_PAGE_SIZE_BYTES", "100", "from 512"),
    ("NGINX_GZIP_HTTP_VERSION", "2.0", "one of 1.0, 1.1"),
    ("NGINX_UPSTREAM_KEEPALIVE_TIMEOUT_SECONDS", "0", "from 1 to 86400"),
    ("NGINX_PROXY_BUFFERING_DISABLED_PAGE_MULTIPLIER", "0", "from 1 to 1024"),
    ("NGINX_CLIENT_BODY_BUFFER_SIZE_BYTES", "1M", "whole number"),
    ("UID", "-1", "whole number"),
    ("GID", "root", "whole number"),
    ("COTURN_MIN_PORT", "99999", "from 1024 to 65535"),
]


@pytest.mark.parametrize("var, value, expected", INVALID)
def test_invalid_value_names_variable_value_and_expectation(var, value, expected):
    problem = _one_problem({var: value})
    assert problem.startswith(f"{var}={value!r} is invalid: expected "), problem
    assert expected in problem, problem


@pytest.mark.parametrize("var, value, expected", INVALID[:12])
def test_invalid_values_become_user_errors_in_load_plan_too(env, var, value, expected):
    with pytest.raises(UserError) as info:
        load_plan({**env, var: value})
    assert any(p.startswith(f"{var}={value!r}") for p in info.value.problems)


def test_several_bad_variables_are_reported_at_once():
    bad = {
        "NGINX_GZIP_COMP_LEVEL": "10",
        "POSTGRES_PORT": "70000",
        "SYNAPSE_LOG_LEVEL": "LOUD",
        "SYNAPSE_DATA_DIR": "relative",
        "SYNAPSE_METRICS": "perhaps",
    }
    problems = _problems({**bad, "SYNAPSE_SERVER_NAME": "example.test"})
    assert len(problems) == len(bad)
    for var, value in bad.items():
        assert sum(p.startswith(f"{var}={value!r}") for p in problems) == 1, (var, problems)


def test_user_error_message_joins_all_problems():
    with pytest.raises(UserError) as info:
        load_settings({"NGINX_GZIP_COMP_LEVEL": "10", "POSTGRES_PORT": "0"})
    assert str(info.value).splitlines() == info.value.problems


SECRETS = {
    "POSTGRES_PASSWORD": "pg-SECRET-value-1",
    "SYNAPSE_MACAROON_SECRET_KEY": "macaroon-SECRET-value-2",
    "SYNAPSE_REGISTRATION_SHARED_SECRET": "registration-SECRET-value-3",
    "SYNAPSE_FORM_SECRET": "form-SECRET-value-4",
    "SYNAPSE_TURN_SECRET": "turn-SECRET-value-5",
}


# A line break makes every secret invalid (they are stored in one-line key files).
BAD_SECRETS = {var: f"{value}\nsecond-line" for var, value in SECRETS.items()}


@pytest.mark.parametrize("var", sorted(SECRETS))
def test_an_invalid_secret_is_named_but_never_echoed(var):
    problem = _one_problem({var: BAD_SECRETS[var]})
    assert problem.startswith(f"{var}=<hidden> is invalid: expected "), problem
    assert "SECRET-value" not in problem and "second-line" not in problem


def test_secrets_are_never_echoed_in_errors(env, capsys):
    """All five at once, next to an ordinary bad value: through load_settings and through the CLI's stderr."""
    with pytest.raises(UserError) as info:
        load_settings({**BAD_SECRETS, "NGINX_GZIP_COMP_LEVEL": "10"})
    assert cli_main(["plan"], env={**env, **BAD_SECRETS, "NGINX_GZIP_COMP_LEVEL": "10"}) == 2
    captured = capsys.readouterr()
    for text in (str(info.value), captured.out + captured.err):
        assert "NGINX_GZIP_COMP_LEVEL='10'" in text  # ordinary values are shown
        assert text.count("<hidden>") == len(SECRETS), text
        for var in SECRETS:
            assert f"{var}=<hidden>" in text, var
        assert "SECRET-value" not in text and "second-line" not in text


def test_env_command_masks_secrets(capsys):
    assert cli_main(["env"], env={**SECRETS, "SYNAPSE_SERVER_NAME": "example.test"}) == 0
    out = capsys.readouterr().out
    lines = {line.split("=", 1)[0]: line for line in out.splitlines()}
    for var, value in SECRETS.items():
        assert lines[var].startswith(f"{var}=<hidden>"), lines[var]
        assert value not in out
    assert lines["SYNAPSE_SERVER_NAME"].startswith("SYNAPSE_SERVER_NAME=example.test")  # others are shown


def test_secrets_are_not_in_the_settings_repr():
    settings = load_settings(SECRETS)
    # Every section's values, and the variables kept as given (`given`, for the backup job: secrets left out).
    fields = [v.model_dump() if hasattr(v, "model_dump") else v for v in vars(settings).values()]
    text = repr(settings) + str(settings) + "".join(str(v) for v in fields)
    for value in SECRETS.values():
        assert value not in text
    assert settings.database.password.get_secret_value() == SECRETS["POSTGRES_PASSWORD"]


def test_postgres_database_needs_a_password_without_showing_one():
    problem = _one_problem({"SYNAPSE_DATABASE": "postgres"})
    assert "SYNAPSE_DATABASE=postgres" in problem and "POSTGRES_PASSWORD" in problem


# ---- combinations ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["SYNAPSE_TLS_CERT", "SYNAPSE_TLS_KEY"])
def test_tls_cert_and_key_go_together(given):
    problem = _one_problem({given: "/etc/tls/x.pem"})
    assert "SYNAPSE_TLS_CERT" in problem and "SYNAPSE_TLS_KEY" in problem


def test_coturn_port_range_must_be_ordered():
    problem = _one_problem({"COTURN_MIN_PORT": "50000", "COTURN_MAX_PORT": "49000"})
    assert "COTURN_MIN_PORT=50000" in problem and "COTURN_MAX_PORT=49000" in problem and "expected" in problem
    load_settings({"COTURN_MIN_PORT": "49000", "COTURN_MAX_PORT": "49000"})


# ---- derived nginx sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("page", [4096, 8192, 512])
def test_sizes_derive_from_the_page_size(page):
    s = load_settings({"NGINX_GENERAL_PAGE_SIZE_BYTES": str(page)}).nginx
    assert s.page_size == page
    assert s.proxy_buffer_size == page
    assert s.proxy_busy_buffers_size == 2 * page
    assert s.proxy_temp_file_write_size == 2 * page
    assert s.client_body_buffer_size == 1024 * page


def test_default_sizes():
    s = load_settings({}).nginx
    assert (s.proxy_buffer_size, s.proxy_busy_buffers_size, s.proxy_temp_file_write_size,
            s.client_body_buffer_size) == (4096, 8192, 8192, 4096 * 1024)


def test_buffering_off_multiplies_the_proxy_buffer():
    off = load_settings({"NGINX_PROXY_BUFFERING": "off", "NGINX_PROXY_BUFFERING_DISABLED_PAGE_MULTIPLIER": "2"}).nginx
    assert off.proxy_buffer_size == 8192
    on = load_settings({"NGINX_PROXY_BUFFERING": "on", "NGINX_PROXY_BUFFERING_DISABLED_PAGE_MULTIPLIER": "2"}).nginx
    assert on.proxy_buffer_size == 4096
    off_default = load_settings({"NGINX_PROXY_BUFFERING": "off"}).nginx
    assert off_default.proxy_buffer_size == 4096


def test_large_multiplier_keeps_busy_buffers_valid():
    # Seed P3: with buffering off and multiplier > 2, 2×page busy buffers fall below one proxy buffer.
    s = load_settings({"NGINX_PROXY_BUFFERING": "off", "NGINX_PROXY_BUFFERING_DISABLED_PAGE_MULTIPLIER": "16"}).nginx
    assert s.proxy_buffer_size == 16 * 4096
    assert s.proxy_busy_buffers_size >= s.proxy_buffer_size
    assert s.proxy_temp_file_write_size >= s.proxy_buffer_size


def test_explicit_sizes_win():
    s = load_settings({
        "NGINX_PROXY_BUFFER_SIZE_BYTES": "16384",
        "NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES": "32768",
        "NGINX_PROXY_TEMP_FILE_WRITE_SIZE_BYTES": "65536",
        "NGINX_CLIENT_BODY_BUFFER_SIZE_BYTES": "1048576",
        "NGINX_PROXY_BUFFERING": "off",
        "NGINX_PROXY_BUFFERING_DISABLED_PAGE_MULTIPLIER": "8",
    }).nginx
    assert (s.proxy_buffer_size, s.proxy_busy_buffers_size, s.proxy_temp_file_write_size,
            s.client_body_buffer_size) == (16384, 32768, 65536, 1048576)


def test_derived_sizes_are_rendered(env):
    conf = _nginx({**env, "NGINX_GENERAL_PAGE_SIZE_BYTES": "8192", "NGINX_PROXY_BUFFERING": "off",
                   "NGINX_PROXY_BUFFERING_DISABLED_PAGE_MULTIPLIER": "3"})
    # http's; the public /health's location buffers whatever this says (nginx keeps no copy of an unbuffered answer)
    assert _directive(conf, "proxy_buffering") == ["off", "on"]
    assert _directive(conf, "proxy_buffer_size") == ["24576"]
    assert _directive(conf, "proxy_buffers") == ["8 24576"]
    assert _directive(conf, "proxy_busy_buffers_size") == ["24576"]
    assert _directive(conf, "proxy_temp_file_write_size") == ["24576"]
    assert _directive(conf, "client_body_buffer_size") == [str(1024 * 8192)]
    assert _directive(conf, "gzip_buffers") == ["32 24576"]


def test_default_sizes_are_rendered(env):
    conf = _nginx(env)
    assert _directive(conf, "proxy_buffer_size") == ["4096"]
    assert _directive(conf, "proxy_busy_buffers_size") == ["8192"]
    assert _directive(conf, "proxy_temp_file_write_size") == ["8192"]
    assert _directive(conf, "client_body_buffer_size") == ["4194304"]
    assert _directive(conf, "client_max_body_size") == [str(50 * 1024 * 1024)]


@pytest.mark.parametrize(
    "extra, var",
    [
        ({"NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES": "1024"}, "NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES"),
        ({"NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES": "65536"}, "NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES"),
        ({"NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES": "28672"}, "NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES"),  # 8×4096 − 4096
        ({"NGINX_PROXY_BUFFER_SIZE_BYTES": "16384", "NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES": "8192"},
         "NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES"),
        ({"NGINX_PROXY_TEMP_FILE_WRITE_SIZE_BYTES": "1024"}, "NGINX_PROXY_TEMP_FILE_WRITE_SIZE_BYTES"),
        ({"NGINX_PROXY_BUFFER_SIZE_BYTES": "16384", "NGINX_PROXY_TEMP_FILE_WRITE_SIZE_BYTES": "8192"},
         "NGINX_PROXY_TEMP_FILE_WRITE_SIZE_BYTES"),
    ],
)
def test_buffer_combinations_nginx_would_refuse_are_errors(extra, var):
    problems = _problems(extra)
    assert any(p.startswith(f"{var}=") and "expected" in p for p in problems), problems


def test_busy_buffers_just_inside_the_limits_are_accepted():
    assert load_settings({"NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES": "4096"}).nginx.proxy_busy_buffers_size == 4096
    assert load_settings({"NGINX_PROXY_BUSY_BUFFERS_SIZE_BYTES": "28671"}).nginx.proxy_busy_buffers_size == 28671
    assert load_settings({"NGINX_PROXY_TEMP_FILE_WRITE_SIZE_BYTES": "4096"}).nginx.proxy_temp_file_write_size == 4096


# ---- values that are parsed -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, size", [("50M", 50 * 1024**2), ("2048M", 2048 * 1024**2), ("1G", 1024**3), ("512K", 512 * 1024),
                   ("1000", 1000), ("10m", 10 * 1024**2), ("1GB", 1024**3)],
)
def test_upload_size_units(text, size):
    assert load_settings({"SYNAPSE_MAX_UPLOAD_SIZE": text}).core.max_upload_size == size


def test_paths_lose_trailing_slashes():
    s = load_settings({"SYNAPSE_DATA_DIR": "/data/", "SYNAPSE_RUNTIME_DIR": "/run/sw//"})
    assert (s.core.data_dir, s.core.runtime_dir) == ("/data", "/run/sw")
    assert load_settings({"SYNAPSE_CONFIG_DIR": "/cfg"}).core.homeserver_config_path == "/cfg/homeserver.yaml"
    assert load_settings({"SYNAPSE_CONFIG_PATH": "/x/hs.yaml"}).core.homeserver_config_path == "/x/hs.yaml"


def test_log_level_is_case_insensitive():
    assert load_settings({"SYNAPSE_LOG_LEVEL": "debug"}).logging.level == "DEBUG"


def test_database_kind():
    assert load_settings({}).database.kind == "embedded"
    assert load_settings({"POSTGRES_PASSWORD": "x"}).database.kind == "postgres"
    assert load_settings({"SYNAPSE_DATABASE": "sqlite", "POSTGRES_PASSWORD": "x"}).database.kind == "sqlite"
