"""Per-stage breakdown of one `kinsight demo` group, from the timestamps its components log.

Reads the demo's stdout (`group completed in S s`), its stderr (API, controller) and the
worker pods' logs the demo keeps (each line stamped by the kubelet); prints one JSON line for scripts/bench.sh: images, seconds,
images_per_second and stages_s, seconds from the POST:
  queue       group created by the API -> worker Job created (controller), or its order
              handed to a waiting worker (a standby or a carrier: `carried` is then true)
  pod_start   Job created -> the worker's first log line (its container's process running);
              0 when carried (the pod was up before)
  model_load  first line (or the hand-over) -> `worker started` (ONNX Runtime and the
              models loaded; a carried order's models were loaded before: the order's fetch)
  work        `worker started` -> `worker finished`: downloads, decode, inference and result
              writes, overlapped
  delivery    `worker finished` -> the verified image_group.completed webhook (Job seen
              complete, group aggregated, webhook signed and sent)
and worker_ms, the phase totals of the worker's `worker finished` line (milliseconds):
  download, decode, preprocess, inference  summed over images (thread time, overlapped)
  download_wait   the pipeline's feed waiting for bytes (downloads start during model load)
  processed       `worker started` -> last result out of the pipeline
  result_write    time spent sending results to the ingest (in the background)
  result_tail     last result out -> last batch stored
and, with --cpu-samples (bench/cpu_sampler.py's lines), cpu_work_s: the CPU seconds each
process used during the work stage (between the samples nearest its ends), busy included.
"""

import argparse
import datetime
import glob
import json
import re


def stamp(line):
    text = line.split(" ", 1)[0].rstrip("Z")
    # Python's fromisoformat takes at most 6 fraction digits.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    return datetime.datetime.fromisoformat(text).timestamp()


def first(lines, needle, what, after=None):
    for line in lines:
        if needle in line and (after is None or stamp(line) >= after):
            return stamp(line)
    if what is None:
        return None
    raise SystemExit(f"no `{needle}` line ({what}) in the logs")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stdout", required=True)
    parser.add_argument("--stderr", required=True)
    parser.add_argument("--pod-logs", required=True, help="folder of the worker pods' logs")
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--cpu-samples", help="bench/cpu_sampler.py's output")
    args = parser.parse_args()
    out = open(args.stdout).read()
    match = re.search(r"^group completed in ([0-9.]+)s$", out, re.M)
    if not match:
        raise SystemExit("the demo printed no `group completed in` line")
    seconds = float(match.group(1))
    dev = open(args.stderr).read().splitlines()
    pods = [l for path in sorted(glob.glob(f"{args.pod_logs}/*.log")) for l in open(path)]
    created = first(dev, "image group created", "API")
    # Handed to a worker that was up (a standby, or a carrier): no pod start of its own.
    handed = first(dev, "handed a worker job's order", None)
    carried = handed is not None
    job = handed if carried else first(dev, "created worker job", "controller")
    if not pods:
        raise SystemExit(f"no worker pod logs in {args.pod_logs}")
    started = job if carried else min(stamp(l) for l in pods if l.strip())
    loaded = first(pods, "worker started", "worker", after=job)
    finished_lines = [l for l in pods if "worker finished" in l]
    if not finished_lines:
        raise SystemExit("no `worker finished` line (worker) in the logs")
    last = max(finished_lines, key=stamp)
    finished = stamp(last)
    # Older workers log no phase totals: worker_ms is then empty.
    worker_ms = {
        k[: -len("_ms")]: float(v)
        for k, v in re.findall(r"\b(\w+_ms)=(-?[0-9.]+)", last)
    }
    batches = re.search(r"\bresult_batches=(\d+)", last)
    if batches:
        worker_ms["result_batches"] = int(batches.group(1))
    completed = created + seconds
    stages = {
        "queue": job - created,
        "pod_start": started - job,
        "model_load": loaded - started,
        "work": finished - loaded,
        "delivery": completed - finished,
    }
    line = {
        "images": args.images,
        "seconds": seconds,
        "images_per_second": args.images / seconds,
        "carried": carried,
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
        "worker_ms": worker_ms,
    }
    if args.cpu_samples:
        line["cpu_work_s"] = cpu_between(args.cpu_samples, loaded, finished)
    print(json.dumps(line))


def cpu_between(path, begin, end):
    """CPU seconds per process name between the samples nearest `begin` and `end`; a
    process born or gone in between counts from its first to its last sample."""
    samples = [json.loads(l) for l in open(path) if l.strip()]
    inside = [s for s in samples if begin <= s["t"] <= end]
    if len(inside) < 2:
        return {}
    first, last = inside[0], inside[-1]
    seen = {}
    for sample in inside:
        for pid, (name, used) in sample["procs"].items():
            start = first["procs"][pid][1] if pid in first["procs"] else 0.0
            seen[pid] = (name, used - start)
    by_name = {}
    for name, used in seen.values():
        # A kernel worker's name says what it runs at the moment: one row for them all.
        name = "kworker (kernel)" if name.startswith("kworker/") else name
        by_name[name] = by_name.get(name, 0.0) + used
    out = {"window": round(last["t"] - first["t"], 2), "busy": round(last["busy"] - first["busy"], 2)}
    for name, used in sorted(by_name.items(), key=lambda kv: -kv[1]):
        if used >= 0.05:
            out[name] = round(used, 2)
    return out


if __name__ == "__main__":
    main()
