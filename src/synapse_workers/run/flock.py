"""One run at a time: an exclusive, non-blocking flock on a file (the compressor's and the backup's lock)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LOCKED = 75  # EX_TEMPFAIL: another run holds the lock


@contextmanager
def exclusive(path: str, what: str, error: Callable[[str, int], Exception]) -> Iterator[None]:
    """Hold `path`'s lock for the block; `error(message, code)` is raised when the file cannot be opened (code 1)
    or another `what` holds it (code LOCKED)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise error(f"cannot open the lock file {path}: {exc.strerror} (run as the stack's user)", 1) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise error(f"{what} is in progress (it holds {path}): not starting a second one", LOCKED) from None
        yield
    finally:
        os.close(fd)
