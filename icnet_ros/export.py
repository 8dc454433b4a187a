"""ONNX export of ICNet checkpoints for the ONNX Runtime and TensorRT backends, and reading an export's metadata.

:func:`export_onnx` writes one self-contained ``.onnx`` file: the network's graph at a fixed input size with a
dynamic (or fixed) batch axis, and the checkpoint's metadata as JSON in the ONNX ``metadata_props`` under the key
``icnet_ros`` (the same key as in native checkpoints), so the file is a complete model for the node and the CLIs.

The graph:

- input ``input``: ``N x 3 x H x W`` float32, normalised as the metadata's ``normalization`` says (the Segmenter
  does it); output ``logits``: ``N x classes x H/8 x W/8`` float32 (H/4 x W/4 with the paper head). H and W are
  fixed (the pyramid pooling's bins depend on them) and multiples of 32 (ICNet's branches only line up there,
  :data:`icnet_ros.sizes.SIZE_DIVISOR`); the metadata records them as ``network_size`` (and as the recommended
  ``input_size``).
- the model as the torch backend runs it: an eval-mode private copy without the training-only auxiliary heads,
  BatchNorm folded into the convolutions and a concat pyramid pooling factorized
  (:func:`icnet_ros.optimize.factorize_pyramid_pooling`, about half the multiply-adds of R50's bottleneck; its
  resize matrices become constants of the fixed size). Both are exact up to float rounding and verified when
  applied.
- ``fp16=True``: weights and activations in float16, input and output stay float32 (one Cast at each end), so an
  fp16 file has the same interface as an fp32 one and the Segmenter feeds both the same way; the file is half the
  size. It is also TensorRT's fp16 route: TensorRT builds it as a strongly typed fp16 engine (TensorRT 11 has no
  other; :mod:`icnet_ros.backends.tensorrt`).

The exporter is ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript): the TorchScript exporter
(``dynamo=False``) cannot export adaptive average pooling whose output size does not divide its input (the 3- and
6-bin pooling of a 16 x 32 low-branch map), which ICNet has at most sizes. The decomposition the dynamo exporter
uses (ReduceMean over gathered windows) runs in ONNX Runtime and TensorRT.

:func:`read_onnx_metadata` reads the file's protobuf fields without the tensor data (at most
:data:`MAX_TOP_LEVEL_FIELDS` at the top level and :data:`MAX_GRAPH_FIELDS` in the graph, read in 64 KiB chunks), so
it is cheap on large models, needs no ``onnx`` package and runs no code; a truncated file, a non-ONNX file, an ONNX
model without icnet_ros metadata and one whose tensors name other files (external data, which the runtimes would
read from the model's folder) raise :class:`~icnet_ros.checkpoint.CheckpointError` with one line. The runtimes
check the graph itself when they load it.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from .backends.base import require
from .checkpoint import (MAX_META_BYTES, META_KEY, CheckpointError, default_model_path, file_sha256, inference_copy,
                         record_export, validate_meta)
from .models.icnet import MIN_INPUT_SIZE
from .optimize import FactorizedPyramidPooling, factorize_pyramid_pooling, fold_batchnorm
from .sizes import MAX_BATCH, MAX_UPSCALED_PIXELS, SIZE_DIVISOR, aligned_size
from .video import temporary_file

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: all metadata entries of an exported file together are at most this large before any is parsed (a guard against
#: hostile files: real metadata is a few KiB, and its JSON text at most MAX_META_BYTES, as a checkpoint's)
MAX_METADATA_BYTES = 2 * MAX_META_BYTES
#: the largest batch an export records or fixes: a TensorRT optimisation profile covers 1..it, and a fixed-batch
#: model pads every call to it (as many cameras as the node batches at most)
MAX_EXPORT_BATCH = MAX_BATCH


def check_export_size(size: tuple[int, int] | list[int]) -> tuple[int, int]:
    """(H, W) as ints if both are multiples of :data:`SIZE_DIVISOR`, at least the network minimum and at most
    :data:`~icnet_ros.sizes.MAX_UPSCALED_PIXELS` pixels together; else ValueError (naming the nearest valid size)."""
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"export size must be (H, W), got {size!r}") from None
    if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE or h % SIZE_DIVISOR or w % SIZE_DIVISOR:
        ah, aw = aligned_size(h, w)
        raise ValueError(f"export size {h}x{w}: height and width must be multiples of {SIZE_DIVISOR} and at least "
                         f"{MIN_INPUT_SIZE} (ICNet's branches misalign otherwise); nearest valid size: {ah}x{aw}")
    if h * w > MAX_UPSCALED_PIXELS:
        raise ValueError(f"export size {h}x{w}: more than {MAX_UPSCALED_PIXELS} pixels, the largest network input "
                         "a model file may set")
    return h, w


class _Float16(nn.Module):
    """The network in float16 with float32 input and output (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def inference_model(model_or_path: Any, size: tuple[int, int], fp16: bool = False
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """The module to export and its metadata: a private eval copy (no auxiliary heads) with BatchNorm folded and
    the pyramid pooling factorized, its resize matrices for ``size`` computed here (constants in the graph). A
    rewrite whose verification fails (the model was restored) is left out with a RuntimeWarning, as the torch
    backend does: the export then computes what the torch backend runs (before, a RuntimeError traceback)."""
    model, meta = inference_copy(model_or_path)  # (a model with NaN or infinite logits is refused there)
    probe = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    for rewrite in (fold_batchnorm, factorize_pyramid_pooling):
        try:
            rewrite(model, probe)  # exact up to rounding; verified (restores and raises otherwise)
        except RuntimeError as e:
            warnings.warn(f"{e}; exported without it", RuntimeWarning, stacklevel=2)
    ppms = [m for m in model.modules() if isinstance(m, FactorizedPyramidPooling)]
    sizes: dict[nn.Module, tuple[int, int]] = {}

    def record_size(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        sizes[module] = tuple(inputs[0].shape[2:])

    hooks = [m.register_forward_pre_hook(record_size) for m in ppms]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, *size))  # fp32 on the CPU: seconds (an fp16 forward there takes minutes)
    finally:
        for hook in hooks:
            hook.remove()
    dtype = torch.float16 if fp16 else torch.float32
    for m, (h, w) in sizes.items():
        m.resize_shift_matrix(h, w, dtype, torch.device("cpu"))  # cached: the traced forward finds it
    return (_Float16(model) if fp16 else model).eval(), meta


def supported_opsets() -> tuple[int, int]:
    """(lowest, highest) ONNX opset :func:`export_onnx` can write: the dynamo exporter builds the graph at its
    onnxscript opset (18) and converts it to the one asked for (by default torch's, 20 in torch 2.13), up to the
    installed onnx package's newest; converting down fails for ICNet's Pad (the converter has no adapter), so a
    lower opset cannot be honoured."""
    import onnx

    try:
        from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET as lowest
    except ImportError:  # private constant moved: the value of torch 2.5-2.13
        lowest = 18
    return int(lowest), int(onnx.defs.onnx_opset_version())


def check_opset(opset: int | None) -> int | None:
    """``opset`` if :func:`export_onnx` can write it (None: the exporter's own), else ValueError naming the range."""
    if opset is None:
        return None
    lowest, highest = supported_opsets()
    if not lowest <= int(opset) <= highest:
        raise ValueError(f"ONNX opset {opset} is not supported here: this exporter (torch.onnx dynamo, onnx "
                         f"{_onnx_version()}) writes opsets {lowest} to {highest}; without --opset, its default")
    return int(opset)


def check_output_path(output: str | os.PathLike, what: str = "output") -> Path:
    """An export's output file name as a Path; ValueError for one that ends in a path separator or names an existing
    folder. Before: ``models/`` was taken as ``models`` (OpenVINO wrote ``models.xml`` beside an empty ``models/``,
    ONNX failed after the whole export with ``[Errno 21] Is a directory``)."""
    text = os.fspath(output)
    if text.endswith(tuple(s for s in (os.sep, os.altsep) if s)):
        raise ValueError(f"{what} {text}: ends in a path separator; name the file to write, not a folder")
    path = Path(text).expanduser()
    if path.is_dir():
        raise ValueError(f"{what} {text}: is a folder, not a file; name the file to write")
    return path


def replace_file(tmp: Path, final: Path) -> None:
    """``os.replace(tmp, final)``; its OSError as ``cannot write FINAL: REASON`` (a folder of that name, a read-only
    folder), as the other write errors."""
    try:
        os.replace(tmp, final)
    except OSError as e:
        raise OSError(f"cannot write {final}: {e.strerror or e}") from e


def _onnx_version() -> str:
    import onnx

    return str(getattr(onnx, "__version__", "?"))


def export_onnx(model_or_path: Any, output: str | os.PathLike, size: tuple[int, int] = (512, 1024), batch: int = 1,
                dynamic_batch: bool = True, fp16: bool = False, opset: int | None = None,
                command: str | None = None, progress: bool = False) -> Path:
    """Export a model to a self-contained ONNX file (see the module docstring); returns the output path.

    ``model_or_path``: None (the package's default model), a native ``.safetensors`` checkpoint or an ICNet module.
    ``size``: the fixed network input (H, W), multiples of 32. ``batch``: with ``dynamic_batch`` the batch axis is
    dynamic and ``batch`` is only recorded (TensorRT builds its optimisation profile for 1..batch); without it the
    batch is fixed to ``batch``. ``opset``: ONNX opset (default: the exporter's; one it cannot write is a
    ValueError before anything runs, see :func:`supported_opsets`; never silently another). ``command``: recorded in
    the provenance (the CLI passes its command line). ``progress``: a tqdm bar over the steps (the exporter's step
    takes from seconds to minutes). The file is written atomically."""
    from tqdm import tqdm

    onnx = require("onnx", "onnx", "onnx")  # the onnx extra installs onnx, onnxscript and onnxruntime
    require("onnx", "onnxscript", "onnx")
    h, w = check_export_size(size)
    opset = check_opset(opset)
    if not 1 <= int(batch) <= MAX_EXPORT_BATCH:
        raise ValueError(f"batch must be 1 to {MAX_EXPORT_BATCH}, got {batch}")
    batch = int(batch)
    output = check_output_path(output)
    if model_or_path is None:
        model_or_path = default_model_path()
    source_file = None if isinstance(model_or_path, nn.Module) else Path(model_or_path).expanduser()
    bar = tqdm(total=3, desc="export onnx", unit="step", disable=not progress, leave=False)
    try:
        bar.set_postfix_str("loading and optimising the model")
        model, meta = inference_model(model_or_path, (h, w), fp16)
        bar.update()
        bar.set_postfix_str("torch.onnx.export (dynamo)")
        # dynamic batch: an example batch of 2 (torch.export specialises a batch of 1 to the constant 1), whatever
        # --batch records (an example of 64 frames took 1.5 GB more at 1024x2048, for a shape alone)
        example = torch.randn(2 if dynamic_batch else batch, 3, h, w)
        dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
        with _quiet_exporter():
            program = torch.onnx.export(model, (example,), None, dynamo=True, external_data=False, verbose=False,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                                        dynamic_shapes=dynamic_shapes, optimize=True)
        proto = program.model_proto
        bar.update()
        bar.set_postfix_str(f"writing {output.name}")
        used_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
        if opset is not None and used_opset != opset:  # the converter gave up and kept its own opset: say so
            raise ValueError(f"ONNX opset {opset} could not be written: the exporter's converter kept opset "
                             f"{used_opset}; export without --opset (opset {used_opset}) or with a supported one")
        record = {"format": "onnx", "size": [h, w], "batch": batch, "dynamic_batch": bool(dynamic_batch),
                  "fp16": bool(fp16), "opset": used_opset, "exporter": "torch.onnx (dynamo)",
                  "onnx": getattr(onnx, "__version__", None)}
        meta = exported_meta(meta, record, source_file, command)
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta)
        proto.producer_name, proto.doc_string = "icnet_ros", f"ICNet {meta['arch']['backbone']} ({meta['dataset']})"

        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = None
        try:
            tmp = temporary_file(output)  # a unique name: another export or a user's file is never touched
            onnx.save_model(proto, str(tmp))
            replace_file(tmp, output)  # never leave a half-written model behind
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        bar.update()
    finally:
        bar.close()
    return output


