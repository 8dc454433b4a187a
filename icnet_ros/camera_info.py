"""camera_info for the segmentation outputs (ROS-free: works on ``sensor_msgs/CameraInfo`` or any object with its
fields).

:class:`CameraInfoCache` keeps a camera's recent camera_info messages by header stamp, so that each image is paired
with the camera_info taken with it (as image_pipeline's camera subscribers pair them), not with whatever arrived
last. :func:`scale_camera_info` rescales a camera_info for an output image of another size like image_proc's
resize (differences below).

CameraInfo's calibration (``width``, ``height``, ``K``, ``P``, ``roi``) is in full-resolution, unbinned sensor
coordinates; the image a camera delivers is ``roi`` (or the full frame) divided by ``binning``. Resizing that image
by ``s`` (output size / input image size) is described by a sensor ``s`` times the size: K, P (focal lengths,
principal point and the projection's translation), ``width``/``height`` and the ROI scale by ``s``, and binning,
D, R and the distortion model stay. Dividing by ``info.width`` instead of the image's own width would apply the
binning or the ROI twice. Unlike image_proc's resize: the scale is the image's (not ``info.width``'s), ``P[7]``
(Ty = -fy * baseline) scales with fy, sizes and ROI are rounded (not truncated). Like it, the principal point
scales as ``c * s``; the half-pixel-exact value for a bilinear (``align_corners=False``) resize is
``(c + 0.5) * s - 0.5``, within ``0.5 * |s - 1|`` px of it (0.27 px at 480 -> 736).
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from typing import Any

__all__ = ["CameraInfoCache", "camera_info_problem", "image_size", "scale_camera_info", "stamp_ns"]

#: the most distortion coefficients a camera_info may carry: the largest model in use (OpenCV's with the thin prism
#: and tilt terms) has 14; D is copied for every frame's output and kept in the cache
MAX_DISTORTION_COEFFICIENTS = 14
#: the longest distortion model name and header frame_id a cached camera_info may carry (characters)
MAX_NAME_CHARS = 64
MAX_FRAME_ID_CHARS = 1024
#: the largest value of CameraInfo's uint32 fields (width, height, ROI): a scaled one must fit
MAX_UINT32 = 2**32 - 1


def stamp_ns(header: Any) -> int:
    """A header's stamp in nanoseconds."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def image_size(info: Any) -> tuple[int, int]:
    """(height, width) of the images a camera with this camera_info delivers: the ROI (or the full frame) divided
    by the binning. (0, 0) for an uncalibrated camera_info."""
    bx, by = max(int(info.binning_x), 1), max(int(info.binning_y), 1)
    width = int(info.roi.width) or int(info.width)
    height = int(info.roi.height) or int(info.height)
    return height // by, width // bx


_delivered_size = image_size  # (scale_camera_info's argument of that name hides it)


def camera_info_problem(info: Any) -> str | None:
    """Why a camera_info is not kept (None when it is): fields no calibration needs that large. Each is copied to
    every frame's output camera_info and up to :class:`CameraInfoCache`'s capacity are kept (a D of a million
    coefficients: 8 MB a message, gigabytes in the cache, 94 ms more per frame)."""
    if len(info.d) > MAX_DISTORTION_COEFFICIENTS:
        return (f"{len(info.d)} distortion coefficients (D), more than any distortion model has "
                f"({MAX_DISTORTION_COEFFICIENTS})")
    if len(info.distortion_model) > MAX_NAME_CHARS:
        return f"a distortion model name of {len(info.distortion_model)} characters (at most {MAX_NAME_CHARS})"
    frame_id = getattr(getattr(info, "header", None), "frame_id", "")
    if len(frame_id) > MAX_FRAME_ID_CHARS:
        return f"a header frame_id of {len(frame_id)} characters (at most {MAX_FRAME_ID_CHARS})"
    return None


