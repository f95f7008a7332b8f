"""Per-stage breakdown of one `kinsight demo` group, from the timestamps its components log.

Reads the demo's stdout (`group completed in S s`), its stderr (API, controller, node agent)
and the worker pod's log; prints one JSON line for scripts/bench.sh: images, seconds,
images_per_second and stages_s, seconds from the POST:
  queue       group created by the API -> worker Job created (controller)
  pod_start   Job created -> worker process started (node agent)
  model_load  process started -> `worker started` (ONNX Runtime and the models loaded)
  work        `worker started` -> `worker finished`: downloads, decode, inference and result
              writes, overlapped
  delivery    `worker finished` -> the verified image_group.completed webhook (Job seen
              complete, group aggregated, webhook signed and sent)
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


def first(lines, needle, what):
    for line in lines:
        if needle in line:
            return stamp(line)
    raise SystemExit(f"no `{needle}` line ({what}) in the logs")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stdout", required=True)
    parser.add_argument("--stderr", required=True)
    parser.add_argument("--pod-logs", required=True, help="folder of the worker pods' logs")
    parser.add_argument("--images", type=int, required=True)
    args = parser.parse_args()
    out = open(args.stdout).read()
    match = re.search(r"^group completed in ([0-9.]+)s$", out, re.M)
    if not match:
        raise SystemExit("the demo printed no `group completed in` line")
    seconds = float(match.group(1))
    dev = open(args.stderr).read().splitlines()
    pods = [l for path in sorted(glob.glob(f"{args.pod_logs}/*.log")) for l in open(path)]
    created = first(dev, "image group created", "API")
    job = first(dev, "created worker job", "controller")
    started = first(dev, "node_agent: started pod", "node agent")
    loaded = first(pods, "worker started", "worker")
    finished = max(stamp(l) for l in pods if "worker finished" in l)
    completed = created + seconds
    stages = {
        "queue": job - created,
        "pod_start": started - job,
        "model_load": loaded - started,
        "work": finished - loaded,
        "delivery": completed - finished,
    }
    print(json.dumps({
        "images": args.images,
        "seconds": seconds,
        "images_per_second": args.images / seconds,
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
    }))


if __name__ == "__main__":
    main()
