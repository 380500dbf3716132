"""The Unraid template against its consumer: Unraid's command building (tests/support/unraid.py) and the
program that reads what Unraid sends.

Unraid never leaves a variable unset: a field left empty sends the template's `Default`. So for every
`<Config>`, the environment Unraid sends with that field empty must plan and render exactly what the same
container gives with the variable not set at all (`docker run` with only the image's ENV): the plan and every
generated file byte for byte, for a new server and for a /data moved from the original image. The image's
ENV is read from the Dockerfile, the volumes too: a new VOLUME without a Path fails here.
"""

from __future__ import annotations

import json
import re
import shlex
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from synapse_workers.cli import main as cli_main
from synapse_workers.errors import UserError
from synapse_workers.load import load_plan
from synapse_workers.programs import programs
from synapse_workers.render import render_all
from synapse_workers.settings import SECRET_NAMES, VARIABLES
from synapse_workers.start_warnings import facts_here, start_warnings
from tests.support.unraid import xml_to_command

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "contrib/unraid/synapse-workers.xml"
DOCKERFILE = (REPO / "Dockerfile").read_text()
# What a new user must fill in: the form's required fields.
NEW_USER = {"SYNAPSE_SERVER_NAME": "matrix.example.org", "SYNAPSE_REPORT_STATS": "no"}
SECRETS = ("SYNAPSE_REGISTRATION_SHARED_SECRET", "SYNAPSE_MACAROON_SECRET_KEY", "SYNAPSE_FORM_SECRET",
           "SYNAPSE_TURN_SECRET")  # fmt: skip


def _root() -> ET.Element:
    return ET.parse(TEMPLATE).getroot()


def _configs(kind: str) -> list[ET.Element]:
    return [c for c in _root().findall("Config") if c.get("Type") == kind]


def dockerfile_env() -> dict[str, str]:
    """The runtime stage's ENV (the last stage of the Dockerfile), `NAME=value` pairs over continued lines."""
    runtime = DOCKERFILE[DOCKERFILE.rindex("\nFROM ") :]
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", runtime, re.M):
        for word in shlex.split(block.replace("\\\n", " ")):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def dockerfile_volumes() -> list[str]:
    (line,) = re.findall(r"^VOLUME (.*)$", DOCKERFILE, re.M)
    return json.loads(line)


# ---- the template's shape, as a Community Applications user meets it ----------------------------------------


def test_metadata_a_community_applications_user_expects():
    root = _root()
    assert root.tag == "Container" and root.get("version") == "2"
    for tag in ("Name", "Repository", "Overview", "Category", "Icon", "Support", "Project", "WebUI"):
        assert (root.findtext(tag) or "").strip(), f"<{tag}> is empty"
    for tag in ("Icon", "Support", "Project"):
        assert root.findtext(tag, "").startswith("https://"), tag
    assert re.fullmatch(r"(\w+:\w+ ?)+", root.findtext("Category", "")), root.findtext("Category")
    # The WebUI link names the public port by its container port, as Unraid substitutes it.
    assert "[PORT:8008]" in root.findtext("WebUI", "")


def test_no_default_is_prose_and_no_secret_has_one():
    for config in _root().findall("Config"):
        default = config.get("Default", "")
        assert "<" not in default and ">" not in default, (config.get("Name"), default)
        if config.get("Type") == "Variable":
            assert " " not in default or config.get("Target") == "SYNAPSE_COMPRESSOR_SCHEDULE", config.get("Name")
    for config in _configs("Variable"):
        if config.get("Target") in SECRET_NAMES:
            assert config.get("Default") == "" and not config.text, config.get("Target")
            assert config.get("Mask") == "true", config.get("Target")
    assert set(SECRETS) <= SECRET_NAMES


def test_every_variable_once_and_only_the_two_the_form_requires():
    variables = [c.get("Target") for c in _configs("Variable")]
    assert variables == list(VARIABLES)
    required = {c.get("Target") for c in _configs("Variable") if c.get("Required") == "true"}
    assert required == set(NEW_USER)


