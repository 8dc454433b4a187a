"""ROS-free image codecs: ``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage`` fields <-> numpy.

Works on any object with the message's fields (``height``, ``width``, ``encoding``, ``is_bigendian``, ``step``,
``data``; ``format`` and ``data`` for compressed images), so it is tested and usable without rclpy. No rclpy import.

Decoding is zero-copy: :func:`image_to_numpy` returns a strided view onto ``msg.data`` that honours ``step`` (row
padding) and ``is_bigendian`` (multi-byte encodings). Every malformed message raises :class:`ImageFormatError`,
whose ``reason`` is a short stable key (``encoding``, ``size``, ``step``, ``truncated``, ``decode``) that callers use to
count dropped frames.

Untrusted input: the size an image declares (``height`` x ``width``, or the JPEG SOF / PNG IHDR header, parsed here
with bounded work) is checked against ``max_pixels`` BEFORE anything is decoded or allocated (reason ``size``), so a
small message cannot make the decoder allocate gigabytes. Compressed images are decoded with Pillow, not OpenCV:
Pillow reports every problem as an exception (here: reason ``decode``) and writes nothing to stderr, whereas
OpenCV's libpng and libjpeg print straight to file descriptor 2 (``libpng error: IHDR: CRC error``, ``Corrupt JPEG
data: ...``, several lines per bad frame, bypassing ROS logging) and raise ``cv2.error`` for headers it refuses.
Silencing fd 2 around each decode is no option in a multi-threaded node: the redirect is process-wide and would
swallow other threads' output (rclpy's logging among it).
"""
from __future__ import annotations

import array
import io
import re
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DEFAULT_MAX_PIXELS", "MAX_MAX_PIXELS", "ImageFormatError", "PixelFormat", "SEGMENTER_ENCODINGS", "check_pixels",
           "compressed_header", "compressed_to_numpy", "compression_format", "image_to_numpy", "numpy_to_compressed",
           "numpy_to_image", "pixel_format", "segmenter_frame", "segmenter_input", "set_image_data", "sniff_codec"]


#: default pixel limit per frame: 3840 x 2160 (4K UHD); larger frames are refused before decoding
DEFAULT_MAX_PIXELS = 3840 * 2160
#: the largest pixel limit that can be set (the node's max_pixels, the tools' --max-pixels): 16384 x 16384
MAX_MAX_PIXELS = 1 << 28
#: scans a JPEG may have (a baseline JPEG has 1, a progressive one about 10): each scan is a pass over all the
#: image's coefficients, so thousands of tiny scans make a small file take minutes to decode
MAX_JPEG_SCANS = 100
#: markers a JPEG may have outside its entropy-coded data, with or without a length field (real files: tens); bounds
#: the Python-level work of the marker walk
MAX_JPEG_SEGMENTS = 1000
#: fill bytes (0xFF padding before a marker) a JPEG may have outside its entropy-coded data, all runs together. The
#: spec allows any number; encoders write none or a few, and Pillow's parser reads each one in Python
MAX_JPEG_FILL_BYTES = 65536
#: bytes of metadata (APPn and COM segments, all together) a JPEG may have: camera frames carry none or an Exif block
#: (at most 64 KiB), photos an ICC profile of a few KiB. Pillow parses them in Python (it joins Exif blocks one
#: concatenation at a time: 1000 of them took 20 s)
MAX_JPEG_METADATA_BYTES = 4 << 20
#: chunks a PNG may have: this many plus one per 4 KiB of data (encoders write image data in chunks of 8-64 KiB: a
#: noisy 4K frame from OpenCV has about 3000 in 25 MB); bounds the Python-level work of the chunk walk
MAX_PNG_CHUNKS = 1000


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
    # sensor_msgs/Image: data holds step x height bytes, the last row's padding included (cv_bridge refuses any
    # other length); a message whose last row lacks its padding was accepted, while the error named step x height
    needed = step * height
    if buf.size < needed:
        raise ImageFormatError("truncated", f"data has {buf.size} bytes, a {width}x{height} {msg.encoding} image "
                                            f"with step {step} needs step x height = {needed}")
    dtype = fmt.dtype
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if msg.is_bigendian else "<")
    isz = dtype.itemsize
    if fmt.channels == 1:
        return np.ndarray((height, width), dtype=dtype, buffer=buf, strides=(step, isz))
    return np.ndarray((height, width, fmt.channels), dtype=dtype, buffer=buf,
                      strides=(step, fmt.channels * isz, isz))


