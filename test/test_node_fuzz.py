"""icnet_node under hostile input: thousands of malformed Image and CompressedImage messages mixed with valid frames
on two cameras, through real DDS (loopback) into a real SegmentationNode with a small real checkpoint.

The node runs in this process (its own rclpy context, executor and worker thread) so that the test can pace the
publisher exactly: the next pair of messages goes out once the node's pipeline has taken the previous ones, so no
message is lost to the newest-frame policy and every count is exact. Checked: the node never dies (its worker keeps
serving), every bad message is counted under its reason on /diagnostics, every valid frame (zero, far-future and
backwards stamps among them) gets its output with the input's header, nothing reaches stderr from the decoders,
warnings are throttled, and memory stays bounded (decompression bombs are refused from their headers).
"""
from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ros_support
from helpers import jpeg_with_size, make_checkpoint, png_with_size
from ros_support import RosHarness, diagnostics_values, image_msg, ros  # noqa: F401 - fixture

ros_support.require_rclpy()

from builtin_interfaces.msg import Time  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from icnet_ros import node_params  # noqa: E402
from icnet_ros.ros_image import MAX_JPEG_SCANS, numpy_to_compressed  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.slow]

CAM_A, CAM_B = "/fuzz_a/image_raw", "/fuzz_b/image_raw/compressed"
H, W = 64, 96  # valid frames (the network minimum is 64)
MAX_PIXELS = 512 * 512
# malformed messages; every variant of every kind (the longest cycle: 15 encodings x 12 kinds = 180 messages)
# comes at least 5 times. Each pair waits for the node to take it over DDS: 2000 took 19-108 s on this 2-core VM
# for the same code, run to run; 1000 halves that
N_IMAGE, N_COMPRESSED = 1000, 500
VALID_EVERY = 8  # one valid frame per this many messages on each camera


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _frame(rng: np.random.Generator, h: int = H, w: int = W) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2] = rng.integers(0, 256, 3)
    img[h // 2:] = rng.integers(0, 256, 3)
    return img


def _png_bomb() -> bytes:
    """A real PNG of 10000 x 10000 black pixels: 100 MB of pixels (300 MB as RGB) in about 100 KB of zlib."""
    row = b"\x00" + bytes(10000)  # filter byte + one grey row
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(10000)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _progressive(img: np.ndarray) -> bytes:
    from PIL import Image as PILImage

    out = io.BytesIO()
    PILImage.fromarray(img).save(out, "JPEG", progressive=True)
    return out.getvalue()


class Cases:
    """Generators of (message, expected drop reason or None for a valid frame), deterministic per seed."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        rng = self.rng
        self.png = numpy_to_compressed(_frame(rng), "RGB", "png")[1]
        self.jpg = numpy_to_compressed(_frame(rng), "RGB", "jpeg")[1]
        self.grey_png = numpy_to_compressed(_frame(rng)[:, :, 0].copy(), codec="png")[1]
        prog = _progressive(_frame(rng))
        sos, eoi = prog.index(b"\xff\xda"), prog.rindex(b"\xff\xd9")
        self.scan_bomb = prog[:eoi] + prog[sos:eoi] * (MAX_JPEG_SCANS + 1) + b"\xff\xd9"
        self.png_bomb = _png_bomb()
        import cv2

        self.png16 = cv2.imencode(".png", rng.integers(0, 65535, (H, W), dtype=np.uint16))[1].tobytes()

    # ------------------------------------------------------------------ sensor_msgs/Image
    def image(self, i: int, stamp: Time) -> tuple[Image, str | None]:
        rng = self.rng
        kind = i % 12
        msg = image_msg(_frame(rng), "rgb8", stamp, frame_id=f"a{i}")
        if kind == 0:  # unknown, Bayer, YUV, 16-bit, float, generic encodings
            msg.encoding = ["yuv422", "yuv422_yuy2", "nv21", "bayer_rggb8", "bayer_grbg16", "mono16", "rgb16",
                            "bgra16", "16UC1", "32FC1", "8UC3", "", "RGB8", "jpeg", "\u00e9\u00e9"][i // 12 % 15]
            return msg, "encoding"
        if kind == 1:  # step smaller than a row
            msg.step = int(rng.integers(0, W * 3))
            return msg, "step"
        if kind == 2:  # data shorter than step x height
            msg.data = bytes(msg.data)[: int(rng.integers(0, H * W * 3 - W * 3))]
            return msg, "truncated"
        if kind == 3:  # zero sizes
            msg.height, msg.width = [(0, 0), (0, W), (H, 0)][i // 12 % 3]
            return msg, "size"
        if kind == 4:  # huge declared sizes with little data: refused before anything is allocated
            msg.height, msg.width = [(100000, 100000), (2**31, 2), (4000, 6000), (4294967295, 4294967295)][i // 12 % 4]
            msg.step = msg.width * 3 if msg.width * 3 < 2**32 else 2**32 - 1
            return msg, "size"
        if kind == 5:  # odd tiny sizes: decodable, below the network minimum
            h, w = [(1, 1), (1, 7), (3, 5), (2, 63), (63, 2)][i // 12 % 5]
            return image_msg(_frame(rng, h, w), "rgb8", stamp, frame_id=f"a{i}"), "rejected"
        if kind == 6:  # 16-bit with the big-endian flag (not segmented)
            m = image_msg(rng.integers(0, 65535, (H, W), dtype=np.uint16), "mono16", stamp)
            m.is_bigendian = 1
            return m, "encoding"
        if kind == 7:  # mono8 with a step that is not a multiple of anything and data one byte short
            m = image_msg(_frame(rng)[:, :, 0].copy(), "mono8", stamp)
            m.step = W + 3
            m.data = bytes((W + 3) * (H - 1) + W - 1)
            return m, "truncated"
        if kind == 8:  # rgba8 whose step covers rgb8 only
            msg.encoding = "rgba8"
            return msg, "step"
        if kind == 9:  # bgr8 declared 2x the size of its data
            msg.encoding = "bgr8"
            msg.height = H * 2
            return msg, "truncated"
        if kind == 10:  # unsupported encoding and a wrong size at once: the encoding is checked first
            msg.encoding, msg.height, msg.width = "bayer_bggr8", 0, 0
            return msg, "encoding"
        msg.data = b""  # empty data for a non-empty image
        return msg, "truncated"

    def valid_image(self, i: int, stamp: Time) -> Image:
        """Valid frames of every supported layout: encodings, row padding, the big-endian flag (meaningless for
        8-bit data), longer data than needed."""
        rng = self.rng
        enc = ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"][i % 5]
        img = _frame(rng)
        if enc == "mono8":
            img = img[:, :, 0].copy()
        elif enc in ("rgba8", "bgra8"):
            img = np.concatenate([img, np.full((H, W, 1), 255, np.uint8)], axis=2)
        msg = image_msg(img, enc, stamp, frame_id=f"va{i}")
        if i % 3 == 1:  # padded rows
            rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(H, -1)
            msg.data = np.concatenate([rows, np.zeros((H, 5), np.uint8)], axis=1).tobytes()
            msg.step += 5
        if i % 4 == 2:
            msg.is_bigendian = 1
        if i % 7 == 3:
            msg.data = bytes(msg.data) + bytes(100)
        return msg

    # ------------------------------------------------------------------ sensor_msgs/CompressedImage
    def compressed(self, i: int, stamp: Time) -> tuple[CompressedImage, str | None]:
        rng = self.rng
        png, jpg = self.png, self.jpg
        kind = i % 14
        fmt, data, reason = "png", png, "decode"
        if kind == 0:
            fmt, reason = ["webp", "16UC1; compressedDepth png", "theora", "bmp"][i // 14 % 4], "encoding"
        elif kind == 1:  # garbage
            fmt, data = "jpeg", rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8).tobytes()
        elif kind == 2:  # truncated
            fmt, data = ("png", png[: int(rng.integers(8, len(png) - 1))]) if i % 2 else \
                ("jpeg", jpg[: int(rng.integers(2, len(jpg) * 3 // 4))])
        elif kind == 3:  # a corrupted byte in the PNG header or data: the CRC check refuses it
            data = bytearray(png)
            pos = int(rng.integers(16, len(png) - 12))
            data[pos] ^= 0x5A
            data = bytes(data)
        elif kind == 4:  # decompression bombs: a header declaring a giant image (CRC valid) or the real thing
            fmt, data = [("png", png_with_size(png, 30000, 30000)), ("jpeg", jpeg_with_size(jpg, 40000, 60000)),
                         ("png", self.png_bomb)][i // 14 % 3]
            reason = "size"
        elif kind == 5:  # empty
            fmt, data, reason = "jpeg", b"", "size"
        elif kind == 6:  # zero size in the header
            fmt, data, reason = ("png", png_with_size(png, 0, W), "size") if i % 2 else \
                ("jpeg", jpeg_with_size(jpg, H, 0), "size")
        elif kind == 7:  # 16-bit PNG (not segmented)
            data, reason = self.png16, "encoding"
        elif kind == 8:  # the format names another codec than the data's
            fmt, data = "png", jpg
        elif kind == 9:  # too many progressive scans
            fmt, data = "jpeg", self.scan_bomb
        elif kind == 10:  # tiny images: decodable, below the network minimum
            fmt, data = "png", numpy_to_compressed(_frame(rng, 3, 4), "RGB", "png")[1]
            reason = "rejected"
        elif kind == 11:  # a well-formed PNG without image data (its IDAT chunks removed)
            start = png.index(b"IDAT") - 4
            end = png.index(b"IEND") - 4
            data = png[:start] + png[end:]
        elif kind == 12:  # JPEG with garbage appended after a truncated scan
            fmt, data = "jpeg", jpg[: len(jpg) // 2] + bytes(range(256))
        else:  # PNG with its IEND and half its data cut, then JPEG bytes appended
            data = png[: len(png) // 2] + jpg
        msg = CompressedImage(format=fmt, data=data)
        msg.header.stamp, msg.header.frame_id = stamp, f"b{i}"
        return msg, reason

    def valid_compressed(self, i: int, stamp: Time) -> CompressedImage:
        img = _frame(self.rng)
        fmt, data = [lambda: numpy_to_compressed(img, "RGB", "jpeg"), lambda: numpy_to_compressed(img, "BGR", "png"),
                     lambda: ("png", self.grey_png), lambda: ("jpeg", _progressive(img)),
                     lambda: ("", numpy_to_compressed(img, "RGB", "jpeg")[1])][i % 5]()
        msg = CompressedImage(format=fmt, data=data)
        msg.header.stamp, msg.header.frame_id = stamp, f"vb{i}"
        return msg


def _stamp(ros: RosHarness, i: int) -> Time:
    """Valid frames' stamps: mostly now, some zero, far in the future, or going backwards."""
    t = ros.now().to_msg()
    kind = i % 6
    if kind == 1:
        return Time()
    if kind == 2:
        t.sec += 10**6
    if kind == 3:
        t.sec -= 1000 + i  # backwards: older than the previous frame's stamp
    return t


def _start_node(checkpoint: Path) -> tuple[Any, Any, Any, threading.Thread]:
    """A SegmentationNode in its own rclpy context, spun by its own executor thread."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from icnet_ros.node import SegmentationNode
    from icnet_ros.ros_spin import spin

    values: dict[str, Any] = {"image_topics": [CAM_A, CAM_B], "model": str(checkpoint), "device": "cpu",
                              "max_age": 0.0, "max_pixels": MAX_PIXELS, "batch_timeout": 0.5,
                              "publish_camera_info": False, "diagnostics_period": 0.2}
    for cam in (CAM_A, CAM_B):  # ROS 2's qos_overrides: reliable input, deep histories (exact counts)
        values.update({f"qos_overrides.{cam}.subscription.reliability": "reliable",
                       f"qos_overrides.{cam}.subscription.depth": 10})
        for kind in node_params.OUTPUT_KINDS:
            values[f"qos_overrides.{node_params.sibling_topic(cam, 'semantic/' + kind)}.publisher.depth"] = 100
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = SegmentationNode(context=ctx, parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])
    if hasattr(node, "trigger_configure") and getattr(node, "pipeline", None) is None:  # a lifecycle node
        node.trigger_configure()
        node.trigger_activate()
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    thread = threading.Thread(target=spin, args=(executor,), daemon=True, name="fuzz_node_executor")
    thread.start()
    return ctx, node, executor, thread


def test_fuzz_two_cameras(ros: RosHarness, tmp_path: Path, capfd: pytest.CaptureFixture):
    import rclpy

    checkpoint = make_checkpoint(tmp_path / "tiny.safetensors")
    cases = Cases(0)
    ctx, node, executor, thread = _start_node(checkpoint)
    qos = RosHarness.qos(reliable=True, depth=100)
    pub_a, pub_b = ros.publisher(Image, CAM_A, qos), ros.publisher(CompressedImage, CAM_B, qos)
    out_a = ros.collect(Image, "/fuzz_a/semantic/label", qos)
    out_b = ros.collect(Image, "/fuzz_b/semantic/label", qos)
    diag = ros_support.Collector()
    diag.subscription = ros.node.create_subscription(DiagnosticArray, "/diagnostics", diag, 10)
    pipeline = node.pipeline
    try:
        for p in (pub_a, pub_b):
            ros.wait_matched(p)
        for c in (out_a, out_b):
            ros.wait_matched(c.subscription)
        ros.wait_until(lambda: all(node.cameras[k].publishers["label"].get_subscription_count() >= 1
                                   for k in (0, 1)), 30, "the node sees the output subscriptions")
        # warm-up: one valid frame per camera (also makes both cameras 'recent', so pairs share batches)
        pub_a.publish(cases.valid_image(0, ros.now().to_msg()))
        pub_b.publish(cases.valid_compressed(0, ros.now().to_msg()))
        assert out_a.wait_for(lambda m: len(m) >= 1, 60) and out_b.wait_for(lambda m: len(m) >= 1, 60)
        base = pipeline.snapshot()["cameras"]
        rss0 = rss_mb()
        capfd.readouterr()  # from here on, stderr must hold only the node's own throttled log lines

        expected = {CAM_A: Counter(), CAM_B: Counter()}
        valid_stamps: dict[str, list[tuple[int, int, str]]] = {CAM_A: [], CAM_B: []}
        sent = {CAM_A: 0, CAM_B: 0}
        ia = ib = va = vb = 0
        rss_peak = rss0
        t0 = time.monotonic()
        while ia < N_IMAGE or ib < N_COMPRESSED:
            # camera A: a malformed Image, or every VALID_EVERY-th message a valid frame
            if ia < N_IMAGE and (ia + va) % VALID_EVERY != VALID_EVERY - 1:
                msg, reason = cases.image(ia, ros.now().to_msg())
                expected[CAM_A][reason] += 1
                ia += 1
            else:
                msg = cases.valid_image(va, _stamp(ros, va))
                valid_stamps[CAM_A].append((msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id))
                va += 1
            pub_a.publish(msg)
            sent[CAM_A] += 1
            # camera B (same batch): a malformed CompressedImage or a valid one, while there are any left
            if ib < N_COMPRESSED:
                if (ib + vb) % VALID_EVERY != VALID_EVERY - 1:
                    cmsg, reason = cases.compressed(ib, ros.now().to_msg())
                    expected[CAM_B][reason] += 1
                    ib += 1
                else:
                    cmsg = cases.valid_compressed(vb, _stamp(ros, vb))
                    valid_stamps[CAM_B].append((cmsg.header.stamp.sec, cmsg.header.stamp.nanosec,
                                                cmsg.header.frame_id))
                    vb += 1
                pub_b.publish(cmsg)
                sent[CAM_B] += 1
            for cam in (CAM_A, CAM_B):  # the next pair goes out once the node took these (exact counts)
                assert pipeline.wait_taken(cam, base[cam]["received"] + sent[cam], 60), \
                    f"{cam}: message {sent[cam]} not taken within 60 s: {pipeline.snapshot()['cameras'][cam]}"
            if (ia + ib) % 200 == 0:
                rss_peak = max(rss_peak, rss_mb())
                assert pipeline.running, f"the node's worker stopped: {pipeline.snapshot()['fatal_error']}"
        elapsed = time.monotonic() - t0
        # every valid frame's output arrives, with the input's header
        for cam, col in ((CAM_A, out_a), (CAM_B, out_b)):
            n = len(valid_stamps[cam]) + 1  # + the warm-up frame
            assert col.wait_for(lambda m, n=n: len(m) >= n, 60), f"{cam}: {len(col.messages)} of {n} outputs"
        time.sleep(0.5)  # a /diagnostics message after the last frame
        t_end = time.monotonic()
        assert diag.wait_for(lambda m: len(m) >= 1, 10)
        rss_end = rss_mb()
        stderr = capfd.readouterr().err
    finally:
        for c in (out_a, out_b, diag):
            ros.node.destroy_subscription(c.subscription)
        ros.node.destroy_publisher(pub_a)
        ros.node.destroy_publisher(pub_b)
        alive = pipeline.running
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
        thread.join(5)
    assert alive, "the node's worker died"
    assert ia == N_IMAGE and ib == N_COMPRESSED and va >= N_IMAGE // VALID_EVERY and vb >= N_COMPRESSED // 8

    # outputs: one per valid frame, headers (stamp and frame_id) exactly the inputs'
    for cam, col in ((CAM_A, out_a), (CAM_B, out_b)):
        got = [(m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id) for m in col.messages[1:]]
        assert got == valid_stamps[cam], cam
        assert all((m.height, m.width, m.encoding) == (H, W, "mono8") for m in col.messages)

    # /diagnostics counts every bad message under its reason (the newest message received after the run)
    msgs = [m for m in diag.messages]
    for cam in (CAM_A, CAM_B):
        values = diagnostics_values(msgs, cam)
        assert values is not None
        before = base[cam]["dropped"]
        for reason, n in expected[cam].items():
            assert int(values.get(f"dropped_{reason}", 0)) - before.get(reason, 0) == n, (cam, reason, values)
        assert int(values["frames_processed"]) - base[cam]["processed"] == len(valid_stamps[cam])
        assert int(values["frames_received"]) - base[cam]["received"] == sent[cam]
        assert "dropped_superseded" not in values and "dropped_inference_error" not in values, values
    assert sum(expected[CAM_A].values()) == N_IMAGE and sum(expected[CAM_B].values()) == N_COMPRESSED
    assert set(expected[CAM_B]) == {"encoding", "decode", "size", "rejected"}

    # nothing from libpng/libjpeg/OpenCV on stderr; the node's warnings are throttled (one per camera and reason
    # every 5 s), not one per bad message
    assert "libpng" not in stderr and "Corrupt JPEG" not in stderr and "imdecode" not in stderr, stderr[-2000:]
    warnings = [line for line in stderr.splitlines() if "dropping frame" in line]
    reasons = len(expected[CAM_A]) + len(expected[CAM_B])
    assert len(warnings) <= reasons * (1 + (t_end - t0) / 5.0) + 10, len(warnings)
    # memory: a few MB, not the GBs the bombs declare
    assert rss_peak - rss0 < 150 and rss_end - rss0 < 150, (rss0, rss_peak, rss_end)
    print(f"fuzz: {N_IMAGE} + {N_COMPRESSED} malformed, {va} + {vb} valid frames in {elapsed:.1f} s; "
          f"A {dict(expected[CAM_A])}, B {dict(expected[CAM_B])}; RSS {rss0:.0f} -> peak {rss_peak:.0f} -> "
          f"{rss_end:.0f} MB; {len(warnings)} warning lines")
