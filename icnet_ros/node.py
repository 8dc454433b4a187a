"""``icnet_node``: a managed (lifecycle) rclpy adapter over :class:`icnet_ros.engine.Segmenter`.

Camera topics in (``sensor_msgs/Image`` rgb8/bgr8/rgba8/bgra8/mono8, or ``sensor_msgs/CompressedImage`` jpeg/png
for topics ending in ``/compressed``); per camera, next to its input topic (``/cam/image_raw`` ->
``/cam/semantic/...``): ``label`` (mono8 class ids, 255 = unknown), ``color`` and ``overlay`` (rgb8, bgr8 for BGR
inputs), ``confidence`` (mono8, 0-255) and ``camera_info`` (the camera_info with the image's stamp, scaled to the
label's resolution: :mod:`icnet_ros.camera_info`), each with the input's header. Class metadata goes out once as
JSON on a transient-local ``std_msgs/String`` topic and as read-only parameters; ``/diagnostics`` carries rates,
latencies, drops, device and model.

Lifecycle (REP-2002 managed node): *configure* loads and warms up the model and creates the publishers;
*activate* subscribes and starts the worker; *deactivate* unsubscribes and stops taking frames; *cleanup* frees the
model and its (GPU) memory; *shutdown* ends the process. With ``autostart`` (default) the node drives itself to
active at start-up; otherwise a lifecycle manager (or ``ros2 lifecycle set``) does.

Scheduling (:class:`icnet_ros.frame_pipeline.FramePipeline`, ROS-free): subscription callbacks only store the
newest message per camera; one worker thread serves the newest frame of every camera in one batched
``Segmenter.segment`` call and publishes through this node.

Parameters (:mod:`icnet_ros.node_params`): live ones apply to the next batch; ``model`` and the engine options that
need a new Segmenter (``device``, ``precision``, ``backend``, ...) switch by hot swap: the new Segmenter is built and
warmed up in the parameter service's thread while the worker keeps serving with the current one, then swapped in
between two batches; a new one that cannot start is refused with the reason (the parameter keeps its value).

QoS: ROS 2's ``qos_overrides`` (rclpy ``QoSOverridingOptions``: history, depth, reliability, durability) on every
image subscription and output publisher, read at start-up. Outputs default to reliable, depth 5. An image
subscription without a reliability override follows its publishers (REP-2003 sensor data, best effort, when there
is none or any of them is best effort; reliable when all are): a reliable camera's large frames then arrive whole,
which best effort over DDS often does not deliver. When a camera has a publisher but no frame arrives for
:data:`NO_FRAMES_WARN_S` seconds the node says why that usually happens and what to change.

Start-up errors (bad parameter, missing or invalid model) print one clear line and exit with status 2; the process
(signals, clean exit) is :mod:`icnet_ros.node_process`.
"""
from __future__ import annotations

import contextlib
import functools
import dataclasses
import gc
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import CallbackGroup, MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterException
try:
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble: rclpy.qos_event (renamed event_handler in Iron, kept as a deprecated alias since)
    from rclpy.qos_event import SubscriptionEventCallbacks
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSPolicyKind, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String

from . import node_params
from .camera_info import CameraInfoCache, camera_info_problem, scale_camera_info, stamp_ns
from .engine_config import LIVE_OPTIONS, ConfigError
from .frame_pipeline import FramePipeline, PipelineOptions, release_device_memory
from .node_params import NODE_NAME, NodeConfig, ParameterError, rclpy_parameter_problem
from .ros_image import numpy_to_image

__all__ = ["EntityExclusiveCallbackGroup", "SegmentationNode", "StartupError", "auto_cpu_threads"]

STALE_INPUT_S = 5.0  # a camera silent this long is reported as WARN in /diagnostics
SHUTDOWN_EXIT_DELAY_S = 0.5  # from the shutdown transition to the process's end (its response goes out first)
BAD_FRAMES_WARN_S = 10.0  # a camera that dropped bad frames is WARN in /diagnostics for this long after the last
NO_FRAMES_WARN_S = 5.0  # a camera with a publisher but no frame this long gets a warning with the likely cause
RETIRE_S = 5.0  # the longest a replaced image subscription stays while its successor matches the publishers
OVERLAP_FRAME_IDS = 64  # frame_ids remembered while two subscriptions of a camera overlap (see _on_image)
OUTPUT_DEPTH = 5  # default history depth of the output publishers
QOS_POLICIES = (QoSPolicyKind.HISTORY, QoSPolicyKind.DEPTH, QoSPolicyKind.RELIABILITY, QoSPolicyKind.DURABILITY)
SWAP_TIMEOUT_S = 30.0  # the longest a hot swap waits for the batch in flight on the old model
#: the engine options that are node parameters (``outputs`` is the node's own: the publishers it advertises)
ENGINE_NAMES = frozenset(p.name for p in node_params.ENGINE_PARAMS)


class StartupError(RuntimeError):
    """The node cannot start: a bad parameter, a missing or invalid model, an unusable device."""


_QOS_ENUMS = {"history": HistoryPolicy, "reliability": ReliabilityPolicy, "durability": DurabilityPolicy}
_APPLIED_QOS = tuple(sorted(p.name.lower() for p in QOS_POLICIES))  # the qos_overrides policies this node reads


def qos_override_problem(name: str, value: Any) -> str | None:
    """Why a ``qos_overrides.<topic>.<publisher|subscription>.<policy>`` value cannot be applied (None when it
    can). rclpy reads these only when it creates the publisher or subscription, which for an output enabled at run
    time is long after start-up: the node checks every given override at start-up instead. Policies this node
    does not apply are not checked here (a warning names them)."""
    policy = name.rsplit(".", 1)[-1]
    if policy not in _APPLIED_QOS:
        return None
    if policy == "depth":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10000:  # 0: the RMW default
            return (f"parameter {name} = {value!r}: depth must be an integer in [0, 10000] (0: the middleware's "
                    f"default)")
        return None
    allowed = [m.lower() for m in _QOS_ENUMS[policy].__members__ if m != "UNKNOWN"]
    if not isinstance(value, str) or value.lower() not in allowed:
        return f"parameter {name} = {value!r}: {policy} must be one of {', '.join(allowed)}"
    return None


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


def input_reliability(publisher_reliabilities: list[str]) -> str:
    """The reliability an image subscription takes from its publishers (``"reliable"``/``"best_effort"`` each):
    reliable when there are publishers and all of them are reliable (a reliable subscription cannot match a
    best-effort publisher), otherwise best effort (REP-2003's sensor data)."""
    if publisher_reliabilities and all(r == "reliable" for r in publisher_reliabilities):
        return "reliable"
    return "best_effort"


def no_frames_hint(topic: str, publishers: int, reliability: str) -> str:
    """The warning for a camera whose ``publishers`` publish but whose frames do not arrive."""
    head = f"{topic}: {publishers} publisher(s) but no frame received for {NO_FRAMES_WARN_S:.0f} s"
    if reliability == "best_effort":
        return (f"{head}. Likely cause: frames too large for best-effort DDS (a frame is sent in many fragments and "
                f"one lost fragment loses it; Fast DDS's default 512 KiB shared-memory segment holds no 640x480 rgb8 "
                f"frame). Fix: let the camera publish reliable (this node then subscribes reliable), or set "
                f"qos_overrides.{topic}.subscription.reliability: reliable, or give Fast DDS a profile with a larger "
                f"shared-memory segment (icnet_ros/data/fastdds_loopback.xml), or use the camera's /compressed topic")
    return (f"{head} (subscribed reliable). Likely cause: incompatible QoS or a publisher on another DDS "
            f"configuration (check `ros2 topic info -v {topic}`: durability, ROS_DOMAIN_ID, "
            f"ROS_AUTOMATIC_DISCOVERY_RANGE)")


def _message_type_name(msg_type: Any) -> str:
    """``sensor_msgs/msg/Image`` for the Image class (the name ROS graph queries give)."""
    return f"{msg_type.__module__.split('.')[0]}/msg/{msg_type.__name__}"


