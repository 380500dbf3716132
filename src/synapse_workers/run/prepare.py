"""Before the first program starts: directories, ownership, the embedded cluster. The launcher's I/O."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import UserError
from ..plan import Plan
from . import postgres


def prepare(plan: Plan, as_root: bool, setpriv: str) -> None:
    layout, core = plan.layout, plan.settings.core
    state = Path(layout.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)  # the supervisor socket, captured output and status: root (the launcher) only
    Path(layout.redis_dir).mkdir(exist_ok=True)
    data = Path(core.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    if as_root:
        os.chown(layout.redis_dir, core.uid, core.gid)
        _own_tree(data, core.uid, core.gid, skip={plan.postgres.data_dir} if plan.postgres else set())
        _check_readable(plan.homeserver.path, core.uid, core.gid)
    if plan.postgres:
        postgres.prepare_cluster(plan, as_root, setpriv)
    socket = Path(layout.supervisor_socket)
    if socket.exists():
        socket.unlink()  # left by a launcher that was killed: we hold the lock, so it is ours to replace


def _own_tree(root: Path, uid: int, gid: int, skip: set[str]) -> None:
    """Give the data dir to UID:GID. A full walk only when the top is not theirs yet (first start)."""
    st = root.stat()
    if (st.st_uid, st.st_gid) == (uid, gid):
        return
    for path, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(path, d) not in skip]
        os.chown(path, uid, gid)
        for name in names:
            os.chown(os.path.join(path, name), uid, gid, follow_symlinks=False)


def _check_readable(path: str, uid: int, gid: int) -> None:
    st = os.stat(path)
    mode = st.st_mode
    readable = (
        (st.st_uid == uid and mode & stat.S_IRUSR) or (st.st_gid == gid and mode & stat.S_IRGRP) or mode & stat.S_IROTH
    )
    if not readable:
        raise UserError(
            f"{path} is not readable by UID={uid}/GID={gid}, which Synapse runs as: "
            f"chown {uid}:{gid} it, or set UID/GID to its owner."
        )
