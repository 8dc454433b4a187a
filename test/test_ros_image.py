"""icnet_ros.ros_image: Image/CompressedImage fields <-> numpy, on plain objects and on real rclpy messages."""
from __future__ import annotations

import array
import re
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from helpers import jpeg_with_size, png_with_size
from icnet_ros.ros_image import (MAX_MAX_PIXELS, ImageFormatError, compressed_to_numpy, compression_format,
                                 image_to_numpy, numpy_to_compressed, numpy_to_image, pixel_format, segmenter_input,
                                 set_image_data)


def fake_msg(img: np.ndarray, encoding: str, pad: int = 0, big: bool = False, data_type=array.array):
    """A hand-built Image-like object with ``pad`` bytes of row padding, data as rclpy stores it."""
    h, w = img.shape[:2]
    raw = img.astype(img.dtype.newbyteorder(">" if big else "<")) if img.dtype.itemsize > 1 else img
    rows = raw.reshape(h, -1).view(np.uint8)
    padded = np.zeros((h, rows.shape[1] + pad), np.uint8)
    padded[:, : rows.shape[1]] = rows
    data = padded.tobytes()
    data = array.array("B", data) if data_type is array.array else data_type(data)
    return SimpleNamespace(height=h, width=w, encoding=encoding, is_bigendian=int(big), step=padded.shape[1],
                           data=data)


def empty_msg():
    return SimpleNamespace(height=0, width=0, encoding="", is_bigendian=0, step=0, data=b"")


RNG = np.random.default_rng(0)


@pytest.mark.parametrize("encoding,channels", [("rgb8", 3), ("bgr8", 3), ("rgba8", 4), ("bgra8", 4), ("mono8", 1),
                                               ("8UC3", 3)])
@pytest.mark.parametrize("pad", [0, 5])
def test_decode_8bit_with_row_padding_is_a_view(encoding, channels, pad):
    img = RNG.integers(0, 256, (7, 9, channels) if channels > 1 else (7, 9), dtype=np.uint8)
    msg = fake_msg(img, encoding, pad=pad)
    out = image_to_numpy(msg)
    np.testing.assert_array_equal(out, img)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8)), "decoding must not copy the pixels"


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("encoding,channels", [("mono16", 1), ("rgb16", 3), ("16UC1", 1)])
def test_decode_16bit_honours_is_bigendian(encoding, channels, big):
    img = RNG.integers(0, 65536, (4, 6, channels) if channels > 1 else (4, 6), dtype=np.uint16)
    msg = fake_msg(img, encoding, pad=2, big=big)
    out = image_to_numpy(msg)
    assert out.dtype.byteorder == (">" if big else "<") or out.dtype.byteorder == "="
    np.testing.assert_array_equal(out.astype(np.uint16), img)
    # reading the same bytes with the wrong flag gives byte-swapped values: the flag really is honoured
    msg.is_bigendian = int(not big)
    assert not np.array_equal(image_to_numpy(msg).astype(np.uint16), img)


def test_decode_float_and_bytes_data():
    img = RNG.random((3, 5)).astype(np.float32)
    msg = fake_msg(img, "32FC1", data_type=bytes)
    np.testing.assert_array_equal(image_to_numpy(msg), img)


def test_decode_list_data_from_hand_built_messages():
    img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    msg = SimpleNamespace(height=2, width=2, encoding="rgb8", is_bigendian=0, step=6, data=list(img.reshape(-1)))
    np.testing.assert_array_equal(image_to_numpy(msg), img)


@pytest.mark.parametrize("mutate,reason", [
    (lambda m: setattr(m, "encoding", "yuv422"), "encoding"),
    (lambda m: setattr(m, "encoding", "bayer_rggb8"), "encoding"),
    (lambda m: setattr(m, "encoding", ""), "encoding"),
    (lambda m: (setattr(m, "height", 0)), "size"),
    (lambda m: (setattr(m, "width", 0)), "size"),
    (lambda m: setattr(m, "step", m.width * 3 - 1), "step"),
    (lambda m: setattr(m, "data", m.data[: len(m.data) - 1]), "truncated"),
    (lambda m: setattr(m, "data", b""), "truncated"),
])
def test_bad_messages_raise_with_a_reason(mutate, reason):
    msg = fake_msg(RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8), "rgb8")
    mutate(msg)
    with pytest.raises(ImageFormatError) as e:
        image_to_numpy(msg)
    assert e.value.reason == reason
    assert str(e.value)


def test_data_shorter_than_step_times_height_is_truncated():
    """sensor_msgs/Image data holds step x height bytes (cv_bridge refuses any other length). Data whose last row
    lacked its padding was accepted, while the error for shorter data said it 'needs step*height': now that is the
    rule, and the message says so with the numbers."""
    img = RNG.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    msg = fake_msg(img, "rgb8", pad=4)  # step 16
    np.testing.assert_array_equal(image_to_numpy(msg), img)
    for cut in (4, 1):  # the last row's padding absent, or one byte of it
        msg.data = fake_msg(img, "rgb8", pad=4).data[:-cut]
        with pytest.raises(ImageFormatError) as e:
            image_to_numpy(msg)
        assert e.value.reason == "truncated"
        assert str(e.value) == (f"data has {48 - cut} bytes, a 4x3 rgb8 image with step 16 needs step x height = "
                                "48")
        with pytest.raises(ImageFormatError):
            segmenter_input(msg)


