"""ROS-free image codecs: ``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage`` fields <-> numpy.

Works on any object with the message's fields (``height``, ``width``, ``encoding``, ``is_bigendian``, ``step``,
``data``; ``format`` and ``data`` for compressed images), so it is tested and usable without rclpy. No rclpy import.

Decoding is zero-copy: :func:`image_to_numpy` returns a strided view onto ``msg.data`` that honours ``step`` (row
padding) and ``is_bigendian`` (multi-byte encodings). Every malformed message raises :class:`ImageFormatError`,
whose ``reason`` is a short stable key (``encoding``, ``size``, ``step``, ``truncated``, ``decode``) that callers use to
count dropped frames.
"""
from __future__ import annotations

import array
import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ImageFormatError", "PixelFormat", "SEGMENTER_ENCODINGS", "compressed_to_numpy", "compression_format",
           "image_to_numpy", "numpy_to_compressed", "numpy_to_image", "pixel_format", "scale_camera_info",
           "segmenter_frame", "segmenter_input", "set_image_data"]


class ImageFormatError(ValueError):
    """A message that cannot be turned into an image. ``reason`` is one of ``encoding``, ``size``, ``step``,
    ``truncated``, ``decode``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PixelFormat:
    """Layout of one ``sensor_msgs/Image`` encoding: element type, channels per pixel, channel order."""

    dtype: np.dtype
    channels: int
    order: str  # "RGB", "BGR", "RGBA", "BGRA", "MONO" or "" (generic nUCk encodings: order unknown)

    @property
    def pixel_bytes(self) -> int:
        return self.dtype.itemsize * self.channels


_NAMED: dict[str, tuple[str, int, str]] = {
    "rgb8": ("u1", 3, "RGB"), "rgba8": ("u1", 4, "RGBA"), "rgb16": ("u2", 3, "RGB"), "rgba16": ("u2", 4, "RGBA"),
    "bgr8": ("u1", 3, "BGR"), "bgra8": ("u1", 4, "BGRA"), "bgr16": ("u2", 3, "BGR"), "bgra16": ("u2", 4, "BGRA"),
    "mono8": ("u1", 1, "MONO"), "mono16": ("u2", 1, "MONO"),
}
_GENERIC = re.compile(r"^(8U|8S|16U|16S|32S|32F|64F)(?:C([1-4]))?$")
_GENERIC_DTYPES = {"8U": "u1", "8S": "i1", "16U": "u2", "16S": "i2", "32S": "i4", "32F": "f4", "64F": "f8"}

# The encodings the Segmenter takes directly (8-bit colour or grey), and the channel order passed to it.
# Alpha is dropped by a strided view (no copy); grey frames are handled by the Segmenter itself.
SEGMENTER_ENCODINGS: dict[str, str] = {"rgb8": "RGB", "rgba8": "RGB", "bgr8": "BGR", "bgra8": "BGR",
                                       "mono8": "RGB"}


def pixel_format(encoding: str) -> PixelFormat:
    """The layout of a ``sensor_msgs/image_encodings`` name (named colour/mono encodings and ``{8U..64F}C{1..4}``).

    Raises :class:`ImageFormatError` (reason ``encoding``) for Bayer, YUV and unknown encodings."""
    if encoding in _NAMED:
        code, channels, order = _NAMED[encoding]
        return PixelFormat(np.dtype(code), channels, order)
    m = _GENERIC.match(encoding or "")
    if m:
        return PixelFormat(np.dtype(_GENERIC_DTYPES[m.group(1)]), int(m.group(2) or 1), "")
    raise ImageFormatError("encoding", f"unsupported image encoding {encoding!r} (supported: "
                                       f"{', '.join(_NAMED)} and 8U/8S/16U/16S/32S/32F/64F with C1-C4)")


def _buffer(data: Any) -> np.ndarray:
    """``data`` as a flat uint8 array; zero-copy for anything with the buffer protocol (array.array, bytes, ...)."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:  # a plain sequence of ints (e.g. a hand-built message): one unavoidable copy
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def image_to_numpy(msg: Any) -> np.ndarray:
    """A zero-copy view of a ``sensor_msgs/Image``: H x W for one channel, else H x W x C.

    The view honours ``step`` (rows may be padded) and ``is_bigendian`` (the dtype carries the message's byte order
    for multi-byte encodings). It shares memory with ``msg.data``: copy it if the message is reused.
    """
    fmt = pixel_format(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageFormatError("size", f"empty image ({width}x{height}, encoding {msg.encoding})")
    row_bytes = width * fmt.pixel_bytes
    if step < row_bytes:
        raise ImageFormatError("step", f"step {step} is smaller than one row ({width} px x {fmt.pixel_bytes} "
                                       f"bytes = {row_bytes}) for {msg.encoding}")
    buf = _buffer(msg.data)
    needed = step * (height - 1) + row_bytes  # the last row's padding may be absent
    if buf.size < needed:
        raise ImageFormatError("truncated", f"data has {buf.size} bytes, a {width}x{height} {msg.encoding} image "
                                            f"with step {step} needs {step * height}")
    dtype = fmt.dtype
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if msg.is_bigendian else "<")
    isz = dtype.itemsize
    if fmt.channels == 1:
        return np.ndarray((height, width), dtype=dtype, buffer=buf, strides=(step, isz))
    return np.ndarray((height, width, fmt.channels), dtype=dtype, buffer=buf,
                      strides=(step, fmt.channels * isz, isz))