def check_pixels(height: int, width: int, max_pixels: int | None, what: str = "image") -> None:
    """Raise :class:`ImageFormatError` (reason ``size``) when ``height`` x ``width`` exceeds ``max_pixels``."""
    if max_pixels is not None and height * width > max_pixels:
        raise ImageFormatError("size", f"{what} of {width}x{height} = {height * width} pixels exceeds max_pixels "
                                       f"{max_pixels}")


def segmenter_input(msg: Any, max_pixels: int | None = None) -> tuple[np.ndarray, str]:
    """A frame for :meth:`Segmenter.segment` from an 8-bit ``sensor_msgs/Image``, without copying pixels.

    Returns ``(frame, channel_order)``: H x W x 3 (alpha dropped by a strided view) or H x W (mono8), and "RGB" or
    "BGR". Any other encoding raises :class:`ImageFormatError` (reason ``encoding``); a declared size above
    ``max_pixels`` raises it with reason ``size``."""
    order = SEGMENTER_ENCODINGS.get(msg.encoding)
    if order is None:
        raise ImageFormatError("encoding", f"unsupported image encoding {msg.encoding!r} for segmentation "
                                           f"(supported: {', '.join(SEGMENTER_ENCODINGS)})")
    check_pixels(int(msg.height), int(msg.width), max_pixels)
    img = image_to_numpy(msg)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    return img, order


def segmenter_frame(msg: Any, compressed: bool, max_pixels: int | None = None) -> tuple[np.ndarray, str]:
    """``(frame, channel_order)`` for :meth:`Segmenter.segment` from a ``sensor_msgs/Image`` (``compressed``
    False, see :func:`segmenter_input`) or a ``sensor_msgs/CompressedImage`` (8-bit jpeg/png; grey frames are
    passed as "RGB", the Segmenter replicates them). Frames above ``max_pixels`` are refused before decoding.
    Raises :class:`ImageFormatError`."""
    if not compressed:
        return segmenter_input(msg, max_pixels)
    img, order = compressed_to_numpy(msg, max_pixels)
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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # colour type -> depths
# start-of-frame markers (SOF0-SOF15 without DHT C4, JPG C8, DAC CC): they carry the image size
_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
# in entropy-coded data, 0xFF is followed by 0x00 (stuffing), a restart marker (D0-D7) or fill bytes (FF); any
# other byte starts the next marker segment
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# a marker's 0xFF and the fill bytes before it
_JPEG_FILL = re.compile(rb"\xff+")


