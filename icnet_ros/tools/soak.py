"""``icnet-node-soak``: run a real ``icnet_node`` process for a long time and check that it holds up.

    icnet-node-soak --seconds 600 --rate 10 --json soak.json

One node process (``python -m icnet_ros.node_process``, what ``ros2 run icnet_ros icnet_node`` runs) serves two
cameras, ``/soak_a/image_raw`` (rgb8 ``sensor_msgs/Image``) and ``/soak_b/image_raw/compressed`` (JPEG), each
published at ``--rate`` Hz by this process over reliable QoS. Every ``--cycle`` seconds the output subscriptions are
created anew: all four outputs of both cameras, then only ``label``, then none (so the node's lazy outputs and DDS
matching are exercised over and over).
The node's resident memory (VmRSS from /proc) is sampled every ``--sample`` seconds.

Checks (exit status 1 when one fails, :func:`verdict`): RSS growth from the first minute's end (the sample at 60 s)
to the end below ``--max-growth`` percent (also reported: growth from the largest RSS during minute 2, when the
allocator has settled on a loaded machine); every published frame received by the node; every received frame either
served or dropped by policy (``superseded``: a newer frame of the same camera arrived first; ``no_subscribers``:
nobody listened), i.e. no frame dropped for any other reason; the outputs arrive (:func:`output_check`: per camera,
every frame the node processed gave an output, and per output kind, every frame processed while that kind was
subscribed gave that output, less :data:`OUTPUT_SLACK_S` seconds of frames plus :data:`OUTPUT_SLACK_FRAMES` per
subscription window: the frames in flight when a window's subscriptions are created and destroyed); the node keeps
serving (:func:`silences`: per camera, no frame published while its outputs were subscribed waits more than
``--max-silence`` seconds, default max(5 s, 10 frame periods), for the camera's next output in that subscription
window: a node whose worker stalls turns every frame into a ``superseded`` policy drop and processes none, which the
checks above do not see);
the node exits with status 0 on SIGINT (within :data:`STOP_TIMEOUT_S`; else it is killed and the soak fails). A
node that is merely slower than ``--rate`` passes: the share of the frames received while subscribed that it served
is reported, not judged (it depends on the machine, its load and the model). A node that dies during the soak fails
it at once, with the results so far printed and written (``node_exit_problem``: ``node died (status N): ...``).
Ctrl-C or SIGTERM (``kill``, ``timeout``, a CI cancel) stops the soak early: the node is stopped, the results so far
are printed and written (``"interrupted": true``), no verdict, exit status 130 (143 for SIGTERM). The node process
is also sent SIGTERM when the soak process dies (Linux: a parent-death signal), so no node outlives it. ``--size``
and ``--rate`` are checked before the node starts (the node's frame bounds; at least
:data:`MIN_FRAMES_PER_WINDOW` frames per subscription window, at most :data:`MAX_RATE` Hz), and so is ``--json``
(its folder must take a new file); it is written whole or not at all, a failed write is one line ``cannot write FILE:
REASON`` (exit status 2 when the soak passed), and ``--json -`` prints it on stdout (the verdict then on stderr).
DDS stays on loopback.
"""
from __future__ import annotations

import argparse
import bisect
import json
import math
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
from .cli_checks import write_json
from .play import parse_size

