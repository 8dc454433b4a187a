"""Seconds from starting the icnet_node process to its 'ready:' line (default model unless --model, CPU, no camera
publishing), a few runs; the median is what BENCHMARKS.md quotes.

    python scripts/node_ready_time.py [--repo DIR] [--runs 3] [--model PATH]

``--repo`` runs another checkout's package (e.g. a ``git worktree`` of an older commit) with the same venv. DDS
stays on this machine: loopback discovery, this repository's Fast DDS profile and domain 97 unless set."""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=str(HERE), help="checkout whose icnet_ros runs (default: this one)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--model", default=None, help="model file (default: the package's default model)")
    args = p.parse_args()
    if args.runs < 1:
        p.error(f"--runs must be >= 1, got {args.runs}")
    env = {**os.environ, "PYTHONPATH": args.repo}
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(HERE / "test" / "fastdds_loopback.xml"))
    env.setdefault("ROS_DOMAIN_ID", "97")
    command = [sys.executable, "-m", "icnet_ros.node_process", "--ros-args", "-p", "device:=cpu",
               *(["-p", f"model:={args.model}"] if args.model else [])]
    times = []
    for _ in range(args.runs):
        t0 = time.monotonic()
        proc = subprocess.Popen(command, cwd=args.repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
        ready = None
        try:
            for line in proc.stdout:
                if "ready:" in line:
                    ready = time.monotonic() - t0
                    break
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
        if ready is None:
            print(f"the node ended without a ready line (exit status {proc.returncode})", file=sys.stderr)
            return 1
        times.append(ready)
    times.sort()
    print(f"{args.repo}: ready after {', '.join(f'{t:.2f}' for t in times)} s; median {statistics.median(times):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
