"""Where every file, socket and directory of a stack lives: two frozen types, each built in one function.

`Layout` is what we generate and run under SYNAPSE_RUNTIME_DIR (rewritten on every start) plus the few
places under the data dir that processes write to. `SecretPaths` is where persisted secrets live (data
dir, 0600). Pure: nothing here touches the disk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# Proof that a runtime dir is ours: written before anything in it is created or replaced.
RUNTIME_MARKER = ".synapse-workers-runtime"
RUNTIME_MARKER_TEXT = "Created by synapse-workers: everything here is regenerated on every start.\n"


@dataclass(frozen=True)
class Layout:
    runtime_dir: str
    synapse_dir: str  # generated Synapse YAML
    shared_config: str
    main_config: str
    workers_dir: str
    log_dir: str  # per-process log configs
    sockets_dir: str
    nginx_dir: str
    nginx_conf: str
    redis_dir: str  # redis.conf and its working dir
    redis_conf: str
    redis_socket: str
    supervisor_dir: str  # supervisord.conf (generated)
    supervisor_conf: str
    state_dir: str  # written while running: supervisor socket, pid, captured output, status (root only)
    supervisor_socket: str
    supervisor_pid: str
    status_file: str
    lock_file: str
    postgres_socket_dir: str
    postgres_data_dir: str
    # `port-sqlite`: written once a port of the user's SQLite database into the embedded cluster completed (what,
    # when, from which file); with it, a homeserver.yaml that still says sqlite3 runs on the embedded cluster.
    sqlite_port_marker: str
    sqlite_port_dir: str  # `port-sqlite`'s scratch dir (the SQLite copy it ports, synapse_port_db's config), removed
    logs_on_disk: str  # SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK
    nginx_access_log: str  # in logs_on_disk, written by nginx itself (rotated by logrotate)
    nginx_error_log: str  # nginx's stderr (its error log), masked, written by the output listener (run/logprefix.py)
    coturn_dir: str  # the built-in coturn's: 0700, its user's (its config holds the TURN secret)
    coturn_conf: str  # turnserver.conf, 0600 (written with the secret by files.py)
    coturn_userdb: str  # coturn's own SQLite database (it creates it; empty: no users, no secrets)
    coturn_pid: str
    prometheus_dir: str  # the built-in Prometheus's generated config (prometheus.yml, the rules file)
    prometheus_conf: str
    prometheus_rules: str
    prometheus_data: str  # its database unless PROMETHEUS_STORAGE_PATH says otherwise
    nftables_conf: str  # several hosts: this host's ruleset for the internal ports (applying it is the admin's call)
    nginx_pid: str  # nginx's master (reopens its logs on SIGUSR1)
    scheduler_dir: str  # the scheduler's generated files: jobs.json, logrotate.conf
    jobs_file: str  # what the `scheduler` program runs and when (no secrets)
    logrotate_conf: str  # rules for the log files nginx writes itself (SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK)
    logrotate_state: str  # logrotate's own state file (in state/: kept across starts)
    scheduler_heartbeat: str  # touched by the scheduler's loop: its health check reads the time
    compressor_lock: str  # flock held by a running compressor (scheduled or `compress-state`)
    backup_status: str  # the last `backup` run's outcome (run/backup.py: written atomically, read by status/health)
    backup_lock: str  # flock held by a running `backup` (scheduled or by hand): two never overlap

    def worker_config(self, name: str) -> str:
        return f"{self.workers_dir}/{name}.yaml"

    def log_config(self, name: str) -> str:
        return f"{self.log_dir}/{name}.log.config"

    def socket(self, name: str, kind: str) -> str:
        return f"{self.sockets_dir}/{name}.{kind}.sock"

    def as_json(self) -> dict[str, str]:
        return asdict(self)

    def runtime_names(self) -> frozenset[str]:
        """The top-level names we create in the runtime dir (staging and old copies start with .staging-/.old-)."""
        prefix = self.runtime_dir + "/"
        values = (getattr(self, f.name) for f in fields(self))
        return frozenset(v[len(prefix) :].split("/")[0] for v in values if v.startswith(prefix)) | {RUNTIME_MARKER}

    def foreign_entries(self, entries: list[str]) -> list[str]:
        """Of a listing of the runtime dir, the names we never create."""
        ours = self.runtime_names()
        return sorted(e for e in entries if e not in ours and not e.startswith((".staging-", ".old-")))


def make_layout(runtime_dir: str, data_dir: str) -> Layout:
    r = runtime_dir
    return Layout(
        runtime_dir=r,
        synapse_dir=f"{r}/synapse",
        shared_config=f"{r}/synapse/shared.yaml",
        main_config=f"{r}/synapse/main.yaml",
        workers_dir=f"{r}/synapse/workers",
        log_dir=f"{r}/synapse/log",
        sockets_dir=f"{r}/sockets",
        nginx_dir=f"{r}/nginx",
        nginx_conf=f"{r}/nginx/nginx.conf",
        redis_dir=f"{r}/redis",
        redis_conf=f"{r}/redis/redis.conf",
        redis_socket=f"{r}/sockets/redis.sock",
        supervisor_dir=f"{r}/supervisor",
        supervisor_conf=f"{r}/supervisor/supervisord.conf",
        state_dir=f"{r}/state",
        supervisor_socket=f"{r}/state/supervisor.sock",
        supervisor_pid=f"{r}/state/supervisord.pid",
        status_file=f"{r}/state/status.json",
        lock_file=f"{r}/.launcher.lock",
        postgres_socket_dir=f"{r}/postgresql",
        postgres_data_dir=f"{data_dir}/postgres",
        sqlite_port_marker=f"{data_dir}/synapse-workers-postgres.json",
        sqlite_port_dir=f"{data_dir}/.synapse-workers-port-sqlite",
        logs_on_disk=f"{data_dir}/logs",
        nginx_access_log=f"{data_dir}/logs/nginx-access.log",
        nginx_error_log=f"{data_dir}/logs/nginx-error.log",
        coturn_dir=f"{r}/coturn",
        coturn_conf=f"{r}/coturn/turnserver.conf",
        coturn_userdb=f"{r}/coturn/turndb",
        coturn_pid=f"{r}/coturn/turnserver.pid",
        prometheus_dir=f"{r}/prometheus",
        prometheus_conf=f"{r}/prometheus/prometheus.yml",
        prometheus_rules=f"{r}/prometheus/synapse-workers.rules.yml",
        prometheus_data=f"{data_dir}/prometheus",
        nftables_conf=f"{r}/nftables/synapse-workers.nft",
        nginx_pid=f"{r}/nginx/nginx.pid",
        scheduler_dir=f"{r}/scheduler",
        jobs_file=f"{r}/scheduler/jobs.json",
        logrotate_conf=f"{r}/scheduler/logrotate.conf",
        logrotate_state=f"{r}/state/logrotate.status",
        scheduler_heartbeat=f"{r}/state/scheduler.alive",
        compressor_lock=f"{r}/state/compressor.lock",
        backup_status=f"{r}/state/backup.json",
        backup_lock=f"{r}/state/backup.lock",
    )


@dataclass(frozen=True)
class SecretPaths:
    """Where the persisted secrets live (data dir, mode 0600). What each holds, from which variable and when it
    is needed: its row in `secrets.SECRETS` (one per field); files.ensure_secrets creates them."""

    signing_key: str
    registration: str
    macaroon: str
    form: str
    replication: str
    turn: str
    postgres: str  # embedded PostgreSQL: libpq passfile holding the synapse role's password
    postgres_password: str  # the same password alone, for prometheus-postgres-exporter (DATA_SOURCE_PASS_FILE)
    external_postgres: str  # external PostgreSQL: libpq passfile with POSTGRES_PASSWORD (rewritten from the env)
    external_postgres_password: str  # POSTGRES_PASSWORD alone, for prometheus-postgres-exporter (external database)
    redis: str  # several hosts: the Redis password alone (Synapse's redis.password_path)
    redis_conf: str  # ... and as Redis reads it (`requirepass`, included by redis.conf), derived from it


def secret_paths(data_dir: str, server_name: str) -> SecretPaths:
    return SecretPaths(
        signing_key=f"{data_dir}/{server_name}.signing.key",
        registration=f"{data_dir}/{server_name}.registration.key",
        macaroon=f"{data_dir}/{server_name}.macaroon.key",
        form=f"{data_dir}/{server_name}.form.key",
        replication=f"{data_dir}/worker_replication.key",
        turn=f"{data_dir}/{server_name}.turn.key",
        postgres=f"{data_dir}/embedded_postgres.pgpass",
        postgres_password=f"{data_dir}/embedded_postgres.password",
        external_postgres=f"{data_dir}/external_postgres.pgpass",
        external_postgres_password=f"{data_dir}/external_postgres.password",
        redis=f"{data_dir}/redis.key",
        redis_conf=f"{data_dir}/redis.auth.conf",
    )
