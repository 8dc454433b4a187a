#!/usr/bin/env python3
"""Which rgb8 image sizes reach a subscriber in another process, by QoS and Fast DDS settings (issue 13 item 5).

For each size (480x360 to 1920x1080 rgb8) and each (publisher, subscription) reliability pair, a publisher process
sends FRAMES frames at RATE Hz to a subscriber process, which counts what arrives. Two DDS settings:

- ``default``: Fast DDS without a profile file (its built-in transports: shared memory + UDPv4 with the default
  socket buffers). Run inside a private network namespace (``unshare -n``, only ``lo`` up), so the default
  settings cannot reach the network.
- ``loopback``: the project's profile (test/fastdds_loopback.xml: UDPv4 on 127.0.0.1 with 4 MiB buffers + shared
  memory), as the tests and icnet-demo use it.
- ``PROFILE.xml``: a Fast DDS profile file of your own (run in a private network namespace like ``default``).

    python scripts/qos_delivery.py                    # both settings, prints a Markdown table
    python scripts/qos_delivery.py --settings loopback --frames 20 --json out.json

Needs rclpy (the ``ros`` extra) and, for ``default``, ``unshare`` (root or user namespaces).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = ((480, 360), (640, 480), (800, 600), (1280, 720), (1920, 1080))
# (publisher reliability, subscription reliability): a camera driver's reliable default with the node's
# sensor-data subscription, the same publisher with a reliable subscription, and sensor data on both ends.
PAIRS = (("reliable", "best_effort"), ("reliable", "reliable"), ("best_effort", "best_effort"))


def _qos(reliability: str, depth: int):
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=ReliabilityPolicy.RELIABLE if reliability == "reliable"
                      else ReliabilityPolicy.BEST_EFFORT)


def _topic(w: int, h: int, pub: str, sub: str) -> str:
    return f"/qos_probe/s{w}x{h}/{pub}_to_{sub}"


def run_subscriber(out_path: str, seconds: float) -> None:
    import rclpy
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("qos_probe_sub")
    counts: dict[str, int] = {}
    subs = []
    for w, h in SIZES:
        for pub, sub in PAIRS:
            topic = _topic(w, h, pub, sub)
            counts[topic] = 0
            subs.append(node.create_subscription(Image, topic, lambda m, t=topic: counts.__setitem__(t, counts[t] + 1),
                                                 _qos(sub, 1)))
    Path(out_path + ".ready").touch()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not Path(out_path + ".done").exists():
        rclpy.spin_once(node, timeout_sec=0.05)
    end = time.monotonic() + 2.0  # frames still in flight
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.05)
    Path(out_path).write_text(json.dumps(counts))
    node.destroy_node()
    rclpy.try_shutdown()


def run_publisher(done_path: str, frames: int, rate: float) -> None:
    import numpy as np
    import rclpy
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("qos_probe_pub")
    for w, h in SIZES:
        data = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8).tobytes()
        for pub, sub in PAIRS:
            topic = _topic(w, h, pub, sub)
            p = node.create_publisher(Image, topic, _qos(pub, 10 if pub == "reliable" else 5))
            deadline = time.monotonic() + 15.0
            while p.get_subscription_count() < 1 and time.monotonic() < deadline:
                rclpy.spin_once(node, timeout_sec=0.05)
            time.sleep(0.5)  # let the match settle on both sides
            msg = Image(height=h, width=w, encoding="rgb8", step=w * 3, data=data)
            for _ in range(frames):
                msg.header.stamp = node.get_clock().now().to_msg()
                p.publish(msg)
                rclpy.spin_once(node, timeout_sec=1.0 / rate)
            end = time.monotonic() + 1.0  # reliable: let retransmissions finish before the next topic
            while time.monotonic() < end:
                rclpy.spin_once(node, timeout_sec=0.05)
    Path(done_path).touch()
    node.destroy_node()
    rclpy.try_shutdown()


def measure(setting: str, frames: int, rate: float) -> dict[str, int]:
    """Run one subscriber and one publisher process under ``setting``; returns frames received per topic."""
    env = dict(os.environ)
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 100)))
    env.pop("ROS_LOCALHOST_ONLY", None)
    if setting == "loopback":
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO / "test" / "fastdds_loopback.xml")
    elif setting.endswith(".xml"):  # a profile file of your own
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(Path(setting).resolve())
    else:
        env.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
    with tempfile.TemporaryDirectory(prefix="qos_delivery_") as tmp:
        out = str(Path(tmp) / "counts.json")
        seconds = 30 + len(SIZES) * len(PAIRS) * (frames / rate + 3)
        me = [sys.executable, str(Path(__file__).resolve())]
        script = (f"{' '.join(me)} --role sub --out {out} --seconds {seconds} & "
                  f"while [ ! -f {out}.ready ]; do sleep 0.1; done; "
                  f"{' '.join(me)} --role pub --out {out}.done --frames {frames} --rate {rate}; wait")
        if setting != "loopback":  # a private network namespace: only lo, so default transports stay local
            cmd = ["unshare", "-n", "bash", "-c", "ip link set lo up && " + script]
        else:
            cmd = ["bash", "-c", script]
        subprocess.run(cmd, env=env, check=True, timeout=seconds + 60)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=["default", "loopback"],
                    help="default | loopback | PROFILE.xml (a Fast DDS profile file of your own)")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--role", choices=["pub", "sub"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=120.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "sub":
        run_subscriber(args.out, args.seconds)
        return 0
    if args.role == "pub":
        run_publisher(args.out, args.frames, args.rate)
        return 0

    results = {s: measure(s, args.frames, args.rate) for s in args.settings}
    header = "| DDS settings | publisher -> subscription | " + " | ".join(
        f"{w}x{h} ({w * h * 3 // 1024} KiB)" for w, h in SIZES) + " |"
    print(header)
    print("|" + " --- |" * (2 + len(SIZES)))
    for setting, counts in results.items():
        for pub, sub in PAIRS:
            cells = [f"{counts[_topic(w, h, pub, sub)]}/{args.frames}" for w, h in SIZES]
            print(f"| {setting} | {pub} -> {sub} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