def wrong_type_hint(topic: str, others: list[str], compressed: bool) -> str:
    """The warning for a camera topic whose publishers publish another message type than the node takes there."""
    want = _message_type_name(CompressedImage if compressed else Image)
    fix = ("a topic that does not end in /compressed takes sensor_msgs/msg/Image; for CompressedImage frames name "
           "the camera's .../compressed topic in image_topics" if not compressed else
           "a topic ending in /compressed takes sensor_msgs/msg/CompressedImage; for raw frames name the raw topic")
    return (f"{topic}: published as {', '.join(others)}, but this node subscribes to it as {want}: no frame can "
            f"arrive ({fix})")


class EntityExclusiveCallbackGroup(CallbackGroup):
    """Callbacks of different entities run at the same time; one entity's never twice at once (a service's
    requests are answered in turn, /clock messages applied in order, a timer never overlaps itself). rclpy's
    reentrant group lets the executor start an entity again as soon as its data is taken; its mutually exclusive
    group runs one callback of the whole group at a time."""

    def __init__(self) -> None:
        super().__init__()
        # by id, each kept alive while listed: no other entity can take its id (rclpy may skip ending_execution
        # when a waitable's take fails on a destroyed handle; that entry then stays, for an entity that is gone)
        self._running: dict[int, Any] = {}
        self._lock = threading.Lock()

    def can_execute(self, entity: Any) -> bool:
        with self._lock:
            return self._running.get(id(entity)) is not entity

    def beginning_execution(self, entity: Any) -> bool:
        with self._lock:
            if self._running.get(id(entity)) is entity:
                return False
            self._running[id(entity)] = entity
            return True

    def ending_execution(self, entity: Any) -> None:
        with self._lock:
            if self._running.get(id(entity)) is entity:
                del self._running[id(entity)]


def _one_change_at_a_time(wait: bool = False) -> Callable[[Callable[..., TransitionCallbackReturn]],
                                                         Callable[..., TransitionCallbackReturn]]:
    """A lifecycle transition's callback, run under the node's change lock (:meth:`SegmentationNode._changing`):
    refused (FAILURE, the state as it was, the reason logged) while another change runs, or, with ``wait``
    (shutdown, error processing), run after it."""
    def wrap(fn: Callable[..., TransitionCallbackReturn]) -> Callable[..., TransitionCallbackReturn]:
        transition = fn.__name__.removeprefix("on_")

        @functools.wraps(fn)
        def run(self: SegmentationNode, state: State) -> TransitionCallbackReturn:
            with self._changing(wait) as busy:
                if busy:  # (not a failed start: startup_error, which /diagnostics reports, stays as it was)
                    self.get_logger().warning(f"{transition} refused: {busy}")
                    return TransitionCallbackReturn.FAILURE
                return fn(self, state)
        return run
    return wrap


@dataclasses.dataclass
class Camera:
    """One input topic with its publishers, its subscription and its recent camera_info (its frames and statistics
    live in the pipeline, under the same topic as key)."""

    topic: str
    compressed: bool
    publishers: dict[str, Any]
    info_publisher: Any | None
    info_cache: CameraInfoCache
    subscription: Any | None = None
    info_subscription: Any | None = None
    reliability: str = "best_effort"  # of the image subscription
    fixed_reliability: bool = False  # set by qos_overrides: never follows the publishers
    waiting_since: float | None = None  # monotonic time since which a publisher exists and no frame came
    warned_no_frames: bool = False
    bad_total: int = 0  # bad frames dropped, as last reported on /diagnostics
    bad_since: float | None = None  # monotonic time of the report that first saw bad_total's latest increase
    reported: tuple[int, int] = (0, 0)  # (frames served or dropped, dropped as too_old) at the last report
    info_unmatched_seen: int = 0  # frames without a camera_info of their stamp, as last warned of
    # a replaced image subscription serves on until its successor has matched every publisher (DDS matches
    # asynchronously: a reliable writer delivers only to readers it has matched), then goes; see _watch_inputs
    retiring: Any | None = None
    retire_by: float = 0.0  # monotonic deadline for ``retiring``
    subscription_token: object | None = None  # passed by ``subscription``'s callback (``retiring``'s has another)
    successor_delivered: bool = False  # while two overlap: ``subscription`` has delivered a frame
    #: while two overlap, by frame_id: the newest stamp the old subscription delivered; None once the new one took over
    overlap_stamps: dict[str, tuple[int, int] | None] = dataclasses.field(default_factory=dict)


