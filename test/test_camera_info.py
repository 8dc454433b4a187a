"""icnet_ros.camera_info: pairing camera_info with images by stamp, and scaling it as image_proc's resize does.

The scaling is checked by what a camera_info means (CameraInfo.msg): a 3D point projected with the effective
intrinsics of the delivered image (K in full-resolution sensor coordinates, minus the ROI offset, divided by the
binning) must land at the same place, times the resize factor, before and after scaling."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from icnet_ros.camera_info import CameraInfoCache, camera_info_problem, image_size, scale_camera_info, stamp_ns


def info(width=640, height=480, fx=500.0, fy=510.0, cx=320.5, cy=240.5, tx=-25.0, binning=(0, 0),
         roi=(0, 0, 0, 0), stamp=(0, 0)):
    return SimpleNamespace(
        header=SimpleNamespace(stamp=SimpleNamespace(sec=stamp[0], nanosec=stamp[1]), frame_id="cam"),
        width=width, height=height, distortion_model="plumb_bob", d=[0.1, -0.2, 0.001, 0.002, 0.0],
        k=[fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0], r=[1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
        p=[fx, 0.0, cx, tx, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0],
        binning_x=binning[0], binning_y=binning[1],
        roi=SimpleNamespace(x_offset=roi[0], y_offset=roi[1], width=roi[2], height=roi[3], do_rectify=False))


def empty():
    return SimpleNamespace(roi=SimpleNamespace())


def delivered_size(ci):
    """The size (h, w) of the image a camera with this camera_info delivers."""
    bx, by = max(ci.binning_x, 1), max(ci.binning_y, 1)
    w = ci.roi.width or ci.width
    h = ci.roi.height or ci.height
    return h // by, w // bx


def project(ci, point):
    """Pixel (u, v) of a 3D point in the delivered image (image_geometry's K adjusted for binning and ROI)."""
    bx, by = max(ci.binning_x, 1), max(ci.binning_y, 1)
    fx, cx, fy, cy = ci.k[0], ci.k[2], ci.k[4], ci.k[5]
    x, y, z = point
    u_full, v_full = fx * x / z + cx, fy * y / z + cy
    return np.array([(u_full - ci.roi.x_offset) / bx, (v_full - ci.roi.y_offset) / by])


@pytest.mark.parametrize("binning,roi", [((0, 0), (0, 0, 0, 0)), ((2, 2), (0, 0, 0, 0)), ((1, 2), (0, 0, 0, 0)),
                                         ((0, 0), (100, 40, 320, 240)), ((2, 2), (64, 32, 512, 384))])
@pytest.mark.parametrize("factor", [0.5, 1.5, (0.25, 0.75)])
def test_scaled_camera_info_projects_like_the_resized_image(binning, roi, factor):
    src = info(binning=binning, roi=roi)
    in_h, in_w = delivered_size(src)
    fy_, fx_ = (factor, factor) if isinstance(factor, float) else factor
    out_h, out_w = round(in_h * fy_), round(in_w * fx_)
    out = scale_camera_info(src, (in_h, in_w), (out_h, out_w), empty())
    sx, sy = out_w / in_w, out_h / in_h
    assert delivered_size(out) == (out_h, out_w)  # the scaled info describes the output image's size
    for point in ((0.0, 0.0, 2.0), (0.4, -0.3, 1.5), (-1.0, 0.5, 4.0)):
        np.testing.assert_allclose(project(out, point), project(src, point) * [sx, sy], rtol=1e-9, atol=1e-9)
    assert (out.binning_x, out.binning_y) == binning  # binning stays, as image_proc's resize keeps it
    assert out.d == src.d and out.r == src.r and out.distortion_model == src.distortion_model
    assert out.p[3] == pytest.approx(src.p[3] * sx)  # the projection's translation (stereo baseline * fx)


def test_binned_camera_is_not_scaled_twice():
    """A 2x2-binned 640x480 sensor delivers 320x240 images; the label at 160x120 halves them. The old scaling by
    output / info.width gave fx 125 (a quarter), which binning then halved again."""
    src = info(binning=(2, 2))
    out = scale_camera_info(src, (240, 320), (120, 160), empty())
    assert out.k[0] == pytest.approx(250.0) and (out.width, out.height) == (320, 240)


def test_same_size_passes_through_unchanged():
    src = info(binning=(2, 1), roi=(10, 20, 300, 200))
    out = scale_camera_info(src, (200, 150), (200, 150), empty())
    for field in ("width", "height", "distortion_model", "d", "k", "r", "p", "binning_x", "binning_y"):
        assert getattr(out, field) == getattr(src, field), field
    assert vars(out.roi) == vars(src.roi)


def test_uncalibrated_stays_uncalibrated():
    src = info(width=0, height=0, fx=0.0, fy=0.0, cx=0.0, cy=0.0, tx=0.0)
    out = scale_camera_info(src, (480, 640), (240, 320), empty())
    assert (out.width, out.height) == (0, 0) and not any(out.k[:8])
    with pytest.raises(ValueError, match="positive"):
        scale_camera_info(src, (0, 640), (240, 320), empty())


def test_real_camera_info_message():
    pytest.importorskip("sensor_msgs")
    from sensor_msgs.msg import CameraInfo

    src = CameraInfo(width=640, height=480, distortion_model="plumb_bob", d=[0.1, 0.0, 0.0, 0.0, 0.0],
                     k=[500.0, 0, 320.0, 0, 500.0, 240.0, 0, 0, 1], p=[500.0, 0, 320.0, 0, 0, 500.0, 240.0, 0, 0, 0, 1,
                                                                        0], binning_x=2, binning_y=2)
    out = scale_camera_info(src, (240, 320), (360, 480), CameraInfo())
    assert (out.width, out.height) == (960, 720) and out.binning_x == 2
    np.testing.assert_allclose(out.k, [750.0, 0, 480.0, 0, 750.0, 360.0, 0, 0, 1])
    np.testing.assert_allclose(out.p[:3], [750.0, 0, 480.0])


def test_a_scaled_size_beyond_uint32_is_refused_not_wrapped():
    """A hostile (or broken) camera_info of 3e9 px width, its image upscaled 2x (output_size model with a network
    input larger than the frame): the scaled width 6e9 was set on the message, which rclpy accepts and DDS delivers
    modulo 2**32 (1705032704): a wrong calibration downstream. Now a ValueError (the node warns and publishes the
    frame's outputs without that camera_info)."""
    pytest.importorskip("sensor_msgs")
    from sensor_msgs.msg import CameraInfo

    src = CameraInfo(width=3_000_000_000, height=480, k=[500.0, 0, 320.0, 0, 500.0, 240.0, 0, 0, 1])
    with pytest.raises(ValueError, match=r"^the scaled camera_info does not fit its uint32 fields \(6000000000 "):
        scale_camera_info(src, (480, 640), (960, 1280), CameraInfo())
    src.roi.x_offset = 3_000_000_000  # an ROI offset likewise
    src.width = 640
    with pytest.raises(ValueError, match="does not fit"):
        scale_camera_info(src, (480, 640), (960, 1280), CameraInfo())
    src.roi.x_offset = 0
    assert scale_camera_info(src, (480, 640), (960, 1280), CameraInfo()).width == 1280


def test_cache_pairs_by_stamp():
    cache = CameraInfoCache(capacity=3)
    msgs = [info(fx=100.0 + i, stamp=(10, i)) for i in range(5)]
    for m in msgs:
        cache.add(m)
    assert len(cache) == 3 and cache.received == 5
    assert cache.match(stamp_ns(msgs[3].header)) is msgs[3]  # not the newest one
    assert cache.match(stamp_ns(msgs[4].header)) is msgs[4]
    assert cache.match(stamp_ns(msgs[0].header)) is None  # evicted: no camera_info from another time
    assert cache.match(123) is None
    static = info(fx=42.0, stamp=(0, 0))  # a zero stamp: a calibration that holds for every frame
    cache.add(static)
    assert cache.match(123) is static and cache.match(stamp_ns(msgs[4].header)) is msgs[4]
    with pytest.raises(ValueError):
        CameraInfoCache(capacity=0)


def test_a_camera_info_after_its_image_completes_the_waiting_frame():
    cache = CameraInfoCache(capacity=8, pending=2)
    msgs = [info(fx=100.0 + i, stamp=(20, i)) for i in range(4)]
    for i, m in enumerate(msgs[:3]):  # three frames served before their camera_info: the last 2 wait
        assert cache.match(stamp_ns(m.header), waiting=f"frame{i}") is None
    assert cache.add(msgs[0]) == []  # its frame stopped waiting (pending=2)
    assert cache.add(msgs[2]) == [(msgs[2], "frame2")]
    assert cache.add(msgs[2]) == []  # completed once
    assert cache.match(stamp_ns(msgs[3].header)) is None and cache.add(msgs[3]) == []  # match() alone never waits
    static = info(fx=42.0, stamp=(0, 0))
    assert cache.add(static) == [(static, "frame1")]  # a zero-stamped camera_info completes every waiting frame
    assert cache.match(999, waiting="x") is static and cache.add(msgs[1]) == []
    assert CameraInfoCache(pending=0).match(5, waiting="x") is None
    fast = CameraInfoCache()  # 170 Hz during a 1 s forward pass: the frame's camera_info is still there
    first = info(stamp=(3, 0))
    fast.add(first)
    for i in range(1, 170):
        fast.add(info(stamp=(3, i)))
    assert fast.match(stamp_ns(first.header)) is first
    same = CameraInfoCache(pending=3)  # two frames with one stamp both get it (the second replaced the first)
    for item in ("a", "b", "c", "d"):
        same.match(7, waiting=item)
    late = info(stamp=(0, 7))
    assert same.add(late) == [(late, "b"), (late, "c"), (late, "d")]  # the oldest beyond pending=3 gave up


def test_the_cache_counts_frames_that_found_no_camera_info_and_by_how_much():
    """A driver that stamps its camera_info apart from its image (1 ms later here) gave no camera_info output and
    no word of why: the frames that give up waiting are counted with the gap to the newest camera_info."""
    cache = CameraInfoCache(pending=2)
    assert (cache.unmatched, cache.last_matched) == (0, None)
    for i in range(5):
        cache.add(info(stamp=(10, i * 100_000_000 + 1_000_000)))  # camera_info 1 ms after each frame
        assert cache.match(10 * 10**9 + i * 100_000_000, waiting=i) is None
    assert cache.unmatched == 3 and cache.last_matched is False  # frames 0-2 gave up (2 still wait)
    assert cache.unmatched_gap_ns == -1_000_000  # frame 2 vs the nearest camera_info, 1 ms after it
    late = info(stamp=(10, 4 * 100_000_000))
    assert cache.add(late) == [(late, 4)] and cache.last_matched is True and cache.unmatched == 3
    alone = CameraInfoCache(pending=0)  # nothing waits: a frame without its camera_info gives up at once
    assert alone.match(5, waiting="x") is None and alone.unmatched == 1 and alone.unmatched_gap_ns is None
    assert alone.match(5) is None and alone.unmatched == 1  # match() alone (no frame to publish) counts nothing


def test_cache_is_thread_safe():
    cache = CameraInfoCache(capacity=8)
    errors = []

    def writer():
        for i in range(2000):
            cache.add(info(stamp=(1, i)))

    def reader():
        try:
            for i in range(2000):
                m = cache.match(1_000_000_000 + i)
                assert m is None or stamp_ns(m.header) == 1_000_000_000 + i
        except AssertionError as e:
            errors.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(cache) == 8


def test_odd_sizes_binning_and_roi_offsets_still_describe_and_project_exactly():
    """Sizes, ROI sizes and offsets were each rounded on their own before the binning's division: a 961-px-wide
    ROI with 2x2 binning (480 delivered) scaled to a 736-wide label described 737 px; 30 of 112 sensor / binning /
    ROI combinations described another size; an ROI offset of 101 at x1.5 moved projections by 0.5 px; the skew
    was not scaled. Now every combination describes the output image and projects into it exactly."""
    def project_skewed(ci, point):
        bx, by = max(ci.binning_x, 1), max(ci.binning_y, 1)
        x, y, z = point
        u_full = ci.k[0] * x / z + ci.k[1] * y / z + ci.k[2]
        v_full = ci.k[4] * y / z + ci.k[5]
        return np.array([(u_full - ci.roi.x_offset) / bx, (v_full - ci.roi.y_offset) / by])

    checked = 0
    for width, height in ((1280, 960), (1281, 961), (1285, 963), (640, 480)):
        for b in (0, 1, 2, 3, 4):
            for roi in ((0, 0, 0, 0), (101, 51, 640, 480), (0, 0, 961, 721), (max(width - 645, 0), 1, 645, 477)):
                src = info(width=width, height=height, binning=(b, b), roi=roi)
                src.k[1] = src.p[1] = 2.0
                in_h, in_w = delivered_size(src)
                for out_h, out_w in ((544, 736), (in_h * 3 // 2, in_w * 3 // 2), (in_h // 3, in_w // 3)):
                    out = scale_camera_info(src, (in_h, in_w), (out_h, out_w), empty())
                    assert delivered_size(out) == (out_h, out_w), (width, b, roi, out_h, out_w)
                    assert out.roi.x_offset + out.roi.width <= out.width
                    assert out.roi.y_offset + out.roi.height <= out.height
                    for point in ((0.0, 0.0, 2.0), (0.4, -0.3, 1.5), (-1.0, 0.5, 4.0)):
                        np.testing.assert_allclose(project_skewed(out, point),
                                                   project_skewed(src, point) * [out_w / in_w, out_h / in_h],
                                                   rtol=1e-9, atol=1e-9)
                    checked += 1
    assert checked == 4 * 5 * 4 * 3


def test_fields_no_calibration_needs_that_large_are_a_problem():
    assert camera_info_problem(info()) is None
    src = info()
    src.d = [0.0] * 14  # OpenCV's largest model (thin prism + tilt)
    assert camera_info_problem(src) is None
    src.d = [0.0] * 15
    assert camera_info_problem(src) == "15 distortion coefficients (D), more than any distortion model has (14)"
    src = info()
    src.distortion_model = "m" * 65
    assert "distortion model name of 65 characters" in camera_info_problem(src)
    src = info()
    src.header.frame_id = "f" * 1025
    assert "frame_id of 1025 characters" in camera_info_problem(src)


def stereo_info(width=1281, height=961, binning=(2, 2), roi=(101, 51, 961, 721)):
    """A rectified camera of a stereo rig: P with skew, Tx and Ty (a vertical baseline); odd ROI offsets."""
    fx, fy, cx, cy = 500.0, 510.0, 320.5, 240.5
    return SimpleNamespace(
        header=SimpleNamespace(stamp=SimpleNamespace(sec=0, nanosec=0), frame_id="cam"),
        width=width, height=height, distortion_model="plumb_bob", d=[0.0] * 5,
        k=[fx, 2.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0], r=[1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
        # a rectified stereo camera: skew, Tx = -fx' * baseline_x, Ty = -fy' * baseline_y (vertical rig)
        p=[fx + 3, 2.0, cx + 1, -25.0, 0.0, fy + 4, cy - 2, -17.0, 0.0, 0.0, 1.0, 0.0],
        binning_x=binning[0], binning_y=binning[1],
        roi=SimpleNamespace(x_offset=roi[0], y_offset=roi[1], width=roi[2], height=roi[3], do_rectify=False))


def project_p(ci, point):
    """Pixel of a 3D point (rectified camera frame) in the delivered image, through P (3x4), ROI and binning."""
    P = np.array(ci.p, float).reshape(3, 4)
    u, v, w = P @ np.array([*point, 1.0])
    bx, by = max(ci.binning_x, 1), max(ci.binning_y, 1)
    return np.array([(u / w - ci.roi.x_offset) / bx, (v / w - ci.roi.y_offset) / by])


@pytest.mark.parametrize("binning,roi", [((2, 2), (101, 51, 961, 721)), ((1, 1), (0, 0, 0, 0)),
                                         ((2, 1), (101, 51, 961, 721))])
@pytest.mark.parametrize("out", [(352, 480), (544, 736), (160, 600)])
def test_projection_matrix_projects_like_the_resized_image(binning, roi, out):
    """P (used on rectified images) scaled per axis, with its ROI rounding shift: x and y scales differ in the node's
    usual case (360x480 labelled at 352x480)."""
    src = stereo_info(binning=binning, roi=roi)
    in_size = image_size(src)
    dst = scale_camera_info(src, in_size, out, SimpleNamespace(roi=SimpleNamespace()))
    sx, sy = out[1] / in_size[1], out[0] / in_size[0]
    for point in ((0.0, 0.0, 2.0), (0.4, -0.3, 1.5), (-1.0, 0.5, 4.0)):
        np.testing.assert_allclose(project_p(dst, point), project_p(src, point) * [sx, sy], rtol=1e-9, atol=1e-9)


def test_image_size_divides_each_axis_by_its_own_binning():
    assert image_size(stereo_info(width=640, height=480, binning=(1, 2), roi=(0, 0, 0, 0))) == (240, 640)
    assert image_size(stereo_info(width=640, height=480, binning=(2, 1), roi=(0, 0, 0, 0))) == (480, 320)
    assert image_size(stereo_info(binning=(2, 1), roi=(101, 51, 961, 721))) == (721, 480)
    assert image_size(stereo_info(width=0, height=0, binning=(0, 0), roi=(0, 0, 0, 0))) == (0, 0)
    # 961-wide ROI, 2x1 binning: 480 delivered columns; scaled to 736 it must describe 736, not 737
    src = stereo_info(binning=(2, 1), roi=(101, 51, 961, 721))
    dst = scale_camera_info(src, (721, 480), (544, 736), SimpleNamespace(roi=SimpleNamespace()))
    assert image_size(dst) == (544, 736)
