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

from ..errors import UserError
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


def postgres_bin() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise UserError("The embedded database needs PostgreSQL server binaries (apt-get install postgresql).")
    return os.path.dirname(found[-1])


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


def prepare_cluster(plan: Plan, as_root: bool, setpriv: str) -> pwd.struct_passwd:
    """initdb on first use (UTF8, C collation); pg_hba and the socket dir on every start."""
    assert plan.postgres is not None
    owner = cluster_owner(as_root)
    bindir = postgres_bin()
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
            [
                *_as_owner(owner, as_root, setpriv),
                f"{bindir}/initdb",
                "-D",
                str(data),
                "--encoding=UTF8",
                "--locale=C",
                f"--username={owner.pw_name}",
                "--auth-local=peer",
                "--auth-host=reject",
            ],
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
    # SQL on stdin: the password never shows in a process list.
    result = subprocess.run(
        [
            *_as_owner(owner, as_root, setpriv),
            f"{postgres_bin()}/psql",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            plan.postgres.socket_dir,
            "-U",
            owner.pw_name,
            "-d",
            "postgres",
        ],
        input=sql,
        text=True,
        capture_output=True,
        cwd="/",
        env=child_environment(os.environ),
    )
    if result.returncode != 0:
        raise RuntimeError(f"setting up the embedded database failed: {result.stderr.strip()}")
