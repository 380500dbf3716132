"""The embedded PostgreSQL cluster: created under the data dir, run as its own (non-root) user.

initdb refuses root, so as root the cluster belongs to the `postgres` system account (Debian's
postgresql package creates it); otherwise to whoever runs synapse-workers. Synapse connects over a unix
socket with a password kept in a libpq passfile, never in a config file or a process argument. On several
hosts (SYNAPSE_HOSTS) the cluster also listens on its host's address, for the deployment's hosts only.
"""

from __future__ import annotations

import glob
import os
import pwd
import subprocess
from pathlib import Path

from ..errors import File, Problem, Subject, UserError
from ..plan import Plan
from ..programs import child_environment, setpriv_prefix
from ..secrets import PASSFILE_SYNAPSE

HBA = """\
# Written by synapse-workers on every start.
# TYPE  DATABASE  USER      METHOD
local   all       synapse   scram-sha-256
local   all       {admin}   peer
"""


def hba_text(plan: Plan, admin: str) -> str:
    """pg_hba.conf: the socket for Synapse (password) and the admin (peer); several hosts: the deployment's
    hosts over TCP, by password, and no one else."""
    assert plan.postgres is not None
    text = HBA.format(admin=admin)
    for address in plan.postgres.clients:
        text += f"host    synapse   synapse   {address}/{32 if ':' not in address else 128}   scram-sha-256\n"
    return text


PG_ROOT = "/usr/lib/postgresql"  # Debian's: one <major>/bin per installed postgresql-<major> package


def major_key(major: str) -> tuple[int, ...]:
    """Sort key of a major: "9.6" < "14" < "15" (PG_VERSION holds "9.6" before PostgreSQL 10, the major alone since)."""
    return tuple(int(part) for part in major.split(".") if part.isdigit())


def installed_majors() -> dict[str, str]:
    """Each installed major → its bindir (one with a `postgres` binary under PG_ROOT), oldest first."""
    found = {path.split("/")[-3]: os.path.dirname(path) for path in glob.glob(f"{PG_ROOT}/*/bin/postgres")}
    return dict(sorted(found.items(), key=lambda item: major_key(item[0])))


def cluster_major(data_dir: str) -> str | None:
    """The major version that made the cluster in data_dir (its PG_VERSION), or None when there is none yet."""
    try:
        return Path(data_dir, "PG_VERSION").read_text().strip() or None
    except FileNotFoundError:
        return None


def postgres_bin(data_dir: str | None = None) -> str:
    """The server binaries for the embedded cluster in data_dir: its own major's when they are installed (a
    cluster always runs with the binaries that made it), else the newest installed (for a new cluster; an
    existing one of a major not installed is refused before anything starts: version_problems)."""
    majors = installed_majors()
    if not majors:
        raise UserError("The embedded database needs PostgreSQL server binaries (apt-get install postgresql).")
    major = cluster_major(data_dir) if data_dir else None
    return majors.get(major or "", list(majors.values())[-1])


