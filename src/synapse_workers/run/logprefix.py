"""supervisor event listener: print every program's output line by line, prefixed with its name.

Speaks supervisor's event-listener protocol on stdin/stdout; writes the prefixed lines to stderr, which
supervisord sends to its own stdout (the container log).
"""

from __future__ import annotations

import re
import sys

# Access tokens never reach the output, whoever printed them (nginx's error log quotes request lines).
TOKENS = re.compile(rb"(?i)(access_token=|access%5ftoken=|bearer )[^&;\s\"']+")


def mask(line: bytes) -> bytes:
    return TOKENS.sub(rb"\1<redacted>", line)


def main() -> None:
    stdin, stdout, out = sys.stdin.buffer, sys.stdout.buffer, sys.stderr.buffer
    partial: dict[bytes, bytes] = {}
    width = 18
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
        prefix = name.ljust(width) + b"| "
        if lines:
            out.write(b"".join(prefix + mask(line) + b"\n" for line in lines))
            out.flush()
        stdout.write(b"RESULT 2\nOK")
        stdout.flush()


if __name__ == "__main__":
    main()
