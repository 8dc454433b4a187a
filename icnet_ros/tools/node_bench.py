"""Measure icnet_node's overhead over the Segmenter alone, in one process and one run.

    python -m icnet_ros.tools.node_bench --model model.safetensors --size 360x480 --size 1024x2048 --frames 20

For each frame size, frames are published as sensor_msgs/Image to a running node one at a time (the next after
the previous frame's outputs arrived). End-to-end latency (``e2e``) = header stamp (set at publish) -> arrival of
the last subscribed output: message conversion, DDS transport both ways, scheduling, decoding, output encoding and
publishing included. The node's overhead for a frame = its e2e - the node's own ``Segmenter.segment`` time for that
frame (same object, same thread, same moment); ``overhead_ratio`` = median overhead / median segment time.
As a second reference, the same Segmenter object is also timed when called directly from the benchmark thread,
interleaved with the node frames (``segmenter_alone_ms``; noisier on a shared machine). Last, frames are published
at twice the Segmenter's rate for a while: outputs per second = the node's sustained throughput (extra frames are
dropped by design: the newest frame wins), compared with 1 / segment time.

With ``--demo VIDEO``, the main job instead: icnet-demo's three nodes in this process (player -> node ->
recorder saving PNG overlays, exactly as ``icnet-demo VIDEO`` runs them), timed against the node's own Segmenter
called alone on the same frames with the same outputs (overlay) and threads. Chunks of ``--chunk`` frames
alternate between the demo with each handshake (``taken``: the next frame is published once the node took the
previous one, the demo's default; ``overlay``: once the previous overlay arrived, the former behaviour) and the
Segmenter alone, so load changes on a shared machine hit all of them alike; medians of the per-chunk rates and of
the per-round ratios are reported.

With ``--demo``, the node's parameters are icnet-demo's defaults (``input_size`` auto, ``max_pixels``), on
``--device``; the clip is read before the node starts, and frames above the node's ``max_pixels`` are refused then
(one line, exit status 2). A failure during the demo's rounds (a chunk that lost frames) is one error line, exit
status 1.

Sizes are checked before anything starts (a network input the model takes, as the node judges it from the model's
metadata; at most the node's max_pixels); a size that fails during its measurement is one error line, the other
sizes are measured (exit status 1). Ctrl-C or SIGTERM: the sizes measured so far (printed, and in ``--json``), exit
status 130 or 143. ``--json`` is checked before anything starts (its folder must take a new file) and written whole
or not at all; a write that fails is one line ``cannot write FILE: REASON`` (exit status 2 unless a size failed or
the run was interrupted). ``--json -`` prints the JSON on stdout, as icnet-bench does: the per-size lines then go
to stderr.

DDS stays on loopback (the demo's defaults apply when unset).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..ros_spin import cleanup, init_without_signal_handlers, join_spinners, start_spinner
from .cli_checks import write_json
from .demo import configure_dds
from .play import parse_size

PROG = "icnet-node-bench"
SPINNER_THREAD = "icnet_node_bench_executor"  # the thread spinning the executor (joined before the process ends)


def _frame(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2] = rng.integers(0, 256, 3)
    img[h // 2:] = rng.integers(0, 256, 3)
    return np.clip(img.astype(np.int16) + rng.integers(-20, 21, img.shape, dtype=np.int16), 0, 255).astype(np.uint8)


class _Sink:
    """Counts arrivals per stamp on the subscribed outputs; ``done(stamp)`` when all of them arrived."""

    def __init__(self, kinds: list[str]) -> None:
        self.kinds = kinds
        self.arrivals: dict[int, dict[str, int]] = {}
        self.complete: list[tuple[int, int]] = []  # (stamp ns, arrival ns of the last output)
        self._cond = threading.Condition()

    def callback(self, kind: str, clock: Any) -> Any:
        def on_msg(msg: Any) -> None:
            now = clock.now().nanoseconds
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            with self._cond:
                got = self.arrivals.setdefault(stamp, {})
                got[kind] = now
                if len(got) == len(self.kinds):
                    self.complete.append((stamp, max(got.values())))
                    self._cond.notify_all()
        return on_msg

    def wait(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.complete) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


def bench_size(node: Any, helper: Any, size: tuple[int, int], frames: int, kinds: list[str], encoding: str,
               throughput_s: float, held: Callable[[], Any] = contextlib.nullcontext) -> dict[str, Any]:
    """One size's measurement. ``held``: a context manager around creating this measurement's publisher and
    subscriptions (StopSignals.held: a Ctrl-C inside rclpy's create_publisher, between its list of publishers and
    its list of event handlers, left the helper node inconsistent: its destroy_node then raised ValueError)."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    h, w = size
    imgs = [_frame(h, w, i) for i in range(4)]
    order = "BGR" if encoding == "bgr8" else "RGB"
    seg = node.segmenter
    seg.segment([imgs[0]], channel_order=order, outputs=kinds)  # warm-up at this size
    # publisher and output subscriptions of this measurement
    camera = node.cameras[0]
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    sink = _Sink(kinds)
    with held():
        pub = helper.create_publisher(Image, camera.topic, qos)
        subs = [helper.create_subscription(Image, camera.publishers[k].topic_name,
                                           sink.callback(k, helper.get_clock()), qos) for k in kinds]
    try:
        return _measure(node, helper, pub, sink, imgs, size, frames, kinds, encoding, throughput_s)
    finally:  # also after a failure: the next size's subscriptions must be the only ones
        for s in subs:
            helper.destroy_subscription(s)
        helper.destroy_publisher(pub)


