#!/usr/bin/env bash
# Fetches ONNX Runtime built with CUDA (the onnxruntime-gpu wheel from PyPI), once, into a
# cache outside the checkout, and prints its libonnxruntime.so. Only the shared libraries
# are kept: kinsight loads them like the CPU build (ORT_DYLIB_PATH). The CUDA provider also
# needs CUDA 13 and cuDNN 9 at run time; without them (or without a GPU) `--execution-provider
# auto` falls back to the CPU and `cuda` fails, which tests/execution_provider.rs checks.
#
#   scripts/fetch-onnxruntime-cuda.sh    # needs ./.venv (scripts/setup-onnxruntime.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.31.1
CACHE="${KINSIGHT_CACHE:-$HOME/.cache/kinsight}"
OUT="$CACHE/onnxruntime-gpu-$VERSION"
LIB="$OUT/onnxruntime/capi/libonnxruntime.so.$VERSION"
if [ -f "$LIB" ] && [ -f "$OUT/onnxruntime/capi/libonnxruntime_providers_cuda.so" ]; then
  echo "$LIB"; exit 0
fi
WHEELS="$(mktemp -d)"
trap 'rm -rf "$WHEELS"' EXIT
# The libraries do not depend on the Python version; the wheel's tag just has to exist.
.venv/bin/pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.11 --platform manylinux_2_28_x86_64 \
  "onnxruntime-gpu==$VERSION" -d "$WHEELS" >&2
mkdir -p "$OUT"
.venv/bin/python - "$WHEELS" "$OUT" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(f"{sys.argv[1]}/onnxruntime_gpu-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("onnxruntime/capi/libonnxruntime"):
            z.extract(name, sys.argv[2])
PY
echo "$LIB"
