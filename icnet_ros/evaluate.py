"""Evaluate an ICNet checkpoint on a labelled split: mIoU, per-class IoU and accuracy, pixel accuracy.

.. code-block:: bash

    icnet-eval --data ../shared/data/camvid --split val                 # the package's default model
    icnet-eval --model runs/camvid/best.safetensors --data DIR --split val --json
    icnet-eval --model M --data CITYSCAPES_ROOT --split val --flip --scales 0.75 1.0 1.25

Inputs are normalised as the checkpoint's metadata says and resized as ``--input-size`` says, exactly as the engine
resizes frames (the engine's option, :mod:`icnet_ros.engine_config`, and the same size computation,
:class:`icnet_ros.sizes.InputSizePolicy`; default ``auto``: each image scaled,
keeping its aspect ratio, to the width the model was trained at, its metadata's ``network_width``, upscaled at most
:data:`~icnet_ros.sizes.MAX_SCALE` times; else the metadata's fixed ``input_size``; else native), rounded to multiples
of 32 (``--size-divisor``; ICNet's branches misalign at other sizes, see :data:`icnet_ros.sizes.SIZE_DIVISOR`); the
logits are upsampled back to the label size before the argmax. Exported
models (``.onnx``, OpenVINO ``.xml``, also INT8) are evaluated through their backend (``--backend``, chosen by the
file type), at their fixed export size. The confusion matrix is accumulated on the device. ``--json`` prints exactly
one JSON object on stdout (percentages); progress bars and messages go to stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .backends.base import in_chunks
from .classes import CLASS_SETS, ClassSet, class_set_from_meta
from .data.datasets import (DataSpec, DatasetError, ShardSampler, build_dataset, collate_segmentation,
                            detect_layout, resolve_class_set, worker_init)
from .data.transforms import base_scale
from .losses import upsample_logits
from .metrics import ConfusionMatrix, format_table, to_percent
from .preprocess import Normalizer
from . import engine_config
from .sizes import MAX_SCALE, MAX_UPSCALED_PIXELS, MAX_UPSCALED_TEXT, SIZE_DIVISOR, InputSizePolicy, aligned_size

if TYPE_CHECKING:
    from .tools.cli_checks import StopSignals


def _net_size(h: int, w: int, input_size: Sequence[int] | None, input_scale: float,
              base_size: Sequence[int] | None, scale: float, size_divisor: int,
              network_width: int | None = None) -> tuple[int, int]:
    if input_size:
        bh, bw = float(input_size[0]), float(input_size[1])
    elif network_width:  # input_size auto: the engine's policy for the trained width
        return InputSizePolicy("width", network_width, size_divisor).network_size(h, w, scale)
    else:
        s = base_scale(h, w, input_scale, tuple(base_size) if base_size else None)
        bh, bw = h * s, w * s
    return aligned_size(bh * scale, bw * scale, size_divisor)


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, out_size: Sequence[int], input_size: Sequence[int] | None = None,
                   input_scale: float = 1.0, base_size: Sequence[int] | None = None,
                   scales: Sequence[float] = (1.0,), flip: bool = False, amp: bool = False,
                   size_divisor: int = SIZE_DIVISOR, network_width: int | None = None,
                   size_fn: Callable[[int, int, float], tuple[int, int]] | None = None) -> Tensor:
    """Class scores (N x C x H x W at ``out_size``) for normalised images ``x`` (N x 3 x h x w).

    The network input is ``input_size`` (or the image scaled to ``network_width`` as the engine's ``auto`` does, or
    by ``input_scale`` / into ``base_size``) times each
    of ``scales``, rounded to multiples of ``size_divisor`` (:func:`~icnet_ros.sizes.aligned_size`; 1: exact),
    plus its mirror image with ``flip``; ``size_fn(h, w, scale)`` (e.g. an :class:`~icnet_ros.sizes.InputSizePolicy`'s
    ``network_size``), when given,
    replaces all of that. One pass returns upsampled logits; several return the sum of softmax probabilities."""
    h, w = x.shape[-2:]
    passes = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    autocast = torch.autocast(x.device.type, dtype=torch.float16) if amp and x.device.type == "cuda" \
        else nullcontext()
    total: Tensor | None = None
    for s, f in passes:
        size = size_fn(h, w, s) if size_fn is not None else _net_size(h, w, input_size, input_scale, base_size, s,
                                                                       size_divisor, network_width)
        xi = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if f:
            xi = xi.flip(-1)
        chunks = []
        with autocast:  # an export with a batch limit (or a fixed batch) in chunks it takes, each upsampled at once
            for _, part in in_chunks(model, xi):
                up = upsample_logits(part.float(), out_size)
                chunks.append(up.clone() if up.data_ptr() == part.data_ptr() else up)  # not the runtime's buffer
        logits = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        if f:
            logits = logits.flip(-1)
        out = logits if len(passes) == 1 else logits.softmax(dim=1)
        total = out if total is None else total + out
    assert total is not None
    return total


def model_memory_format(model: Any) -> torch.memory_format:
    """channels_last when the model's spatial conv weights are stored that way, else contiguous (a backend
    says its own)."""
    if not isinstance(model, nn.Module):
        return model.memory_format
    for p in model.parameters():
        if p.dim() == 4 and p.shape[-1] > 1:
            return torch.channels_last if not p.is_contiguous() and p.is_contiguous(
                memory_format=torch.channels_last) else torch.contiguous_format
    return torch.contiguous_format


def _groups(images: Tensor | list[Tensor], labels: Tensor | list[Tensor]) -> Iterable[tuple[Tensor, Tensor]]:
    """Batches of equal-sized samples (collate returns lists when sizes differ)."""
    if isinstance(images, Tensor):
        yield images, labels
    else:
        for im, lb in zip(images, labels):
            yield im.unsqueeze(0), lb.unsqueeze(0)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, normalizer: Normalizer, num_classes: int, ignore_index: int,
             device: torch.device, input_size: Sequence[int] | None = None, input_scale: float = 1.0,
             base_size: Sequence[int] | None = None, scales: Sequence[float] = (1.0,), flip: bool = False,
             amp: bool = False, progress: bool = True, desc: str = "eval", size_divisor: int = SIZE_DIVISOR,
             network_width: int | None = None,
             size_fn: Callable[[int, int, float], tuple[int, int]] | None = None) -> ConfusionMatrix:
    """Accumulate the confusion matrix of ``model`` over ``loader`` (batches of uint8 N x H x W x 3 RGB images
    and N x H x W labels); summed over ranks under torch.distributed. The model's train/eval mode is restored.
    ``model`` may also be a backend (:mod:`icnet_ros.backends`): its input dtype and layout are used."""
    from tqdm import tqdm

    is_module = isinstance(model, nn.Module)
    was_training = model.training if is_module else False
    if is_module:
        model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device)
    fmt = model_memory_format(model)
    dtype = torch.float32 if is_module else model.input_dtype
    try:
        total = len(loader) if hasattr(loader, "__len__") else None
        with tqdm(loader, total=total, desc=desc, disable=not progress, leave=False, file=sys.stderr,
                  dynamic_ncols=True) as batches:
            for images, labels in batches:
                for im, lb in _groups(images, labels):
                    im = im.to(device, non_blocking=True)
                    lb = lb.to(device, non_blocking=True)
                    x = normalizer(im, "RGB").to(dtype).contiguous(memory_format=fmt)
                    scores = predict_logits(model, x, lb.shape[-2:], input_size, input_scale, base_size, scales,
                                            flip, amp, size_divisor, network_width, size_fn)
                    cm.update(scores.argmax(dim=1), lb, check=False)
    except KeyboardInterrupt:
        if progress:  # the bar's line ended: the caller's one line starts on a line of its own (it could land after
            print(file=sys.stderr, flush=True)  # the bar's text, on the same line, 1 run in 7 here)
        raise
    finally:
        if is_module:
            model.train(was_training)
    cm.all_reduce()
    return cm


def metrics_report(metrics: dict[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """JSON-ready metrics in percent (NaN -> null), per class by name."""
    return {"mIoU": to_percent(metrics["mIoU"]), "mAcc": to_percent(metrics["mAcc"]),
            "aAcc": to_percent(metrics["aAcc"]), "pixels": metrics["pixels"],
            "per_class": {name: {"IoU": to_percent(iou), "Acc": to_percent(acc)}
                          for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"])}}


def _dataset_class_set(spec: DataSpec, model_classes: ClassSet) -> ClassSet:
    """The dataset's class set; generic folders without a class file take the model's classes (labels hold
    train ids 0..C-1)."""
    root = Path(spec.root).expanduser()
    if not root.is_dir():  # before the layout is guessed: a missing root read as a folder of the wrong classes
        raise DatasetError(f"dataset root not found: {root} (relative paths are taken from {Path.cwd()})")
    layout = detect_layout(spec.root) if spec.layout == "auto" else spec.layout
    try:
        return resolve_class_set(spec, layout)
    except DatasetError:
        if layout != "folders" or spec.class_file:
            raise
        return model_classes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="icnet-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model file: native .safetensors, or an exported .onnx / OpenVINO .xml "
                   "(icnet-export, also INT8) / TensorRT .engine or .plan; default: the package's default model")
    p.add_argument("--data", required=True, help="dataset root: CamVid layout (DIR/SPLIT/images, DIR/SPLIT/labels), "
                   "Cityscapes (DIR/leftImg8bit, DIR/gtFine) or generic folders with a class file")
    p.add_argument("--split", default="val", help="split to evaluate (default: val); a+b concatenates")
    p.add_argument("--layout", default="auto", choices=("auto", "camvid", "cityscapes", "folders"))
    p.add_argument("--class-file", help="class file for generic folders (see icnet_ros.data.load_class_file)")
    p.add_argument("--class-set", choices=sorted(CLASS_SETS), help="a named class set for the labels (as "
                   "icnet-train's data.class_set; default: the layout's, or the class file's)")
    p.add_argument("--image-dir", default=DataSpec.image_dir, help="image folder under the root, {split} filled in "
                   "(as data.image_dir; default: %(default)s)")
    p.add_argument("--label-dir", default=DataSpec.label_dir, help="label folder under the root, {split} filled in "
                   "(as data.label_dir; default: %(default)s)")
    p.add_argument("--label-suffix", default="", help="label file = image stem + suffix + .png (generic folders)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: 2)")
    p.add_argument("--native", action="store_true", help="same as --input-size native")
    p.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help="multi-scale factors (default: 1.0; a checkpoint only: an exported model runs at its export "
                        "size)")
    p.add_argument("--amp", action="store_true", help="float16 autocast on CUDA")
    p.add_argument("--limit", type=int, help="evaluate the first N samples only")
    p.add_argument("--json", action="store_true", help="print one JSON object (percentages) on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    engine_config.add_arguments(p, names=("backend", "device", "input_size", "size_divisor"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """icnet-eval. Ctrl-C and SIGTERM (``kill``, ``timeout``): one line ``icnet-eval: interrupted`` and exit status
    130 / 143, nothing on stdout (before: a KeyboardInterrupt traceback; SIGTERM killed it without a word)."""
    from .tools.cli_checks import run_stoppable

    # loading the model, reading the data, evaluating: the report is printed whole after the evaluation or not at all
    return run_stoppable("icnet-eval", lambda stop: _main(argv, stop))


def _main(argv: Sequence[str] | None, stop: StopSignals) -> int:
    from .checkpoint import CheckpointError, load_model

    args = build_parser().parse_args(argv)
    if args.native:
        if isinstance(args.input_size, list):  # given (the default is a plain string): two answers to one question
            print(f"icnet-eval: error: --native is --input-size native; give one of them, not both (--input-size "
                  f"{' '.join(args.input_size)})", file=sys.stderr)
            return 2
        args.input_size = ["native"]
    if args.batch_size < 1 or args.workers < 0:
        print("icnet-eval: error: --batch-size >= 1 and --workers >= 0 required", file=sys.stderr)
        return 2
    bad = [s for s in args.scales if not (math.isfinite(s) and 0 < s <= MAX_SCALE)]
    if bad:  # a frame is never upscaled more than MAX_SCALE per side; 1e5 asked for 112 GiB
        print(f"icnet-eval: error: --scales {bad[0]:g}: each scale must be in (0, {MAX_SCALE:g}]", file=sys.stderr)
        return 2
    try:
        cfg = engine_config.from_args(args)
        from .engine import backend_for, inference_device

        if args.model is None and cfg.backend not in ("auto", "torch"):  # (it evaluated with torch, exit 0)
            raise ValueError(f"--backend {cfg.backend} runs an exported model file (icnet-export); got the default "
                             "model: give --model")
        backend_name = "torch" if args.model is None else backend_for(args.model, cfg.backend)
        with warnings.catch_warnings():  # auto on a machine without CUDA: the CPU, as expected for an evaluation
            warnings.simplefilter("ignore", RuntimeWarning)
            device = inference_device(backend_name, cfg.device)
        if backend_name == "torch":
            model: Any = load_model(args.model, device)
            meta = model.meta
        else:  # an exported model, through its runtime, at its fixed export size: another HxW is refused, native
            from .engine import Segmenter  # and scale factors give the export size (as in the Segmenter)

            # on the device resolved above (its 'auto: CUDA is not available' warning already silenced there)
            seg = Segmenter(args.model, cfg.replace(warmup=False, device=str(device)))
            model, meta = seg.backend, seg.meta
            device = seg.backend.device
            if any(s != 1.0 for s in args.scales):
                h, w = model.fixed_size
                raise ValueError(f"{args.model} was exported for {h}x{w} inputs and runs at no other size; "
                                 f"--scales {' '.join(f'{s:g}' for s in args.scales)} needs the checkpoint "
                                 f"(.safetensors)")
        sizes = InputSizePolicy.from_option(cfg.input_size, meta, cfg.size_divisor, getattr(model, "fixed_size", None))
        if sizes.kind == "fixed":  # the network inputs are known now: refuse an oversized one before any work
            for s in args.scales:
                _bounded_size(sizes.network_size)(*sizes.param, s)
        model_classes = class_set_from_meta(meta)
        spec = DataSpec(root=args.data, layout=args.layout, class_set=args.class_set, class_file=args.class_file,
                        image_dir=args.image_dir, label_dir=args.label_dir, label_suffix=args.label_suffix)
        class_set = _dataset_class_set(spec, model_classes)
        if class_set.num_classes != model_classes.num_classes:
            raise DatasetError(f"the dataset has {class_set.num_classes} classes ({class_set.name}) but the model "
                               f"predicts {model_classes.num_classes} ({model_classes.name})")
        # the model's class id for each of the dataset's: the same names in another order are matched by name
        # (compared id by id, every class met another's pixels and the report was nonsense with exit status 0)
        model_ids = list(range(class_set.num_classes))
        if list(class_set.classes) != list(model_classes.classes):
            if sorted(class_set.classes) == sorted(model_classes.classes):
                model_ids = [model_classes.classes.index(c) for c in class_set.classes]
                print(f"icnet-eval: the dataset ({class_set.name}) lists the model's ({model_classes.name}) classes "
                      f"in another order: matched by name", file=sys.stderr)
            else:
                print(f"icnet-eval: warning: class names differ between the dataset ({class_set.name}) and the "
                      f"model ({model_classes.name}); compared id by id, reporting the dataset's", file=sys.stderr)
        dataset = build_dataset(spec, args.split, limit=args.limit, class_set=class_set)
        warning = dataset.unclaimed_values_warning()
        if warning:
            print(f"icnet-eval: warning: {warning}", file=sys.stderr)
    except (CheckpointError, DatasetError, ValueError, OSError, RuntimeError) as e:
        print(f"icnet-eval: error: {e}", file=sys.stderr)
        return 2
    size_divisor = sizes.size_divisor
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=ShardSampler(len(dataset)),
                        num_workers=args.workers, collate_fn=collate_segmentation, worker_init_fn=worker_init,
                        pin_memory=device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ran: set[tuple[int, int]] = set()  # the network sizes at scale 1 (one, or more than one)
    t0 = time.perf_counter()
    with stop.held():  # a stop signal inside the workers' start-up left torch's iterator half made: its __del__
        batches = iter(loader)  # printed an AttributeError traceback after the one line
    try:
        cm = evaluate(model, batches, Normalizer(meta.get("normalization")), class_set.num_classes,
                      class_set.ignore_index, device, scales=args.scales, flip=args.flip, amp=args.amp,
                      progress=not args.no_progress, desc=f"icnet-eval {args.split}",
                      size_fn=_bounded_size(sizes.network_size, ran))
    except (DatasetError, NetworkSizeError) as e:  # an unreadable image or label (also in a loader worker), or
        print(f"icnet-eval: error: {_one_line(e)}", file=sys.stderr)  # an image too large at one of the --scales
        return 2
    seconds = time.perf_counter() - t0
    cm.matrix = cm.matrix[:, model_ids]  # columns (predictions) in the dataset's order
    metrics = cm.compute()
    input_size = sizes.param if sizes.kind == "fixed" else None
    # the network input at scale 1: --input-size 100x150 runs at 96x160 (multiples of --size-divisor); the JSON
    # reported only the requested 100x150 before
    # (auto or a scale: the size every frame ran at, when they all ran at one; None when they did not)
    network_size = (sizes.network_size(*sizes.param) if sizes.kind == "fixed" else
                    next(iter(ran)) if len(ran) == 1 else None)
    network_width, policy = (sizes.param if sizes.kind == "width" else None), sizes.describe()
    if args.json:
        report = {**metrics_report(metrics, class_set.classes), "model": args.model or "default",
                  "data": args.data, "split": args.split, "images": len(dataset), "classes": class_set.name,
                  "input_size": list(input_size) if input_size else None,
                  "network_size": list(network_size) if network_size else None, "network_width": network_width,
                  "input_policy": policy, "backend": backend_name, "flip": args.flip,
                  "scales": list(args.scales), "size_divisor": size_divisor, "device": str(device),
                  "seconds": round(seconds, 3), "license": meta.get("license")}
        print(json.dumps(report, allow_nan=False))
    else:
        if input_size and network_size and tuple(network_size) != tuple(input_size):
            policy += f" (network {network_size[0]}x{network_size[1]})"
        print(f"model: {args.model or 'default'}  data: {args.data} [{args.split}, {len(dataset)} images]  "
              f"input: {policy}  backend: {backend_name}  flip: {args.flip}  scales: {args.scales}  "
              f"size divisor: {size_divisor}  device: {device}  ({seconds:.1f} s)")
        print(f"license of the weights: {meta.get('license') or 'not recorded'}")
        print(format_table(metrics, class_set.classes))
    if math.isnan(metrics["mIoU"]):
        print(f"icnet-eval: error: no labelled pixel in {len(dataset)} label file(s): every pixel is "
              f"{class_set.ignore_index} (ignore); check the labels' format and the class set ({class_set.name})",
              file=sys.stderr)
        return 1
    return 0


class NetworkSizeError(ValueError):
    """A network input over :data:`~icnet_ros.sizes.MAX_UPSCALED_PIXELS` (an image at a large ``--scales``)."""


def _bounded_size(size_fn: Callable[[int, int, float], tuple[int, int]], ran: set[tuple[int, int]] | None = None
                  ) -> Callable[[int, int, float], tuple[int, int]]:
    """``size_fn`` that raises :class:`NetworkSizeError` for a network input over MAX_UPSCALED_PIXELS (4096x4096:
    the engine's, icnet-export's and the model files' bound) before anything that large is allocated; the network
    sizes at scale 1 are added to ``ran`` (at most 2: one size, or more than one)."""
    def sized(h: int, w: int, scale: float) -> tuple[int, int]:
        nh, nw = size_fn(h, w, scale)
        if nh * nw > MAX_UPSCALED_PIXELS:
            raise NetworkSizeError(f"--scales {scale:g}: a {h}x{w} image becomes a {nh}x{nw} network input, more "
                                   f"than {MAX_UPSCALED_TEXT}; use smaller --scales or "
                                   "--input-size")
        if ran is not None and scale == 1.0 and len(ran) < 2:
            ran.add((nh, nw))
        return nh, nw
    return sized


def _one_line(error: BaseException) -> str:
    """An error's message in one line: a DataLoader worker re-raises it with the worker's traceback in the text,
    whose last line is ``module.Class: message``."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    last = lines[-1]
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


if __name__ == "__main__":
    sys.exit(main())
