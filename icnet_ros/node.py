"""``icnet_node``: a thin rclpy adapter over :class:`icnet_ros.engine.Segmenter`.

Camera topics in (``sensor_msgs/Image`` rgb8/bgr8/rgba8/bgra8/mono8, or ``sensor_msgs/CompressedImage`` jpeg/png
for topics ending in ``/compressed``); per camera, next to its input topic (``/cam/image_raw`` ->
``/cam/semantic/...``): ``label`` (mono8 class ids, 255 = unknown), ``color`` and ``overlay`` (rgb8, bgr8 for BGR
inputs), ``confidence`` (mono8, 0-255) and ``camera_info`` (at the label's resolution), each with the input's header.
Class metadata goes out once as JSON on a transient-local ``std_msgs/String`` topic and as read-only parameters;
``/diagnostics`` carries rates, latencies, drops, device and model.

Scheduling (:class:`icnet_ros.frame_pipeline.FramePipeline`, ROS-free): subscription callbacks only store the
newest message per camera (an older pending one is counted as ``superseded``). One worker thread takes the newest
frame of every camera that has one (up to ``max_batch``), drops frames older than ``max_age`` and malformed ones
(each counted by reason), hands all of them to ONE ``Segmenter.segment`` call (frames of the same size share one
forward pass) and publishes through this node. Outputs that nobody subscribes to are not requested from the
Segmenter (per batch: what any of its cameras needs) nor published.

Parameters: :mod:`icnet_ros.node_params`. Start-up errors (bad parameter, missing or invalid model) print one clear
line and exit with status 2.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String

from . import node_params
from .engine_config import LIVE_OPTIONS
from .frame_pipeline import FramePipeline, PipelineOptions
from .node_params import NODE_NAME, NodeConfig, ParameterError
from .ros_image import numpy_to_image, scale_camera_info

__all__ = ["SegmentationNode", "StartupError", "main"]

STALE_INPUT_S = 5.0  # a camera silent this long is reported as WARN in /diagnostics


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


@dataclasses.dataclass
class Camera:
    """One input topic with its publishers and newest camera_info (its frames and statistics live in the
    pipeline, under the same topic as key)."""

    topic: str
    compressed: bool
    publishers: dict[str, Any]
    info_publisher: Any | None
    camera_info: CameraInfo | None = None  # newest camera_info of this camera


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

        self.model_path = cfg.model
        self.segmenter = self._load_segmenter(cfg)
        self._declare_class_parameters()
        self.add_on_set_parameters_callback(self._on_set_parameters)

        out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=cfg.output_depth,
                             reliability=_reliability(cfg.output_reliability), durability=DurabilityPolicy.VOLATILE)
        in_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=cfg.input_depth,
                            reliability=_reliability(cfg.input_reliability), durability=DurabilityPolicy.VOLATILE)
        info_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
        # frames go from the subscriptions into the pipeline; its worker (started last) calls back to publish
        self.pipeline = FramePipeline(
            self.segmenter, [(t, node_params.base_topic(t)[1]) for t in cfg.image_topics], wanted=self._wanted,
            publish=self._publish, clock_ns=lambda: self.get_clock().now().nanoseconds,
            options=PipelineOptions.from_config(cfg), logger=self.get_logger(), on_fatal=self._on_fatal)
        self.fatal_error: str | None = None  # set on an unrecoverable device error: main() exits with status 1
        self.cameras: list[Camera] = []
        for topic in cfg.image_topics:
            base, compressed = node_params.base_topic(topic)
            pubs = {kind: self.create_publisher(Image, node_params.sibling_topic(
                base, f"{cfg.output_namespace}/{kind}"), out_qos) for kind in cfg.outputs}
            info_pub = None
            cam = Camera(topic, compressed, pubs, None)
            if cfg.publish_camera_info:
                info_pub = self.create_publisher(CameraInfo, node_params.sibling_topic(
                    base, f"{cfg.output_namespace}/camera_info"), out_qos)
                cam.info_publisher = info_pub
                self.create_subscription(CameraInfo, node_params.sibling_topic(base, "camera_info"),
                                         lambda m, c=cam: self._on_camera_info(c, m), info_qos)
            self.create_subscription(CompressedImage if compressed else Image, topic,
                                     lambda m, t=topic: self.pipeline.submit(t, m), in_qos)
            self.cameras.append(cam)
        self._by_topic = {c.topic: c for c in self.cameras}

        classes_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._classes_pub = self.create_publisher(String, cfg.classes_topic, classes_qos)
        self._classes_pub.publish(String(data=self.classes_json))
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(cfg.diagnostics_period, self._publish_diagnostics)
        self.pipeline.start()
        self.get_logger().info(
            f"ready: model {self.model_path} on {self.segmenter.device} ({self.segmenter.precision}, "
            f"{self.cpu_threads} CPU thread{'s' if self.cpu_threads != 1 else ''}), backend "
            f"{self.segmenter.backend.name} ({self.segmenter.backend.provider}), "
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
        from .backends.base import MissingRuntimeError
        from .checkpoint import CheckpointError, default_model_path

        model: str | None = cfg.model or None
        try:
            path = default_model_path() if model is None else model
            self.model_path = str(path)
            import torch

            from .engine import Segmenter, resolve_device

            with warnings.catch_warnings():  # the Segmenter reports the auto -> CPU fallback
                warnings.simplefilter("ignore", RuntimeWarning)
                on_cpu = resolve_device(cfg.engine.device).type == "cpu"
            threads = cfg.num_threads or (auto_cpu_threads() if on_cpu else 0)
            if threads:
                torch.set_num_threads(threads)
            self.cpu_threads = torch.get_num_threads()

            with warnings.catch_warnings():  # fallbacks (auto -> CPU, ...) are logged below, not printed twice
                warnings.simplefilter("ignore", RuntimeWarning)
                seg = Segmenter(str(path), cfg.engine, outputs=tuple(cfg.outputs), warmup=True)
            for note in getattr(seg, "notes", ()):
                self.get_logger().warning(note)
            return seg
        except CheckpointError as e:
            message = str(e).removesuffix("; pass a model path")
            hint = "" if cfg.model else "; set the 'model' parameter to a .safetensors checkpoint"
            raise StartupError(f"cannot load model: {message}{hint}") from None
        except MissingRuntimeError as e:
            raise StartupError(str(e)) from None
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
        engine = {k: v for k, v in changes.items() if k in LIVE_OPTIONS}
        if engine:
            from .engine_config import ConfigError

            try:
                self.pipeline.segmenter.reconfigure(**engine)  # applied between two batches
            except ConfigError as e:
                return SetParametersResult(successful=False, reason=str(e))
            self.config = dataclasses.replace(self.config, engine=self.pipeline.segmenter.config)
        live = {f.name for f in dataclasses.fields(PipelineOptions)}
        update = {k: v for k, v in changes.items() if k in live}
        if update:
            self.config = dataclasses.replace(self.config, **update)
            self.pipeline.configure(**update)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ callbacks (no inference here)
    def _on_camera_info(self, cam: Camera, msg: CameraInfo) -> None:
        cam.camera_info = msg

    # ------------------------------------------------------------------ called by the pipeline's worker thread
    def _on_fatal(self, message: str) -> None:
        """The device is unusable: report ERROR on /diagnostics and end spinning, so that main() exits with
        status 1 and launch's ``respawn`` can restart the node."""
        self.fatal_error = message
        self.get_logger().fatal(f"{message}; exiting with status 1 (respawn restarts the node)")
        self._publish_diagnostics()
        rclpy.try_shutdown(context=self.context)

    def _wanted(self, topic: str) -> set[str]:
        return {kind for kind, pub in self._by_topic[topic].publishers.items() if pub.get_subscription_count() > 0}

    def _publish(self, topic: str, msg: Any, order: str, res: Any, wanted: set[str]) -> list[str]:
        """Publish one frame's outputs (each with the input's header); returns the kinds published."""
        cam = self._by_topic[topic]
        published = []
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
            published.append(kind)
        info = cam.camera_info
        if cam.info_publisher is not None and info is not None and cam.info_publisher.get_subscription_count() > 0:
            h, w = res.label.shape[:2]
            out_info = scale_camera_info(info, w, h, CameraInfo())
            out_info.header = header
            cam.info_publisher.publish(out_info)
        return published

    # ------------------------------------------------------------------ diagnostics
    def stats_snapshot(self) -> dict[str, dict[str, Any]]:
        """Per-camera counters and latency percentiles (what /diagnostics reports, as numbers)."""
        return self.pipeline.snapshot()["cameras"]

    def _publish_diagnostics(self) -> None:
        snap = self.pipeline.snapshot(update_rates=True)
        seg = self.pipeline.segmenter
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        device = str(seg.device)
        name = self.get_fully_qualified_name()
        fatal = snap["fatal_error"]
        node_status = DiagnosticStatus(level=DiagnosticStatus.ERROR if fatal else DiagnosticStatus.OK,
                                       name=f"{name}: segmenter", hardware_id=device,
                                       message=fatal or f"{snap['batches']} batches")
        node_status.values = [KeyValue(key=k, value=str(v)) for k, v in (
            ("device", device), ("model", self.model_path), ("precision", seg.precision),
            ("backend", seg.backend.name), ("provider", seg.backend.provider),
            ("cpu_threads", self.cpu_threads),
            ("classes", seg.class_set.num_classes), ("batches", snap["batches"]),
            ("frames_processed", snap["frames_processed"]), ("mean_batch_size", f"{snap['mean_batch_size']:.2f}"),
            ("max_batch_size", snap["max_batch_size"]), ("batch_limit", snap["batch_limit"]),
            *((f"fault_{k}", v) for k, v in sorted(snap["faults"].items())))]
        arr.status.append(node_status)
        for cam in self.cameras:
            s = snap["cameras"][cam.topic]
            dropped = s["dropped"]
            fps = s["processed_fps"]
            bad = sum(v for k, v in dropped.items() if k not in ("superseded", "no_subscribers", "too_old"))
            level, message = DiagnosticStatus.OK, f"{fps:.1f} fps"
            silent = s["seconds_since_last_frame"]
            if s["received"] == 0 or silent is None:
                level, message = DiagnosticStatus.WARN, "no frames received yet"
            elif silent > STALE_INPUT_S:
                level, message = DiagnosticStatus.WARN, f"no frames for {silent:.0f} s"
            elif bad:
                level, message = DiagnosticStatus.WARN, f"{fps:.1f} fps; {bad} bad frames dropped"
            elif s["problem"]:
                level, message = DiagnosticStatus.WARN, f"{fps:.1f} fps; {s['problem']}"
            st = DiagnosticStatus(level=level, name=f"{name}: {cam.topic}", hardware_id=device, message=message)
            values = [("input_rate_hz", f"{s['input_rate_hz']:.2f}"), ("processed_fps", f"{fps:.2f}"),
                      ("latency_p50_ms", f"{s['latency_p50_ms']:.1f}"),
                      ("latency_p95_ms", f"{s['latency_p95_ms']:.1f}"), ("latency_from", s["latency_from"]),
                      ("clock_offset_s", "n/a" if s["clock_offset_s"] is None else f"{s['clock_offset_s']:.3f}"),
                      ("inference_p50_ms", f"{s['inference_p50_ms']:.1f}"),
                      ("inference_p95_ms", f"{s['inference_p95_ms']:.1f}"),
                      ("frames_received", s["received"]), ("frames_processed", s["processed"]),
                      ("frames_dropped", sum(v for k, v in dropped.items() if k != "no_subscribers")),
                      ("frames_skipped_no_subscribers", dropped.get("no_subscribers", 0)),
                      ("device", device), ("model", self.model_path)]
            values += [(f"dropped_{k}", v) for k, v in sorted(dropped.items()) if k != "no_subscribers"]
            values += [(f"computed_{k}", s["computed"].get(k, 0)) for k in cam.publishers]
            st.values = [KeyValue(key=k, value=str(v)) for k, v in values]
            arr.status.append(st)
        self._diag_pub.publish(arr)

    # ------------------------------------------------------------------ shutdown
    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker (waits for the forward pass in flight)."""
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            pipeline.stop(timeout)

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
        return 1 if node.fatal_error else 0
    finally:
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())

