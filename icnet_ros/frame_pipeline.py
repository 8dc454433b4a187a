"""ROS-free frame scheduling for ``icnet_node``: newest frame per camera in, per-frame results with drop reasons out.

:class:`FramePipeline` owns everything between a subscription callback and a publisher: the newest-frame slot of
each camera, one worker thread that takes batches round robin (``max_batch``, ``batch_timeout``), the freshness
policy (``max_age``), decoding, ONE :meth:`Segmenter.segment` call per batch, the retry of a failed batch frame by
frame, and the counters and percentiles that /diagnostics reports. It never imports rclpy: the node (an adapter)
hands it messages with :meth:`submit` and gets results back through two callbacks.

Interface (all thread-safe):

- ``FramePipeline(segmenter, cameras, wanted=..., publish=..., clock_ns=..., options=..., logger=...,
  on_fatal=..., simulated_clock=...)``:
  ``cameras`` is a list of ``(key, compressed)``; ``key`` (the input topic) names the camera in every call.
  ``wanted(key)`` returns the output kinds someone subscribes to (empty: the frame is skipped as
  ``no_subscribers``); ``publish(key, msg, order, result, wanted)`` publishes one frame's outputs and returns the
  kinds it published (counted as ``computed``). ``clock_ns()`` is the node's clock (stamps are compared with
  it); ``simulated_clock()`` says whether it is a simulated one (``use_sim_time``: latency is then timed from
  receipt on the steady clock, as a replay's /clock ticks, pauses and jumps say nothing about the node's own
  time); ``on_fatal(message)`` is called once, from the worker, when the device became unusable.
- :meth:`submit` (subscription callbacks; never blocks on inference), :meth:`start` / :meth:`stop` (the worker
  thread: take frames or not), :meth:`configure` (live options), :meth:`swap_segmenter` (between batches),
  :meth:`snapshot` (counters and percentiles under the lock), :meth:`wait_taken` (a producer's pacing),
  :meth:`samples` and :meth:`idle` (benchmarks), :meth:`close`.

Drop reasons (per camera, in ``snapshot()["cameras"][key]["dropped"]``): ``superseded`` (a newer frame replaced an
unprocessed one: the newest-frame policy), ``deactivated`` (pending when the node stopped taking frames:
:meth:`discard_pending`; in flight when :meth:`stop` was called; submitted between :meth:`stop` and :meth:`start`), ``no_subscribers``, ``too_old`` (``max_age``), the decoder's reasons
(``encoding``, ``size`` (also: above ``max_pixels``), ``step``, ``truncated``, ``decode``;
:class:`~icnet_ros.ros_image.ImageFormatError`), ``rejected`` (the Segmenter refused the frame, e.g. below the
network minimum), ``inference_error`` (the forward pass failed for this frame alone), ``out_of_memory`` (it failed
for lack of device memory even alone), ``device_error`` (the device became unusable), ``publish_error`` and
``internal_error`` (the adapter's ``wanted`` failed for that camera).

Fairness: batches are taken round robin; a frame costing more than :data:`BIG_FRAME` times the smallest pending
frame (in pixels: network input or output size, from the declared size or the compressed header) waits for its
turn by deficit round robin, so a camera sending frames far larger than the others' (up to ``max_pixels``) gets
about its share of the worker's time and the other cameras keep getting frames, instead of one per big forward
pass. A held frame is taken at half of ``max_age`` (from receipt) at the latest, its camera then in debt that its
later frames pay back: held longer it would be too old, and its camera never served. The next batch starts after
the camera served last; cameras nobody subscribes to take no place in a batch.

Clocks: ``max_age`` is measured from when the frame was received (``max_age_from="receipt"``, the default), so
frames stamped by another clock (a camera's hardware clock, a bag replayed without ``use_sim_time``) are served;
``max_age_from="stamp"`` measures the header stamp's age on the node's clock instead. Stamps more than
:data:`FOREIGN_CLOCK_S` away from the node's clock at receipt are reported once per camera, with the fix. A latency
sample is header stamp -> published when the stamp is plausible (on this clock, not in the future), else receipt ->
published; ``latency_from`` in the snapshot says which (``stamp``, ``receipt`` or ``mixed``).

Failures: a failed batch is retried frame by frame, so one frame's fault is that frame's. Out of device memory:
the allocator's cache is released, the frames are retried one by one, and the batch limit halves (it grows back by
one after :data:`REGROW_AFTER` good batches); each step is counted. An unrecoverable device error (a CUDA error
that poisons the context) stops the worker, is kept as ``fatal_error`` in the snapshot and reported once through
``on_fatal(message)``: the node's cue to report ERROR and exit non-zero so that a supervisor restarts it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .engine_config import FrameError
from .ros_image import DEFAULT_MAX_PIXELS, ImageFormatError, compressed_header, segmenter_frame, segmenter_input
from .sizes import MIN_INPUT_SIZE

__all__ = ["AGE_FROM", "BIG_FRAME", "CameraStats", "FOREIGN_CLOCK_S", "FOREIGN_WARN_FRAMES", "FramePipeline",
           "LATE_PERIODS", "LATENCY_WINDOW", "NO_CLOCK_WARN_S", "PipelineOptions", "RECENT_S", "REGROW_AFTER",
           "WARN_PERIOD_S", "device_failure", "release_device_memory"]

WARN_PERIOD_S = 5.0  # throttle for repeated per-camera warnings and errors of one kind
LATENCY_WINDOW = 300  # latency samples kept per camera for the percentiles
FOREIGN_CLOCK_S = 10.0  # a header stamp further than this from the node's clock at receipt: another clock
FOREIGN_WARN_FRAMES = 2  # ... the log warns once this many frames in a row were so (a bag loop's jump makes one)
NO_CLOCK_WARN_S = 3.0  # use_sim_time and frames for this long without a /clock: warned once (a bag without --clock)
LATE_PERIODS = 3.0  # batch_timeout waits for a camera only while it has missed fewer frames than this
RECENT_S = 5.0  # ... or, for a camera of one frame so far, if that frame came this recently
BIG_FRAME = 4  # a frame costing more than this many times the smallest pending one waits for its turn (fairness)
REGROW_AFTER = 100  # good batches after an out-of-memory shrink before the batch limit grows by one
AGE_FROM = ("receipt", "stamp")

Wanted = Callable[[str], "set[str] | frozenset[str]"]
Publish = Callable[[str, Any, str, Any, "set[str] | frozenset[str]"], Iterable[str]]


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """The scheduling options; field names are the node parameters' names (:meth:`from_config` picks them)."""

    max_age: float = 0.5  # seconds; 0 = never too old
    max_batch: int = 4  # most cameras per Segmenter call
    batch_timeout: float = 0.0  # seconds to wait for other cameras' frames after the first one is ready
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger frames are refused (``size``) before decoding
    max_age_from: str = "receipt"  # "receipt": max_age counts from reception; "stamp": from the header stamp

    def __post_init__(self) -> None:
        if self.max_age_from not in AGE_FROM:
            raise ValueError(f"max_age_from must be one of {AGE_FROM}, got {self.max_age_from!r}")
        if self.max_batch < 1 or self.max_pixels < 1 or self.max_age < 0 or self.batch_timeout < 0:
            raise ValueError(f"invalid pipeline options {self}")

    @classmethod
    def from_config(cls, config: Any) -> PipelineOptions:
        """The options carried by any object with attributes of the same names (e.g. a node's ``NodeConfig``)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)})


def _stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def device_failure(e: BaseException) -> str | None:
    """``"oom"`` for an out-of-memory error (CUDA, host, ONNX Runtime's allocator), ``"fatal"`` for an error that
    leaves the device unusable (a sticky CUDA error: illegal address, device-side assert, launch failure, ...), else
    None (an error of this frame)."""
    text = str(e)
    low = text.lower()
    # (PyTorch's CPU allocator: "DefaultCPUAllocator: can't allocate memory", ONNX Runtime's "Failed to allocate
    # memory": both plain RuntimeErrors)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "out of memory" in low \
            or "allocate memory" in low or _opencv_out_of_memory(e):
        return "oom"
    if type(e).__name__ == "AcceleratorError" or any(m in text for m in (
            "CUDA error", "CUDNN_STATUS_", "CUBLAS_STATUS_", "device-side assert", "illegal memory access",
            "unspecified launch failure", "CUDA driver", "NVML")):
        return "fatal"
    return None


def _opencv_out_of_memory(e: BaseException) -> bool:
    """OpenCV's own allocation failure (the CPU pre- and post-processing): a ``cv2.error`` of code -4
    (``StsNoMem``, "Insufficient memory"), neither a MemoryError nor a RuntimeError."""
    return type(e).__name__ == "error" and type(e).__module__.startswith("cv2") and getattr(e, "code", None) == -4


def release_device_memory() -> None:
    """Give the CUDA caching allocator's free blocks back (after an out-of-memory error); no-op without CUDA."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _percentiles(samples: Iterable[float]) -> tuple[float, float]:
    values = np.fromiter(samples, float)
    if values.size == 0:
        return float("nan"), float("nan")
    p50, p95 = np.percentile(values, [50, 95])
    return float(p50), float(p95)


class CameraStats:
    """Counters and recent samples of one camera. The pipeline changes and reads them under its lock only."""

    def __init__(self) -> None:
        self.received = 0
        self.processed = 0
        self.dropped: Counter[str] = Counter()
        self.computed: Counter[str] = Counter()  # outputs computed and published, by kind
        self.latency_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)  # header stamp (or receipt) -> published
        self.latency_from_receipt: deque[bool] = deque(maxlen=LATENCY_WINDOW)  # per latency sample
        self.inference_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)  # the Segmenter call that served the frame
        self.last_received: float | None = None  # time.monotonic() of the newest frame
        self.period: float | None = None  # smoothed time between frames (s)
        self.clock_offset_s: float | None = None  # receipt - header stamp of the newest stamped frame
        self._last_report = (time.monotonic(), 0, 0)  # (t, received, processed) at the previous rates() call

    def rates(self) -> tuple[float, float]:
        """(input Hz, processed fps) since the previous call."""
        t0, r0, p0 = self._last_report
        now = time.monotonic()
        dt = max(now - t0, 1e-6)
        self._last_report = (now, self.received, self.processed)
        return (self.received - r0) / dt, (self.processed - p0) / dt

    def snapshot(self, now: float) -> dict[str, Any]:
        lat50, lat95 = _percentiles(self.latency_ms)
        inf50, inf95 = _percentiles(self.inference_ms)
        receipt = sum(self.latency_from_receipt)
        latency_from = ("none" if not self.latency_ms else "receipt" if receipt == len(self.latency_ms)
                        else "stamp" if receipt == 0 else "mixed")
        return {"received": self.received, "processed": self.processed, "dropped": dict(self.dropped),
                "computed": dict(self.computed), "latency_p50_ms": lat50, "latency_p95_ms": lat95,
                "latency_from": latency_from, "inference_p50_ms": inf50, "inference_p95_ms": inf95,
                "seconds_since_last_frame": None if self.last_received is None else now - self.last_received,
                "clock_offset_s": self.clock_offset_s}


