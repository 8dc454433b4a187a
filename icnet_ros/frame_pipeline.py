"""ROS-free frame scheduling for ``icnet_node``: newest frame per camera in, per-frame results with drop reasons out.

:class:`FramePipeline` owns everything between a subscription callback and a publisher: the newest-frame slot of
each camera, one worker thread that takes batches round robin (``max_batch``, ``batch_timeout``), the freshness
policy (``max_age``), decoding, ONE :meth:`Segmenter.segment` call per batch, the retry of a failed batch frame by
frame, and the counters and percentiles that /diagnostics reports. It never imports rclpy: the node (an adapter)
hands it messages with :meth:`submit` and gets results back through two callbacks.

Interface (all thread-safe):

- ``FramePipeline(segmenter, cameras, wanted=..., publish=..., clock_ns=..., options=..., logger=...)``:
  ``cameras`` is a list of ``(key, compressed)``; ``key`` (the input topic) names the camera in every call.
  ``wanted(key)`` returns the output kinds someone subscribes to (empty: the frame is skipped as
  ``no_subscribers``); ``publish(key, msg, order, result, wanted)`` publishes one frame's outputs and returns the
  kinds it published (counted as ``computed``). ``clock_ns()`` is the node's clock (for the header-stamp age).
- :meth:`submit` (subscription callbacks; never blocks on inference), :meth:`start` / :meth:`stop` (the worker
  thread: take frames or not), :meth:`configure` (live options), :meth:`swap_segmenter` (between batches),
  :meth:`snapshot` (counters and percentiles under the lock), :meth:`close`.

Drop reasons (per camera, in ``snapshot()["cameras"][key]["dropped"]``): ``superseded`` (a newer frame replaced an
unprocessed one: the newest-frame policy), ``no_subscribers``, ``too_old`` (``max_age``), the decoder's reasons
(``encoding``, ``size``, ``step``, ``truncated``, ``decode``; :class:`~icnet_ros.ros_image.ImageFormatError`),
``rejected`` (the Segmenter refused the frame, e.g. below the network minimum), ``inference_error`` (the forward
pass failed for this frame alone) and ``publish_error``.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .ros_image import ImageFormatError, segmenter_frame

__all__ = ["CameraStats", "FramePipeline", "PipelineOptions", "LATENCY_WINDOW", "WARN_PERIOD_S"]

WARN_PERIOD_S = 5.0  # throttle for repeated per-camera warnings and errors of one kind
LATENCY_WINDOW = 300  # latency samples kept per camera for the percentiles

Wanted = Callable[[str], "set[str] | frozenset[str]"]
Publish = Callable[[str, Any, str, Any, "set[str] | frozenset[str]"], Iterable[str]]


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """The scheduling options; field names are the node parameters' names (:meth:`from_config` picks them)."""

    max_age: float = 0.5  # seconds; 0 = never too old
    max_batch: int = 4  # most cameras per Segmenter call
    batch_timeout: float = 0.0  # seconds to wait for other cameras' frames after the first one is ready

    @classmethod
    def from_config(cls, config: Any) -> PipelineOptions:
        """The options carried by any object with attributes of the same names (e.g. a node's ``NodeConfig``)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)})


def _stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


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
        self.latency_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)  # header stamp -> published
        self.inference_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)  # the Segmenter call that served the frame
        self.last_received: float | None = None  # time.monotonic() of the newest frame
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
        return {"received": self.received, "processed": self.processed, "dropped": dict(self.dropped),
                "computed": dict(self.computed), "latency_p50_ms": lat50, "latency_p95_ms": lat95,
                "inference_p50_ms": inf50, "inference_p95_ms": inf95,
                "seconds_since_last_frame": None if self.last_received is None else now - self.last_received}


@dataclasses.dataclass
class _Camera:
    key: str
    compressed: bool
    stats: CameraStats = dataclasses.field(default_factory=CameraStats)
    pending: Any | None = None  # newest unprocessed message
    last_log: dict[str, float] = dataclasses.field(default_factory=dict)  # reason -> time.monotonic()


@dataclasses.dataclass
class _Item:
    cam: _Camera
    msg: Any
    wanted: set[str] | frozenset[str] = frozenset()
    frame: np.ndarray | None = None
    order: str = "RGB"


class FramePipeline:
    """Newest-frame scheduling, decoding, batched segmentation and statistics for a set of cameras.

    See the module docstring for the interface. ``logger`` is anything with ``warning(str)`` and ``error(str)``
    (an rclpy logger or a :class:`logging.Logger`)."""

    def __init__(self, segmenter: Any, cameras: Sequence[tuple[str, bool]], *, wanted: Wanted, publish: Publish,
                 clock_ns: Callable[[], int] = time.time_ns, options: PipelineOptions | None = None,
                 logger: Any = None) -> None:
        keys = [k for k, _ in cameras]
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"cameras must be a non-empty list of distinct keys, got {keys}")
        self._cameras = [_Camera(key, bool(compressed)) for key, compressed in cameras]
        self._by_key = {c.key: c for c in self._cameras}
        self._segmenter = segmenter
        self._in_use: Any = None  # the Segmenter of the batch in flight
        self._wanted, self._publish, self._clock_ns = wanted, publish, clock_ns
        self.options = options or PipelineOptions()
        self.log = logger or logging.getLogger("icnet_ros.frame_pipeline")
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._rr = 0  # round-robin start of the next batch
        self.batches = 0  # Segmenter calls that served at least one frame
        self.frames_batched = 0
        self.max_batch_seen = 0

    # ------------------------------------------------------------------ the adapter's side
    @property
    def keys(self) -> list[str]:
        return [c.key for c in self._cameras]

    @property
    def segmenter(self) -> Any:
        return self._segmenter

    def submit(self, key: str, msg: Any) -> None:
        """Store ``msg`` as camera ``key``'s newest frame (an unprocessed older one is dropped as ``superseded``)."""
        cam = self._by_key[key]
        with self._lock:
            cam.stats.received += 1
            cam.stats.last_received = time.monotonic()
            if cam.pending is not None:
                cam.stats.dropped["superseded"] += 1
            cam.pending = msg
            self._lock.notify_all()

    def configure(self, **changes: Any) -> None:
        """Change options live (``max_age``, ``max_batch``, ``batch_timeout``); the next batch uses them."""
        names = {f.name for f in dataclasses.fields(PipelineOptions)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown pipeline option(s) {unknown}; known: {sorted(names)}")
        with self._lock:
            self.options = dataclasses.replace(self.options, **changes)
            self._lock.notify_all()

    def swap_segmenter(self, segmenter: Any, timeout: float | None = None) -> Any:
        """Serve the next batches with ``segmenter``; wait until the batch in flight (on the old one) is done, then
        return the old one (free to release). Returns after ``timeout`` seconds at the latest."""
        with self._lock:
            old, self._segmenter = self._segmenter, segmenter
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._in_use is old and old is not segmenter:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._lock.wait(left)
        return old

    def start(self) -> None:
        """Start the worker thread (taking frames); no-op while it runs."""
        with self._lock:
            if self._worker is not None and self._worker.is_alive():
                return
            self._stop.clear()
            self._worker = threading.Thread(target=self._run_worker, name="icnet_inference", daemon=True)
            self._worker.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop taking frames; waits up to ``timeout`` s for the batch in flight. Frames that arrive meanwhile stay
        pending (the newest per camera) for the next :meth:`start`. Returns whether the worker has ended."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        worker = self._worker
        if worker is not None and worker.is_alive() and threading.current_thread() is not worker:
            worker.join(timeout)
        return worker is None or not worker.is_alive()

    close = stop

    @property
    def running(self) -> bool:
        return self._worker is not None and self._worker.is_alive() and not self._stop.is_set()

    def snapshot(self, update_rates: bool = False) -> dict[str, Any]:
        """Counters and percentiles, read under the lock: ``batches``, ``frames_processed``, ``mean_batch_size``,
        ``max_batch_size`` and ``cameras`` (per key: ``received``, ``processed``, ``dropped``, ``computed``,
        latency and inference p50/p95 in ms, ``seconds_since_last_frame``; with ``update_rates`` also
        ``input_rate_hz`` and ``processed_fps`` since the previous such call)."""
        now = time.monotonic()
        with self._lock:
            cams = {}
            for c in self._cameras:
                snap = c.stats.snapshot(now)
                if update_rates:
                    snap["input_rate_hz"], snap["processed_fps"] = c.stats.rates()
                cams[c.key] = snap
            return {"batches": self.batches, "frames_processed": self.frames_batched,
                    "mean_batch_size": self.frames_batched / self.batches if self.batches else 0.0,
                    "max_batch_size": self.max_batch_seen, "cameras": cams}

    def samples(self, key: str) -> dict[str, Any]:
        """Camera ``key``'s ``processed`` count and its recent ``latency_ms`` and ``inference_ms`` samples (oldest
        first, at most :data:`LATENCY_WINDOW`), copied under the lock (for benchmarks)."""
        with self._lock:
            s = self._by_key[key].stats
            return {"processed": s.processed, "latency_ms": list(s.latency_ms), "inference_ms": list(s.inference_ms)}

    def idle(self) -> bool:
        """No frame pending and none in flight."""
        with self._lock:
            return self._in_use is None and all(c.pending is None for c in self._cameras)

    # ------------------------------------------------------------------ worker
    def _run_worker(self) -> None:
        while not self._stop.is_set():
            self.step(timeout=0.2)

    def step(self, timeout: float = 0.0) -> int:
        """Take one batch (waiting up to ``timeout`` s for a first frame) and serve it; returns the frames taken.
        The worker thread calls this in a loop; tests may call it directly (without :meth:`start`)."""
        with self._lock:
            batch, seg = self._take_batch(timeout), self._segmenter
            if not batch:
                return 0
            self._in_use = seg
        try:
            self._serve(seg, batch)
        except Exception as e:  # noqa: BLE001 - a bug here must not end the worker; report it, keep serving
            if not self._stop.is_set():
                self._log_throttled(batch[0].cam, "internal_error", "error",
                                    f"frame batch failed: {type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._in_use = None
                self._lock.notify_all()
        return len(batch)

    def _take_batch(self, timeout: float) -> list[_Item]:
        """Under the lock: wait for frames; return the newest frame of up to ``max_batch`` cameras (round robin)."""
        deadline = time.monotonic() + timeout
        while not self._stop.is_set() and not any(c.pending is not None for c in self._cameras):
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            self._lock.wait(left)
        if self._stop.is_set():
            return []
        opts = self.options
        n = len(self._cameras)
        if opts.batch_timeout > 0 and n > 1:
            batch_deadline = time.monotonic() + opts.batch_timeout
            while not self._stop.is_set():
                ready = sum(c.pending is not None for c in self._cameras)
                left = batch_deadline - time.monotonic()
                if ready >= min(n, opts.max_batch) or left <= 0:
                    break
                self._lock.wait(left)
        batch = []
        for i in range(n):
            cam = self._cameras[(self._rr + i) % n]
            if cam.pending is not None and len(batch) < opts.max_batch:
                batch.append(_Item(cam, cam.pending))
                cam.pending = None
        self._rr = (self._rr + 1) % n
        return batch

    def _serve(self, seg: Any, batch: list[_Item]) -> None:
        opts = self.options
        now_ns = self._clock_ns()
        items = []
        for it in batch:
            it.wanted = self._wanted(it.cam.key)
            if not it.wanted:
                self._drop(it.cam, "no_subscribers")
                continue
            stamp = _stamp_ns(it.msg.header)
            if opts.max_age > 0 and stamp > 0 and (now_ns - stamp) > opts.max_age * 1e9:
                self._drop(it.cam, "too_old", f"header stamp is {(now_ns - stamp) / 1e9:.3f} s old (max_age "
                                              f"{opts.max_age} s); check clock sync/use_sim_time or raise max_age")
                continue
            try:
                it.frame, it.order = segmenter_frame(it.msg, it.cam.compressed)
            except ImageFormatError as e:
                self._drop(it.cam, e.reason, str(e))
                continue
            items.append(it)
        if not items:
            return
        outputs = tuple(k for k in ("label", "color", "overlay", "confidence") if any(k in it.wanted for it in items))
        t0 = time.perf_counter()
        results = self._segment(seg, items, outputs)
        infer_ms = (time.perf_counter() - t0) * 1e3
        served = [(it, res) for it, res in zip(items, results) if res is not None]
        with self._lock:
            if served:
                self.batches += 1
                self.frames_batched += len(served)
                self.max_batch_seen = max(self.max_batch_seen, len(served))
        for it, res in served:
            try:
                kinds = list(self._publish(it.cam.key, it.msg, it.order, res, it.wanted))
            except Exception as e:  # noqa: BLE001 - one frame's publishing failure is that frame's
                if self._stop.is_set():
                    return
                self._drop(it.cam, "publish_error", f"{type(e).__name__}: {e}", level="error")
                continue
            stamp = _stamp_ns(it.msg.header)
            done_ns = self._clock_ns()
            with self._lock:
                s = it.cam.stats
                s.processed += 1
                s.computed.update(kinds)
                s.inference_ms.append(infer_ms)
                if stamp > 0:
                    s.latency_ms.append((done_ns - stamp) / 1e6)

    def _segment(self, seg: Any, items: list[_Item], outputs: tuple[str, ...]) -> list[Any]:
        """One Segmenter call for the batch; if it fails, each frame alone, so that one frame's fault is that
        frame's (``rejected`` for a frame the Segmenter refuses, ``inference_error`` otherwise)."""
        try:
            return seg.segment([it.frame for it in items], channel_order=[it.order for it in items],
                               outputs=outputs)
        except Exception as e:  # noqa: BLE001 - classified per frame below
            if len(items) == 1:
                self._frame_failed(items[0], e)
                return [None]
        results = []
        for it in items:
            try:
                results.append(seg.segment([it.frame], channel_order=[it.order], outputs=outputs)[0])
            except Exception as e:  # noqa: BLE001 - classified
                self._frame_failed(it, e)
                results.append(None)
        return results

    def _frame_failed(self, it: _Item, e: Exception) -> None:
        if isinstance(e, ValueError):
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
