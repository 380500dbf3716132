#!/bin/sh
# The image's entrypoint, under tini: `synapse-workers "$@"` (CMD: run).
# One thing first: a data dir that is an empty mount point owned by someone else (a bind mount the
# container runtime created as root, e.g. Unraid's appdata) is given to UID:GID, as the official image's
# generate step does. Only the empty directory itself: anything with files in it is left as it is, and
# synapse-workers says what to do when Synapse's user cannot use it.
set -eu
data=${SYNAPSE_DATA_DIR:-/data}
uid=$(printenv UID || echo 991)
gid=$(printenv GID || echo 991)
# `run`, or arguments written for the official image that start the stack (`-m synapse.app.homeserver`, an
# Unraid template's Post Arguments): synapse_workers.official_args decides, as the CLI does.
if [ "$(id -u)" = 0 ] && [ -d "$data" ] && [ -z "$(ls -A "$data")" ] \
  && [ "$(stat -c %u:%g "$data")" != "${uid:-991}:${gid:-991}" ] \
  && python3 -m synapse_workers.official_args "$@"; then
  echo "synapse-workers: $data is an empty mount point: giving it to ${uid:-991}:${gid:-991}" >&2
  chown "${uid:-991}:${gid:-991}" "$data"
  chmod 0755 "$data"  # PostgreSQL (its own user) must reach its cluster in it
fi
exec synapse-workers "$@"