def version_problems(plan: Plan) -> list[Problem]:
    """An existing embedded cluster made by a PostgreSQL major whose binaries are not installed: PostgreSQL
    cannot open it, so `run` and `check` refuse (exit 2) before writing or starting anything, naming both
    versions and the way forward. Reads PG_VERSION only."""
    if plan.postgres is None or not plan.local("postgres"):
        return []
    data = plan.postgres.data_dir
    major, majors = cluster_major(data), installed_majors()
    if major is None or not majors or major in majors:
        return []
    newest, bindir = list(majors.items())[-1]
    installed = ", ".join(majors)
    found = f"a cluster of PostgreSQL {major}; binaries here: {installed}"
    if major_key(major) > major_key(newest):
        return [
            Problem(
                f"The embedded PostgreSQL cluster in {data} was made by PostgreSQL {major}, newer than the binaries "
                f"installed here (PostgreSQL {installed}, {bindir}): a cluster cannot be opened by an older "
                f"PostgreSQL. Nothing was changed. Run it with PostgreSQL {major}'s binaries (the image or host it "
                "came from, or a newer one).",
                File(data),
                expected=f"PostgreSQL {major}'s binaries (or newer, after an upgrade)",
                found=found,
            )
        ]
    return [
        Problem(
            f"The embedded PostgreSQL cluster in {data} was made by PostgreSQL {major}, but this machine has "
            f"PostgreSQL {newest}'s binaries ({bindir}), which cannot open it. Nothing was changed. Either install "
            f"PostgreSQL {major}'s server binaries beside them (Debian: postgresql-{major}; any build of "
            f"{major} will do, given with --old-bindir) and run `synapse-workers upgrade-postgres` (stack stopped) "
            f"to upgrade the cluster to {newest} with pg_upgrade; or restore a backup made before the move with "
            "`synapse-workers restore PATH` into an empty data dir (its pg_dump restores into any newer major); "
            f"or go back to the image or host with PostgreSQL {major}.",
            File(data),
            expected=f"a cluster of PostgreSQL {newest}, or PostgreSQL {major}'s binaries installed",
            found=found,
        )
    ]


def version_warning(plan: Plan) -> Problem | None:
    """The cluster's own major is installed but a newer one too: it runs with its own binaries (as Debian's
    pg_ctlcluster does), and the admin is told the upgrade exists."""
    if plan.postgres is None or not plan.local("postgres"):
        return None
    data = plan.postgres.data_dir
    major, majors = cluster_major(data), installed_majors()
    if major is None or major not in majors:
        return None
    newest = list(majors)[-1]
    if major_key(newest) <= major_key(major):
        return None
    return Problem(
        f"The embedded PostgreSQL cluster in {data} is PostgreSQL {major}: it runs with {major}'s binaries "
        f"({majors[major]}), although PostgreSQL {newest} is installed too. Upgrade it when convenient: stop the "
        f"stack and run `synapse-workers upgrade-postgres` (pg_upgrade to {newest}; the old cluster is kept).",
        File(data),
        expected=f"a cluster of PostgreSQL {newest}, the newest installed",
        found=f"a cluster of PostgreSQL {major}",
    )


def dump_major_problems(
    backup: str,
    dumped: int | None,
    written_by: int | None,
    target: str,
    target_major: int | None,
    pg_restore: tuple[str, int] | None,
    subject: Subject,
) -> list[Problem]:
    """Whether a backup's dump (of a PostgreSQL `dumped` database, written by pg_dump `written_by`) can be restored
    into `target` (PostgreSQL `target_major`) with `pg_restore` (path, major): a dump goes into its own major or a
    newer one, never an older (PostgreSQL does not promise an older server loads it), and a pg_restore reads the
    archives of its own and older pg_dumps only (pg_restore 15 of pg_dump 18's: "unsupported version (1.16) in file
    header"). Checked before a restore writes anything; at most one problem (the server's first). A manifest
    without the majors (unknown) is not refused."""
    if dumped is not None and target_major is not None and target_major < dumped:
        return [
            Problem(
                f"restore: {backup} holds a dump of a PostgreSQL {dumped} database, but {target} is PostgreSQL "
                f"{target_major}: a dump restores into the same or a newer major only. Nothing was restored. "
                f"Restore it where PostgreSQL {max(dumped, written_by or 0)} or newer is installed (the image or "
                "host the backup was made on, or a newer one).",
                subject,
                expected=f"PostgreSQL {dumped} or newer",
                found=f"PostgreSQL {target_major}",
            )
        ]
    if written_by is not None and pg_restore is not None and pg_restore[1] < written_by:
        tool, major = pg_restore
        return [
            Problem(
                f"restore: {backup}'s dump was written by pg_dump {written_by}, which pg_restore {major} ({tool}) "
                "cannot read: a pg_restore reads the dumps of its own and older majors only. Nothing was restored. "
                f"Install PostgreSQL {written_by}'s client programs here (Debian: postgresql-client-{written_by}), "
                "or restore it where that major is installed.",
                subject,
                expected=f"pg_restore {written_by} or newer",
                found=f"pg_restore {major}",
            )
        ]
    return []