def _measure(node: Any, helper: Any, pub: Any, sink: _Sink, imgs: list[np.ndarray], size: tuple[int, int],
             frames: int, kinds: list[str], encoding: str, throughput_s: float) -> dict[str, Any]:
    from sensor_msgs.msg import Image

    from ..ros_image import numpy_to_image

    h, w = size
    order = "BGR" if encoding == "bgr8" else "RGB"
    seg = node.segmenter
    camera = node.cameras[0]
    deadline = time.monotonic() + 30
    while not (pub.get_subscription_count() >= 1 and all(camera.publishers[k].get_subscription_count() >= 1
                                                         for k in kinds)):
        if time.monotonic() > deadline:
            raise RuntimeError("benchmark publisher/subscribers did not match the node within 30 s")
        time.sleep(0.02)
    timeout = 120.0

    def publish(i: int) -> None:
        msg = numpy_to_image(imgs[i % 4], encoding, Image())
        msg.header.frame_id = "bench"
        msg.header.stamp = helper.get_clock().now().to_msg()
        pub.publish(msg)

    pipeline = node.pipeline
    first = pipeline.samples(camera.topic)["processed"] + 1
    publish(0)  # warm-up through the node
    if not sink.wait(1, timeout):
        raise RuntimeError("no output from the node")

    def samples_after(processed: int) -> dict[str, Any]:
        """The node's samples once it has counted ``processed`` frames (it counts just after publishing)."""
        end = time.monotonic() + 10
        while True:
            got = pipeline.samples(camera.topic)
            if got["processed"] >= processed or time.monotonic() > end:
                return got
            time.sleep(0.001)

    samples_after(first)
    # (1) + (2), interleaved so that load changes on a shared machine hit both alike: the Segmenter alone (the
    # node's own object, same outputs, called from this thread), then the same frame through the node. The
    # overhead is taken per frame against the node's own segment() time for that frame (same object, same worker
    # thread, same moment): on a loaded machine the two threads' OpenMP pools make the separate call a noisy
    # reference, reported as well.
    seg_ms, e2e_ms, infer_ms = [], [], []
    for i in range(frames):
        t0 = time.perf_counter()
        seg.segment([imgs[i % 4]], channel_order=order, outputs=kinds)
        seg_ms.append((time.perf_counter() - t0) * 1e3)
        start = len(sink.complete)
        publish(i)
        if not sink.wait(start + 1, timeout):
            raise RuntimeError(f"frame {i}: no output within {timeout:.0f} s")
        stamp, arrival = sink.complete[-1]
        e2e_ms.append((arrival - stamp) / 1e6)
        infer_ms.append(samples_after(first + i + 1)["inference_ms"][-1])  # this frame's segment() call
    internal = samples_after(first + frames)["latency_ms"][-frames:]
    # (3) sustained throughput: publish at twice the Segmenter's rate (its time inside the node)
    seg_fps = 1e3 / statistics.median(infer_ms)
    period = 1.0 / (2 * seg_fps)
    done_before = len(sink.complete)
    t0 = time.monotonic()
    t0_ns = helper.get_clock().now().nanoseconds
    i = 0
    while time.monotonic() - t0 < throughput_s:
        publish(i)
        i += 1
        time.sleep(max(0.0, t0 + i * period - time.monotonic()))
    t1_ns = helper.get_clock().now().nanoseconds
    sink.wait(done_before + 1, timeout)  # let the frame in flight finish before the next measurement
    time.sleep(2 / seg_fps)
    served = sum(1 for _, arrival in sink.complete[done_before:] if t0_ns <= arrival <= t1_ns)
    node_fps = served / ((t1_ns - t0_ns) / 1e9)
    seg_med, e2e_med, inf_med = (statistics.median(v) for v in (seg_ms, e2e_ms, infer_ms))
    overhead = [e - g for e, g in zip(e2e_ms, infer_ms)]
    return {"size": f"{h}x{w}", "outputs": kinds, "encoding": encoding, "frames": frames,
            "e2e_ms_p50": round(e2e_med, 2), "e2e_ms_p95": round(float(np.percentile(e2e_ms, 95)), 2),
            "segmenter_in_node_ms_p50": round(inf_med, 2),
            "overhead_ms_p50": round(statistics.median(overhead), 2),
            "overhead_ratio": round(statistics.median(overhead) / inf_med, 4),
            "segmenter_alone_ms_p50": round(seg_med, 2),
            "overhead_vs_alone_ratio": round((e2e_med - seg_med) / seg_med, 4),
            "node_internal_ms_p50": round(statistics.median(internal), 2) if internal else None,
            "segmenter_fps": round(seg_fps, 2), "node_fps_sustained": round(node_fps, 2),
            "throughput_ratio": round(node_fps / seg_fps, 3), "published_in_throughput_run": i,
            "served_in_throughput_run": served}


