"""A throwaway external PostgreSQL cluster for tests: TCP on 127.0.0.1, password auth for `synapse`.

initdb refuses root, so as root the cluster belongs to the `postgres` system user. Use it as a context
manager (or call start()/stop()): stop() runs `pg_ctl -m fast` and, failing that, kills the postmaster.
The cluster lives in its own temp root, outside any Stack's root, so Stack.leftovers() never sees it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port

BIN = "/usr/lib/postgresql/15/bin"

HBA = """\
local   all   {admin}   peer
host    all   {user}   127.0.0.1/32   scram-sha-256
"""


class PgCluster:
    def __init__(self, max_connections: int = 100, user: str = "synapse", database: str = "synapse"):
        self.max_connections = max_connections
        self.user = user
        self.database = database
        self.password = secrets.token_hex(16)
        self.host = "127.0.0.1"
        self.port = 0
        self.root: Path | None = None
        self.as_root = os.geteuid() == 0
        self.owner = pwd.getpwnam("postgres") if self.as_root else pwd.getpwuid(os.geteuid())
        self.started = False

    # ---- paths ----------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "pgdata"

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None
        return self.root / "sock"

    @property
    def log_file(self) -> Path:
        assert self.root is not None
        return self.root / "postgres.log"

    def env(self) -> dict[str, str]:
        """The POSTGRES_* variables for `synapse-workers run`."""
        return {
            "POSTGRES_HOST": self.host,
            "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": self.user,
            "POSTGRES_DB": self.database,
            "POSTGRES_PASSWORD": self.password,
        }

    def dsn(self) -> dict[str, object]:
        return {"host": self.host, "port": self.port, "user": self.user, "password": self.password,
                "dbname": self.database}

    # ---- lifecycle ------------------------------------------------------------------------------------
    def _as_owner(self, argv: list[str]) -> list[str]:
        if not self.as_root:
            return argv
        return ["setpriv", "--reuid", self.owner.pw_name, "--regid", str(self.owner.pw_gid), "--init-groups", "--",
                *argv]

    def _run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self._as_owner(argv), cwd="/", capture_output=True, text=True, **kwargs)

    def start(self) -> PgCluster:
        self.root = Path(tempfile.mkdtemp(prefix="sw-pg-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        for d in (self.data_dir, self.socket_dir):
            d.mkdir()
            os.chown(d, self.owner.pw_uid, self.owner.pw_gid)
        os.chmod(self.data_dir, 0o700)
        self.log_file.touch()
        os.chown(self.log_file, self.owner.pw_uid, self.owner.pw_gid)
        result = self._run([f"{BIN}/initdb", "-D", str(self.data_dir), "--encoding=UTF8", "--locale=C",
                            f"--username={self.owner.pw_name}", "--auth-local=peer", "--auth-host=scram-sha-256",
                            "--no-sync"])
        if result.returncode:
            raise RuntimeError(f"initdb failed: {result.stdout}{result.stderr}")
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(HBA.format(admin=self.owner.pw_name, user=self.user))
        os.chown(hba, self.owner.pw_uid, self.owner.pw_gid)
        for _ in range(5):  # the port may be taken between free_port() and bind: retry with another
            self.port = free_port()
            options = (f"-c listen_addresses={self.host} -p {self.port} -c unix_socket_directories={self.socket_dir} "
                       f"-c max_connections={self.max_connections} -c fsync=off -c synchronous_commit=off "
                       "-c full_page_writes=off")
            result = self._run([f"{BIN}/pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-o", options,
                                "-w", "-t", "60", "start"])
            if result.returncode == 0:
                break
        else:
            raise RuntimeError(f"PostgreSQL did not start: {result.stdout}{result.stderr}\n{self.log_tail()}")
        self.started = True
        quoted = self.password.replace("'", "''")
        sql = (f"CREATE ROLE {self.user} LOGIN PASSWORD '{quoted}';\n"
               f"CREATE DATABASE {self.database} OWNER {self.user} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' "
               "TEMPLATE template0;\n")
        result = self._run([f"{BIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
                            "-p", str(self.port), "-U", self.owner.pw_name, "-d", "postgres"], input=sql)
        if result.returncode:
            raise RuntimeError(f"creating the synapse role/database failed: {result.stderr}")
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AssertionError):
            return ""

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError, AssertionError):
            return None

    def running(self) -> bool:
        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self) -> None:
        """Fast shutdown; kill the postmaster if that fails. Removes the cluster's files. Idempotent."""
        if self.root is None:
            return
        if self.started:
            pid = self.postmaster_pid()
            result = self._run([f"{BIN}/pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30", "stop"])
            if result.returncode and pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> PgCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