@pytest.mark.parametrize("encoding,order", [("rgb8", "RGB"), ("bgr8", "BGR"), ("rgba8", "RGB"), ("bgra8", "BGR"),
                                            ("mono8", "RGB")])
def test_segmenter_input(encoding, order):
    c = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}[encoding]
    img = RNG.integers(0, 256, (5, 6, c) if c > 1 else (5, 6), dtype=np.uint8)
    frame, got = segmenter_input(fake_msg(img, encoding, pad=3))
    assert got == order
    np.testing.assert_array_equal(frame, img[:, :, :3] if c == 4 else img)
    assert frame.dtype == np.uint8 and frame.ndim == (2 if c == 1 else 3)


@pytest.mark.parametrize("encoding", ["mono16", "16UC1", "32FC1", "8UC3"])
def test_segmenter_input_rejects_other_encodings(encoding):
    fmt = pixel_format(encoding)
    img = np.zeros((4, 4, fmt.channels), fmt.dtype)
    with pytest.raises(ImageFormatError) as e:
        segmenter_input(fake_msg(img[..., 0] if fmt.channels == 1 else img, encoding))
    assert e.value.reason == "encoding" and encoding in str(e.value)


@pytest.mark.parametrize("encoding,shape,dtype", [("rgb8", (5, 7, 3), np.uint8), ("mono8", (5, 7), np.uint8),
                                                  ("mono16", (5, 7), np.uint16), ("bgra8", (2, 3, 4), np.uint8)])
def test_encode_roundtrip_plain_object(encoding, shape, dtype):
    img = RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    msg = numpy_to_image(img, encoding, SimpleNamespace())
    assert (msg.height, msg.width, msg.encoding, msg.is_bigendian) == (shape[0], shape[1], encoding, 0)
    assert msg.step == shape[1] * pixel_format(encoding).pixel_bytes
    assert isinstance(msg.data, bytes) and len(msg.data) == msg.step * msg.height
    np.testing.assert_array_equal(image_to_numpy(msg), img)


def test_encode_big_endian_and_non_contiguous():
    img = RNG.integers(0, 65535, (4, 6), dtype=np.uint16).astype(">u2")
    msg = numpy_to_image(img, "mono16", SimpleNamespace())
    assert msg.is_bigendian == 1
    np.testing.assert_array_equal(image_to_numpy(msg), img)
    view = RNG.integers(0, 255, (6, 8, 3), dtype=np.uint8)[::2, ::2]
    np.testing.assert_array_equal(image_to_numpy(numpy_to_image(view, "rgb8", SimpleNamespace())), view)


@pytest.mark.parametrize("img,encoding", [(np.zeros((4, 4, 3), np.uint8), "mono8"),
                                          (np.zeros((4, 4), np.uint16), "mono8"),
                                          (np.zeros((0, 4, 3), np.uint8), "rgb8")])
def test_encode_rejects_mismatches(img, encoding):
    with pytest.raises(ValueError):
        numpy_to_image(img, encoding, SimpleNamespace())


def test_real_rclpy_message_fast_path_serializes():
    """The ndarray stored by set_image_data goes through rclpy's C converter unchanged (one copy, at publish)."""
    pytest.importorskip("rclpy")
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image

    img = RNG.integers(0, 256, (31, 17, 3), dtype=np.uint8)
    msg = numpy_to_image(img, "bgr8", Image())
    msg.header.frame_id = "cam"
    assert isinstance(msg.data, np.ndarray)  # the fast path was taken
    back = deserialize_message(serialize_message(msg), Image)
    assert isinstance(back.data, array.array)
    assert (back.height, back.width, back.step, back.encoding, back.header.frame_id) == (31, 17, 51, "bgr8", "cam")
    np.testing.assert_array_equal(image_to_numpy(back), img)
    frame, order = segmenter_input(back)
    assert order == "BGR" and np.shares_memory(frame, np.frombuffer(back.data, np.uint8))


@pytest.mark.parametrize("codec", ["jpeg", "png"])
@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_compressed_roundtrip(codec, order):
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :30] = (250, 10, 10)  # a strong colour so a channel swap would show even through jpeg
    fmt, data = numpy_to_compressed(img, order, codec)
    assert compression_format(fmt) == codec
    out, got_order = compressed_to_numpy(SimpleNamespace(format=fmt, data=array.array("B", data)))
    assert got_order == "RGB" and out.shape == img.shape
    expected = img[:, :, ::-1] if order == "BGR" else img
    err = np.abs(out.astype(int) - expected)
    if codec == "png":
        assert err.max() == 0
    else:  # jpeg rings at the edge; a channel swap would give a mean error near 160
        assert err.mean() < 4