PROG = "icnet-node-soak"
CAMERAS = ("/soak_a/image_raw", "/soak_b/image_raw/compressed")
KINDS = ("label", "color", "overlay", "confidence")
POLICY_DROPS = ("superseded", "no_subscribers")
PHASES = (KINDS, ("label",), ())  # the output kinds subscribed in each subscription window, in turn
#: tolerance of the output check per subscription window: this many seconds of frames (at --rate) plus
#: OUTPUT_SLACK_FRAMES. It covers the frames the node processed while a window's fresh subscriptions were not matched
#: yet, and those whose outputs were in flight when the window's subscriptions were destroyed (a node that publishes
#: nothing, or drops a kind, falls short by a whole window's frames)
OUTPUT_SLACK_S = 1.0
OUTPUT_SLACK_FRAMES = 2
STOP_TIMEOUT_S = 30.0  # for the node's exit after SIGINT
#: the default --max-silence: max(SILENCE_MIN_S, SILENCE_PERIODS / rate) seconds
SILENCE_MIN_S = 5.0
SILENCE_PERIODS = 10
#: --rate x min(--cycle, --seconds) must be at least this: fewer frames per subscription window check nothing
MIN_FRAMES_PER_WINDOW = 5
MAX_RATE = 1000.0  # Hz; --rate's upper bound (the output check's tolerance grows with the rate)
SPINNER_THREAD = "icnet_node_soak_executor"  # the thread spinning the executor (joined before the process ends)
#: the longest the soak loop sleeps: a node's death and the progress bar are seen within it
MAX_SLEEP_S = 1.0
MIN_SAMPLE_S = 0.1  # --sample's lower bound (RSS from /proc: a smaller period measures nothing more)


def default_max_silence(rate: float) -> float:
    return max(SILENCE_MIN_S, SILENCE_PERIODS / rate)


def wake_time(now: float, next_frame: float, next_sample: float, window_end: float, end: float) -> float:
    """When the soak loop wakes next (times in time.monotonic() seconds): for the next frame due, RSS sample or
    subscription window, within :data:`MAX_SLEEP_S` (a node's death is seen then), and never after the soak's
    ``end`` (it slept a whole frame period first: --rate 0.005 ran 200 s of a 90 s soak, a tiny rate overflowed
    time.sleep)."""
    return min(next_frame, next_sample, window_end, end, now + MAX_SLEEP_S)


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
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("``", ""),
                                epilog="Checks (exit status 1 when one fails): RSS growth from 60 s to the end below "
                                "--max-growth; every published frame received by the node and every received frame "
                                "served or dropped by policy (superseded, no_subscribers); every processed frame's "
                                "outputs received (each subscribed kind); the node keeps serving: no frame published "
                                "while its camera's outputs are subscribed waits longer than --max-silence for an "
                                "output of that subscription window; the node exits with status 0 on SIGINT (within "
                                f"{STOP_TIMEOUT_S:g} s). A slower node passes: the share of frames served is "
                                "reported. Ctrl-C or SIGTERM: the results so far, exit status 130 or 143.")
    p.add_argument("--model", default=None, help="model file the node loads, on the CPU: a checkpoint "
                   "(.safetensors), an ONNX export (.onnx, ONNX Runtime) or an OpenVINO IR (.xml) (default: the "
                   "package's default model)")
    p.add_argument("--seconds", type=float, default=600.0, help="soak duration (default: %(default)s)")
    p.add_argument("--rate", type=float, default=10.0, help="frames per second per camera (default: %(default)s)")
    p.add_argument("--size", type=parse_size, default=(240, 320), metavar="HxW",
                   help="frame size (default: 240x320)")
    p.add_argument("--cycle", type=float, default=20.0, help="seconds per subscription phase (default: %(default)s)")
    p.add_argument("--sample", type=float, default=5.0,
                   help=f"seconds between RSS samples (at least {MIN_SAMPLE_S:g}; default: %(default)s)")
    p.add_argument("--max-growth", type=float, default=5.0, help="allowed RSS growth in percent from minute 1 to "
                   "the end (default: %(default)s)")
    p.add_argument("--max-silence", type=float, default=None, metavar="S", help="longest wait allowed from a frame "
                   "published while its camera's outputs are subscribed to the camera's next output (default: "
                   f"max({SILENCE_MIN_S:g}, {SILENCE_PERIODS} / --rate) seconds)")
    p.add_argument("--threads", type=int, default=0, help="the node's num_threads (default: 0, its auto policy)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (its folder is created; "
                   "'-': on stdout, the verdict then on stderr)")
    return p


class _NodeFailed(Exception):
    """The node process did not start or its subscriptions did not match (exit status 2); one line, the node's log
    kept. (A node that dies during the soak is a failed check: the results so far, exit status 1.)"""


