"""icnet_ros.frame_pipeline without ROS: a real Segmenter (tiny random checkpoint) and message-like objects.

The pipeline is driven with ``step()`` from the test thread (deterministic), except where the worker thread itself
is under test (start/stop, swap)."""
from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest
import torch

from helpers import make_checkpoint, png_with_size
from icnet_ros.engine import Segmenter
from icnet_ros.frame_pipeline import WARN_PERIOD_S, FramePipeline, PipelineOptions, device_failure
from icnet_ros.ros_image import numpy_to_compressed, numpy_to_image

H, W = 64, 96
KINDS = ("label", "color", "overlay", "confidence")


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    path = make_checkpoint(tmp_path_factory.mktemp("pipeline") / "tiny.safetensors")
    return Segmenter(str(path), device="cpu", warmup=False)


def stamp_of(ns: int) -> Any:
    return SimpleNamespace(stamp=SimpleNamespace(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000),
                           frame_id="cam")


def image(seed: int = 0, stamp_ns: int = 0, encoding: str = "rgb8", h: int = H, w: int = W) -> Any:
    rng = np.random.default_rng(seed)
    msg = numpy_to_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), encoding, SimpleNamespace())
    msg.header = stamp_of(stamp_ns)
    return msg


def compressed(seed: int = 0, stamp_ns: int = 0, codec: str = "png") -> Any:
    rng = np.random.default_rng(seed)
    fmt, data = numpy_to_compressed(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), "RGB", codec)
    return SimpleNamespace(format=fmt, data=data, header=stamp_of(stamp_ns))


class Sink:
    """The adapter's side: who listens, what was published (key, stamp, kinds, result)."""

    def __init__(self, kinds: tuple[str, ...] = KINDS) -> None:
        self.kinds = {"/a": set(kinds), "/b": set(kinds)}
        self.published: list[tuple[str, int, tuple[str, ...], Any]] = []
        self.lock = threading.Lock()

    def wanted(self, key: str) -> set[str]:
        return set(self.kinds[key])

    def publish(self, key: str, msg: Any, order: str, res: Any, wanted: set[str]) -> list[str]:
        kinds = tuple(k for k in KINDS if k in wanted and getattr(res, k) is not None)
        with self.lock:
            self.published.append((key, msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec, kinds, res))
        return list(kinds)


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def warning(self, text: str) -> None:
        self.lines.append(("warning", text))

    def error(self, text: str) -> None:
        self.lines.append(("error", text))


class Gated:
    """The real Segmenter behind a gate: a forward pass that takes as long as the test wants; ``close`` is recorded
    in ``closed`` (the real one stays open for the other tests)."""

    def __init__(self, segmenter: Segmenter, gate: threading.Event, closed: list | None = None) -> None:
        self._segmenter, self._gate, self._closed = segmenter, gate, closed if closed is not None else []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._segmenter, name)

    def segment(self, *args: Any, **kwargs: Any) -> Any:
        self._gate.wait(30)
        return self._segmenter.segment(*args, **kwargs)

    def close(self) -> None:
        self._closed.append(self)


def make(segmenter: Segmenter, sink: Sink | None = None, compressed_b: bool = False, now_ns: int = 10**12,
         **options: Any) -> tuple[FramePipeline, Sink, Log]:
    sink = sink or Sink()
    log = Log()
    pipe = FramePipeline(segmenter, [("/a", False), ("/b", compressed_b)], wanted=sink.wanted,
                         publish=sink.publish, clock_ns=lambda: now_ns, options=PipelineOptions(**options),
                         logger=log)
    return pipe, sink, log


def test_batch_of_two_cameras_is_one_segmenter_call(segmenter: Segmenter):
    pipe, sink, _ = make(segmenter, compressed_b=True)
    pipe.submit("/a", image(1, stamp_ns=10**12 - 1000))
    pipe.submit("/b", compressed(2, stamp_ns=10**12 - 2000))
    assert pipe.step() == 2
    snap = pipe.snapshot()
    assert snap["batches"] == 1 and snap["frames_processed"] == 2 and snap["max_batch_size"] == 2
    keys = sorted(k for k, *_ in sink.published)
    assert keys == ["/a", "/b"]
    for key, stamp, kinds, res in sink.published:
        assert kinds == KINDS and res.label.shape == (H, W)
        cam = snap["cameras"][key]
        assert cam["processed"] == 1 and cam["computed"] == {k: 1 for k in KINDS}
        assert cam["latency_p50_ms"] == pytest.approx((1000 if key == "/a" else 2000) / 1e6)
        assert cam["inference_p50_ms"] > 0
    # decoded compressed frames are RGB
    res_b = next(r for k, _, _, r in sink.published if k == "/b")
    np.testing.assert_array_equal(res_b.color, segmenter.class_set.palette_array()[res_b.label])
    # raw bgr8 frames: the colour mask comes back in the frame's order
    pipe.submit("/a", image(3, encoding="bgr8"))
    pipe.step()
    res_a = sink.published[-1][3]
    np.testing.assert_array_equal(res_a.color, segmenter.class_set.palette_array()[:, ::-1][res_a.label])


def test_newest_frame_wins_and_older_is_counted_superseded(segmenter: Segmenter):
    pipe, sink, _ = make(segmenter)
    for i in range(3):
        pipe.submit("/a", image(i, stamp_ns=10**12 - i))
    assert pipe.step() == 1
    assert [s for _, s, *_ in sink.published] == [10**12 - 2]
    cam = pipe.snapshot()["cameras"]["/a"]
    assert cam["received"] == 3 and cam["dropped"] == {"superseded": 2} and cam["processed"] == 1


def test_only_wanted_outputs_are_computed_and_unwatched_cameras_skipped(segmenter: Segmenter):
    sink = Sink()
    sink.kinds = {"/a": {"label"}, "/b": set()}
    pipe, _, _ = make(segmenter, sink)
    pipe.submit("/a", image(1))
    pipe.submit("/b", image(2))
    pipe.step()
    (key, _, kinds, res), = sink.published
    assert key == "/a" and kinds == ("label",) and res.color is None and res.confidence is None
    snap = pipe.snapshot()["cameras"]
    assert snap["/b"]["dropped"] == {"no_subscribers": 1} and snap["/b"]["processed"] == 0


