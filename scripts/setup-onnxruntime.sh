#!/usr/bin/env bash
# ONNX Runtime for the `ort` crate (load-dynamic) from the PyPI wheel, in ./.venv.
# Prints the library's path; kinsight finds it there by default.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.32.0
if ! ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* >/dev/null 2>&1; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check "onnxruntime==$VERSION" >&2
fi
ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n1
