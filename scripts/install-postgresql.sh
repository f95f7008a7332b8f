#!/usr/bin/env bash
# Installs Debian's PostgreSQL when its binaries are missing: the testbed runs its own server
# from them (Debian's cluster service, which the package may start, is never used).
set -euo pipefail
if [ -z "${KINSIGHT_POSTGRES_BIN:-}" ] && ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends postgresql >&2
fi
