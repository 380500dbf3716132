# synapse-workers: Synapse 1.163.2 with workers, an internal nginx, Redis and an embedded PostgreSQL, all
# configured by environment variables (README.md, "Container"). Build: `docker build -t synapse-workers .`
# (on a host with podman and no registry: `bash scripts/build-image.sh`).
# Both stages install through scripts/install.sh, the same script as the host quick start.

# ---- builder: compilers and headers, a venv with the pinned Synapse -------------------------------------
FROM debian:bookworm-slim AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV SW_VENV=/opt/synapse-workers/venv \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies alone first: the pinned Synapse stays in a cached layer while the project's code changes.
COPY pyproject.toml ./
COPY scripts/install.sh scripts/
RUN SW_DEPS_ONLY=1 bash scripts/install.sh --image-build
COPY README.md ./
COPY src/ src/
RUN bash scripts/install.sh --image-build
# Lets scripts/build-image.sh find this stage's leftover images from earlier builds.
LABEL io.synapse-workers.stage=builder

# ---- runtime: only what the stack runs --------------------------------------------------------------------
FROM debian:bookworm-slim
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="synapse-workers" \
      org.opencontainers.image.description="Synapse 1.163.2 with workers, nginx, Redis and PostgreSQL, configured by environment variables" \
      org.opencontainers.image.licenses="Apache-2.0"
# nginx-light, redis-server, postgresql-15 (the pinned major: install.sh), python3, util-linux (setpriv), ca-certificates, coturn, prometheus and its nginx/redis/postgres exporters, tini; no apt lists.
COPY scripts/install.sh /usr/local/share/synapse-workers/install.sh
RUN bash /usr/local/share/synapse-workers/install.sh --image-runtime
COPY --from=builder /opt/synapse-workers/venv /opt/synapse-workers/venv
COPY scripts/container-entrypoint.sh /usr/local/bin/synapse-workers-entrypoint
# A new named volume starts as a copy of this: Synapse's (default) user's, enterable by PostgreSQL's.
RUN install -d -m 0755 -o 991 -g 991 /data

ENV PATH=/opt/synapse-workers/venv/bin:$PATH \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    SYNAPSE_CONFIG_DIR=/data \
    SYNAPSE_DATA_DIR=/data \
    SYNAPSE_HTTP_BIND_ADDRESS=0.0.0.0 \
    PROMETHEUS_STORAGE_PATH=/var/lib/prometheus \
    SYNAPSE_BACKUP_DIR=/backups

# homeserver.yaml, signing key, secrets, media store and the embedded PostgreSQL cluster all live in /data
# (owned by UID:GID: 991:991 unless `-e UID=... -e GID=...` say otherwise; the embedded PostgreSQL cluster
# by the image's postgres user). Not set here as ENV: bash treats UID as its own read-only variable.
# SYNAPSE_HTTP_BIND_ADDRESS=0.0.0.0: in a container nginx listens on every address (published ports reach it),
# also for a homeserver.yaml whose client listener binds loopback only (on a host that listener stays on loopback).
# /var/lib/prometheus: the built-in Prometheus's database (SYNAPSE_METRICS), owned by Debian's prometheus user in
# the image, so a new volume there starts out usable. PROMETHEUS_STORAGE_PATH=/data/prometheus keeps it in /data.
# /backups: where `synapse-workers backup` and the scheduled backups (SYNAPSE_BACKUP_SCHEDULE) write; map it to
# another disk than /data.
VOLUME ["/data", "/var/lib/prometheus", "/backups"]
# 8008: the public client/federation port (nginx); 8448: the optional TLS listener (SYNAPSE_TLS_CERT/KEY).
# 3478 (udp+tcp) and 49153-49173/udp: the built-in coturn (SYNAPSE_ENABLE_BUILTIN_COTURN, off by default) at its
# default COTURN_PORT and COTURN_MIN_PORT..COTURN_MAX_PORT.
EXPOSE 8008/tcp 8448/tcp 3478/udp 3478/tcp 49153-49173/udp

# Reads the launcher's status file in the runtime dir: healthy only when nginx, main and every worker answer.
# A first start (initdb, Synapse's schema) takes up to a minute or two on a small machine.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 CMD ["synapse-workers", "health"]

# tini is PID 1: it reaps orphans and forwards SIGTERM to the launcher, which stops nginx, workers, main,
# Redis and PostgreSQL in order (about a second; well inside `docker stop`'s 10 s). The entrypoint script
# only gives an empty /data mount point to UID:GID, then execs `synapse-workers "$@"`: `docker run IMAGE env`,
# `... plan`, `... routes GET /_matrix/client/v3/sync` work too.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/synapse-workers-entrypoint"]
CMD ["run"]