def test_a_path_for_every_volume_of_the_image():
    paths = {c.get("Target"): c for c in _configs("Path")}
    for volume in dockerfile_volumes():
        assert volume in paths, f"VOLUME {volume} has no Path in the template: Unraid would make it anonymous"
        assert paths[volume].get("Default", "").startswith("/mnt/user/appdata/"), volume
    # The original image documented /data/media_store as an optional mapping: offered, empty (not mounted).
    assert paths["/data/media_store"].get("Default") == "" and paths["/data/media_store"].get("Required") == "false"


def test_variables_the_image_sets_default_to_the_images_value():
    """Unraid sends every variable, so an empty one would replace the image's ENV: such a Default must be the
    image's value (PROMETHEUS_STORAGE_PATH=/var/lib/prometheus, the volume the template maps)."""
    image_env = dockerfile_env()
    defaults = {c.get("Target"): c.get("Default") for c in _configs("Variable")}
    ours = {name: value for name, value in image_env.items() if name in VARIABLES}
    assert ours, "the Dockerfile sets none of our variables?"
    for name, value in ours.items():
        assert defaults[name] == value, name


def test_a_new_user_publishes_only_the_public_port():
    command = xml_to_command(TEMPLATE, NEW_USER)
    assert command.ports == [("8008", "8008", "tcp")]
    assert [target for _host, target, _mode in command.volumes] == ["/data", "/var/lib/prometheus", "/backups"]
    assert command.extra == ["--stop-timeout=30"] and command.post_args == []
    for name in SECRETS:
        assert command.env[name] == ""  # the program generates them
    assert "generated" not in command.env.values()
    assert command.env["SYNAPSE_MAX_UPLOAD_SIZE"] == ""  # an existing homeserver.yaml's limit stays
    # The optional ports, once filled in: published as Unraid publishes them.
    filled = {**NEW_USER, "TLS port": "8448", "TURN port (UDP)": "3478", "TURN port (TCP)": "3478"}
    assert xml_to_command(TEMPLATE, filled).ports == [
        ("8008", "8008", "tcp"), ("8448", "8448", "tcp"), ("3478", "3478", "udp"), ("3478", "3478", "tcp"),
    ]  # fmt: skip
    # On the host network: no -p, the host ports as variables.
    host = xml_to_command(TEMPLATE, {**NEW_USER, "Public port": "8010"}, network="host")
    assert host.ports == [] and host.env["TCP_PORT_8008"] == "8010" and "TCP_PORT_8448" not in host.env


# ---- clearing a field gives what leaving the variable unset gives ----------------------------------------------


class _Binaries(dict):
    def __missing__(self, key: str) -> str:
        return f"/usr/bin/{key}"


def outcome(env: dict[str, str]) -> tuple:
    """Everything the program makes of an environment: the parsed settings (the secrets it stores among them),
    the plan, every file `run` writes (supervisord.conf included) with its mode and, for private files, the
    secret lines it gets, and the warnings `run` prints at start (in a container)."""
    plan = load_plan(env)
    progs = programs(plan, True, _Binaries(), postgres_user=("postgres", 101, 101), coturn_user=(102, 102),
                     prometheus_user=(103, 103))  # fmt: skip
    files = render_all(plan, progs, as_root=True)
    plan_json = json.dumps(plan.as_json(), sort_keys=True, default=str)
    warnings = start_warnings(plan, env, replace(facts_here(plan, env), in_container=True))
    return plan.settings, plan_json, files.managed, files.once, files.private, warnings


class Container:
    """The container's view mapped onto a temp dir: /data and the runtime dir are the test's directories."""

    def __init__(self, root: Path) -> None:
        self.data, self.run = root / "data", root / "run"
        self.data.mkdir()
        self.map = {"/data": str(self.data), "/run/synapse-workers": str(self.run)}

    def host(self, value: str) -> str:
        for inside, outside in self.map.items():
            if value == inside or value.startswith(inside + "/"):
                return outside + value[len(inside) :]
        return value

    def env(self, given: dict[str, str]) -> dict[str, str]:
        """The image's ENV, then what was given (as `-e` does), paths mapped; the program's own default for
        the runtime dir is mapped too (it is a path in the container)."""
        env = {"SYNAPSE_RUNTIME_DIR": "/run/synapse-workers", **dockerfile_env(), **given}
        return {key: self.host(value) for key, value in env.items()}


