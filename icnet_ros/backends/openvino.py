"""OpenVINO: export a native checkpoint to OpenVINO IR (fp32, fp16 weights or NNCF INT8), and run IR files.

Export (:func:`export_openvino`): the network as the torch backend runs it (:func:`icnet_ros.export.
inference_model`: eval-mode copy without the auxiliary heads, BatchNorm folded, concat pyramid pooling factorized)
is traced with an example input and converted (``openvino.convert_model``) at a fixed network input H x W,
multiples of 32 (the pyramid pooling bins depend on it; :func:`icnet_ros.export.check_export_size`), with a
dynamic batch by default (``batch=None``: one compiled model serves every batch the Segmenter forms; it costs
about 3% at batch 1 against a fixed batch of 1, default model at 544x736 on the 2-core dev machine) or a fixed
one. The IR is an ``.xml`` + ``.bin`` pair. The checkpoint's metadata travels in the model's ``rt_info`` under
``icnet_ros`` as JSON (it survives ``save_model`` / ``read_model``), with ``network_size`` = ``input_size`` =
[H, W] and an export record in ``provenance["exported"]`` (format, size, batch, dynamic_batch, precision: fp32,
or int8 for an INT8 model, with ``weights: fp16`` for an fp16 export, whose stored weights only are fp16: they are
decompressed at load time, and it runs at the runtime's precision, fp32 on the CPU by default; OpenVINO
version, source file and SHA-256, date; an earlier record moves under ``previous``, as with ``icnet-convert``),
like the ONNX export's.

INT8 (``int8=True``): post-training quantization with NNCF (``nncf.quantize``) of that torch module, before it is
traced and converted: NNCF's PyTorch backend inserts fake-quantize operations whose ranges it measures on
``calib_count`` images of ``calib_dir`` (an image folder, or a dataset split folder with an ``images/``
subfolder), each resized to the export size exactly as the Segmenter does (bilinear, align_corners False,
float32) and normalised with the checkpoint's normalisation; the conversion turns them into OpenVINO
``FakeQuantize`` operations, which the CPU plugin runs as INT8 kernels. Settings: ``preset=PERFORMANCE``
(symmetric weights and activations, what the CPU plugin runs fastest), no bias correction, and the factorized
pyramid pooling's MatMuls left in float (:func:`int8_ignored_scope`). Measured on the default model at 544x736,
300 CamVid train images, CamVid val mIoU (BENCHMARKS.md): a model trained on train only (val unseen) 71.09 fp32 ->
71.31 INT8; the stage-8 model (val seen in training) 75.89 -> 75.66 (seed 0), 75.87 -> 75.87 (the shipped
three-seed average). The earlier route, quantizing the converted OpenVINO model (NNCF's OpenVINO backend, full bias
correction), cost 0.51 and 1.08 on the train-only and seed-0 models at the same speed; with NNCF's fast bias
correction the torch route gives 71.02 and 75.40. The module is traced with
the fake-quantize operations in their export form (plain ``torch.fake_quantize_per_*`` calls), so no NNCF C++
extension is built or run.

Backend (:func:`open_backend`): reads an IR (or an ``.onnx`` file: OpenVINO reads those directly) and compiles it
for the CPU (``device="cpu"``) or an Intel GPU (``device="xpu"``, OpenVINO's ``GPU``), latency hint, one stream,
``options.threads`` (0: ``torch.get_num_threads()``) inference threads. fp32 is exact: OpenVINO's CPU plugin
otherwise runs fp32 models in bf16 on CPUs with AVX512-BF16/AMX (2% logit error, <99.9% argmax agreement on the
default model), so the inference precision is always set explicitly. Inputs and logits stay in host memory:
the input tensor is shared with OpenVINO without a copy; the logits are a view of the request's output buffer
(valid until the next call, as the backend contract allows).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import META_KEY, CheckpointError, default_model_path
from ..models.icnet import ICNetConfig
from ..preprocess import Normalizer
from .base import BackendOptions, require

NAME = "openvino"
#: OpenVINO inference precision per BackendOptions.precision ("int8": the quantized layers run in INT8 whatever
#: this says; the layers NNCF left in float run in f32)
INFERENCE_PRECISIONS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}
INPUT_NAME, OUTPUT_NAME = "input", "logits"
#: NNCF (PyTorch backend) operation types an INT8 export leaves in float (see :func:`int8_ignored_scope`)
INT8_IGNORED_TYPES = ("matmul",)


def _ov() -> Any:
    return require(NAME, "openvino", "openvino")


# ------------------------------------------------------------------------------------------------------ export

def export_openvino(model_or_path: Any, output: str | os.PathLike, size: tuple[int, int] = (512, 1024),
                    batch: int | None = None, fp16: bool = False, int8: bool = False,
                    calib_dir: str | os.PathLike | None = None, calib_count: int = 300,
                    progress: bool = True, command: str | None = None,
                    int8_options: dict[str, Any] | None = None) -> Path:
    """Export a model to OpenVINO IR (see the module docstring); returns the ``.xml`` path.

    ``model_or_path``: None (the package's default model), a native ``.safetensors`` checkpoint or an ICNet
    module. ``size``: the fixed network input (H, W), multiples of 32. ``batch``: None or 0 = dynamic, N = fixed.
    ``fp16``: weights stored as fp16 (half the file; OpenVINO decompresses them at load time). ``int8``: NNCF
    post-training quantization calibrated on ``calib_count`` images from ``calib_dir`` (``int8_options``: other
    ``nncf.quantize`` arguments, for accuracy experiments; recorded). ``command``: recorded in
    the provenance. ``output``: the ``.xml`` path (``.xml`` is appended when missing); the ``.bin`` goes beside
    it. Files are written atomically: a failed write is OSError ``cannot write <.xml>: <reason>``, no file left."""
    from ..export import check_export_size, exported_meta, inference_model, replace_file
    from ..video import temporary_file

    ov = _ov()
    h, w = check_export_size(size)
    from ..export import MAX_EXPORT_BATCH

    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int)
                              or not 0 <= batch <= MAX_EXPORT_BATCH):
        raise ValueError(f"batch must be None or 0 (dynamic) or a positive integer up to {MAX_EXPORT_BATCH}, got "
                         f"{batch!r}")
    batch = batch or None
    if fp16 and int8:
        raise ValueError("choose fp16 or int8, not both (an INT8 model keeps its remaining float layers in fp32)")
    if int8 and calib_dir is None:
        raise ValueError("int8 export needs calibration images: pass calib_dir (an image folder or a dataset split "
                         "folder with images/)")
    nncf = require(NAME, "nncf", "openvino") if int8 else None  # missing: one line now, not after the export
    out, _ = ir_paths(output)
    calib_images = calibration_images(calib_dir, calib_count) if int8 else []
    check_calibration_images(calib_images)  # an unreadable one fails now, not after minutes of calibration
    if model_or_path is None:
        model_or_path = default_model_path()
    source_file = None if isinstance(model_or_path, nn.Module) else Path(model_or_path).expanduser()
    # the model as the torch backend runs it: BN folded, concat pyramid pooling factorized (OpenVINO would fold
    # the BNs itself; the factorized pooling halves R50's bottleneck multiply-adds), no auxiliary heads
    model, meta = inference_model(model_or_path, (h, w))
    meta = copy.deepcopy(meta)
    # the precision the IR computes in; fp16 compresses only the stored weights (decompressed at load time, the
    # model then runs at the runtime's precision): recorded as such, not as an fp16 model
    record: dict[str, Any] = {"format": "openvino", "size": [h, w], "batch": batch or 1,
                              "dynamic_batch": batch is None, "precision": "int8" if int8 else "fp32",
                              "openvino": ov.get_version().split("-")[0]}
    if fp16:
        record["weights"] = "fp16"
    if nncf is not None:
        folder = Path(calib_dir).expanduser()  # type: ignore[arg-type]
        record["calibration"] = {"folder": folder.name if folder.name != "images" else folder.parent.name,
                                 "count": len(calib_images), "nncf": nncf.__version__, "quantized": "torch",
                                 "preset": "performance", "bias_correction": "none",
                                 "ignored_types": list(INT8_IGNORED_TYPES)}
        if int8_options:
            record["calibration"]["options"] = {k: repr(v) for k, v in int8_options.items()}
        model = quantize_int8(model, calib_images, (h, w), meta["normalization"], progress=progress,
                              **(int8_options or {}))
    example = torch.zeros(1, 3, h, w)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the input checks in forward are constants here
        # (torch 2.13 deprecates torch.jit.trace; convert_model's own PyTorch path traces the same way)
        warnings.simplefilter("ignore", DeprecationWarning)
        # tracing here (once, unchecked) is about twice as fast as letting convert_model trace the module
        traced = torch.jit.trace(model, example, check_trace=False)
        ov_model = ov.convert_model(traced, example_input=example, input=[ov.PartialShape([batch or -1, 3, h, w])])
    del traced, model
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    ov_model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    ov_model.set_friendly_name("icnet")
    meta = exported_meta(meta, record, source_file, command)  # shared with the ONNX export
    ov_model.set_rt_info(json.dumps(meta), META_KEY)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        try:  # unique names beside the output (.NAME.xml.<pid>.<n>.tmp.xml + .bin): no user's file or export hit
            tmp = temporary_file(out, ".xml", companion=".bin")
            ov.save_model(ov_model, str(tmp), compress_to_fp16=fp16)
        except RuntimeError as e:  # a full disk, a file size limit, a folder it cannot write: OpenVINO's words
            raise OSError(f"cannot write {out}: {_reason(e)}") from e
        except OSError as e:  # the temporary files could not be created (a read-only folder)
            raise OSError(str(e) if e.strerror is None else f"cannot write {out}: {e.strerror}") from e
        replace_file(tmp.with_suffix(".bin"), out.with_suffix(".bin"))
        replace_file(tmp, out)  # the .xml last: a reader never finds a new .xml next to an old .bin
    finally:
        if tmp is not None:
            for t in (tmp, tmp.with_suffix(".bin")):
                t.unlink(missing_ok=True)
    return out


def ir_paths(output: str | os.PathLike) -> tuple[Path, Path]:
    """The ``.xml`` and ``.bin`` an OpenVINO export writes for ``output`` (``.xml`` appended when missing; ``b.XML``
    is taken as given), shared by :func:`export_openvino` and icnet-export's checks (which checked ``models/.xml``
    while the export wrote ``models.xml``). An output ending in a path separator or naming a folder is a
    ValueError (:func:`icnet_ros.export.check_output_path`)."""
    from ..export import check_output_path

    out = check_output_path(output)
    if out.suffix.lower() != ".xml":
        out = out.with_name(out.name + ".xml")
    return out, out.with_suffix(".bin")


# ------------------------------------------------------------------------------------------------------ INT8

def calibration_images(calib_dir: str | os.PathLike | None, count: int) -> list[Path]:
    """``count`` images spread evenly over the sorted image files of ``calib_dir`` (or ``calib_dir/images``)."""
    from ..data.datasets import IMAGE_EXTENSIONS

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"calib_count must be a positive integer, got {count!r}")
    root = Path(calib_dir).expanduser()  # type: ignore[arg-type]
    if not root.is_dir():
        raise ValueError(f"calibration folder not found: {root}")
    folder = root / "images" if (root / "images").is_dir() else root
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    if len(files) <= count:
        return files
    step = len(files) / count
    return [files[int(i * step)] for i in range(count)]


def check_calibration_images(files: list[Path]) -> None:
    """Each calibration image decodes, within the readers' pixel bound (:func:`icnet_ros.data.datasets.read_image`);
    else a ValueError naming the file (``cannot read image FILE ...``). Before, NNCF met an unreadable one inside
    its calibration loop, and the export failed after the calibration had run; now it fails before anything runs."""
    from ..data.datasets import read_image

    for f in files:
        read_image(f)  # DatasetError (a ValueError): its message names the file


def calibration_input(image: np.ndarray, size: tuple[int, int], normalizer: Normalizer) -> Tensor:
    """An H x W x 3 uint8 RGB image -> the 1 x 3 x H x W float32 network input the Segmenter would feed."""
    x = torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0).permute(0, 3, 1, 2).float()
    if tuple(x.shape[2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return normalizer(x, "RGB", channels_last_input=False).contiguous()


class _CalibrationSet:
    """Re-iterable calibration inputs, read lazily (one image in memory at a time; NNCF iterates more than once)."""

    def __init__(self, files: list[Path], size: tuple[int, int], normalization: dict[str, Any]) -> None:
        self.files, self.size = files, size
        self.normalizer = Normalizer(normalization)

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Tensor]:
        from ..data.datasets import read_image

        for f in self.files:
            yield calibration_input(read_image(f), self.size, self.normalizer)


def int8_ignored_scope() -> Any:
    """What stays in float in an INT8 export: the MatMuls of the factorized pyramid pooling (ICNet's only MatMuls,
    a few MMACs). Quantized, OpenVINO 2026.4's CPU plugin refuses to compile the model (a per-channel scale check
    in its oneDNN post-ops fails)."""
    nncf = require(NAME, "nncf", "openvino")
    return nncf.IgnoredScope(types=list(INT8_IGNORED_TYPES), validate=False)  # validate=False: a model may have none


def quantize_int8(model: nn.Module, calib_images: list[Path], size: tuple[int, int], normalization: dict[str, Any],
                  progress: bool = True, **nncf_options: Any) -> nn.Module:
    """NNCF post-training INT8 quantization of an inference module (:func:`icnet_ros.export.inference_model`),
    calibrated on ``calib_images`` (see the module docstring): the module with fake-quantize operations, to be
    traced and converted. ``nncf_options`` override ``nncf.quantize``'s arguments (for accuracy experiments).
    NNCF draws its progress bars on stdout: they go to stderr here (before, icnet-export's stdout carried them ahead
    of its result line); ``progress=False`` hides them."""
    nncf = require(NAME, "nncf", "openvino")
    options: dict[str, Any] = {"subset_size": len(calib_images), "preset": nncf.QuantizationPreset.PERFORMANCE,
                               "fast_bias_correction": None, "ignored_scope": int8_ignored_scope(), **nncf_options}
    with contextlib.redirect_stdout(sys.stderr if progress else io.StringIO()), _nncf_log_to_stderr(progress):
        return nncf.quantize(model.eval(), nncf.Dataset(_CalibrationSet(calib_images, size, normalization)),
                             **options)


@contextlib.contextmanager
def _nncf_log_to_stderr(info: bool) -> Iterator[None]:
    """NNCF's logger writes to the stdout it found at import (its 'INFO:nncf:...' lines went to icnet-export's
    stdout, before its result line): to stderr meanwhile, its INFO lines only with ``info``."""
    import logging

    def swap(handler: logging.StreamHandler, stream: Any) -> None:
        # not setStream(), which flushes the old stream first: a closed one (a test's captured stdout, where NNCF
        # was first imported) raised "I/O operation on closed file" and the export failed
        with contextlib.suppress(Exception):
            handler.acquire()
            try:
                handler.stream = stream
            finally:
                handler.release()

    handlers = [h for h in logging.getLogger("nncf").handlers
                if type(h) is logging.StreamHandler and h.stream is not sys.stderr]
    saved = [(h, h.stream, h.level) for h in handlers]
    try:
        for h in handlers:
            swap(h, sys.stderr)
            if not info:
                h.setLevel(max(h.level, logging.WARNING))
        yield
    finally:
        for h, stream, level in saved:
            swap(h, stream)
            h.setLevel(level)


# ------------------------------------------------------------------------------------------------------ reading

#: bits per element of the IR element types a Const may have (OpenVINO's names); sub-byte types are packed
_ELEMENT_BITS = {"f64": 64, "i64": 64, "u64": 64, "f32": 32, "i32": 32, "u32": 32, "f16": 16, "bf16": 16, "i16": 16,
                 "u16": 16, "i8": 8, "u8": 8, "boolean": 8, "f8e4m3": 8, "f8e5m2": 8, "f8e8m0": 8, "i4": 4, "u4": 4,
                 "nf4": 4, "f4e2m1": 4, "u2": 2, "u1": 1}
#: the largest IR .xml read (the default model's is 0.2 MiB, an R50's a few MiB: the weights are in the .bin)
MAX_IR_XML_BYTES = 16 << 20


def ir_problem(xml: Path, weights: Path) -> str | None:
    """Why the IR ``xml`` + ``weights`` must not be given to OpenVINO, or None: every Const's byte size must be its
    shape times its element size (computed without overflow) and lie inside the ``.bin``. OpenVINO checks the same
    in 64-bit arithmetic, where a shape of 2^62 + 33 f32 elements is 132 bytes: it accepted such a file over a
    132-byte .bin, and compiling it read far past the mapped file (SIGBUS, the process ended with no message)."""
    import xml.etree.ElementTree as ET

    size = xml.stat().st_size
    if size > MAX_IR_XML_BYTES:
        return f"an IR .xml of {size} bytes (at most {MAX_IR_XML_BYTES})"
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as e:
        return f"not XML ({e})"
    if root.tag != "net":
        return f"not an OpenVINO IR (its root element is <{root.tag[:40]}>, not <net>)"
    available = weights.stat().st_size
    for layer in root.iter("layer"):
        if layer.get("type") != "Const":
            continue
        data = layer.find("data")
        name = repr((layer.get("name") or "")[:80])
        if data is None:
            return f"Const {name} has no data element"
        kind, shape = data.get("element_type"), data.get("shape", "")
        bits = _ELEMENT_BITS.get(kind or "")
        try:
            dims = [int(d) for d in shape.split(",")] if shape.strip() else []
            offset, length = int(data.get("offset", "")), int(data.get("size", ""))
        except ValueError:
            return f"Const {name}: shape {shape[:80]!r}, offset or size is not a list of integers"
        if bits is None:
            return f"Const {name}: element type {str(kind)[:20]!r} is not one an exported model has"
        count = 1
        for d in dims:
            count *= d
        if min(dims, default=0) < 0 or offset < 0 or length != (count * bits + 7) // 8:
            return (f"Const {name}: shape {dims[:8]}{'...' if len(dims) > 8 else ''} of {kind} is "
                    f"{(count * bits + 7) // 8} bytes, its size says {length}")
        if offset + length > available:
            return f"Const {name} needs bytes {offset}..{offset + length} of {weights.name}, which has {available}"
    return None


def _read_model(core: Any, path: str | os.PathLike) -> tuple[Any, Path, dict[str, Any]]:
    """The model OpenVINO reads from ``path``, the path, and its icnet_ros metadata (validated); the file is checked
    before OpenVINO sees it (:func:`ir_problem`; an .onnx: :func:`icnet_ros.export.read_onnx_metadata`)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"model not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"model path is not a file: {p}")
    suffix = p.suffix.lower()  # as backend_for chose the backend
    if suffix not in (".xml", ".onnx"):
        raise CheckpointError(f"{p}: not an OpenVINO model (expected an IR .xml with its .bin, or .onnx)")
    weights = next((b for b in (p.with_suffix(".bin"), p.with_suffix(".BIN")) if b.is_file()), None)
    if suffix == ".xml" and weights is None:
        raise CheckpointError(f"{p}: the weights file {p.with_suffix('.bin').name} is missing beside it")
    if suffix == ".onnx":
        from ..export import read_onnx_metadata

        meta = read_onnx_metadata(p)  # a complete, self-contained file with icnet_ros metadata, or one line
    else:
        try:
            problem = ir_problem(p, weights)
        except OSError as e:
            problem = f"cannot read it: {e.strerror or e}"
        if problem:
            raise CheckpointError(f"{p}: {problem}; not an IR that icnet-export wrote")
    try:
        if suffix == ".onnx":  # only the ONNX frontend: read_model would also try others on a damaged file
            from openvino.frontend import FrontEndManager

            frontend = FrontEndManager().load_by_framework("onnx")
            return frontend.convert(frontend.load(str(p))), p, meta
        ov_model = core.read_model(str(p), str(weights))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses with multi-line messages
        raise CheckpointError(f"{p}: OpenVINO cannot read it (corrupt, truncated or not a model?): "
                              f"{_reason(e)}") from e
    return ov_model, p, _ir_meta(ov_model, p)