def _log_tail(log_path: Path) -> str:
    """The node log's last error line (else its last line), for a one-line message."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(no output)"])[-1]


class _Counter:
    """Counts the output messages per subscription window and ``camera:kind``; keeps each window's time line (its
    start and end, when frames were published, when each camera's outputs arrived: time.monotonic()) for
    :func:`silences`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.windows: list[tuple[tuple[str, ...], dict[str, int]]] = []  # (kinds subscribed, counts)
        self.times: list[dict[str, Any]] = []  # per window: kinds, start, end, published, outputs {camera: [t]}

    def new_window(self, kinds: tuple[str, ...], now: float) -> int:
        """A new subscription window from ``now`` (the previous one ends then)."""
        with self.lock:
            self._end(now)
            self.windows.append((tuple(kinds), {}))
            self.times.append({"kinds": tuple(kinds), "start": now, "end": None, "published": [], "outputs": {}})
            return len(self.windows) - 1

    def _end(self, now: float) -> None:
        if self.times and self.times[-1]["end"] is None:
            self.times[-1]["end"] = now

    def end(self, now: float) -> None:
        """The publishing stopped at ``now``: the last window ends."""
        with self.lock:
            self._end(now)

    def published(self, now: float) -> None:
        """Frames (one per camera) were published at ``now``."""
        with self.lock:
            if self.times:
                self.times[-1]["published"].append(now)

    def callback(self, window: int, key: str) -> Any:
        camera = key.rsplit(":", 1)[0]

        def on_msg(_msg: Any) -> None:
            now = time.monotonic()
            with self.lock:
                counts = self.windows[window][1]
                counts[key] = counts.get(key, 0) + 1
                self.times[window]["outputs"].setdefault(camera, []).append(now)
        return on_msg

    def timeline(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(w, published=list(w["published"]), outputs={c: list(t) for c, t in w["outputs"].items()})
                    for w in self.times]

    def snapshot(self) -> list[tuple[tuple[str, ...], dict[str, int]]]:
        with self.lock:
            return [(kinds, dict(counts)) for kinds, counts in self.windows]

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, counts in self.snapshot():
            for key, n in counts.items():
                out[key] = out.get(key, 0) + n
        return dict(sorted(out.items()))


def output_check(windows: list[tuple[tuple[str, ...], dict[str, int]]], processed: dict[str, int], rate: float,
                 slack_s: float = OUTPUT_SLACK_S, slack_frames: int = OUTPUT_SLACK_FRAMES) -> dict[str, dict[str, int]]:
    """Outputs expected and received, per camera and per ``camera:kind``, from the counts of each subscription
    window (``(kinds subscribed, {"camera:kind": outputs received})``) and the frames each camera's node processed
    (``frames_processed``; the node processes a frame only while some output of its camera is subscribed).

    The frames the node served in a window = the most outputs of one kind received in it (each processed frame gives
    every subscribed kind). Per camera: ``expected`` = frames processed, ``received`` = frames served, summed over
    the windows. Per ``camera:kind``: ``expected`` = frames served in the windows where the kind was subscribed,
    ``received`` = its outputs in them. ``allowed`` = shortfall tolerated: ``ceil(rate * slack_s) + slack_frames``
    per window counted. A row is short when ``received < expected - allowed``. A camera whose processed count is
    unknown (< 0: no /diagnostics) has no rows (its frames are counted as lost)."""
    per_window = math.ceil(rate * slack_s) + slack_frames
    rows: dict[str, dict[str, int]] = {}
    active = [(kinds, counts) for kinds, counts in windows if kinds]
    for cam, done in processed.items():
        if done < 0:
            continue
        served = [max(counts.get(f"{cam}:{k}", 0) for k in kinds) for kinds, counts in active]
        rows[cam] = {"expected": done, "received": sum(served), "allowed": per_window * len(active)}
        for kind in sorted({k for kinds, _ in active for k in kinds}, key=lambda k: (k != "label", k)):
            mine = [(counts, n) for (kinds, counts), n in zip(active, served) if kind in kinds]
            rows[f"{cam}:{kind}"] = {"expected": sum(n for _, n in mine),
                                     "received": sum(counts.get(f"{cam}:{kind}", 0) for counts, _ in mine),
                                     "allowed": per_window * len(mine)}
    return rows


