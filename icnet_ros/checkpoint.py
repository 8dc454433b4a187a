"""Native checkpoints: one ``.safetensors`` file whose header carries the model's JSON metadata.

Loading never executes code: tensors come from safetensors, metadata from JSON. The metadata (``model.meta``):

.. code-block:: text

    format          "icnet_ros"           version  1
    arch            ICNetConfig fields (backbone, num_classes, width, ppm, cff, aux_heads, aux_dropout)
    dataset         class-set name        classes  [names]    palette [[r, g, b], ...]    ignore_index 255
    normalization   {"mean": [3], "std": [3], "channel_order": "RGB"|"BGR"}  applied to 0..255 pixel values
    input_size      [H, W] recommended inference size, or null (native frame size)
    provenance      free-form dict: source, command, iterations, val mIoU, date, ...

Optional keys (absent in older files and in mmseg imports):

.. code-block:: text

    network_width   int in [64, 4096]: the network input width the model was trained and validated at (training's
                    data.input_scale x the data's frame width, rounded to a multiple of 32 by
                    icnet_ros.sizes.aligned_size; CamVid's 480x360 frames at x1.5 -> 736). Inference with
                    ``input_size: auto`` resizes each frame, keeping its aspect ratio, to this width, so that
                    objects have the pixel size the model learnt them at whatever the camera's resolution.
    license         str, one line: the terms of the weights, e.g. "CC BY-NC 4.0 (trained on CamVid; non-commercial
                    use only)"; weights inherit the terms of their training data. Printed by icnet-eval and the node.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .classes import CITYSCAPES, IGNORE_INDEX, ClassSet, class_set_from_meta, generic_palette
from .models.icnet import ICNet, ICNetConfig
from .sizes import MAX_UPSCALED_PIXELS, MIN_INPUT_SIZE, aligned_size

FORMAT = "icnet_ros"
FORMAT_VERSION = 1
META_KEY = "icnet_ros"
DEFAULT_MODEL_ENV = "ICNET_ROS_DEFAULT_MODEL"  # overrides the package's default model
#: largest network_width a checkpoint may record: ``auto`` inference resizes every frame to it, so a file must not
#: be able to ask for unbounded work (4096: 2304x4096 for 16:9 frames)
MAX_NETWORK_WIDTH = 4096
MAX_LICENSE_CHARS = 300  # a license is one printable line
#: normalisation bounds (inputs are 0..255): |mean| and std at most this, std at least MIN_NORMALIZATION_STD
MAX_NORMALIZATION = 1e4
MIN_NORMALIZATION_STD = 1e-4
#: bounds on what a file's metadata may make a reader parse (the shipped model's metadata is 26 KB, its header 65 KB;
#: exports nest their records a level each)
MAX_META_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20
MAX_META_DEPTH = 64

# mmseg's data preprocessor, in RGB, on 0..255 pixel values
MMSEG_NORMALIZATION: dict[str, Any] = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375],
                                       "channel_order": "RGB"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, truncated, not ICNet, or not matching its architecture."""