@dataclasses.dataclass
class _Camera:
    key: str
    compressed: bool
    stats: CameraStats = dataclasses.field(default_factory=CameraStats)
    pending: _Item | None = None  # newest unprocessed frame
    last_log: dict[str, float] = dataclasses.field(default_factory=dict)  # reason -> time.monotonic()
    clock_warned: bool = False  # the foreign-clock warning is given once per camera
    no_clock_since: float | None = None  # monotonic receipt of the first frame of a run met by an unticked sim clock
    no_clock_warned: bool = False
    foreign_frames: int = 0  # stamped frames in a row from another clock
    credit: int = 0  # pixels earned toward its next frame (deficit round robin, see _take_batch)
    problem: str | None = None  # a standing problem for /diagnostics (e.g. stamps from another clock)


@dataclasses.dataclass
class _Item:
    cam: _Camera
    msg: Any
    received_mono: float  # time.monotonic() at submit
    received_ns: int  # the node's clock at submit
    cost: int = 1  # pixels to segment, from the declared size or the compressed header (1: refused when decoded)
    credit: int = 0  # the camera's deficit-round-robin credit when this frame was taken (kept if it is too old)
    wanted: set[str] | frozenset[str] = frozenset()
    frame: np.ndarray | None = None
    order: str = "RGB"
    slotless: bool = False  # taken while nobody watched its camera: no place in the batch, dropped when served