def silences(timeline: list[dict[str, Any]], cameras: tuple[str, ...] = CAMERAS) -> dict[str, float]:
    """Per camera, the longest wait in seconds from a frame published while some output of the camera was subscribed
    to the camera's next output (any kind) in the same subscription window, or to the window's end when none came
    (0.0: no frame published while subscribed). ``timeline``: per subscription window, ``{"kinds": kinds subscribed,
    "start": t, "end": t, "published": [t, ...], "outputs": {camera: [t, ...]}}`` (times in seconds, one clock).

    A healthy node answers within its processing time (a newer frame supersedes one it cannot take, but it serves
    one); a node whose worker stalls answers no frame until it recovers, however many are published. Each window on
    its own: a window's first frames wait for its fresh subscriptions to match (included), its last outputs may be
    cut off by their destruction (a frame published less than the limit before the window's end cannot exceed
    it), and the previous window's tail does not count against the next (a stall is seen once it lasts the limit
    inside one window)."""
    out = {cam: 0.0 for cam in cameras}
    for w in timeline:
        if not w["kinds"] or not w["published"]:
            continue
        end = w["end"] if w["end"] is not None else max(w["published"])
        for cam in cameras:
            arrivals = sorted(w["outputs"].get(cam, []))
            for t in w["published"]:
                i = bisect.bisect_left(arrivals, t)
                answered = min(arrivals[i], end) if i < len(arrivals) else end
                out[cam] = max(out[cam], answered - t)
    return {cam: round(v, 2) for cam, v in out.items()}


def output_shortfalls(rows: dict[str, dict[str, int]]) -> list[str]:
    """The rows of :func:`output_check` that fall short, as text ('/soak_a/image_raw: 0 of 140 ...')."""
    out = []
    for key, r in rows.items():
        if r["received"] < r["expected"] - r["allowed"]:
            what = "processed frames gave an output" if ":" not in key else "outputs"
            out.append(f"{key}: {r['received']} of {r['expected']} {what} (tolerance {r['allowed']})")
    return out


def verdict(result: dict[str, Any], max_growth: float) -> list[str]:
    """Why the soak failed (empty: PASS), from its results (:func:`summarize`)."""
    failures = []
    growth = result.get("rss_growth_pct")
    if growth is None:
        failures.append("no RSS sample at 60 s")
    elif not growth < max_growth:
        failures.append(f"RSS grew {growth:+.2f}% (limit {max_growth}%)")
    if result["frames_lost"]:
        failures.append(f"{result['frames_lost']} frame(s) lost")
    short = output_shortfalls(result["outputs_check"])
    if short:
        failures.append("outputs short: " + "; ".join(short))
    silent = stalls(result)
    if silent:
        failures.append("node stopped serving: " + "; ".join(silent))
    if result.get("node_exit_problem"):
        failures.append(result["node_exit_problem"])
    elif result["node_exit_status"] != 0:
        failures.append(f"node exit status {result['node_exit_status']}")
    return failures


def stalls(result: dict[str, Any]) -> list[str]:
    """The cameras whose longest silence (:func:`silences`) exceeds ``max_silence_s``, as text."""
    limit = result.get("max_silence_s")
    return [f"{cam}: no output for {s:.1f} s while subscribed (limit {limit:g} s)"
            for cam, s in result.get("longest_silence_s", {}).items() if limit is not None and s > limit]