class CheckpointWriteError(OSError):
    """A checkpoint file that could not be written (:func:`save_checkpoint`): ``cannot write <file>: <reason>``; its
    ``filename`` is the file, its ``strerror`` the system's reason (``No space left on device``, ``File too
    large``)."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def build_meta(config: ICNetConfig, class_set: ClassSet | None = None,
               normalization: dict[str, Any] | None = None, input_size: tuple[int, int] | list[int] | None = None,
               provenance: dict[str, Any] | None = None, *, network_width: int | None = None,
               license: str | None = None) -> dict[str, Any]:
    """Complete metadata for a model of ``config``; missing parts get defaults (generic class names and palette,
    mmseg normalization). ``network_width`` and ``license`` are recorded only when given."""
    if class_set is None:
        n = config.num_classes
        class_set = CITYSCAPES if n == 19 else ClassSet("custom", tuple(f"class_{i}" for i in range(n)),
                                                        generic_palette(n))
    if class_set.num_classes != config.num_classes:
        raise CheckpointError(f"class set {class_set.name!r} has {class_set.num_classes} classes but the model "
                              f"predicts {config.num_classes}")
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "arch": config.to_dict(), **class_set.to_meta(),
            "normalization": dict(normalization or MMSEG_NORMALIZATION),
            "input_size": list(input_size) if input_size else None, "provenance": dict(provenance or {})}
    if network_width is not None:
        meta["network_width"] = network_width
    if license is not None:
        meta["license"] = license
    validate_meta(meta)
    return meta


def network_width_for(frame_width: float, input_scale: float) -> int:
    """The ``network_width`` to record for a model trained at ``input_scale`` x frames ``frame_width`` pixels wide:
    rounded to a multiple of 32 (480 x 1.5 = 720 -> 736)."""
    if not frame_width > 0 or not input_scale > 0:
        raise ValueError(f"frame width and input scale must be > 0, got {frame_width} and {input_scale}")
    width = aligned_size(MIN_INPUT_SIZE, frame_width * input_scale)[1]
    if width > MAX_NETWORK_WIDTH:
        raise ValueError(f"network width {width} (frame width {frame_width:g} x input scale {input_scale:g}) is "
                         f"above the {MAX_NETWORK_WIDTH} a checkpoint may record")
    return width


def _numbers(value: Any, n: int) -> bool:
    """Whether ``value`` is a list of ``n`` finite real numbers (JSON numbers, not booleans)."""
    return (isinstance(value, (list, tuple)) and len(value) == n
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def _depth(value: Any) -> int:
    """How deeply JSON ``value`` nests (iterative: a hostile depth cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list, tuple)):
            deepest = max(deepest, d)
            if d <= MAX_META_DEPTH:
                stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def validate_meta(meta: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming the first problem in ``meta`` (also for values of the wrong type:
    metadata comes from files)."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"invalid checkpoint metadata: a JSON object is needed, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"not an icnet_ros checkpoint (metadata format {meta.get('format')!r})")
    version = meta.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CheckpointError(f"invalid checkpoint format version {version!r} (need an integer)")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {meta['version']} is newer than this icnet_ros "
                              f"supports ({FORMAT_VERSION}); upgrade icnet_ros")
    try:
        config = ICNetConfig.from_dict(meta["arch"])
        class_set = class_set_from_meta(meta)
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
        raise CheckpointError(f"invalid checkpoint metadata: {e}") from e
    if class_set.num_classes != config.num_classes:
        raise CheckpointError(f"metadata lists {class_set.num_classes} classes but arch.num_classes is "
                              f"{config.num_classes}")
    norm = meta.get("normalization")
    # bounded so that (x - mean) / std stays finite in float32 for 0..255 inputs (std 1e-300 became 0 there: every
    # logit NaN, every pixel class 0, no error)
    if (not isinstance(norm, dict) or not _numbers(norm.get("mean"), 3) or not _numbers(norm.get("std"), 3)
            or not all(abs(m) <= MAX_NORMALIZATION for m in norm["mean"])
            or not all(MIN_NORMALIZATION_STD <= s <= MAX_NORMALIZATION for s in norm["std"])
            or norm.get("channel_order") not in ("RGB", "BGR")):
        raise CheckpointError(f"invalid normalization in metadata: {repr(norm)[:200]} (need mean[3] within "
                              f"+-{MAX_NORMALIZATION:g}, std[3] in [{MIN_NORMALIZATION_STD:g}, {MAX_NORMALIZATION:g}], "
                              "channel_order RGB or BGR)")
    size = meta.get("input_size")
    if size is not None and (not _numbers(size, 2) or not all(isinstance(v, int) for v in size)
                             or min(size) < MIN_INPUT_SIZE or size[0] * size[1] > MAX_UPSCALED_PIXELS):
        raise CheckpointError(f"invalid input_size in metadata: {repr(size)[:80]} (need [H, W], integers each >= "
                              f"{MIN_INPUT_SIZE}, at most {MAX_UPSCALED_PIXELS} pixels: every frame runs at it)")
    width = meta.get("network_width")
    if width is not None and (not isinstance(width, int) or isinstance(width, bool)
                              or not MIN_INPUT_SIZE <= width <= MAX_NETWORK_WIDTH):
        raise CheckpointError(f"invalid network_width in metadata: {width!r} (need an integer in "
                              f"[{MIN_INPUT_SIZE}, {MAX_NETWORK_WIDTH}])")
    provenance = meta.get("provenance")
    if provenance is not None and (not isinstance(provenance, dict) or not isinstance(
            provenance.get("exported", {}), dict)):
        raise CheckpointError(f"invalid provenance in metadata: {repr(provenance)[:80]} (need an object, its "
                              "'exported' record an object)")
    if _depth(meta) > MAX_META_DEPTH:
        raise CheckpointError(f"invalid metadata: nested deeper than {MAX_META_DEPTH} levels")
    try:
        size = len(json.dumps(meta))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid metadata: not JSON: {e}") from e
    if size > MAX_META_BYTES:  # a reader refuses it: refused before it is written too
        raise CheckpointError(f"metadata of {size} bytes (at most {MAX_META_BYTES}); shorten its provenance")
    text = meta.get("license")
    if text is not None and (not isinstance(text, str) or not text.strip() or len(text) > MAX_LICENSE_CHARS
                             or not text.isprintable()):
        raise CheckpointError(f"invalid license in metadata: {str(text)[:80]!r} (need one line of printable text, "
                              f"1 to {MAX_LICENSE_CHARS} characters)")


