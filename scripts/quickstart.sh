#!/usr/bin/env bash
# One command on a fresh Debian 12 machine (as root): install everything, then start Synapse with a few
# workers, nginx, Redis and an embedded PostgreSQL on http://localhost:8008. Ctrl-C stops it cleanly.
# Every variable can be overridden from the environment (see README.md).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/install.sh"
export SYNAPSE_SERVER_NAME=${SYNAPSE_SERVER_NAME:-localhost}
export SYNAPSE_REPORT_STATS=${SYNAPSE_REPORT_STATS:-no}
export SYNAPSE_CONFIG_DIR=${SYNAPSE_CONFIG_DIR:-/var/lib/synapse-workers}
export SYNAPSE_DATA_DIR=${SYNAPSE_DATA_DIR:-/var/lib/synapse-workers}
export SYNAPSE_RUNTIME_DIR=${SYNAPSE_RUNTIME_DIR:-/run/synapse-workers}
export SYNAPSE_HTTP_BIND_ADDRESS=${SYNAPSE_HTTP_BIND_ADDRESS:-127.0.0.1}
export SYNAPSE_WORKER_TYPES=${SYNAPSE_WORKER_TYPES-"synchrotron, event_persister, media_repository, stream_writers=typing+to_device+receipts+account_data+presence"}
exec synapse-workers run
