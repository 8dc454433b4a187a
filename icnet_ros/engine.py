"""The inference engine: :class:`Segmenter` turns uint8 frames into labels, colour masks, overlays and confidences.

ROS-free (the node, the CLIs and the benchmarks all use it). A thin facade over three parts, each in its own file:

1. preprocessing (:class:`~icnet_ros.preprocess.Preprocessor`): upload (pinned host memory + non-blocking copy on
   CUDA), resize to the network input size, normalisation and channel order;
2. a **backend** (:mod:`icnet_ros.backends`) that only maps a normalised batch to logits: ``torch`` (the ICNet
   module, optimised), ``onnxruntime``, ``openvino`` or ``tensorrt`` (exported files, ``icnet-export``);
3. postprocessing (:class:`~icnet_ros.postprocess.Postprocessor`): bilinear upsampling of the logits, argmax,
   confidence, palette, overlay, and the copy back with one synchronisation per call.

Every option is a field of :class:`~icnet_ros.engine_config.SegmenterConfig` (defined and documented once there).

Frames in one call may have different sizes and channel orders: frames are grouped by (size, channel order) and
each network input size is one forward pass (split at the backend's batch limit). Network input sizes come from the
``input_size`` policy and are rounded to multiples of ``size_divisor`` (32: ICNet's branches only line up there; a
360x480 (H x W) frame runs at 352x480 natively, at 544x736 with ``auto`` for the default model;
:data:`icnet_ros.sizes.SIZE_DIVISOR`). Exported models have a fixed network size: every frame is resized to it.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .backends.base import BACKENDS as BACKEND_MODULES
from .backends.base import Backend, BackendOptions, in_chunks
from .backends.torch_backend import TorchBackend, torch_backend_from
from .checkpoint import CheckpointError, default_model_path, inference_copy, read_metadata
from .classes import ClassSet, class_set_from_meta
from .engine_config import (LIVE_OPTIONS, OUTPUTS, ConfigError, FrameError, SegmenterConfig, format_input_size,
                            parse_input_size)
from .engine_config import check as check_option
from .models.icnet import MIN_INPUT_SIZE
from .postprocess import UNKNOWN, Postprocessor
from .preprocess import Preprocessor
from .profiling import stage
from .sizes import MAX_UPSCALED_PIXELS, InputSizePolicy

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHANNEL_ORDERS = ("RGB", "BGR")
#: model file suffix -> backend chosen by ``backend="auto"``
SUFFIX_BACKENDS = {".safetensors": "torch", ".onnx": "onnxruntime", ".xml": "openvino", ".engine": "tensorrt",
                   ".plan": "tensorrt"}
#: the model file types each backend reads (OpenVINO and TensorRT also take the ONNX export)
BACKEND_SUFFIXES = {"torch": (".safetensors",), "onnxruntime": (".onnx",), "openvino": (".xml", ".onnx"),
                    "tensorrt": (".onnx", ".engine", ".plan")}



@dataclass
class SegmentResult:
    """Per-frame outputs, all uint8 numpy arrays at the output size (the frame's size unless ``output_size`` is
    ``"model"``). ``label``: H x W class ids, the class set's ignore index (:data:`UNKNOWN` = 255 unless the model
    names another) for unclassified pixels (always returned). ``color``/``overlay``: H x W x 3 in the frame's channel order, None unless requested. ``confidence``: H x W,
    ``round(255 * max softmax probability)``, None unless requested. ``model_size``: the network input (H, W); ``frame_size``: the frame's."""

    label: np.ndarray
    color: np.ndarray | None = None
    overlay: np.ndarray | None = None
    confidence: np.ndarray | None = None
    model_size: tuple[int, int] | None = None
    frame_size: tuple[int, int] | None = None  # the frame's own (H, W), as it came in (decoded)