def test_compressed_mono_and_alpha():
    import cv2

    grey = RNG.integers(0, 256, (10, 12), dtype=np.uint8)
    fmt, data = numpy_to_compressed(grey, codec="png")
    out, order = compressed_to_numpy(SimpleNamespace(format=fmt, data=data))
    assert order == "MONO"
    np.testing.assert_array_equal(out, grey)
    rgba = RNG.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", rgba)
    out, order = compressed_to_numpy(SimpleNamespace(format="png", data=buf.tobytes()))
    assert order == "RGB"  # OpenCV wrote BGRA
    np.testing.assert_array_equal(out, rgba[:, :, 2::-1])


@pytest.mark.parametrize("fmt,expected", [("jpeg", "jpeg"), ("JPG", "jpeg"), ("png", "png"), ("", ""),
                                          ("rgb8; jpeg compressed bgr8", "jpeg"), ("mono8; png compressed ", "png")])
def test_compression_format(fmt, expected):
    assert compression_format(fmt) == expected


@pytest.mark.parametrize("fmt", ["16UC1; compressedDepth png", "theora", "webp"])
def test_compression_format_rejects(fmt):
    with pytest.raises(ImageFormatError) as e:
        compression_format(fmt)
    assert e.value.reason == "encoding"


def test_corrupt_compressed_raises():
    fmt, data = numpy_to_compressed(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ImageFormatError) as e:
        compressed_to_numpy(SimpleNamespace(format=fmt, data=b"\x00garbage" + data[20:40]))
    assert e.value.reason == "decode"
    with pytest.raises(ImageFormatError) as e:
        compressed_to_numpy(SimpleNamespace(format="jpeg", data=b""))
    assert e.value.reason == "size"


def test_set_image_data_on_plain_object_gives_bytes():
    obj = SimpleNamespace(data=None)
    set_image_data(obj, np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert obj.data == bytes(range(6))


# ---------------------------------------------------------------------------------------------- untrusted input
def _png(img: np.ndarray) -> bytes:
    return numpy_to_compressed(img, "RGB", "png")[1]


def test_compressed_header_reads_sizes_without_decoding():
    from icnet_ros.ros_image import compressed_header

    img = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for codec in ("png", "jpeg"):
        fmt, data = numpy_to_compressed(img, "RGB", codec)
        assert compressed_header(SimpleNamespace(format=fmt, data=data)) == (codec, 37, 53)
    prog = _progressive_jpeg(img)
    assert compressed_header(SimpleNamespace(format="jpeg", data=prog)) == ("jpeg", 37, 53)


def _progressive_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    import io

    from PIL import Image as PILImage

    out = io.BytesIO()
    PILImage.fromarray(img).save(out, "JPEG", progressive=True, quality=quality)
    return out.getvalue()


@pytest.mark.parametrize("codec", ["png", "jpeg"])
def test_declared_size_above_max_pixels_is_refused_before_decoding(codec, monkeypatch):
    """A small message declaring 20000 x 20000 pixels: refused as ``size`` from the header, the decoder never runs
    (Pillow's open is replaced by a function that fails the test)."""
    import PIL.ImageFile

    img = np.zeros((16, 16, 3), np.uint8)
    fmt, data = numpy_to_compressed(img, "RGB", codec)
    data = png_with_size(data, 20000, 20000) if codec == "png" else jpeg_with_size(data, 20000, 20000)
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "__init__",  # every Pillow decoder starts there
                        lambda *a, **k: pytest.fail("decoded a frame above max_pixels"))
    with pytest.raises(ImageFormatError) as e:
        compressed_to_numpy(SimpleNamespace(format=fmt, data=data), max_pixels=4096 * 4096)
    assert e.value.reason == "size" and "20000x20000" in str(e.value)


def test_a_compressed_frame_is_bounded_without_max_pixels(monkeypatch):
    """max_pixels=None (the public function's default) bounded nothing itself: Pillow's Image.open limit did, and
    decoding through the plugin classes skips it; MAX_MAX_PIXELS is the bound then (20000 x 20000 is refused)."""
    import PIL.ImageFile

    fmt, data = numpy_to_compressed(np.zeros((16, 16, 3), np.uint8), "RGB", "jpeg")
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "__init__", lambda *a, **k: pytest.fail("decoded it"))
    with pytest.raises(ImageFormatError) as e:
        compressed_to_numpy(SimpleNamespace(format=fmt, data=jpeg_with_size(data, 20000, 20000)))
    assert e.value.reason == "size" and "20000x20000" in str(e.value)


def test_raw_image_declared_size_above_max_pixels():
    msg = fake_msg(np.zeros((4, 5, 3), np.uint8), "rgb8")
    msg.height, msg.width = 100000, 100000  # the data is far too short as well: the size is checked first
    with pytest.raises(ImageFormatError) as e:
        segmenter_input(msg, max_pixels=10**6)
    assert e.value.reason == "size"
    msg = fake_msg(np.zeros((40, 50, 3), np.uint8), "rgb8")
    assert segmenter_input(msg, max_pixels=2000)[0].shape == (40, 50, 3)
    with pytest.raises(ImageFormatError):
        segmenter_input(msg, max_pixels=1999)


