#!/usr/bin/env bash
# Benchmark: the same workload through (a) kinsight's pipeline (release build), (b) the plain
# Python pipeline a user would write (onnxruntime + Pillow + numpy) and (c) ONNX Runtime alone
# on pre-made tensors (Python onnxruntime, same sessions as (b)); plus (c') kinsight's own
# sessions, threads and batches on pre-made tensors. Prints images/s and the ratios a/b, a/c.
#
#   scripts/bench.sh                 # 240 images
#   BENCH_IMAGES=400 scripts/bench.sh
#
# The images are JPEGs of 1024-1600 px made from tests/fixtures/images (bench/make_images.py)
# in a temporary folder. Not a test: figures depend on the machine and its load.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT="${BENCH_IMAGES:-240}"

ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(realpath "$(scripts/setup-onnxruntime.sh)")}"
export ORT_DYLIB_PATH
if ! .venv/bin/python -c 'import PIL, numpy' 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check pillow numpy >&2
fi
cargo build --release --locked --quiet

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
.venv/bin/python bench/make_images.py --out "$WORK/images" --count "$COUNT" >&2

echo "cpus: $(nproc), load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
run() { echo "running $1" >&2; shift; "$@" | tail -n1 >>"$WORK/results.jsonl"; }
run "(a) kinsight pipeline" target/release/kinsight bench --images "$WORK/images"
run "(b) Python pipeline" .venv/bin/python bench/python_pipeline.py --images "$WORK/images" --mode pipeline
run "(c) onnxruntime alone" .venv/bin/python bench/python_pipeline.py --images "$WORK/images" --mode inference
run "(c') kinsight inference alone" target/release/kinsight bench --images "$WORK/images" --mode inference
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

.venv/bin/python - "$WORK/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
a, b, c, c2 = rows
print(f"{len(rows)} runs, {a['images']} images, object_detection + image_classification on each")
labels = ["(a) kinsight pipeline", "(b) Python pipeline", "(c) onnxruntime alone (Python)", "(c') kinsight inference alone"]
for label, r in zip(labels, rows):
    print(f"  {label:34} {r['images_per_second']:7.2f} images/s  ({r['seconds']:.1f} s)")
print(f"  a/b  = {a['images_per_second'] / b['images_per_second']:.2f}   (target >= 1.5)")
print(f"  a/c  = {a['images_per_second'] / c['images_per_second']:.2f}   (target >= 0.85)")
print(f"  a/c' = {a['images_per_second'] / c2['images_per_second']:.2f}")
if a.get("failed"):
    print(f"  warning: {a['failed']} images failed in (a)")
PY