class CameraInfoCache:
    """The camera_info messages of one camera, keyed by stamp (at most ``capacity``, the oldest go first: enough for
    a fast camera while a slow forward pass runs, e.g. 170 Hz for 6 s).

    ``add`` is called from the subscription callback, ``match`` from the worker thread (a lock guards both).
    ``match(stamp)`` returns the camera_info with exactly the image's stamp. A camera_info with a zero stamp
    describes every frame (a static calibration publisher, which must publish it repeatedly: the node subscribes
    with sensor-data QoS, volatile, like image_transport's CameraSubscriber, so a camera_info published once with
    transient-local durability is not received): the newest such one serves images whose stamp has no
    camera_info of its own. Otherwise there is no match: the caller publishes no camera_info for that frame rather
    than one taken at another time (image_pipeline pairs exactly, too).

    A camera_info may also arrive after its image (a driver that publishes the image first, DDS reordering the two
    topics): ``match(stamp, waiting=item)`` then keeps ``item`` (what the caller needs to publish it later) for the
    last ``pending`` unmatched frames, and ``add`` returns the items its camera_info completes, as a time
    synchroniser with a queue of ``pending`` pairs them. A frame pushed out of that queue gave up: ``unmatched``
    counts them, ``unmatched_gap_ns`` is the last one's stamp minus the nearest camera_info's (a driver that stamps
    its camera_info apart from its image: image_transport's CameraSubscriber warns of it too), and
    ``last_matched`` says whether the newest frame settled was matched (None before any)."""

    def __init__(self, capacity: int = 1024, pending: int = 10) -> None:
        if capacity < 1 or pending < 0:
            raise ValueError("capacity must be >= 1 and pending >= 0")
        self.capacity = capacity
        self.pending = pending
        self._by_stamp: OrderedDict[int, Any] = OrderedDict()
        self._waiting: deque[tuple[int, Any]] = deque(maxlen=pending)  # (stamp, the caller's item), oldest first
        self._static: Any | None = None
        self._lock = threading.Lock()
        self.received = 0
        self.unmatched = 0
        self.unmatched_gap_ns: int | None = None
        self.last_matched: bool | None = None

    def add(self, info: Any) -> list[tuple[Any, Any]]:
        """Keep ``info``; returns ``(info, item)`` for each waiting frame it describes (its stamp, or every waiting
        frame for a zero-stamped camera_info), which stop waiting."""
        stamp = stamp_ns(info.header)
        with self._lock:
            self.received += 1
            if stamp == 0:
                self._static = info
                done = [item for _, item in self._waiting]
                self._waiting.clear()
                return [(info, item) for item in done]
            self._by_stamp[stamp] = info
            self._by_stamp.move_to_end(stamp)
            while len(self._by_stamp) > self.capacity:
                self._by_stamp.popitem(last=False)
            done = [item for s, item in self._waiting if s == stamp]  # two frames may share a stamp
            if done:
                self._waiting = deque(((s, it) for s, it in self._waiting if s != stamp), maxlen=self.pending)
                self.last_matched = True
            return [(info, item) for item in done]

    def match(self, stamp: int, waiting: Any = None) -> Any | None:
        """The camera_info for an image stamped ``stamp`` (ns), or None; then ``waiting`` (when given) waits for
        it (see the class docstring)."""
        with self._lock:
            info = self._by_stamp.get(stamp)
            if info is None:
                info = self._static
            if info is not None:
                self.last_matched = True
            elif waiting is not None and self.pending > 0:
                if len(self._waiting) == self.pending:  # the oldest gives up
                    self._gave_up(self._waiting[0][0])
                self._waiting.append((stamp, waiting))
            elif waiting is not None:
                self._gave_up(stamp)
            return info

    def _gave_up(self, stamp: int) -> None:
        """Under the lock: a frame stamped ``stamp`` will have no camera_info."""
        self.unmatched += 1
        self.last_matched = False
        nearest = min(self._by_stamp, key=lambda s: abs(stamp - s), default=None)  # (only when a frame gives up)
        self.unmatched_gap_ns = None if nearest is None else stamp - nearest

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_stamp) + (self._static is not None)


def _copy_calibration(info: Any, out: Any) -> Any:
    out.width, out.height = int(info.width), int(info.height)
    out.distortion_model = info.distortion_model
    out.d = [float(v) for v in info.d]
    out.k = [float(v) for v in info.k]
    out.r = [float(v) for v in info.r]
    out.p = [float(v) for v in info.p]
    out.binning_x, out.binning_y = int(info.binning_x), int(info.binning_y)
    roi_in, roi = info.roi, out.roi
    roi.x_offset, roi.y_offset = int(roi_in.x_offset), int(roi_in.y_offset)
    roi.width, roi.height = int(roi_in.width), int(roi_in.height)
    roi.do_rectify = bool(roi_in.do_rectify)
    return out