def segmenter_input(msg: Any) -> tuple[np.ndarray, str]:
    """A frame for :meth:`Segmenter.segment` from an 8-bit ``sensor_msgs/Image``, without copying pixels.

    Returns ``(frame, channel_order)``: H x W x 3 (alpha dropped by a strided view) or H x W (mono8), and "RGB" or
    "BGR". Any other encoding raises :class:`ImageFormatError` (reason ``encoding``)."""
    order = SEGMENTER_ENCODINGS.get(msg.encoding)
    if order is None:
        raise ImageFormatError("encoding", f"unsupported image encoding {msg.encoding!r} for segmentation "
                                           f"(supported: {', '.join(SEGMENTER_ENCODINGS)})")
    img = image_to_numpy(msg)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    return img, order


def segmenter_frame(msg: Any, compressed: bool) -> tuple[np.ndarray, str]:
    """``(frame, channel_order)`` for :meth:`Segmenter.segment` from a ``sensor_msgs/Image`` (``compressed``
    False, see :func:`segmenter_input`) or a ``sensor_msgs/CompressedImage`` (8-bit jpeg/png; grey frames are
    passed as "RGB", the Segmenter replicates them). Raises :class:`ImageFormatError`."""
    if not compressed:
        return segmenter_input(msg)
    img, order = compressed_to_numpy(msg)
    if img.dtype != np.uint8:
        raise ImageFormatError("encoding", f"{img.dtype} CompressedImage (only 8-bit images are segmented)")
    return img, ("RGB" if order == "MONO" else order)


def set_image_data(msg: Any, data: np.ndarray) -> None:
    """Store a C-contiguous array as ``msg.data`` with as few copies as possible.

    rclpy's generated setter turns anything but ``bytes`` into ``array.array`` element by element (slow for
    megapixel images); its C converter, however, accepts any buffer. For rclpy messages (``_data`` slot holding an
    ``array.array``) the array is therefore stored directly and copied once, at publish time, into the C message.
    Other objects get ``bytes``."""
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if isinstance(getattr(msg, "_data", None), array.array):
        msg._data = flat  # noqa: SLF001 - documented fast path, see above
    else:
        msg.data = flat.tobytes()


