"""The inference engine: :class:`Segmenter` turns uint8 frames into labels, colour masks, overlays and confidences.

ROS-free (the node, the CLIs and the benchmarks all use it). Everything between the uint8 frame and the uint8
outputs runs on the model's device: upload (pinned host memory + non-blocking copy on CUDA), resize to the network
input size, normalisation (:class:`~icnet_ros.preprocess.Normalizer`, RGB or BGR), the network, bilinear upsampling
of the logits to the output size, argmax (softmax only when a confidence is needed), palette lookup (a 256 x 3 uint8
table on the device) and overlay blending. Only the requested uint8 outputs come back to the host, with one
synchronisation per call.

Label values: class ids ``0..num_classes-1``; :data:`UNKNOWN` (255, the project-wide ignore value) marks pixels the
segmenter does not classify. Argmax never produces it; it appears only when ``confidence_threshold`` is set (pixels
whose max softmax probability is below the threshold). Unknown pixels are black in the colour mask and keep the
original frame in the overlay.

Frames in one call may have different sizes and channel orders: frames are grouped by (size, channel order) and
each group is one forward pass; with a fixed ``input_size`` all frames are resized to it and share one forward.
Network input sizes are rounded to multiples of ``size_divisor`` (32: ICNet's branches only line up there; a
480x360 frame runs at 480x352; :data:`icnet_ros.sizes.SIZE_DIVISOR`).
"""
from __future__ import annotations

import copy
import math
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, build_meta, default_model_path, load_model, validate_meta
from .classes import IGNORE_INDEX, ClassSet, class_set_from_meta
from .models.icnet import MIN_INPUT_SIZE
from .optimize import CUDAGraphRunner, compile_model, factorize_pyramid_pooling, fold_batchnorm
from .preprocess import Normalizer
from .sizes import SIZE_DIVISOR, aligned_size, parse_input_size

#: label value for pixels the segmenter does not classify (see the module docstring)
UNKNOWN = IGNORE_INDEX
OUTPUTS: tuple[str, ...] = ("label", "color", "overlay", "confidence")
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PRECISION_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
CHANNEL_ORDERS = ("RGB", "BGR")
OUTPUT_SIZES = ("input", "model")
MAX_CUDA_GRAPHS = 8


@dataclass
class SegmentResult:
    """Per-frame outputs, all uint8 numpy arrays at the output size (the frame's size unless ``output_size`` is
    ``"model"``). ``label``: H x W class ids, :data:`UNKNOWN` = 255 for unclassified pixels (always returned).
    ``color``/``overlay``: H x W x 3 in the frame's channel order, None unless requested. ``confidence``: H x W,
    ``round(255 * max softmax probability)``, None unless requested. ``model_size``: the network input (H, W)."""

    label: np.ndarray
    color: np.ndarray | None = None
    overlay: np.ndarray | None = None
    confidence: np.ndarray | None = None
    model_size: tuple[int, int] | None = None


