"""Import MMSegmentation ICNet checkpoints (``.pth``) into the native format, and export native checkpoints for
deployment (fp16, without the training-only auxiliary heads), optionally as the uniform average of several runs'
weights (:func:`average_into`).

The file is read with ``torch.load(weights_only=True)``: no code from it runs. Depth, width, number of classes and
auxiliary heads are inferred from tensor shapes; class names and palette come from the checkpoint's ``meta`` (mmseg
1.x ``meta.dataset_meta`` or mmseg 0.x ``meta.CLASSES/PALETTE``), otherwise Cityscapes for 19 classes. The
normalization is mmseg's (RGB, ImageNet mean/std).
"""
from __future__ import annotations

import copy
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoint import (MAX_NETWORK_WIDTH, MMSEG_NORMALIZATION, CheckpointError, build_meta, file_sha256,
                         load_model, load_state_dict_into, raise_on_mismatch, record_export, save_checkpoint)
from .classes import CITYSCAPES, ClassSet, generic_palette, is_color
from .models.icnet import ICNet, ICNetConfig
from .sizes import MAX_UPSCALED_PIXELS, MAX_UPSCALED_TEXT, MIN_INPUT_SIZE

# mmseg keeps the pyramid pooling on the ICNet backbone; icnet_ros groups it in `backbone.ppm`
_RENAMES = (("backbone.psp_modules.", "backbone.ppm.psp_modules."),
            ("backbone.psp_bottleneck.", "backbone.ppm.psp_bottleneck."))


