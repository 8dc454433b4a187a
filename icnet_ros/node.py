"""``icnet_node``: a thin rclpy adapter over :class:`icnet_ros.engine.Segmenter`.

Camera topics in (``sensor_msgs/Image`` rgb8/bgr8/rgba8/bgra8/mono8, or ``sensor_msgs/CompressedImage`` jpeg/png
for topics ending in ``/compressed``); per camera, next to its input topic (``/cam/image_raw`` ->
``/cam/semantic/...``): ``label`` (mono8 class ids, 255 = unknown), ``color`` and ``overlay`` (rgb8, bgr8 for BGR
inputs), ``confidence`` (mono8, 0-255) and ``camera_info`` (at the label's resolution), each with the input's header.
Class metadata goes out once as JSON on a transient-local ``std_msgs/String`` topic and as read-only parameters;
``/diagnostics`` carries rates, latencies, drops, device and model.

Scheduling: subscription callbacks only store the newest message per camera (an older pending one is counted as
``superseded``). One worker thread takes the newest frame of every camera that has one (up to ``max_batch``),
drops frames older than ``max_age`` and malformed ones (each counted by reason), hands all of them to ONE
``Segmenter.segment`` call (frames of the same size share one forward pass) and publishes. Outputs that nobody
subscribes to are not requested from the Segmenter (per batch: what any of its cameras needs) nor published.

Parameters: :mod:`icnet_ros.node_params`. Start-up errors (bad parameter, missing or invalid model) print one clear
line and exit with status 2.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import warnings
from collections import Counter, deque
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String

from . import node_params
from .node_params import NODE_NAME, NodeConfig, ParameterError
from .ros_image import ImageFormatError, compressed_to_numpy, numpy_to_image, scale_camera_info, segmenter_input

__all__ = ["SegmentationNode", "StartupError", "main"]

WARN_PERIOD_S = 5.0  # throttle for repeated per-camera warnings
STALE_INPUT_S = 5.0  # a camera silent this long is reported as WARN in /diagnostics
LATENCY_WINDOW = 300  # latency samples kept per camera for the percentiles


class StartupError(RuntimeError):
    """The node cannot start: a bad parameter, a missing or invalid model, an unusable device."""


def _reliability(name: str) -> ReliabilityPolicy:
    return ReliabilityPolicy.RELIABLE if name == "reliable" else ReliabilityPolicy.BEST_EFFORT


def auto_cpu_threads() -> int:
    """Intra-op threads for inference on the CPU when ``num_threads`` is 0: all usable cores but one, at least 1.

    PyTorch's OpenMP workers spin-wait between parallel regions. With one per core they starve the executor
    thread (which holds the GIL while it takes messages) and the camera drivers: on 2 cores, a 360x480 stream
    offered at twice the inference rate was served at 3-33% of the Segmenter's rate, against 88-100% with one
    thread (BENCHMARKS.md, node section)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def _stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _percentiles(samples: deque[float]) -> tuple[float, float]:
    if not samples:
        return float("nan"), float("nan")
    p50, p95 = np.percentile(np.fromiter(samples, float), [50, 95])
    return float(p50), float(p95)


class CameraStats:
    """Counters and recent samples of one camera (updated under the node's lock or by the worker alone)."""

    def __init__(self) -> None:
        self.received = 0
        self.processed = 0
        self.dropped: Counter[str] = Counter()
        self.computed: Counter[str] = Counter()  # outputs computed and published, by kind
        self.latency_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)  # header stamp -> published
        self.inference_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)  # the forward pass that served the frame
        self.last_received = 0.0  # time.monotonic()
        self._last_report = (time.monotonic(), 0, 0)  # (t, received, processed) at the previous report

    def rates(self) -> tuple[float, float]:
        """(input Hz, processed fps) since the previous call."""
        t0, r0, p0 = self._last_report
        now = time.monotonic()
        dt = max(now - t0, 1e-6)
        self._last_report = (now, self.received, self.processed)
        return (self.received - r0) / dt, (self.processed - p0) / dt


@dataclasses.dataclass
class Camera:
    """One input topic with its publishers, the newest unprocessed message and its statistics."""

    topic: str
    compressed: bool
    publishers: dict[str, Any]
    info_publisher: Any | None
    stats: CameraStats
    pending: Any | None = None  # newest unprocessed message
    camera_info: CameraInfo | None = None  # newest camera_info of this camera
    last_warning: dict[str, float] = dataclasses.field(default_factory=dict)


