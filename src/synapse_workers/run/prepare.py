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
    if as_root:
        os.chown(layout.redis_dir, core.uid, core.gid)  # in our runtime dir
        _check_access(plan.homeserver.path, core.uid, core.gid, "r", "SYNAPSE_CONFIG_PATH")
        _check_access(core.data_dir, core.uid, core.gid, "x", "SYNAPSE_DATA_DIR")
        if not plan.homeserver.exists:  # our generated config names the media store; a user's file its own
            media = plan.settings.homeserver.media_store_path or f"{core.data_dir}/media_store"
            _check_access(media, core.uid, core.gid, "wx", "SYNAPSE_MEDIA_STORE_PATH")
        if plan.settings.logging.to_disk:
            _check_access(layout.logs_on_disk, core.uid, core.gid, "wx", "SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK")
    if plan.postgres:
        postgres.prepare_cluster(plan, as_root, setpriv)
    socket = Path(layout.supervisor_socket)
    if socket.exists():
        socket.unlink()  # left by a launcher that was killed: we hold the lock, so it is ours to replace


BITS = {
    "r": (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH),
    "w": (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH),
    "x": (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH),
}


def _check_access(path: str, uid: int, gid: int, wanted: str, variable: str) -> None:
    """Synapse runs as UID:GID and we never re-own a user's files: say what is missing instead."""
    st = os.stat(path)
    klass = 0 if st.st_uid == uid else 1 if st.st_gid == gid else 2
    missing = [w for w in wanted if not st.st_mode & BITS[w][klass]]
    if missing:
        what = {"r": "read", "w": "write", "x": "enter"}
        verbs = " and ".join(what[m] for m in missing)
        raise UserError(
            f"{path} ({variable}) is not accessible to UID={uid}/GID={gid}, which Synapse runs as: it cannot "
            f"{verbs} it. synapse-workers does not change the owner of files it did not create: "
            f"`chown {uid}:{gid} {path}`, or set UID/GID to its owner."
        )
