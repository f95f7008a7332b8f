#!/usr/bin/env bash
# Sets up everything kinsight needs on a fresh Debian 12 machine with Rust (as root):
# the local control plane binaries (cached under ~/.cache/kinsight), PostgreSQL (Debian's
# package), ONNX Runtime from PyPI in ./.venv, and the release build. Safe to run again: each
# step skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-kubernetes.sh >/dev/null
# PostgreSQL binaries for the testbed's own database server (Debian's cluster service, which
# the package may start, is never used).
if [ -z "${KINSIGHT_POSTGRES_BIN:-}" ] && ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends postgresql >&2
fi
# ONNX Runtime for kinsight (scripts/test.sh adds the Python tools the tests use).
scripts/setup-onnxruntime.sh --runtime >/dev/null
cargo build --release --locked
echo "set up: target/release/kinsight"
