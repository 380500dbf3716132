"""Unraid's dockerMan, as far as it builds a container from a template (what the template's tests consume).

An emulation of `xmlToVar` + `xmlToCommand` (unraid/webgui, emhttp/plugins/dynamix.docker.manager/include/
Helpers.php) as /work/shared/reference/unraid-dockerman.md describes them, written from that description and
not from our generator:

- each `<Config>`'s value is what the user typed in the form, else the element's text, else its `Default`;
  `<` and `>` are removed (the XSS filter);
- every `Type="Variable"` becomes `-e NAME=value`, empty ones too; Unraid adds `TZ` and `HOST_OS=Unraid`;
- `Type="Port"`: on a bridge network `-p host:container/mode` when the host side is not empty; on `host` or
  `macvlan` no `-p`, but a variable `<MODE>_PORT_<container port>=<host port>`;
- `Type="Path"`: `-v host:target:mode`, skipped when the host side is empty; a missing host directory is
  created (owned 99:100, nobody:users, mode 0777 requested) before the container starts;
- `ExtraParams` go before the image name, `PostArgs` after it.
"""

from __future__ import annotations

import os
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

UNRAID_TZ = "Europe/Berlin"  # a server's time zone, as Unraid passes it
NOBODY_USERS = (99, 100)


def _clean(text: str | None) -> str:
    return (text or "").replace("<", "").replace(">", "")


@dataclass
class UnraidCommand:
    name: str
    network: str
    image: str
    env: dict[str, str] = field(default_factory=dict)  # in the order of the -e options
    ports: list[tuple[str, str, str]] = field(default_factory=list)  # (host, container, mode)
    volumes: list[tuple[str, str, str]] = field(default_factory=list)  # (host, target, mode)
    extra: list[str] = field(default_factory=list)
    post_args: list[str] = field(default_factory=list)

    def argv(self, verb: str = "create") -> list[str]:
        """The `docker create` (here: podman) arguments, in dockerMan's order."""
        args = [verb, f"--name={self.name}", f"--net={self.network}"]
        for key, value in self.env.items():
            args += ["-e", f"{key}={value}"]
        for host, container, mode in self.ports:
            args += ["-p", f"{host}:{container}/{mode}"]
        for host, target, mode in self.volumes:
            args += ["-v", f"{host}:{target}:{mode}"]
        return [*args, *self.extra, self.image, *self.post_args]

    def create_paths(self) -> list[Path]:
        """What Unraid does before `docker create`: missing host directories made for nobody:users."""
        made = []
        for host, _target, _mode in self.volumes:
            path = Path(host)
            if path.exists():
                continue
            path.mkdir(parents=True, mode=0o777)
            os.chown(path, *NOBODY_USERS)
            made.append(path)
        return made


def xml_to_command(
    template: str | Path,
    filled: Mapping[str, str] = {},
    *,
    network: str | None = None,
    name: str | None = None,
    image: str | None = None,
    tz: str = UNRAID_TZ,
) -> UnraidCommand:
    """The container dockerMan makes from the template; `filled`: what the user typed, by Config Name (or
    Target for variables), overriding the template's value; network: the form's Network Type."""
    root = ET.parse(template).getroot() if isinstance(template, Path) else ET.fromstring(template)
    network = network or _clean(root.findtext("Network")) or "bridge"
    command = UnraidCommand(
        name=name or _clean(root.findtext("Name")),
        network=network,
        image=image or _clean(root.findtext("Repository")),
    )
    command.env["TZ"] = tz
    command.env["HOST_OS"] = "Unraid"
    for config in root.findall("Config"):
        key = config.get("Name", "")
        given = filled.get(key, filled.get(config.get("Target", ""), config.text or ""))
        value = _clean(given) or _clean(config.get("Default"))
        target, mode, kind = _clean(config.get("Target")), _clean(config.get("Mode")), config.get("Type")
        if kind == "Variable":
            command.env[target] = value
        elif kind == "Port":
            if not value:
                continue  # an unmapped port is not published
            if network in ("host", "macvlan"):
                command.env[f"{mode.upper()}_PORT_{target}"] = value
            else:
                command.ports.append((value, target, mode))
        elif kind == "Path" and value:  # an empty host side is skipped
            command.volumes.append((value, target, mode or "rw"))
    command.extra = shlex.split(_clean(root.findtext("ExtraParams")))
    command.post_args = shlex.split(_clean(root.findtext("PostArgs")))
    return command
