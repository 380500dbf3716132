"""Arguments a template carries for the official image (Unraid's Post Arguments replace the image's CMD `run`):
the stack starts with a warning naming what was ignored; our own commands parse exactly as before.

The official image's arguments are those of its start.py (`run [synapse args]`, `generate`, `migrate_config`)
and of Synapse's own parser (`-m MODULE`, `-c/--config-path FILE`, `--keys-directory DIR`, ...); the cases
below are copied from such templates and from start.py's documentation, not from our code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synapse_workers import cli
from synapse_workers.official_args import starts_stack, translate

ENTRYPOINT_CHECK = [sys.executable, "-m", "synapse_workers.official_args"]


def parsed(argv: list[str]):
    return cli._parser().parse_args(argv)


OFFICIAL_STARTS = [
    ["-m", "synapse.app.homeserver"],
    ["-msynapse.app.homeserver"],
    ["-m", "synapse.app.homeserver", "--config-path", "/data/homeserver.yaml"],
    ["-m", "synapse.app.homeserver", "-c", "/data/homeserver.yaml", "--keys-directory", "/data"],
    ["--config-path=/data/homeserver.yaml"],
    ["-c/data/homeserver.yaml"],
    ["--keys-directory", "/data", "--generate-keys"],
    ["run"] + ["-m", "synapse.app.homeserver"],
    ["run", "--config-path", "/data/homeserver.yaml"],
    ["run", "--host", "front", "-m", "synapse.app.homeserver"],
    ["-m", "synapse.app.homeserver", "--no-redirect-stdio", "-D"],
]


@pytest.mark.parametrize("argv", OFFICIAL_STARTS, ids=" ".join)
def test_official_arguments_start_the_stack_with_a_warning_naming_them(argv):
    env = {"SYNAPSE_CONFIG_DIR": "/data"}
    translation = translate(argv, env)
    assert translation is not None
    args = parsed(translation.argv)  # the real parser accepts what they become
    assert args.func is cli.cmd_run
    assert args.host == ("front" if "--host" in argv else None)
    ignored = [w for w in argv if w not in ("run", "--host", "front")]
    assert len(translation.warnings) == 1
    assert "`" + ("run " if argv[0] == "run" else "") + " ".join(ignored) + "`" in translation.warnings[0]
    assert translation.env == {}  # /data/homeserver.yaml is the file read anyway
    assert starts_stack(argv, env)


OURS = [
    ["run"],
    ["run", "--host", "front"],
    ["generate"],
    ["check", "--host", "a"],
    ["plan", "--json"],
    ["env"],
    ["env", "--json"],
    ["routes", "GET", "/_matrix/client/v3/sync"],
    ["status"],
    ["health"],
    ["export", "compose", "-o", "/tmp/x"],
    ["mask-output", "--", "nginx", "-c", "/x"],
    ["--version"],
    ["--help"],
    ["-h"],
    ["unraid-template"],
]


@pytest.mark.parametrize("argv", OURS, ids=" ".join)
def test_our_own_commands_are_left_as_they_are(argv):
    assert translate(argv, {}) is None
    assert starts_stack(argv, {}) == (argv[0] == "run")


def test_run_through_main_reaches_run_and_warns(tmp_path, capsys):
    """`-m synapse.app.homeserver` through cli.main: the warning, then `run` itself (here it stops at the
    missing SYNAPSE_SERVER_NAME, which only run's planning reports), not argparse's 'invalid choice'."""
    env = {"SYNAPSE_CONFIG_DIR": str(tmp_path), "SYNAPSE_DATA_DIR": str(tmp_path)}
    env["SYNAPSE_RUNTIME_DIR"] = str(tmp_path / "run")
    code = cli.main(["-m", "synapse.app.homeserver"], env)
    err = capsys.readouterr().err
    assert code == 2
    assert "synapse-workers: warning: ignored the arguments `-m synapse.app.homeserver`" in err
    assert "SYNAPSE_SERVER_NAME is required" in err and "invalid choice" not in err
    assert list(tmp_path.iterdir()) == []


def test_config_path_argument_is_honoured_when_the_variable_is_unset(tmp_path, capsys):
    """The official image starts Synapse with the file --config-path names: so do we (as SYNAPSE_CONFIG_PATH).
    The file's server_name differs from SYNAPSE_SERVER_NAME here, so planning stops naming that file: proof
    that it was the one read."""
    config = tmp_path / "conf" / "homeserver.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"server_name": "other.test"}))
    env = {
        "SYNAPSE_SERVER_NAME": "example.test",
        "SYNAPSE_CONFIG_DIR": str(tmp_path / "data"),
        "SYNAPSE_DATA_DIR": str(tmp_path / "data"),
        "SYNAPSE_RUNTIME_DIR": str(tmp_path / "run"),
        "SYNAPSE_CONFIG_PATH": "",  # Unraid passes every variable, empty ones too: empty is unset
    }
    code = cli.main(["run", "-m", "synapse.app.homeserver", "--config-path", str(config)], env)
    err = capsys.readouterr().err
    assert code == 2
    assert f"--config-path {config}: used as SYNAPSE_CONFIG_PATH={config}" in err
    assert f"differs from server_name 'other.test' in {config}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]  # nothing written


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--config-path", "/data/a.yaml"], {"SYNAPSE_CONFIG_PATH": "/data/b.yaml"},
         "--config-path /data/a.yaml and SYNAPSE_CONFIG_PATH=/data/b.yaml name different files"),
        (["-c", "/data/a.yaml", "-c", "/data/b.yaml"], {}, "--config-path given 2 times (/data/a.yaml, /data/b.yaml)"),
        (["-c", "homeserver.yaml"], {}, "--config-path homeserver.yaml: expected an absolute path"),
        (["-m", "synapse.app.generic_worker", "-c", "/data/w.yaml"], {},
         "-m synapse.app.generic_worker: this image runs main and every worker itself"),
        (["-m", "synapse.app.homeserver", "--generate-config", "-H", "x", "--report-stats", "no"], {},
         "--generate-config (an option of Synapse's) cannot be followed here: it writes a new homeserver.yaml"),
        (["-m", "synapse.app.homeserver", "--bogus"], {},
         "--bogus: not an argument of synapse-workers nor of the official Synapse image"),
        (["run", "-m", "synapse.app.homeserver", "--bogus", "x"], {},
         "--bogus x: not an argument of synapse-workers nor of the official"),
        (["-m", "synapse.app.homeserver", "-d", "/data/homeserver.db"], {},
         "-d /data/homeserver.db (an option of Synapse's) cannot be followed here: it replaces the database"),
    ],
)
def test_official_arguments_that_cannot_be_followed_are_refused(argv, env, expected, tmp_path, capsys):
    """Exit 2 with the argument named, before anything is read or written: one of two files would be ignored,
    or the arguments ask for something else than a start (a config generated, a single worker)."""
    full = {"SYNAPSE_CONFIG_DIR": str(tmp_path), "SYNAPSE_RUNTIME_DIR": str(tmp_path / "run"), **env}
    assert cli.main(argv, full) == 2
    err = capsys.readouterr().err
    assert f"synapse-workers: error: {expected}" in err, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []
    assert not starts_stack(argv, full)


def test_migrate_config_means_generate(tmp_path, capsys):
    """start.py's migrate_config writes homeserver.yaml from the environment and exits: our `generate`."""
    translation = translate(["migrate_config"], {})
    assert translation is not None and parsed(translation.argv).func is cli.cmd_generate
    assert "`migrate_config` is the official image's" in translation.warnings[0]
    assert not starts_stack(["migrate_config"], {})


def test_the_entrypoint_asks_the_same_question(tmp_path):
    """scripts/container-entrypoint.sh runs `python3 -m synapse_workers.official_args "$@"` before its one-time
    step for `run`: exit 0 exactly when the arguments start the stack."""
    for argv, starts in ((["run"], True), (["-m", "synapse.app.homeserver"], True), (["env"], False),
                         (["-m", "synapse.app.generic_worker"], False), (["generate"], False)):
        result = subprocess.run([*ENTRYPOINT_CHECK, *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode == (0 if starts else 1), (argv, result.stderr)
        assert result.stdout == "" and result.stderr == ""


def test_the_entrypoint_script_uses_it():
    script = (Path(__file__).parents[2] / "scripts" / "container-entrypoint.sh").read_text()
    assert 'python3 -m synapse_workers.official_args "$@"' in script
    assert '= run ]' not in script


def test_run_with_words_of_neither_kind_is_left_to_our_parser(capsys):
    """`run --help` shows run's help and `run --bogus` is argparse's error, exactly as before."""
    assert translate(["run", "--help"], {}) is None and translate(["run", "--bogus"], {}) is None
    with pytest.raises(SystemExit) as help_exit:
        cli.main(["run", "--help"], {})
    assert help_exit.value.code == 0 and "--host NAME" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error_exit:
        cli.main(["run", "--bogus"], {})
    assert error_exit.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
