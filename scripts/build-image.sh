#!/usr/bin/env bash
# Build the synapse-workers container image with podman on a Debian 12 host (root), the way CI does:
#   1. podman, runc, debootstrap (+ uidmap, slirp4netns) from apt when missing;
#   2. a containers.conf for this host: runc (crun fails on hybrid cgroups) and ulimits no higher than the
#      host's hard limits (podman's defaults are refused otherwise);
#   3. the Dockerfile's base image (debian:bookworm-slim) made with debootstrap from the Debian mirror and
#      imported locally when it is not there yet (no registry is reached);
#   4. podman build --pull=never --format docker (docker format keeps HEALTHCHECK), with the host's CA bundle
#      and pip index lent to the build through read-only mounts (never baked into the image).
# A Docker user needs none of this: `docker build -t synapse-workers .` uses the same Dockerfile.
#
#   SW_IMAGE            tag to build (default synapse-workers:latest)
#   SW_CONTAINERS_CONF  where the containers.conf is written (default /etc/synapse-workers/containers.conf);
#                       run the image with CONTAINERS_CONF=<that file> podman run ...
#   SW_DEBIAN_MIRROR    mirror for the base (default: the host's first deb.debian.org-style URI)
#   SW_REBUILD_BASE=1   make the base image again even when it exists
# Prints `image <tag> built in <s>s, <size>` at the end. Usage: build-image.sh [--conf-only] [extra podman build args]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
image=${SW_IMAGE:-synapse-workers:latest}
conf=${SW_CONTAINERS_CONF:-/etc/synapse-workers/containers.conf}
base=$(sed -n 's/^FROM \([^ ]*\).*/\1/p' "$here/Dockerfile" | head -n1)
conf_only=0
if [ "${1:-}" = "--conf-only" ]; then conf_only=1; shift; fi

log() { echo "build-image: $*" >&2; }

# ---- 1. tools -------------------------------------------------------------------------------------------
"$here/scripts/container-tools.sh" --podman-only  # podman, runc, debootstrap, uidmap, slirp4netns (apt)

# ---- 2. containers.conf ---------------------------------------------------------------------------------
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] && nofile=1048576
[ "$nproc" = unlimited ] && nproc=32768
[ "$nproc" -gt 32768 ] && nproc=32768
mkdir -p "$(dirname "$conf")"
cat > "$conf.tmp" <<EOF
# Written by synapse-workers scripts/build-image.sh for this host; use with CONTAINERS_CONF=$conf
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
EOF
mv "$conf.tmp" "$conf"
export CONTAINERS_CONF=$conf
if [ "$conf_only" = 1 ]; then echo "$conf"; exit 0; fi

# ---- 3. the base image ----------------------------------------------------------------------------------
if [ "${SW_REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$base"; then
  mirror=${SW_DEBIAN_MIRROR:-$( (grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list \
    /etc/apt/sources.list.d/ 2>/dev/null || true) | head -n1 | awk '{print $2}')}
  mirror=${mirror:-http://deb.debian.org/debian}
  security=${mirror%/debian*}/debian-security
  log "making $base with debootstrap (bookworm, minbase) from $mirror"
  root=$(mktemp -d /var/tmp/sw-base.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$mirror" >&2
  # What the official slim image does: no docs, man pages or locales from later installs; apt keeps no .debs.
  cat > "$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::GzipIndexes "true";' > "$root/etc/apt/apt.conf.d/docker-gzip-indexes"
  rm -f "$root/etc/apt/sources.list"
  cat > "$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  find "$root/usr/share/doc" -mindepth 2 -not -name copyright -delete 2>/dev/null || true
  rm -rf "$root"/usr/share/{man,info,locale}/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
    "$root"/var/cache/apt/archives/*.deb "$root"/var/log/* "$root"/tmp/*
  : > "$root/etc/machine-id"
  tar --numeric-owner -C "$root" -c . | podman import --change 'CMD ["bash"]' - "$base" >/dev/null
  rm -rf "$root"; trap - EXIT
  log "base $base: $(podman image inspect --format '{{.Size}}' "$base" | awk '{printf "%d MB", $1/1e6}')"
fi

# ---- 4. build -------------------------------------------------------------------------------------------
# The host's CA bundle and pip index settings, lent read-only to RUN steps (the build's pip must trust what
# the host trusts, e.g. a proxy's CA, and use the same index). file:// indexes are not visible in the build.
ca=/etc/ssl/certs/ca-certificates.crt
pipconf=$(mktemp /var/tmp/sw-pip.XXXXXX.conf)
trap 'rm -f "$pipconf"' EXIT
{
  echo "[global]"
  echo "cert = /etc/pip-host-ca.crt"
  echo "disable-pip-version-check = true"
  echo "default-timeout = ${PIP_DEFAULT_TIMEOUT:-120}"
  index=${PIP_INDEX_URL:-$(pip config get global.index-url 2>/dev/null || true)}
  case "$index" in http*) echo "index-url = $index" ;; esac
  extra=${PIP_EXTRA_INDEX_URL:-$(pip config get global.extra-index-url 2>/dev/null || true)}
  extra=$(tr ' ' '\n' <<<"$extra" | grep -E '^https?://' | tr '\n' ' ' || true)
  [ -n "${extra// }" ] && echo "extra-index-url = $extra"
} > "$pipconf"
chmod 0644 "$pipconf"

old_id=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
start=$(date +%s)
log "podman build -t $image (base $base)"
podman build --pull=never --format docker -t "$image" \
  -v "$ca:/etc/pip-host-ca.crt:ro" -v "$pipconf:/etc/pip.conf:ro" \
  "$@" "$here" >&2
took=$(( $(date +%s) - start ))
# The previous image of this tag is of no use once replaced (if no container uses it); cached layers stay.
new_id=$(podman image inspect --format '{{.Id}}' "$image")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then podman rmi "$old_id" >/dev/null 2>&1 || true; fi
# So are the builder stages of earlier builds (untagged, labelled; listed newest first): keep the newest.
podman images --filter dangling=true --filter label=io.synapse-workers.stage=builder --format '{{.ID}}' \
  --sort created 2>/dev/null | tail -n +2 | while read -r id; do podman rmi "$id" >/dev/null 2>&1 || true; done


size=$(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%d MB", $1/1e6}')
echo "image $image built in ${took}s, $size"
