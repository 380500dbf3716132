#!/usr/bin/env bash
# Install everything (apt + venv, see install.sh) and run the whole test suite with real nginx, Synapse,
# PostgreSQL and Redis binaries. Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
SW_EXTRAS=test "$here/scripts/install.sh"
venv=${SW_VENV:-/opt/synapse-workers/venv}
cd "$here"
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