class FramePipeline:
    """Newest-frame scheduling, decoding, batched segmentation and statistics for a set of cameras.

    See the module docstring for the interface. ``logger`` is anything with ``warning(str)`` and ``error(str)``
    (an rclpy logger or a :class:`logging.Logger`)."""

    def __init__(self, segmenter: Any, cameras: Sequence[tuple[str, bool]], *, wanted: Wanted, publish: Publish,
                 clock_ns: Callable[[], int] = time.time_ns, options: PipelineOptions | None = None,
                 logger: Any = None, on_fatal: Callable[[str], None] | None = None,
                 simulated_clock: Callable[[], bool] = lambda: False) -> None:
        keys = [k for k, _ in cameras]
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"cameras must be a non-empty list of distinct keys, got {keys}")
        self._cameras = [_Camera(key, bool(compressed)) for key, compressed in cameras]
        self._by_key = {c.key: c for c in self._cameras}
        self._segmenter = segmenter
        self._in_use: Any = None  # the Segmenter of the batch in flight
        self._wanted, self._publish, self._clock_ns = wanted, publish, clock_ns
        self._simulated_clock = simulated_clock
        self.options = options or PipelineOptions()
        self.log = logger or logging.getLogger("icnet_ros.frame_pipeline")
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._worker_ending = False  # the worker decided to end (under the lock)
        # stop() ends the batch in flight's right to publish (its frames are counted 'deactivated') and refuses
        # frames until start(): a frame or a result from before a deactivate never goes out after it
        self._epoch = 0
        self._accepting = True
        self._retired: list[Any] = []  # swapped-out Segmenters to close when the batch using them ends
        self._worker: threading.Thread | None = None
        self._rr = 0  # round-robin start of the next batch
        self._on_fatal = on_fatal
        self.batches = 0  # Segmenter calls that served at least one frame
        self.frames_batched = 0
        self.max_batch_seen = 0
        self.batch_limit = self.options.max_batch  # max_batch, lowered after out-of-memory errors
        self._good_batches = 0  # since the last shrink
        self._oom_logged_at = -1e9  # the last out-of-memory warning (monotonic), and those not logged since
        self._ooms_unlogged = 0
        self.faults: Counter[str] = Counter()  # out_of_memory, oom_retries, batch_shrinks, device_error
        self.fatal_error: str | None = None

    # ------------------------------------------------------------------ the adapter's side
    @property
    def keys(self) -> list[str]:
        return [c.key for c in self._cameras]

    @property
    def segmenter(self) -> Any:
        return self._segmenter

    def submit(self, key: str, msg: Any) -> None:
        """Store ``msg`` as camera ``key``'s newest frame (an unprocessed older one is dropped as ``superseded``);
        between :meth:`stop` and :meth:`start` it is dropped as ``deactivated``."""
        cam = self._by_key[key]
        item = _Item(cam, msg, time.monotonic(), self._clock_ns(), self._cost(cam, msg))
        with self._lock:
            s = cam.stats
            s.received += 1
            if not self._accepting:  # after stop() (a callback that passed the node's check while it deactivated)
                s.dropped["deactivated"] += 1
                return
            if s.last_received is not None:
                dt = item.received_mono - s.last_received
                s.period = dt if s.period is None else 0.8 * s.period + 0.2 * dt
            s.last_received = item.received_mono
            if cam.pending is not None:
                s.dropped["superseded"] += 1
            cam.pending = item
            self._lock.notify_all()

    def _cost(self, cam: _Camera, msg: Any) -> int:
        """What a frame will cost the worker, in pixels: the larger of its network input and its own size (the
        outputs are made at that size), from the declared size or the JPEG/PNG header, nothing decoded. 0 for a
        frame that will be refused before the network (malformed, above max_pixels, below the network minimum)."""
        try:
            if cam.compressed:
                _, height, width = compressed_header(msg)
            else:
                segmenter_input(msg)  # a zero-copy view: checks encoding, size, step and length
                height, width = int(msg.height), int(msg.width)
            if height * width > self.options.max_pixels:
                return 0
            net_h, net_w = self._segmenter.network_size(height, width)
        except Exception:  # noqa: BLE001 - a malformed frame: refused when decoded, at no cost
            return 0
        if min(net_h, net_w) < MIN_INPUT_SIZE:
            return 0
        return max(net_h * net_w, height * width)

    def configure(self, **changes: Any) -> None:
        """Change options live (``max_age``, ``max_batch``, ``batch_timeout``); the next batch uses them."""
        names = {f.name for f in dataclasses.fields(PipelineOptions)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown pipeline option(s) {unknown}; known: {sorted(names)}")
        with self._lock:
            self.options = dataclasses.replace(self.options, **changes)
            if "max_batch" in changes:
                self.batch_limit = self.options.max_batch
            self._lock.notify_all()

    def swap_segmenter(self, segmenter: Any, timeout: float | None = None) -> Any:
        """Serve the next batches with ``segmenter``; wait until the batch in flight (on the old one) is done, then
        return the old one (free to release). Returns after ``timeout`` seconds at the latest."""
        with self._lock:
            old, self._segmenter = self._segmenter, segmenter
            if segmenter is not old:  # out-of-memory shrinks were the old model's (a smaller or fp16 one fits more)
                self.batch_limit, self._good_batches = self.options.max_batch, 0
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._in_use is old and old is not segmenter:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._lock.wait(left)
        return old

    def retire(self, segmenter: Any) -> bool:
        """After :meth:`swap_segmenter`: whether ``segmenter`` may be closed now. False while the batch in flight
        (a swap that timed out waiting for it) still uses it: the worker closes it when that batch ends, never
        under it."""
        with self._lock:
            if self._in_use is segmenter:
                self._retired.append(segmenter)
                return False
        return True

    def start(self) -> None:
        """Start the worker thread (taking frames); no-op while it runs. A worker still finishing its batch after a
        :meth:`stop` that timed out serves on (it decides whether to end under the same lock)."""
        with self._lock:
            self._stop.clear()
            self._accepting = True
            if self._worker is not None and self._worker.is_alive() and not self._worker_ending:
                return
            self._worker_ending = False
            self._worker = threading.Thread(target=self._run_worker, name="icnet_inference", daemon=True)
            self._worker.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop taking frames; waits up to ``timeout`` s for the batch in flight, whose frames are no longer
        published (counted ``deactivated``: a forward pass that outlasted the timeout published after the node
        said inactive, or after the next :meth:`start`). Frames pending now stay pending for the next start (see
        :meth:`discard_pending`); frames submitted until then are dropped. Returns whether the worker has ended."""
        self._stop.set()
        with self._lock:
            self._epoch += 1
            self._accepting = False
            self._lock.notify_all()
        worker = self._worker
        if worker is not None and worker.is_alive() and threading.current_thread() is not worker:
            worker.join(timeout)
        return worker is None or not worker.is_alive()

    close = stop

    def discard_pending(self, reason: str = "deactivated") -> int:
        """Drop every camera's pending frame (counted as ``reason``); returns how many. For a stop that must not
        serve, at the next :meth:`start`, frames received before it (the node's deactivate: a frame from before it
        published seconds or minutes later, with its old stamp)."""
        dropped = 0
        with self._lock:
            for cam in self._by_key.values():
                if cam.pending is not None:
                    cam.pending = None
                    cam.stats.dropped[reason] += 1
                    dropped += 1
            self._lock.notify_all()  # (a producer in wait_taken)
        return dropped

    @property
    def running(self) -> bool:
        return self._worker is not None and self._worker.is_alive() and not self._stop.is_set()

    def snapshot(self, update_rates: bool = False) -> dict[str, Any]:
        """Counters and percentiles, read under the lock: ``batches``, ``frames_processed``, ``mean_batch_size``,
        ``max_batch_size``, ``batch_limit`` (max_batch or less after out-of-memory errors), ``faults`` (counts of
        ``out_of_memory``, ``oom_retries``, ``batch_shrinks``, ``device_error``), ``fatal_error`` (None or the
        message) and ``cameras`` (per key: ``received``, ``processed``, ``dropped``, ``computed``, latency
        (``latency_from``: stamp, receipt, mixed or none) and inference p50/p95 in ms, ``seconds_since_last_frame``,
        ``clock_offset_s`` (receipt - header stamp, newest stamped frame), ``problem`` (None or a standing problem
        such as stamps from another clock); with ``update_rates`` also ``input_rate_hz`` and ``processed_fps``
        since the previous such call)."""
        now = time.monotonic()
        with self._lock:
            cams = {}
            for c in self._cameras:
                snap = c.stats.snapshot(now)
                if update_rates:
                    snap["input_rate_hz"], snap["processed_fps"] = c.stats.rates()
                cams[c.key] = snap
            for c in self._cameras:
                cams[c.key]["problem"] = c.problem
            # frames_processed: published, the sum of the cameras' (a frame segmented but not published is a drop);
            # mean_batch_size: frames segmented per batch
            return {"batches": self.batches, "frames_processed": sum(c.stats.processed for c in self._cameras),
                    "mean_batch_size": self.frames_batched / self.batches if self.batches else 0.0,
                    "max_batch_size": self.max_batch_seen, "batch_limit": self.batch_limit,
                    "faults": dict(self.faults), "fatal_error": self.fatal_error, "cameras": cams}

    def samples(self, key: str) -> dict[str, Any]:
        """Camera ``key``'s ``processed`` count and its recent ``latency_ms`` and ``inference_ms`` samples (oldest
        first, at most :data:`LATENCY_WINDOW`), copied under the lock (for benchmarks)."""
        with self._lock:
            s = self._by_key[key].stats
            return {"processed": s.processed, "latency_ms": list(s.latency_ms), "inference_ms": list(s.inference_ms)}

    def wait_taken(self, key: str, received: int, timeout: float) -> bool:
        """Wait until camera ``key`` has received ``received`` frames and its newest one was taken by the worker
        (or dropped): a producer that waits for this before sending the next frame never loses one to the
        newest-frame policy, yet its next frame travels while the previous one is segmented."""
        cam = self._by_key[key]
        deadline = time.monotonic() + timeout
        with self._lock:
            while cam.stats.received < received or cam.pending is not None:
                left = deadline - time.monotonic()
                if left <= 0 or self.fatal_error is not None:
                    return False
                self._lock.wait(left)
        return True

    def idle(self) -> bool:
        """No frame pending and none in flight."""
        with self._lock:
            return self._in_use is None and all(c.pending is None for c in self._cameras)

    # ------------------------------------------------------------------ worker
    def _run_worker(self) -> None:
        while True:
            while not self._stop.is_set():
                self.step(timeout=0.2)
            with self._lock:
                if self._stop.is_set():  # still stopped: end (start() makes a new worker from now on)
                    self._worker_ending = True
                    return

    def step(self, timeout: float = 0.0) -> int:
        """Take one batch (waiting up to ``timeout`` s for a first frame) and serve it; returns the frames taken.
        The worker thread calls this in a loop; tests may call it directly (without :meth:`start`)."""
        deadline = time.monotonic() + timeout
        with self._lock:  # a frame first, then who watches (a viewer who subscribed while the worker waited counts)
            while not self._stop.is_set() and not any(c.pending is not None for c in self._cameras):
                left = deadline - time.monotonic()
                if left <= 0:
                    return 0
                self._lock.wait(left)
        watched = self._watched()  # outside the lock: the adapter's callback
        with self._lock:
            batch, seg, epoch = self._take_batch(watched), self._segmenter, self._epoch
            if not batch:
                return 0
            self._in_use = seg
        try:
            self._serve(seg, batch, epoch)
        except Exception as e:  # noqa: BLE001 - a bug here must not end the worker; report it, keep serving
            if not self._stop.is_set():
                self._log_throttled(batch[0].cam, "internal_error", "error",
                                    f"frame batch failed: {type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._in_use = None
                retired = next((r for r in self._retired if r is seg), None)
                if retired is not None:
                    self._retired.remove(retired)
                self._lock.notify_all()
            if retired is not None:  # swapped out while this batch ran on it: free it now
                try:
                    retired.close()
                    release_device_memory()
                except Exception as e:  # noqa: BLE001 - never the worker's end
                    self.log.error(f"closing the replaced model failed: {type(e).__name__}: {e}")
        return len(batch)

    def _watched(self) -> dict[str, bool]:
        """Which cameras someone subscribes to now (a hint for taking batches: the frames are checked again when
        served); a camera whose ``wanted`` fails counts as watched (its frame is then dropped, counted, alone)."""
        watched = {}
        for cam in self._cameras:
            try:
                watched[cam.key] = bool(self._wanted(cam.key))
            except Exception:  # noqa: BLE001 - reported when that camera's frame is served
                watched[cam.key] = True
        return watched

    def _take_batch(self, watched: dict[str, bool]) -> list[_Item]:
        """Under the lock, once a frame is pending (:meth:`step` waits for it): the newest frame of up to
        ``max_batch`` watched cameras (round robin, starting after the camera served last), plus the pending frames
        of unwatched cameras (``watched``: no subscriber; they take no place in the batch and are dropped as
        ``no_subscribers`` when served). Nothing when stopped or when no frame is pending any more."""
        if self._stop.is_set() or not any(c.pending is not None for c in self._cameras):
            return []
        opts = self.options
        n = len(self._cameras)
        limit = min(opts.max_batch, self.batch_limit)
        if opts.batch_timeout > 0 and n > 1 and limit > 1:
            batch_deadline = time.monotonic() + opts.batch_timeout
            now = time.monotonic()
            cams = [c for c in self._cameras if watched.get(c.key, True)]  # no frame of an unwatched one is served
            expected = sum(c.pending is not None or self._due(c, now, batch_deadline) for c in cams)
            while not self._stop.is_set():
                ready = sum(c.pending is not None for c in cams)
                left = batch_deadline - time.monotonic()
                if ready >= min(expected, limit) or left <= 0:
                    break
                self._lock.wait(left)
            if self._stop.is_set():  # stopped while waiting: the frames wait for the next start()
                return []
        # deficit round robin on pixels for frames far larger than the smallest pending one (> BIG_FRAME x): such a
        # frame's camera earns the smallest frame's pixels per batch and is served once it has earned its frame's,
        # so it cannot hold the worker batch after batch while the other cameras wait. Frames of similar cost (and
        # frames that will be refused before the network, cost 0) are taken at once, as plain round robin.
        costs = [c.pending.cost for c in self._cameras
                 if c.pending is not None and c.pending.cost > 0 and watched.get(c.key, True)]
        quantum = min(costs, default=0)
        hold_until = opts.max_age / 2 if opts.max_age > 0 and opts.max_age_from == "receipt" else math.inf
        now = time.monotonic()
        batch = []
        taken, last = 0, None
        for i in range(n):
            k = (self._rr + i) % n
            cam = self._cameras[k]
            item = cam.pending
            if item is None:
                cam.credit = min(cam.credit, 0)  # an idle camera keeps no credit (but keeps a debt)
                continue
            if not watched.get(cam.key, True):  # dropped when served: takes no place in the batch
                cam.credit = min(cam.credit, 0)
                item.slotless = True
                batch.append(item)
                cam.pending = None
                continue
            early = False
            if item.cost > BIG_FRAME * quantum:
                cam.credit += quantum
                if cam.credit < item.cost:
                    # held until its camera has earned it, but not past half of max_age (from receipt): held longer
                    # it would be too old when taken, and the camera, never earning enough within max_age, would
                    # never be served; taken early, it runs into debt that its later frames pay back
                    early = cam.credit >= 0 and now - item.received_mono >= hold_until
                    if not early:
                        continue
            if taken < limit:
                item.credit = cam.credit
                cam.credit = cam.credit - item.cost if early else 0
                batch.append(item)
                cam.pending = None
                taken, last = taken + 1, k
        # the next batch starts after the last camera served (one step on when none was): a camera without a frame
        # waiting does not hand its turn to the next one, which would then be served twice as often
        self._rr = (last + 1) % n if last is not None else (self._rr + 1) % n
        if batch:
            self._lock.notify_all()  # wait_taken()
        return batch

    @staticmethod
    def _due(cam: _Camera, now: float, deadline: float) -> bool:
        """Whether a batch should wait for ``cam``: it is still publishing (its last frame within
        :data:`LATE_PERIODS` of its periods; :data:`RECENT_S` s while its rate is unknown) and its next frame is due
        before ``deadline``. A camera slower than the batch timeout, or one that stopped, never holds the others'
        frames back."""
        s = cam.stats
        if s.last_received is None:
            return False
        if s.period is None:  # one frame so far: its rate is unknown
            return now - s.last_received <= RECENT_S
        return now - s.last_received <= LATE_PERIODS * s.period and s.last_received + s.period <= deadline

    def _check_clock(self, it: _Item, stamp: int) -> None:
        """Keep the camera's standing problem (/diagnostics) to its newest frame's clock offset: set while its header
        stamps are far from the node's clock (another clock domain), cleared when they are back (a frame before the
        first /clock, a bag loop's jump); the log warns once per camera, once :data:`FOREIGN_WARN_FRAMES` frames in
        a row were off (a single frame across a bag loop's jump is not another clock). On a simulated clock that has
        not ticked yet (no /clock received: its time is 0) a stamp cannot be judged: before, a frame there used up
        the camera's one warning, telling to set the use_sim_time that was set. That is the problem instead, and
        warned once when it lasts :data:`NO_CLOCK_WARN_S` (a bag played without ``--clock``)."""
        cam = it.cam
        if it.received_ns == 0 and self._simulated_clock():
            if cam.no_clock_since is None:
                cam.no_clock_since = it.received_mono
            with self._lock:
                cam.problem = "use_sim_time is set and no /clock has been received"
            if not cam.no_clock_warned and it.received_mono - cam.no_clock_since >= NO_CLOCK_WARN_S:
                cam.no_clock_warned = True
                self.log.warning(
                    f"{cam.key}: use_sim_time is set but no /clock has been received for "
                    f"{it.received_mono - cam.no_clock_since:.0f} s of frames: the node's clock stands at 0, so "
                    "header stamps cannot be judged (latency is timed from receipt). Fix: play the bag with "
                    "`ros2 bag play --clock`, run the simulator's /clock, or set use_sim_time:=false. (Reported "
                    "once per camera.)")
            return
        cam.no_clock_since = None
        offset = (it.received_ns - stamp) / 1e9
        foreign = abs(offset) > FOREIGN_CLOCK_S
        where = f"{offset:.1f} s behind" if offset > 0 else f"{-offset:.1f} s ahead of"
        with self._lock:
            it.cam.stats.clock_offset_s = offset
            it.cam.problem = f"header stamps {where} this node's clock (another clock?)" if foreign else None
        it.cam.foreign_frames = it.cam.foreign_frames + 1 if foreign else 0
        if it.cam.foreign_frames < FOREIGN_WARN_FRAMES or it.cam.clock_warned:
            return
        it.cam.clock_warned = True
        if self.options.max_age_from == "stamp" and self.options.max_age > 0:
            effect = ("with max_age_from 'stamp' its frames are dropped as too_old" if offset > 0 else
                      "its frames are served, but max_age cannot judge their age")
        else:
            effect = "its frames are served; freshness and latency are measured from receipt"
        self.log.warning(
            f"{it.cam.key}: header stamps are {where} this node's clock: they come from another clock (a camera's "
            f"hardware clock, a bag replayed without use_sim_time, synthetic stamps); {effect}. Fix: "
            "use_sim_time:=true with `ros2 bag play --clock`, synchronise the clocks (chrony/PTP), or stamp "
            "frames with the ROS clock. (Reported once per camera.)")

    def _too_old(self, it: _Item, stamp: int) -> str | None:
        """Why ``it`` is too old to serve, or None."""
        opts = self.options
        if opts.max_age <= 0:
            return None
        if opts.max_age_from == "receipt":
            waited = time.monotonic() - it.received_mono
            return (f"waited {waited:.3f} s since it was received (max_age {opts.max_age} s)"
                    if waited > opts.max_age else None)
        if stamp <= 0:  # a zero stamp is never too old
            return None
        age = (self._clock_ns() - stamp) / 1e9
        return (f"header stamp is {age:.3f} s old (max_age {opts.max_age} s, max_age_from 'stamp'); check "
                "clock sync/use_sim_time, raise max_age or use max_age_from 'receipt'" if age > opts.max_age
                else None)

    def _stopped_since(self, epoch: int) -> bool:
        with self._lock:
            return self._epoch != epoch

    def _serve(self, seg: Any, batch: list[_Item], epoch: int) -> None:
        """Serve a batch taken at stop-epoch ``epoch`` (a :meth:`stop` since then: nothing is published)."""
        opts = self.options
        items = []
        for it in batch:
            if it.slotless:  # no subscriber when taken: asked again, one who came meanwhile would make the batch
                self._drop(it.cam, "no_subscribers")  # larger than max_batch and the out-of-memory limit allow
                continue
            try:
                it.wanted = self._wanted(it.cam.key)
                stamp = _stamp_ns(it.msg.header) if it.wanted else 0
            except Exception as e:  # noqa: BLE001 - the adapter's fault for this camera: this frame's, not the batch's
                self._drop(it.cam, "internal_error", f"{type(e).__name__}: {e}", level="error")
                continue
            if not it.wanted:
                self._drop(it.cam, "no_subscribers")
                continue
            if stamp > 0:
                self._check_clock(it, stamp)
            elif it.cam.problem is not None:  # an unstamped frame is on no other clock: the WARN is not standing
                with self._lock:
                    it.cam.problem = None
            why = self._too_old(it, stamp)
            if why is not None:
                with self._lock:  # a big frame's earned turn is not lost with it: its camera's next frame has it
                    it.cam.credit = max(it.cam.credit, it.credit)
                self._drop(it.cam, "too_old", why)
                continue
            try:
                it.frame, it.order = segmenter_frame(it.msg, it.cam.compressed, opts.max_pixels)
            except ImageFormatError as e:
                self._drop(it.cam, e.reason, str(e))
                continue
            except Exception as e:  # noqa: BLE001 - any other decoder failure is this frame's
                self._drop(it.cam, "decode", f"{type(e).__name__}: {e}")
                continue
            items.append(it)
        if not items:
            return
        if self._stopped_since(epoch):
            for it in items:
                self._drop(it.cam, "deactivated")
            return
        outputs = tuple(k for k in ("label", "color", "overlay", "confidence") if any(k in it.wanted for it in items))
        with self._lock:
            shrinks = self.faults["batch_shrinks"]
        t0 = time.perf_counter()
        results = self._segment(seg, items, outputs)
        infer_ms = (time.perf_counter() - t0) * 1e3
        served = [(it, res) for it, res in zip(items, results) if res is not None]
        with self._lock:
            if served:
                self.batches += 1
                self.frames_batched += len(served)
                self.max_batch_seen = max(self.max_batch_seen, len(served))
                # grow back after an out-of-memory shrink (the batch that shrank it is not a good one)
                if self.batch_limit < self.options.max_batch and self.faults["batch_shrinks"] == shrinks:
                    self._good_batches += 1
                    if self._good_batches >= REGROW_AFTER:
                        self.batch_limit += 1
                        self._good_batches = 0
        for it, res in served:
            if self._stopped_since(epoch):  # stopped (deactivated) while this batch ran: not published after it
                self._drop(it.cam, "deactivated")
                continue
            try:
                kinds = list(self._publish(it.cam.key, it.msg, it.order, res, it.wanted))
            except Exception as e:  # noqa: BLE001 - one frame's publishing failure is that frame's
                # counted also while stopping (the adapter destroys its publishers then), but not logged
                self._drop(it.cam, "publish_error", None if self._stop.is_set() else f"{type(e).__name__}: {e}",
                           level="error")
                continue
            stamp = _stamp_ns(it.msg.header)
            done_ns, done_mono = self._clock_ns(), time.monotonic()
            # header stamp -> published when the stamp is on this clock; else receipt -> published
            from_stamp = (stamp > 0 and abs(it.received_ns - stamp) <= FOREIGN_CLOCK_S * 1e9 and done_ns >= stamp
                          and not self._simulated_clock())
            latency = (done_ns - stamp) / 1e6 if from_stamp else (done_mono - it.received_mono) * 1e3
            with self._lock:
                s = it.cam.stats
                s.processed += 1
                s.computed.update(kinds)
                s.inference_ms.append(infer_ms)
                s.latency_ms.append(latency)
                s.latency_from_receipt.append(not from_stamp)

    def _segment(self, seg: Any, items: list[_Item], outputs: tuple[str, ...]) -> list[Any]:
        """One Segmenter call for the batch; a frame the Segmenter refuses (FrameError) is dropped as ``rejected``
        and the others go on as a batch; any other failure: each frame alone, so that one frame's fault is that
        frame's (``rejected`` for a ValueError, ``inference_error`` otherwise). Out of memory:
        release the cache, retry frame by frame, halve the batch limit. Unrecoverable device error: stop."""
        try:
            return seg.segment([it.frame for it in items], channel_order=[it.order for it in items],
                               outputs=outputs)
        except Exception as e:  # noqa: BLE001 - classified below
            kind = device_failure(e)
            if kind == "fatal":
                self._fatal(e, items)
                return [None] * len(items)
            if kind == "oom":
                self._out_of_memory(e, len(items), seg)
            elif isinstance(e, FrameError) and 0 <= e.index < len(items):  # that frame's; the others as a batch
                self._frame_failed(items[e.index], e)
                rest = items[:e.index] + items[e.index + 1:]
                results = self._segment(seg, rest, outputs) if rest else []
                results.insert(e.index, None)
                return results
            elif len(items) == 1:
                self._frame_failed(items[0], e)
                return [None]
        results: list[Any] = []
        for it in items:
            if self.fatal_error is not None:
                self._drop(it.cam, "device_error")
                results.append(None)
                continue
            try:
                results.append(seg.segment([it.frame], channel_order=[it.order], outputs=outputs)[0])
            except Exception as e:  # noqa: BLE001 - classified
                kind = device_failure(e)
                if kind == "fatal":
                    self._fatal(e, [it])
                elif kind == "oom":
                    release_device_memory()
                    with self._lock:
                        self.faults["out_of_memory"] += 1
                    self._drop(it.cam, "out_of_memory", f"{type(e).__name__}: {e}", level="error")
                else:
                    self._frame_failed(it, e)
                results.append(None)
        return results

    def _out_of_memory(self, e: Exception, n: int, seg: Any = None) -> None:
        """A batch of ``n`` frames ran out of memory on ``seg``: release the cache; the caller retries frame by
        frame. The batch limit shrinks unless ``seg`` was swapped out meanwhile (its limit is not the new model's).
        The warning is throttled (one line every :data:`WARN_PERIOD_S` with the count since the last: a camera
        whose every frame runs out of memory logged a line per frame, forever)."""
        release_device_memory()
        now = time.monotonic()
        with self._lock:
            self.faults["out_of_memory"] += 1
            self.faults["oom_retries"] += 1
            if n > 1 and (seg is None or seg is self._segmenter):
                self.batch_limit = max(1, min(self.batch_limit, n) // 2)
                self._good_batches = 0
                self.faults["batch_shrinks"] += 1
            limit = self.batch_limit
            self._ooms_unlogged += 1
            if now - self._oom_logged_at < WARN_PERIOD_S:
                return
            self._oom_logged_at, count, self._ooms_unlogged = now, self._ooms_unlogged, 0
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        self.log.warning(f"out of device memory for a batch of {n} frame(s) ({type(e).__name__}: {reason}); cache "
                         f"released, retrying frame by frame; batch limit now {limit}"
                         + (f" ({count} times since the last such line)" if count > 1 else ""))

    def _fatal(self, e: Exception, items: list[_Item]) -> None:
        """The device is unusable: count the frames, stop taking frames, report once."""
        message = f"unrecoverable device error: {type(e).__name__}: {e}"
        with self._lock:
            first = self.fatal_error is None
            if first:
                self.fatal_error = message
            self.faults["device_error"] += 1
        for it in items:
            self._drop(it.cam, "device_error")
        self._stop.set()
        if first:
            self.log.error(message)
            if self._on_fatal is not None:
                self._on_fatal(message)

    def _frame_failed(self, it: _Item, e: Exception) -> None:
        if isinstance(e, FrameError):  # its index in the batch means nothing to the reader
            self._drop(it.cam, "rejected", e.reason)
        elif isinstance(e, ValueError):
            self._drop(it.cam, "rejected", str(e))
        else:
            self._drop(it.cam, "inference_error", f"{type(e).__name__}: {e}", level="error")

    # ------------------------------------------------------------------ counting and logging
    def _drop(self, cam: _Camera, reason: str, text: str | None = None, level: str = "warning") -> None:
        with self._lock:
            cam.stats.dropped[reason] += 1
            count = cam.stats.dropped[reason]
        if text is not None:
            self._log_throttled(cam, reason, level, f"dropping frame ({reason}): {text} [{count} dropped for this "
                                                    "reason so far]")

    def _log_throttled(self, cam: _Camera, reason: str, level: str, text: str) -> None:
        """At most one line per camera and reason every :data:`WARN_PERIOD_S` seconds."""
        now = time.monotonic()
        with self._lock:
            if now - cam.last_log.get(reason, -1e9) < WARN_PERIOD_S:
                return
            cam.last_log[reason] = now
        getattr(self.log, level)(f"{cam.key}: {text}")
