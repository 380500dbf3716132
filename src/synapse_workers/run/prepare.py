"""Before the first program starts: directories, ownership, the embedded cluster. The launcher's I/O."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from ..errors import Problem, UserError, Variable
from ..plan import PROMETHEUS, Plan, prometheus_storage
from ..programs import NGINX_WORKER_GROUP, NGINX_WORKER_USER
from . import access as files_access
from . import postgres, preflight

RUNTIME_DIR, STORAGE = Variable("SYNAPSE_RUNTIME_DIR"), Variable("PROMETHEUS_STORAGE_PATH")
UID, GID = Variable("UID"), Variable("GID")
SOCKETS = (Variable("SYNAPSE_PUBLIC_UNIX_SOCKETS"), Variable("SYNAPSE_METRICS_UNIX_SOCKETS"))
THROUGH_SOCKETS = f"Synapse's unix sockets there ({SOCKETS[0]}/{SOCKETS[1]})"  # why nginx's workers enter it


def check_before_start(plan: Plan, as_root: bool) -> None:
    """What would make the stack fail, checked on what exists now: `run` calls it before writing anything
    (so a refused start leaves no generated file behind) and again once the files and dirs exist. Every
    problem at once: ports someone holds, every path Synapse's user cannot use (run/access.py), an embedded
    cluster of a PostgreSQL major whose binaries are not installed (read only: its files stay untouched)."""
    preflight.raise_if(
        preflight.check_ports(plan)
        + files_access.check(plan, as_root)
        + dir_problems(plan, as_root)
        + postgres.version_problems(plan)
    )


def dir_problems(plan: Plan, as_root: bool) -> list[Problem]:
    """As root, on what exists now (nothing is created): the runtime dir lies under directories that Synapse's
    user (its config files, its sockets) and, with unix sockets, nginx's worker user can enter; an existing
    PROMETHEUS_STORAGE_PATH (or the dirs above a new one) the built-in Prometheus's user can use. `run` refused
    these only once it had written its files (or Synapse crash-looped on them); `check` shares this."""
    if not as_root:
        return []
    from .binaries import prometheus_user

    core, layout = plan.settings.core, plan.layout
    synapse_user = f"Synapse's user ({UID}={core.uid}/{GID}={core.gid})"
    users = [(core.uid, core.gid, synapse_user, "it reads its config files there", (UID, GID))]
    if any(lst.path for p in plan.local_processes for lst in p.listeners if lst.kind in ("public", "metrics")):
        worker = pwd.getpwnam(NGINX_WORKER_USER)
        why = f"it connects to {THROUGH_SOCKETS}"
        who = f"nginx's worker user ({NGINX_WORKER_USER})"
        users.append((worker.pw_uid, _nginx_worker_gid(worker), who, why, SOCKETS))
    problems = []
    for folder in _existing_dirs(layout.runtime_dir):
        for uid, gid, who, why, related in users:
            if not _allows(folder, uid, gid, "x"):
                problems.append(
                    Problem(
                        f"{RUNTIME_DIR}={layout.runtime_dir!r} is under {folder!r}, which {who} cannot enter: "
                        f"{why}. Use a runtime dir under a traversable path (the default /run/synapse-workers is "
                        f"one), or `chmod o+x {folder}`.",
                        RUNTIME_DIR,
                        expected=f"a runtime dir under directories {who} can enter",
                        found=f"{folder!r}, which {who} cannot enter",
                        related=related,
                    )
                )
    if plan.service(PROMETHEUS) is not None:
        uid, gid = prometheus_user(core.uid, core.gid)
        storage = prometheus_storage(plan)
        for folder in _existing_dirs(storage):
            access = "wx" if folder == os.path.normpath(storage) else "x"
            missing = [w for w in access if not _allows(folder, uid, gid, w)]
            if missing:
                verbs = " and ".join({"w": "write", "x": "enter"}[m] for m in missing)
                problems.append(_storage_problem(uid, gid, storage, folder, verbs))
    return problems


def _storage_problem(uid: int, gid: int, storage: str, folder: str, verbs: str) -> Problem:
    """PROMETHEUS_STORAGE_PATH that the built-in Prometheus (its system user's UID/GID, else Synapse's) cannot use."""
    return Problem(
        f"The built-in Prometheus (UID={uid}/GID={gid}) cannot use its storage "
        f"{STORAGE}={storage!r}: {folder!r} does not let it {verbs}. Choose a path it "
        f"can reach, or `chown {uid}:{gid} {storage}` and make the directories above it traversable "
        "(o+x).",
        STORAGE,
        expected=f"a directory {uid}:{gid} can enter and write, under directories it can enter",
        found=f"{folder!r} does not let it {verbs}",
    )


def _existing_dirs(path: str) -> list[str]:
    """`path` (when it exists) and each existing directory above it, up to /."""
    found, here = [], os.path.normpath(path)
    while True:
        if os.path.isdir(here):
            found.append(here)
        if here == "/":
            return found
        here = os.path.dirname(here)


def _allows(path: str, uid: int, gid: int, what: str) -> bool:
    """Whether UID:GID (no supplementary groups, as setpriv starts our programs) may `what` (r/w/x) on path."""
    st = os.stat(path)
    klass = 0 if st.st_uid == uid else 1 if st.st_gid == gid else 2
    return bool(st.st_mode & BITS[what][klass])


def _nginx_worker_gid(worker: pwd.struct_passwd) -> int:
    try:
        return grp.getgrnam(NGINX_WORKER_GROUP).gr_gid
    except KeyError:
        return worker.pw_gid


def prepare(plan: Plan, as_root: bool, setpriv: str, prometheus_user: tuple[int, int] | None = None) -> None:
    """prometheus_user: who the built-in Prometheus runs as (as root), the owner of the storage dir we create."""
    layout, core = plan.layout, plan.settings.core
    check_before_start(plan, as_root)
    state = Path(layout.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)  # the supervisor socket, captured output and status: root (the launcher) only
    Path(layout.redis_dir).mkdir(exist_ok=True)
    if as_root:
        os.chown(layout.redis_dir, core.uid, core.gid)  # in our runtime dir
        _prepare_sockets_dir(plan)
    if plan.postgres and plan.local("postgres"):
        postgres.prepare_cluster(plan, as_root, setpriv)
    if plan.service(PROMETHEUS) is not None:
        _prepare_prometheus_storage(plan, prometheus_user if as_root else None)
    socket = Path(layout.supervisor_socket)
    if socket.exists():
        socket.unlink()  # left by a launcher that was killed: we hold the lock, so it is ours to replace


def _prepare_sockets_dir(plan: Plan) -> None:
    """Synapse creates its sockets here; nginx's workers must reach the public and metrics ones; nobody else.

    Owner: Synapse's user; group: nginx's worker group, inherited by every socket (setgid); mode 2750."""
    core, sockets = plan.settings.core, plan.layout.sockets_dir
    worker_uid = pwd.getpwnam(NGINX_WORKER_USER).pw_uid
    try:
        worker_gid = grp.getgrnam(NGINX_WORKER_GROUP).gr_gid
    except KeyError:
        worker_gid = pwd.getpwnam(NGINX_WORKER_USER).pw_gid
    os.chown(sockets, core.uid, worker_gid)
    os.chmod(sockets, 0o2750)
    for entry in os.scandir(sockets):  # sockets left by the previous run: Synapse replaces them
        if not entry.is_dir(follow_symlinks=False):
            os.unlink(entry.path)
    if not any(lst.path for p in plan.processes for lst in p.listeners if lst.kind in ("public", "metrics")):
        return
    # nginx connects by path: every directory above the sockets dir must let its workers through.
    parent = os.path.dirname(sockets)
    while True:
        st = os.stat(parent)
        klass = 0 if st.st_uid == worker_uid else 1 if st.st_gid == worker_gid else 2
        if not st.st_mode & BITS["x"][klass]:
            who = f"nginx's worker user ({NGINX_WORKER_USER})"
            raise UserError(
                Problem(
                    f"{RUNTIME_DIR}={plan.layout.runtime_dir!r} is under {parent!r}, which {who} "
                    f"cannot enter, so it cannot reach Synapse's unix sockets ({SOCKETS[0]}/{SOCKETS[1]}): every "
                    "request would fail with 502. Use a runtime dir under a traversable path (the default "
                    f"/run/synapse-workers is one), or `chmod o+x {parent}`.",
                    RUNTIME_DIR,
                    expected=f"a runtime dir under directories {who} can enter",
                    found=f"{parent!r}, which {who} cannot enter",
                    related=SOCKETS,
                )
            )
        if parent == "/":
            return
        parent = os.path.dirname(parent)


def _prepare_prometheus_storage(plan: Plan, owner: tuple[int, int] | None) -> None:
    """The database dir: created (0700, Prometheus's user) when missing; an existing one is used as it is, if
    Prometheus's user can reach and write it (we never re-own a directory we did not create)."""
    path = Path(prometheus_storage(plan))
    if not path.exists():
        path.mkdir(parents=True)
        os.chmod(path, 0o700)
        if owner is not None:
            os.chown(path, *owner)
    if owner is None:
        return
    uid, gid = owner
    checks = [(str(path), "wx")] + [(str(p), "x") for p in path.parents]
    for where, access in checks:
        st = os.stat(where)
        klass = 0 if st.st_uid == uid else 1 if st.st_gid == gid else 2
        missing = [w for w in access if not st.st_mode & BITS[w][klass]]
        if missing:
            verbs = " and ".join({"w": "write", "x": "enter"}[m] for m in missing)
            raise UserError(_storage_problem(uid, gid, str(path), where, verbs))


BITS = {
    "r": (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH),
    "w": (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH),
    "x": (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH),
}