def _bad_compressed() -> dict[str, tuple[str, bytes, str]]:
    img = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    png, jpg = _png(img), numpy_to_compressed(img, "RGB", "jpeg")[1]
    idat = png.index(b"IDAT")
    sof = jpg.index(b"\xff\xc0")
    dqt = jpg.index(b"\xff\xdb")
    return {
        "png truncated": ("png", png[: len(png) // 2], "decode"),
        "png truncated in a CRC": ("png", png[: png.index(b"IEND") - 6], "decode"),  # the IDAT's CRC, 2 of 4 bytes
        "png IHDR CRC": ("png", png[:30] + bytes([png[30] ^ 0xFF]) + png[31:], "decode"),
        "png IDAT CRC": ("png", png[: idat + 10] + bytes([png[idat + 10] ^ 0xFF]) + png[idat + 11:], "decode"),
        "png bad depth": ("png", png[:24] + b"\x05" + png[25:], "decode"),
        "png zero size": ("png", png_with_size(png, 0, 32), "size"),
        "png header only": ("png", png[:33], "decode"),
        "png bigger than its data": ("png", png_with_size(png, 240, 320), "decode"),
        "jpeg truncated": ("jpeg", jpg[: len(jpg) // 2], "decode"),
        "jpeg no SOF": ("jpeg", b"\xff\xd8\xff\xd9", "decode"),
        "jpeg segment past the end": ("jpeg", jpg[:2] + b"\xff\xe0\xff\xff" + jpg[6:40], "decode"),
        "jpeg truncated in a segment length": ("jpeg", jpg[:sof + 3], "decode"),  # SOF's length: 1 of 2 bytes
        "jpeg zero height (DNL)": ("jpeg", jpeg_with_size(jpg, 0, 32), "size"),
        "jpeg garbage scan": ("jpeg", jpg[:-200] + bytes(range(256))[:198] + b"\xff\xd9", "decode"),
        # markers that cannot stand between segments: RSTn/TEM outside entropy-coded data, a second SOI, 0xFF00
        "jpeg RST before the frame header": ("jpeg", jpg[:sof] + b"\xff\xd3" + jpg[sof:], "decode"),
        "jpeg TEM before the frame header": ("jpeg", jpg[:sof] + b"\xff\x01" + jpg[sof:], "decode"),
        "jpeg second SOI": ("jpeg", jpg[:sof] + b"\xff\xd8" + jpg[sof:], "decode"),
        "jpeg stuffed byte between segments": ("jpeg", jpg[:sof] + b"\xff\x00" + jpg[sof:], "decode"),
        "jpeg hierarchical DHP": ("jpeg", jpg[:sof] + b"\xff\xde" + jpg[sof + 2:], "decode"),
        "jpeg frame header longer than its components": (
            "jpeg", jpg[:sof + 2] + (jpg[sof + 2] * 256 + jpg[sof + 3] + 3).to_bytes(2, "big") + jpg[sof + 4:sof + 19]
            + b"\x04\x11\x00" + jpg[sof + 19:], "decode"),
        "jpeg DQT with 5 tables": ("jpeg", jpg[:dqt] + b"\xff\xdb" + (2 + 5 * 65).to_bytes(2, "big")
                                   + b"".join(bytes([t % 4]) + bytes(range(1, 65)) for t in range(5)) + jpg[dqt:],
                                   "decode"),
        "jpeg header without a scan": ("jpeg", jpg[:jpg.index(b"\xff\xda")] + b"\xff\xd9", "decode"),
        "not an image": ("", b"GIF89a" + bytes(100), "decode"),
        "format says png, data is jpeg": ("png", jpg, "decode"),
        "empty": ("jpeg", b"", "size"),
    }


#: the bad files only a decoder can tell (their headers are sound); every other one is refused by the header walk,
#: before any decoder runs (else a decoder's own failure gave the same reason, and the walk's checks went untested)
DECODER_CASES = ("png bigger than its data", "jpeg truncated", "jpeg garbage scan")
#: what the walk says of each case it refuses (a check that stops working would let another one refuse it)
WALK_REASONS = {
    "png truncated": "runs past the end of the data", "png IHDR CRC": "b'IHDR' at byte 8 fails its CRC check",
    "png IDAT CRC": "b'IDAT' at byte 33 fails its CRC check", "png bad depth": "invalid colour type 2 / bit depth 5",
    "png zero size": "declares an empty image", "png header only": "(no IEND chunk)",
    "png truncated in a CRC": "b'IDAT' of", "jpeg truncated in a segment length": "JPEG ends inside a marker segment",
    "jpeg no SOF": "no frame header (SOF)", "jpeg segment past the end": "of length 65535 runs past the end",
    "jpeg zero height (DNL)": "declares an empty image", "jpeg RST before the frame header": "restart marker RST3",
    "jpeg TEM before the frame header": "TEM marker at byte", "jpeg second SOI": "second SOI marker",
    "jpeg stuffed byte between segments": "is not a marker (stuffed byte",
    "jpeg hierarchical DHP": "hierarchical-mode marker DHP",
    "jpeg frame header longer than its components": "does not match its 3 components",
    "jpeg DQT with 5 tables": "is not 1 to 4 quantization", "jpeg header without a scan": "no scan (SOS)",
    "not an image": "is neither PNG nor JPEG", "format says png, data is jpeg": "format 'png' but the data is jpeg",
    "empty": "empty CompressedImage (no data)"}


@pytest.mark.parametrize("case", list(_bad_compressed()))
def test_bad_compressed_images_raise_with_a_reason_and_print_nothing(case, capfd, monkeypatch):
    """Every failure is an ImageFormatError, none a cv2.error/OSError, and nothing reaches stderr (libpng and
    libjpeg print there from C when OpenCV decodes; Pillow does not)."""
    import PIL.ImageFile

    fmt, data, reason = _bad_compressed()[case]
    if case not in DECODER_CASES:
        monkeypatch.setattr(PIL.ImageFile.ImageFile, "__init__",  # every Pillow decoder starts there
                            lambda *a, **k: pytest.fail("reached the decoder"))
    try:
        compressed_to_numpy(SimpleNamespace(format=fmt, data=data), max_pixels=10**6)
    except ImageFormatError as e:
        assert e.reason == reason, str(e)
        assert case in DECODER_CASES or WALK_REASONS[case] in str(e), str(e)
    else:  # libjpeg may conceal a corrupt scan; then the frame must have its declared size
        assert reason == "decode" and case == "jpeg garbage scan"
    out, err = capfd.readouterr()
    assert err == "" and out == ""


def _png_from_rows(rows: bytes, width: int, height: int, colour: int = 2, depth: int = 8,
                   interlace: int = 0, palette: bytes = b"") -> bytes:
    """A PNG written by hand around already filtered rows (each with its filter byte): valid chunks and CRCs, a
    complete zlib stream, whatever the rows hold."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    plte = chunk(b"PLTE", palette) if palette else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + plte + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_png_whose_image_data_ends_early_is_refused():
    """Pillow zero-fills the rows a short (but complete) zlib stream leaves out: that frame would be segmented
    with black rows. The data length is checked against the header instead."""
    img = RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    rows = [b"\x00" + img[r].tobytes() for r in range(30)]
    whole = _png_from_rows(b"".join(rows), 40, 30)
    got, order = compressed_to_numpy(SimpleNamespace(format="png", data=whole))
    np.testing.assert_array_equal(got, img)
    for cut in (15, 29):  # half the rows; all but the last
        with pytest.raises(ImageFormatError, match="ends early") as e:
            compressed_to_numpy(SimpleNamespace(format="png", data=_png_from_rows(b"".join(rows[:cut]), 40, 30)))
        assert e.value.reason == "decode"
    # interlaced: the length of the 7 passes; a stream missing its last pass is refused
    import cv2

    # (31 rows: the last row is in passes 1-6, so a stream missing pass 7 leaves it whole and only the length tells)
    img31 = RNG.integers(0, 256, (31, 40, 3), dtype=np.uint8)
    passes = []  # (first row, first column, row step, column step) of each Adam7 pass
    for y0, x0, dy, dx in ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2),
                           (1, 0, 2, 1)):
        sub = img31[y0::dy, x0::dx]
        passes.append(b"".join(b"\x00" + r.tobytes() for r in sub) if sub.size else b"")
    adam7 = _png_from_rows(b"".join(passes), 40, 31, interlace=1)
    np.testing.assert_array_equal(compressed_to_numpy(SimpleNamespace(format="png", data=adam7))[0], img31)
    with pytest.raises(ImageFormatError, match="ends early"):
        compressed_to_numpy(SimpleNamespace(format="png", data=_png_from_rows(b"".join(passes[:6]), 40, 31,
                                                                              interlace=1)))
    # frames whose last row is black are checked, and pass: grey, 16-bit grey, palette-free RGB
    black = img.copy()
    black[-3:] = 0
    np.testing.assert_array_equal(compressed_to_numpy(SimpleNamespace(format="png", data=_png(black)))[0], black)
    grey16 = RNG.integers(0, 65536, (12, 9), dtype=np.uint16)
    grey16[-1] = 0
    ok, enc = cv2.imencode(".png", grey16)
    got, order = compressed_to_numpy(SimpleNamespace(format="png", data=enc.tobytes()))
    assert order == "MONO" and got.dtype == np.uint16
    np.testing.assert_array_equal(got, grey16)
    rows16 = b"".join(b"\x00" + grey16[r].astype(">u2").tobytes() for r in range(11))
    with pytest.raises(ImageFormatError, match="ends early"):
        compressed_to_numpy(SimpleNamespace(format="png", data=_png_from_rows(rows16, 9, 12, colour=0, depth=16)))


def test_grey_alpha_png_whose_image_data_ends_early_is_refused():
    """Grey+alpha PNGs have two samples per pixel: a stream holding 6 of 10 rows has more bytes than 10 rows of one
    sample would need, so the length check must count both (the zero-filled rows reached the network)."""
    la = RNG.integers(1, 256, (10, 8, 2), dtype=np.uint8)
    rows = [b"\x00" + la[r].tobytes() for r in range(10)]
    got, order = compressed_to_numpy(SimpleNamespace(format="png", data=_png_from_rows(b"".join(rows), 8, 10,
                                                                                       colour=4)))
    assert order == "MONO"
    np.testing.assert_array_equal(got, la[:, :, 0])
    with pytest.raises(ImageFormatError, match="ends early: 102 of the 170 bytes") as e:
        compressed_to_numpy(SimpleNamespace(format="png", data=_png_from_rows(b"".join(rows[:6]), 8, 10, colour=4)))
    assert e.value.reason == "decode"


def test_palette_png_whose_image_data_ends_early_is_refused():
    """A palette PNG's zero-filled rows are index 0, which its palette may colour (here red): the "last row all
    zero" test looked at the converted colours and let 60 invented rows of 64 through to the network."""
    palette = np.array([[200, 10, 10], [0, 0, 255], [30, 200, 30], [90, 90, 90]], np.uint8)
    idx = RNG.integers(1, 4, (30, 40), dtype=np.uint8)
    rows = [b"\x00" + idx[r].tobytes() for r in range(30)]
    whole = _png_from_rows(b"".join(rows), 40, 30, colour=3, palette=palette.tobytes())
    np.testing.assert_array_equal(compressed_to_numpy(SimpleNamespace(format="png", data=whole))[0], palette[idx])
    for cut in (1, 29):
        short = _png_from_rows(b"".join(rows[:cut]), 40, 30, colour=3, palette=palette.tobytes())
        with pytest.raises(ImageFormatError, match="ends early") as e:
            compressed_to_numpy(SimpleNamespace(format="png", data=short))
        assert e.value.reason == "decode"


def test_max_pixels_above_pillows_bomb_limit_is_honoured(capfd):
    """max_pixels (up to MAX_MAX_PIXELS) bounds a frame before decoding; Pillow's own bomb check in Image.open
    (89 Mpx: a DecompressionBombWarning printed on stderr, outside ROS logging; 179 Mpx: refused) overrode it:
    frames within the node's limit were dropped as 'decode'."""
    w, h = 14000, 13000  # 182 Mpx of black: 0.2 MB compressed
    png = _png_from_rows(bytes((w + 1) * h), w, h, colour=0)
    got, order = compressed_to_numpy(SimpleNamespace(format="png", data=png), max_pixels=MAX_MAX_PIXELS)
    assert order == "MONO" and got.shape == (h, w)
    del got
    with pytest.raises(ImageFormatError) as e:
        compressed_to_numpy(SimpleNamespace(format="png", data=png), max_pixels=10**8)
    assert e.value.reason == "size"
    assert capfd.readouterr().err == ""


def test_jpeg_with_too_many_scans_is_refused():
    """A progressive JPEG's scans each cost a pass over all coefficients: thousands of tiny scans would make a
    small message take minutes to decode."""
    from icnet_ros.ros_image import MAX_JPEG_SCANS

    jpg = _progressive_jpeg(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    sos = jpg.index(b"\xff\xda")
    eoi = jpg.rindex(b"\xff\xd9")
    scan = jpg[sos: jpg.index(b"\xff\xc4", sos) if b"\xff\xc4" in jpg[sos:] else eoi]
    bomb = jpg[:eoi] + scan * (MAX_JPEG_SCANS + 1) + b"\xff\xd9"
    with pytest.raises(ImageFormatError) as e:
        compressed_to_numpy(SimpleNamespace(format="jpeg", data=bomb))
    assert e.value.reason == "decode" and "scans" in str(e.value)


def test_compressed_special_modes():
    """Palette, 1-bit, grey+alpha and 16-bit grey PNGs; a CMYK JPEG."""
    import io

    from PIL import Image as PILImage

    rgb = RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8)

    def encode(im: Any, fmt: str = "PNG") -> bytes:
        out = io.BytesIO()
        im.save(out, fmt)
        return out.getvalue()

    pal = PILImage.fromarray(rgb).convert("P")
    out, order = compressed_to_numpy(SimpleNamespace(format="png", data=encode(pal)))
    assert order == "RGB" and out.shape == (9, 11, 3)
    np.testing.assert_array_equal(out, np.asarray(pal.convert("RGB")))
    for mode in ("1", "LA"):
        out, order = compressed_to_numpy(SimpleNamespace(format="png", data=encode(
            PILImage.fromarray(rgb).convert(mode))))
        assert order == "MONO" and out.shape == (9, 11) and out.dtype == np.uint8
    deep = RNG.integers(0, 65536, (9, 11), dtype=np.uint16)
    import cv2

    out, order = compressed_to_numpy(SimpleNamespace(format="png", data=cv2.imencode(".png", deep)[1].tobytes()))
    assert order == "MONO" and out.dtype == np.uint16
    np.testing.assert_array_equal(out, deep)
    cmyk = encode(PILImage.fromarray(rgb).convert("CMYK"), "JPEG")
    out, order = compressed_to_numpy(SimpleNamespace(format="jpeg", data=cmyk))
    assert order == "RGB" and out.shape == (9, 11, 3)


def test_png_made_of_tiny_chunks_is_refused_quickly():
    """Thousands of empty ancillary chunks (valid CRCs) cost the chunk walk Python-level work: refused."""
    import struct
    import zlib

    png = _png(np.zeros((8, 8, 3), np.uint8))
    empty = struct.pack(">I", 0) + b"teXt" + struct.pack(">I", zlib.crc32(b"teXt"))
    bomb = png[:33] + empty * 200_000 + png[33:]  # 2.4 MB: the walk stops after the allowed 1585 chunks
    with pytest.raises(ImageFormatError) as e:
        compressed_to_numpy(SimpleNamespace(format="png", data=bomb))
    assert e.value.reason == "decode" and "more than 1585 chunks" in str(e.value)


def _header_walk_lines(data: bytes, limit: int = 20_000) -> tuple[int, ImageFormatError | None]:
    """``(lines, error)``: the Python lines the JPEG header walk (``_jpeg_header``) executes on ``data``, counted with
    a trace function (work measured structurally, not timed), and the ImageFormatError it raised (None: accepted).
    A walk still going after ``limit`` lines is stopped, and reported as ``limit + 1`` lines."""
    import sys

    from icnet_ros import ros_image
    from icnet_ros.ros_image import compressed_header

    class TooMuchWork(Exception):
        pass

    walk, lines = ros_image._jpeg_header.__code__, 0

    def count(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
            if lines > limit:
                raise TooMuchWork
        return count

    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: count if frame.f_code is walk else None)
    try:
        compressed_header(SimpleNamespace(format="jpeg", data=data))
    except ImageFormatError as e:
        return lines, e
    except TooMuchWork:
        return lines, None
    finally:
        sys.settrace(previous)
    return lines, None


# SOI and a valid 64x64 frame header (SOF0, 3 components); real files have tables before the SOF, not needed here
_SOI_SOF = b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x40\x00\x40\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"


@pytest.mark.parametrize("name,unit,match", [
    ("restart markers", b"\xff\xd0", "restart marker RST0 at byte 21 outside entropy-coded data"),
    ("TEM markers", b"\xff\x01", "TEM marker at byte 21 outside entropy-coded data"),
    ("fill bytes", b"\xff", "more than 65536 fill bytes"),
], ids=["rst", "tem", "fill"])
def test_jpeg_marker_flood_is_refused_quickly_before_decoding(name, unit, match, monkeypatch):
    """16 MiB of length-less markers or 0xFF fill bytes after a valid frame header: the walk used to step through
    them one byte at a time in Python without counting them (2.8 s for 32 MiB, in the callback every camera
    shares) and hand the file to Pillow, whose parser took 11 s more. Now refused at the first misplaced marker /
    past the fill budget, in as many Python steps as the smallest such flood, and the decoder never runs."""
    import PIL.ImageFile

    from icnet_ros.ros_image import MAX_JPEG_FILL_BYTES

    big = _SOI_SOF + unit * (16 * 1024 * 1024 // len(unit)) + b"\xff\xd9"
    small = _SOI_SOF + (unit if len(unit) == 2 else unit * (MAX_JPEG_FILL_BYTES + 2)) + b"\xff\xd9"
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "__init__",  # every Pillow decoder starts there
                        lambda *a, **k: pytest.fail("a marker flood reached the decoder"))
    with pytest.raises(ImageFormatError, match=match) as e:
        compressed_to_numpy(SimpleNamespace(format="jpeg", data=big))
    assert e.value.reason == "decode" and "\n" not in str(e.value)
    big_lines, big_error = _header_walk_lines(big)
    small_lines, small_error = _header_walk_lines(small)
    assert big_error is not None and small_error is not None and str(big_error) == str(small_error)
    assert big_lines == small_lines < 200, f"{name}: the walk's work grows with the flood ({big_lines} lines)"


def test_jpeg_every_marker_counts_against_the_limit():
    """Markers with and without a length field count alike; the walk stops at the limit."""
    from icnet_ros.ros_image import MAX_JPEG_SEGMENTS

    jpg = numpy_to_compressed(np.zeros((16, 16, 3), np.uint8), "RGB", "jpeg")[1]
    sof = jpg.index(b"\xff\xc0")
    empty_comment = b"\xff\xfe\x00\x02"
    bomb = jpg[:sof] + empty_comment * 200_000 + jpg[sof:]
    with pytest.raises(ImageFormatError, match=f"more than {MAX_JPEG_SEGMENTS} markers") as e:
        compressed_to_numpy(SimpleNamespace(format="jpeg", data=bomb))
    assert e.value.reason == "decode"
    lines, error = _header_walk_lines(bomb, limit=10**6)
    assert error is not None and lines < 40 * MAX_JPEG_SEGMENTS
    # just under the limit: accepted (the markers of the file itself count too)
    markers, i = 1, 2  # SOI, the segments before the scan, SOS, EOI
    while jpg[i + 1] != 0xDA:
        markers, i = markers + 1, i + 2 + int.from_bytes(jpg[i + 2:i + 4], "big")
    markers += 2
    ok = jpg[:sof] + empty_comment * (MAX_JPEG_SEGMENTS - markers) + jpg[sof:]
    assert compressed_to_numpy(SimpleNamespace(format="jpeg", data=ok))[0].shape == (16, 16, 3)
    with pytest.raises(ImageFormatError, match="markers"):
        compressed_to_numpy(SimpleNamespace(format="jpeg", data=jpg[:sof] + empty_comment + ok[sof:]))


def test_jpeg_fill_bytes_before_markers_are_allowed_within_a_budget(monkeypatch):
    """The spec allows fill bytes (0xFF) before any marker: a few are accepted; more than MAX_JPEG_FILL_BYTES in
    all are refused (Pillow's parser reads each one in Python)."""
    import PIL.ImageFile

    from icnet_ros.ros_image import MAX_JPEG_FILL_BYTES

    img = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    jpg = numpy_to_compressed(img, "RGB", "jpeg")[1]
    reference = compressed_to_numpy(SimpleNamespace(format="jpeg", data=jpg))[0]
    sof, dht = jpg.index(b"\xff\xc0"), jpg.index(b"\xff\xc4")
    padded = jpg[:sof] + b"\xff" * 100 + jpg[sof:dht] + b"\xff" * 7 + jpg[dht:]
    np.testing.assert_array_equal(compressed_to_numpy(SimpleNamespace(format="jpeg", data=padded))[0], reference)
    half = MAX_JPEG_FILL_BYTES // 2
    flood = jpg[:sof] + b"\xff" * half + jpg[sof:dht] + b"\xff" * (half + 1) + jpg[dht:]  # one byte too many
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "__init__",  # every Pillow decoder starts there
                        lambda *a, **k: pytest.fail("a fill-byte flood reached the decoder"))
    with pytest.raises(ImageFormatError, match=f"more than {MAX_JPEG_FILL_BYTES} fill bytes") as e:
        compressed_to_numpy(SimpleNamespace(format="jpeg", data=flood))
    assert e.value.reason == "decode"


def test_jpeg_metadata_is_bounded():
    """Pillow parses APPn/COM segments in Python and joins Exif blocks one concatenation at a time (1000 blocks of
    64 KiB took 20 s): more than MAX_JPEG_METADATA_BYTES of them are refused; an ICC profile, Exif and a comment
    pass."""
    import io

    from PIL import Image as PILImage

    from icnet_ros.ros_image import MAX_JPEG_METADATA_BYTES

    img = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(img).save(out, "JPEG", icc_profile=b"\x00" * 200_000, exif=b"Exif\x00\x00" + bytes(1000),
                                 comment=b"camera 1")
    jpg = out.getvalue()
    assert compressed_to_numpy(SimpleNamespace(format="jpeg", data=jpg))[0].shape == (16, 16, 3)
    exif = b"\xff\xe1\xff\xff" + b"Exif\x00\x00" + bytes(0xFFFF - 8)
    bomb = jpg[:2] + exif * (MAX_JPEG_METADATA_BYTES // 0xFFFF + 1) + jpg[2:]
    with pytest.raises(ImageFormatError, match="APPn/COM metadata") as e:
        compressed_to_numpy(SimpleNamespace(format="jpeg", data=bomb))
    assert e.value.reason == "decode"


def _cv2_jpeg(img: np.ndarray, *params: int) -> bytes:
    import cv2

    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(img[:, :, ::-1]), list(params))
    assert ok
    return data.tobytes()


@pytest.mark.parametrize("variant", ["restart interval 1", "restart interval 5", "progressive",
                                     "progressive with restarts", "pillow progressive", "pillow restarts",
                                     "pillow progressive with restarts"])
def test_valid_jpegs_with_restarts_and_progressive_scans_decode(variant):
    """Restart markers (RSTn) inside entropy-coded data, 0xFF00 stuffing (noisy frames have plenty) and the ~10
    scans of a progressive JPEG are valid: every such file decodes, to what OpenCV decodes, and the header walk's
    Python work does not grow with the number of restart markers (they are skipped with the scan data)."""
    import io

    import cv2
    from PIL import Image as PILImage

    img = RNG.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    if variant.startswith("pillow"):
        out, kw = io.BytesIO(), {"quality": 90}
        if "progressive" in variant:
            kw["progressive"] = True
        if "restarts" in variant:
            kw["restart_marker_blocks"] = 1
        PILImage.fromarray(img).save(out, "JPEG", **kw)
        data = out.getvalue()
    else:
        params = {"restart interval 1": (cv2.IMWRITE_JPEG_RST_INTERVAL, 1),
                  "restart interval 5": (cv2.IMWRITE_JPEG_RST_INTERVAL, 5),
                  "progressive": (cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
                  "progressive with restarts": (cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_RST_INTERVAL, 2)}
        data = _cv2_jpeg(img, *params[variant])
    restarts = len(re.findall(rb"\xff[\xd0-\xd7]", data))
    scans = data.count(b"\xff\xda")
    assert (restarts > 10) == ("restart" in variant) and (scans > 1) == ("progressive" in variant)
    assert b"\xff\x00" in data  # stuffed bytes in the scan data
    got, order = compressed_to_numpy(SimpleNamespace(format="rgb8; jpeg compressed bgr8", data=data))
    assert order == "RGB" and got.shape == img.shape
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert np.abs(got.astype(int) - expected).mean() < 1
    lines, error = _header_walk_lines(data)
    assert error is None and lines < 1000


def test_sniff_codec_reads_the_signature_not_the_format():
    from icnet_ros.ros_image import sniff_codec

    img = RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    assert sniff_codec(numpy_to_compressed(img, "RGB", "png")[1]) == "png"
    assert sniff_codec(array.array("B", numpy_to_compressed(img, "RGB", "jpeg")[1])) == "jpeg"
    assert sniff_codec(b"") == "" and sniff_codec(b"GIF89a") == "" and sniff_codec(b"\xff") == ""