def cluster_owner(as_root: bool) -> pwd.struct_passwd:
    if not as_root:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise UserError(
            "The embedded database runs as the 'postgres' system user, which does not exist: "
            "install the postgresql package or set POSTGRES_PASSWORD to use an external database."
        ) from None


def _as_owner(owner: pwd.struct_passwd, as_root: bool, setpriv: str) -> list[str]:
    if not as_root:
        return []
    return list(setpriv_prefix(setpriv, owner.pw_uid, owner.pw_gid))


def initdb_command(bindir: str, data: str, owner: str) -> list[str]:
    """initdb of the embedded cluster (and of the new cluster upgrade-postgres makes): UTF8, C locale, the owner
    as the superuser, peer auth on the socket, TCP refused until pg_hba.conf says otherwise."""
    return [
        f"{bindir}/initdb",
        "-D",
        data,
        "--encoding=UTF8",
        "--locale=C",
        f"--username={owner}",
        "--auth-local=peer",
        "--auth-host=reject",
    ]


def prepare_cluster(plan: Plan, as_root: bool, setpriv: str) -> pwd.struct_passwd:
    """initdb on first use (UTF8, C collation); pg_hba and the socket dir on every start."""
    assert plan.postgres is not None
    owner = cluster_owner(as_root)
    bindir = postgres_bin(plan.postgres.data_dir)
    data = Path(plan.postgres.data_dir)
    socket_dir = Path(plan.postgres.socket_dir)
    for directory in (data, socket_dir):
        directory.mkdir(parents=True, exist_ok=True)
        if as_root:
            os.chown(directory, owner.pw_uid, owner.pw_gid)
    os.chmod(data, 0o700)
    os.chmod(socket_dir, 0o755)  # Synapse (another user) must reach the socket; auth is by password
    if not (data / "PG_VERSION").exists():
        subprocess.run(
            [*_as_owner(owner, as_root, setpriv), *initdb_command(bindir, str(data), owner.pw_name)],
            check=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd="/",
            env=child_environment(os.environ),
        )
    hba = data / "pg_hba.conf"
    hba.write_text(hba_text(plan, owner.pw_name))
    if as_root:
        os.chown(hba, owner.pw_uid, owner.pw_gid)
    return owner


def psql_as_owner(
    bindir: str, socket_dir: str, owner: pwd.struct_passwd, as_root: bool, setpriv: str, sql: str
) -> subprocess.CompletedProcess[str]:
    """psql as the cluster's owner (peer authentication) over `socket_dir`, the SQL on stdin: a password in it
    never shows in a process list."""
    return subprocess.run(
        [*_as_owner(owner, as_root, setpriv), f"{bindir}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        + ["-h", socket_dir, "-U", owner.pw_name, "-d", "postgres"],
        input=sql,
        text=True,
        capture_output=True,
        cwd="/",
        env=child_environment(os.environ),
        check=False,
    )


def ensure_database(plan: Plan, owner: pwd.struct_passwd, as_root: bool, setpriv: str) -> None:
    """Create the synapse role and database if missing; (re)set the role's password from the passfile."""
    assert plan.postgres is not None
    password = PASSFILE_SYNAPSE.value(Path(plan.secrets.postgres).read_text())
    quoted = password.replace("'", "''")
    sql = f"""
SELECT 'CREATE ROLE synapse LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'synapse')\\gexec
ALTER ROLE synapse PASSWORD '{quoted}';
SELECT 'CREATE DATABASE synapse OWNER synapse ENCODING ''UTF8'' LC_COLLATE ''C'' LC_CTYPE ''C'' TEMPLATE template0'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'synapse')\\gexec
"""
    result = psql_as_owner(postgres_bin(plan.postgres.data_dir), plan.postgres.socket_dir, owner, as_root, setpriv, sql)
    if result.returncode != 0:
        raise RuntimeError(f"setting up the embedded database failed: {result.stderr.strip()}")
