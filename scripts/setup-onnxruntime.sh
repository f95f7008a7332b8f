#!/usr/bin/env bash
# ./.venv with ONNX Runtime from PyPI (for the `ort` crate, load-dynamic) and the Python
# tools the tests use (scripts/python-requirements.txt). Prints the library's path;
# kinsight finds it there by default. Re-installs only when the requirements change.
set -euo pipefail
cd "$(dirname "$0")/.."
REQ=scripts/python-requirements.txt
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! cmp -s "$REQ" .venv/.installed-requirements; then
  .venv/bin/pip install -q --disable-pip-version-check -r "$REQ" >&2
  .venv/bin/pip install -q --disable-pip-version-check --ignore-requires-python --no-deps helm-sdkpy==0.1.32 >&2
  cp "$REQ" .venv/.installed-requirements
fi
ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n1
