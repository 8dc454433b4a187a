"""icnet_ros.frame_pipeline without ROS: a real Segmenter (tiny random checkpoint) and message-like objects.

The pipeline is driven with ``step()`` from the test thread (deterministic), except where the worker thread itself
is under test (start/stop, swap)."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from helpers import make_checkpoint
from icnet_ros.engine import Segmenter
from icnet_ros.frame_pipeline import FramePipeline, PipelineOptions
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
    # compressed frames are BGR: the colour mask comes back in the frame's order
    res_b = next(r for k, _, _, r in sink.published if k == "/b")
    palette = segmenter.class_set.palette_array()[:, ::-1]
    np.testing.assert_array_equal(res_b.color, palette[res_b.label])


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


def test_max_age_drops_old_frames_zero_stamps_never_old(segmenter: Segmenter):
    now = 10**12
    pipe, sink, log = make(segmenter, now_ns=now, max_age=0.5)
    pipe.submit("/a", image(1, stamp_ns=now - 2 * 10**9))
    pipe.submit("/b", image(2, stamp_ns=0))
    pipe.step()
    snap = pipe.snapshot()["cameras"]
    assert snap["/a"]["dropped"] == {"too_old": 1}
    assert snap["/b"]["processed"] == 1 and [k for k, *_ in sink.published] == ["/b"]
    assert snap["/b"]["latency_p50_ms"] != snap["/b"]["latency_p50_ms"]  # NaN: a zero stamp gives no latency
    assert any("too_old" in text and "2.000 s old" in text for _, text in log.lines)


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
    """A 16x16 frame is below the network minimum: the batch is retried frame by frame."""
    pipe, sink, log = make(segmenter)
    pipe.submit("/a", image(1, h=16, w=16))
    pipe.submit("/b", image(2))
    pipe.step()
    snap = pipe.snapshot()
    assert snap["cameras"]["/a"]["dropped"] == {"rejected": 1}
    assert [k for k, *_ in sink.published] == ["/b"] and snap["cameras"]["/b"]["processed"] == 1
    assert any("rejected" in text and "below the minimum" in text for _, text in log.lines)


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


def test_batch_timeout_waits_for_the_other_camera(segmenter: Segmenter):
    pipe, sink, _ = make(segmenter, batch_timeout=2.0)
    pipe.submit("/a", image(1))
    threading.Timer(0.2, lambda: pipe.submit("/b", image(2))).start()
    t0 = time.monotonic()
    assert pipe.step() == 2
    assert time.monotonic() - t0 < 2.0  # did not wait for the whole timeout once both were there


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
    pipe.submit("/a", image(3))  # kept pending while stopped
    assert not pipe.idle()