def _png_header(buf: np.ndarray) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk. Walks every chunk and checks its CRC (zlib.crc32: C speed, linear
    in the message), so a corrupt or truncated PNG is refused before the decoder sees it, deterministically (a
    decoder may stop reading once it has its pixel rows, and miss damage after them)."""
    head = buf[:33].tobytes()
    if len(head) < 33:
        raise ImageFormatError("decode", f"PNG of {buf.size} bytes is shorter than its header")
    length, ctype = struct.unpack(">I4s", head[8:16])
    if length != 13 or ctype != b"IHDR":
        raise ImageFormatError("decode", "PNG does not start with an IHDR chunk")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if depth not in _PNG_DEPTHS.get(colour, ()):
        raise ImageFormatError("decode", f"PNG header: invalid colour type {colour} / bit depth {depth}")
    data = memoryview(buf)
    n, i, chunks, idat = len(data), 8, 0, False
    while True:
        if i + 12 > n:
            raise ImageFormatError("decode", f"PNG truncated at byte {i} of {n} (no IEND chunk)")
        length, ctype = struct.unpack(">I4s", data[i:i + 8])
        end = i + 12 + length
        if end > n:
            raise ImageFormatError("decode", f"PNG chunk {ctype!r} of {length} bytes runs past the end of the data")
        if struct.unpack(">I", data[end - 4:end])[0] != zlib.crc32(data[i + 4:end - 4]):
            raise ImageFormatError("decode", f"PNG chunk {ctype!r} at byte {i} fails its CRC check")
        chunks += 1
        if chunks > MAX_PNG_CHUNKS + n // 4096:
            raise ImageFormatError("decode", f"PNG has more than {MAX_PNG_CHUNKS + n // 4096} chunks "
                                             f"({n} bytes)")
        idat = idat or ctype == b"IDAT"
        i = end
        if ctype == b"IEND":
            break
    if not idat:
        raise ImageFormatError("decode", "PNG has no image data (IDAT)")
    return height, width


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))


def _check_png_data_length(buf: np.ndarray) -> None:
    """Raise ``decode`` when a PNG's image data (its IDAT chunks, inflated) is shorter than its header implies: one
    filter byte plus the packed samples per row, per Adam7 pass when interlaced. Inflates in 1 MiB steps and stops
    at the expected length, so the memory stays bounded whatever the stream holds (extra data is ignored, as by
    the decoders). Call after :func:`_png_header` (chunks walked and CRC-checked)."""
    data = memoryview(buf)
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    bits = depth * _PNG_CHANNELS[colour]
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for y0, x0, dy, dx in passes:
        rows, cols = (height - y0 + dy - 1) // dy, (width - x0 + dx - 1) // dx
        if rows > 0 and cols > 0:
            expected += rows * (1 + (cols * bits + 7) // 8)
    inflate, got, i = zlib.decompressobj(), 0, 8
    while got < expected:
        length, ctype = struct.unpack(">I4s", data[i:i + 8])
        if ctype == b"IEND":
            break
        if ctype == b"IDAT":
            chunk = data[i + 8:i + 8 + length]
            while chunk and got < expected:
                got += len(inflate.decompress(chunk, min(1 << 20, expected - got)))
                chunk = inflate.unconsumed_tail
        i += 12 + length
    if got < expected:
        raise ImageFormatError("decode", f"PNG image data ends early: {got} of the {expected} bytes its "
                                         f"{width}x{height} header needs (rows missing)")


def _check_dqt(data: memoryview, start: int, end: int, at: int) -> None:
    """A DQT segment's body ``data[start:end]`` must be 1 to 4 quantization tables (id 0-3, 8- or 16-bit values),
    as libjpeg requires; Pillow's parser reads them one by one in Python, so their number is bounded first (at most
    8 steps here)."""
    j, tables = start, 0
    while j < end and tables <= 4 and end - start <= 4 * 129:
        precision, table = data[j] >> 4, data[j] & 15
        if precision > 1 or table > 3:
            break
        j += 1 + 64 * (precision + 1)
        tables += 1
    if j != end or not 1 <= tables <= 4:
        raise ImageFormatError("decode", f"JPEG: DQT segment of length {end - start + 2} at byte {at} is not 1 to 4 "
                                         "quantization tables")


def _jpeg_header(buf: np.ndarray) -> tuple[int, int]:
    """(height, width) from a JPEG's start-of-frame segment. Walks every marker outside the entropy-coded data in
    O(markers) Python steps: runs of fill bytes and each scan's entropy-coded data (where 0xFF00 is stuffing and
    restart markers appear) are skipped with C-speed searches, every marker counts against
    :data:`MAX_JPEG_SEGMENTS`, fill bytes against :data:`MAX_JPEG_FILL_BYTES`, scans against
    :data:`MAX_JPEG_SCANS`. Markers that cannot stand between segments (RSTn and TEM outside a scan, a second SOI,
    0xFF00) are refused, as are hierarchical-mode markers (DHP, EXP: libjpeg cannot decode them), a frame header
    whose length does not match its component count, a DQT segment that is not 1 to 4 tables, more than
    :data:`MAX_JPEG_METADATA_BYTES` of APPn/COM segments and a JPEG without a frame header or a scan, so the decoder
    (whose Python-level parser reads everything before the first scan) never sees such a file."""
    data = memoryview(buf)
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise ImageFormatError("decode", "JPEG does not start with an SOI marker")
    i, size, scans, markers, fill, metadata = 2, None, 0, 1, 0, 0  # SOI counted
    while i < n:
        if data[i] != 0xFF:
            raise ImageFormatError("decode", f"JPEG: expected a marker at byte {i}")
        # the marker's 0xFF and any fill bytes before it, searched only as far as the fill budget reaches
        run = _JPEG_FILL.match(data, i, min(n, i + MAX_JPEG_FILL_BYTES - fill + 2)).end() - i
        fill += run - 1
        if fill > MAX_JPEG_FILL_BYTES:
            raise ImageFormatError("decode", f"JPEG has more than {MAX_JPEG_FILL_BYTES} fill bytes (0xFF padding "
                                             f"before markers; at byte {i})")
        i += run
        if i >= n:
            break
        at, marker = i - 1, data[i]
        i += 1
        markers += 1
        if markers > MAX_JPEG_SEGMENTS:
            raise ImageFormatError("decode", f"JPEG has more than {MAX_JPEG_SEGMENTS} markers (at byte {at})")
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7:
            raise ImageFormatError("decode", f"JPEG: restart marker RST{marker - 0xD0} at byte {at} outside "
                                             "entropy-coded data")
        if marker == 0x01:
            raise ImageFormatError("decode", f"JPEG: TEM marker at byte {at} outside entropy-coded data")
        if marker == 0xD8:
            raise ImageFormatError("decode", f"JPEG: second SOI marker at byte {at}")
        if marker == 0x00:
            raise ImageFormatError("decode", f"JPEG: 0xFF00 at byte {at} is not a marker (stuffed byte outside "
                                             "entropy-coded data)")
        if marker in (0xDE, 0xDF):
            raise ImageFormatError("decode", f"JPEG: hierarchical-mode marker {'DHP' if marker == 0xDE else 'EXP'} "
                                             f"at byte {at} (not supported)")
        if i + 2 > n:
            raise ImageFormatError("decode", "JPEG ends inside a marker segment")
        length = (data[i] << 8) | data[i + 1]
        end = i + length
        if length < 2 or end > n:
            raise ImageFormatError("decode", f"JPEG marker segment 0x{marker:02X} of length {length} runs past the "
                                             f"end of the data ({n} bytes)")
        if marker in _JPEG_SOF:
            if length < 8:
                raise ImageFormatError("decode", "JPEG frame header too short")
            if size is not None:
                raise ImageFormatError("decode", "JPEG has more than one frame header")
            if length != 8 + 3 * data[i + 7]:
                raise ImageFormatError("decode", f"JPEG frame header of length {length} does not match its "
                                                 f"{data[i + 7]} components")
            size = ((data[i + 3] << 8) | data[i + 4], (data[i + 5] << 8) | data[i + 6])
        elif marker == 0xDB:
            _check_dqt(data, i + 2, end, at)
        elif 0xE0 <= marker <= 0xEF or marker == 0xFE:  # APPn, COM
            metadata += length
            if metadata > MAX_JPEG_METADATA_BYTES:
                raise ImageFormatError("decode", f"JPEG has more than {MAX_JPEG_METADATA_BYTES} bytes of APPn/COM "
                                                 f"metadata (at byte {at})")
        elif marker == 0xDA:  # start of scan: skip its entropy-coded data
            scans += 1
            if size is None:
                raise ImageFormatError("decode", "JPEG scan before the frame header")
            if scans > MAX_JPEG_SCANS:
                raise ImageFormatError("decode", f"JPEG has more than {MAX_JPEG_SCANS} scans")
            m = _JPEG_NEXT_MARKER.search(data, end)
            end = n if m is None else m.start()
        i = end
    if size is None:
        raise ImageFormatError("decode", "JPEG has no frame header (SOF)")
    if not scans:
        raise ImageFormatError("decode", "JPEG has no scan (SOS): no image data")
    return size


def sniff_codec(data: Any) -> str:
    """The codec of compressed image bytes from their signature: "png", "jpeg" or "" (neither)."""
    head = _buffer(data)[:8].tobytes()
    if head == _PNG_SIGNATURE:
        return "png"
    if head[:2] == b"\xff\xd8":
        return "jpeg"
    return ""


def compressed_header(msg: Any) -> tuple[str, int, int]:
    """``(codec, height, width)`` of a ``sensor_msgs/CompressedImage`` from its bytes (PNG IHDR or JPEG SOF),
    without decoding. Raises :class:`ImageFormatError` (``encoding`` for other codecs, ``size`` for no data or a
    zero size, ``decode`` for a malformed header)."""
    declared = compression_format(msg.format)
    buf = _buffer(msg.data)
    if buf.size == 0:
        raise ImageFormatError("size", "empty CompressedImage (no data)")
    codec = sniff_codec(buf)
    if codec == "png":
        height, width = _png_header(buf)
    elif codec == "jpeg":
        height, width = _jpeg_header(buf)
    else:
        raise ImageFormatError("decode", f"CompressedImage ({buf.size} bytes, format {msg.format!r}) is neither "
                                         "PNG nor JPEG")
    if declared and declared != codec:
        raise ImageFormatError("decode", f"CompressedImage format {msg.format!r} but the data is {codec}")
    if height == 0 or width == 0:
        raise ImageFormatError("size", f"{codec} declares an empty image ({width}x{height})")
    return codec, height, width


def compressed_to_numpy(msg: Any, max_pixels: int | None = None) -> tuple[np.ndarray, str]:
    """Decode a ``sensor_msgs/CompressedImage`` (jpeg or png).

    Returns ``(image, order)``: H x W x 3 in "RGB" (colour; alpha dropped by a view; palette, CMYK and YCbCr
    images converted), or H x W in "MONO" (grey; uint16 for 16-bit grey PNGs). The header is checked first
    (:func:`compressed_header`; above ``max_pixels``, or :data:`MAX_MAX_PIXELS` when None: reason ``size``); any
    decoder failure raises
    :class:`ImageFormatError` with reason ``decode``."""
    from PIL import JpegImagePlugin, PngImagePlugin

    codec, height, width = compressed_header(msg)
    check_pixels(height, width, MAX_MAX_PIXELS if max_pixels is None else max_pixels, codec)  # always bounded
    buf = _buffer(msg.data)
    try:
        # the plugin's class, not Image.open: the size is bounded by max_pixels above, and Image.open's own bomb
        # limit (89 Mpx: a DecompressionBombWarning on stderr; 179 Mpx: refused) overrode a larger max_pixels
        opener = PngImagePlugin.PngImageFile if codec == "png" else JpegImagePlugin.JpegImageFile
        with opener(io.BytesIO(buf)) as im:
            if im.size != (width, height):
                raise ImageFormatError("decode", f"{codec}: decoder size {im.size} differs from the header's "
                                                 f"{width}x{height}")
            mode = im.mode
            order = "MONO" if mode in ("I;16", "I;16B", "I;16L", "I", "1", "L", "LA", "La") else "RGB"
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                img = np.asarray(im)
                img = img.astype(np.uint16) if img.dtype != np.uint16 else img
            elif order == "MONO":
                img = np.asarray(im.convert("L") if mode != "L" else im)
            else:
                img = np.asarray(im.convert("RGB") if mode not in ("RGB", "RGBA") else im)  # palette, CMYK, ...
            # Pillow zero-fills the rows a PNG's (complete, but short) zlib stream does not hold: count the
            # stream's bytes when the last row is all zero or the image is interlaced (rows in passes); a palette
            # image's zero is index 0, whatever colour the palette gives it (its indices are looked at)
            last = np.asarray(im)[-1] if mode in ("P", "PA") else img[-1]
            if codec == "png" and (im.info.get("interlace") or not last.any()):
                _check_png_data_length(buf)
    except ImageFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure (OSError, SyntaxError, zlib.error, ...)
        raise ImageFormatError("decode", f"cannot decode CompressedImage ({buf.size} bytes, {codec} "
                                         f"{width}x{height}): {type(e).__name__}: {e}") from None
    if order == "MONO":
        return img, "MONO"
    if img.ndim != 3 or img.shape[:2] != (height, width):
        raise ImageFormatError("decode", f"{codec}: decoded shape {img.shape} differs from the header's "
                                         f"{width}x{height}")
    return img[:, :, :3], "RGB"


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