def _round(v: float) -> int:
    return int(math.floor(v + 0.5))  # halves up, as the network sizes round (Python's round: halves to even)


def _scaled_axis(full: int, offset: int, size: int, binning: int, s: float, out_len: int | None
                 ) -> tuple[int, int, int, float]:
    """One axis of a scaled calibration: (sensor size, ROI offset, ROI size, principal point shift). With
    ``out_len`` (the info describes the input image exactly), the ROI (or, without one, the sensor) keeps exactly
    ``out_len`` delivered pixels after the division by the binning, whatever the rounding of a remainder that the
    binning drops; the rounding of the offset moves the principal point with it, so points still project exactly."""
    b = max(int(binning), 1)
    span = _round((size or full) * s)
    if out_len is not None:
        span = min(max(span, out_len * b), out_len * b + b - 1)
    exact_offset = offset * s
    new_offset = _round(exact_offset)
    if not size:  # no ROI on this axis: the sensor is the image
        return span, new_offset, 0, new_offset - exact_offset
    return max(_round(full * s), new_offset + span), new_offset, span, new_offset - exact_offset


def scale_camera_info(info: Any, image_size: tuple[int, int], output_size: tuple[int, int], out: Any) -> Any:
    """Fill ``out`` with ``info`` (the camera_info of an image of ``image_size`` = (height, width)) for the same
    image resized to ``output_size`` (height, width), like image_proc's resize (see the module docstring); the
    header is left to the caller. At equal sizes the calibration passes through unchanged.

    The scale is the image size ratio (not ``output / info.width``): K and P (fx, skew, cx, Tx by the x ratio;
    fy, cy, Ty by the y ratio), ``width``/``height`` and the ROI scale; binning, D, R and the distortion model stay.
    When ``info`` describes an image of ``image_size``, the scaled one describes one of ``output_size`` exactly
    (sizes whose binning remainder would round into one more pixel are held), and ROI offsets, which are integers,
    shift the principal point by their rounding. An uncalibrated camera_info (width or height 0) stays
    uncalibrated."""
    (in_h, in_w), (out_h, out_w) = image_size, output_size
    if in_h <= 0 or in_w <= 0 or out_h <= 0 or out_w <= 0:
        raise ValueError(f"image sizes must be positive, got {image_size} -> {output_size}")
    _copy_calibration(info, out)
    if (in_h, in_w) == (out_h, out_w):
        return out
    sx, sy = out_w / in_w, out_h / in_h
    exact = _delivered_size(info) == (in_h, in_w)  # (an uncalibrated info: (0, 0), never)
    roi = out.roi
    out.width, roi.x_offset, roi.width, shift_x = _scaled_axis(
        info.width, roi.x_offset, roi.width, info.binning_x, sx, out_w if exact else None)
    out.height, roi.y_offset, roi.height, shift_y = _scaled_axis(
        info.height, roi.y_offset, roi.height, info.binning_y, sy, out_h if exact else None)
    k = out.k
    k[0], k[1], k[2], k[4], k[5] = k[0] * sx, k[1] * sx, k[2] * sx + shift_x, k[4] * sy, k[5] * sy + shift_y
    out.k = k
    p = out.p
    p[0], p[1], p[2], p[3] = p[0] * sx, p[1] * sx, p[2] * sx + shift_x, p[3] * sx
    p[5], p[6], p[7] = p[5] * sy, p[6] * sy + shift_y, p[7] * sy
    out.p = p
    too_large = [v for v in (out.width, out.height, roi.x_offset, roi.y_offset, roi.width, roi.height)
                 if v > MAX_UINT32]
    if too_large:  # rclpy takes it, DDS sends it modulo 2**32: a wrong calibration, not an error, downstream
        raise ValueError(f"the scaled camera_info does not fit its uint32 fields ({too_large[0]} for "
                         f"{in_w}x{in_h} -> {out_w}x{out_h}, width {info.width}, height {info.height})")
    return out