def save_checkpoint(model: ICNet, path: str | os.PathLike, meta: dict[str, Any] | None = None, *,
                    fp16: bool = False, include_aux: bool = True) -> None:
    """Write ``model`` (weights, BN statistics) and ``meta`` (default: ``model.meta``) to a safetensors file.

    ``fp16`` halves the file (a tensor with a finite value beyond float16's range, e.g. a BatchNorm running_var of
    1e5, is a :class:`CheckpointError` before anything is written: stored as inf, no loader would accept the file);
    ``include_aux=False`` drops the training-only auxiliary heads (deployment). The file is written whole or not at
    all (a temporary file beside it, renamed): a write that fails (a full disk, a file size limit, a folder that
    cannot be made) raises :class:`CheckpointWriteError` ``cannot write <path>: <reason>`` and leaves no file behind
    (before, safetensors' own error came out as a SafetensorError traceback from icnet-convert)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    meta = dict(meta if meta is not None else model.meta)
    if not meta:
        meta = build_meta(model.config)
    arch = dict(meta.get("arch") or model.config.to_dict())
    if not include_aux:
        arch["aux_heads"] = False
    meta["arch"] = arch
    validate_meta(meta)
    tensors = {}
    for k, v in model.state_dict().items():
        if not include_aux and k.startswith("auxiliary_head."):
            continue
        v = v.detach().to("cpu")
        if fp16 and v.is_floating_point():
            half = v.half()
            if bool((torch.isinf(half) & torch.isfinite(v)).any()):  # the loader would refuse the inf it becomes
                raise CheckpointError(f"tensor {k} holds values up to {float(v.abs().max()):g}, beyond float16's "
                                      f"range (+-{torch.finfo(torch.float16).max:g}); save it without --fp16")
            v = half
        tensors[k] = v.contiguous()
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the checkpoint's file name (e.g. {path}/model.safetensors)")
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a normal, shareable file (the temporary file was created private)
        os.replace(tmp, path)  # never leave a half-written checkpoint behind
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()  # nor its temporary file (a full disk, an interrupt)
        if isinstance(e, OSError):
            raise CheckpointWriteError(e.errno, e.strerror or str(e), str(path)) from e
        if isinstance(e, SafetensorError):  # "Error while serializing: I/O error: File too large (os error 27)"
            found = re.search(r"I/O error: (.+?) \(os error (\d+)\)", str(e))
            errno, reason = (int(found.group(2)), found.group(1)) if found else (None, str(e))
            raise CheckpointWriteError(errno, reason, str(path)) from e
        raise


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a native checkpoint, without loading its tensors."""
    from safetensors import SafetensorError, safe_open

    path = _existing(path)
    _check_header_size(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from e
    if META_KEY not in header:
        raise CheckpointError(f"{path}: safetensors file without icnet_ros metadata; not an icnet_ros checkpoint "
                              "(convert mmseg .pth checkpoints with icnet-convert)")
    if len(header[META_KEY]) > MAX_META_BYTES:
        raise CheckpointError(f"{path}: metadata of {len(header[META_KEY])} bytes (at most {MAX_META_BYTES})")
    try:
        meta = json.loads(header[META_KEY])
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and an integer of over 4300 digits
        raise CheckpointError(f"{path}: metadata is not valid JSON: {str(e)[:200]}") from e
    try:
        validate_meta(meta)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return meta


def _check_header_size(path: Path) -> None:
    """Refuse a safetensors header (tensor index + metadata) larger than :data:`MAX_HEADER_BYTES` before it is
    parsed: JSON inflates to many times its size in memory."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    claimed = int.from_bytes(head, "little") if len(head) == 8 else 0
    if claimed > size - 8:  # safetensors reports these itself, in its own words
        return
    if claimed > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: safetensors header of {claimed} bytes (at most {MAX_HEADER_BYTES}); not an "
                              "icnet_ros checkpoint")


def _check_shapes_before_loading(path: Path, config: ICNetConfig) -> None:
    """Compare the file's tensor names and shapes (read from its header) with the model ``config`` describes, built
    on the meta device (no memory): metadata describing a huge model is refused before anything is allocated."""
    from safetensors import safe_open

    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in ICNet(config).state_dict().items()}
    with safe_open(str(path), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    raise_on_mismatch(own, stored, str(path), allow_missing_aux=not config.aux_heads)


def raise_on_mismatch(own: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]], source: str,
                       allow_missing_aux: bool) -> None:
    """CheckpointError naming missing and unexpected keys and shape mismatches between a model's state (``own``:
    name -> shape) and a file's (``stored``)."""
    missing = [k for k in own if k not in stored and not (allow_missing_aux and k.startswith("auxiliary_head."))]
    unexpected = [k for k in stored if k not in own]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:5])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:5])})")
    shapes = [f"{k}: checkpoint {stored[k]} vs model {own[k]}" for k in own if k in stored and stored[k] != own[k]]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:5])})")
    if problems:
        raise CheckpointError(f"{source} does not match the ICNet architecture: " + "; ".join(problems))


