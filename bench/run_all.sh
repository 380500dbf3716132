#!/usr/bin/env bash
# Run every benchmark and keep the output in bench/results-<date>.txt (summary: docs/benchmarks.md).
# Needs root (Synapse drops to UID 991, PostgreSQL to `postgres`), like `synapse-workers run` itself.
#   bash bench/run_all.sh            # defaults: about 25 minutes on 2 cores
#   RUNS=1 bash bench/run_all.sh     # quicker: one run per measurement
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-${SW_VENV:-/opt/synapse-workers/venv}/bin/python}
cd "$here"  # the scripts import tests.support from the repository root
out="bench/results-$(date +%Y%m%d-%H%M%S).txt"
runs=()
if [[ -n "${RUNS:-}" ]]; then runs=(--runs "$RUNS"); fi

{
  echo "# synapse-workers benchmarks, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM"
  echo "# $(nginx -v 2>&1), $(redis-server --version | cut -d' ' -f1-3), PostgreSQL $(ls /usr/lib/postgresql | sort -n | tail -1)"
  echo
  start=$(date +%s)
  "$python" bench/startup_memory.py "${runs[@]}"
  "$python" bench/proxy_overhead.py "${runs[@]}"
  "$python" bench/messaging.py "${runs[@]}"
  "$python" bench/addons.py "${runs[@]}"
  echo "# total wall time: $(( $(date +%s) - start ))s"
} 2>&1 | tee "$out"
echo "results: $out"
