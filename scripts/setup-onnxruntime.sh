#!/usr/bin/env bash
# ./.venv with ONNX Runtime from PyPI (for the `ort` crate, load-dynamic), the benchmark's
# Python packages (scripts/python-requirements.txt) and, unless `--runtime` is given, the
# Python tools the tests use (scripts/python-test-requirements.txt, helm-sdkpy). Prints the
# library's path; kinsight finds it there by default. Re-installs only when a requirements
# file changes.
#
#   scripts/setup-onnxruntime.sh             # everything, for the tests (scripts/test.sh)
#   scripts/setup-onnxruntime.sh --runtime   # without the test tools (scripts/setup.sh, bench.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
REQS=(scripts/python-requirements.txt)
case "${1:-}" in
  "") REQS+=(scripts/python-test-requirements.txt) ;;
  --runtime) ;;
  *) echo "usage: $0 [--runtime]" >&2; exit 2 ;;
esac
# pip, not python: a venv whose creation stopped half-way (e.g. without ensurepip) is
# made again; what it had installed is then installed again.
if [ ! -x .venv/bin/pip ]; then
  python3 -m venv .venv >&2
  rm -f .venv/.installed-*
fi
for req in "${REQS[@]}"; do
  installed=".venv/.installed-$(basename "$req")"
  if ! cmp -s "$req" "$installed"; then
    .venv/bin/pip install -q --disable-pip-version-check -r "$req" >&2
    if [ "$req" = scripts/python-test-requirements.txt ]; then
      .venv/bin/pip install -q --disable-pip-version-check --ignore-requires-python --no-deps helm-sdkpy==0.1.32 >&2
    fi
    cp "$req" "$installed"
  fi
done
ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n1
