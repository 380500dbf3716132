#!/usr/bin/env bash
# Install everything synapse-workers needs on Debian 12 (root): system packages and a venv with the
# pinned Synapse. Idempotent: a second run only re-installs the project itself.
#   SW_VENV   where the venv lives (default /opt/synapse-workers/venv)
#   SW_EXTRAS pip extras of this project to install (default: none; tests use "test")
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${SW_VENV:-/opt/synapse-workers/venv}
extras=${SW_EXTRAS:-}

apt_pkgs=(redis-server postgresql libpq-dev build-essential python3-dev python3-venv util-linux openssl curl ca-certificates)
missing=()
# Any nginx flavour will do (nginx-light, nginx-full, nginx): the flavours conflict with each other.
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
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

if [ ! -x "$venv/bin/python" ]; then
  echo "install: creating venv $venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
spec="$here"
[ -n "$extras" ] && spec="$here[$extras]"
echo "install: pip install $spec (pinned Synapse, see pyproject.toml)"
"$venv/bin/pip" install -q -e "$spec"
ln -sf "$venv/bin/synapse-workers" /usr/local/bin/synapse-workers
ln -sf "$venv/bin/register_new_matrix_user" /usr/local/bin/register_new_matrix_user
echo "install: done ($("$venv/bin/synapse-workers" --version))"