def numpy_to_image(img: np.ndarray, encoding: str, msg: Any) -> Any:
    """Fill ``msg`` (a ``sensor_msgs/Image`` or any object with its fields) with ``img`` and return it.

    ``img`` is H x W or H x W x C with the dtype and channel count of ``encoding``; non-contiguous arrays are
    copied once. ``is_bigendian`` follows the array's byte order. The header is left to the caller."""
    fmt = pixel_format(encoding)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] != fmt.channels:
        raise ValueError(f"array of shape {img.shape} does not match encoding {encoding} ({fmt.channels} channels)")
    if img.dtype.kind != fmt.dtype.kind or img.dtype.itemsize != fmt.dtype.itemsize:
        raise ValueError(f"array dtype {img.dtype} does not match encoding {encoding} ({fmt.dtype})")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"empty image {img.shape}")
    img = np.ascontiguousarray(img)
    order = img.dtype.byteorder
    big = img.dtype.itemsize > 1 and (order == ">" or (order == "=" and sys.byteorder == "big"))
    msg.height, msg.width = int(img.shape[0]), int(img.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 1 if big else 0
    msg.step = int(img.shape[1] * fmt.pixel_bytes)
    set_image_data(msg, img)
    return msg


def compression_format(fmt: str) -> str:
    """The codec of a ``CompressedImage.format``: "jpeg", "png" or "" (unspecified: detect from the bytes).

    Accepts image_transport's ``"<enc>; jpeg compressed <enc>"`` and plain ``"jpeg"``/``"jpg"``/``"png"``.
    Raises :class:`ImageFormatError` (reason ``encoding``) for other codecs (compressedDepth, theora, ...)."""
    text = (fmt or "").strip().lower()
    codec_part = text.split(";", 1)[1] if ";" in text else text
    if "compresseddepth" in text.replace(" ", ""):
        raise ImageFormatError("encoding", f"unsupported CompressedImage format {fmt!r} (compressedDepth)")
    words = codec_part.replace(",", " ").split()
    for w in words:
        if w in ("jpeg", "jpg"):
            return "jpeg"
        if w == "png":
            return "png"
    if not words:
        return ""
    raise ImageFormatError("encoding", f"unsupported CompressedImage format {fmt!r} (supported: jpeg, png)")


def compressed_to_numpy(msg: Any) -> tuple[np.ndarray, str]:
    """Decode a ``sensor_msgs/CompressedImage`` (jpeg or png) with OpenCV.

    Returns ``(image, order)``: H x W x 3 in "BGR" (colour; an alpha channel is dropped by a view), or H x W in
    "MONO" (grey). 16-bit PNGs come back as uint16. Raises :class:`ImageFormatError` (``encoding`` or
    ``decode``)."""
    import cv2

    compression_format(msg.format)
    buf = _buffer(msg.data)
    if buf.size == 0:
        raise ImageFormatError("size", "empty CompressedImage (no data)")
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageFormatError("decode", f"cannot decode CompressedImage ({buf.size} bytes, format "
                                         f"{msg.format!r}): corrupt or not jpeg/png")
    if img.ndim == 2:
        return img, "MONO"
    if img.shape[2] == 1:
        return img[:, :, 0], "MONO"
    return img[:, :, :3], "BGR"


def numpy_to_compressed(img: np.ndarray, order: str = "BGR", codec: str = "jpeg", quality: int = 90) -> tuple[str,
                                                                                                          bytes]:
    """Encode an 8-bit H x W x 3 (``order`` "RGB" or "BGR") or H x W image. Returns ``(format, data)`` for a
    ``sensor_msgs/CompressedImage``, with image_transport's format string (``"bgr8; jpeg compressed bgr8"``)."""
    import cv2

    if codec not in ("jpeg", "png"):
        raise ValueError(f"codec must be 'jpeg' or 'png', got {codec!r}")
    if img.dtype != np.uint8:
        raise ValueError(f"only uint8 images can be compressed here, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 3:
        if order == "RGB":
            img = img[:, :, ::-1]
        elif order != "BGR":
            raise ValueError(f"order must be 'RGB' or 'BGR' for colour images, got {order!r}")
        enc = "bgr8"
    elif img.ndim == 2:
        enc = "mono8"
    else:
        raise ValueError(f"expected H x W x 3 or H x W, got {img.shape}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if codec == "jpeg" else []
    ok, data = cv2.imencode(".jpg" if codec == "jpeg" else ".png", np.ascontiguousarray(img), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {img.shape} image as {codec}")
    return f"{enc}; {codec} compressed {enc}", data.tobytes()


def scale_camera_info(info: Any, width: int, height: int, out: Any) -> Any:
    """Fill ``out`` (a ``sensor_msgs/CameraInfo`` or any object with its fields) with ``info`` rescaled to a
    ``width`` x ``height`` image, the way image_proc's resize does: the focal lengths, principal point and ROI scale
    with the image; D, R, binning and the distortion model are kept. The header is left to the caller.

    An uncalibrated ``info`` (width or height 0) only gets the new size."""
    sx = width / info.width if info.width else 1.0
    sy = height / info.height if info.height else 1.0
    out.width, out.height = int(width), int(height)
    out.distortion_model = info.distortion_model
    out.d = list(info.d)
    k = [float(v) for v in info.k]
    k[0], k[2], k[4], k[5] = k[0] * sx, k[2] * sx, k[4] * sy, k[5] * sy
    out.k = k
    out.r = [float(v) for v in info.r]
    p = [float(v) for v in info.p]
    p[0], p[2], p[3], p[5], p[6], p[7] = p[0] * sx, p[2] * sx, p[3] * sx, p[5] * sy, p[6] * sy, p[7] * sy
    out.p = p
    out.binning_x, out.binning_y = info.binning_x, info.binning_y
    roi_in, roi = info.roi, out.roi
    roi.x_offset, roi.width = int(round(roi_in.x_offset * sx)), int(round(roi_in.width * sx))
    roi.y_offset, roi.height = int(round(roi_in.y_offset * sy)), int(round(roi_in.height * sy))
    roi.do_rectify = roi_in.do_rectify
    return out
