"""Shared test helpers: where the read-only data lives, and tiny real checkpoints."""
from __future__ import annotations

import contextlib
import os
import resource
import signal
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: the read-only data beside the repository; ICNET_ROS_TEST_DATA points elsewhere (a lent GPU machine, where the
#: data travels as scripts/device/prepare.sh stages it)
DATA = Path(os.environ.get("ICNET_ROS_TEST_DATA") or REPO.parent / "shared" / "data")
CAMVID = DATA / "camvid"
VIDEO = DATA / "video" / "solidWhiteRight.mp4"


def require(path: Path) -> Path:
    """Skip the calling test, with the reason, when the shared data is not there."""
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


def make_checkpoint(path: Path, arch: str = "icnet_r18", width: float = 0.25, num_classes: int = 11,
                    seed: int = 0, **meta_kwargs) -> Path:
    """A small, randomly initialised but real native checkpoint (BN statistics perturbed so outputs vary)."""
    import torch

    from icnet_ros.checkpoint import build_meta, save_checkpoint
    from icnet_ros.classes import CAMVID as CAMVID_CLASSES
    from icnet_ros.models import build_icnet

    torch.manual_seed(seed)
    model = build_icnet(arch, width=width, num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    class_set = CAMVID_CLASSES if num_classes == 11 else None
    meta = build_meta(model.config, class_set, **meta_kwargs)
    save_checkpoint(model, path, meta)
    return path


def png_with_size(png: bytes, height: int, width: int) -> bytes:
    """A PNG whose IHDR declares another size, with a valid CRC (the shape of a decompression bomb)."""
    import struct
    import zlib

    ihdr = png[12:16] + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def jpeg_with_size(jpg: bytes, height: int, width: int) -> bytes:
    """A baseline JPEG whose frame header (SOF0) declares another size."""
    i = jpg.index(b"\xff\xc0")
    return jpg[: i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpg[i + 9:]


def tiny_onnx(path, meta, size=(64, 64), classes=11, in_shape=None, out_shape=None, prefix=b"", suffix=b""):
    """A tiny stand-in for an ICNet export (AveragePool /8 + 1x1 Conv) carrying ``meta``; ``prefix``/``suffix``:
    raw protobuf bytes around the serialized ModelProto (more top-level fields)."""
    import json

    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    h, w = size
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((classes, 3, 1, 1)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["input"], ["p"], kernel_shape=[8, 8], strides=[8, 8]),
         helper.make_node("Conv", ["p", "W"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape or ["N", 3, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape or ["N", classes, h // 8, w // 8])],
        [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.add(key="icnet_ros", value=meta if isinstance(meta, str) else json.dumps(meta))
    path.write_bytes(prefix + model.SerializeToString() + suffix)
    return path


def export_meta(ckpt, size=(64, 64), **changes):
    """``ckpt``'s metadata as an ONNX export at ``size`` records it, with ``changes``."""
    from icnet_ros.checkpoint import read_metadata

    meta = read_metadata(ckpt)
    meta["network_size"] = meta["input_size"] = list(size)
    meta["provenance"]["exported"] = {"format": "onnx", "size": list(size), "batch": 1, "dynamic_batch": True}
    meta.update(changes)
    return meta


def record_icnet_builds(monkeypatch, module) -> list[str]:
    """Replace ``module.ICNet`` by a wrapper that records the device type of every model it builds (``meta``: no
    memory); returns that list."""
    built: list[str] = []
    real = module.ICNet

    def recording(config):
        m = real(config)
        built.append(next(m.parameters()).device.type)
        return m

    monkeypatch.setattr(module, "ICNet", recording)
    return built


#: a file that Pillow's DDS plugin takes for its own and then raises NotImplementedError on (found by fuzzing)
DDS_JUNK = bytes.fromhex(
    "444453207c0000000f100000060000000700000007000000000000000000000000000000000000000000000000000037000000000000"
    "000000000000000000000000000000000000000000f1200000000000e1000000000008000000000000ff000000ff000000ff000000000"
    "0100000000000000000000000000000000000007ed467cdba9a7d5c9c741a9f706e4e98a87679965cb5ba28c048b142d39e7ddd94a37a"
    "6e3fce819dbdd0")


def mkv_without_duration(path, n=12, size=(64, 64)):
    """A Matroska video whose Segment Info has no Duration element (as browsers' MediaRecorder and live recorders
    write them): OpenCV reports a huge negative frame count for it (-2^63 / 100), though every frame decodes."""
    import cv2
    import numpy as np

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"XVID"), 10, (size[1], size[0]))
    for i in range(n):
        writer.write(np.full((*size, 3), i * 20, np.uint8))
    writer.release()
    data = bytearray(path.read_bytes())
    i = data.find(b"\x44\x89")  # the Duration element: 2-byte ID, 1-byte size (4 or 8), a float
    length = data[i + 2] & 0x7F
    assert i > 0 and data[i + 2] & 0x80 and length in (4, 8), "no Duration element where expected"
    data[i:i + 3 + length] = b"\xec" + bytes([0x80 | (1 + length)]) + bytes(1 + length)  # a Void element as long
    path.write_bytes(bytes(data))
    return path


def jpeg_of_many_scans(scans, size=(64, 64)):
    """A progressive JPEG whose last scan (with the Huffman tables it needs) is repeated ``scans`` more times: each
    scan is a pass over all the image's coefficients, so thousands make a small file decode for seconds; the node
    refuses more than 100 from the header (ros_image.MAX_JPEG_SCANS)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(7).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG", progressive=True, quality=90)
    jpg = buf.getvalue()
    eoi, last = jpg.rindex(b"\xff\xd9"), jpg.rindex(b"\xff\xda")
    start = jpg.rfind(b"\xff\xc4", 0, last)
    start = last if start < 0 else start
    return jpg[:eoi] + jpg[start:eoi] * scans + b"\xff\xd9"


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """The kernel refuses to grow any file of this process past ``nbytes`` (RLIMIT_FSIZE): writes fail with EFBIG
    ('File too large'), as they fail with ENOSPC on a full disk, without needing one. SIGXFSZ is ignored meanwhile
    (it would end the process)."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def signal_once_loaded(proc, signum: int, library: str, timeout: float = 60.0) -> None:
    """Send ``signum`` to the subprocess ``proc`` as soon as a shared library whose path contains ``library`` is
    mapped into it (that import under way), or when it ended or ``timeout`` passed."""
    maps = f"/proc/{proc.pid}/maps"
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if library in open(maps).read():
                break
        except OSError:
            pass
        time.sleep(0.001)
    proc.send_signal(signum)


def signal_once_torch_loads(proc, signum: int, timeout: float = 60.0) -> None:
    """:func:`signal_once_loaded` for torch's library."""
    signal_once_loaded(proc, signum, "libtorch", timeout)


def child_file_size_limit(nbytes: int):
    """A ``preexec_fn`` for subprocess.Popen: the child cannot grow any file past ``nbytes`` (EFBIG, as a full disk
    gives ENOSPC), SIGXFSZ ignored (see :func:`file_size_limit`)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))
    return limit
