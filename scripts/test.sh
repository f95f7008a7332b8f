#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and the integration tests against a real local
# control plane (etcd + kube-apiserver + kube-controller-manager, built once and cached) and
# PostgreSQL, with ONNX Runtime from PyPI. Set USE_EXISTING_CLUSTER=true to use your
# kubeconfig's cluster instead (and KINSIGHT_DATABASE_URL for its database), or
# KUBEBUILDER_ASSETS / KINSIGHT_POSTGRES_BIN to bring your own binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${USE_EXISTING_CLUSTER:-}" != "true" ] && [ -z "${KUBEBUILDER_ASSETS:-}" ]; then
  KUBEBUILDER_ASSETS="$(scripts/build-kubernetes.sh)"
  export KUBEBUILDER_ASSETS
fi
# A real node for tests/real_node.rs: kubelet, kube-scheduler and the pause image (built once
# into the cache), containerd, runc and the CNI plugins (Debian's packages). The test starts
# its own control plane, also with USE_EXISTING_CLUSTER=true.
scripts/build-node.sh >/dev/null
scripts/install-node-packages.sh
scripts/install-postgresql.sh
# Always run: it also installs the Python verifiers and Helm library the tests use.
ORT_LIB="$(scripts/setup-onnxruntime.sh)"
ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(realpath "$ORT_LIB")}"
export ORT_DYLIB_PATH
# The content_safety model (not committed), for its golden tests.
scripts/fetch-open-nsfw.sh >/dev/null
# ONNX Runtime built with CUDA, for tests/execution_provider.rs (no GPU needed).
KINSIGHT_CUDA_ORT_DYLIB="${KINSIGHT_CUDA_ORT_DYLIB:-$(scripts/fetch-onnxruntime-cuda.sh)}"
export KINSIGHT_CUDA_ORT_DYLIB
# Integration tests each start a control plane; two at a time suit a 2-core machine.
cargo test --locked --no-fail-fast --all-targets -- --test-threads="${TEST_THREADS:-2}" "$@"
