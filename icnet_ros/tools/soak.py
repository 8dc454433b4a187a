"""``icnet-node-soak``: run a real ``icnet_node`` process for a long time and check that it holds up.

    icnet-node-soak --seconds 600 --rate 10 --json soak.json

One node process (``python -m icnet_ros.node_process``, what ``ros2 run icnet_ros icnet_node`` runs) serves two
cameras, ``/soak_a/image_raw`` (rgb8 ``sensor_msgs/Image``) and ``/soak_b/image_raw/compressed`` (JPEG), each published at ``--rate`` Hz by this process
over reliable QoS. Every ``--cycle`` seconds the output subscriptions are created anew: all four outputs of both
cameras, then only ``label``, then none (so the node's lazy outputs and DDS matching are exercised over and over).
The node's resident memory (VmRSS from /proc) is sampled every ``--sample`` seconds.

Checks (exit status 1 when one fails): RSS growth from the first minute's end (the sample at 60 s) to the end
below ``--max-growth`` percent (also reported: growth from the largest RSS during minute 2, when the allocator
has settled on a loaded machine); every published frame received by the node; every received frame either served or dropped by policy
(``superseded``: a newer frame of the same camera arrived first; ``no_subscribers``: nobody listened), i.e. no
frame dropped for any other reason; the node exits with status 0 on SIGINT. DDS stays on loopback.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .demo import configure_dds
from .play import parse_size

PROG = "icnet-node-soak"
CAMERAS = ("/soak_a/image_raw", "/soak_b/image_raw/compressed")
KINDS = ("label", "color", "overlay", "confidence")
POLICY_DROPS = ("superseded", "no_subscribers")


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def output_topic(camera: str, kind: str) -> str:
    from ..node_params import base_topic, sibling_topic

    return sibling_topic(base_topic(camera)[0], f"semantic/{kind}")


def _frames(h: int, w: int, n: int = 4) -> list[np.ndarray]:
    out = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        img = np.zeros((h, w, 3), np.uint8)
        img[: h // 2] = rng.integers(0, 256, 3)
        img[h // 2:] = rng.integers(0, 256, 3)
        out.append(np.clip(img.astype(np.int16) + rng.integers(-20, 21, img.shape, dtype=np.int16), 0,
                           255).astype(np.uint8))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--model", default=None, help="checkpoint (default: the package's default model)")
    p.add_argument("--seconds", type=float, default=600.0, help="soak duration (default: %(default)s)")
    p.add_argument("--rate", type=float, default=10.0, help="frames per second per camera (default: %(default)s)")
    p.add_argument("--size", type=parse_size, default=(240, 320), metavar="HxW",
                   help="frame size (default: 240x320)")
    p.add_argument("--cycle", type=float, default=20.0, help="seconds per subscription phase (default: %(default)s)")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples (default: %(default)s)")
    p.add_argument("--max-growth", type=float, default=5.0, help="allowed RSS growth in percent from minute 1 to "
                   "the end (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="the node's num_threads (default: 0, its auto policy)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (its folder is created)")
    return p


class _NodeFailed(Exception):
    """The node process did not start (exit status 2) or died during the soak (a failed check: status 1); one line,
    the node's log kept."""

    def __init__(self, message: str, died: bool = False) -> None:
        super().__init__(message)
        self.died = died


def _log_tail(log_path: Path) -> str:
    """The node log's last error line (else its last line), for a one-line message."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(no output)"])[-1]


class _Counter:
    """Counts the messages of the current subscriptions (per camera and kind)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def callback(self, key: str) -> Any:
        def on_msg(_msg: Any) -> None:
            with self.lock:
                self.counts[key] = self.counts.get(key, 0) + 1
        return on_msg