def read_clip(video: str, frames: int, chunk: int, max_pixels: int) -> list[Any]:
    """The first ``frames`` frames of ``video`` (an image folder too, as icnet-demo), read before the node starts:
    SourceError for frames above ``max_pixels`` (the node's: it would drop every one of them unread, and the demo
    chunk then lost its frames after the node had started), ValueError for fewer frames than one ``chunk``."""
    import itertools

    from ..video import ImageTooLargeError, open_source

    try:
        source = open_source(video, max_frames=frames, max_pixels=max_pixels)
        try:
            clip = list(itertools.islice(source, frames))
        finally:
            source.close()
    except ImageTooLargeError as e:
        raise ImageTooLargeError(f"{e} (the node's max_pixels: it drops larger frames unread)") from None
    if len(clip) < chunk:
        raise ValueError(f"{video}: {len(clip)} frame(s), fewer than one chunk of {chunk} (--chunk)")
    return clip


def bench_demo(node: Any, executor: Any, video: str, clip: list[Any], chunk: int) -> dict[str, Any]:
    """icnet-demo's pipeline vs the Segmenter alone on ``clip`` (:func:`read_clip` of ``video``), interleaved by
    chunks (see the module docstring). The recorder's overlays (its PNG writing is part of the demo's work) go to a
    temporary folder, removed at the end (before: left in the temporary folder by every run)."""
    import shutil
    import tempfile

    from .demo import DemoRun

    seg = node.pipeline.segmenter
    overlays = tempfile.mkdtemp(prefix="icnet_demo_bench_")
    run = DemoRun(node, executor, overlays)
    rates: dict[str, list[float]] = {"taken": [], "overlay": [], "alone": []}
    try:
        if not run.connected(60):
            raise RuntimeError("the demo's player, node and recorder did not connect within 60 s")
        run.play(clip[:3])  # warm-up through the whole pipeline
        seg.segment([clip[0].bgr], channel_order="BGR", outputs=("overlay",))
        modes = ["taken", "overlay", "alone"]
        for r, start in enumerate(range(0, len(clip) - chunk + 1, chunk)):
            part = clip[start:start + chunk]
            for mode in modes[r % 3:] + modes[:r % 3]:  # rotate the order round by round
                if mode == "alone":
                    t0 = time.perf_counter()
                    for f in part:
                        seg.segment([f.bgr], channel_order="BGR", outputs=("overlay",))
                    rates["alone"].append(len(part) / (time.perf_counter() - t0))
                else:
                    res = run.play(part, handshake=mode)
                    if res["missed"] or res["overlays"] != len(part):
                        raise RuntimeError(f"demo chunk ({mode}) lost frames: {res}")
                    rates[mode].append(len(part) / res["elapsed"])
    finally:
        try:
            run.close()
        finally:
            shutil.rmtree(overlays, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = {k: statistics.median([d / a for d, a in zip(rates[k], rates["alone"])]) for k in ("taken", "overlay")}
    h, w = clip[0].bgr.shape[:2]
    return {"video": video, "size": f"{h}x{w}", "frames_per_chunk": chunk, "rounds": len(rates["alone"]),
            "demo_fps_p50": round(med["taken"], 2), "demo_overlay_handshake_fps_p50": round(med["overlay"], 2),
            "segmenter_alone_fps_p50": round(med["alone"], 2), "demo_vs_alone": round(ratio["taken"], 3),
            "overlay_handshake_vs_alone": round(ratio["overlay"], 3),
            "chunk_fps": {k: [round(v, 2) for v in vs] for k, vs in rates.items()}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--model", default=None, help="a .safetensors checkpoint or an exported .onnx/.xml/engine (run "
                   "by the backend its type selects; default: the package's default model)")
    p.add_argument("--size", type=parse_size, action="append", default=None, metavar="HxW",
                   help="frame size, repeatable (default: 360x480 and 1024x2048)")
    p.add_argument("--frames", type=int, default=20, help="frames per measurement (default: %(default)s)")
    p.add_argument("--outputs", default="label", help="comma-separated outputs to subscribe (default: label)")
    p.add_argument("--encoding", choices=("rgb8", "bgr8"), default="rgb8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: the node's auto policy, all cores but "
                   "one on the CPU)")
    p.add_argument("--throughput-seconds", type=float, default=5.0, help="seconds of the sustained throughput run "
                   "per size (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (its folder is created; "
                   "'-': on stdout, the per-size lines then on stderr)")
    p.add_argument("--demo", default=None, metavar="VIDEO", help="time icnet-demo's pipeline on this video "
                   "against the Segmenter alone instead (--frames frames in chunks of --chunk)")
    p.add_argument("--chunk", type=int, default=10, help="frames per chunk with --demo (default: %(default)s)")
    return p


def _check_args(args: argparse.Namespace) -> str | None:
    """Why the arguments cannot work (None when they can), before anything starts."""
    from ..engine_config import parse_outputs
    from .cli_checks import frame_size_problem, model_problem, output_file_problem

    if args.frames < 1 or args.chunk < 1 or args.threads < 0:
        return "--frames and --chunk must be >= 1, --threads >= 0"
    # (nan: nothing published, a 120 s wait for an output and 0 fps reported; inf: a run that never ends)
    if not (math.isfinite(args.throughput_seconds) and args.throughput_seconds > 0):
        return f"--throughput-seconds must be a finite number > 0, got {args.throughput_seconds}"
    # as the node takes frames (max_pixels: its default; the model's input size), before the node starts: a size
    # the model cannot take was a traceback after the sizes before it (their results lost), one above max_pixels a
    # 120 s wait
    problem = (model_problem(args.model) if args.model is not None else None) or next(
        (p for p in (frame_size_problem(size, args.model) for size in args.size or ()) if p), None)
    if problem:
        return problem
    if args.demo is not None and args.frames < args.chunk:
        return (f"--frames {args.frames} is less than one --chunk of {args.chunk}: --demo times chunks of "
                "--chunk frames")
    kinds = [k.strip() for k in args.outputs.split(",") if k.strip()]
    try:
        parse_outputs(kinds)
    except ValueError as e:
        return f"--outputs {args.outputs!r}: {e}"
    if not kinds:
        return "--outputs: name at least one output (label, color, overlay, confidence)"
    if args.demo is not None and not Path(args.demo).exists():
        return f"--demo {args.demo}: not found"
    return (model_problem(args.model) if args.model is not None else None) or output_file_problem(args.json)


def main(argv: list[str] | None = None) -> int:
    from .cli_checks import run_ros_tool

    # SIGTERM (kill, timeout) as Ctrl-C: the sizes measured so far kept
    return run_ros_tool(PROG, argv, _main)


def _main(argv: list[str] | None, stop: Any) -> int:
    args = build_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    # each kind once ('label,label' waited for two distinct kinds that never came: 120 s, then a traceback)
    kinds = list(dict.fromkeys(k.strip() for k in args.outputs.split(",") if k.strip()))
    configure_dds(isolated_domain=True)
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    from ..checkpoint import CheckpointError
    from ..node import SegmentationNode, StartupError
    from ..video import SourceError

    if args.model is None:
        from ..checkpoint import default_model_path

        try:
            args.model = str(default_model_path())
        except CheckpointError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
    if args.demo is not None:
        try:
            return _main_demo(args, stop)
        except (StartupError, SourceError, ValueError) as e:  # before the demo's rounds started
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:  # during them (a chunk that lost frames): one line, not a traceback
            print(f"{PROG}: error: {_first_line(e)}", file=sys.stderr)
            return 1
    init_without_signal_handlers()
    stop.install()  # SIGTERM as Ctrl-C (and SIGINT's handler again, which the line above reset)
    try:
        node = SegmentationNode(parameter_overrides=[
            Parameter("image_topics", value=["/bench/image_raw"]), Parameter("model", value=args.model),
            Parameter("device", value=args.device), Parameter("num_threads", value=args.threads),
            Parameter("qos_overrides./bench/image_raw.subscription.reliability", value="reliable"),
            Parameter("max_age", value=0.0),
            Parameter("publish_camera_info", value=False)])
    except StartupError as e:
        rclpy.try_shutdown()
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    helper = rclpy.create_node("icnet_node_bench")
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(node)
    executor.add_node(helper)
    start_spinner(executor, SPINNER_THREAD)
    results = []
    failed = []
    sizes = args.size or [(360, 480), (1024, 2048)]
    interrupted = False
    log = sys.stderr if args.json == "-" else sys.stdout  # '-': stdout is only the JSON
    try:
        import torch

        print(f"# {node.segmenter.describe() if hasattr(node.segmenter, 'describe') else args.model}; "
              f"torch threads {torch.get_num_threads()}", file=log, flush=True)
        for size in sizes:
            try:
                r = bench_size(node, helper, size, args.frames, kinds, args.encoding, args.throughput_seconds,
                               held=stop.held)
            except Exception as e:  # noqa: BLE001 - one line; the other sizes are measured, the JSON written
                failed.append(size)
                print(f"{PROG}: error: {size[0]}x{size[1]}: {_first_line(e)}", file=sys.stderr, flush=True)
                continue
            results.append(r)
            print(json.dumps(r), file=log, flush=True)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        interrupted = cleanup(lambda: executor.shutdown(timeout_sec=2.0), node.destroy_node, helper.destroy_node,
                              rclpy.try_shutdown, join_spinners) or interrupted
    problem = write_json(args.json, results)  # an interrupted run: the sizes measured so far
    if problem:  # (the results are on stdout above)
        print(f"{PROG}: error: {problem}", file=sys.stderr)
    in_file = bool(args.json) and args.json != "-" and not problem
    if interrupted:
        done = len(results) + len(failed)
        print(f"{PROG}: interrupted after {done} of {len(sizes)} size(s)"
              f"{' (their results above' + (f' and in {args.json}' if in_file else '') + ')' if results else ''}",
              file=sys.stderr)
        return stop.exit_code
    if failed:
        print(f"{PROG}: {len(failed)} of {len(sizes)} size(s) failed"
              f"{f'; the others are in {args.json}' if in_file and results else ''}", file=sys.stderr)
        return 1
    return 2 if problem else 0


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _main_demo(args: argparse.Namespace, stop: Any) -> int:
    import rclpy
    from rclpy.executors import MultiThreadedExecutor

    from ..node import SegmentationNode, StartupError
    from .demo import _node_overrides
    from .demo import build_parser as demo_parser

    # the node as `icnet-demo VIDEO` runs it: icnet-demo's own defaults (input_size auto, max_pixels, precision,
    # topic), only the device set here (before: a Namespace of its own, at input_size native, that lacked
    # max_pixels: an AttributeError traceback)
    demo_args = demo_parser().parse_args(["--", args.demo])
    demo_args.device = args.device
    overrides = _node_overrides(demo_args, args.model, reliable=True)  # a bad --device: ValueError, one line
    if args.threads:
        from rclpy.parameter import Parameter

        overrides.append(Parameter("num_threads", value=args.threads))
    clip = read_clip(args.demo, args.frames, args.chunk, demo_args.max_pixels)  # before the node starts
    init_without_signal_handlers()
    stop.install()  # SIGTERM as Ctrl-C
    try:
        node = SegmentationNode(parameter_overrides=overrides)
    except StartupError:
        rclpy.try_shutdown()
        raise
    executor = MultiThreadedExecutor(num_threads=2)  # as icnet-demo
    executor.add_node(node)
    interrupted = False
    log = sys.stderr if args.json == "-" else sys.stdout  # '-': stdout is only the JSON
    try:
        import torch

        print(f"# demo vs Segmenter alone; {node.pipeline.segmenter.describe()}; torch threads "
              f"{torch.get_num_threads()}", file=log, flush=True)
        result = bench_demo(node, executor, args.demo, clip, args.chunk)
        print(json.dumps(result), file=log, flush=True)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        interrupted = cleanup(lambda: executor.shutdown(timeout_sec=2.0), node.destroy_node,
                              rclpy.try_shutdown, join_spinners) or interrupted
    if interrupted:  # the medians need every round: nothing to report
        print(f"{PROG}: interrupted (--demo: no result, the rounds are compared only when complete)",
              file=sys.stderr)
        return stop.exit_code
    problem = write_json(args.json, result)
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