def _original_image_data(container: Container) -> None:
    """/data as the original synapse-workers image leaves it: its own upload limit, a PostgreSQL database,
    a client+federation listener on 8008 and the historical federation listener on 8448."""
    data = container.data
    config = {
        "server_name": "matrix.example.org",
        "pid_file": f"{data}/homeserver.pid",
        "report_stats": False,
        "signing_key_path": f"{data}/matrix.example.org.signing.key",
        "media_store_path": f"{data}/media_store",
        "max_upload_size": "200M",
        "registration_shared_secret": "an-old-secret-the-user-chose-long-ago",
        "macaroon_secret_key": "another-old-secret-of-the-original-image",
        "form_secret": "a-third-old-secret-of-the-original-image",
        "log_config": f"{data}/matrix.example.org.log.config",
        "listeners": [
            {"port": 8008, "type": "http", "tls": False, "x_forwarded": True, "bind_addresses": ["0.0.0.0"],
             "resources": [{"names": ["client", "federation"], "compress": False}]},
            {"port": 8448, "type": "http", "tls": False, "x_forwarded": True, "bind_addresses": ["0.0.0.0"],
             "resources": [{"names": ["federation"], "compress": False}]},
        ],
        "database": {"name": "psycopg2", "args": {"user": "synapse", "password": "pg-password-of-old",
                                                  "database": "synapse", "host": "postgres", "port": 5432}},
        "trusted_key_servers": [{"server_name": "matrix.org"}],
    }  # fmt: skip
    (data / "homeserver.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (data / "matrix.example.org.signing.key").write_text("ed25519 a_abcd AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n")
    (data / "matrix.example.org.log.config").write_text("version: 1\n")


SCENARIOS = {
    # name: (what the user typed in the form, the form's network, what /data holds)
    "new server": (NEW_USER, "bridge", None),
    "new server with workers": ({**NEW_USER, "SYNAPSE_WORKER_TYPES": "synchrotron:2, media_repository"}, "bridge",
                                None),
    "original image's /data": ({"SYNAPSE_WORKER_TYPES": "synchrotron"}, "bridge", _original_image_data),
    "host network, TLS": ({**NEW_USER, "Public port": "8010", "TLS port": "8450", "SYNAPSE_TLS_CERT": "/data/c.pem",
                           "SYNAPSE_TLS_KEY": "/data/k.pem"}, "host", None),
}  # fmt: skip


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_clearing_any_field_gives_what_leaving_it_unset_gives(tmp_path, scenario):
    filled, network, prepare = SCENARIOS[scenario]
    container = Container(tmp_path)
    for name in ("c.pem", "k.pem"):
        (container.data / name).write_text("PEM\n")
    if prepare:
        prepare(container)
    command = xml_to_command(TEMPLATE, filled, network=network)
    defaults = {c.get("Target"): c.get("Default", "") for c in _configs("Variable")}
    # What `docker run` would get with only what the user filled in and Unraid's own variables (TZ, HOST_OS,
    # TCP_PORT_* on the host network): every other variable of ours unset.
    given = {name: value for name, value in command.env.items() if name not in defaults or name in filled}
    unset = outcome(container.env(given))
    differ = []
    for name, default in defaults.items():
        if name in filled:
            continue
        try:
            got = outcome(container.env({**given, name: default}))
        except UserError as exc:
            differ.append(f"{name}={default!r}: refused: {exc.problems}")
            continue
        if got != unset:
            parts = ("settings", "plan", "managed", "once", "private", "warnings")
            what = [label for label, a, b in zip(parts, got, unset, strict=True) if a != b]
            differ.append(f"{name}={default!r}: the {', '.join(what)} differ from leaving it unset")
    assert not differ, "\n".join(differ)
    # ... and the whole form at once, as Unraid sends it.
    assert outcome(container.env(command.env)) == unset


# ---- Unraid's own variables --------------------------------------------------------------------------------------


def test_unraids_own_variables_are_accepted_without_a_warning(tmp_path, capsys):
    container = Container(tmp_path)
    command = xml_to_command(TEMPLATE, NEW_USER, network="host")
    assert {"TZ", "HOST_OS", "TCP_PORT_8008"} <= set(command.env)
    assert cli_main(["plan", "--json"], env=container.env(command.env)) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["public"]["port"] == 8008
    assert captured.err == "", captured.err  # no warning: TZ, HOST_OS and TCP_PORT_* are Unraid's, not typos


def test_host_network_listens_on_the_host_port_unraid_passes(tmp_path, capsys):
    """On the host network Unraid publishes nothing and passes TCP_PORT_8008=<the form's host port>: nginx must
    listen there. SYNAPSE_HTTP_PORT, when set, still wins."""
    container = Container(tmp_path)
    command = xml_to_command(TEMPLATE, {**NEW_USER, "Public port": "8010"}, network="host")
    assert load_plan(container.env(command.env)).public.port == 8010
    explicit = xml_to_command(TEMPLATE, {**NEW_USER, "SYNAPSE_HTTP_PORT": "8020"}, network="host")
    assert explicit.env["TCP_PORT_8008"] == "8008"
    assert load_plan(container.env(explicit.env)).public.port == 8020
    # The TLS listener's port too, when there is one.
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("PEM\n")
    tls = {**NEW_USER, "TLS port": "8450", "SYNAPSE_TLS_CERT": f"{tmp_path}/cert.pem",
           "SYNAPSE_TLS_KEY": f"{tmp_path}/key.pem"}  # fmt: skip
    tls_command = xml_to_command(TEMPLATE, tls, network="host")
    assert tls_command.env["TCP_PORT_8448"] == "8450"
    assert load_plan(container.env(tls_command.env)).public.tls_port == 8450
    bad = xml_to_command(TEMPLATE, {**NEW_USER, "Public port": "80x"}, network="host")
    assert cli_main(["plan"], env=container.env(bad.env)) == 2
    err = capsys.readouterr().err
    assert "TCP_PORT_8008" in err and "Traceback" not in err


def test_the_emulation_builds_what_the_reference_describes():
    """tests/support/unraid.py itself, on a small template, against the rules of unraid-dockerman.md."""
    template = """<?xml version="1.0"?>
<Container version="2">
  <Name>demo</Name><Repository>demo:1</Repository><Network>bridge</Network>
  <ExtraParams>--stop-timeout=30 --tmpfs /run</ExtraParams><PostArgs>-m synapse.app.homeserver</PostArgs>
  <Config Name="Web" Target="80" Default="8080" Mode="tcp" Type="Port"></Config>
  <Config Name="Stun" Target="3478" Default="" Mode="udp" Type="Port">3479</Config>
  <Config Name="Unused" Target="443" Default="" Mode="tcp" Type="Port"></Config>
  <Config Name="Data" Target="/data" Default="/mnt/a" Mode="rw" Type="Path">/mnt/b</Config>
  <Config Name="Media" Target="/media" Default="" Mode="ro" Type="Path"></Config>
  <Config Name="A" Target="A" Default="from-default" Type="Variable"></Config>
  <Config Name="B" Target="B" Default="" Type="Variable"></Config>
  <Config Name="C" Target="C" Default="x" Type="Variable">&lt;b&gt;bold&lt;/b&gt;</Config>
</Container>"""
    bridge = xml_to_command(template, {"B": "typed"})
    assert bridge.argv() == [
        "create", "--name=demo", "--net=bridge",
        "-e", "TZ=Europe/Berlin", "-e", "HOST_OS=Unraid", "-e", "A=from-default", "-e", "B=typed", "-e", "C=bbold/b",
        "-p", "8080:80/tcp", "-p", "3479:3478/udp",
        "-v", "/mnt/b:/data:rw",
        "--stop-timeout=30", "--tmpfs", "/run", "demo:1", "-m", "synapse.app.homeserver",
    ]  # fmt: skip
    assert xml_to_command(template).env["B"] == ""  # empty, and still passed
    host = xml_to_command(template, network="host")
    assert host.ports == [] and host.env["TCP_PORT_80"] == "8080" and host.env["UDP_PORT_3478"] == "3479"
    assert "TCP_PORT_443" not in host.env