def _diagnostics(msgs: list[Any]) -> dict[str, dict[str, str]]:
    """The newest values of each of the node's /diagnostics statuses, by status name suffix (camera topic)."""
    out: dict[str, dict[str, str]] = {}
    for arr in msgs:
        for st in arr.status:
            out[st.name.split(": ", 1)[-1]] = {kv.key: kv.value for kv in st.values}
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seconds < 90 or args.rate <= 0 or args.cycle <= 0 or args.sample <= 0 or args.threads < 0:
        print(f"{PROG}: error: --seconds must be >= 90 (RSS is compared from minute 1), --rate, --cycle and --sample "
              "> 0, --threads >= 0", file=sys.stderr)
        return 2
    from ..checkpoint import CheckpointError, default_model_path
    from .cli_checks import model_problem, output_file_problem

    problem = (model_problem(args.model) if args.model else None) or output_file_problem(args.json)
    if problem:  # now, not after the soak
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    try:
        model = args.model or str(default_model_path())
    except CheckpointError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    configure_dds(isolated_domain=True)
    try:
        return _soak(args, model)
    except _NodeFailed as e:
        print(f"{PROG}: {'FAIL' if e.died else 'error'}: {e}", file=sys.stderr)
        return 1 if e.died else 2


def _soak(args: argparse.Namespace, model: str) -> int:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage, Image
    from tqdm import tqdm

    from .. import node_params
    from ..ros_image import numpy_to_compressed, numpy_to_image
    from ..ros_spin import spin

    node_args = ["--ros-args", "-p", f"model:={model}", "-p", "device:=cpu", "-p",
                 f"image_topics:=[{','.join(CAMERAS)}]", "-p", f"num_threads:={args.threads}",
                 "-p", "publish_camera_info:=false"]
    # reliable input with a history deeper than one: with KEEP_LAST 1, DDS itself replaces a sample the executor has
    # not taken yet, uncounted; with more, every frame reaches the node, which counts what it supersedes
    if "input_qos.reliability" in node_params.SPECS:
        node_args += ["-p", "input_qos.reliability:=reliable", "-p", "input_qos.depth:=10"]
    else:  # ROS 2's standard QoS overrides
        for cam in CAMERAS:
            node_args += ["-p", f"qos_overrides.{cam}.subscription.reliability:=reliable",
                          "-p", f"qos_overrides.{cam}.subscription.depth:=10"]
    log_path = Path(tempfile.mkdtemp(prefix="icnet_soak_")) / "node.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "icnet_ros.node_process", *node_args], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    rclpy.init()
    helper = rclpy.create_node("icnet_node_soak")
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(helper)
    threading.Thread(target=spin, args=(executor,), daemon=True).start()
    reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    diag_msgs: list[Any] = []
    helper.create_subscription(DiagnosticArray, "/diagnostics", diag_msgs.append, 10)
    pubs = [helper.create_publisher(Image, CAMERAS[0], reliable),
            helper.create_publisher(CompressedImage, CAMERAS[1], reliable)]
    frames = _frames(*args.size)
    raw = [numpy_to_image(f, "rgb8", Image()) for f in frames]
    jpeg = [numpy_to_compressed(f, "RGB", "jpeg") for f in frames]
    counter = _Counter()
    subs: list[Any] = []
    phases = (KINDS, ("label",), ())
    published = [0, 0]
    rss: list[tuple[float, float]] = []
    result: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 180
        while "ready:" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise _NodeFailed(f"the node did not start: {_log_tail(log_path)} (its log: {log_path})")
            time.sleep(0.2)
        while not all(p.get_subscription_count() >= 1 for p in pubs):
            time.sleep(0.05)
        t0 = time.monotonic()
        next_sample = t0
        phase = -1
        period = 1.0 / args.rate
        i = 0
        with tqdm(total=int(args.seconds), unit="s", desc="soak") as bar:
            while True:
                now = time.monotonic()
                elapsed = now - t0
                if elapsed >= args.seconds:
                    break
                if int(elapsed // args.cycle) != phase:  # new subscription phase: fresh subscriptions
                    phase = int(elapsed // args.cycle)
                    for s in subs:
                        helper.destroy_subscription(s)
                    subs = [helper.create_subscription(Image, output_topic(cam, k), counter.callback(f"{cam}:{k}"),
                                                       reliable)
                            for cam in CAMERAS for k in phases[phase % len(phases)]]
                if now >= next_sample:
                    rss.append((round(elapsed, 1), rss_mb(proc.pid)))
                    next_sample += args.sample
                stamp = helper.get_clock().now().to_msg()
                msg = raw[i % len(raw)]
                msg.header.stamp = stamp
                pubs[0].publish(msg)
                fmt, data = jpeg[i % len(jpeg)]
                cmsg = CompressedImage(format=fmt, data=data)
                cmsg.header.stamp = stamp
                pubs[1].publish(cmsg)
                published[0] += 1
                published[1] += 1
                i += 1
                bar.n = int(elapsed)
                bar.refresh() if i % int(max(1, args.rate)) == 0 else None
                if proc.poll() is not None:
                    raise _NodeFailed(f"the node died (status {proc.returncode}): {_log_tail(log_path)} (its log: "
                                      f"{log_path})", died=True)
                time.sleep(max(0.0, t0 + i * period - time.monotonic()))
        time.sleep(3.0)  # let the last frames and a /diagnostics message arrive
        rss.append((round(time.monotonic() - t0, 1), rss_mb(proc.pid)))
        diag = _diagnostics(list(diag_msgs[-5:]))
        proc.send_signal(signal.SIGINT)
        exit_status = proc.wait(30)
        first_minute = next(v for t, v in rss if t >= 60.0)
        growth = 100.0 * (rss[-1][1] - first_minute) / first_minute
        minute_2 = max((v for t, v in rss if 60.0 <= t < 120.0), default=first_minute)  # allocator warm-up done
        cameras = {}
        lost = 0
        for cam, sent in zip(CAMERAS, published):
            d = diag.get(cam, {})
            received, processed = int(d.get("frames_received", -1)), int(d.get("frames_processed", -1))
            dropped = {k[len("dropped_"):]: int(v) for k, v in d.items() if k.startswith("dropped_")}
            dropped["no_subscribers"] = int(d.get("frames_skipped_no_subscribers", 0))
            other = {k: v for k, v in dropped.items() if k not in POLICY_DROPS and v}
            unaccounted = received - processed - sum(dropped.values())
            lost += (sent - received) + sum(other.values()) + max(0, unaccounted)
            cameras[cam] = {"published": sent, "received": received, "processed": processed, "dropped": dropped,
                            "dropped_not_by_policy": other, "in_flight_at_end": unaccounted,
                            "latency_p50_ms": d.get("latency_p50_ms"), "latency_from": d.get("latency_from")}
        result = {"seconds": args.seconds, "rate_hz": args.rate, "size": f"{args.size[0]}x{args.size[1]}",
                  "cycle_s": args.cycle, "rss_mb_at_60s": round(first_minute, 1), "rss_mb_end": round(rss[-1][1], 1),
                  "rss_mb_max": round(max(v for _, v in rss), 1), "rss_growth_pct": round(growth, 2),
                  "rss_mb_minute_2_max": round(minute_2, 1),
                  "rss_growth_from_minute_2_max_pct": round(100.0 * (rss[-1][1] - minute_2) / minute_2, 2),
                  "outputs_received": dict(sorted(counter.counts.items())), "cameras": cameras,
                  "frames_lost": lost, "node_exit_status": exit_status, "rss_samples": rss}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        executor.shutdown(timeout_sec=2.0)
        helper.destroy_node()
        rclpy.try_shutdown()
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}), flush=True)
    written = True
    if args.json:
        try:
            Path(args.json).expanduser().write_text(json.dumps(result, indent=1))
        except OSError as e:  # the verdict still follows
            written = False
            print(f"{PROG}: error: cannot write --json {args.json}: {e}", file=sys.stderr)
    ok = result["rss_growth_pct"] < args.max_growth and result["frames_lost"] == 0 and exit_status == 0
    print(f"{PROG}: {'PASS' if ok else 'FAIL'}: RSS {result['rss_mb_at_60s']} MB at 60 s -> "
          f"{result['rss_mb_end']} MB at the end ({result['rss_growth_pct']:+.2f}%, limit {args.max_growth}%); "
          f"frames lost {result['frames_lost']}; node exit status {exit_status}", flush=True)
    return (0 if written else 2) if ok else 1


if __name__ == "__main__":
    sys.exit(main())