def read_torch_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) of a ``.pth`` file, with or without the ``state_dict`` wrapper, loaded safely."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; its legacy format (and a bare pickle) starts with a pickle protocol marker
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (.pth): it is neither a zip archive nor a pickle "
                              "as torch.save writes; icnet-convert reads an mmseg .pth or a native .safetensors "
                              "checkpoint")
    _check_zip_records(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(e)
        raise CheckpointError(f"{path}: refusing to load: the file holds Python objects other than tensors and "
                              "plain containers, and loading it could run code"
                              f"{f' ({reason})' if reason else ''}. Re-save only its state_dict.") from e
    except Exception as e:  # noqa: BLE001 - torch raises many types on damaged files (RuntimeError, IndexError, ...)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict (state_dict or {{'state_dict': ...}}), got {type(obj).__name__}")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(state).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    names = [k for k in tensors if not isinstance(k, str)]
    if names:
        raise CheckpointError(f"{path}: tensor names must be text, got {repr(names[0])[:40]}")
    _check_tensor_storage(path, tensors)
    if all(k.startswith("module.") for k in tensors):  # saved from DataParallel / DDP
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors, meta


def _check_tensor_storage(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Each tensor must hold its own values, and all of them together no more bytes than the file: a view with
    stride 0 (torch.save keeps it) declares any shape over a single stored number, so an 85 KB file imported as a
    4 GB model. Dense tensors in any layout (channels_last, as a model trained in it saves them) pass."""
    stored: dict[int, int] = {}
    for k, v in tensors.items():
        storage = v.untyped_storage()
        last = v.storage_offset() + sum((n - 1) * s for n, s in zip(v.shape, v.stride()) if n > 0)
        repeated = any(s == 0 and n > 1 for n, s in zip(v.shape, v.stride()))
        if v.numel() and (repeated or storage.nbytes() < (last + 1) * v.element_size()):
            raise CheckpointError(f"{path}: tensor {k} of shape {list(v.shape)} repeats stored values (a stride-0 "
                                  "view) or reaches past its storage: not a state_dict as training saves it")
        stored[storage.data_ptr()] = storage.nbytes()
    size = path.stat().st_size
    if sum(stored.values()) > size:
        raise CheckpointError(f"{path}: its tensors hold {sum(stored.values())} bytes, more than the file's {size}")


def _unpickler_reason(error: Exception) -> str | None:
    """What torch's weights-only unpickler refused ('Unsupported global: GLOBAL os.system was not an allowed global
    by default'), without torch's advice around it: to load with weights_only=False or to allowlist the global,
    both of which would run the file's code."""
    import re

    for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and "weights_only" not in line and not line.startswith(
                ("Weights only load failed", "Check the documentation", "(1)", "(2)")):
            return line.split(". Please")[0].rstrip(".")
    return None


def _check_zip_records(path: Path) -> None:
    """Refuse a zip-format ``.pth`` whose records are compressed or declare more bytes than the file holds before
    ``torch.load`` inflates them: ``torch.save`` stores records uncompressed, and a DEFLATE record of zeros
    inflates about 1000:1 (a 3.7 MB file took 11.7 s and 4 GB)."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy format reads the bytes the file holds
        with zipfile.ZipFile(path) as z:
            records = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt zip archive?): {e}") from e
    packed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise CheckpointError(f"{path}: refusing to load: {len(packed)} compressed record(s) (e.g. {packed[0]}); "
                              "torch.save writes them uncompressed, so the file was repacked or crafted. Re-save it "
                              "with torch.save")
    declared, size = sum(r.file_size for r in records), path.stat().st_size
    if declared > size:
        raise CheckpointError(f"{path}: its records declare {declared} bytes but the file has {size}: corrupt or "
                              "crafted")


def infer_config(state: dict[str, torch.Tensor], source: str = "checkpoint") -> ICNetConfig:
    """The :class:`ICNetConfig` of an mmseg ICNet state_dict, from its keys and shapes."""
    required = ("backbone.conv_sub1.0.conv.weight", "backbone.backbone.stem.0.weight", "neck.cff_24.conv_low.conv.weight",
                "decode_head.conv_seg.weight")
    missing = [k for k in required if k not in state]
    if missing:
        hint = ""
        if any(k.startswith("backbone.layer") or k.startswith("layer1.") for k in state):
            hint = " (it looks like a plain ResNet classifier)"
        elif any(k.startswith("decode_head.") for k in state):
            hint = " (it looks like another mmseg segmentor)"
        raise CheckpointError(f"{source} is not an ICNet checkpoint{hint}: missing {', '.join(missing)}")
    for key in ("backbone.backbone.stem.0.weight", "decode_head.conv_seg.weight"):  # read for width and classes
        if state[key].dim() != 4:
            raise CheckpointError(f"{source}: {key} has shape {list(state[key].shape)}, not a convolution weight "
                                  "(out x in x kH x kW); not an ICNet checkpoint")
    bottleneck = "backbone.backbone.layer1.0.conv3.weight" in state
    blocks = {i: len({k.split(".")[3] for k in state if k.startswith(f"backbone.backbone.layer{i}.")})
              for i in range(1, 5)}
    counts = (blocks[1], blocks[2], blocks[3], blocks[4])
    depths = {(False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34, (True, (3, 4, 6, 3)): 50,
              (True, (3, 4, 23, 3)): 101}
    depth = depths.get((bottleneck, counts))
    if depth is None:
        raise CheckpointError(f"{source}: unsupported ResNet layout ({'Bottleneck' if bottleneck else 'BasicBlock'} "
                              f"blocks per stage {counts}); supported depths 18, 34, 50, 101")
    width = state["backbone.backbone.stem.0.weight"].shape[0] / 32.0
    if "backbone.psp_modules.0.1.conv.weight" not in state:  # mmseg's pooling convolves each bin, then concats
        raise CheckpointError(f"{source}: no pyramid-pooling convolutions (backbone.psp_modules.*): not an mmseg "
                              "ICNet checkpoint; icnet-convert reads mmseg .pth files and icnet_ros .safetensors")
    ppm = "concat"
    num_classes = int(state["decode_head.conv_seg.weight"].shape[0])
    aux = "auxiliary_head.0.conv_seg.weight" in state
    try:
        return ICNetConfig(backbone=f"resnet{depth}", num_classes=num_classes, width=width, ppm=ppm, aux_heads=aux)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


def class_set_from_mmseg_meta(meta: dict[str, Any], num_classes: int) -> ClassSet:
    """The class set an mmseg checkpoint's ``meta`` names (``dataset_meta`` or the older ``CLASSES``/``PALETTE``);
    values of the wrong type or length are not used: Cityscapes' for 19 classes, else numbered generic classes."""
    dataset_meta = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}
    classes = dataset_meta.get("classes") or meta.get("CLASSES")
    palette = dataset_meta.get("palette") or meta.get("PALETTE")
    if (isinstance(classes, (list, tuple)) and len(classes) == num_classes
            and all(isinstance(c, str) for c in classes)):
        if not (isinstance(palette, (list, tuple)) and len(palette) == num_classes and all(map(is_color, palette))):
            palette = generic_palette(num_classes)
        try:
            return ClassSet(name=str(dataset_meta.get("dataset", "mmseg")), classes=tuple(classes),
                            palette=tuple(tuple(c) for c in palette))
        except ValueError:  # names ClassSet refuses (empty, repeated, unprintable): the generic set below
            pass
    if num_classes == CITYSCAPES.num_classes:
        return CITYSCAPES
    return ClassSet("mmseg", tuple(f"class_{i}" for i in range(num_classes)), generic_palette(num_classes))


InputSize = tuple[int, int] | Literal["native"] | None
"""A recommended inference size to record: (H, W); ``"native"`` records none (each frame's own size); None keeps
what the source has."""

NetworkWidth = int | Literal["none"] | None
"""A ``network_width`` to record (see :mod:`icnet_ros.checkpoint`); ``"none"`` removes it (``auto`` inference then
runs at each frame's own size); None keeps what the source has."""


def _recorded_size(input_size: tuple[int, int] | str) -> list[int] | None:
    """The metadata value, checked here as the size asked for (save_checkpoint's validate_meta would refuse it too,
    but as 'invalid input_size in metadata', which reads as a fault of the source file)."""
    if isinstance(input_size, str):
        if input_size != "native":
            raise ValueError(f"input size must be (H, W) or 'native', got {input_size!r}")
        return None
    h, w = (int(v) for v in input_size)
    if min(h, w) < MIN_INPUT_SIZE or h * w > MAX_UPSCALED_PIXELS:
        raise ValueError(f"input size {h}x{w}: each side must be >= {MIN_INPUT_SIZE} and the whole at most "
                         f"{MAX_UPSCALED_TEXT}: every frame runs at it")
    return [h, w]


def _apply_records(meta: dict[str, Any], record: dict[str, Any] | None, input_size: InputSize,
                   network_width: NetworkWidth, license: str | None) -> None:
    """Set the requested ``input_size`` / ``network_width`` / ``license`` in ``meta`` (and note each change in the
    export ``record``); save_checkpoint's validate_meta checks the values before anything is written."""
    changes: dict[str, Any] = {}
    if input_size is not None:
        meta["input_size"] = changes["input_size"] = _recorded_size(input_size)
    if network_width is not None:
        if network_width == "none":
            meta.pop("network_width", None)
            changes["network_width"] = None
        else:
            if isinstance(network_width, bool) or not isinstance(network_width, int):
                raise ValueError(f"network width must be an integer or 'none', got {network_width!r}")
            if not MIN_INPUT_SIZE <= network_width <= MAX_NETWORK_WIDTH:  # as the flag's value, not "in metadata"
                raise ValueError(f"invalid network_width {network_width}: need an integer in [{MIN_INPUT_SIZE}, "
                                 f"{MAX_NETWORK_WIDTH}]")
            meta["network_width"] = changes["network_width"] = network_width
    if license is not None:
        if license == "":
            meta.pop("license", None)
            changes["license"] = None
        else:
            meta["license"] = changes["license"] = license
    if record is not None:
        record.update(changes)


def import_mmseg_checkpoint(path: str | os.PathLike, class_set: ClassSet | None = None) -> ICNet:
    """An eval-mode :class:`ICNet` with ``.meta`` from an mmseg ICNet ``.pth`` checkpoint."""
    path = Path(path).expanduser()
    state, mm_meta = read_torch_checkpoint(path)
    config = infer_config(state, str(path))
    for old, new in _RENAMES:
        state = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}
    with torch.device("meta"):  # the inferred architecture checked against the tensors before it is allocated
        own = {k: tuple(v.shape) for k, v in ICNet(config).state_dict().items()}
    raise_on_mismatch(own, {k: tuple(v.shape) for k, v in state.items()}, str(path), allow_missing_aux=False)
    model = ICNet(config)
    load_state_dict_into(model, state, source=str(path), allow_missing_aux=False)
    class_set = class_set or class_set_from_mmseg_meta(mm_meta, config.num_classes)
    provenance = {"source": "mmsegmentation", "file": path.name, "sha256": file_sha256(path)}
    for k in ("mmseg_version", "mmcv_version", "time", "iter", "epoch"):
        if k in mm_meta and isinstance(mm_meta[k], (str, int, float)):
            provenance[k] = mm_meta[k]
    model.meta = build_meta(config, class_set, MMSEG_NORMALIZATION, None, provenance)
    return model.eval()


