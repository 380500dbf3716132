"""supervisor event listener: print every program's output line by line, prefixed with its name.

Speaks supervisor's event-listener protocol on stdin/stdout; writes the prefixed lines to stderr, which
supervisord sends to its own stdout (the container log).

The fork launcher (`run/zygote.py`, program `synapse`) relays the output of the processes it forks as
`name|line`: those lines get the forked process's own name, and are also captured per process in the state
dir (`<name>.log`, rotated like supervisord's captures), as supervisord does for its own programs.

`--masked NAME[=PATH]` (nginx: its error log quotes request lines, access tokens included): supervisord keeps no
copy of that program's output; this listener writes its capture in the state dir and, given PATH (logs on disk),
a copy there, both with tokens masked. PATH is rotated by logrotate: it is reopened once it has been renamed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .zygote import NAME as ZYGOTE

# Access tokens never reach the output, whoever printed them (nginx's error log quotes request lines).
TOKENS = re.compile(rb"(?i)(access_token=|access%5ftoken=|bearer )[^&;\s\"']+")


def mask(line: bytes) -> bytes:
    return TOKENS.sub(rb"\1<redacted>", line)


CHILD_NAME = re.compile(rb"[A-Za-z0-9_+-]{1,64}")
CAPTURE_BYTES = 1024 * 1024  # as supervisord's captures (render/supervisor.py): 1 MB, one backup
WIDTH = 18


class Captures:
    """Per-process capture files of forked processes, in supervisord's childlogdir (the 0700 state dir)."""

    def __init__(self, state_dir: str | None):
        self.state_dir = state_dir
        self.files: dict[bytes, tuple[int, int]] = {}  # name → (fd, size)

    def write(self, name: bytes, lines: list[bytes]) -> None:
        if not self.state_dir:
            return
        path = f"{self.state_dir}/{name.decode()}.log"
        fd, size = self.files.get(name, (-1, 0))
        try:
            if fd < 0:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
                size = os.fstat(fd).st_size
            data = b"".join(line + b"\n" for line in lines)
            os.write(fd, data)
            size += len(data)
            if size > CAPTURE_BYTES:
                os.close(fd)
                os.replace(path, path + ".1")
                fd, size = -1, 0
            self.files[name] = (fd, size)
        except OSError:
            self.files.pop(name, None)


class Copy:
    """An append-only file that someone else rotates (renames): reopened when the path no longer names it (one
    stat per write: the programs masked here write little)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def write(self, lines: list[bytes]) -> None:
        try:
            if self.fd >= 0 and not self._still_ours():
                os.close(self.fd)
                self.fd = -1
            if self.fd < 0:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
            os.write(self.fd, b"".join(line + b"\n" for line in lines))
        except OSError:
            if self.fd >= 0:
                os.close(self.fd)
            self.fd = -1

    def _still_ours(self) -> bool:
        try:
            named, ours = os.stat(self.path, follow_symlinks=False), os.fstat(self.fd)
        except OSError:
            return False
        return (named.st_dev, named.st_ino) == (ours.st_dev, ours.st_ino)


def state_dir_from_env() -> str | None:
    """supervisord tells its listeners where its control socket is: in the state dir, with the captures."""
    url = os.environ.get("SUPERVISOR_SERVER_URL", "")
    return str(Path(url.removeprefix("unix://")).parent) if url.startswith("unix://") else None


def split_forked(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The zygote's `name|line` lines → (name, line); its own lines (and anything unexpected) keep its name."""
    result = []
    for line in lines:
        name, sep, rest = line.partition(b"|")
        if sep and CHILD_NAME.fullmatch(name) and name != ZYGOTE.encode():
            result.append((name, rest))
        else:
            result.append((ZYGOTE.encode(), rest if sep and name == ZYGOTE.encode() else line))
    return result


FORWARDED = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH")


def wrap(command: list[str]) -> int:
    """`synapse-workers mask-output -- COMMAND`: run COMMAND with its stdout and stderr, tokens masked, on our stderr;
    signals forwarded to it; its exit status ours (128 + N when a signal killed it). For exported deployments,
    where nginx's error log would otherwise reach the container's log as it is."""
    import signal
    import subprocess

    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:  # as a shell says it: 127 not found, 126 not executable
        print(f"synapse-workers: mask-output: {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    for name in FORWARDED:
        signal.signal(getattr(signal, name), lambda signum, frame: proc.send_signal(signum))
    assert proc.stdout is not None
    out = sys.stderr.buffer
    for line in iter(proc.stdout.readline, b""):
        out.write(mask(line.rstrip(b"\n")) + b"\n")
        out.flush()
    code = proc.wait()
    return 128 - code if code < 0 else code


def _masked(argv: list[str] | None) -> dict[bytes, Copy | None]:
    parser = argparse.ArgumentParser(prog="logprefix")
    parser.add_argument("--masked", action="append", default=[], metavar="NAME[=PATH]")
    masked: dict[bytes, Copy | None] = {}
    for item in parser.parse_args(argv).masked:
        name, _, path = item.partition("=")
        masked[name.encode()] = Copy(path) if path else None
    return masked


def main(argv: list[str] | None = None) -> None:
    stdin, stdout, out = sys.stdin.buffer, sys.stdout.buffer, sys.stderr.buffer
    partial: dict[bytes, bytes] = {}
    captures = Captures(state_dir_from_env())
    masked = _masked(argv)
    while True:
        stdout.write(b"READY\n")
        stdout.flush()
        header_line = stdin.readline()
        if not header_line:
            return
        header = dict(item.split(b":", 1) for item in header_line.split())
        payload = stdin.read(int(header[b"len"]))
        meta, _, data = payload.partition(b"\n")
        fields = dict(item.split(b":", 1) for item in meta.split())
        name = fields.get(b"processname", b"?")
        text = partial.pop(name, b"") + data
        *lines, rest = text.split(b"\n")
        if rest:
            partial[name] = rest
        if lines and name == ZYGOTE.encode():
            named = split_forked([mask(line) for line in lines])
            out.write(b"".join(child.ljust(WIDTH) + b"| " + line + b"\n" for child, line in named))
            out.flush()
            by_child: dict[bytes, list[bytes]] = {}
            for child, line in named:
                by_child.setdefault(child, []).append(line)
            for child, group in by_child.items():
                if child != ZYGOTE.encode():
                    captures.write(child, group)
        elif lines:
            prefix = name.ljust(WIDTH) + b"| "
            lines = [mask(line) for line in lines]
            out.write(b"".join(prefix + line + b"\n" for line in lines))
            out.flush()
            if name in masked:
                captures.write(name, lines)
                copy = masked[name]
                if copy is not None:
                    copy.write(lines)
        stdout.write(b"RESULT 2\nOK")
        stdout.flush()


if __name__ == "__main__":
    main()