def resolve_device(device: str | torch.device, notes: list[str] | None = None) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``xpu`` | ``xpu:N`` (or a torch.device) -> a torch.device (a CUDA
    device is checked to exist; ``xpu``, an Intel GPU, is the openvino backend's to check).

    ``auto`` is CUDA when available, else the CPU with a warning (also appended to ``notes``)."""
    if isinstance(device, torch.device):
        spec = str(device)
    elif isinstance(device, str):
        spec = device.strip().lower()
    else:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'xpu' or 'xpu:N', got {device!r}")
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
    if re.fullmatch(r"xpu(:\d+)?", spec):  # an Intel GPU, for OpenVINO (which checks that there is one)
        return torch.device(spec)
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
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'xpu' or 'xpu:N', got {device!r}")


def inference_device(kind: str, device: str, notes: list[str] | None = None) -> torch.device:
    """The device that backend ``kind`` runs on for the ``device`` option: :func:`resolve_device`, except that
    ``auto`` is the CPU for the openvino backend (OpenVINO never runs on CUDA) and for an onnxruntime without a
    CUDA execution provider (the CPU wheel; a warning, also in ``notes``), and that ``xpu`` (an Intel GPU) is only
    for the openvino backend (ConfigError otherwise)."""
    auto = str(device).strip().lower() == "auto"
    if kind == "openvino" and auto:
        return torch.device("cpu")
    resolved = resolve_device(device, notes)
    if kind == "onnxruntime" and auto and resolved.type == "cuda":  # the CPU wheel on a GPU machine: its CPU
        from .backends.onnxruntime import cuda_provider_problem  # (cuda asked for explicitly: the backend refuses)

        problem = cuda_provider_problem()
        if problem:
            msg = f"device 'auto': {problem}; running on the CPU"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            if notes is not None:
                notes.append(msg)
            return torch.device("cpu")
    if resolved.type == "xpu" and kind != "openvino":
        raise ConfigError(f"device {str(device)!r} (an Intel GPU) is for the openvino backend (an .xml model, or "
                          f"backend openvino); this model runs on the {kind} backend")
    return resolved


class _FrameGroup:
    """Frames of one size and channel order that go through the device pipeline together."""

    __slots__ = ("indices", "arrays", "order", "size", "channels", "net_size")

    def __init__(self, size: tuple[int, int], channels: int, order: str, net_size: tuple[int, int]) -> None:
        self.indices: list[int] = []
        self.arrays: list[np.ndarray] = []
        self.order, self.size, self.channels, self.net_size = order, size, channels, net_size


def _file_metadata(kind: str, path: Path) -> dict[str, Any]:
    """The icnet_ros metadata an exported model file carries (validated; CheckpointError otherwise)."""
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    if kind == "onnxruntime":
        from .export import read_onnx_metadata

        return read_onnx_metadata(path)
    if kind == "tensorrt":  # .onnx (engine built and cached) or .engine/.plan with its metadata side file
        from .backends.tensorrt import read_engine_metadata

        return read_engine_metadata(path)
    if kind == "openvino":
        from .backends.openvino import read_openvino_metadata

        return read_openvino_metadata(path)
    raise CheckpointError(f"backend {kind!r} cannot read {path.name}")


def frame_size_problem(model_path: str | os.PathLike | None, height: int, width: int, input_size: Any = "auto"
                       ) -> str | None:
    """Why a frame of ``height`` x ``width`` cannot run on the model file ``model_path`` (None: the default model)
    with ``input_size`` (the node's default: auto), judged from the file's metadata as the Segmenter would (nothing
    loaded): the same rule as :meth:`Segmenter.segment`'s refusal. A model that cannot be read is the problem."""
    try:
        input_size = parse_input_size(input_size)  # the option's text, as the node and CLIs give it
    except ValueError as e:
        return f"input_size {input_size!r}: {e}"
    try:
        path = Path(model_path).expanduser() if model_path else default_model_path()
        kind = backend_for(str(path))
        if kind == "torch":
            meta, fixed = read_metadata(path), None
        else:
            meta = _file_metadata(kind, path)
            fixed = tuple(meta["network_size"])
    except CheckpointError as e:
        return str(e)
    return _size_problem(InputSizePolicy.from_option(input_size, meta, fixed_size=fixed), height, width)


def backend_for(model_or_path: Any, backend: str = "auto") -> str:
    """The backend that runs ``model_or_path``: ``backend`` unless "auto", else by the file's suffix. An explicit
    backend given a model file of a type it does not read (an ONNX export with backend torch) is one line naming
    the backend: the file's reader would call a valid file corrupt."""
    is_path = isinstance(model_or_path, (str, os.PathLike))
    suffix = Path(model_or_path).suffix.lower() if is_path else ""
    if backend != "auto":
        if suffix in SUFFIX_BACKENDS and suffix not in BACKEND_SUFFIXES.get(backend, (suffix,)):
            readers = sorted(b for b, suffixes in BACKEND_SUFFIXES.items() if suffix in suffixes)
            raise CheckpointError(f"{Path(model_or_path).name}: backend {backend!r} runs "
                                  f"{'/'.join(BACKEND_SUFFIXES[backend])} files; a {suffix} file runs on "
                                  f"{' or '.join(readers)} (backend auto chooses by the file type)")
        return backend
    if not is_path:
        return "torch"  # None (the default model), a module, or something the torch loader refuses clearly
    if suffix not in SUFFIX_BACKENDS:
        raise CheckpointError(f"{Path(model_or_path).name}: unknown model file type {suffix!r}; expected "
                              f"{', '.join(SUFFIX_BACKENDS)} (or set backend explicitly)")
    return SUFFIX_BACKENDS[suffix]


def _size_problem(policy: InputSizePolicy, height: int, width: int) -> str | None:
    """Why a frame of ``height`` x ``width`` cannot run under the input-size ``policy`` (None when it can): a network
    input below the minimum, or upscaled beyond :data:`MAX_UPSCALED_PIXELS`."""
    h, w = policy.policy_size(height, width)
    if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
        how = "" if policy.kind == "fixed" else " (a fixed input_size HxW upscales small frames)"
        return (f"{height}x{width} gives a {h}x{w} network input, below the minimum "
                f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}{how}")
    if policy.kind in ("width", "scale") and h * w > max(height * width, MAX_UPSCALED_PIXELS):
        return (f"{height}x{width} would be upscaled to a {h}x{w} network input, more than {MAX_UPSCALED_PIXELS} "
                f"pixels (an extreme aspect ratio?)")
    return None


class Segmenter:
    """Semantic segmentation of uint8 frames with an ICNet; see the module docstring and :meth:`segment`.

    ``Segmenter(model_or_path=None, config=None, **options)``: ``model_or_path`` is None (the package's default
    model), a model file (native ``.safetensors``; ``.onnx``, OpenVINO ``.xml`` from ``icnet-export``) or an ICNet
    module (its ``.meta``, or metadata built from ``.config``; copied, never modified). The options are
    :class:`~icnet_ros.engine_config.SegmenterConfig`'s fields, each documented there: ``backend``, ``device``,
    ``precision``, ``input_size``, ``size_divisor``, ``outputs``, ``output_size``, ``overlay_alpha``,
    ``confidence_threshold``, ``optimize``, ``channels_last``, ``compile``, ``cuda_graphs``, ``engine_cache``,
    ``warmup``; given as a ``config``, as keywords, or both (keywords win). A bad value raises
    :class:`~icnet_ros.engine_config.ConfigError` (a ValueError) naming the option; an unusable model raises
    :class:`~icnet_ros.checkpoint.CheckpointError`; a missing runtime :class:`~icnet_ros.backends.base.
    MissingRuntimeError` naming the pip extra.

    ``device="auto"`` falls back to the CPU with a warning (also in :attr:`notes`); fp16 on the CPU raises, except
    with ``device="auto"`` where it falls back to fp32. ``warmup`` runs the pipeline once (twice on CUDA) at
    construction: at the given frame sizes, else the fixed input size, else the checkpoint's, else 512x1024 on CUDA
    and 256x512 on the CPU.
    """

    def __init__(self, model_or_path: Any = None, config: SegmenterConfig | None = None, **options: Any) -> None:
        #: warnings raised while building (device / precision fallbacks), for callers that log elsewhere
        self.notes: list[str] = []
        if config is not None and not isinstance(config, SegmenterConfig):
            raise ConfigError(f"config must be a SegmenterConfig, got {type(config).__name__}")
        cfg = (config or SegmenterConfig()).replace(**options)
        kind = backend_for(model_or_path, cfg.backend)
        self.device = inference_device(kind, cfg.device, self.notes)
        precision = cfg.precision
        if self.device.type == "cpu" and precision == "fp16":
            if cfg.device != "auto":
                raise ConfigError("precision 'fp16' is not supported on the CPU (slow or missing kernels); use "
                                  "'bf16' or 'fp32', or run on CUDA")
            self._note("precision 'fp16' requested but running on the CPU: using fp32")
            precision = "fp32"
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        if cfg.cuda_graphs and self.device.type != "cuda":
            raise ConfigError("cuda_graphs needs a CUDA device")
        if cfg.cuda_graphs and cfg.compile:
            raise ConfigError("use either cuda_graphs or compile (compile mode 'reduce-overhead' uses CUDA graphs)")

        if kind == "torch":
            model, self.meta = inference_copy(model_or_path)
            self.backend: Backend = torch_backend_from(model, self.device, self.dtype, cfg, self.notes)
        else:
            if model_or_path is None or isinstance(model_or_path, nn.Module):
                raise ConfigError(f"backend {kind!r} runs an exported model file (icnet-export); got "
                                  f"{'the default model' if model_or_path is None else 'a module'}")
            path = Path(model_or_path).expanduser()  # as the checkpoint loader (a '~/' in model:= or --model)
            self.meta = _file_metadata(kind, path)
            module = importlib.import_module(BACKEND_MODULES[kind][0])
            try:
                self.backend = module.open_backend(path, BackendOptions(
                    device=self.device, precision=precision, threads=torch.get_num_threads(),
                    cache_dir=cfg.engine_cache or None))
            except (ConfigError, CheckpointError):
                raise
            except ValueError as e:  # the backend refuses an option (device, precision): a ConfigError, as promised
                raise ConfigError(str(e)) from None
            # what the file runs (an fp16 or INT8 export whatever was asked): describe(), /diagnostics, icnet-bench
            self.precision = getattr(self.backend, "precision", precision)
        self.class_set: ClassSet = class_set_from_meta(self.meta)
        self.num_classes = self.class_set.num_classes
        self.preprocess = Preprocessor(self.meta["normalization"], self.backend.device, self.backend.input_dtype,
                                       self.backend.memory_format)
        self.postprocess = Postprocessor(self.class_set, self.backend.device, cfg.overlay_alpha,
                                         cfg.confidence_threshold, compile_render=bool(cfg.compile))
        self._lock = threading.RLock()  # (warmup holds it across the segment calls it makes)
        self._closed = False
        self.config = cfg
        self._apply_policy(cfg)
        #: seconds the last ``segment`` call took (host wall time, device work included)
        self.last_latency_s: float | None = None
        if self.device.type == "cuda" and self.input_policy == "fixed":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest algorithms
        #: the warm-up runs, in order: (frame height, frame width, batch size)
        self.warmed_up: list[tuple[int, int, int]] = []
        if cfg.warmup is True:
            self.warmup()
        elif cfg.warmup:
            for size in cfg.warmup:  # the cameras' sizes: graphs captured now, not on the hot path
                self.warmup(size)

    def _note(self, text: str) -> None:
        warnings.warn(text, RuntimeWarning, stacklevel=3)
        self.notes.append(text)

    # ----------------------------------------------------------------------------------------------- options
    def _apply_policy(self, cfg: SegmenterConfig) -> None:
        """Derive the input-size policy and the live settings from ``cfg`` (at construction and on reconfigure)."""
        policy = InputSizePolicy.from_option(cfg.input_size, self.meta, cfg.size_divisor)
        fixed = self.backend.fixed_size
        if fixed is not None:
            if policy.kind == "fixed" and tuple(policy.param) != tuple(fixed):
                raise ConfigError(f"input_size {format_input_size(policy.param)}: this exported model runs only at "
                                  f"{fixed[0]}x{fixed[1]} (export it again at another size)")
            policy = InputSizePolicy.from_option(cfg.input_size, self.meta, fixed_size=fixed)
        self.size_policy = policy
        self.outputs = frozenset(cfg.outputs)
        self.output_size = cfg.output_size
        self.postprocess.overlay_alpha = cfg.overlay_alpha
        self.postprocess.confidence_threshold = cfg.confidence_threshold

    def reconfigure(self, **changes: Any) -> SegmenterConfig:
        """Change live options (:data:`~icnet_ros.engine_config.LIVE_OPTIONS`: input_size, outputs, output_size,
        overlay_alpha, confidence_threshold) between two ``segment`` calls; returns the new config.

        Raises ConfigError (nothing changed) for a bad value, or for an option that needs a new Segmenter (model,
        backend, device, precision, ...: build one with ``Segmenter(path, segmenter.config.replace(...))``)."""
        rebuild = sorted(set(changes) - LIVE_OPTIONS)
        if rebuild:
            raise ConfigError(f"option(s) {rebuild} cannot change on a running Segmenter (build a new one); live "
                              f"options: {', '.join(sorted(LIVE_OPTIONS))}")
        with self._lock:  # built from the config of the moment: two concurrent calls both take effect
            self._check_open()
            cfg = self.config.replace(**changes)
            old = self.config
            try:
                self._apply_policy(cfg)
                # the sizes warmed up are the cameras': an input_size they cannot run at is refused, as at start-up
                # (taken live, every frame of those cameras was then refused, and each later rebuild's warm-up)
                for h, w in cfg.warmup if isinstance(cfg.warmup, tuple) else ():
                    problem = _size_problem(self.size_policy, h, w)
                    if problem:
                        raise ConfigError(f"input_size {format_input_size(cfg.input_size)}: the warm-up size {h}x{w} "
                                          f"(warmup): {problem}; change warmup with it")
            except ConfigError:
                self._apply_policy(old)
                raise
            self.config = cfg
        return cfg

    # ----------------------------------------------------------------------------------------------- public API
    def segment(self, frames: Sequence[np.ndarray], channel_order: str | Sequence[str] = "RGB",
                outputs: Sequence[str] | str | None = None) -> list[SegmentResult]:
        """Segment a batch of frames (see the class docstring); returns one :class:`SegmentResult` per frame.

        ``frames``: a list of uint8 H x W x 3 (RGB or BGR), H x W or H x W x 1 (mono8) arrays (or an N x H x W x 3
        array); sizes may differ. ``channel_order``: one order for all frames or one per frame; colour and overlay
        come back in each frame's order. ``outputs``: overrides the default outputs for this call.
        An empty list returns an empty list. Thread-safe (calls are serialised).
        """
        frames = self._as_frame_list(frames)
        orders = self._orders(channel_order, len(frames))
        with self._lock:
            self._check_open()
            want = self.outputs if outputs is None else frozenset(check_option("outputs", outputs))
            groups = self._group(frames, orders)
            if not groups:
                return []
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
        multiples of ``size_divisor`` (:class:`~icnet_ros.sizes.InputSizePolicy`)."""
        return self.size_policy.network_size(height, width)

    @property
    def input_policy(self) -> str:
        """``native`` | ``fixed`` | ``scale`` | ``width`` (``auto`` with the model's trained width)."""
        return self.size_policy.kind

    @property
    def size_divisor(self) -> int:
        return self.size_policy.size_divisor

    def warmup(self, size: tuple[int, int] | None = None, iterations: int | None = None, batch: int = 1) -> None:
        """Run the full pipeline on ``batch`` synthetic frames of ``size`` (allocations, kernel selection, CUDA graph
        capture and torch.compile for that input shape). ``size``: (H, W) or ``"HxW"``, a frame size."""
        if size is not None:
            parsed = check_option("warmup", [size]) if isinstance(size, str) else None
            size = parsed[0] if parsed else size
            if not (isinstance(size, (tuple, list)) and len(size) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
                raise ValueError(f"warmup size must be (H, W) or 'HxW' with positive integers, got {size!r}")
        if size is None:
            if self.input_policy == "fixed":
                size = self.size_policy.param
            elif self.meta.get("input_size"):
                size = tuple(self.meta["input_size"])  # type: ignore[assignment]
            else:
                size = (512, 1024) if self.device.type == "cuda" else (256, 512)
            if self.input_policy == "scale":  # pick a frame size whose network size is valid
                s = float(self.size_policy.param)
                size = tuple(max(v, int(math.ceil(MIN_INPUT_SIZE / s)) + 1) for v in size)  # type: ignore[assignment]
                if _size_problem(self.size_policy, *size):  # upscaled too far (a 1024x2048 record at x3): a frame
                    # that the scale brings to about the recorded size instead (the build failed with a FrameError)
                    size = tuple(max(int(v / s), int(math.ceil(MIN_INPUT_SIZE / s)) + 1)  # type: ignore[assignment]
                                 for v in size)
        n = iterations if iterations is not None else (2 if self.device.type == "cuda" else 1)
        frame = np.random.default_rng(0).integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
        warming_up = getattr(self.backend, "warming_up", contextlib.nullcontext)  # keeps what it makes here
        # the engine held throughout: a segment() call of another thread (a node's worker, while a live max_batch
        # is warmed up) never runs inside the warm-up block, where its CUDA graphs would be kept for good
        with self._lock, warming_up():
            for _ in range(n):
                self.segment([frame] * batch, outputs=OUTPUTS)
        self.warmed_up.append((int(size[0]), int(size[1]), int(batch)))

    def describe(self) -> str:
        """One line for logs: model, classes, backend, device, precision, input policy."""
        arch = self.meta["arch"]
        size = self.size_policy.describe()
        if self.size_divisor > 1:
            size += f" (multiples of {self.size_divisor})"
        return (f"ICNet {arch['backbone']} width {arch['width']} | {self.num_classes} classes "
                f"({self.class_set.name}) | {self.precision} | input {size} | {self.backend.describe()}")

    def close(self) -> None:
        """Release the backend (its session, engine, graphs and device memory). Later calls of ``segment``,
        ``warmup`` or ``reconfigure`` raise RuntimeError; closing again does nothing."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self.backend.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Segmenter is closed (close() released its model); build a new one")

    # torch-backend details, for benchmarks and tests
    @property
    def model(self) -> nn.Module | None:
        return getattr(self.backend, "model", None)

    @property
    def folded_batchnorms(self) -> int:
        return getattr(self.backend, "folded_batchnorms", 0)

    @property
    def factorized_ppms(self) -> int:
        return getattr(self.backend, "factorized_ppms", 0)

    @property
    def channels_last(self) -> bool:
        return self.backend.memory_format == torch.channels_last

    @property
    def memory_format(self) -> torch.memory_format:
        return self.backend.memory_format

    @property
    def cuda_graphs(self) -> bool:
        return bool(getattr(self.backend, "cuda_graphs", False))

    @property
    def compile_mode(self) -> str | None:
        return getattr(self.backend, "compile_mode", None)

    @property
    def overlay_alpha(self) -> float:
        return self.config.overlay_alpha

    @property
    def confidence_threshold(self) -> float | None:
        return self.config.confidence_threshold or None

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
        if not isinstance(channel_order, (str, list, tuple)):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR' (or a list of those), got {channel_order!r}")
        orders = [channel_order] * n if isinstance(channel_order, str) else list(channel_order)
        if len(orders) != n:
            raise ValueError(f"channel_order has {len(orders)} entries for {n} frames")
        for o in orders:
            if o not in CHANNEL_ORDERS:
                raise ValueError(f"channel_order must be 'RGB' or 'BGR' (or a list of those), got {o!r}")
        return orders

    def _check_frame(self, i: int, f: Any) -> np.ndarray:
        if not isinstance(f, np.ndarray):
            raise FrameError(i, f"expected a numpy uint8 array, got {type(f).__name__}")
        if f.dtype != np.uint8:
            raise FrameError(i, f"dtype {f.dtype}, expected uint8 (8-bit RGB/BGR or mono8 images; scale "
                              "other types to 0..255 first)")
        if f.ndim == 3 and f.shape[2] == 1:
            f = f[:, :, 0]
        if not (f.ndim == 2 or (f.ndim == 3 and f.shape[2] == 3)):
            hint = "; drop the alpha channel first" if f.ndim == 3 and f.shape[2] == 4 else ""
            raise FrameError(i, f"shape {f.shape}, expected H x W x 3 (RGB/BGR), H x W or H x W x 1 "
                              f"(mono8){hint}")
        if f.shape[0] == 0 or f.shape[1] == 0:
            raise FrameError(i, f"empty frame (shape {f.shape})")
        problem = _size_problem(self.size_policy, f.shape[0], f.shape[1])
        if problem:
            raise FrameError(i, problem)
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
            with stage("preprocess"):
                uploads = [self.upload(g.arrays) for g in groups]
                inputs = [self.prepare(u, g.order, g.net_size) for u, g in zip(uploads, groups)]
            # one forward per network input size (all frames when the input size is fixed)
            by_size: dict[tuple[int, int], list[int]] = {}
            for gi, g in enumerate(groups):
                by_size.setdefault(g.net_size, []).append(gi)
            device_outputs: list[dict[str, Tensor] | None] = [None] * len(groups)
            for gis in by_size.values():
                batch = inputs[gis[0]] if len(gis) == 1 else torch.cat([inputs[gi] for gi in gis])
                for start, logits in self._forward_chunks(batch):
                    # consume the logits now: a backend may reuse its output buffer on the next call
                    self._finish_chunk(groups, uploads, inputs, gis, start, logits, want, device_outputs)
            with stage("host transfer"):
                host = self.to_host([self._merge(d) for d in device_outputs])  # type: ignore[arg-type]
        results: list[SegmentResult | None] = [None] * n_frames
        for g, outs in zip(groups, host):
            for j, i in enumerate(g.indices):
                results[i] = SegmentResult(label=outs["label"][j], color=_item(outs, "color", j),
                                           overlay=_item(outs, "overlay", j),
                                           confidence=_item(outs, "confidence", j), model_size=g.net_size,
                                           frame_size=g.size)
        return results  # type: ignore[return-value]

    def _forward_chunks(self, batch: Tensor) -> Iterator[tuple[int, Tensor]]:
        """Yield (first row, logits) for ``batch`` in chunks the backend takes (:func:`backends.base.in_chunks`)."""
        return in_chunks(self.backend, batch, self.forward)

    def _finish_chunk(self, groups: list[_FrameGroup], uploads: list[Tensor], inputs: list[Tensor],
                      gis: list[int], start: int, logits: Tensor, want: frozenset[str],
                      device_outputs: list[Any]) -> None:
        """Post-process rows ``start..start+len(logits)`` of a size batch into each group's outputs."""
        stop, row = start + logits.shape[0], 0
        for gi in gis:
            n = inputs[gi].shape[0]
            lo, hi = max(start, row), min(stop, row + n)
            if lo < hi:
                g = groups[gi]
                out_size = g.size if self.output_size == "input" else g.net_size
                with stage("upsample+argmax"):
                    label, conf = self.labels(logits[lo - start:hi - start], out_size, "confidence" in want)
                outs = {"label": label}
                if "color" in want or "overlay" in want:
                    with stage("color/overlay"):
                        outs.update(self.postprocess.render(label, uploads[gi][lo - row:hi - row], g.order,
                                                            out_size, want))
                if "confidence" in want:
                    outs["confidence"] = conf
                if device_outputs[gi] is None:
                    device_outputs[gi] = []
                device_outputs[gi].append(outs)
            row += n

    @staticmethod
    def _merge(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    # the three stages, also called one by one by icnet-bench --stages
    def upload(self, arrays: list[np.ndarray]) -> Tensor:
        """Same-size uint8 frames -> N x H x W x C uint8 tensor on the device."""
        return self.preprocess.upload(arrays)

    def prepare(self, frames: Tensor, order: str, net_size: tuple[int, int]) -> Tensor:
        """uint8 N x H x W x C on the device -> normalised network input (backend dtype and layout)."""
        return self.preprocess(frames, order, net_size)

    def forward(self, x: Tensor) -> Tensor:
        """The backend on a prepared batch: logits N x classes x ceil(H/8) x ceil(W/8) (twice that with the paper
        head)."""
        return self.backend(x)

    def labels(self, logits: Tensor, out_size: tuple[int, int], want_confidence: bool
               ) -> tuple[Tensor, Tensor | None]:
        return self.postprocess.labels(logits, out_size, want_confidence)

    def render(self, label: Tensor, frames: Tensor, order: str, out_size: tuple[int, int],
               want: frozenset[str]) -> dict[str, Tensor]:
        return self.postprocess.render(label, frames, order, out_size, want)

    def to_host(self, device_outputs: list[dict[str, Tensor]]) -> list[dict[str, np.ndarray]]:
        return self.postprocess.to_host(device_outputs)

    def synchronize(self) -> None:
        """Wait for queued device work (for timing)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _item(outs: dict[str, np.ndarray], key: str, j: int) -> np.ndarray | None:
    v = outs.get(key)
    return None if v is None else v[j]


__all__ = ["OUTPUTS", "PRECISIONS", "FrameError", "SegmentResult", "Segmenter", "TorchBackend", "UNKNOWN",
           "backend_for", "frame_size_problem", "inference_device", "resolve_device"]
