#!/usr/bin/env bash
# Benchmark: the same workload through (a) kinsight's pipeline (release build), (b) the plain
# Python pipeline a user would write (onnxruntime + Pillow + numpy) and (c) ONNX Runtime alone
# on pre-made tensors (Python onnxruntime, same sessions as (b)); plus (c') kinsight's own
# sessions, threads and batches on pre-made tensors; and (e) end to end: the images as one
# group through `kinsight demo` (a fresh local control plane, PostgreSQL, a real node running
# the worker Job's container with every core), from the POST to the verified
# `image_group.completed` webhook, images served on the node's bridge address.
# Prints images/s and the ratios a/b, a/c, e/a, e/b.
#
#   BENCH_E2E=0 scripts/bench.sh                      # without (e)
#   KINSIGHT_BIN=target/debug/kinsight scripts/bench.sh  # another binary, no release build
#
#   scripts/bench.sh                                  # 240 images, 2 rounds
#   BENCH_IMAGES=400 BENCH_ROUNDS=3 scripts/bench.sh
#   BENCH_DEMO_ARGS="--standby-workers 0" scripts/bench.sh   # (e) without a standby worker
#
# The images are JPEGs of 1024-1600 px made from tests/fixtures/images (bench/make_images.py)
# in a temporary folder. Each round runs every leg once, one after the other; each leg's best
# round is reported, so that a burst of load on a shared machine does not decide a ratio.
# Not a test: figures depend on the machine and its load.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT="${BENCH_IMAGES:-240}"
ROUNDS="${BENCH_ROUNDS:-2}"

# Always run: the Python legs need ./.venv's onnxruntime, Pillow and numpy.
ORT_LIB="$(scripts/setup-onnxruntime.sh --runtime)"
ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(realpath "$ORT_LIB")}"
export ORT_DYLIB_PATH
# kinsight's own lines (e.g. which execution provider each model runs on), not ONNX Runtime's.
export RUST_LOG="${RUST_LOG:-warn,kinsight=info}"
if [ -z "${KINSIGHT_BIN:-}" ]; then
  cargo build --release --locked --quiet
  KINSIGHT_BIN=target/release/kinsight
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
.venv/bin/python bench/make_images.py --out "$WORK/images" --count "$COUNT" >&2

echo "cpus: $(nproc), load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
run() { # leg, command...
  local leg="$1"; shift
  echo "round $round: $leg" >&2
  "$@" | tail -n1 | sed "s/^{/{\"leg\": \"$leg\", \"round\": $round, /" >>"$WORK/results.jsonl"
}
# The two models the Python legs and the demo's group run (the catalog's analysers are not in (b)).
MODELS=(--model object_detection --model image_classification)
e2e() { # one group of every image through `kinsight demo`; prints the JSON line of a leg
  local state="$WORK/dev-state-$round" port log="$WORK/demo-$round.log"
  port="$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  # The group's one worker pod gets every core, as the (a) leg's process has them.
  # Every process's CPU time, sampled once a second: who shares the cores with the worker.
  # (The sampler itself takes about 10 ms of CPU a sample, inside this leg's time only.)
  .venv/bin/python bench/cpu_sampler.py 1 >"$WORK/cpu-$round.jsonl" &
  local sampler=$!
  "$KINSIGHT_BIN" demo --photos "$WORK/images" --timeout 900s --state-dir "$state" \
    --listen "127.0.0.1:$port" --worker-cpu "$(nproc)" ${BENCH_DEMO_ARGS:-} >"$log" 2>"$log.err" || { kill "$sampler"; tail -n 20 "$log.err" >&2; return 1; }
  kill "$sampler"; wait "$sampler" 2>/dev/null || true
  .venv/bin/python bench/e2e_breakdown.py --stdout "$log" --stderr "$log.err" \
    --pod-logs "$state/pod-logs" --images "$COUNT" --cpu-samples "$WORK/cpu-$round.jsonl"
}
for round in $(seq 1 "$ROUNDS"); do
  if [ "${BENCH_E2E:-1}" != 0 ]; then run e e2e; fi
  run a "$KINSIGHT_BIN" bench "${MODELS[@]}" --images "$WORK/images"
  run b .venv/bin/python bench/python_pipeline.py --images "$WORK/images" --mode pipeline
  run c .venv/bin/python bench/python_pipeline.py --images "$WORK/images" --mode inference
  run c2 "$KINSIGHT_BIN" bench "${MODELS[@]}" --images "$WORK/images" --mode inference
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

.venv/bin/python - "$WORK/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
legs = {
    "a": "(a) kinsight pipeline",
    "b": "(b) Python pipeline",
    "c": "(c) onnxruntime alone (Python)",
    "c2": "(c') kinsight, inference alone",
    "e": "(e) end to end (kinsight demo)",
}
legs = {leg: label for leg, label in legs.items() if any(r["leg"] == leg for r in rows)}
best = {}
print(f"{rows[0]['images']} images, object_detection + image_classification on each; images/s per round:")
for leg, label in legs.items():
    runs = [r for r in rows if r["leg"] == leg]
    best[leg] = max(r["images_per_second"] for r in runs)
    rounds = "  ".join(f"{r['images_per_second']:6.2f}" for r in runs)
    print(f"  {label:34} {rounds}   best {best[leg]:6.2f}")
print(f"  a/b  = {best['a'] / best['b']:.2f}   (target >= 1.5)")
print(f"  a/c  = {best['a'] / best['c']:.2f}   (target >= 0.85)")
print(f"  a/c' = {best['a'] / best['c2']:.2f}")
if "e" in best:
    print(f"  e/a  = {best['e'] / best['a']:.2f}   (target >= 0.9)")
    print(f"  e/b  = {best['e'] / best['b']:.2f}   (target >= 1.7)")
stages = [r["stages_ms"] for r in rows if r["leg"] == "a"][-1]
inference = ", ".join(f"{m} {ms:.0f}" for m, ms in stages["inference"].items())
print(f"  (a) mean ms per image, overlapped: decode {stages['decode']:.0f}, preprocess {stages['preprocess']:.0f}, inference: {inference}")
if "e" in best:
    e_best = max((r for r in rows if r["leg"] == "e"), key=lambda r: r["images_per_second"])
    e = e_best["stages_s"]
    how = "its order handed to the standby worker" if e_best.get("carried") else "its own pod"
    print(f"  (e) seconds of the group (best round, {how}): " + ", ".join(f"{k} {v:.2f}" for k, v in e.items()))
    w = e_best.get("worker_ms") or {}
    if w:
        # The worker's own totals: download/decode/preprocess/inference summed over images.
        print("  (e) worker ms: " + ", ".join(f"{k} {v:.0f}" for k, v in w.items()))
    cpu = dict(e_best.get("cpu_work_s") or {})
    if cpu:
        window, busy = cpu.pop("window"), cpu.pop("busy")
        print(f"  (e) CPU s during the work stage ({window:.1f} s, {busy:.1f} CPU s busy): "
              + ", ".join(f"{k} {v:.1f}" for k, v in list(cpu.items())[:12]))
failed = sum(r.get("failed", 0) for r in rows if r["leg"] == "a")
if failed:
    print(f"  warning: {failed} images failed in (a)")
PY
