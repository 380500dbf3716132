"""Environment → Plan: the edge where inputs are read (homeserver.yaml, appservice dir, TLS files).

Everything after this is pure; everything here is reading only, never writing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .errors import UserError
from .homeserver import describe, read_homeserver
from .plan import Plan, make_plan
from .settings import load_settings
from .workers import parse_workers


def load_plan(env: Mapping[str, str]) -> Plan:
    settings = load_settings(env)
    workers = parse_workers(settings.worker_types)
    doc = read_homeserver(settings.homeserver_config_path)
    info = describe(settings, doc, has_workers=bool(workers))
    _check_files(settings)
    appservices = list(settings.appservices)
    if settings.as_registration_dir:
        folder = Path(settings.as_registration_dir)
        appservices += sorted(str(p) for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return make_plan(settings, info, workers, tuple(appservices))


def _check_files(settings) -> None:
    problems = []
    for name, path in (("SYNAPSE_TLS_CERT", settings.tls_cert), ("SYNAPSE_TLS_KEY", settings.tls_key)):
        if path and not os.path.isfile(path):
            problems.append(f"{name}={path!r} is invalid: expected an existing file (PEM).")
    if settings.as_registration_dir and not os.path.isdir(settings.as_registration_dir):
        problems.append(
            f"SYNAPSE_AS_REGISTRATION_DIR={settings.as_registration_dir!r} is invalid: expected an existing "
            "directory of application service registration files (*.yaml)."
        )
    for path in settings.appservices:
        if not os.path.isfile(path):
            problems.append(f"SYNAPSE_APPSERVICES names {path!r}, which is not an existing file.")
    if problems:
        raise UserError(*problems)
