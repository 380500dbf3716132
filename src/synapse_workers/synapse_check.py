"""Run Synapse's own config loader over each process's --config-path files, as Synapse would at start-up.

Used by `synapse-workers check` in a child process (importing Synapse costs a second or two and
registers global metrics, so it stays out of the CLI process). Input: JSON on stdin,
[{"name": ..., "app": ..., "config_files": [...]}, ...]; output: one JSON line per process. With arguments,
`python -m synapse_workers.synapse_check APP CONFIG...` checks one process (the exported Kubernetes pods'
init step) and prints its error, if any.
Mirrors synapse/app/homeserver.py and generic_worker.py (1.163.2) up to the point where they would
open the database, plus the listener checks start_listening() makes.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

MAIN_APP = "synapse.app.homeserver"
WORKER_APPS = (
    "synapse.app.appservice",
    "synapse.app.client_reader",
    "synapse.app.event_creator",
    "synapse.app.federation_reader",
    "synapse.app.federation_sender",
    "synapse.app.frontend_proxy",
    "synapse.app.generic_worker",
    "synapse.app.media_repository",
    "synapse.app.pusher",
    "synapse.app.synchrotron",
    "synapse.app.user_dir",
)


def check_process(app: str, config_files: list[str]) -> str | None:
    """None when Synapse would accept the configuration, else its error text."""
    from synapse.config._base import ConfigError, format_config_error
    from synapse.config.homeserver import HomeServerConfig
    from synapse.config.server import UnixListenerConfig

    argv = [arg for path in config_files for arg in ("--config-path", path)]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if app == MAIN_APP:
                config = HomeServerConfig.load_config("Synapse Homeserver", argv)
                if config.worker.worker_app:
                    return "main must not set worker_app"
                listeners = config.server.listeners
            else:
                config = HomeServerConfig.load_config("Synapse worker", argv)
                if config.worker.worker_app not in WORKER_APPS:
                    return f"worker_app {config.worker.worker_app!r} is not a generic worker app"
                listeners = config.worker.worker_listeners
                if not config.redis.redis_enabled:
                    return "workers need Redis (redis.enabled) but it is off"
        for listener in listeners:
            if isinstance(listener, UnixListenerConfig) and listener.type in ("metrics", "manhole"):
                return f"a {listener.type} listener cannot use a unix socket"
    except ConfigError as exc:
        return "".join(format_config_error(exc)).strip()
    except Exception as exc:  # Synapse raises TypeError/AssertionError for some bad configs
        return f"{type(exc).__name__}: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        if len(args) < 2:
            print("usage: python -m synapse_workers.synapse_check APP CONFIG [CONFIG...]", file=sys.stderr)
            return 2
        error = check_process(args[0], args[1:])
        print(f"{args[0]}: OK" if error is None else f"{args[0]}: {error}", file=sys.stderr)
        return 0 if error is None else 1
    processes = json.load(sys.stdin)
    failed = 0
    for proc in processes:
        error = check_process(proc["app"], proc["config_files"])
        failed += error is not None
        print(json.dumps({"name": proc["name"], "ok": error is None, "error": error}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
