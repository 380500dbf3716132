#!/usr/bin/env bash
# Install everything synapse-workers needs on Debian 12 (root): system packages and a venv with the
# pinned Synapse. Idempotent: a second run only re-installs the project itself.
#   SW_VENV   where the venv lives (default /opt/synapse-workers/venv)
#   SW_EXTRAS pip extras of this project to install (default: none; tests use "test")
#   SW_POSTGRES_MAJOR the embedded cluster's PostgreSQL major (default 15: the image's; see runtime_pkgs)
#
# With no argument (the host): every package (runtime + build tools), then an editable venv linked into
# /usr/local/bin. The container image (Dockerfile) uses the same script in two stages instead:
#   --image-build    builder stage: build tools and headers only, then a non-editable venv (no pip cache)
#   --image-runtime  final stage: runtime packages only (+ tini as PID 1), apt lists removed; no venv
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${SW_VENV:-/opt/synapse-workers/venv}
extras=${SW_EXTRAS:-}
mode=${1:-host}
case "$mode" in
  host | --image-build | --image-runtime) ;;
  *) echo "usage: install.sh [--image-build | --image-runtime]" >&2; exit 2 ;;
esac

# The embedded cluster's PostgreSQL major, pinned by us (not the `postgresql` metapackage, which follows the Debian
# release): a cluster only opens with its own major's binaries, so a rebuild never moves it, and a new major is a
# deliberate release with `synapse-workers upgrade-postgres` (README "PostgreSQL versions"). A host may choose
# another major (SW_POSTGRES_MAJOR) that its apt sources carry.
pg_major=${SW_POSTGRES_MAJOR:-15}
# What the stack runs (nginx is added below): also in the image's final stage.
runtime_pkgs=(redis-server "postgresql-$pg_major" python3 util-linux ca-certificates libjemalloc2 coturn prometheus
  prometheus-nginx-exporter prometheus-redis-exporter prometheus-postgres-exporter logrotate)
# What building the venv needs (psycopg2 and friends compile against these).
build_pkgs=(libpq-dev build-essential python3-dev python3-venv)
case "$mode" in
  # nftables, iproute2: the multi-host test (network namespaces, the generated ruleset applied with nft).
  host) apt_pkgs=("${runtime_pkgs[@]}" "${build_pkgs[@]}" openssl curl nftables iproute2) ;;
  --image-build) apt_pkgs=("${build_pkgs[@]}") ;;
  --image-runtime) apt_pkgs=("${runtime_pkgs[@]}" tini) ;;
esac

if [ "$mode" = --image-runtime ]; then
  # The image never needs these files of its packages (386 MB of a 1.04 GB image): dpkg skips them.
  # - moment-timezone's unpacked tz database (212 MB; Prometheus's web UI loads moment-timezone-with-data.min.js)
  # - promtool (46 MB; the tests run it on the host, nothing in the image does)
  # - PostgreSQL's LLVM JIT provider and LLVM itself (128 MB): without llvmjit.so PostgreSQL disables JIT
  #   (it checks for the library before loading it), which only the largest analytic queries would use.
  mkdir -p /etc/dpkg/dpkg.cfg.d
  cat > /etc/dpkg/dpkg.cfg.d/synapse-workers-image <<'DPKG'
path-exclude=/usr/share/javascript/moment-timezone/data/*
path-exclude=/usr/bin/promtool
path-exclude=/usr/lib/postgresql/*/lib/llvmjit*
path-exclude=/usr/lib/postgresql/*/lib/bitcode/*
path-exclude=/usr/lib/x86_64-linux-gnu/libLLVM-*
path-exclude=/usr/lib/aarch64-linux-gnu/libLLVM-*
path-exclude=/usr/lib/x86_64-linux-gnu/libz3.so*
path-exclude=/usr/lib/aarch64-linux-gnu/libz3.so*
DPKG
fi

missing=()
# Any nginx flavour will do (nginx-light, nginx-full, nginx): the flavours conflict with each other.
if [ "$mode" != --image-build ]; then
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
fi
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install: apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # policy-rc.d keeps Debian from starting the system nginx/redis/postgres services: we run our own.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  rm -f /usr/sbin/policy-rc.d
fi

if [ "$mode" = --image-runtime ]; then
  # The image runs its own PostgreSQL cluster in /data (or none): drop the one Debian's package created,
  # and everything apt keeps (the image is rebuilt, never upgraded in place).
  if command -v pg_dropcluster >/dev/null 2>&1; then
    for cluster in $(pg_lsclusters -h 2>/dev/null | awk '{print $1 "/" $2}'); do
      pg_dropcluster "${cluster%/*}" "${cluster#*/}"
    done
  fi
  apt-get clean
  rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log /var/cache/debconf/*-old
  echo "install: runtime packages done"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "install: creating venv $venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
spec="$here"
[ -n "$extras" ] && spec="$here[$extras]"
echo "install: pip install $spec (pinned Synapse, see pyproject.toml)"
if [ "$mode" = --image-build ]; then
  # Dependencies first (SW_DEPS_ONLY=1: only them, from pyproject.toml, so an image build caches the pinned
  # Synapse in its own layer), then a real install of the project (the final stage has no source tree).
  /usr/bin/python3 -c 'import tomllib; print("\n".join(tomllib.load(open("'"$here"'/pyproject.toml", "rb"))["project"]["dependencies"]))' \
    > /tmp/sw-requirements.txt
  "$venv/bin/pip" install -q --no-cache-dir -r /tmp/sw-requirements.txt
  rm -f /tmp/sw-requirements.txt
  if [ "${SW_DEPS_ONLY:-0}" = 1 ]; then echo "install: dependencies done"; exit 0; fi
  "$venv/bin/pip" install -q --no-cache-dir --no-deps "$spec"
  echo "install: venv done ($("$venv/bin/synapse-workers" --version))"
  exit 0
fi
"$venv/bin/pip" install -q -e "$spec"
ln -sf "$venv/bin/synapse-workers" /usr/local/bin/synapse-workers
ln -sf "$venv/bin/register_new_matrix_user" /usr/local/bin/register_new_matrix_user
echo "install: done ($("$venv/bin/synapse-workers" --version))"