def served_shares(result: dict[str, Any]) -> list[str]:
    """Per camera, the share of the frames received while its outputs were subscribed that the node processed
    ('/soak_a/image_raw 44%'); a slower node serves fewer (reported, not judged)."""
    out = []
    for cam, c in result.get("cameras", {}).items():
        offered = c["received"] - c["dropped"].get("no_subscribers", 0)
        if c["received"] >= 0 and c["processed"] >= 0 and offered > 0:
            out.append(f"{cam} {100.0 * c['processed'] / offered:.0f}%")
    return out


def stop_node(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> tuple[int | None, str | None]:
    """SIGINT the node process and wait for it: ``(exit status, None)``; when it has not exited after ``timeout``
    seconds it is killed: ``(None, "node did not exit on SIGINT within <timeout> s (killed)")``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout), None
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None, f"node did not exit on SIGINT within {timeout:g} s (killed)"


def _diagnostics(msgs: list[Any]) -> dict[str, dict[str, str]]:
    """The newest values of each of the node's /diagnostics statuses, by status name suffix (camera topic)."""
    out: dict[str, dict[str, str]] = {}
    for arr in msgs:
        for st in arr.status:
            out[st.name.split(": ", 1)[-1]] = {kv.key: kv.value for kv in st.values}
    return out


def main(argv: list[str] | None = None) -> int:
    from .cli_checks import run_ros_tool

    # SIGTERM (kill, timeout, a CI cancel) as Ctrl-C: the node stopped, results kept
    return run_ros_tool(PROG, argv, _main)


def _main(argv: list[str] | None, stop: Any) -> int:
    args = build_parser().parse_args(argv)
    numbers = (args.seconds, args.rate, args.cycle, args.sample, args.max_growth)
    if (not all(math.isfinite(v) for v in numbers) or args.seconds < 90 or args.rate <= 0 or args.cycle <= 0
            or args.sample < MIN_SAMPLE_S or args.threads < 0):
        print(f"{PROG}: error: --seconds must be >= 90 (RSS is compared from minute 1), --rate and --cycle > 0, "
              f"--sample >= {MIN_SAMPLE_S:g}, --threads >= 0 (all finite)", file=sys.stderr)
        return 2
    from ..checkpoint import CheckpointError, default_model_path
    from .cli_checks import frame_size_problem, model_problem, output_file_problem

    window = min(args.cycle, args.seconds)
    if not (args.rate * window >= MIN_FRAMES_PER_WINDOW and args.rate <= MAX_RATE):
        print(f"{PROG}: error: --rate {args.rate:g}: at least {MIN_FRAMES_PER_WINDOW} frames per subscription window "
              f"(--rate x min(--cycle, --seconds) = {args.rate * window:g}), at most {MAX_RATE:g} Hz", file=sys.stderr)
        return 2
    if args.max_silence is not None and not (math.isfinite(args.max_silence) and args.max_silence > 0):
        print(f"{PROG}: error: --max-silence must be a finite number > 0, got {args.max_silence}", file=sys.stderr)
        return 2
    if args.model and Path(args.model).suffix.lower() in (".engine", ".plan"):
        print(f"{PROG}: error: --model {args.model}: a TensorRT engine needs CUDA; the soak runs the node on the CPU "
              "(soak its .onnx export instead)", file=sys.stderr)
        return 2
    # --size as the node takes frames (the node's default max_pixels, the model's input size: it would drop every
    # frame), after the model file is known to be one
    problem = ((model_problem(args.model) if args.model else None) or frame_size_problem(args.size, args.model)
               or output_file_problem(args.json))
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
        return _soak(args, model, stop)
    except _NodeFailed as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def _parent_death_signal() -> Any:
    """A ``preexec_fn`` that has the child sent SIGTERM when this process ends, however it ends (SIGKILL, the OOM
    killer): Linux's ``prctl(PR_SET_PDEATHSIG)``. None where there is no prctl."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # this process ended before the prctl: nobody to serve
            os._exit(1)
    return preexec


def summarize(args: argparse.Namespace, rss: list[tuple[float, float]], published: list[int],
              diag: dict[str, dict[str, str]], windows: list[tuple[tuple[str, ...], dict[str, int]]],
              outputs_received: dict[str, int], exit_status: int | None, exit_problem: str | None,
              elapsed: float, interrupted: bool, timeline: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The soak's results (what ``--json`` holds) from the data collected; RSS figures None without their samples."""
    first_minute = next((v for t, v in rss if t >= 60.0), None)
    end = rss[-1][1] if rss else None
    minute_2 = max((v for t, v in rss if 60.0 <= t < 120.0), default=first_minute)  # allocator warm-up done

    def pct(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(100.0 * (b - a) / a, 2)

    cameras = {}
    lost = 0
    processed = {}
    for cam, sent in zip(CAMERAS, published):
        d = diag.get(cam, {})
        received, done = int(d.get("frames_received", -1)), int(d.get("frames_processed", -1))
        dropped = {k[len("dropped_"):]: int(v) for k, v in d.items() if k.startswith("dropped_")}
        dropped["no_subscribers"] = int(d.get("frames_skipped_no_subscribers", 0))
        other = {k: v for k, v in dropped.items() if k not in POLICY_DROPS and v}
        unaccounted = received - done - sum(dropped.values())
        lost += (sent - received) + sum(other.values()) + max(0, unaccounted)
        processed[cam] = done
        cameras[cam] = {"published": sent, "received": received, "processed": done, "dropped": dropped,
                        "dropped_not_by_policy": other, "in_flight_at_end": unaccounted,
                        "latency_p50_ms": d.get("latency_p50_ms"), "latency_from": d.get("latency_from")}
    result = {"seconds": args.seconds, "rate_hz": args.rate, "size": f"{args.size[0]}x{args.size[1]}",
              "cycle_s": args.cycle, "rss_mb_at_60s": None if first_minute is None else round(first_minute, 1),
              "rss_mb_end": None if end is None else round(end, 1),
              "rss_mb_max": round(max(v for _, v in rss), 1) if rss else None,
              "rss_growth_pct": pct(first_minute, end),
              "rss_mb_minute_2_max": None if minute_2 is None else round(minute_2, 1),
              "rss_growth_from_minute_2_max_pct": pct(minute_2, end),
              "outputs_received": outputs_received,
              "outputs_check": output_check(windows, processed, args.rate),
              "longest_silence_s": silences(timeline or []),
              "max_silence_s": args.max_silence if args.max_silence is not None else default_max_silence(args.rate),
              "cameras": cameras, "frames_lost": lost, "node_exit_status": exit_status,
              "node_exit_problem": exit_problem, "rss_samples": rss}
    if interrupted:
        result.update(interrupted=True, seconds_run=round(elapsed, 1))
    return result


def _soak(args: argparse.Namespace, model: str, stop: Any) -> int:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage, Image
    from tqdm import tqdm

    from .. import node_params
    from ..ros_image import numpy_to_compressed, numpy_to_image
    from ..ros_spin import cleanup, init_without_signal_handlers, join_spinners, start_spinner

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
    frames = _frames(*args.size)  # before the node starts: nothing to clean up when they cannot be made
    raw = [numpy_to_image(f, "rgb8", Image()) for f in frames]
    jpeg = [numpy_to_compressed(f, "RGB", "jpeg") for f in frames]
    log_path = Path(tempfile.mkdtemp(prefix="icnet_soak_")) / "node.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "icnet_ros.node_process", *node_args], stdout=log,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=_parent_death_signal())
    # from here on, everything is inside the try whose finally stops the node process
    helper = executor = None
    counter = _Counter()
    subs: list[Any] = []
    published = [0, 0]
    rss: list[tuple[float, float]] = []
    t0: float | None = None
    elapsed = 0.0
    interrupted = False
    exit_status: int | None = None
    exit_problem: str | None = None
    diag: dict[str, dict[str, str]] = {}
    diag_msgs: list[Any] = []

    def died(now: float) -> bool:
        """The node process ended by itself: its status and the problem recorded (the soak fails on it)."""
        nonlocal exit_status, exit_problem
        if proc.poll() is None:
            return False
        counter.end(now)
        exit_status = proc.returncode
        exit_problem = f"node died (status {proc.returncode}): {_log_tail(log_path)} (its log: {log_path})"
        return True

    try:
        try:
            init_without_signal_handlers()  # Ctrl-C: a KeyboardInterrupt here, handled below
            stop.install()  # SIGTERM as Ctrl-C (and SIGINT's handler again, which the line above reset)
            helper = rclpy.create_node("icnet_node_soak")
            executor = MultiThreadedExecutor(num_threads=2)
            executor.add_node(helper)
            start_spinner(executor, SPINNER_THREAD)
            reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            helper.create_subscription(DiagnosticArray, "/diagnostics", diag_msgs.append, 10)
            pubs = [helper.create_publisher(Image, CAMERAS[0], reliable),
                    helper.create_publisher(CompressedImage, CAMERAS[1], reliable)]
            deadline = time.monotonic() + 180
            while "ready:" not in log_path.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise _NodeFailed(f"the node did not start: {_log_tail(log_path)} (its log: {log_path})")
                time.sleep(0.2)
            deadline = time.monotonic() + 60
            while not all(p.get_subscription_count() >= 1 for p in pubs) and proc.poll() is None:
                if time.monotonic() > deadline:  # (a node that died meanwhile: reported by the loop below)
                    raise _NodeFailed(f"the node's subscriptions did not match within 60 s (its log: {log_path})")
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
                    if died(now):
                        break
                    if elapsed >= args.seconds:
                        counter.end(now)
                        break
                    if int(elapsed // args.cycle) != phase:  # new subscription window: fresh subscriptions
                        phase = int(elapsed // args.cycle)
                        for s in subs:
                            helper.destroy_subscription(s)
                        kinds = PHASES[phase % len(PHASES)]
                        window = counter.new_window(kinds, now)
                        subs = [helper.create_subscription(Image, output_topic(cam, k),
                                                           counter.callback(window, f"{cam}:{k}"), reliable)
                                for cam in CAMERAS for k in kinds]
                    if now >= next_sample:
                        try:
                            rss.append((round(elapsed, 1), rss_mb(proc.pid)))
                        except (OSError, RuntimeError):  # it died just now (a zombie has no VmRSS): seen above next
                            pass
                        next_sample += args.sample  # on the grid; after a late sample, one period from now
                        next_sample = next_sample if next_sample > now else now + args.sample
                    if now >= t0 + i * period:  # this frame is due
                        stamp = helper.get_clock().now().to_msg()
                        msg = raw[i % len(raw)]
                        msg.header.stamp = stamp
                        pubs[0].publish(msg)
                        fmt, data = jpeg[i % len(jpeg)]
                        cmsg = CompressedImage(format=fmt, data=data)
                        cmsg.header.stamp = stamp
                        pubs[1].publish(cmsg)
                        counter.published(time.monotonic())
                        published[0] += 1
                        published[1] += 1
                        i += 1
                    if int(elapsed) != bar.n:
                        bar.n = int(elapsed)
                        bar.refresh()
                    now = time.monotonic()
                    time.sleep(max(0.0, wake_time(now, t0 + i * period, next_sample, t0 + (phase + 1) * args.cycle,
                                                  t0 + args.seconds) - now))
            if exit_problem is None:
                time.sleep(3.0)  # let the last frames and a /diagnostics message arrive
        except KeyboardInterrupt:
            interrupted = True
            counter.end(time.monotonic())
            if t0 is None:
                print(f"{PROG}: interrupted before the soak started", file=sys.stderr)
                return stop.exit_code
            elapsed = time.monotonic() - t0
        try:
            if interrupted:  # a /diagnostics message newer than the last frames, for the counts so far
                seen, until = len(diag_msgs), time.monotonic() + 2.0
                while len(diag_msgs) == seen and time.monotonic() < until and proc.poll() is None:
                    time.sleep(0.05)
            try:
                rss.append((round(time.monotonic() - t0, 1), rss_mb(proc.pid)))
            except (OSError, RuntimeError):  # the node is gone already (a Ctrl-C in the terminal reaches it too)
                pass
            diag = _diagnostics(list(diag_msgs[-5:]))
            if exit_problem is None:  # (a node that died: its status is recorded)
                exit_status, exit_problem = stop_node(proc, STOP_TIMEOUT_S)
        except KeyboardInterrupt:  # Ctrl-C again: the node is killed below, its exit status unknown
            interrupted = True
            exit_problem = "interrupted while the node was stopping (killed)"
    finally:
        def kill_node() -> None:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

        # each step on its own: a further Ctrl-C during one must not skip the others or end in a traceback; the
        # spinning thread is joined once the executor and the context are shut down, so that it is not inside rclpy
        # when the interpreter finalises (as icnet-demo)
        steps = [kill_node]
        steps += [lambda: executor.shutdown(timeout_sec=2.0)] if executor is not None else []
        steps += [helper.destroy_node] if helper is not None else []
        steps += [rclpy.try_shutdown, join_spinners]
        interrupted = cleanup(*steps) or interrupted
    result = summarize(args, rss, published, diag, counter.snapshot(), counter.totals(), exit_status, exit_problem,
                       elapsed, interrupted, counter.timeline())
    to_stdout = args.json == "-"  # stdout is then only the JSON (as icnet-bench's '-'): the verdict on stderr
    if not to_stdout:
        print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}), flush=True)
    # written whole or not at all (before: in place, a failed write left a truncated file)
    problem = write_json(args.json, result)
    if problem:  # the verdict still follows
        print(f"{PROG}: error: {problem}", file=sys.stderr)
    print(f"{PROG}: {report(result, args.max_growth)}", file=sys.stderr if interrupted or to_stdout else sys.stdout,
          flush=True)
    written = problem is None
    if interrupted:
        return stop.exit_code
    return (0 if written else 2) if not verdict(result, args.max_growth) else 1


def report(result: dict[str, Any], max_growth: float) -> str:
    """The soak's one-line summary: 'PASS: ...', 'FAIL: ...' (each failed check says why in its part) or, for an
    interrupted soak, 'interrupted after N of M s, no verdict; so far: ...'."""
    growth = result["rss_growth_pct"]
    short = output_shortfalls(result["outputs_check"])
    silent = stalls(result)
    stopped = result["node_exit_problem"] or f"node exit status {result['node_exit_status']}"
    def mb(v: float | None) -> str:
        return "n/a" if v is None else f"{v} MB"

    facts = (f"RSS {mb(result['rss_mb_at_60s'])} at 60 s -> {mb(result['rss_mb_end'])} at the end "
             f"({'n/a' if growth is None else format(growth, '+.2f') + '%'}, limit {max_growth}%); frames lost "
             f"{result['frames_lost']}; outputs {'short: ' + '; '.join(short) if short else 'complete'}; "
             f"{serving(result, silent)}; {stopped}")
    if result.get("interrupted"):
        return f"interrupted after {result['seconds_run']:.0f} of {result['seconds']:g} s, no verdict; so far: {facts}"
    return f"{'FAIL' if verdict(result, max_growth) else 'PASS'}: {facts}"


def serving(result: dict[str, Any], silent: list[str]) -> str:
    """The report's part on the node's serving: 'node stopped serving: ...' (:func:`stalls`), else the longest
    silence and the shares served (:func:`served_shares`)."""
    longest = max(result.get("longest_silence_s", {}).values(), default=None)
    limit = result.get("max_silence_s")
    if silent:
        text = "node stopped serving: " + "; ".join(silent)
    elif longest is None:
        text = "longest silence n/a"
    else:
        text = f"longest silence {longest:.1f} s (limit {limit:g} s)"
    shares = served_shares(result)
    return text + (f"; served {', '.join(shares)} of the frames received while subscribed" if shares else "")


if __name__ == "__main__":
    sys.exit(main())