class SegmentationNode(LifecycleNode):
    """The ``icnet_node`` lifecycle node.

    ``start``: None (default) follows the ``autostart`` parameter: configure and activate in the constructor,
    raising :class:`StartupError` when that fails; False leaves the node unconfigured (the process entry point
    drives it from the executor, so that signals are served while the model loads)."""

    def __init__(self, node_name: str = NODE_NAME, start: bool | None = None, **node_kwargs: Any) -> None:
        # one change at a time (a transition, a parameter change): the services, /clock and the timers are served
        # beside it, so another change is refused while one runs (see _changing)
        self._change_lock = threading.RLock()
        # rclpy's parameter table: declared into by transitions, listed by the (concurrent) parameter services
        self._param_lock = threading.RLock()
        try:
            super().__init__(node_name, **node_kwargs)
        except ParameterException as e:  # rclpy's own parameters (use_sim_time:=5, ...): one line, not a traceback
            raise StartupError(rclpy_parameter_problem(e)) from None
        try:
            raw = node_params.declare(self)
            self.config: NodeConfig = node_params.parse(raw)
        except ParameterError as e:
            raise StartupError(str(e)) from None
        resolved = {}  # before anything else resolves them (qos_overrides' check, configure)
        for name, topic in [*(("image_topics", t) for t in self.config.image_topics),
                            ("classes_topic", self.config.classes_topic)]:
            try:
                resolved[topic] = self.resolve_topic_name(topic)
            except Exception as e:  # noqa: BLE001 - rclpy's RCLError ('{ns}/image' in '/': '//image'), one line
                reason = str(e).split(", at /")[0].removeprefix("failed to resolve name: ")
                raise StartupError(f"parameter {name!r}: cannot resolve {topic!r} in namespace "
                                   f"{self.get_namespace()!r}: {reason}") from None
        self._warn_unknown_overrides()
        problem = node_params.topic_collision(list(self.config.image_topics),
                                              [resolved[t] for t in self.config.image_topics],
                                              self.config.output_namespace)
        if problem:
            raise StartupError(problem)
        for name, param in (getattr(self, "_parameter_overrides", None) or {}).items():
            problem = qos_override_problem(name, param.value) if name.startswith("qos_overrides.") else None
            if problem:
                raise StartupError(problem)
        # subscriptions and timers run beside the parameter and lifecycle services (MultiThreadedExecutor), so a
        # hot swap or a configure can take seconds without stopping the frames
        self.io_group = MutuallyExclusiveCallbackGroup()
        self._pub_lock = threading.Lock()  # publishers of the cameras (the worker publishes, `outputs` changes)
        # the image subscriptions: made and dropped by lifecycle transitions and by the input watch (a timer)
        self._sub_lock = threading.RLock()
        self.segmenter: Any = None
        self.pipeline: FramePipeline | None = None
        self.cameras: list[Camera] = []
        self._by_topic: dict[str, Camera] = {}
        self.model_path = self.config.model
        self._model_identity: tuple[int, int, int, int] | None = None  # the loaded model file's (_file_identity)
        self.cpu_threads = 0
        self.fatal_error: str | None = None  # an unrecoverable device error: the process exits with status 1
        self.startup_error: str | None = None  # why the last configure failed
        self.finished = threading.Event()  # shut down (lifecycle shutdown or fatal error): the process ends
        self._class_contract: tuple | None = None  # (names, colors, ignore index) announced as parameters
        self._classes_pub: Any = None
        self._active = False
        self._starting = False
        self._shut_down = False  # the shutdown transition happened: the process is ending
        self.busy: str | None = None  # a long operation in progress (a model load), for the process's exit
        self.add_pre_set_parameters_callback(self._as_declared_type)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # health reporting runs on the steady clock: with use_sim_time a ROS-clock timer stops before the first /clock,
        # while the clock is paused and when a replay ends (when "no frames for N s" matters), and races at 10x
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._diag_timer = self.create_timer(self.config.diagnostics_period, self._publish_diagnostics,
                                             callback_group=self.io_group, clock=steady)
        self._watch_timer = self.create_timer(1.0, self._watch_inputs, callback_group=self.io_group, clock=steady)
        if start is None:
            start = self.config.autostart
        if start:
            self.start()
        elif not self.config.autostart:
            self.get_logger().info("unconfigured: waiting for a lifecycle manager (autostart is false)")

    @property
    def default_callback_group(self) -> Any:
        """The group of what rclpy creates without one: the parameter, lifecycle and type-description services and,
        with use_sim_time, the /clock subscription. Each runs beside the others (rclpy's default group runs one
        callback at a time): a model hot swap (a parameter change) or a configure takes seconds to minutes in its
        callback, during which ``get_state`` / ``get_parameters`` went unanswered (a lifecycle manager's timeout)
        and the simulated clock stood still (frames served meanwhile looked stamped from another clock). One
        entity's callbacks still run one at a time (:class:`EntityExclusiveCallbackGroup`); the node's own changes
        are serialised by :meth:`_changing`."""
        group = self.__dict__.get("_services_group")
        if group is None:
            group = self.__dict__["_services_group"] = EntityExclusiveCallbackGroup()
        return group

    @contextlib.contextmanager
    def _changing(self, wait: bool = False) -> Iterator[str | None]:
        """Hold the change lock for a transition or a parameter change; yields None, or (without ``wait``, while
        another change holds it) why the change is refused. Reentrant: a change may set parameters itself (the
        class parameters declared at configure)."""
        if not self._change_lock.acquire(blocking=wait):
            yield (f"busy: {self.busy or 'another lifecycle transition or parameter change'} in progress; try again "
                   "when it is done")
            return
        try:
            yield None
        finally:
            self._change_lock.release()

    def start(self) -> None:
        """Configure and activate (autostart); raises :class:`StartupError` when configuring fails. One change: a
        parameter change is refused until both are done (in the gap between them it made the activate 'busy')."""
        with self._change_lock:
            self._starting = True
            try:
                configured = self.trigger_configure() == TransitionCallbackReturn.SUCCESS
            finally:
                self._starting = False
            if not configured:
                raise StartupError(self.startup_error or "configure failed")
            if self.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                raise StartupError(self.startup_error or "activate failed")

    # rclpy's parameter API, made safe beside the concurrent services: its parameter table is a dict that
    # list_parameters iterates while a transition declares into it ('dictionary changed size during iteration'
    # ended the executor), and a set stores its value after the callbacks return (two sets at once could leave the
    # parameter at one value and the running config at the other). A set replaces values of declared parameters
    # (the table keeps its size), and it may run a hot swap for minutes: it holds the change lock, not the table's
    def declare_parameters(self, *args: Any, **kwargs: Any) -> Any:
        with self._param_lock:
            return super().declare_parameters(*args, **kwargs)

    def undeclare_parameter(self, name: str) -> None:
        with self._param_lock:
            super().undeclare_parameter(name)

    def list_parameters(self, *args: Any, **kwargs: Any) -> Any:
        with self._param_lock:
            return super().list_parameters(*args, **kwargs)

    def get_parameters_by_prefix(self, prefix: str) -> Any:
        with self._param_lock:
            return super().get_parameters_by_prefix(prefix)

    def set_parameters(self, parameter_list: list[Any]) -> list[SetParametersResult]:
        with self._changing() as busy:
            if busy:
                return [SetParametersResult(successful=False, reason=busy) for _ in parameter_list]
            return super().set_parameters(parameter_list)

    def set_parameters_atomically(self, parameter_list: list[Any]) -> SetParametersResult:
        with self._changing() as busy:
            if busy:
                return SetParametersResult(successful=False, reason=busy)
            return super().set_parameters_atomically(parameter_list)

    # ------------------------------------------------------------------ lifecycle transitions
    @_one_change_at_a_time()
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        self.startup_error = None
        try:
            self.get_logger().info(f"configuring: loading {self._model_path(self.config.model)} ...")
            with self._busy("loading the model"):
                seg, identity = self._load_segmenter(self.config)
            self._check_classes(seg)
        except StartupError as e:
            return self._failed("configure", str(e))
        except Exception as e:  # noqa: BLE001 - rclpy would turn it into a silent failed transition
            return self._failed("configure", f"{type(e).__name__}: {e}")
        self._set_segmenter(seg, self.config.model, identity)
        try:
            self._create_outputs()
        except Exception as e:  # noqa: BLE001 - rclpy's errors (RCLError, ...): the reason, not a bare "failed"
            self._release()
            return self._failed("configure", f"cannot create the node's topics: {type(e).__name__}: {e}")
        self.get_logger().info(f"configured: {self._describe_model()}")
        return super().on_configure(state)

    def _failed(self, transition: str, reason: str) -> TransitionCallbackReturn:
        self.startup_error = reason
        if not self._starting:  # a start-up failure is reported once, by whoever started the node
            self.get_logger().error(f"{transition} failed: {reason}")
        return TransitionCallbackReturn.FAILURE

    def _create_outputs(self) -> None:
        """The class metadata, the cameras' output publishers (kept where _release finds them, also when one
        fails) and the frame pipeline."""
        cfg = self.config
        self._declare_class_parameters()
        classes_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._classes_pub = self.create_publisher(String, cfg.classes_topic, classes_qos)
        self._classes_pub.publish(String(data=self.classes_json))
        self.cameras = []
        for topic in cfg.image_topics:
            base, compressed = self._camera_base(topic), node_params.base_topic(topic)[1]
            cam = Camera(topic, compressed, {}, None, CameraInfoCache())
            self.cameras.append(cam)
            if cfg.publish_camera_info:
                cam.info_publisher = self._output_publisher(CameraInfo, node_params.sibling_topic(
                    base, f"{cfg.output_namespace}/camera_info"))
            for kind in cfg.outputs:
                cam.publishers[kind] = self._output_publisher(Image, self._output_topic(cam, kind))
        self._by_topic = {c.topic: c for c in self.cameras}
        self.pipeline = FramePipeline(
            self.segmenter, [(c.topic, c.compressed) for c in self.cameras], wanted=self._wanted,
            publish=self._publish, clock_ns=lambda: self.get_clock().now().nanoseconds,
            options=PipelineOptions.from_config(cfg), logger=self.get_logger(), on_fatal=self._on_fatal,
            simulated_clock=lambda: self.get_clock().ros_time_is_active)

    @_one_change_at_a_time()
    def on_activate(self, state: State) -> TransitionCallbackReturn:
        self.startup_error = None
        with self._sub_lock:
            try:
                for cam in self.cameras:
                    self._subscribe(cam)
            except Exception as e:  # noqa: BLE001 - as in on_configure
                for cam in self.cameras:
                    self._unsubscribe(cam)
                return self._failed("activate", f"cannot subscribe to the cameras: {type(e).__name__}: {e}")
            assert self.pipeline is not None
            self.pipeline.start()
            self._active = True
        cfg = self.config
        cameras = []
        for c in self.cameras:
            outputs = node_params.sibling_topic(self._camera_base(c.topic), cfg.output_namespace)
            cameras.append(f"{self.resolve_topic_name(c.topic)}{' (compressed)' if c.compressed else ''} "
                           f"[{c.reliability}] -> {outputs}/*")
        self.get_logger().info(f"ready: {self._describe_model()}; cameras: {', '.join(cameras)}")
        return super().on_activate(state)

    @_one_change_at_a_time()
    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        with self._sub_lock:
            self._active = False
            for cam in self.cameras:
                self._unsubscribe(cam)
        if self.pipeline is not None:
            self.pipeline.stop()
            # a frame received before this is never served after the next activate (seconds or minutes later, with
            # its old stamp): dropped now, counted as 'deactivated'
            self.pipeline.discard_pending()
        self.get_logger().info("inactive: not taking frames")
        return super().on_deactivate(state)

    @_one_change_at_a_time()
    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info("unconfigured: model released")
        return super().on_cleanup(state)

    @_one_change_at_a_time(wait=True)
    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self._release()
        self._shut_down = True  # /diagnostics says nothing more (not 'unconfigured: waiting for configure')
        # the process ends when ``finished`` is set: a moment after this transition's response has gone out, so
        # that the caller (``ros2 lifecycle set``, a lifecycle manager) has it before the node's DDS entities go
        ending = threading.Timer(SHUTDOWN_EXIT_DELAY_S, self.finished.set)
        ending.daemon = True
        ending.start()
        return super().on_shutdown(state)

    @_one_change_at_a_time(wait=True)
    def on_error(self, state: State) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _release(self, timeout: float = 10.0) -> None:
        """Stop the worker, drop subscriptions and publishers, free the model and its device memory."""
        with self._sub_lock:
            self._active = False
            for cam in self.cameras:
                self._unsubscribe(cam)
        pipeline = self.pipeline
        ended = pipeline.stop(timeout) if pipeline is not None else True
        with self._pub_lock:
            for cam in self.cameras:
                for pub in (*cam.publishers.values(), cam.info_publisher):
                    if pub is not None:
                        self.destroy_publisher(pub)
                cam.publishers, cam.info_publisher = {}, None
        if self._classes_pub is not None:
            self.destroy_publisher(self._classes_pub)
            self._classes_pub = None
        self.cameras, self._by_topic, self.pipeline = [], {}, None
        if self.segmenter is not None:
            # a forward pass that outlasted the stop's timeout still runs on it: the worker closes it when that
            # batch ends (its frames are not published), never under it
            if ended or pipeline is None or pipeline.retire(self.segmenter):
                self.segmenter.close()
            self.segmenter = None
            gc.collect()  # the model's tensors, before the allocator's cache goes back to the device
            release_device_memory()

    @contextlib.contextmanager
    def _busy(self, what: str) -> Iterator[None]:
        """Marks a long operation (a model load) that a process exit does not wait for (:attr:`busy`)."""
        self.busy = what
        try:
            yield
        finally:
            self.busy = None

    # ------------------------------------------------------------------ topics and QoS
    def _camera_base(self, topic: str) -> str:
        """A camera's base topic as this node resolves it (namespace and remappings: ``-r /camera/image_raw:=
        /front/image_raw`` moves the camera to /front): its camera_info and its outputs are the base's siblings."""
        return node_params.base_topic(self.resolve_topic_name(topic))[0]

    def _output_topic(self, cam: Camera, kind: str) -> str:
        return node_params.sibling_topic(self._camera_base(cam.topic), f"{self.config.output_namespace}/{kind}")

    def _output_publisher(self, msg_type: Any, topic: str) -> Any:
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=OUTPUT_DEPTH, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
        return self.create_publisher(msg_type, topic, qos,
                                     qos_overriding_options=QoSOverridingOptions(QOS_POLICIES))

    def _override_given(self, topic: str, policy: str) -> bool:
        name = f"qos_overrides.{self.resolve_topic_name(topic)}.subscription.{policy}"
        return name in (getattr(self, "_parameter_overrides", None) or {}) or self.has_parameter(name)

    def _camera_publishers(self, cam: Camera) -> tuple[list[str], list[str]]:
        """The reliabilities of the publishers of the camera's message type on its topic, and the other message
        types published there (whose messages never reach this subscription: counted, they made the subscription
        follow a CompressedImage publisher's reliability and the no-frames warning blame QoS or DDS)."""
        want = _message_type_name(CompressedImage if cam.compressed else Image)
        same, other = [], set()
        for i in self.get_publishers_info_by_topic(self.resolve_topic_name(cam.topic)):
            if i.topic_type == want:
                same.append("reliable" if i.qos_profile.reliability == ReliabilityPolicy.RELIABLE else "best_effort")
            else:
                other.add(i.topic_type)
        return same, sorted(other)

    def _subscribe(self, cam: Camera) -> None:
        """The image subscription (reliability from qos_overrides, else from the publishers) and the camera_info
        subscription."""
        cam.fixed_reliability = self._override_given(cam.topic, "reliability")
        policies = QOS_POLICIES if cam.fixed_reliability else tuple(p for p in QOS_POLICIES
                                                                    if p != QoSPolicyKind.RELIABILITY)
        if not cam.fixed_reliability:
            cam.reliability = input_reliability(self._camera_publishers(cam)[0])
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, durability=DurabilityPolicy.VOLATILE,
                         reliability=ReliabilityPolicy.RELIABLE if cam.reliability == "reliable"
                         else ReliabilityPolicy.BEST_EFFORT)
        events = SubscriptionEventCallbacks(incompatible_qos=lambda e, c=cam: self._incompatible(c, e))
        token = object()
        cam.subscription = self.create_subscription(
            CompressedImage if cam.compressed else Image, cam.topic,
            lambda m, t=cam.topic, k=token: self._on_image(t, m, k), qos, callback_group=self.io_group,
            event_callbacks=events, qos_overriding_options=QoSOverridingOptions(policies))
        cam.subscription_token, cam.successor_delivered = token, False
        if cam.fixed_reliability:
            cam.reliability = ("reliable" if cam.subscription.qos_profile.reliability == ReliabilityPolicy.RELIABLE
                               else "best_effort")
        cam.waiting_since, cam.warned_no_frames = None, False
        if self.config.publish_camera_info and cam.info_subscription is None:
            info_topic = node_params.sibling_topic(self._camera_base(cam.topic), "camera_info")
            cam.info_subscription = self.create_subscription(
                CameraInfo, info_topic, lambda m, c=cam: self._on_camera_info(c, m), qos_profile_sensor_data,
                callback_group=self.io_group)

    def _unsubscribe(self, cam: Camera) -> None:
        for attr in ("subscription", "info_subscription", "retiring"):
            sub = getattr(cam, attr)
            if sub is not None:
                self.destroy_subscription(sub)
                setattr(cam, attr, None)

    def _incompatible(self, cam: Camera, event: Any) -> None:
        self.get_logger().warning(
            f"{cam.topic}: a publisher's QoS is incompatible with this subscription ({cam.reliability}; policy "
            f"{getattr(event, 'last_policy_kind', '?')}): its frames cannot arrive; see `ros2 topic info -v "
            f"{self.resolve_topic_name(cam.topic)}`")

    def _on_image(self, topic: str, msg: Any, token: object = None) -> None:
        pipeline = self.pipeline
        if pipeline is None or not self._active:
            return
        cam = self._by_topic.get(topic)
        if cam is not None and cam.retiring is not None and not self._take_during_overlap(cam, msg, token):
            return
        pipeline.submit(topic, msg)

    @staticmethod
    def _take_during_overlap(cam: Camera, msg: Any, token: object) -> bool:
        """Whether to take a frame while a camera's old and new subscriptions overlap (a reliability switch): each
        frame then arrives on both, in either order (a reliable reader that resends lost fragments lags a
        best-effort one). The old subscription's frames are taken until the new one has delivered, none after;
        the new one's, per frame_id, only when newer than the newest taken until one of them was taken (before: only
        an exact repeat of the last frame was skipped, so a lagging copy was segmented again and published
        older-after-newer). Stamps are compared only for that hand-over, not within one subscription's frames: a
        stamp that steps back there is time jumping back (a bag replayed in a loop, a simulator reset), whose frames
        were all refused as copies until the old subscription went. Unstamped frames cannot be told apart: at most
        one may come twice, at the hand-over."""
        from_new = token is cam.subscription_token
        if from_new:
            cam.successor_delivered = True
        elif cam.successor_delivered:
            return False
        stamp = msg.header.stamp
        key = (int(stamp.sec), int(stamp.nanosec))
        if key == (0, 0):
            return True
        frame_id = msg.header.frame_id
        known = frame_id in cam.overlap_stamps
        newest = cam.overlap_stamps.get(frame_id)  # None once the new subscription took this frame_id over
        if from_new and newest is not None and key <= newest:
            return False  # a copy of a frame the old subscription delivered
        if not known and len(cam.overlap_stamps) >= OVERLAP_FRAME_IDS:  # bounded, whatever the frame_ids
            cam.overlap_stamps.clear()
        cam.overlap_stamps[frame_id] = None if from_new else key
        return True

    def _watch_inputs(self) -> None:
        """Follow the publishers' reliability (unless qos_overrides fixed it) and warn about cameras whose
        publishers publish but whose frames do not arrive."""
        with self._sub_lock:  # a transition (deactivate, cleanup) waits; after it, nothing is re-subscribed
            if self._active and self.pipeline is not None:
                self._watch_cameras()

    def _watch_cameras(self) -> None:
        snap = self.pipeline.snapshot()["cameras"]
        now = time.monotonic()
        for cam in self.cameras:
            if cam.subscription is None:
                continue
            reliabilities, others = self._camera_publishers(cam)
            if others and not reliabilities and not cam.warned_no_frames:
                cam.warned_no_frames = True
                self.get_logger().warning(wrong_type_hint(self.resolve_topic_name(cam.topic), others, cam.compressed))
            wanted = input_reliability(reliabilities)
            if not cam.fixed_reliability and reliabilities and wanted != cam.reliability:
                self.get_logger().info(f"{cam.topic}: publisher(s) {sorted(set(reliabilities))}: subscribing "
                                       f"{wanted} (was {cam.reliability})")
                old, old_reliability = cam.subscription, cam.reliability
                cam.reliability = wanted
                try:  # the new subscription first; the old one serves until the new one has matched the publishers
                    self._subscribe(cam)
                except Exception as e:  # noqa: BLE001 - keep the subscription that works
                    cam.subscription, cam.reliability = old, old_reliability
                    self.get_logger().error(f"{cam.topic}: cannot subscribe {wanted}: {type(e).__name__}: {e}")
                    continue
                if cam.retiring is not None:
                    self.destroy_subscription(cam.retiring)
                cam.retiring, cam.retire_by = old, now + RETIRE_S
                cam.overlap_stamps.clear()
                continue
            if cam.retiring is not None and (cam.subscription.get_publisher_count() >= len(reliabilities)
                                             or now >= cam.retire_by):
                self.destroy_subscription(cam.retiring)
                cam.retiring = None
                cam.overlap_stamps.clear()
            s = snap.get(cam.topic, {})
            silent = s.get("seconds_since_last_frame")
            if not reliabilities or (silent is not None and silent < NO_FRAMES_WARN_S):
                cam.waiting_since = None
                continue
            if cam.waiting_since is None:
                cam.waiting_since = now
            elif now - cam.waiting_since >= NO_FRAMES_WARN_S and not cam.warned_no_frames:
                cam.warned_no_frames = True
                self.get_logger().warning(no_frames_hint(self.resolve_topic_name(cam.topic), len(reliabilities),
                                                         cam.reliability))

    # ------------------------------------------------------------------ model
    def _qos_entities(self) -> set[str]:
        """``TOPIC.subscription`` / ``TOPIC.publisher`` for every entity whose QoS ``qos_overrides`` can set: each
        camera's image subscription and its outputs' publishers (enabled now or later), names resolved."""
        entities = set()
        for topic in self.config.image_topics:
            entities.add(f"{self.resolve_topic_name(topic)}.subscription")
            base = self._camera_base(topic)
            for kind in (*node_params.OUTPUT_KINDS, "camera_info"):  # as created: remappings apply to outputs too
                output = node_params.sibling_topic(base, f"{self.config.output_namespace}/{kind}")
                entities.add(f"{self.resolve_topic_name(output)}.publisher")
        return entities

    def _warn_unknown_overrides(self) -> None:
        overrides = getattr(self, "_parameter_overrides", {}) or {}  # rclpy keeps no public list of overrides
        entities = None
        for name in overrides:
            if name.startswith("qos_overrides."):
                entity, _, policy = name[len("qos_overrides."):].rpartition(".")
                if policy not in _APPLIED_QOS:
                    self.get_logger().warning(f"ignoring {name}: this node applies the QoS policies "
                                              f"{', '.join(_APPLIED_QOS)}")
                    continue
                entities = self._qos_entities() if entities is None else entities
                if entity not in entities:  # a typo, or a topic left from another set of image_topics
                    topic, _, kind = entity.rpartition(".")
                    cameras = sorted(e.rpartition(".")[0] for e in entities if e.endswith(".subscription"))
                    outputs = sorted(e.rpartition(".")[0] for e in entities if e.endswith(".publisher"))
                    self.get_logger().warning(
                        f"ignoring {name}: this node has no {kind} on {topic} (subscriptions: {', '.join(cameras)}; "
                        f"publishers: {', '.join(outputs)})"[:1000])
                continue
            # rclpy's own parameters (use_sim_time, start_type_description_service) are declared by now
            if name in node_params.SPECS or self.has_parameter(name) or name.startswith("classes."):
                continue
            near = node_params.close_matches(name)
            self.get_logger().warning(f"ignoring unknown parameter {name!r}"
                                      + (f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""))

    @staticmethod
    def _model_path(model: str) -> str:
        """The file ``model`` names (the default model for ''); :class:`StartupError` when it is not installed."""
        from .checkpoint import CheckpointError, default_model_path

        if model:
            return model
        try:
            return str(default_model_path())
        except CheckpointError as e:
            message = str(e).removesuffix("; pass a model path")
            raise StartupError(f"cannot load model: {message}; set the 'model' parameter to a model file") from None

    @staticmethod
    def _file_identity(path: str) -> tuple[int, int, int, int] | None:
        """What tells a rewritten model file from the loaded one (device, inode, size, modification time)."""
        try:
            st = os.stat(os.path.expanduser(path))
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _set_segmenter(self, seg: Any, model: str, identity: tuple[int, int, int, int] | None) -> None:
        self.segmenter = seg
        self.model_path = self._model_path(model)
        self._model_identity = identity

    def _load_segmenter(self, config: NodeConfig) -> tuple[Any, tuple[int, int, int, int] | None]:
        """Build and warm up a Segmenter for ``config`` (the node's, or the one a parameter change asks for), with
        its model file's identity taken before the file is read (a file replaced during a long load, warm-up or
        engine build is then new to a later request for the same path, not taken as loaded); every failure becomes
        a one-line :class:`StartupError`."""
        from .backends.base import MissingRuntimeError
        from .checkpoint import CheckpointError

        model, engine = config.model, config.engine
        path = self._model_path(model)
        identity = self._file_identity(str(path))
        try:
            import torch

            from .engine import Segmenter, backend_for, inference_device

            with warnings.catch_warnings():  # the Segmenter reports the auto -> CPU fallback
                warnings.simplefilter("ignore", RuntimeWarning)
                on_cpu = inference_device(backend_for(str(path), engine.backend), engine.device).type == "cpu"
            threads = config.num_threads or (auto_cpu_threads() if on_cpu else 0)
            if threads:
                torch.set_num_threads(threads)
            self.cpu_threads = torch.get_num_threads()

            with warnings.catch_warnings():  # fallbacks (auto -> CPU, ...) are logged below, not printed twice
                warnings.simplefilter("ignore", RuntimeWarning)
                seg = Segmenter(str(path), engine, outputs=tuple(config.outputs))
            if isinstance(engine.warmup, tuple):  # the cameras' sizes: also the batches that cameras can form
                try:
                    for batch in range(2, min(config.max_batch, len(config.image_topics)) + 1):
                        for size in engine.warmup:
                            seg.warmup(size, batch=batch)
                except BaseException:
                    seg.close()
                    raise
            for note in getattr(seg, "notes", ()):
                self.get_logger().warning(note)
            return seg, identity
        except CheckpointError as e:
            message = str(e).removesuffix("; pass a model path")
            hint = "" if model else "; set the 'model' parameter to a .safetensors checkpoint"
            raise StartupError(f"cannot load model: {message}{hint}") from None
        except MissingRuntimeError as e:
            raise StartupError(str(e)) from None
        except (ValueError, RuntimeError, OSError) as e:
            raise StartupError(f"cannot start the Segmenter: {e}") from None

    @staticmethod
    def _contract(class_set: Any) -> tuple:
        return (tuple(class_set.classes), tuple(tuple(int(v) for v in c) for c in class_set.palette),
                int(class_set.ignore_index))

    def _check_classes(self, seg: Any) -> None:
        """Class ids, colors and the ignore index are a contract with the subscribers (and the read-only classes.*
        parameters): a model with others needs a restart."""
        if self._class_contract is None or self._contract(seg.class_set) == self._class_contract:
            return
        names, announced = tuple(seg.class_set.classes), self._class_contract[0]
        seg.close()
        if names != announced:
            if len(names) != len(announced):
                what = f"the model has {len(names)} classes, this node announced {len(announced)}"
            else:
                i = next(i for i, (a, b) in enumerate(zip(names, announced)) if a != b)
                what = f"the model's class {i} is {names[i]!r}, this node announced {announced[i]!r}"
            raise StartupError(f"{what} (class ids would change under its subscribers: the class set is fixed for "
                               "the node's lifetime, also across cleanup); restart the node to use it")
        raise StartupError("the model's class colors or ignore index differ from those this node announced (the "
                           "classes.* parameters and the color output; fixed for the node's lifetime, also across "
                           "cleanup); restart the node to use it")

    def _describe_model(self) -> str:
        seg = self.segmenter
        license_ = seg.meta.get("license") if isinstance(getattr(seg, "meta", None), dict) else None
        runs = getattr(seg, "warmed_up", ())
        most = max((batch for *_, batch in runs), default=1)
        warmed = ", ".join(dict.fromkeys(f"{h}x{w}" for h, w, _ in runs)) + (f" (batches 1-{most})" if most > 1 else "")
        return (f"model {self.model_path} on {seg.device} ({seg.precision}, {self.cpu_threads} CPU "
                f"thread{'s' if self.cpu_threads != 1 else ''}), backend {seg.backend.name} "
                f"({seg.backend.provider}): {seg.backend.describe()}, {seg.class_set.num_classes} classes, "
                + (f"warmed up at {warmed}" if warmed else "no warm-up")
                + (f", license {license_}" if license_ else ""))

    def _declare_class_parameters(self) -> None:
        cs = self.segmenter.class_set
        self.classes_json = node_params.class_metadata_json(cs, self.model_path)
        if self._class_contract is not None:  # declared at the first configure (the same: _check_classes)
            return
        self._class_contract = self._contract(cs)
        colors = ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in cs.palette]
        values = {"classes.names": list(cs.classes), "classes.colors": colors,
                  "classes.ignore_index": int(cs.ignore_index)}
        for name, value in values.items():
            self.declare_parameter(name, value, ParameterDescriptor(description=node_params.CLASS_PARAMS[name],
                                                                    read_only=True), ignore_override=True)

    # ------------------------------------------------------------------ parameters at run time
    @staticmethod
    def _as_declared_type(params: list[Any]) -> list[Any]:
        """``ros2 param set /icnet_node input_size 1.5`` sends a double (a string parameter takes its text),
        ``max_age 0`` an integer (a double parameter takes 0.0): :func:`node_params.as_declared_type`."""
        out = []
        for p in params:
            value = node_params.as_declared_type(p.name, p.value)
            out.append(Parameter(p.name, value=value) if value is not p.value else p)
        return out

    def _on_set_parameters(self, params: list[Any]) -> SetParametersResult:
        """Run-time changes (validated like at start-up): live ones apply to the next batch, ``model`` and the
        engine options that need a new Segmenter by hot swap; a failure leaves everything as it was. Refused while
        another change (a hot swap, a transition) runs."""
        with self._changing() as busy:
            if busy:
                return SetParametersResult(successful=False, reason=busy)
            return self._set_parameters_now(params)

    def _set_parameters_now(self, params: list[Any]) -> SetParametersResult:
        changes = {}
        for p in params:
            if p.name not in node_params.SPECS:
                continue
            spec = node_params.SPECS[p.name]
            if spec.read_only:  # rclpy refuses these itself; kept for declare-time calls
                continue
            try:
                value = node_params.check_value(p.name, p.value)
            except ParameterError as e:
                return SetParametersResult(successful=False, reason=str(e))
            if not self._unchanged(p.name, value):  # `ros2 param load` of the running file reloads nothing
                changes[p.name] = value
        if not changes:
            return SetParametersResult(successful=True)
        try:
            self._apply(changes)
        except (StartupError, ConfigError, ValueError) as e:
            return SetParametersResult(successful=False, reason=str(e))
        except Exception as e:  # noqa: BLE001 - an unexpected error refuses the change; it never ends the executor
            self.get_logger().error(f"could not apply {', '.join(changes)}: {type(e).__name__}: {e}")
            return SetParametersResult(successful=False, reason=f"{type(e).__name__}: {e}")
        return SetParametersResult(successful=True)

    def _unchanged(self, name: str, value: Any) -> bool:
        """Whether setting parameter ``name`` to the checked ``value`` would change nothing: the same value (for
        ``model``, the same path to a file not rewritten since it was loaded)."""
        if name in ENGINE_NAMES:
            try:
                return self.config.engine.replace(**{name: value}) == self.config.engine
            except (ConfigError, ValueError):
                return False  # refused with its reason by _apply
        if not hasattr(self.config, name) or (tuple(value) if isinstance(value, list) else value) != getattr(
                self.config, name):
            return False
        if name == "model" and self.segmenter is not None:
            try:
                return self._file_identity(self._model_path(value)) == self._model_identity
            except StartupError:
                return False
        return True

    def _apply(self, changes: dict[str, Any]) -> None:
        engine_changes = {k: v for k, v in changes.items() if k in ENGINE_NAMES}
        rebuild = "model" in changes or any(k not in LIVE_OPTIONS for k in engine_changes)
        engine = self.config.engine.replace(**engine_changes) if engine_changes else self.config.engine
        config = dataclasses.replace(self.config, engine=engine, **{
            k: (tuple(v) if isinstance(v, list) else v) for k, v in changes.items()
            if k in {f.name for f in dataclasses.fields(NodeConfig)} and k != "engine"})
        if "model" in changes and changes["model"] and not os.path.isfile(os.path.expanduser(changes["model"])):
            raise StartupError(f"model {changes['model']!r}: no such file")
        problem = node_params.warmup_problem(engine, config.max_pixels)
        if problem:  # a warm-up frame is bounded like the frames, also when max_pixels changes
            raise StartupError(problem)
        new_outputs = "outputs" in changes and bool(self.cameras)
        if new_outputs:  # the added outputs advertised first (nothing changed when that fails); the withdrawn ones
            # stay until the change is applied (before: gone for the whole hot swap of a change then refused)
            self._set_outputs(tuple(dict.fromkeys((*self.config.outputs, *config.outputs))))
        reconfigured = False
        try:
            if rebuild and self.segmenter is not None:
                self._hot_swap(config)
            elif engine_changes and self.segmenter is not None:
                engine = self.segmenter.reconfigure(**engine_changes)  # applied between two batches
                config = dataclasses.replace(config, engine=engine)
                reconfigured = True
            if not rebuild and self.segmenter is not None and isinstance(engine.warmup, tuple):
                # a larger max_batch: the batches its cameras can now form are warmed up too, as at configure
                warmed = min(self.config.max_batch, len(self.config.image_topics))
                for batch in range(max(warmed, 1) + 1, min(config.max_batch, len(config.image_topics)) + 1):
                    for size in engine.warmup:
                        self.segmenter.warmup(size, batch=batch)
        except BaseException:
            if reconfigured:  # the whole change is refused (a warm-up below failed): the live options as they were
                try:
                    self.segmenter.reconfigure(**{k: getattr(self.config.engine, k) for k in engine_changes})
                except Exception as e:  # noqa: BLE001 - the original error is the one to report
                    self.get_logger().error(f"restoring {', '.join(engine_changes)}: {e}")
            if new_outputs:  # the whole change is refused: the outputs as they were
                try:
                    self._set_outputs(tuple(self.config.outputs))
                except StartupError as e:  # the original error is the one to report
                    self.get_logger().error(f"restoring the outputs {list(self.config.outputs)}: {e}")
            raise
        if new_outputs:
            self._set_outputs(config.outputs)  # (only withdraws: cannot fail)
        self.config = config
        live = {f.name for f in dataclasses.fields(PipelineOptions)}
        update = {k: v for k, v in changes.items() if k in live}
        if update and self.pipeline is not None:
            self.pipeline.configure(**update)

    def _hot_swap(self, config: NodeConfig) -> None:
        """Build and warm up a Segmenter for ``config`` (its model and engine) while the current one serves, then
        swap it in between two batches and free the old one. Raises :class:`StartupError` (nothing changed, said
        in the log too) when it cannot start."""
        t0 = time.monotonic()
        try:
            self.get_logger().info(f"hot swap: loading {self._model_path(config.model)} ...")
            with self._busy("loading a model (hot swap)"):
                new, identity = self._load_segmenter(config)
            self._check_classes(new)
        except StartupError as e:
            self.get_logger().warning(f"hot swap refused: {e}; still serving {self.model_path}")
            raise
        old = self.pipeline.swap_segmenter(new, SWAP_TIMEOUT_S) if self.pipeline is not None else self.segmenter
        self._set_segmenter(new, config.model, identity)
        if old is not None and old is not new and (self.pipeline is None or self.pipeline.retire(old)):
            old.close()  # (else the worker closes it when the batch in flight on it ends)
            release_device_memory()
        self.classes_json = node_params.class_metadata_json(new.class_set, self.model_path)
        if self._classes_pub is not None:
            self._classes_pub.publish(String(data=self.classes_json))
        self.get_logger().info(f"hot swap done in {time.monotonic() - t0:.1f} s: {self._describe_model()}")

    def _set_outputs(self, outputs: tuple[str, ...]) -> None:
        """Advertise exactly ``outputs`` per camera: the new publishers are created first (if one cannot be, those
        created are destroyed and nothing changed), then the dropped ones destroyed."""
        with self._pub_lock:
            created: list[tuple[Camera, str, Any]] = []
            try:
                for cam in self.cameras:
                    for kind in outputs:
                        if kind not in cam.publishers:
                            created.append((cam, kind, self._output_publisher(Image, self._output_topic(cam, kind))))
            except Exception as e:
                for *_, pub in created:
                    self.destroy_publisher(pub)
                raise StartupError(f"cannot advertise the outputs: {type(e).__name__}: {e}") from None
            for cam, kind, pub in created:
                cam.publishers[kind] = pub
            for cam in self.cameras:
                for kind in [k for k in cam.publishers if k not in outputs]:
                    self.destroy_publisher(cam.publishers.pop(kind))

    # ------------------------------------------------------------------ called by the pipeline's worker thread
    def _on_fatal(self, message: str) -> None:
        """The device is unusable: report ERROR on /diagnostics and end the process with status 1, so that launch's
        ``respawn`` can restart the node."""
        self.fatal_error = message
        self.get_logger().fatal(f"{message}; exiting with status 1 (respawn restarts the node)")
        self._publish_diagnostics()
        self.finished.set()  # icnet_node's process exits (node_process)
        rclpy.try_shutdown(context=self.context)  # and an executor spun by other code (icnet-demo) returns

    def _wanted(self, topic: str) -> set[str]:
        with self._pub_lock:
            cam = self._by_topic.get(topic)
            if cam is None:
                return set()
            wanted = {kind for kind, pub in cam.publishers.items() if pub.get_subscription_count() > 0}
            if (cam.info_publisher is not None and cam.info_cache.received
                    and cam.info_publisher.get_subscription_count() > 0):
                # as image_transport's CameraPublisher counts its info subscribers; only while the camera publishes
                # a camera_info (without one, nothing would come of the frame's inference)
                wanted.add("camera_info")
            return wanted

    def _publish(self, topic: str, msg: Any, order: str, res: Any, wanted: set[str]) -> list[str]:
        """Publish one frame's outputs (each with the input's header) and the camera_info with its stamp; returns
        the kinds published."""
        published = []
        header = msg.header
        colour_enc = "bgr8" if order == "BGR" else "rgb8"
        with self._pub_lock:
            cam = self._by_topic.get(topic)
            if cam is None:
                return published
            for kind in node_params.OUTPUT_KINDS:
                pub = cam.publishers.get(kind)
                arr = getattr(res, kind)
                if kind not in wanted or pub is None or arr is None:
                    continue
                out = numpy_to_image(arr, "mono8" if kind in ("label", "confidence") else colour_enc, Image())
                out.header = header
                pub.publish(out)
                published.append(kind)
            info_pub = cam.info_publisher
            if info_pub is not None and info_pub.get_subscription_count() > 0:
                # the sizes this frame had and was segmented at (not the live output_size, which may have changed
                # since its forward pass; a compressed frame's from its decoding, not a second read of its header)
                out_size, in_size = tuple(res.label.shape[:2]), tuple(res.frame_size)
                if min(in_size) > 0:  # a camera_info still to come is published when it arrives (_on_camera_info)
                    info = cam.info_cache.match(stamp_ns(header), waiting=(header, in_size, out_size))
                    self._warn_unmatched_camera_info(cam)
                    if info is not None:
                        try:
                            self._publish_info(info_pub, info, header, in_size, out_size)
                        except ValueError as e:  # that camera_info's fault, not the frame's (its outputs went out)
                            self.get_logger().warning(f"{cam.topic}: cannot publish its camera_info: {e}",
                                                      throttle_duration_sec=10.0)
        return published

    def _warn_unmatched_camera_info(self, cam: Camera) -> None:
        """Say (throttled) that frames found no camera_info with their stamp: a driver or relay that stamps its
        camera_info apart from its images (even by 1 ms) had no camera_info output at all, and no word of why."""
        cache = cam.info_cache
        count, gap = cache.unmatched, cache.unmatched_gap_ns
        if count <= cam.info_unmatched_seen:
            return
        cam.info_unmatched_seen = count
        where = ("" if gap is None else f" (the nearest camera_info is stamped {abs(gap) / 1e6:.3f} ms "
                 f"{'before' if gap > 0 else 'after'} the frame)")
        self.get_logger().warning(
            f"{cam.topic}: {count} frame(s) so far found no camera_info with their header stamp{where}: no "
            f"{self.config.output_namespace}/camera_info is published for them. The camera's driver must stamp each "
            "camera_info as its image (or publish one stamped 0 for every frame)", throttle_duration_sec=10.0)

    @staticmethod
    def _publish_info(pub: Any, info: Any, header: Any, in_size: tuple[int, int], out_size: tuple[int, int]) -> None:
        out_info = scale_camera_info(info, in_size, out_size, CameraInfo())
        out_info.header = header
        pub.publish(out_info)

    def _on_camera_info(self, cam: Camera, msg: Any) -> None:
        """A camera's camera_info: kept for its image, or published now for an image already served before it
        arrived. One that no calibration needs that large is dropped, with a warning (it would be kept and copied
        to every frame's output)."""
        problem = camera_info_problem(msg)
        if problem:
            self.get_logger().warning(f"{cam.topic}: camera_info dropped: {problem}", throttle_duration_sec=10.0)
            return
        late = cam.info_cache.add(msg)
        if not late:
            return
        with self._pub_lock:
            pub = cam.info_publisher
            if pub is None:
                return
            for info, (header, in_size, out_size) in late:
                try:
                    self._publish_info(pub, info, header, in_size, out_size)
                except Exception as e:  # noqa: BLE001 - a bad camera_info is that camera_info's
                    self.get_logger().warning(f"{cam.topic}: cannot publish its camera_info: {type(e).__name__}: {e}",
                                              throttle_duration_sec=10.0)

    # ------------------------------------------------------------------ diagnostics
    def stats_snapshot(self) -> dict[str, dict[str, Any]]:
        """Per-camera counters and latency percentiles (what /diagnostics reports, as numbers)."""
        return self.pipeline.snapshot()["cameras"] if self.pipeline is not None else {}

    def _publish_diagnostics(self) -> None:
        pipeline, seg = self.pipeline, self.segmenter
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        name = self.get_fully_qualified_name()
        if pipeline is None or seg is None:  # unconfigured: only the node's own state, and why (a failed configure)
            if self._shut_down or self.finished.is_set():
                return
            level, message = DiagnosticStatus.OK, "unconfigured: waiting for configure"
            if self.busy:
                message = f"unconfigured: {self.busy}"
            elif self.startup_error:
                level, message = DiagnosticStatus.ERROR, f"unconfigured: configure failed: {self.startup_error}"
            status = DiagnosticStatus(level=level, name=f"{name}: segmenter", message=message)
            status.values = [KeyValue(key="model", value=self.config.model or "(the default model)"),
                             KeyValue(key="active", value="False")]
            arr.status.append(status)
            self._diag_pub.publish(arr)
            return
        snap = pipeline.snapshot(update_rates=True)
        device = str(seg.device)
        fatal = snap["fatal_error"]
        failed = None if self._active or fatal else self.startup_error  # a failed activate
        node_status = DiagnosticStatus(level=DiagnosticStatus.ERROR if fatal or failed else DiagnosticStatus.OK,
                                       name=f"{name}: segmenter", hardware_id=device,
                                       message=fatal or (f"{snap['batches']} batches" if self._active else
                                                         f"inactive; {snap['batches']} batches" + (
                                                             f"; activate failed: {failed}" if failed else "")))
        node_status.values = [KeyValue(key=k, value=str(v)) for k, v in (
            ("device", device), ("model", self.model_path), ("precision", seg.precision),
            ("backend", seg.backend.name), ("provider", seg.backend.provider),
            ("cpu_threads", self.cpu_threads), ("active", self._active),
            ("classes", seg.class_set.num_classes), ("batches", snap["batches"]),
            ("frames_processed", snap["frames_processed"]), ("mean_batch_size", f"{snap['mean_batch_size']:.2f}"),
            ("max_batch_size", snap["max_batch_size"]), ("batch_limit", snap["batch_limit"]),
            *((f"fault_{k}", v) for k, v in sorted(snap["faults"].items())))]
        arr.status.append(node_status)
        for cam in self.cameras:
            s = snap["cameras"][cam.topic]
            dropped = s["dropped"]
            fps = s["processed_fps"]
            bad = sum(v for k, v in dropped.items()
                      if k not in ("superseded", "no_subscribers", "too_old", "deactivated"))
            now = time.monotonic()
            if bad > cam.bad_total:  # the level says how the camera is now: WARN for a while after bad frames, not
                cam.bad_total, cam.bad_since = bad, now  # for good (the counts stay in the values)
            recent_bad = cam.bad_since is not None and now - cam.bad_since <= BAD_FRAMES_WARN_S
            # frames served or dropped since the last report, and how many of them were too old to serve (a frame
            # is counted too old when the worker takes it, maybe after a report that counted its receipt)
            handled = s["processed"] + sum(dropped.values())
            new_frames = max(0, handled - cam.reported[0])
            new_old = max(0, dropped.get("too_old", 0) - cam.reported[1])
            cam.reported = (handled, dropped.get("too_old", 0))
            level, message = DiagnosticStatus.OK, f"{fps:.1f} fps"
            silent = s["seconds_since_last_frame"]
            if not self._active:  # deactivated: not subscribed on purpose, no stale input
                message = "inactive (not subscribed)"
            elif s["received"] == 0 or silent is None:
                level, message = DiagnosticStatus.WARN, "no frames received yet"
                if cam.warned_no_frames:
                    message += " although a publisher exists (QoS, frame size or message type: see the node's log)"
            elif silent > STALE_INPUT_S:
                level, message = DiagnosticStatus.WARN, f"no frames for {silent:.0f} s"
            elif new_old and 2 * new_old >= new_frames:  # most frames lately: a camera nothing is served to
                options = pipeline.options
                level, message = DiagnosticStatus.WARN, (
                    f"{fps:.1f} fps; {new_old} of the {new_frames} frames handled since the last report older than "
                    f"max_age ({options.max_age:g} s from {options.max_age_from}), dropped")
            elif recent_bad:
                level, message = DiagnosticStatus.WARN, (f"{fps:.1f} fps; bad frames dropped in the last "
                                                         f"{BAD_FRAMES_WARN_S:g} s ({bad} in all)")
            elif s["problem"]:
                level, message = DiagnosticStatus.WARN, f"{fps:.1f} fps; {s['problem']}"
            elif cam.info_cache.last_matched is False:
                level, message = DiagnosticStatus.WARN, (
                    f"{fps:.1f} fps; camera_info stamps do not match the frames': no camera_info published "
                    "(see the node's log)")
            st = DiagnosticStatus(level=level, name=f"{name}: {self.resolve_topic_name(cam.topic)}", hardware_id=device,
                                  message=message)
            values = [("input_rate_hz", f"{s['input_rate_hz']:.2f}"), ("processed_fps", f"{fps:.2f}"),
                      ("latency_p50_ms", f"{s['latency_p50_ms']:.1f}"),
                      ("latency_p95_ms", f"{s['latency_p95_ms']:.1f}"), ("latency_from", s["latency_from"]),
                      ("clock_offset_s", "n/a" if s["clock_offset_s"] is None else f"{s['clock_offset_s']:.3f}"),
                      ("inference_p50_ms", f"{s['inference_p50_ms']:.1f}"),
                      ("inference_p95_ms", f"{s['inference_p95_ms']:.1f}"),
                      ("frames_received", s["received"]), ("frames_processed", s["processed"]),
                      ("frames_dropped", sum(v for k, v in dropped.items() if k != "no_subscribers")),
                      ("frames_skipped_no_subscribers", dropped.get("no_subscribers", 0)),
                      ("input_reliability", cam.reliability),
                      ("camera_info_unmatched", cam.info_cache.unmatched),
                      ("device", device), ("model", self.model_path)]
            values += [(f"dropped_{k}", v) for k, v in sorted(dropped.items()) if k != "no_subscribers"]
            with self._pub_lock:  # `outputs` set live adds and removes publishers on another thread
                kinds = list(cam.publishers)
            values += [(f"computed_{k}", s["computed"].get(k, 0)) for k in kinds]
            st.values = [KeyValue(key=k, value=str(v)) for k, v in values]
            arr.status.append(st)
        self._diag_pub.publish(arr)

    # ------------------------------------------------------------------ shutdown
    def close(self, timeout: float = 10.0) -> bool:
        """Stop the worker (waits up to ``timeout`` s for the forward pass in flight); returns whether it ended."""
        self._active = False
        pipeline = getattr(self, "pipeline", None)  # None also when the constructor failed
        return pipeline.stop(timeout) if pipeline is not None else True

    def destroy_node(self) -> None:
        self.close()
        if getattr(self, "segmenter", None) is not None:
            self.segmenter.close()
        super().destroy_node()