class SegmentationNode(Node):
    """The ``icnet_node`` node. Raises :class:`StartupError` from the constructor when it cannot run."""

    def __init__(self, node_name: str = NODE_NAME, **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
        try:
            raw = node_params.declare(self)
            self.config: NodeConfig = node_params.parse(raw)
        except ParameterError as e:
            raise StartupError(str(e)) from None
        self._warn_unknown_overrides()
        cfg = self.config

        self._lock = threading.Condition()
        self._stop = threading.Event()
        self.batches = 0  # Segmenter calls; same-size frames in one call share one forward pass
        self.frames_batched = 0
        self.max_batch_seen = 0
        self.model_path = cfg.model
        self.segmenter = self._load_segmenter(cfg)
        self._declare_class_parameters()
        self.add_on_set_parameters_callback(self._on_set_parameters)

        out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=cfg.output_depth,
                             reliability=_reliability(cfg.output_reliability), durability=DurabilityPolicy.VOLATILE)
        in_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=cfg.input_depth,
                            reliability=_reliability(cfg.input_reliability), durability=DurabilityPolicy.VOLATILE)
        info_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
        self.cameras: list[Camera] = []
        for topic in cfg.image_topics:
            base, compressed = node_params.base_topic(topic)
            pubs = {kind: self.create_publisher(Image, node_params.sibling_topic(
                base, f"{cfg.output_namespace}/{kind}"), out_qos) for kind in cfg.outputs}
            info_pub = None
            cam = Camera(topic, compressed, pubs, None, CameraStats())
            if cfg.publish_camera_info:
                info_pub = self.create_publisher(CameraInfo, node_params.sibling_topic(
                    base, f"{cfg.output_namespace}/camera_info"), out_qos)
                cam.info_publisher = info_pub
                self.create_subscription(CameraInfo, node_params.sibling_topic(base, "camera_info"),
                                         lambda m, c=cam: self._on_camera_info(c, m), info_qos)
            self.create_subscription(CompressedImage if compressed else Image, topic,
                                     lambda m, c=cam: self._on_image(c, m), in_qos)
            self.cameras.append(cam)

        classes_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._classes_pub = self.create_publisher(String, cfg.classes_topic, classes_qos)
        self._classes_pub.publish(String(data=self.classes_json))
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(cfg.diagnostics_period, self._publish_diagnostics)
        self._rr = 0  # round-robin start for batches when more cameras than max_batch have frames
        self._worker = threading.Thread(target=self._run_worker, name="icnet_inference", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"ready: model {self.model_path} on {self.segmenter.device} ({self.segmenter.precision}, "
            f"{self.cpu_threads} CPU thread{'s' if self.cpu_threads != 1 else ''}), "
            f"{self.segmenter.class_set.num_classes} classes; cameras: "
            + ", ".join(f"{c.topic}{' (compressed)' if c.compressed else ''} -> "
                        f"{node_params.sibling_topic(node_params.base_topic(c.topic)[0], cfg.output_namespace)}/*"
                        for c in self.cameras))

    # ------------------------------------------------------------------ start-up
    def _warn_unknown_overrides(self) -> None:
        overrides = getattr(self, "_parameter_overrides", {}) or {}  # rclpy keeps no public list of overrides
        for name in overrides:
            if name in node_params.SPECS or name == "use_sim_time" or name.startswith(("qos_overrides.", "classes.")):
                continue
            near = node_params.close_matches(name)
            self.get_logger().warning(f"ignoring unknown parameter {name!r}"
                                      + (f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""))

    def _load_segmenter(self, cfg: NodeConfig) -> Any:
        """Build and warm up the Segmenter; every failure becomes a one-line :class:`StartupError`."""
        from .checkpoint import CheckpointError, default_model_path, read_metadata

        model: str | None = cfg.model or None
        try:
            path = default_model_path() if model is None else model
            self.model_path = str(path)
            input_size: Any = cfg.input_size
            if input_size == "native":
                input_size = None
            elif input_size == "checkpoint":
                size = read_metadata(path).get("input_size")
                input_size = tuple(size) if size else None
                if input_size is None:
                    self.get_logger().info("input_size 'checkpoint': the model recommends none; using native size")
            import torch

            from .engine import Segmenter, resolve_device

            with warnings.catch_warnings():  # the Segmenter reports the auto -> CPU fallback
                warnings.simplefilter("ignore", RuntimeWarning)
                on_cpu = resolve_device(cfg.device).type == "cpu"
            threads = cfg.num_threads or (auto_cpu_threads() if on_cpu else 0)
            if threads:
                torch.set_num_threads(threads)
            self.cpu_threads = torch.get_num_threads()

            with warnings.catch_warnings():  # fallbacks (auto -> CPU, ...) are logged below, not printed twice
                warnings.simplefilter("ignore", RuntimeWarning)
                seg = Segmenter(str(path), device=cfg.device, precision=cfg.precision, input_size=input_size,
                                outputs=tuple(cfg.outputs), overlay_alpha=cfg.overlay_alpha,
                                output_size=cfg.output_size, warmup=True)
            for note in getattr(seg, "notes", ()):
                self.get_logger().warning(note)
            return seg
        except CheckpointError as e:
            message = str(e).removesuffix("; pass a model path")
            hint = "" if cfg.model else "; set the 'model' parameter to a .safetensors checkpoint"
            raise StartupError(f"cannot load model: {message}{hint}") from None
        except (ValueError, RuntimeError, OSError) as e:
            raise StartupError(f"cannot start the Segmenter: {e}") from None

    def _declare_class_parameters(self) -> None:
        cs = self.segmenter.class_set
        self.classes_json = node_params.class_metadata_json(cs, self.model_path)
        colors = ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in cs.palette]
        values = {"classes.names": list(cs.classes), "classes.colors": colors,
                  "classes.ignore_index": int(cs.ignore_index), "classes.json": self.classes_json}
        for name, value in values.items():
            self.declare_parameter(name, value, ParameterDescriptor(description=node_params.CLASS_PARAMS[name],
                                                                    read_only=True), ignore_override=True)

    def _on_set_parameters(self, params: list[Any]) -> SetParametersResult:
        """Run-time changes of the parameters that are not read-only (validated like at start-up)."""
        changes = {}
        for p in params:
            if p.name not in node_params.SPECS:
                continue
            try:
                changes[p.name] = node_params.check_value(p.name, p.value)
            except ParameterError as e:
                return SetParametersResult(successful=False, reason=str(e))
        fields = {"max_age": "max_age", "max_batch": "max_batch", "batch_timeout": "batch_timeout"}
        update = {fields[k]: v for k, v in changes.items() if k in fields}
        if update:
            with self._lock:
                self.config = dataclasses.replace(self.config, **update)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ callbacks (no inference here)
    def _on_image(self, cam: Camera, msg: Any) -> None:
        with self._lock:
            cam.stats.received += 1
            cam.stats.last_received = time.monotonic()
            if cam.pending is not None:
                cam.stats.dropped["superseded"] += 1
            cam.pending = msg
            self._lock.notify()

    def _on_camera_info(self, cam: Camera, msg: CameraInfo) -> None:
        cam.camera_info = msg

    # ------------------------------------------------------------------ worker
    def _run_worker(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch()
            if not batch:
                continue
            try:
                self._process(batch)
            except Exception as e:  # noqa: BLE001 - the node keeps serving; the error is reported
                if self._stop.is_set() or not rclpy.ok(context=self.context):
                    return
                for cam, _ in batch:
                    cam.stats.dropped["inference_error"] += 1
                self.get_logger().error(f"frame batch failed: {type(e).__name__}: {e}")

    def _take_batch(self) -> list[tuple[Camera, Any]]:
        """Wait for frames; return the newest frame of up to ``max_batch`` cameras (round robin)."""
        with self._lock:
            while not self._stop.is_set() and not any(c.pending is not None for c in self.cameras):
                self._lock.wait(0.2)
            if self._stop.is_set():
                return []
            timeout = self.config.batch_timeout
            if timeout > 0 and len(self.cameras) > 1:
                deadline = time.monotonic() + timeout
                while not self._stop.is_set():
                    ready = sum(c.pending is not None for c in self.cameras)
                    left = deadline - time.monotonic()
                    if ready >= min(len(self.cameras), self.config.max_batch) or left <= 0:
                        break
                    self._lock.wait(left)
            n = len(self.cameras)
            order = [self.cameras[(self._rr + i) % n] for i in range(n)]
            batch = []
            for cam in order:
                if cam.pending is not None and len(batch) < self.config.max_batch:
                    batch.append((cam, cam.pending))
                    cam.pending = None
            self._rr = (self._rr + 1) % n
            return batch

    def _warn(self, cam: Camera, reason: str, text: str) -> None:
        now = time.monotonic()
        if now - cam.last_warning.get(reason, -1e9) >= WARN_PERIOD_S:
            cam.last_warning[reason] = now
            self.get_logger().warning(f"{cam.topic}: dropping frame ({reason}): {text} "
                                      f"[{cam.stats.dropped[reason]} dropped for this reason so far]")

    def _wanted(self, cam: Camera) -> set[str]:
        return {kind for kind, pub in cam.publishers.items() if pub.get_subscription_count() > 0}

    def _decode(self, cam: Camera, msg: Any) -> tuple[np.ndarray, str]:
        if cam.compressed:
            img, order = compressed_to_numpy(msg)
            if img.dtype != np.uint8:
                raise ImageFormatError("encoding", f"{img.dtype} CompressedImage (only 8-bit images are segmented)")
            return img, ("RGB" if order == "MONO" else order)
        return segmenter_input(msg)

    def _process(self, batch: list[tuple[Camera, Any]]) -> None:
        cfg = self.config
        now_ns = self.get_clock().now().nanoseconds
        frames, orders, items, wanted_all = [], [], [], set()
        for cam, msg in batch:
            wanted = self._wanted(cam)
            if not wanted:
                cam.stats.dropped["no_subscribers"] += 1
                continue
            stamp = _stamp_ns(msg.header)
            if cfg.max_age > 0 and stamp > 0 and (now_ns - stamp) > cfg.max_age * 1e9:
                cam.stats.dropped["too_old"] += 1
                self._warn(cam, "too_old", f"header stamp is {(now_ns - stamp) / 1e9:.3f} s old (max_age "
                                           f"{cfg.max_age} s); check clock sync/use_sim_time or raise max_age")
                continue
            try:
                frame, order = self._decode(cam, msg)
            except ImageFormatError as e:
                cam.stats.dropped[e.reason] += 1
                self._warn(cam, e.reason, str(e))
                continue
            frames.append(frame)
            orders.append(order)
            items.append((cam, msg, wanted))
            wanted_all |= wanted
        if not frames:
            return
        outputs = tuple(k for k in node_params.OUTPUT_KINDS if k in wanted_all)
        t0 = time.perf_counter()
        try:
            results = self.segmenter.segment(frames, channel_order=orders, outputs=outputs)
        except ValueError as e:  # a frame the Segmenter refuses (e.g. smaller than the network minimum)
            if len(frames) == 1:
                cam = items[0][0]
                cam.stats.dropped["rejected"] += 1
                self._warn(cam, "rejected", str(e))
                return
            results = self._segment_one_by_one(frames, orders, items, outputs)
        infer_ms = (time.perf_counter() - t0) * 1e3
        served = sum(r is not None for r in results)
        self.batches += 1
        self.frames_batched += served
        self.max_batch_seen = max(self.max_batch_seen, served)
        for (cam, msg, wanted), order, res in ((it, o, r) for it, o, r in zip(items, orders, results)
                                               if r is not None):
            self._publish(cam, msg, wanted, order, res)
            cam.stats.processed += 1
            cam.stats.inference_ms.append(infer_ms)
            stamp = _stamp_ns(msg.header)
            if stamp > 0:
                cam.stats.latency_ms.append((self.get_clock().now().nanoseconds - stamp) / 1e6)

    def _segment_one_by_one(self, frames: list[np.ndarray], orders: list[str],
                            items: list[tuple[Camera, Any, set[str]]], outputs: tuple[str, ...]) -> list[Any]:
        """After a batch was rejected: find the frame(s) the Segmenter refuses, serve the others."""
        results = []
        for frame, order, (cam, _msg, _w) in zip(frames, orders, items):
            try:
                results.append(self.segmenter.segment([frame], channel_order=[order], outputs=outputs)[0])
            except ValueError as e:
                cam.stats.dropped["rejected"] += 1
                self._warn(cam, "rejected", str(e))
                results.append(None)
        return results

    def _publish(self, cam: Camera, msg: Any, wanted: set[str], order: str, res: Any) -> None:
        header = msg.header
        colour_enc = "bgr8" if order == "BGR" else "rgb8"
        for kind in node_params.OUTPUT_KINDS:
            if kind not in wanted:
                continue
            arr = getattr(res, kind)
            if arr is None:
                continue
            out = numpy_to_image(arr, "mono8" if kind in ("label", "confidence") else colour_enc, Image())
            out.header = header
            cam.publishers[kind].publish(out)
            cam.stats.computed[kind] += 1
        info = cam.camera_info
        if cam.info_publisher is not None and info is not None and cam.info_publisher.get_subscription_count() > 0:
            h, w = res.label.shape[:2]
            out_info = scale_camera_info(info, w, h, CameraInfo())
            out_info.header = header
            cam.info_publisher.publish(out_info)

    # ------------------------------------------------------------------ diagnostics
    def stats_snapshot(self) -> dict[str, dict[str, Any]]:
        """Per-camera counters and latency percentiles (what /diagnostics reports, as numbers)."""
        out = {}
        for cam in self.cameras:
            s = cam.stats
            lat50, lat95 = _percentiles(s.latency_ms)
            inf50, inf95 = _percentiles(s.inference_ms)
            out[cam.topic] = {"received": s.received, "processed": s.processed, "dropped": dict(s.dropped),
                              "computed": dict(s.computed), "latency_p50_ms": lat50, "latency_p95_ms": lat95,
                              "inference_p50_ms": inf50, "inference_p95_ms": inf95}
        return out

    def _publish_diagnostics(self) -> None:
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        device = str(self.segmenter.device)
        name = self.get_fully_qualified_name()
        node_status = DiagnosticStatus(level=DiagnosticStatus.OK, name=f"{name}: segmenter", hardware_id=device,
                                       message=f"{self.batches} batches")
        mean_batch = self.frames_batched / self.batches if self.batches else 0.0
        node_status.values = [KeyValue(key=k, value=str(v)) for k, v in (
            ("device", device), ("model", self.model_path), ("precision", self.segmenter.precision),
            ("cpu_threads", self.cpu_threads),
            ("classes", self.segmenter.class_set.num_classes), ("batches", self.batches),
            ("frames_processed", self.frames_batched), ("mean_batch_size", f"{mean_batch:.2f}"),
            ("max_batch_size", self.max_batch_seen))]
        arr.status.append(node_status)
        now = time.monotonic()
        for cam in self.cameras:
            s = cam.stats
            in_hz, fps = s.rates()
            lat50, lat95 = _percentiles(s.latency_ms)
            inf50, inf95 = _percentiles(s.inference_ms)
            bad = sum(v for k, v in s.dropped.items() if k not in ("superseded", "no_subscribers", "too_old"))
            level, message = DiagnosticStatus.OK, f"{fps:.1f} fps"
            if s.received == 0:
                level, message = DiagnosticStatus.WARN, "no frames received yet"
            elif now - s.last_received > STALE_INPUT_S:
                level, message = DiagnosticStatus.WARN, f"no frames for {now - s.last_received:.0f} s"
            elif bad:
                level, message = DiagnosticStatus.WARN, f"{fps:.1f} fps; {bad} bad frames dropped"
            st = DiagnosticStatus(level=level, name=f"{name}: {cam.topic}", hardware_id=device, message=message)
            values = [("input_rate_hz", f"{in_hz:.2f}"), ("processed_fps", f"{fps:.2f}"),
                      ("latency_p50_ms", f"{lat50:.1f}"), ("latency_p95_ms", f"{lat95:.1f}"),
                      ("inference_p50_ms", f"{inf50:.1f}"), ("inference_p95_ms", f"{inf95:.1f}"),
                      ("frames_received", s.received), ("frames_processed", s.processed),
                      ("frames_dropped", sum(v for k, v in s.dropped.items() if k != "no_subscribers")),
                      ("frames_skipped_no_subscribers", s.dropped.get("no_subscribers", 0)),
                      ("device", device), ("model", self.model_path)]
            values += [(f"dropped_{k}", v) for k, v in sorted(s.dropped.items()) if k != "no_subscribers"]
            values += [(f"computed_{k}", s.computed.get(k, 0)) for k in cam.publishers]
            st.values = [KeyValue(key=k, value=str(v)) for k, v in values]
            arr.status.append(st)
        self._diag_pub.publish(arr)

    # ------------------------------------------------------------------ shutdown
    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker (waits for the forward pass in flight)."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._worker.is_alive() and threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    def destroy_node(self) -> None:
        self.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """``ros2 run icnet_ros icnet_node [--ros-args ...]``. Returns the exit status (2: could not start)."""
    rclpy.init(args=args)
    try:
        try:
            node = SegmentationNode()
        except StartupError as e:
            print(f"{NODE_NAME}: error: {e}", file=sys.stderr, flush=True)
            return 2
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        try:
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            executor.shutdown(timeout_sec=1.0)
            node.destroy_node()
        return 0
    finally:
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())

