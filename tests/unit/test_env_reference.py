"""`env`, `env --json`, the README variable reference and the Unraid template all come from the settings
model: the committed files must be what the generator writes now. The template itself is tested against its
consumers (Unraid's command building and the program) in test_unraid_template.py and
tests/integration/test_unraid.py."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from synapse_workers.cli import main as cli_main
from synapse_workers.export_env import README_BEGIN, README_END, UNRAID_PATH, generated_files
from synapse_workers.settings import VARIABLES

REPO = Path(__file__).resolve().parents[2]
HINT = "regenerate with: python -m synapse_workers.export_env"


def env_json(capsys, env: dict[str, str]) -> list[dict]:
    assert cli_main(["env", "--json"], env=env) == 0
    return json.loads(capsys.readouterr().out)


def test_every_variable_has_a_one_line_meaning():
    for name, variable in VARIABLES.items():
        assert variable.help, f"{name} has no help= in settings.py"
        assert "\n" not in variable.help and len(variable.help) <= 160, name
        assert "\n" not in variable.default_text, name


def test_committed_readme_and_unraid_template_are_current():
    for path, content in generated_files(REPO).items():
        assert path.exists(), f"{path} is missing: {HINT}"
        assert path.read_text() == content, f"{path.relative_to(REPO)} drifted from settings.py: {HINT}"


def test_readme_block_lists_every_variable_once():
    text = (REPO / "README.md").read_text()
    block = text[text.index(README_BEGIN) : text.index(README_END)]
    for name in VARIABLES:
        assert block.count(f"| `{name}` |") == 1, name


def test_env_json_lists_every_variable_with_default_meaning_and_value(capsys):
    env = {"SYNAPSE_SERVER_NAME": "example.test", "POSTGRES_PASSWORD": "s3cret-pw", "SYNAPSE_METRICS": "yes"}
    entries = env_json(capsys, env)
    assert [e["name"] for e in entries] == list(VARIABLES)
    by_name = {e["name"]: e for e in entries}
    assert by_name["SYNAPSE_SERVER_NAME"] == {
        "name": "SYNAPSE_SERVER_NAME",
        "section": "core",
        "default": "",
        "description": VARIABLES["SYNAPSE_SERVER_NAME"].help,
        "value": "example.test",
        "set": True,
        "secret": False,
        "boolean": False,
    }
    assert by_name["POSTGRES_PASSWORD"]["value"] == "<hidden>" and by_name["POSTGRES_PASSWORD"]["secret"]
    assert by_name["SYNAPSE_METRICS"]["value"] == "yes" and by_name["SYNAPSE_METRICS"]["boolean"]
    assert by_name["SYNAPSE_CONFIG_DIR"]["value"] is None and not by_name["SYNAPSE_CONFIG_DIR"]["set"]
    assert by_name["SYNAPSE_CONFIG_DIR"]["default"] == "/data"
    assert by_name["NGINX_CLIENT_KEEPALIVE_ENABLE"]["default"] == "on"
    assert by_name["SYNAPSE_HTTP_PORT"]["default"].startswith("8008")
    assert "s3cret-pw" not in json.dumps(entries)


def test_env_text_is_an_env_file_with_meanings_and_masked_secrets(capsys):
    env = {"SYNAPSE_SERVER_NAME": "example.test", "SYNAPSE_FORM_SECRET": "form-s3cret"}
    assert cli_main(["env"], env=env) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "SYNAPSE_SERVER_NAME=example.test" in lines
    assert "SYNAPSE_FORM_SECRET=<hidden>" in lines and "form-s3cret" not in out
    assert "#SYNAPSE_CONFIG_DIR=/data" in lines  # unset: commented out, with its default
    for name, variable in VARIABLES.items():
        at = next(i for i, line in enumerate(lines) if line.lstrip("#").startswith(f"{name}="))
        assert lines[at - 1].startswith(f"# {variable.help}"), name


def test_export_env_check_mode_reports_drift(tmp_path):
    from synapse_workers.export_env import main as export_main

    (tmp_path / "README.md").write_text(f"intro\n{README_BEGIN}\nstale\n{README_END}\nrest\n")
    assert export_main(["--check", str(tmp_path)]) == 1
    assert export_main([str(tmp_path)]) == 0
    assert export_main(["--check", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("intro\n") and text.endswith(f"{README_END}\nrest\n") and "stale" not in text
    assert ET.parse(tmp_path / UNRAID_PATH).getroot().tag == "Container"