def exported_meta(meta: dict[str, Any], record: dict[str, Any], source_file: Path | None = None,
                  command: str | None = None) -> dict[str, Any]:
    """A validated copy of a model's metadata for an export at ``record["size"]``: no auxiliary heads, that size as
    ``network_size`` (and recommended ``input_size``), and ``record`` (what the export did) completed with the
    torch version, the date, the source file's name and SHA-256 and ``command``, as ``provenance.exported``; an
    earlier export record moves under ``previous``, as with icnet-convert."""
    meta = copy.deepcopy(meta)
    h, w = record["size"]
    meta["arch"] = {**meta["arch"], "aux_heads": False}
    meta["network_size"] = [h, w]
    meta["input_size"] = [h, w]
    if not isinstance(meta.get("provenance"), dict):  # from a file: anything else is treated as absent
        meta["provenance"] = {}
    record = {**record, "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()}
    if source_file is not None:
        record["from"] = source_file.name
        record["sha256"] = file_sha256(source_file)
    if command:
        record["command"] = command
    record_export(meta, record)  # an export of an export (e.g. icnet-convert --fp16, then this) keeps the chain
    validate_export_meta(meta)
    return meta


def export_record(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta["provenance"]["exported"]``, the last export's record; {} when absent or when either is not a JSON
    object (metadata comes from files: a wrong type is treated as absent, never an AttributeError)."""
    provenance = meta.get("provenance")
    record = provenance.get("exported") if isinstance(provenance, dict) else None
    return record if isinstance(record, dict) else {}


def profile_batch(meta: dict[str, Any]) -> int | None:
    """For an export with a dynamic batch axis: the largest batch a TensorRT optimisation profile covers (the
    export's ``batch``, 1 when absent, at most :data:`MAX_EXPORT_BATCH`: a file of an earlier version recording more
    still loads, its profile bounded); None for a fixed-batch export (``dynamic_batch`` false). A ``batch`` that is
    not a positive integer is a :class:`CheckpointError`."""
    record = export_record(meta)
    if record.get("dynamic_batch", True) is False:
        return None
    batch = record.get("batch")
    if batch is None:
        return 1
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise CheckpointError(f"invalid export batch in metadata: {repr(batch)[:40]} (need a positive integer)")
    return min(batch, MAX_EXPORT_BATCH)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs a warning per missing optional operator library (torchvision) and torch.export warns about
    its own deprecated internals; those are noise here."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    # its version converter logs a traceback when it cannot convert, then keeps the graph's own opset: export_onnx
    # checks the opset it got and raises one line instead
    converter = logging.getLogger("onnxscript.version_converter")
    converter_level = converter.level
    converter.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)
        converter.setLevel(converter_level)


# ----------------------------------------------------------------------------------------------- reading metadata
# ONNX files are protobuf ModelProto messages. The top level is scanned for field 14, metadata_props (repeated
# StringStringEntryProto {1: key, 2: value}), field 7 the graph and field 1 the IR version. The graph and the local
# functions (field 25) are walked message by message, without reading tensor data, to refuse tensors stored in
# other files (external data: ONNX Runtime and OpenVINO read any file in the model's folder that a tensor names, and
# the graph could publish its bytes as labels; icnet-export's files are self-contained). Wire types: 0 varint,
# 1 fixed64, 2 length-delimited, 5 fixed32.
_IR_VERSION, _GRAPH, _METADATA_PROPS, _FUNCTIONS = 1, 7, 14, 25
#: the most top-level fields the scan walks: a real export has a few dozen (ir_version, producer, graph, opset
#: imports, metadata, local functions); a file of millions of tiny fields would otherwise cost seconds per MiB
MAX_TOP_LEVEL_FIELDS = 4096
#: the most fields the walk of the graph and functions reads (the default model's export: about 6100; a file of
#: millions of tiny fields would otherwise cost seconds), and the deepest it nests (subgraphs of subgraphs)
MAX_GRAPH_FIELDS, MAX_GRAPH_NESTING = 1 << 20, 32
#: bytes read at a time around the scan's position (tensor data, skipped, is never read)
_CHUNK = 1 << 16
# the messages the walk descends into: {message: {field: message}} (onnx.proto); every other field is skipped
_GRAPH_MSG, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE_TENSOR, _FUNCTION = "graph", "node", "attribute", "tensor", \
    "sparse tensor", "function"
_CHILDREN: dict[str, dict[int, str]] = {
    _GRAPH_MSG: {1: _NODE, 5: _TENSOR, 15: _SPARSE_TENSOR},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH_MSG, 10: _TENSOR, 11: _GRAPH_MSG, 22: _SPARSE_TENSOR, 23: _SPARSE_TENSOR},
    _SPARSE_TENSOR: {1: _TENSOR, 2: _TENSOR},  # values, indices
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},  # node, attribute_proto (default values)
    _TENSOR: {},
}
_TENSOR_NAME, _EXTERNAL_DATA, _DATA_LOCATION, _EXTERNAL = 8, 13, 14, 1


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The icnet_ros metadata of an exported ``.onnx`` file, validated, without loading the graph.

    Raises :class:`CheckpointError` (one line) for a missing, truncated or non-ONNX file, for an ONNX model without
    icnet_ros metadata and for one with a tensor stored in another file (external data)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"model not found: {path}" if not path.exists() else f"model path is not a file: {path}")
    try:
        with open(path, "rb") as f:
            props = _scan_model_proto(f, os.fstat(f.fileno()).st_size)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    except _Malformed as e:
        raise CheckpointError(f"{path}: not a complete ONNX model ({e})") from None
    except _NotSelfContained as e:
        raise CheckpointError(f"{path}: {e}; a model must not read other files (icnet-export writes self-contained "
                              "ones)") from None
    if META_KEY not in props:
        raise CheckpointError(f"{path}: ONNX model without icnet_ros metadata (not exported by icnet-export; export "
                              "a native checkpoint with: icnet-export MODEL --format onnx)")
    return parse_export_meta(props[META_KEY], path)


def parse_export_meta(text: str | bytes, source: str | os.PathLike) -> dict[str, Any]:
    """An exported model's icnet_ros metadata from its JSON text, validated (:func:`validate_export_meta`);
    CheckpointError naming ``source`` and the problem, in one line. Text longer than a checkpoint's metadata may be
    (:data:`~icnet_ros.checkpoint.MAX_META_BYTES`, as ``json.dumps`` writes it) is refused before it is parsed."""
    if len(text) > MAX_META_BYTES:
        raise CheckpointError(f"{source}: icnet_ros metadata of {len(text)} bytes (at most {MAX_META_BYTES}; real "
                              "metadata is a few KiB)")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{source}: icnet_ros metadata is not valid JSON: {e}") from None
    except ValueError as e:  # an integer of more than 4300 digits (Python's conversion limit)
        raise CheckpointError(f"{source}: icnet_ros metadata cannot be read: {str(e).split(';')[0]}") from None
    except RecursionError:  # e.g. 100000 nested arrays: the decoder's recursion limit
        raise CheckpointError(f"{source}: icnet_ros metadata is nested too deeply to parse") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: icnet_ros metadata is not a JSON object")
    try:  # (its size and nesting depth bounded as a checkpoint's: validate_meta)
        validate_export_meta(meta)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    return meta


def validate_export_meta(meta: dict[str, Any]) -> None:
    """:func:`~icnet_ros.checkpoint.validate_meta` plus the export's fixed ``network_size`` [H, W]: integers, each
    at least the network minimum, at most :data:`~icnet_ros.sizes.MAX_UPSCALED_PIXELS` pixels together (every
    frame runs at it: a file must not set an unbounded input), and the export record's batch
    (:func:`profile_batch`)."""
    validate_meta(meta)
    size = meta.get("network_size")
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
            or min(size) < MIN_INPUT_SIZE or size[0] * size[1] > MAX_UPSCALED_PIXELS):
        raise CheckpointError(f"invalid network_size in metadata: {repr(size)[:80]} (need [H, W], integers each >= "
                              f"{MIN_INPUT_SIZE}, at most {MAX_UPSCALED_PIXELS} pixels)")
    profile_batch(meta)  # a dynamic export's batch: bounded, or refused here


class _Malformed(Exception):
    pass


class _Window:
    """A file's bytes at absolute positions, read in chunks of :data:`_CHUNK` around where the walk is (the graph
    and other skipped fields are never read); ``reads`` counts the file reads."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size = f, size
        self.start, self.buf, self.reads = 0, b"", 0

    def at(self, pos: int) -> tuple[bytes, int]:
        """The buffered bytes and the offset of ``pos`` in them, with up to 10 bytes (a varint) from ``pos`` on."""
        off = pos - self.start
        if off < 0 or off + 10 > len(self.buf) and self.start + len(self.buf) < self.size:
            self.f.seek(pos)
            self.start, self.buf, off = pos, self.f.read(_CHUNK), 0
            self.reads += 1
        return self.buf, off

    def read(self, pos: int, length: int) -> bytes:
        buf, off = self.at(pos)
        if off + length <= len(buf):
            return buf[off:off + length]
        self.f.seek(pos)
        self.reads += 1
        data = self.f.read(length)
        if len(data) != length:
            raise _Malformed(f"truncated: {length} bytes at byte {pos}, the file ends at {pos + len(data)}")
        return data


def _scan_model_proto(f: BinaryIO, size: int) -> dict[str, str]:
    """metadata_props of the ModelProto in ``f`` (``size`` bytes); raises _Malformed naming the first problem."""
    props: dict[str, str] = {}
    seen: set[int] = set()
    window = _Window(f, size)
    walked = [0]  # fields read inside the graph and functions
    metadata = 0
    for field, wire, value, pos in _fields(window, 0, size, [0], MAX_TOP_LEVEL_FIELDS,
                                           "top-level fields (an export has a few dozen)"):
        if field in (_IR_VERSION, _GRAPH) and wire != (0 if field == _IR_VERSION else 2):
            raise _Malformed(f"field {field} has wire type {wire}")
        if field == _METADATA_PROPS and wire == 2:
            metadata += value
            if metadata > MAX_METADATA_BYTES:
                raise _Malformed(f"more than {MAX_METADATA_BYTES} bytes of metadata")
            key, text = _parse_entry(window.read(pos, value))
            props[key] = text
        elif field in (_GRAPH, _FUNCTIONS) and wire == 2:
            _walk(window, pos, pos + value, _GRAPH_MSG if field == _GRAPH else _FUNCTION, 1, walked)
        seen.add(field)
    missing = [n for n, k in (("ir_version", _IR_VERSION), ("graph", _GRAPH)) if k not in seen]
    if missing:
        raise _Malformed(f"no {' and no '.join(missing)}")
    return props


def _fields(window: _Window, pos: int, end: int, count: list[int], limit: int, what: str
            ) -> Iterator[tuple[int, int, int | None, int]]:
    """The fields of the message in bytes [pos, end) as (field number, wire type, value, position): the value of a
    varint, the length of a length-delimited field (its payload at the position), None for a fixed-size one.
    ``count``: fields read so far, shared by the walk's messages; more than ``limit`` (``what``) is _Malformed, as
    is every structural problem."""
    while pos < end:
        count[0] += 1
        if count[0] > limit:
            raise _Malformed(f"more than {limit} {what}")
        tag, pos = _read_varint(window, pos, end)
        if tag > 0xFFFFFFFF:  # protobuf reads a tag as 32 bits: AA 80 80 80 10 is its field 5 (a graph's tensors), not
            # field 2**29 + 5, which this walk skipped (a tensor with external data then passed unseen)
            raise _Malformed(f"invalid field tag (more than 32 bits) before byte {pos}")
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise _Malformed(f"invalid field number 0 at byte {pos}")
        if wire == 0:
            value, pos = _read_varint(window, pos, end)
            yield field, wire, value, pos
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed(f"truncated: a field ends at byte {pos}, its message at byte {end}")
            yield field, wire, None, pos
        elif wire == 2:
            length, pos = _read_varint(window, pos, end)
            if pos + length > end:
                raise _Malformed(f"truncated: field {field} needs {length} bytes at byte {pos}, its message ends at "
                                 f"byte {end}")
            yield field, wire, length, pos
            pos += length
        else:
            raise _Malformed(f"invalid wire type {wire} at byte {pos}")


class _NotSelfContained(Exception):
    pass


def _walk(window: _Window, pos: int, end: int, kind: str, depth: int, walked: list[int]) -> None:
    """Walk the ``kind`` message in bytes [pos, end) and the messages of :data:`_CHILDREN` inside it; raises
    _NotSelfContained for a tensor with external data, _Malformed for a damaged or oversized structure."""
    if depth > MAX_GRAPH_NESTING:
        raise _Malformed(f"messages nested more than {MAX_GRAPH_NESTING} deep")
    children = _CHILDREN[kind]
    name = external = None
    for field, wire, value, at in _fields(window, pos, end, walked, MAX_GRAPH_FIELDS, "fields in the graph"):
        if wire == 0 and kind == _TENSOR and field == _DATA_LOCATION and value & 0xFFFFFFFF == _EXTERNAL:  # (an
            # enum is an int32 to protobuf: 2**32 + 1 is EXTERNAL)
            external = external or "its data_location is EXTERNAL"
        elif wire == 2 and field in children:
            _walk(window, at, at + value, children[field], depth + 1, walked)
        elif wire == 2 and kind == _TENSOR and field == _TENSOR_NAME and value <= 256:
            name = window.read(at, value).decode("utf-8", "replace")
        elif wire == 2 and kind == _TENSOR and field == _EXTERNAL_DATA:
            key, text = _parse_entry(window.read(at, value)) if value <= 4096 else ("", "")
            if key == "location" or external is None:
                external = f"its data is in another file ({text[:200]!r})" if key == "location" else \
                    "it has external_data entries"
    if external:
        raise _NotSelfContained(f"tensor {name!r} is not stored in the file: {external}")


def _read_varint(window: _Window, pos: int, size: int) -> tuple[int, int]:
    buf, off = window.at(pos)
    value = shift = 0
    for i in range(10):
        if pos + i >= size or off + i >= len(buf):
            raise _Malformed(f"truncated: the file ends inside a field header at byte {pos + i}")
        b = buf[off + i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos + i + 1
        shift += 7
    raise _Malformed(f"invalid varint at byte {pos + 10}")


def _parse_entry(data: bytes) -> tuple[str, str]:
    """A StringStringEntryProto: (key, value)."""
    out = {1: b"", 2: b""}
    pos = 0
    while pos < len(data):
        tag = data[pos]
        if tag not in (0x0A, 0x12):  # field 1 or 2, wire type 2 (a tag below 128 is one byte)
            raise _Malformed("invalid metadata entry")
        length, shift, pos = 0, 0, pos + 1
        while True:
            if pos >= len(data) or shift > 63:
                raise _Malformed("invalid metadata entry")
            b = data[pos]
            pos += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if pos + length > len(data):
            raise _Malformed("invalid metadata entry")
        out[tag >> 3] = data[pos:pos + length]
        pos += length
    try:
        return out[1].decode(), out[2].decode()
    except UnicodeDecodeError:
        raise _Malformed("metadata entry is not UTF-8") from None


__all__ = ["INPUT_NAME", "MAX_EXPORT_BATCH", "MAX_GRAPH_FIELDS", "MAX_TOP_LEVEL_FIELDS", "OUTPUT_NAME",
           "check_export_size", "check_opset", "check_output_path", "export_onnx", "export_record", "exported_meta",
           "inference_model", "parse_export_meta", "profile_batch", "read_onnx_metadata", "replace_file",
           "supported_opsets", "validate_export_meta"]