def convert_mmseg_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, class_set: ClassSet | None = None,
                             fp16: bool = False, include_aux: bool = True, input_size: InputSize = None,
                             network_width: NetworkWidth = None, license: str | None = None) -> ICNet:
    """Convert ``src`` (mmseg ``.pth``) to ``dst`` (native ``.safetensors``); returns the imported model."""
    model = import_mmseg_checkpoint(src, class_set)
    _apply_records(model.meta, None, input_size, network_width, license)
    save_checkpoint(model, dst, model.meta, fp16=fp16, include_aux=include_aux)
    return model


#: metadata that every checkpoint of an average must share (the weights mean the same thing in each)
_AVERAGE_MUST_MATCH = ("arch", "classes", "ignore_index", "normalization")


def average_into(model: ICNet, others: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Replace ``model``'s weights and BatchNorm statistics by their uniform average with those of the native
    checkpoints ``others`` (a "model soup": runs of one recipe from the same starting point, e.g. different seeds;
    averaging unrelated runs gives a broken model). Architecture, classes and normalization must match. Integer
    buffers (BatchNorm's batch counters) keep ``model``'s values. Returns one provenance record per other file
    (name, SHA-256, its training provenance; the starting checkpoint's nested history is shortened to its
    SHA-256)."""
    if not others:
        raise ValueError("nothing to average with: give at least one more checkpoint")
    sums = {k: v.detach().double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    records = []
    for other in others:
        path = Path(other).expanduser()
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: only native .safetensors checkpoints can be averaged")
        m = load_model(path)
        for key in _AVERAGE_MUST_MATCH:
            mine, theirs = model.meta.get(key), m.meta.get(key)
            if key == "arch":  # with or without the training-only auxiliary heads: the tensors are checked below
                mine, theirs = ({k: v for k, v in d.items() if k != "aux_heads"} for d in (mine or {}, theirs or {}))
            if mine != theirs:
                raise CheckpointError(f"{path}: its {key} differs from the first checkpoint's; only checkpoints "
                                      "of the same model (runs of one recipe) can be averaged")
        state = m.state_dict()
        missing = sums.keys() - state.keys()
        if missing:  # e.g. one file without the auxiliary heads
            raise CheckpointError(f"{path}: lacks {len(missing)} tensors of the first checkpoint (e.g. "
                                  f"{sorted(missing)[0]}); average files with the same heads")
        for k in sums:
            sums[k] += state[k].double()
        provenance = copy.deepcopy(m.meta.get("provenance") or {})
        start = provenance.get("initialised_from")
        if isinstance(start, dict):
            provenance["initialised_from"] = {"sha256": start.get("sha256")}
        # an averaged or exported member's own history is named by its files, not copied (copies nest: averages of
        # averages grew the metadata 3.7x a level, past what a reader accepts)
        for key in ("averaged_with", "exported"):
            if key in provenance:
                provenance[key] = _named_only(provenance[key])
        records.append({"from": path.name, "sha256": file_sha256(path), "provenance": provenance})
    n = len(others) + 1
    current = model.state_dict()
    model.load_state_dict({k: (sums[k] / n).to(v.dtype) if k in sums else v for k, v in current.items()})
    return records


def _named_only(history: Any) -> Any:
    """A provenance record (or list of them) cut to what names its files: ``from``/``file``, ``sha256``,
    ``format``."""
    if isinstance(history, list):
        return [_named_only(h) for h in history]
    if isinstance(history, dict):
        return {k: history[k] for k in ("from", "file", "sha256", "format") if k in history}
    return history


def export_native_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, fp16: bool = False,
                             include_aux: bool = True, input_size: InputSize = None,
                             network_width: NetworkWidth = None, license: str | None = None,
                             average: Sequence[str | os.PathLike] = ()) -> ICNet:
    """Re-save native checkpoint ``src`` (e.g. a training run's ``best.safetensors``) as ``dst`` for deployment:
    fp16 and/or without the auxiliary heads, optionally with another recommended input size (``"native"``
    removes it: a run trained at a fixed validation size records that size, which would squash frames of another
    aspect ratio), ``network_width`` (``"none"`` removes it) or ``license`` (``""`` removes it). ``average``: more
    native checkpoints whose weights are averaged with ``src``'s (:func:`average_into`). The metadata is
    ``src``'s; its provenance gains ``exported`` (source file name, SHA-256, the averaged files and what was
    changed; an earlier export record moves under ``previous``). A ``src`` stored in fp16 stays fp16. ``src`` may be
    ``dst``: it is read whole before anything is written."""
    src = Path(src).expanduser()
    model = load_model(src)
    fp16 = fp16 or stored_fp16(src)  # an fp16 file stays fp16 (re-recording the metadata doubled its size)
    meta = copy.deepcopy(model.meta)
    record: dict[str, Any] = {"from": src.name, "sha256": file_sha256(src), "fp16": fp16,
                              "auxiliary_heads": bool(include_aux and model.config.aux_heads)}
    if average:
        record["averaged_with"] = average_into(model, average)
    _apply_records(meta, record, input_size, network_width, license)
    record_export(meta, record)
    save_checkpoint(model, dst, meta, fp16=fp16, include_aux=include_aux)
    model.meta = meta
    return model


def stored_fp16(path: str | os.PathLike) -> bool:
    """Whether a native checkpoint stores its floating-point tensors in fp16 (an ``icnet-convert --fp16`` copy, like
    the shipped default model); read from the file's tensor index, no tensor is loaded."""
    from safetensors import safe_open

    with safe_open(str(Path(path).expanduser()), "pt") as f:
        floats = {f.get_slice(k).get_dtype() for k in f.keys()} - {"I64", "I32", "I16", "I8", "U8", "BOOL"}
    return floats == {"F16"}


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name one existing file (also through another spelling or a link)."""
    try:
        return os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except OSError:
        return False


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, class_set: ClassSet | None = None,
                       fp16: bool = False, include_aux: bool = True, input_size: InputSize = None,
                       network_width: NetworkWidth = None, license: str | None = None,
                       average: Sequence[str | os.PathLike] = ()) -> ICNet:
    """``icnet-convert``: an mmseg ``.pth`` is imported; a native ``.safetensors`` is exported (its classes are
    its own, so ``class_set`` must be None), averaged with ``average`` when given. ``dst`` may be ``src`` to change
    only what is recorded (input size, network width, license); ``fp16``, ``include_aux=False`` or ``average`` into
    the source itself are refused (ValueError), as they cannot be undone; so is ``dst`` naming one of the
    ``average`` files (before, that input was replaced by the average), and a file given twice among ``src`` and
    ``average`` (before, it was averaged in twice, weighing double, while the provenance said "the average of 3")."""
    if _same_file(src, dst) and (fp16 or not include_aux or average):
        raise ValueError(f"{dst} is the source file: --fp16, --no-aux and --average cannot be undone; write the "
                         "result to another file")
    named = [src, *average]
    for i, other in enumerate(average, 1):
        if _same_file(other, dst):
            raise ValueError(f"{dst} is the --average file {other}: it would be replaced by the average; write the "
                             "result to another file")
        first = next((f for f in named[:i] if _same_file(f, other)), None)
        if first is not None:
            raise ValueError(f"--average {other}: the same file as {first} (given twice it would weigh double in "
                             "the average); give each checkpoint once")
    if Path(src).suffix.lower() == ".safetensors":  # D.SAFETENSORS too (it was read as an mmseg .pth)
        if class_set is not None:
            raise ValueError(f"{src} is a native checkpoint: its classes are recorded in it (--classes is for "
                             "mmseg checkpoints)")
        return export_native_checkpoint(src, dst, fp16=fp16, include_aux=include_aux, input_size=input_size,
                                        network_width=network_width, license=license, average=average)
    if average:
        raise ValueError(f"{src}: --average takes native .safetensors checkpoints (convert the mmseg files first)")
    return convert_mmseg_checkpoint(src, dst, class_set=class_set, fp16=fp16, include_aux=include_aux,
                                    input_size=input_size, network_width=network_width, license=license)