def test_max_age_from_stamp_drops_old_frames_zero_stamps_never_old(segmenter: Segmenter):
    now = 10**12
    pipe, sink, log = make(segmenter, now_ns=now, max_age=0.5, max_age_from="stamp")
    pipe.submit("/a", image(1, stamp_ns=now - 2 * 10**9))
    pipe.submit("/b", image(2, stamp_ns=0))
    pipe.step()
    snap = pipe.snapshot()["cameras"]
    assert snap["/a"]["dropped"] == {"too_old": 1}
    assert snap["/b"]["processed"] == 1 and [k for k, *_ in sink.published] == ["/b"]
    assert snap["/b"]["latency_from"] == "receipt"  # a zero stamp: latency from receipt
    assert any("too_old" in text and "2.000 s old" in text for _, text in log.lines)


def test_max_age_from_receipt_is_the_time_a_frame_waited(segmenter: Segmenter):
    pipe, sink, log = make(segmenter, max_age=0.1)
    pipe.submit("/a", image(1, stamp_ns=10**12))
    time.sleep(0.25)
    pipe.submit("/b", image(2, stamp_ns=10**12))
    pipe.step()
    snap = pipe.snapshot()["cameras"]
    assert snap["/a"]["dropped"] == {"too_old": 1} and snap["/b"]["processed"] == 1
    assert any("waited 0.2" in text for _, text in log.lines)


@pytest.mark.parametrize("offset_s", [-1000.0, 1e6])
def test_foreign_clock_frames_are_served_and_reported_once(segmenter: Segmenter, offset_s: float):
    """Stamps from another clock (1000 s ahead, or 11.6 days behind): served under the default receipt policy,
    one warning with the fix, latency from receipt (no impossible samples), output header untouched."""
    now = 2 * 10**15
    stamp = int(now - offset_s * 1e9)
    pipe, sink, log = make(segmenter, now_ns=now, max_age=0.5)
    for i in range(3):
        pipe.submit("/a", image(i, stamp_ns=stamp + i))
        pipe.step()
    cam = pipe.snapshot()["cameras"]["/a"]
    assert cam["processed"] == 3 and not cam["dropped"]
    assert [st for _, st, *_ in sink.published] == [stamp, stamp + 1, stamp + 2]  # headers are the input's
    assert cam["latency_from"] == "receipt" and 0 <= cam["latency_p50_ms"] < 10_000
    assert cam["clock_offset_s"] == pytest.approx(offset_s, rel=1e-6)
    warnings = [text for _, text in log.lines if "another clock" in text]
    assert len(warnings) == 1 and "use_sim_time" in warnings[0]
    assert ("ahead of" if offset_s < 0 else "behind") in warnings[0]
    assert "another clock" in cam["problem"]
    # an unstamped frame after them: the camera's newest frame is on no other clock (the WARN stayed for good)
    pipe.submit("/a", image(5, stamp_ns=0))
    pipe.step()
    assert pipe.snapshot()["cameras"]["/a"]["problem"] is None
    # the explicit header-stamp policy drops the old ones
    pipe.configure(max_age_from="stamp")
    pipe.submit("/a", image(9, stamp_ns=stamp))
    pipe.step()
    cam = pipe.snapshot()["cameras"]["/a"]
    assert cam["dropped"] == ({"too_old": 1} if offset_s > 0 else {}), cam


def test_clock_warning_waits_for_a_simulated_clock_and_for_a_second_frame(segmenter: Segmenter):
    """use_sim_time with ``ros2 bag play --clock``: frames that arrive before the first /clock meet a node clock of
    0, 1.7e9 s behind their stamps. Before, the first such frame used up the camera's one warning, telling to set
    the use_sim_time that was set, and a real foreign clock later went unlogged. Now a clock that has not ticked
    judges no stamp, a single frame off (a bag loop's jump) is not warned about, and two in a row are."""
    now = [0]
    sink, log = Sink(), Log()
    pipe = FramePipeline(segmenter, [("/a", False)], wanted=sink.wanted, publish=sink.publish,
                         clock_ns=lambda: now[0], simulated_clock=lambda: True, logger=log)
    bag = 1_700_000_000 * 10**9
    pipe.submit("/a", image(1, stamp_ns=bag))
    pipe.step()
    assert pipe.snapshot()["cameras"]["/a"]["problem"] == "use_sim_time is set and no /clock has been received"
    now[0] = bag + 10**8  # /clock runs
    pipe.submit("/a", image(2, stamp_ns=bag))
    pipe.step()
    assert pipe.snapshot()["cameras"]["/a"]["problem"] is None
    now[0] = bag - 100 * 10**9  # the bag loops: /clock jumps back, one frame is stamped before the jump
    pipe.submit("/a", image(3, stamp_ns=bag + 2 * 10**8))
    pipe.step()
    assert "ahead of" in pipe.snapshot()["cameras"]["/a"]["problem"]  # /diagnostics says so at once
    now[0] = bag - 99 * 10**9
    pipe.submit("/a", image(4, stamp_ns=bag - 99 * 10**9))
    pipe.step()
    assert pipe.snapshot()["cameras"]["/a"]["problem"] is None
    assert not [text for _, text in log.lines if "another clock" in text]
    for i in range(2):  # a camera stamping with its own clock, 1000 s behind
        pipe.submit("/a", image(5 + i, stamp_ns=now[0] - 1000 * 10**9))
        pipe.step()
    warnings = [text for _, text in log.lines if "another clock" in text]
    assert len(warnings) == 1 and "1000.0 s behind" in warnings[0], warnings
    assert pipe.snapshot()["cameras"]["/a"]["processed"] == 6


def test_a_simulated_clock_that_never_ticks_is_reported(segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch):
    """use_sim_time with no /clock (a bag played without --clock): the node's clock stays 0. The stamps cannot be
    judged then (see the test above), but that is itself the problem: on /diagnostics at once, and warned once
    when it lasts NO_CLOCK_WARN_S of frames (before this session's first change: the foreign-clock warning, whose
    fix names --clock; after it, nothing)."""
    import icnet_ros.frame_pipeline as fp

    monkeypatch.setattr(fp, "NO_CLOCK_WARN_S", 0.2)
    sink, log = Sink(), Log()
    pipe = FramePipeline(segmenter, [("/a", False)], wanted=sink.wanted, publish=sink.publish,
                         clock_ns=lambda: 0, simulated_clock=lambda: True, logger=log)
    for i in range(3):
        pipe.submit("/a", image(i, stamp_ns=1_700_000_000 * 10**9 + i))
        pipe.step()
        assert pipe.snapshot()["cameras"]["/a"]["problem"] == "use_sim_time is set and no /clock has been received"
        time.sleep(0.15)
    warnings = [text for _, text in log.lines if "/clock" in text]
    assert len(warnings) == 1 and "ros2 bag play --clock" in warnings[0], log.lines
    assert pipe.snapshot()["cameras"]["/a"]["processed"] == 3


