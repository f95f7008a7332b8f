"""Samples every process's CPU time from /proc until stopped: one JSON line per sample,
{"t": unix seconds, "busy": machine busy CPU seconds, "procs": {pid: [name, CPU seconds]}}.

scripts/bench.sh runs it beside the (e) leg; e2e_breakdown.py then tells which processes
used the cores while the group's worker ran (`--cpu-samples`).
"""

import json
import os
import signal
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")


def busy():
    with open("/proc/stat") as f:
        fields = [float(v) for v in f.readline().split()[1:9]]
    # user nice system idle iowait irq softirq steal: all but idle and iowait.
    return (sum(fields) - fields[3] - fields[4]) / TICKS


def processes():
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.find("(") + 1 : text.rfind(")")]
        if name in ("kinsight", "python3", "python"):
            # Which of them: `kinsight worker` or `kinsight demo`, the receiver's script...
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                name += " " + os.path.basename(argv[1].decode(errors="replace"))
            except (OSError, IndexError):
                pass
        rest = text[text.rfind(")") + 1 :].split()
        out[pid] = [name, (float(rest[11]) + float(rest[12])) / TICKS]
    return out


def main():
    every = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        line = {"t": time.time(), "busy": busy(), "procs": processes()}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        time.sleep(every)


if __name__ == "__main__":
    main()