def resolve_device(device: str | torch.device, notes: list[str] | None = None) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (or a torch.device) -> a usable torch.device.

    ``auto`` is CUDA when available, else the CPU with a warning (also appended to ``notes``)."""
    if isinstance(device, torch.device):
        spec = str(device)
    elif isinstance(device, str):
        spec = device.strip().lower()
    else:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        msg = "device 'auto': CUDA is not available, running on the CPU (expect a much lower frame rate)"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        if notes is not None:
            notes.append(msg)
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available (CPU-only PyTorch build, no GPU "
                             "or no driver); use device='cpu' or 'auto'")
        index = torch.cuda.current_device()
        if spec != "cuda":
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"bad CUDA device {spec!r}; expected cuda:N") from None
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _parse_precision(precision: str) -> str:
    p = str(precision).strip().lower()
    p = _PRECISION_ALIASES.get(p, p)
    if p not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return p


def _parse_outputs(outputs: Sequence[str] | str | None, what: str = "outputs") -> frozenset[str]:
    if outputs is None:
        return frozenset({"label"})
    if isinstance(outputs, str):
        outputs = [o for o in outputs.replace(",", " ").split() if o]
    wanted = frozenset(outputs)
    unknown = sorted(wanted - set(OUTPUTS))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {list(OUTPUTS)}")
    return wanted | {"label"}  # the label is always returned


def _parse_input_size(input_size: Any) -> tuple[str, tuple[int, int] | float | None]:
    """-> ("native", None) | ("fixed", (H, W)) | ("scale", factor)."""
    if (input_size is None or (isinstance(input_size, str) and input_size.strip().lower() in ("native", ""))
            or (isinstance(input_size, (list, tuple)) and len(input_size) == 0)):
        return "native", None
    if isinstance(input_size, str):
        try:
            parsed = parse_input_size(input_size)
        except ValueError as e:
            raise ValueError(f"input_size: {e}") from None
        if parsed == "checkpoint":
            raise ValueError("input_size 'checkpoint' is resolved by the caller from the model's metadata "
                             "(meta['input_size']); pass that size, or None for native")
        return _parse_input_size(parsed)
    if isinstance(input_size, bool):
        raise ValueError(f"input_size must be None, (H, W) or a scale factor, got {input_size!r}")
    if isinstance(input_size, (int, float)):
        s = float(input_size)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"input_size scale factor must be > 0, got {input_size!r}")
        return "scale", s
    if isinstance(input_size, Sequence) and len(input_size) == 2:
        h, w = (int(v) for v in input_size)
        if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
            raise ValueError(f"input_size {h}x{w} is below the network minimum {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}")
        return "fixed", (h, w)
    raise ValueError(f"input_size must be None ('native'), (H, W) or a scale factor, got {input_size!r}")


def _model_and_meta(model_or_path: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Load or copy the model (always a private, eval-mode, float32 copy) and its validated metadata."""
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
    return model, meta


class _FrameGroup:
    """Frames of one size and channel order that go through the device pipeline together."""

    __slots__ = ("indices", "arrays", "order", "size", "channels", "net_size")

    def __init__(self, size: tuple[int, int], channels: int, order: str, net_size: tuple[int, int]) -> None:
        self.indices: list[int] = []
        self.arrays: list[np.ndarray] = []
        self.order, self.size, self.channels, self.net_size = order, size, channels, net_size