def _reason(e: Exception) -> str:
    """One line of an OpenVINO exception: its messages are several lines, source locations first."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("Exception from")]
    return lines[-1] if lines else type(e).__name__


def _ir_meta(ov_model: Any, path: Path) -> dict[str, Any]:
    """An IR's icnet_ros metadata: rt_info["icnet_ros"], validated."""
    if not ov_model.has_rt_info([META_KEY]):
        raise CheckpointError(f"{path}: no icnet_ros metadata in the model (rt_info '{META_KEY}'); not an icnet_ros "
                              "export (export checkpoints with icnet-export)")
    from ..export import MAX_METADATA_BYTES, parse_export_meta

    text = ov_model.get_rt_info([META_KEY]).astype(str)
    if len(text) > MAX_METADATA_BYTES or len(text.encode("utf-8", "replace")) > MAX_METADATA_BYTES:
        raise CheckpointError(f"{path}: icnet_ros metadata larger than {MAX_METADATA_BYTES} bytes; not an icnet_ros "
                              "export (real metadata is a few KiB)")
    return parse_export_meta(text, path)


def read_openvino_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The icnet_ros metadata of an exported model (validated; :class:`CheckpointError` with one line if the file
    is missing, unreadable, foreign or truncated)."""
    return _read_model(_ov().Core(), path)[2]


# ------------------------------------------------------------------------------------------------------ backend

class OpenVINOBackend:
    """A compiled OpenVINO model behind the backend contract (base.py); see the module docstring."""

    name = NAME
    input_dtype = torch.float32
    memory_format = torch.contiguous_format

    def __init__(self, path: str | os.PathLike, options: BackendOptions = BackendOptions()) -> None:
        ov = _ov()
        core = ov.Core()
        ov_model, self.path, self.meta = _read_model(core, path)
        shape = ov_model.inputs[0].get_partial_shape() if len(ov_model.inputs) == 1 else None
        if (shape is None or len(ov_model.outputs) != 1 or shape.rank.is_dynamic or shape.rank.get_length() != 4
                or shape[1].is_dynamic or shape[1].get_length() != 3):
            raise CheckpointError(f"{self.path}: not an ICNet export (expected one N x 3 x H x W input and one "
                                  "output)")
        if shape[2].is_dynamic or shape[3].is_dynamic:
            raise CheckpointError(f"{self.path}: the network input size is not fixed (export with a fixed H x W)")
        self.fixed_size: tuple[int, int] | None = (shape[2].get_length(), shape[3].get_length())
        network = tuple(self.meta["network_size"])  # validated: at most MAX_UPSCALED_PIXELS
        if self.fixed_size != network:
            raise CheckpointError(f"{self.path}: the model's input is {self.fixed_size[0]}x{self.fixed_size[1]}, "
                                  f"the metadata's network_size {network[0]}x{network[1]}; a model file sets one "
                                  "network size")
        self.max_batch: int | None = None if shape[0].is_dynamic else shape[0].get_length()
        from ..export import MAX_EXPORT_BATCH

        if self.max_batch is not None and not 1 <= self.max_batch <= MAX_EXPORT_BATCH:  # each call padded to it
            raise CheckpointError(f"{self.path}: the model's fixed batch is {self.max_batch}, not 1 to "
                                  f"{MAX_EXPORT_BATCH}")
        self.exact_batch = self.max_batch is not None
        self.num_classes = int(self.meta["arch"]["num_classes"])
        self.logits_size = ICNetConfig.from_dict(self.meta["arch"]).logits_size  # validated with the metadata
        self._check_output(ov_model.outputs[0].get_partial_shape())
        self.int8 = any(op.get_type_name() == "FakeQuantize" for op in ov_model.get_ops())
        precision = options.precision
        if precision not in INFERENCE_PRECISIONS:
            raise ValueError(f"openvino precision must be one of {sorted(INFERENCE_PRECISIONS)}, got {precision!r}")
        if precision == "int8" and not self.int8:
            raise ValueError(f"{self.path} is not an INT8 model; export one with --int8 (NNCF) or use precision "
                             "fp32")
        self.precision = "int8" if self.int8 else precision

        # torch device -> OpenVINO device: the CPU, or an Intel GPU (torch's "xpu"); tensors stay on the host
        if options.device.type == "cpu":
            ov_device = "CPU"
        elif options.device.type == "xpu":
            ov_device = "GPU"
            if not any(d.startswith("GPU") for d in core.available_devices):
                raise ValueError(f"device {options.device}: OpenVINO finds no Intel GPU (available: "
                                 f"{', '.join(core.available_devices)})")
            if options.device.index is not None:
                ov_device = f"GPU.{options.device.index}"
        else:
            raise ValueError(f"the openvino backend runs on the CPU or an Intel GPU (device 'xpu'), not "
                             f"{options.device}; use the torch, onnxruntime or tensorrt backend there")
        self.device = torch.device("cpu")
        self.threads = int(options.threads or torch.get_num_threads())
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                                  "INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS[precision]}
        if ov_device == "CPU":
            config["INFERENCE_NUM_THREADS"] = self.threads
        if options.cache_dir:  # OpenVINO's compiled-model cache: its blobs replace the model when they are read
            from .tensorrt import cache_folder_problem

            cache = Path(options.cache_dir).expanduser()
            cache.mkdir(mode=0o700, parents=True, exist_ok=True)
            problem = cache_folder_problem(cache)
            if problem:
                raise CheckpointError(f"{self.path}: refusing OpenVINO's model cache: {problem}; a cached blob runs "
                                      "instead of the model: chmod go-w the folder and its files (and own them), or "
                                      "set engine_cache to a folder of your own")
            config["CACHE_DIR"] = str(cache)
        try:
            self._compiled = core.compile_model(ov_model, ov_device, config)
        except Exception as e:  # noqa: BLE001 - e.g. a precision the device does not support
            raise ValueError(f"{self.path}: OpenVINO cannot compile it for {ov_device} with {precision}: "
                             f"{_reason(e)}") from e
        self._request = self._compiled.create_infer_request()
        self.version = ov.get_version().split("-")[0]
        self.provider = ov_device

    def _logits_shape(self, batch: int | None) -> tuple[int | None, int, int, int]:
        h, w = self.fixed_size  # type: ignore[misc]
        return (batch, self.num_classes, *self.logits_size(h, w))

    def _check_output(self, shape: Any) -> None:
        """The model's output (partial) shape against the metadata's logits where it is static: labels index the
        metadata's classes, so a model with more output classes than it lists must not run."""
        if shape.rank.is_dynamic or shape.rank.get_length() != 4:
            raise CheckpointError(f"{self.path}: the model's output is {shape}, not N x classes x H x W logits")
        for i, (name, want) in enumerate(zip(("batch", "class", "height", "width"),
                                             self._logits_shape(self.max_batch))):
            if want is not None and shape[i].is_static and shape[i].get_length() != want:
                raise CheckpointError(f"{self.path}: the model's output {name} dimension is "
                                      f"{shape[i].get_length()}, the metadata needs {want} ({self.num_classes} "
                                      f"classes at {self.fixed_size[0]}x{self.fixed_size[1]})")

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[2:]) != self.fixed_size or x.shape[1] != 3:
            raise ValueError(f"openvino model {self.path.name} takes N x 3 x {self.fixed_size[0]} x "
                             f"{self.fixed_size[1]} inputs, got {tuple(x.shape)}")
        if self.max_batch is not None and x.shape[0] != self.max_batch:
            raise ValueError(f"openvino model {self.path.name} was exported with a fixed batch of {self.max_batch}, "
                             f"got {x.shape[0]} frames")
        a = x.detach().to("cpu", torch.float32).numpy()
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        self._request.infer({0: a}, share_inputs=True, share_outputs=True)
        out = self._request.get_output_tensor(0).data
        if out.shape != self._logits_shape(x.shape[0]):  # a dimension the model left dynamic resolved otherwise
            raise RuntimeError(f"openvino model {self.path.name} returned logits of shape {list(out.shape)}, the "
                               f"metadata needs {list(self._logits_shape(x.shape[0]))}")
        return torch.from_numpy(out)

    def describe(self) -> str:
        size = "x".join(map(str, self.fixed_size or ()))
        batch = self.max_batch or "dynamic"
        threads = f", {self.threads} threads" if self.provider == "CPU" else ""
        return (f"openvino {self.version} on {self.provider} | {self.precision}{threads} | input {size}, "
                f"batch {batch} | {self.path.name}")

    def close(self) -> None:
        self._request = None
        self._compiled = None


def open_backend(path: str | os.PathLike, options: BackendOptions = BackendOptions()) -> OpenVINOBackend:
    """An :class:`OpenVINOBackend` for an exported model (``.xml`` IR or ``.onnx``)."""
    return OpenVINOBackend(path, options)


__all__ = ["INFERENCE_PRECISIONS", "INT8_IGNORED_TYPES", "OpenVINOBackend", "calibration_input",
           "check_calibration_images", "export_openvino", "int8_ignored_scope", "ir_paths", "open_backend",
           "quantize_int8", "read_openvino_metadata"]