def test_the_no_clock_warning_waits_for_no_clock_warn_s_of_frames(segmenter: Segmenter,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """The warning comes once frames have met an unticked simulated clock for NO_CLOCK_WARN_S (3 s: a bag started
    a moment before its /clock is not warned about), once; a clock that ticks in between starts the wait again."""
    import icnet_ros.frame_pipeline as fp

    now, node_clock = [1000.0], [0]
    monkeypatch.setattr(fp, "time", SimpleNamespace(monotonic=lambda: now[0], perf_counter=time.perf_counter))
    sink, log = Sink(), Log()
    pipe = FramePipeline(segmenter, [("/a", False)], wanted=sink.wanted, publish=sink.publish,
                         clock_ns=lambda: node_clock[0], simulated_clock=lambda: True, logger=log)

    def frame_at(t: float) -> list[str]:
        now[0] = 1000.0 + t
        pipe.submit("/a", image(1, stamp_ns=1_700_000_000 * 10**9))
        pipe.step()
        return [text for _, text in log.lines if "no /clock" in text]
    assert fp.NO_CLOCK_WARN_S == 3.0
    assert frame_at(0.0) == [] and frame_at(1.5) == [] and frame_at(2.9) == []
    node_clock[0] = 1_700_000_000 * 10**9  # /clock ticks once ...
    assert frame_at(3.5) == []
    node_clock[0] = 0  # ... then stands at 0 again (the simulator restarted): the 3 s count from here
    assert frame_at(4.0) == [] and frame_at(6.9) == []
    warnings = frame_at(7.0)
    assert len(warnings) == 1 and "for 3 s of frames" in warnings[0], warnings
    assert frame_at(20.0) == warnings  # once per camera


def test_stamps_on_this_clock_give_stamp_latency_never_negative(segmenter: Segmenter):
    now = [10**12]
    sink = Sink()
    pipe = FramePipeline(segmenter, [("/a", False), ("/b", False)], wanted=sink.wanted, publish=sink.publish,
                         clock_ns=lambda: now[0])
    pipe.submit("/a", image(1, stamp_ns=10**12 - 5 * 10**6))  # 5 ms before receipt
    pipe.submit("/b", image(2, stamp_ns=10**12 + 10**6))  # 1 ms in the future (clock skew)
    pipe.step()
    cams = pipe.snapshot()["cameras"]
    assert cams["/a"]["latency_from"] == "stamp" and cams["/a"]["latency_p50_ms"] == pytest.approx(5.0)
    assert cams["/b"]["latency_from"] == "receipt" and cams["/b"]["latency_p50_ms"] >= 0


def test_on_a_simulated_clock_latency_is_timed_from_receipt(segmenter: Segmenter):
    """use_sim_time: the node's clock moves in /clock ticks (25 ms at 40 Hz), stands still while paused and jumps
    with a bag loop; stamp latency read one tick (or 0 ms) whatever the pipeline took. It is timed from receipt."""
    sink = Sink()
    pipe = FramePipeline(segmenter, [("/a", False), ("/b", False)], wanted=sink.wanted, publish=sink.publish,
                         clock_ns=lambda: 10**12, simulated_clock=lambda: True)  # a paused simulated clock
    pipe.submit("/a", image(1, stamp_ns=10**12))
    pipe.step()
    cam = pipe.snapshot()["cameras"]["/a"]
    assert cam["latency_from"] == "receipt" and cam["latency_p50_ms"] > 0, cam


def test_receipt_latency_is_in_milliseconds(segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch):
    """Latency from receipt (an unstamped frame, a simulated clock) is reported in ms like the stamp latency: a frame
    published 40 ms (on the steady clock) after it was received reads 40, not 0.04."""
    import icnet_ros.frame_pipeline as fp

    now = [1000.0]
    monkeypatch.setattr(fp, "time", SimpleNamespace(monotonic=lambda: now[0], perf_counter=time.perf_counter))

    def forward_pass(frames: list) -> None:
        now[0] += 0.040
    for simulated, stamp in ((False, 0), (True, 10**12)):
        pipe = FramePipeline(Counting(segmenter, forward_pass), [("/a", False)], wanted=lambda key: {"label"},
                             publish=lambda *args: ["label"], clock_ns=lambda: 10**12,
                             simulated_clock=lambda: simulated)
        pipe.submit("/a", image(1, stamp_ns=stamp))
        pipe.step()
        cam = pipe.snapshot()["cameras"]["/a"]
        assert cam["latency_from"] == "receipt" and cam["latency_p50_ms"] == pytest.approx(40.0), cam
        assert pipe.samples("/a")["latency_ms"] == [pytest.approx(40.0)]


def test_malformed_frame_is_that_frames_drop(segmenter: Segmenter):
    pipe, sink, log = make(segmenter, compressed_b=True)
    bad = image(1)
    bad.encoding = "yuv422"
    pipe.submit("/a", bad)
    pipe.submit("/b", SimpleNamespace(format="png", data=b"\x89PNG\r\n\x1a\n garbage", header=stamp_of(0)))
    pipe.step()
    snap = pipe.snapshot()["cameras"]
    assert snap["/a"]["dropped"] == {"encoding": 1} and snap["/b"]["dropped"] == {"decode": 1}
    assert not sink.published
    pipe.submit("/a", image(2))
    pipe.submit("/b", compressed(3))
    pipe.step()
    assert sorted(k for k, *_ in sink.published) == ["/a", "/b"]


def test_frame_the_segmenter_refuses_costs_no_other_frame(segmenter: Segmenter):
    """A 16x16 frame in the middle of a batch of three is below the network minimum: that frame is dropped
    (``rejected``, the reason without the engine's batch position) and the other two are served in one more call
    (before: each frame alone, one Segmenter call per frame)."""
    calls: list[int] = []

    class Recording(Gated):
        def segment(self, frames: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(len(frames))
            return self._segmenter.segment(frames, *args, **kwargs)

    sink, log = Sink(), Log()
    sink.kinds["/c"] = set(KINDS)
    pipe = FramePipeline(Recording(segmenter, threading.Event()), [("/a", False), ("/b", False), ("/c", False)],
                         wanted=sink.wanted, publish=sink.publish, clock_ns=lambda: 10**12, logger=log,
                         options=PipelineOptions(max_batch=3))
    pipe.submit("/a", image(1))
    pipe.submit("/b", image(2, h=16, w=16))
    pipe.submit("/c", image(3))
    assert pipe.step() == 3
    snap = pipe.snapshot()
    assert snap["cameras"]["/b"]["dropped"] == {"rejected": 1}
    assert sorted(k for k, *_ in sink.published) == ["/a", "/c"] and calls == [3, 2], calls
    assert snap["cameras"]["/a"]["processed"] == 1 and snap["cameras"]["/c"]["processed"] == 1
    rejected = [text for _, text in log.lines if "rejected" in text]
    assert len(rejected) == 1 and rejected[0].startswith("/b: dropping frame (rejected): 16x16 gives a "), log.lines


def test_failing_publish_is_counted_and_the_next_frame_served(segmenter: Segmenter):
    sink = Sink()
    calls = []

    def publish(key: str, *args: Any) -> list[str]:
        calls.append(key)
        if len(calls) == 1:
            raise RuntimeError("publisher's context is invalid")
        return sink.publish(key, *args)

    log = Log()
    pipe = FramePipeline(segmenter, [("/a", False), ("/b", False)], wanted=sink.wanted, publish=publish,
                         logger=log)
    pipe.submit("/a", image(1))
    pipe.step()
    pipe.submit("/a", image(2))
    pipe.step()
    cam = pipe.snapshot()["cameras"]["/a"]
    assert cam["dropped"] == {"publish_error": 1} and cam["processed"] == 1
    assert [lvl for lvl, text in log.lines if "publish_error" in text] == ["error"]


def test_round_robin_when_more_cameras_than_max_batch(segmenter: Segmenter):
    pipe, sink, _ = make(segmenter, max_batch=1)
    served = []
    for i in range(4):
        pipe.submit("/a", image(i))
        pipe.submit("/b", image(10 + i))
        pipe.step()
        served.append(sink.published[-1][0])
        pipe.step()  # the other camera's frame
        served.append(sink.published[-1][0])
    assert served.count("/a") == served.count("/b") == 4
    assert all(x != y for x, y in zip(served, served[1:]))  # neither camera starves the other


def test_configure_live_and_unknown_option(segmenter: Segmenter):
    pipe, _, _ = make(segmenter)
    pipe.configure(max_batch=1, max_age=0.0, batch_timeout=0.2)
    assert pipe.options == PipelineOptions(max_age=0.0, max_batch=1, batch_timeout=0.2)
    with pytest.raises(ValueError, match="unknown pipeline option"):
        pipe.configure(max_pixels_typo=3)
    cfg = SimpleNamespace(max_age=1.5, max_batch=2, batch_timeout=0.1, model="x")
    assert PipelineOptions.from_config(cfg) == PipelineOptions(1.5, 2, 0.1)
    with pytest.raises(ValueError, match="max_age_from"):
        pipe.configure(max_age_from="header")


def test_batch_timeout_waits_for_the_other_camera(segmenter: Segmenter):
    pipe, sink, _ = make(segmenter, batch_timeout=2.0)
    pipe.submit("/b", image(0))  # /b has been publishing
    pipe.step()
    pipe.submit("/a", image(1))
    threading.Timer(0.2, lambda: pipe.submit("/b", image(2))).start()
    t0 = time.monotonic()
    assert pipe.step() == 2
    assert time.monotonic() - t0 < 2.0  # did not wait for the whole timeout once both were there


def test_batch_timeout_does_not_wait_for_silent_cameras(segmenter: Segmenter):
    """/b never sent a frame (or stopped long ago): a frame of /a is taken at once, not after batch_timeout."""
    pipe, sink, _ = make(segmenter, batch_timeout=5.0)
    pipe.submit("/a", image(1))
    t0 = time.monotonic()
    assert pipe.step() == 1
    assert time.monotonic() - t0 < 2.5


def test_batch_timeout_does_not_wait_for_a_slow_or_stopped_camera(segmenter: Segmenter):
    """/b sends a frame every 2 s: a batch must not wait batch_timeout for it each time (it held a 30 Hz camera to
    5 fps while the worker idled); nor for a 20 Hz camera that stopped 1 s ago. One due within the timeout is."""
    pipe, sink, _ = make(segmenter, batch_timeout=1.0)
    cams = {c.key: c for c in pipe._cameras}
    now = time.monotonic()
    cams["/b"].stats.last_received, cams["/b"].stats.period = now - 0.1, 2.0  # next frame in 1.9 s
    pipe.submit("/a", image(1))
    t0 = time.monotonic()
    assert pipe.step() == 1 and time.monotonic() - t0 < 0.5
    cams["/b"].stats.last_received, cams["/b"].stats.period = time.monotonic() - 1.0, 0.05  # stopped: 20 missed
    pipe.submit("/a", image(2))
    t0 = time.monotonic()
    assert pipe.step() == 1 and time.monotonic() - t0 < 0.5
    cams["/b"].stats.last_received, cams["/b"].stats.period = time.monotonic(), 0.3  # due in 0.3 s: waited for
    pipe.submit("/a", image(3))
    threading.Timer(0.3, lambda: pipe.submit("/b", image(4))).start()
    assert pipe.step() == 2


def test_a_foreign_clock_warning_clears_when_the_stamps_are_back(segmenter: Segmenter):
    """A frame stamped far from the node's clock (before the first /clock, a bag loop's jump) sets the camera's
    problem; the next frames on the node's clock clear it (it stayed WARN on /diagnostics for good)."""
    pipe, sink, log = make(segmenter, now_ns=2 * 10**12)
    pipe.submit("/a", image(1, stamp_ns=10**12))  # 1000 s behind
    pipe.step()
    assert "1000.0 s behind this node's clock" in pipe.snapshot()["cameras"]["/a"]["problem"]
    pipe.submit("/a", image(2, stamp_ns=2 * 10**12 - 1000))
    pipe.step()
    assert pipe.snapshot()["cameras"]["/a"]["problem"] is None


def test_max_pixels_refuses_large_frames_before_decoding(segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch):
    """Frames above max_pixels are dropped as ``size`` from their declared size, before any decoding: a raw image
    one pixel over, a compressed one whose PNG header declares 20000x20000 (its data holds 64x96) and a raw one
    that declares 20000x20000 with the data of 64x96. The image decoders are replaced by ones that record the call
    and fail, so a frame decoded before the size check is a recorded call and a ``decode`` drop."""
    import cv2
    import PIL.ImageFile

    decoded: list[str] = []

    def decoder(name: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            decoded.append(name)
            raise OSError(f"{name}: decoding a frame above max_pixels")
        return refuse

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "__init__", decoder("PIL's image file"))  # every Pillow decoder
    monkeypatch.setattr(cv2, "imdecode", decoder("cv2.imdecode"))
    pipe, sink, log = make(segmenter, compressed_b=True, max_pixels=H * W - 1)
    big = compressed(2)
    big.data = png_with_size(big.data, 20000, 20000)
    pipe.submit("/a", image(1))
    pipe.submit("/b", big)
    pipe.step()
    cams = pipe.snapshot()["cameras"]
    assert not decoded, f"decoded before the size check: {decoded}"
    assert cams["/a"]["dropped"] == {"size": 1} and cams["/b"]["dropped"] == {"size": 1}, cams
    assert not sink.published
    assert any("exceeds max_pixels" in text and "20000x20000" in text for _, text in log.lines), log.lines
    assert any("exceeds max_pixels" in text and f"{W}x{H}" in text for _, text in log.lines), log.lines
    lying = image(3)  # a raw image declaring more than its data holds: refused for its size, not its data length
    lying.height, lying.width = 20000, 20000
    pipe.submit("/a", lying)
    pipe.step()
    assert pipe.snapshot()["cameras"]["/a"]["dropped"] == {"size": 2} and not sink.published and not decoded


def _failing_forward(seg: Segmenter, monkeypatch: pytest.MonkeyPatch, error: Callable[[int], Exception | None]
                     ) -> list[int]:
    """Make the Segmenter's network forward raise ``error(batch size)`` (when not None); returns the batch sizes
    seen. The Segmenter is real; only the device's failure is induced, at the engine boundary: no GPU exists here,
    so a CUDA out-of-memory or a sticky CUDA error cannot happen for real."""
    sizes: list[int] = []
    real = seg.forward

    def forward(x: Any) -> Any:
        sizes.append(int(x.shape[0]))
        e = error(int(x.shape[0]))
        if e is not None:
            raise e
        return real(x)

    monkeypatch.setattr(seg, "forward", forward)
    return sizes


def test_out_of_memory_retries_frame_by_frame_and_shrinks_the_batch(segmenter: Segmenter,
                                                                     monkeypatch: pytest.MonkeyPatch):
    import torch

    sizes = _failing_forward(segmenter, monkeypatch, lambda n: torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB") if n > 1 else None)
    pipe, sink, log = make(segmenter, max_batch=4)
    pipe.submit("/a", image(1))
    pipe.submit("/b", image(2))
    pipe.step()
    snap = pipe.snapshot()
    assert sizes == [2, 1, 1]  # the batch, then each frame alone
    assert sorted(k for k, *_ in sink.published) == ["/a", "/b"]  # nobody lost a frame
    assert snap["faults"] == {"out_of_memory": 1, "oom_retries": 1, "batch_shrinks": 1}
    assert snap["batch_limit"] == 1
    assert any("out of device memory" in text and "batch limit now 1" in text for _, text in log.lines)
    # the next batches hold one frame each (no second out-of-memory)
    pipe.submit("/a", image(3))
    pipe.submit("/b", image(4))
    pipe.step()
    pipe.step()
    assert sizes[3:] == [1, 1] and len(sink.published) == 4
    pipe.configure(max_batch=2)  # a new max_batch resets the limit
    assert pipe.snapshot()["batch_limit"] == 2


def _out_of_memory_once() -> tuple[Callable[[int], Exception | None], list[int]]:
    """An error function for :func:`_failing_forward`: the first batch of more than one frame runs out of memory
    (its size recorded in the returned list), nothing else does."""
    failed: list[int] = []

    def once(n: int) -> Exception | None:
        if n > 1 and not failed:
            failed.append(n)
            return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return None
    return once, failed


def test_the_batch_limit_grows_back_after_an_out_of_memory_shrink(segmenter: Segmenter,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """After a shrink the limit grows by one every REGROW_AFTER good batches (counted afresh after each step), up
    to max_batch and no further."""
    import icnet_ros.frame_pipeline as fp

    monkeypatch.setattr(fp, "REGROW_AFTER", 3)
    once, failed = _out_of_memory_once()
    sizes = _failing_forward(segmenter, monkeypatch, once)
    keys = ["/a", "/b", "/c"]
    pipe, published, _ = pipe_of(segmenter, keys, max_batch=3, max_age=0)
    limits = []
    for i in range(12):
        for k in keys:
            pipe.submit(k, image(i))
        pipe.step()
        limits.append(pipe.snapshot()["batch_limit"])
    # batch 1: 3 frames, out of memory, each alone, limit 1; then batches of 1 until the limit is 2, 3 batches of
    # 2 -> 3 (max_batch), and no further
    assert failed == [3] and sizes[:4] == [3, 1, 1, 1]
    grown = limits.index(2)
    assert grown == 3 and limits[:grown] == [1] * grown, limits  # (the batch that shrank it is not a good one)
    assert limits[grown:] == [2, 2, 2] + [3] * (len(limits) - grown - 3), limits
    assert sizes[4:] == limits[:-1], sizes  # each batch as large as the limit the step before left
    assert pipe.snapshot()["faults"] == {"out_of_memory": 1, "oom_retries": 1, "batch_shrinks": 1}


def test_a_swap_gives_the_new_model_the_whole_max_batch(segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch):
    """Out-of-memory shrinks were the old model's: swapping to a model that fits (fp16, a smaller one: what a user
    tries after such errors) ran at batch 1, then 2, for REGROW_AFTER batches each."""
    once, _ = _out_of_memory_once()
    _failing_forward(segmenter, monkeypatch, once)
    keys = ["/a", "/b", "/c"]
    pipe, _, _ = pipe_of(segmenter, keys, max_batch=3, max_age=0)
    for k in keys:
        pipe.submit(k, image(0))
    pipe.step()
    assert pipe.snapshot()["batch_limit"] == 1
    assert pipe.swap_segmenter(segmenter) is segmenter  # the same one: nothing changes
    assert pipe.snapshot()["batch_limit"] == 1
    other = Counting(segmenter)
    pipe.swap_segmenter(other)
    for k in keys:
        pipe.submit(k, image(1))
    pipe.step()
    assert pipe.snapshot()["batch_limit"] == 3 and other.calls == [3]


def test_a_subscriber_arriving_while_a_batch_is_taken_never_makes_it_larger_than_max_batch(segmenter: Segmenter):
    """Frames of cameras nobody watched when the batch was taken have no place in it; asked again when served, a
    viewer who had subscribed meanwhile made all four cameras one batch with max_batch 1 (another out-of-memory
    error on a GPU, an unwarmed shape with compile). They are dropped as no_subscribers; the next frames are
    served within max_batch."""
    seen = {"calls": 0}

    def wanted(key: str) -> set[str]:  # nobody while the batch is taken (4 calls), a viewer from then on
        seen["calls"] += 1
        return {"label"} if seen["calls"] > 4 else set()
    seg = Counting(segmenter)
    keys = ["/a", "/b", "/c", "/d"]
    pipe, published, _ = pipe_of(seg, keys, wanted=wanted, max_batch=1, max_age=0)
    for k in keys:
        pipe.submit(k, image(0))
    assert pipe.step() == 4
    snap = pipe.snapshot()
    assert seg.calls == [] and published == [] and snap["max_batch_size"] == 0
    assert all(c["dropped"] == {"no_subscribers": 1} for c in snap["cameras"].values())
    for k in keys:
        pipe.submit(k, image(1))
    while pipe.step():
        pass
    assert seg.calls == [1, 1, 1, 1] and sorted(published) == keys and accounted(pipe) == dict.fromkeys(keys, 0)


def test_out_of_memory_for_one_frame_alone_is_that_frames_drop(segmenter: Segmenter,
                                                               monkeypatch: pytest.MonkeyPatch):
    import torch

    big = H * 2  # frames of /a are twice as tall: only they run out of memory
    _failing_forward(segmenter, monkeypatch, lambda n: None)
    monkeypatch.setattr(segmenter, "forward", (lambda real: lambda x: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory")) if x.shape[2] >= big else real(x))(segmenter.forward))
    pipe, sink, log = make(segmenter)
    pipe.submit("/a", image(1, h=big * 2))
    pipe.submit("/b", image(2))
    pipe.step()
    cams = pipe.snapshot()["cameras"]
    assert cams["/a"]["dropped"] == {"out_of_memory": 1} and cams["/b"]["processed"] == 1


def test_unrecoverable_device_error_stops_and_reports_once(segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch):
    import torch

    _failing_forward(segmenter, monkeypatch, lambda n: torch.AcceleratorError(
        "CUDA error: an illegal memory access was encountered"))
    fatal: list[str] = []
    sink = Sink()
    log = Log()
    pipe = FramePipeline(segmenter, [("/a", False), ("/b", False)], wanted=sink.wanted, publish=sink.publish,
                         logger=log, on_fatal=fatal.append)
    pipe.submit("/a", image(1))
    pipe.submit("/b", image(2))
    pipe.start()  # after both frames are pending: one batch
    deadline = time.monotonic() + 30
    while not fatal and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pipe.stop(30)
    snap = pipe.snapshot()
    assert len(fatal) == 1 and "illegal memory access" in fatal[0] and snap["fatal_error"] == fatal[0]
    dropped = sum(c["dropped"].get("device_error", 0) for c in snap["cameras"].values())
    assert dropped == 2 and not sink.published
    assert not pipe.running  # the worker stopped taking frames by itself


def test_worker_thread_start_stop_and_segmenter_swap(segmenter: Segmenter, tmp_path: Path):
    pipe, sink, _ = make(segmenter, max_age=0.0)
    pipe.start()
    try:
        assert pipe.running
        pipe.submit("/a", image(1, stamp_ns=1))
        deadline = time.monotonic() + 30
        while not sink.published and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.published
        other = Segmenter(str(make_checkpoint(tmp_path / "other.safetensors", seed=3)), device="cpu",
                          warmup=False)
        old = pipe.swap_segmenter(other, timeout=30)
        assert old is segmenter and pipe.segmenter is other
        pipe.submit("/a", image(1, stamp_ns=2))
        while len(sink.published) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        first, second = sink.published[0][3], sink.published[1][3]
        assert not np.array_equal(first.confidence, second.confidence)  # a different network served frame 2
    finally:
        assert pipe.stop(30)
    assert not pipe.running
    pipe.submit("/a", image(3))  # stopped: refused, counted (a frame from before a deactivate never served after it)
    assert pipe.idle() and pipe.snapshot()["cameras"]["/a"]["dropped"] == {"deactivated": 1}
    pipe.start()
    try:
        pipe.submit("/a", image(4, stamp_ns=4))
        while len(sink.published) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.published[-1][1] == 4
    finally:
        assert pipe.stop(30)


def test_start_after_a_stop_that_timed_out_serves_on(segmenter: Segmenter):
    """Deactivate while a forward pass outlasts stop()'s timeout, then activate: the worker still finishing its
    batch serves on (it never ends while a start() says it runs), and the next frames are served. The batch that
    was in flight at the stop is not published (before, frame 1 went out after the next start with its old stamp):
    counted as deactivated."""
    gate = threading.Event()

    pipe, sink, _ = make(Gated(segmenter, gate), max_age=0.0)
    pipe.start()
    try:
        pipe.submit("/a", image(1, stamp_ns=1))
        assert pipe.wait_taken("/a", 1, timeout=30)  # in flight, held at the gate
        assert not pipe.stop(timeout=0.1)  # timed out: the batch is still running
        worker = pipe._worker
        pipe.start()  # activate again before the batch ends
        gate.set()
        pipe.submit("/a", image(2, stamp_ns=2))
        deadline = time.monotonic() + 30
        while len(sink.published) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [stamp for _, stamp, *_ in sink.published] == [2] and pipe.running
        assert pipe.snapshot()["cameras"]["/a"]["dropped"] == {"deactivated": 1}
        assert pipe._worker is worker  # the same worker served on
        for _ in range(20):  # stop/start races with a worker deciding to end: never left without a worker
            pipe.stop(timeout=0.0)
            pipe.start()
        pipe.submit("/a", image(3, stamp_ns=3))
        while len(sink.published) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(sink.published) == 2 and pipe.running
    finally:
        gate.set()
        assert pipe.stop(30)


def test_a_swap_that_times_out_closes_the_old_model_only_after_its_batch(segmenter: Segmenter, tmp_path: Path):
    """A hot swap waits a bounded time for the batch in flight; when that runs out, the old Segmenter is not closed
    under the batch (retire() says so) but by the worker once the batch ends."""
    gate, closed = threading.Event(), []

    old = Gated(segmenter, gate, closed)
    pipe, sink, _ = make(old, max_age=0.0)
    pipe.start()
    try:
        pipe.submit("/a", image(1, stamp_ns=1))
        assert pipe.wait_taken("/a", 1, timeout=30)
        assert pipe.swap_segmenter(segmenter, timeout=0.1) is old  # timed out: the batch still runs on old
        assert not pipe.retire(old) and not closed
        gate.set()
        deadline = time.monotonic() + 30
        while not closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert closed == [old] and [stamp for _, stamp, *_ in sink.published] == [1]  # served, then closed
        assert pipe.retire(old)  # not in use: the caller may close it at once
    finally:
        gate.set()
        assert pipe.stop(30)


def test_wait_taken_returns_once_the_worker_took_the_frame(segmenter: Segmenter):
    pipe, sink, _ = make(segmenter)
    assert not pipe.wait_taken("/a", 1, timeout=0.05)  # nothing received yet
    pipe.submit("/a", image(1))
    assert not pipe.wait_taken("/a", 1, timeout=0.05)  # received, still pending
    threading.Timer(0.1, pipe.step).start()
    assert pipe.wait_taken("/a", 1, timeout=30)


def test_a_camera_with_much_larger_frames_cannot_starve_the_others(segmenter: Segmenter):
    """/a sends frames with 16x the pixels of /b's, both as fast as they are taken: /b is served about 16 times
    per /a frame (deficit round robin on pixels), not once per big forward pass."""
    pipe, sink, _ = make(segmenter, max_age=0.0)
    for i in range(34):
        if pipe.snapshot()["cameras"]["/a"]["received"] == len([k for k, *_ in sink.published if k == "/a"]):
            pipe.submit("/a", image(i, h=H * 4, w=W * 4))
        pipe.submit("/b", image(100 + i))
        pipe.step()
    served = Counter(k for k, *_ in sink.published)
    assert served["/b"] == 34 and served["/a"] == 2, served
    assert pipe.snapshot()["cameras"]["/a"]["dropped"] == {}  # held back, not dropped: it was not superseded


@pytest.mark.parametrize("error,kind", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
    (RuntimeError("CUDA error: out of memory"), "oom"),
    (MemoryError(), "oom"),
    (RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer"),
     "oom"),
    (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), "fatal"),
    (RuntimeError("CUDA error: device-side assert triggered"), "fatal"),
    (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), "fatal"),
    (ValueError("frame 0: 16x16 gives a 16x16 network input, below the minimum 64x64"), None),
    (RuntimeError("Given groups=1, weight of size [8, 3, 3, 3], expected input to have 3 channels"), None),
])
def test_device_failure_classification(error: BaseException, kind: str | None):
    assert device_failure(error) == kind


def test_the_cpu_allocators_own_error_is_out_of_memory():
    """PyTorch's CPU allocator fails with a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory"): it
    was taken for an error of the frame (dropped as bad input, not handled as out of memory)."""
    with pytest.raises(RuntimeError) as caught:
        torch.empty(1 << 60, dtype=torch.uint8)  # 1 EiB: refused by the allocator, nothing is touched
    assert device_failure(caught.value) == "oom", str(caught.value)


def test_opencvs_own_allocation_failure_is_out_of_memory():
    """On the CPU the pre- and post-processing run on OpenCV, whose allocation failure is a cv2.error (code -4,
    "Insufficient memory"): it was taken for an error of the frame (inference_error, the batch never shrunk) and
    icnet-segment ended in a traceback."""
    import cv2

    with pytest.raises(cv2.error) as caught:
        cv2.resize(np.zeros((4, 4, 3), np.float32), (300000, 300000))  # 1 TB: refused, nothing is touched
    assert device_failure(caught.value) == "oom", str(caught.value)
    with pytest.raises(cv2.error) as other:
        cv2.resize(np.zeros((4, 4, 3), np.float32), (0, 0))  # an error that is not out of memory
    assert device_failure(other.value) is None


def test_out_of_memory_warnings_are_throttled(segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch):
    """A camera whose every frame runs out of memory (a GPU too small for it) logged one warning per frame, forever
    (about 650 MB of log a day at 30 fps): one line per WARN_PERIOD_S, with the count since the last."""
    import torch

    _failing_forward(segmenter, monkeypatch, lambda n: torch.OutOfMemoryError("CUDA out of memory"))
    pipe, sink, log = make(segmenter)
    for i in range(12):
        pipe.submit("/a", image(i))
        pipe.step()
    snap = pipe.snapshot()
    assert snap["cameras"]["/a"]["dropped"] == {"out_of_memory": 12} and not sink.published
    lines = [text for _, text in log.lines if "out of device memory" in text]
    assert len(lines) == 1, lines
    monkeypatch.setattr(pipe, "_oom_logged_at", time.monotonic() - WARN_PERIOD_S)  # the period is over
    pipe.submit("/a", image(12))
    pipe.step()
    lines = [text for _, text in log.lines if "out of device memory" in text]
    assert len(lines) == 2 and lines[1].endswith("(12 times since the last such line)"), lines


# ------------------------------------------------------------------------- scheduling (review of 2026-12-07)
class Counting(Gated):
    """The real Segmenter; records each call's batch size; ``hook(frames)`` runs first (a clock, a gate)."""

    def __init__(self, segmenter: Segmenter, hook: Callable[[list], None] | None = None) -> None:
        super().__init__(segmenter, threading.Event())
        self.calls: list[int] = []
        self.hook = hook

    def segment(self, frames: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(len(frames))
        if self.hook is not None:
            self.hook(frames)
        return self._segmenter.segment(frames, *args, **kwargs)


def pipe_of(seg: Any, keys: list[str], wanted: Callable[[str], set] | None = None,
            publish: Callable[..., list] | None = None, **options: Any) -> tuple[FramePipeline, list[str], Log]:
    published: list[str] = []

    def default_publish(key: str, msg: Any, order: str, res: Any, want: set[str]) -> list[str]:
        published.append(key)
        return ["label"]
    log = Log()
    pipe = FramePipeline(seg, [(k, False) for k in keys], wanted=wanted or (lambda key: {"label"}),
                         publish=publish or default_publish, clock_ns=lambda: 10**12,
                         options=PipelineOptions(**options), logger=log)
    return pipe, published, log


def accounted(pipe: FramePipeline) -> dict[str, int]:
    """received - processed - dropped per camera: every frame must end as one of the two."""
    return {k: c["received"] - c["processed"] - sum(c["dropped"].values())
            for k, c in pipe.snapshot()["cameras"].items()}


def test_round_robin_starts_after_the_camera_served_last(segmenter: Segmenter):
    """A silent camera does not hand its turn to the next one (before: with /c silent, /a got 200 frames to
    /b's 100; with 4 cameras, max_batch 2 and /d silent, 225/225/150)."""
    pipe, published, _ = pipe_of(segmenter, ["/a", "/b", "/c"], max_batch=1, max_age=0)
    for i in range(60):
        pipe.submit("/a", image(i))
        pipe.submit("/b", image(i))
        pipe.step()
    assert Counter(published) == {"/a": 30, "/b": 30}
    pipe, published, _ = pipe_of(segmenter, ["/a", "/b", "/c", "/d"], max_batch=2, max_age=0)
    for i in range(30):
        for k in ("/a", "/b", "/c"):
            pipe.submit(k, image(i))
        pipe.step()
    assert Counter(published) == {"/a": 20, "/b": 20, "/c": 20}


def test_an_unwatched_camera_takes_no_place_in_a_batch_and_holds_none_back(segmenter: Segmenter):
    """Frames of a camera nobody subscribes to are dropped as no_subscribers without taking a batch place (before:
    with max_batch 2, two thirds of the batches carried one real frame) and a batch_timeout does not wait for
    them (before: /a waited 0.35 s for a /b frame that was then thrown away)."""
    seg = Counting(segmenter)
    pipe, published, _ = pipe_of(seg, ["/a", "/b", "/c"], wanted=lambda k: set() if k == "/c" else {"label"},
                                 max_batch=2, max_age=0)
    for i in range(20):
        for k in ("/a", "/b", "/c"):
            pipe.submit(k, image(i))
        pipe.step()
    assert seg.calls == [2] * 20 and Counter(published) == {"/a": 20, "/b": 20}
    assert pipe.snapshot()["cameras"]["/c"]["dropped"] == {"no_subscribers": 20}
    pipe, published, _ = pipe_of(segmenter, ["/a", "/b"], wanted=lambda k: {"label"} if k == "/a" else set(),
                                 batch_timeout=0.5, max_age=0)
    pipe.submit("/b", image(0))
    pipe.step()  # /b publishes (its next frame would be due within the timeout)
    pipe.submit("/a", image(1))
    t0 = time.monotonic()
    assert pipe.step() == 1 and time.monotonic() - t0 < 0.3 and published == ["/a"]


def test_a_big_frame_camera_is_not_starved_by_max_age(segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch):
    """A camera sending 25x larger frames once a second while a small camera always has one waiting (a forward pass
    costs 33 ms per small frame's pixels, on a simulated steady clock; max_age 0.5 s): fair queuing held each big
    frame until it was too old and then started its camera from nothing again: 0 of 30 served. Now a held frame is
    taken at half of max_age, its camera paying the debt back: both cameras get about half of the worker's time."""
    import icnet_ros.frame_pipeline as fp

    now = [1000.0]
    monkeypatch.setattr(fp, "time", SimpleNamespace(monotonic=lambda: now[0], perf_counter=time.perf_counter))

    def advance(frames: list) -> None:
        now[0] += sum(f.shape[0] * f.shape[1] for f in frames) / (H * W) * 0.033
    pipe, published, _ = pipe_of(Counting(segmenter, advance), ["/a", "/b"], max_batch=1, max_age=0.5)
    next_big = now[0]
    while now[0] < 1000.0 + 10:
        if now[0] >= next_big:
            pipe.submit("/a", image(1, h=5 * H, w=5 * W))
            next_big += 1.0
        pipe.submit("/b", image(2))
        pipe.step()
    served = Counter(published)
    big_time, small_time = served["/a"] * 25 * 0.033, served["/b"] * 0.033
    assert served["/a"] >= 4 and 0.6 < big_time / small_time < 1.6, served
    assert accounted(pipe) == {"/a": 0, "/b": 0}


def test_every_frame_is_counted_when_stopping_or_when_the_adapter_fails(segmenter: Segmenter):
    """stop() during a batch_timeout wait takes nothing more (before: a frame was taken and published after
    stop()); the batch in flight at a stop is counted, not published (before: the rest of the batch vanished
    uncounted when publishing failed while stopping, and published when it did not); an
    exception from the adapter's wanted() for one camera costs only that camera's frame (internal_error; before:
    the whole batch, uncounted); frames_processed is the sum of the cameras' (it counted segmented frames)."""
    pipe, published, _ = pipe_of(segmenter, ["/a", "/b"], batch_timeout=2.0, max_age=0)
    pipe.submit("/b", image(0))
    pipe.step()  # /b seen: due within the timeout
    pipe.start()
    pipe.submit("/a", image(1))
    time.sleep(0.2)  # the worker waits for /b
    assert pipe.stop(5)
    assert published == ["/b"] and pipe.snapshot()["cameras"]["/a"]["processed"] == 0
    assert not pipe.idle()  # /a's frame waits for the next start()

    entered, gate = threading.Event(), threading.Event()
    seg = Counting(segmenter, lambda frames: (entered.set(), gate.wait(10)))

    def failing_publish(*args: Any) -> list[str]:
        raise RuntimeError("publisher's context is invalid")
    pipe, _, log = pipe_of(seg, ["/a", "/b", "/c"], publish=failing_publish, max_age=0)
    for k in ("/a", "/b", "/c"):
        pipe.submit(k, image(2))
    pipe.start()
    assert entered.wait(10)
    pipe.stop(0.1)  # the batch is in flight
    gate.set()
    assert pipe.stop(10)
    assert accounted(pipe) == {"/a": 0, "/b": 0, "/c": 0}
    # the batch in flight at the stop is not published (it would go out after a deactivate): counted, not logged
    assert all(c["dropped"] == {"deactivated": 1} for c in pipe.snapshot()["cameras"].values())
    assert not log.lines

    def wanted(key: str) -> set[str]:
        if key == "/b":
            raise RuntimeError("publisher handle invalid")
        return {"label"}

    def publish_a_fails(key: str, *args: Any) -> list[str]:
        if key == "/c":
            raise RuntimeError("boom")
        return ["label"]
    pipe, _, log = pipe_of(segmenter, ["/a", "/b", "/c"], wanted=wanted, publish=publish_a_fails, max_age=0)
    for k in ("/a", "/b", "/c"):
        pipe.submit(k, image(3))
    assert pipe.step() == 3
    snap = pipe.snapshot()
    assert snap["cameras"]["/a"]["processed"] == 1 and snap["cameras"]["/b"]["dropped"] == {"internal_error": 1}
    assert snap["cameras"]["/c"]["dropped"] == {"publish_error": 1} and accounted(pipe) == {"/a": 0, "/b": 0, "/c": 0}
    assert snap["frames_processed"] == 1 and snap["mean_batch_size"] == 2.0
    assert any(text.startswith("/b: dropping frame (internal_error): RuntimeError") for _, text in log.lines)