class Segmenter:
    """Semantic segmentation of uint8 frames with an ICNet; see the module docstring and ``segment``.

    Args:
        model_or_path: None (the package's default model), a native ``.safetensors`` checkpoint path, or an ICNet
            module (its ``.meta``, or metadata built from ``.config``; the module is copied, never modified).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; ``auto`` falls back to the CPU with a warning.
        precision: ``fp32`` | ``fp16`` | ``bf16`` (weights and activations). fp16 on the CPU raises ValueError,
            except with ``device="auto"`` where it falls back to fp32 with a warning (fp16 CPU kernels are slow or
            missing); bf16 on the CPU is fast on CPUs with AVX512-BF16/AMX.
        input_size: None / ``"native"`` / ``()`` (frame size), ``(H, W)`` or ``"HxW"`` fixed network input, or a
            float scale factor.
        outputs: default outputs, any of ``label``, ``color``, ``overlay``, ``confidence`` (label always included).
        overlay_alpha: overlay = alpha * color + (1 - alpha) * frame, alpha in [0, 1].
        output_size: ``input`` (frame resolution) or ``model`` (network input resolution).
        optimize: fold BN into convs, factorize concat pyramid pooling
            (:class:`~icnet_ros.optimize.FactorizedPyramidPooling`), channels_last (see ``channels_last``); always
            ``inference_mode`` and a private eval copy of the model.
        warmup: run the pipeline once (twice on CUDA) at construction; True, False, or an (H, W) warm-up size
            (default: the fixed input size, else the checkpoint's input size, else 512x1024 on CUDA and
            256x512 on the CPU).
        confidence_threshold: pixels whose max softmax probability is below it get label :data:`UNKNOWN`
            (default None: off, no softmax unless ``confidence`` is requested).
        channels_last: None = same as ``optimize``. NHWC pays off on every device and precision measured (CPU fp32:
            1.2x for ICNet-R50 at 512x1024, 2.1x for the default model at 1024x2048; BENCHMARKS.md).
        compile: False, True or a ``torch.compile`` mode: compile the network (recompiles per input shape) and
            the colour/overlay rendering (default mode).
        cuda_graphs: capture the network forward in CUDA graphs, one per input shape (at most 8 kept); CUDA only.
        size_divisor: network input sizes (every policy) are rounded to the nearest multiples of it (default 32,
            ICNet's coarsest stride: the cascade misaligns at other sizes and loses accuracy, e.g. 61.2 -> 65.5
            val mIoU for the default model on 480x360 CamVid frames); 1 keeps sizes exact.
    """

    def __init__(self, model_or_path: Any = None, device: str | torch.device = "auto", precision: str = "fp32",
                 input_size: Any = None, outputs: Sequence[str] | str = ("label",), overlay_alpha: float = 0.5,
                 output_size: str = "input", optimize: bool = True, warmup: bool | tuple[int, int] = True, *,
                 confidence_threshold: float | None = None, channels_last: bool | None = None,
                 compile: bool | str = False, cuda_graphs: bool = False,
                 size_divisor: int = SIZE_DIVISOR) -> None:  # noqa: A002 - torch's word
        #: warnings raised while building (device / precision fallbacks), for callers that log elsewhere
        self.notes: list[str] = []
        self.precision = _parse_precision(precision)
        self.device = resolve_device(device, self.notes)
        if self.device.type == "cpu" and self.precision == "fp16":
            if str(device).strip().lower() != "auto":
                raise ValueError("precision 'fp16' is not supported on the CPU (slow or missing kernels); use "
                                 "'bf16' or 'fp32', or run on CUDA")
            msg = "precision 'fp16' requested but running on the CPU: using fp32"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            self.notes.append(msg)
            self.precision = "fp32"
        self.dtype = PRECISIONS[self.precision]
        self.input_policy, self._input_param = _parse_input_size(input_size)
        if isinstance(size_divisor, bool) or not isinstance(size_divisor, int) or size_divisor < 1:
            raise ValueError(f"size_divisor must be an integer >= 1, got {size_divisor!r}")
        self.size_divisor = size_divisor
        self.outputs = _parse_outputs(outputs)
        if not 0.0 <= float(overlay_alpha) <= 1.0:
            raise ValueError(f"overlay_alpha must be in [0, 1], got {overlay_alpha!r}")
        self.overlay_alpha = float(overlay_alpha)
        if output_size not in OUTPUT_SIZES:
            raise ValueError(f"output_size must be one of {list(OUTPUT_SIZES)}, got {output_size!r}")
        self.output_size = output_size
        if confidence_threshold is not None and not 0.0 <= float(confidence_threshold) <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1] or None, got {confidence_threshold!r}")
        self.confidence_threshold = None if not confidence_threshold else float(confidence_threshold)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        if cuda_graphs and compile:
            raise ValueError("use either cuda_graphs or compile (compile mode 'reduce-overhead' uses CUDA graphs)")

        model, self.meta = _model_and_meta(model_or_path)
        self.class_set: ClassSet = class_set_from_meta(self.meta)
        self.num_classes = self.class_set.num_classes
        self.optimized = bool(optimize)
        self.folded_batchnorms = 0
        self.factorized_ppms = 0
        if optimize:
            probe = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
            probe = probe.to(next(model.parameters()).device)
            try:
                self.folded_batchnorms = fold_batchnorm(model, probe)
            except RuntimeError as e:  # the model was restored unfolded: run it as it is
                warnings.warn(str(e), RuntimeWarning, stacklevel=2)
                self.notes.append(str(e))
            try:
                self.factorized_ppms = factorize_pyramid_pooling(model, probe)
            except RuntimeError as e:  # restored as it was
                warnings.warn(str(e), RuntimeWarning, stacklevel=2)
                self.notes.append(str(e))
        if channels_last is None:
            channels_last = optimize
        self.channels_last = bool(channels_last)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        model = model.to(device=self.device, dtype=self.dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._compiled = compile_model(model, None if compile is True else compile) if compile else None
        # colour/overlay rendering is a chain of memory-bound element-wise ops that inductor fuses into one loop
        # (CPU, 2 megapixels: ~58 ms eager, ~2 ms compiled, identical bytes)
        self._render = torch.compile(self.render, dynamic=False) if compile else self.render
        self.compile_mode = (None if not compile else "default" if compile is True else str(compile))
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs: OrderedDict[tuple, CUDAGraphRunner] = OrderedDict()

        self.normalizer = Normalizer(self.meta["normalization"])
        palette = torch.from_numpy(self.class_set.palette_array()).to(self.device)
        self._palettes = {"RGB": palette, "BGR": palette.flip(1).contiguous()}
        self._lock = threading.Lock()
        #: seconds the last ``segment`` call took (host wall time, device work included)
        self.last_latency_s: float | None = None
        if self.device.type == "cuda" and self.input_policy == "fixed":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest algorithms
        if warmup:
            self.warmup(None if warmup is True else tuple(warmup))

    # ----------------------------------------------------------------------------------------------- public API
    def segment(self, frames: Sequence[np.ndarray], channel_order: str | Sequence[str] = "RGB",
                outputs: Sequence[str] | str | None = None) -> list[SegmentResult]:
        """Segment a batch of frames (see the class docstring); returns one :class:`SegmentResult` per frame.

        ``frames``: a list of uint8 H x W x 3 (RGB or BGR), H x W or H x W x 1 (mono8) arrays (or an N x H x W x 3
        array); sizes may differ. ``channel_order``: one order for all frames or one per frame; colour and overlay
        come back in each frame's order. ``outputs``: overrides the default outputs for this call.
        An empty list returns an empty list. Thread-safe (calls are serialised).
        """
        want = self.outputs if outputs is None else _parse_outputs(outputs)
        frames = self._as_frame_list(frames)
        orders = self._orders(channel_order, len(frames))
        groups = self._group(frames, orders)
        if not groups:
            return []
        with self._lock:
            t0 = time.perf_counter()
            results = self._run(groups, want, len(frames))
            self.last_latency_s = time.perf_counter() - t0
        return results

    def segment_one(self, frame: np.ndarray, channel_order: str = "RGB",
                    outputs: Sequence[str] | str | None = None) -> SegmentResult:
        """``segment([frame], ...)[0]``."""
        return self.segment([frame], channel_order, outputs)[0]

    def network_size(self, height: int, width: int) -> tuple[int, int]:
        """The network input (H, W) for a frame of ``height`` x ``width``: the input-size policy's size rounded to
        multiples of ``size_divisor``."""
        return aligned_size(*self._policy_size(height, width), self.size_divisor)

    def _policy_size(self, height: int, width: int) -> tuple[int, int]:
        """The input-size policy's (H, W) for a frame, before rounding."""
        if self.input_policy == "fixed":
            return self._input_param  # type: ignore[return-value]
        if self.input_policy == "scale":
            s = float(self._input_param)  # type: ignore[arg-type]
            return max(1, int(round(height * s))), max(1, int(round(width * s)))
        return height, width

    def warmup(self, size: tuple[int, int] | None = None, iterations: int | None = None) -> None:
        """Run the full pipeline on a synthetic frame (allocations, kernel selection, CUDA graph capture)."""
        if size is None:
            if self.input_policy == "fixed":
                size = self._input_param  # type: ignore[assignment]
            elif self.meta.get("input_size"):
                size = tuple(self.meta["input_size"])  # type: ignore[assignment]
            else:
                size = (512, 1024) if self.device.type == "cuda" else (256, 512)
            if self.input_policy == "scale":  # pick a frame size whose network size is valid
                s = float(self._input_param)  # type: ignore[arg-type]
                size = tuple(max(v, int(math.ceil(MIN_INPUT_SIZE / s)) + 1) for v in size)  # type: ignore[assignment]
        n = iterations if iterations is not None else (2 if self.device.type == "cuda" else 1)
        frame = np.random.default_rng(0).integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
        for _ in range(n):
            self.segment([frame], outputs=OUTPUTS)

    def describe(self) -> str:
        """One line for logs: model, classes, device, precision, input policy and optimisations."""
        arch = self.meta["arch"]
        opts = []
        if self.folded_batchnorms:
            opts.append(f"bn-fold({self.folded_batchnorms})")
        if self.factorized_ppms:
            opts.append("ppm-factorized")
        if self.channels_last:
            opts.append("channels_last")
        if self.compile_mode:
            opts.append(f"compile({self.compile_mode})")
        if self.cuda_graphs:
            opts.append("cuda-graphs")
        if self.input_policy == "fixed":
            size = "x".join(map(str, self._input_param))  # type: ignore[arg-type]
        elif self.input_policy == "scale":
            size = f"scale {self._input_param:g}"
        else:
            size = "native"
        if self.size_divisor > 1:
            size += f" (multiples of {self.size_divisor})"
        return (f"ICNet {arch['backbone']} width {arch['width']} | {self.num_classes} classes "
                f"({self.class_set.name}) | {self.device} {self.precision} | input {size} | "
                f"optimizations: {', '.join(opts) or 'none'}")

    # ------------------------------------------------------------------------------------------ input checking
    @staticmethod
    def _as_frame_list(frames: Any) -> list[np.ndarray]:
        if isinstance(frames, np.ndarray):
            if frames.ndim == 4:
                return list(frames)
            raise ValueError(f"frames must be a list of images (got a single {frames.ndim}-D array of shape "
                             f"{frames.shape}; wrap one frame as [frame])")
        if not isinstance(frames, (list, tuple)):
            raise ValueError(f"frames must be a list of numpy uint8 images, got {type(frames).__name__}")
        return list(frames)

    @staticmethod
    def _orders(channel_order: str | Sequence[str], n: int) -> list[str]:
        orders = [channel_order] * n if isinstance(channel_order, str) else list(channel_order)
        if len(orders) != n:
            raise ValueError(f"channel_order has {len(orders)} entries for {n} frames")
        for o in orders:
            if o not in CHANNEL_ORDERS:
                raise ValueError(f"channel_order must be 'RGB' or 'BGR' (or a list of those), got {o!r}")
        return orders

    def _check_frame(self, i: int, f: Any) -> np.ndarray:
        if not isinstance(f, np.ndarray):
            raise ValueError(f"frame {i}: expected a numpy uint8 array, got {type(f).__name__}")
        if f.dtype != np.uint8:
            raise ValueError(f"frame {i}: dtype {f.dtype}, expected uint8 (8-bit RGB/BGR or mono8 images; scale "
                             "other types to 0..255 first)")
        if f.ndim == 3 and f.shape[2] == 1:
            f = f[:, :, 0]
        if not (f.ndim == 2 or (f.ndim == 3 and f.shape[2] == 3)):
            hint = "; drop the alpha channel first" if f.ndim == 3 and f.shape[2] == 4 else ""
            raise ValueError(f"frame {i}: shape {f.shape}, expected H x W x 3 (RGB/BGR), H x W or H x W x 1 "
                             f"(mono8){hint}")
        if f.shape[0] == 0 or f.shape[1] == 0:
            raise ValueError(f"frame {i}: empty frame (shape {f.shape})")
        h, w = self._policy_size(f.shape[0], f.shape[1])
        if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
            how = "" if self.input_policy == "fixed" else " (use input_size=(H, W) to upscale small frames)"
            raise ValueError(f"frame {i}: {f.shape[0]}x{f.shape[1]} gives a {h}x{w} network input, below the "
                             f"minimum {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}{how}")
        return f

    def _group(self, frames: list[Any], orders: list[str]) -> list[_FrameGroup]:
        groups: dict[tuple, _FrameGroup] = {}
        for i, (f, order) in enumerate(zip(frames, orders)):
            f = self._check_frame(i, f)
            channels = 1 if f.ndim == 2 else 3
            key = (f.shape[0], f.shape[1], channels, order)
            g = groups.get(key)
            if g is None:
                g = groups[key] = _FrameGroup((f.shape[0], f.shape[1]), channels, order,
                                              self.network_size(f.shape[0], f.shape[1]))
            g.indices.append(i)
            g.arrays.append(f)
        return list(groups.values())

    # ------------------------------------------------------------------------------------------ device pipeline
    def _run(self, groups: list[_FrameGroup], want: frozenset[str], n_frames: int) -> list[SegmentResult]:
        with torch.inference_mode():
            uploads = [self.upload(g.arrays) for g in groups]
            inputs = [self.prepare(u, g.order, g.net_size) for u, g in zip(uploads, groups)]
            # one forward per network input size (all frames when the input size is fixed)
            by_size: dict[tuple[int, int], list[int]] = {}
            for gi, g in enumerate(groups):
                by_size.setdefault(g.net_size, []).append(gi)
            logits: list[Tensor | None] = [None] * len(groups)
            for gis in by_size.values():
                batch = inputs[gis[0]] if len(gis) == 1 else torch.cat([inputs[gi] for gi in gis])
                out = self.forward(batch)
                start = 0
                for gi in gis:
                    n = inputs[gi].shape[0]
                    logits[gi] = out[start:start + n]
                    start += n
            device_outputs = []
            for g, u, lg in zip(groups, uploads, logits):
                out_size = g.size if self.output_size == "input" else g.net_size
                label, conf = self.labels(lg, out_size, "confidence" in want)
                outs = {"label": label}
                if "color" in want or "overlay" in want:
                    outs.update(self._render(label, u, g.order, out_size, want))
                if "confidence" in want:
                    outs["confidence"] = conf
                device_outputs.append(outs)
            host = self.to_host(device_outputs)
        results: list[SegmentResult | None] = [None] * n_frames
        for g, outs in zip(groups, host):
            for j, i in enumerate(g.indices):
                results[i] = SegmentResult(label=outs["label"][j], color=_item(outs, "color", j),
                                           overlay=_item(outs, "overlay", j),
                                           confidence=_item(outs, "confidence", j), model_size=g.net_size)
        return results  # type: ignore[return-value]

    def upload(self, arrays: list[np.ndarray]) -> Tensor:
        """Same-size uint8 frames -> N x H x W x C uint8 tensor on the device (pinned + non-blocking on CUDA)."""
        shape = (len(arrays), *arrays[0].shape[:2], 1 if arrays[0].ndim == 2 else 3)
        if self.device.type == "cuda":
            host = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
            view = host.numpy()
            for k, a in enumerate(arrays):
                view[k] = a.reshape(shape[1:])
            return host.to(self.device, non_blocking=True)
        if len(arrays) == 1:
            a = arrays[0].reshape(shape[1:])
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
            return _from_numpy(a).unsqueeze(0)  # no copy
        return torch.from_numpy(np.stack([a.reshape(shape[1:]) for a in arrays]))

    def prepare(self, frames: Tensor, order: str, net_size: tuple[int, int]) -> Tensor:
        """uint8 N x H x W x C (C = 1 or 3) on the device -> normalised network input (model dtype and layout)."""
        x = frames.permute(0, 3, 1, 2)  # a view: NCHW with channels_last strides
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.to(dtype=torch.float32, memory_format=self.memory_format)  # one pass: convert + lay out
        if tuple(x.shape[2:]) != tuple(net_size):
            x = F.interpolate(x, size=net_size, mode="bilinear", align_corners=False)
        x = self.normalizer(x, order, channels_last_input=False)
        return x.to(dtype=self.dtype, memory_format=self.memory_format)

    def forward(self, x: Tensor) -> Tensor:
        """The network on a prepared batch: logits N x classes x ceil(H/8) x ceil(W/8) (model dtype)."""
        if self._compiled is not None:
            return self._compiled(x)
        if self.cuda_graphs:
            key = (tuple(x.shape), x.stride())
            runner = self._graphs.get(key)
            if runner is None:
                runner = CUDAGraphRunner(self.model, [x])
                self._graphs[key] = runner
                while len(self._graphs) > MAX_CUDA_GRAPHS:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
            return runner(x)  # static output: consumed (upsampled) before the next replay
        return self.model(x)

    def labels(self, logits: Tensor, out_size: tuple[int, int], want_confidence: bool
               ) -> tuple[Tensor, Tensor | None]:
        """Logits -> (uint8 N x H x W labels, uint8 confidence or None) at ``out_size``: bilinear upsampling in
        float32, argmax; max softmax probability only for the confidence or the confidence threshold."""
        # NHWC: the class axis is innermost, so upsampling and the per-pixel argmax/max/sum run on contiguous
        # memory (on the CPU this is ~2-4x faster than reducing over dim 1 of an NCHW tensor)
        x = logits.float().contiguous(memory_format=torch.channels_last)
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        need_prob = want_confidence or self.confidence_threshold is not None
        if not need_prob:
            return x.argmax(1).to(torch.uint8), None
        top, idx = x.max(1)
        # max softmax probability = 1 / sum_c exp(l_c - l_max); in place only on our own temporary
        shifted = x.sub_(top.unsqueeze(1)) if x is not logits else x - top.unsqueeze(1)
        prob = shifted.exp_().sum(1).reciprocal_()
        label = idx.to(torch.uint8)
        if self.confidence_threshold is not None:
            label.masked_fill_(prob < self.confidence_threshold, UNKNOWN)
        conf = prob.mul_(255.0).round_().to(torch.uint8) if want_confidence else None
        return label, conf

    def render(self, label: Tensor, frames: Tensor, order: str, out_size: tuple[int, int],
               want: frozenset[str]) -> dict[str, Tensor]:
        """Colour mask (palette lookup) and overlay (blend with the frame), uint8 N x H x W x 3 in ``order``."""
        color = self._palettes[order].index_select(0, label.reshape(-1).long()).view(*label.shape, 3)
        out = {}
        if "color" in want:
            out["color"] = color
        if "overlay" in want:
            base = frames
            if tuple(base.shape[1:3]) != tuple(out_size):
                base = F.interpolate(base.permute(0, 3, 1, 2).float(), size=out_size, mode="bilinear",
                                     align_corners=False).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            if base.shape[3] == 1:
                base = base.expand(-1, -1, -1, 3)
            a = self.overlay_alpha
            blend = torch.lerp(base.float(), color.float(), a) if 0.0 < a < 1.0 else (
                color.float() if a == 1.0 else base.float())
            overlay = blend.round_().to(torch.uint8)
            if self.confidence_threshold is not None:  # unknown pixels keep the frame
                overlay = torch.where((label == UNKNOWN).unsqueeze(-1), base, overlay)
            out["overlay"] = overlay
        return out

    def to_host(self, device_outputs: list[dict[str, Tensor]]) -> list[dict[str, np.ndarray]]:
        """Copy device tensors to numpy: CPU tensors are shared (no copy); CUDA tensors go to pinned buffers with
        non-blocking copies and one synchronisation."""
        if self.device.type != "cuda":
            return [{k: v.contiguous().numpy() for k, v in d.items()} for d in device_outputs]
        host = []
        for d in device_outputs:
            h = {}
            for k, v in d.items():
                buf = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                buf.copy_(v, non_blocking=True)
                h[k] = buf
            host.append(h)
        torch.cuda.current_stream(self.device).synchronize()
        return [{k: v.numpy() for k, v in h.items()} for h in host]

    def synchronize(self) -> None:
        """Wait for queued device work (for timing)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _item(outs: dict[str, np.ndarray], key: str, j: int) -> np.ndarray | None:
    v = outs.get(key)
    return None if v is None else v[j]


def _from_numpy(a: np.ndarray) -> Tensor:
    """torch.from_numpy that accepts read-only arrays (ROS message buffers): the tensor is never written."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


__all__ = ["OUTPUTS", "PRECISIONS", "SegmentResult", "Segmenter", "UNKNOWN", "resolve_device"]