#: the tensor types weights may be stored in (converted to the model's on loading)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def load_state_dict_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                         allow_missing_aux: bool = True) -> None:
    """Copy ``state`` into ``model`` after checking every key and shape; errors name what is wrong."""
    own = model.state_dict()
    raise_on_mismatch({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in state.items()},
                       source, allow_missing_aux)
    wrong = [f"{k} is {str(v.dtype).removeprefix('torch.')}" for k, v in state.items()
             if (v.dtype not in WEIGHT_DTYPES if own[k].is_floating_point()
                 else v.is_floating_point() or v.is_complex() or v.dtype == torch.bool)]
    if wrong:  # a cast would hide it (complex -> real drops a part; bool or int8 weights are not weights)
        raise CheckpointError(f"{source}: tensors of the wrong type ({'; '.join(wrong[:3])}): weights must be "
                              "float16, bfloat16, float32 or float64, counters integers")
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{source}: tensor {k} holds NaN or infinite values (a diverged training run?); "
                                  "not loaded")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> ICNet:
    """Load a native checkpoint (default: the package's default model) as an eval-mode ICNet with ``.meta``.

    Raises :class:`CheckpointError` for missing, corrupt, truncated or mismatching files, and for mmseg ``.pth``
    checkpoints (convert those first with ``icnet-convert``).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path is None:
        path = default_model_path()
    path = _existing(path)
    if path.suffix in (".pth", ".pt"):
        raise CheckpointError(f"{path}: PyTorch pickle checkpoint; convert it first: "
                              f"icnet-convert {path} {path.with_suffix('.safetensors')}")
    meta = read_metadata(path)
    config = ICNetConfig.from_dict(meta["arch"])
    try:
        _check_shapes_before_loading(path, config)
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: cannot read tensors (corrupt or truncated?): {e}") from e
    model = ICNet(config)
    load_state_dict_into(model, state, source=str(path), allow_missing_aux=not config.aux_heads)
    model.meta = meta
    return model.to(device).eval()


def default_model_path() -> Path:
    """The default model: ``$ICNET_ROS_DEFAULT_MODEL`` when set (a site-wide choice), else the package's own in
    ``icnet_ros/weights/`` (installed inside the package by pip and by colcon alike)."""
    override = os.environ.get(DEFAULT_MODEL_ENV)
    if override:
        p = Path(override).expanduser()
        if p.suffix.lower() != ".safetensors":  # its reader would call an export corrupt
            raise CheckpointError(f"{DEFAULT_MODEL_ENV}={override}: the default model must be a .safetensors "
                                  "checkpoint (an export runs as the model itself); pass a model path")
        if p.is_file():
            return p
        raise CheckpointError(f"the default model is not installed: {DEFAULT_MODEL_ENV}={override} is not a file; "
                              "pass a model path")
    name = "icnet_camvid.safetensors"
    path = Path(__file__).resolve().parent / "weights" / name
    if path.is_file():
        return path
    raise CheckpointError(f"the default model is not installed (looked in: {path}); pass a model path")


def inference_copy(model_or_path: Any) -> tuple[nn.Module, dict[str, Any]]:
    """A private, eval-mode, float32 copy of a model for inference (without gradients or auxiliary heads) and its
    validated metadata. ``model_or_path``: a native checkpoint path, an ICNet module (copied, never modified; its
    ``.meta``, or metadata built from its ``.config``) or None (the package's default model). What the Segmenter
    and the exporters start from. A model whose logits on a probe input are NaN or infinite (finite weights that
    overflow) is a :class:`CheckpointError`."""
    if model_or_path is None:
        model_or_path = default_model_path()  # raises CheckpointError until the default model is installed
    if isinstance(model_or_path, (str, os.PathLike)):
        model = load_model(model_or_path, device="cpu")
        meta = dict(model.meta)
    elif isinstance(model_or_path, nn.Module):
        src = model_or_path
        meta = dict(getattr(src, "meta", None) or {})
        if not meta:
            config = getattr(src, "config", None)
            if config is None:
                raise CheckpointError(f"{type(src).__name__} is not an ICNet: it has neither .meta nor .config")
            meta = build_meta(config)
        model = copy.deepcopy(src).float()
        model.meta = meta
    else:
        raise CheckpointError(f"model_or_path must be None, a checkpoint path or an ICNet module, got "
                              f"{type(model_or_path).__name__}")
    validate_meta(meta)
    model.eval()
    if getattr(model, "auxiliary_head", None) is not None:
        model.auxiliary_head = None  # training-only; frees memory in our private copy
    for p in model.parameters():
        p.requires_grad_(False)
    _check_output_finite(model, model_or_path)
    return model, meta


def _check_output_finite(model: nn.Module, source: Any) -> None:
    """CheckpointError when the model's logits on a small probe input (64 x 64, seeded) are NaN or infinite:
    finite weights can still overflow (a conv weight of 1e38 from bit rot), and such a model gave NaN logits
    (every pixel one class) or failed deep in BN folding. One forward of a few milliseconds at each load."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    probe = torch.randn(1, 3, MIN_INPUT_SIZE, MIN_INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(probe.to(device))
    if not bool(torch.isfinite(logits).all()):
        name = f"{os.fspath(source)}: " if isinstance(source, (str, os.PathLike)) else ""
        raise CheckpointError(f"{name}the model's output is NaN or infinite on a test input (corrupt weights?); "
                              "not loaded")


def record_export(meta: dict[str, Any], record: dict[str, Any]) -> None:
    """Record an export (conversion, ONNX/OpenVINO export) in ``meta["provenance"]["exported"]``; an earlier
    record moves under the new one's ``previous``, so an export of an export keeps the whole chain."""
    provenance = meta.setdefault("provenance", {})
    if "exported" in provenance:
        record["previous"] = provenance["exported"]
    provenance["exported"] = record


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file (read in 1 MiB chunks), for provenance records."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {p}")
    return p


__all__ = ["CheckpointError", "CheckpointWriteError", "MAX_NETWORK_WIDTH", "MMSEG_NORMALIZATION", "build_meta",
           "default_model_path",
           "file_sha256", "inference_copy", "load_model", "load_state_dict_into", "network_width_for",
           "raise_on_mismatch",
           "read_metadata", "save_checkpoint", "validate_meta", "IGNORE_INDEX"]
