"""ONNX Runtime backend: runs an ``icnet-export`` ONNX file (see :mod:`icnet_ros.export`) behind the Segmenter.

Execution providers: the CPU provider on the CPU. On CUDA (``options.device``) the TensorRT provider when this
onnxruntime build has it (fp16 when ``options.precision == "fp16"``; one optimisation profile for batches 1..the
export's ``batch``), else the CUDA provider; asking for CUDA with a CPU-only onnxruntime is a one-line error (``pip
install onnxruntime-gpu``). ``provider`` names the provider the session actually uses.

TensorRT engine cache: ``<stem>.<the file's SHA-256, 16 hex digits>.ort<onnxruntime version>[.trt<tensorrt
version>]/`` under ``options.cache_dir``, default ``<model>.ort-trt/`` beside the model (:func:`trt_cache_folder`).
ORT's own engine names hash the file name and the tensor names, not the weights: new weights exported to the same
path get their own folder instead of the stale engine, and so do a new onnxruntime and a new TensorRT (the Python
``tensorrt`` package's version, where it is installed), which cannot load the old engines. ORT fails the session,
without rebuilding, on a cached engine it cannot deserialize (a torn write, a TensorRT the name does not tell
apart): the engine files in that folder are then removed and the session made once more
(:func:`remove_cached_engines`). Engines are native code, so folders are created 0700 and a cache folder that is
not the user's (or root's), or that group or others can write, or a file in it of another user, is refused (one
line), as the native TensorRT backend refuses such engines (:func:`icnet_ros.backends.tensorrt.
cache_folder_problem`).

Threads: ``intra_op_num_threads = options.threads or torch.get_num_threads()``, one inter-op thread, and spinning
disabled for both pools. ORT's worker threads otherwise busy-wait after each operator for work that, in this
process, only comes with the next frame; on a machine with as many cores as threads they then compete with
PyTorch's own threads, which run the Segmenter's pre- and post-processing between two ORT calls.

Data path: IO binding hands ORT the torch tensors' memory, the input (no copy when contiguous) and a preallocated
output, on the CPU as on CUDA (device pointers there: no host round trip). On CUDA, ORT runs on a torch CUDA stream of
its own (``user_compute_stream``; not the legacy default stream, on which TensorRT adds synchronisations), ordered
against the caller's stream with stream waits before and after each run.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import CheckpointError, file_sha256
from ..export import INPUT_NAME, MAX_EXPORT_BATCH, OUTPUT_NAME, export_record, profile_batch, read_onnx_metadata
from ..models.icnet import ICNetConfig
from .base import BackendOptions, checked_input, logits_buffer, require

_TYPES: dict[str, tuple[torch.dtype, type]] = {"tensor(float)": (torch.float32, np.float32),
                                               "tensor(float16)": (torch.float16, np.float16)}
PRECISIONS = ("fp32", "fp16")
#: what ORT's TensorRT provider says when a cached engine cannot be loaded (it fails the session, no rebuild)
STALE_ENGINE_ERROR = "could not deserialize engine from cache"
#: the files ORT's TensorRT provider caches per engine (the timing cache, .timing, stays: TensorRT checks it)
ENGINE_SUFFIXES = (".engine", ".profile")

log = logging.getLogger(__name__)


def cuda_provider_problem(ort: Any = None) -> str | None:
    """Why this onnxruntime (``ort``, default: the installed one) cannot run on CUDA (the CPU wheel: no CUDA or
    TensorRT execution provider), or None (also when onnxruntime is not installed: the backend names the extra).
    Asked before a session is made, by device auto, and by icnet-bench before it exports."""
    if ort is None:
        try:
            import onnxruntime as ort
        except ImportError:
            return None
    if {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(ort.get_available_providers()):
        return None
    return ("this onnxruntime has no CUDA execution provider (install onnxruntime-gpu instead of onnxruntime, with "
            "a matching CUDA)")


def session_options(ort: Any, threads: int) -> Any:
    """SessionOptions with ``threads`` intra-op threads, one inter-op thread and no spinning (module docstring)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def trt_cache_folder(path: Path, cache_dir: str | None = None) -> Path:
    """The TensorRT execution provider's engine cache folder for the ONNX file ``path`` (module docstring): named
    after the file's content, as the native TensorRT backend names its engines; beside the file, or in this user's
    cache where the file's folder cannot hold engines (as :func:`icnet_ros.backends.tensorrt.engine_path` decides)."""
    if cache_dir:
        base = Path(cache_dir).expanduser()
    else:
        from .tensorrt import can_hold_engines, user_cache_dir

        base = path.with_name(path.name + ".ort-trt") if can_hold_engines(path.parent) else user_cache_dir() / "ort-trt"
    import onnxruntime

    trt = _tensorrt_version()
    return base / f"{path.stem}.{file_sha256(path)[:16]}.ort{onnxruntime.__version__}{f'.trt{trt}' if trt else ''}"


def _tensorrt_version() -> str | None:
    """The installed Python ``tensorrt`` package's version, or None (not installed, or its libraries missing)."""
    try:
        import tensorrt
    except (ImportError, OSError):
        return None
    return str(getattr(tensorrt, "__version__", "")) or None


def remove_cached_engines(folder: Path) -> list[Path]:
    """Remove the engine files (:data:`ENGINE_SUFFIXES`) ORT's TensorRT provider cached in ``folder`` (one of
    :func:`trt_cache_folder`'s), so that the next session builds them anew; returns those removed."""
    removed = []
    for f in sorted(folder.iterdir()):
        if f.suffix in ENGINE_SUFFIXES and f.is_file() and not f.is_symlink():
            f.unlink()
            removed.append(f)
    return removed


class OnnxRuntimeBackend:
    """A :class:`~icnet_ros.backends.base.Backend` running an exported ONNX model in an ONNX Runtime session."""

    name = "onnxruntime"
    memory_format = torch.contiguous_format

    def __init__(self, path: str | Path, options: BackendOptions = BackendOptions()) -> None:
        ort = require("onnxruntime", "onnxruntime", "onnx")
        self.path = Path(path).expanduser()
        self.meta = read_onnx_metadata(self.path)  # a truncated / foreign file fails here, with one line
        if options.precision not in PRECISIONS:
            raise ValueError(f"backend 'onnxruntime' runs fp32 or fp16 ONNX files, not precision "
                             f"{options.precision!r}")
        self.device = torch.device(options.device)
        self.threads = int(options.threads) or torch.get_num_threads()
        self.file_precision = "fp16" if export_record(self.meta).get("fp16") is True else "fp32"
        self._stream = None
        self._trt_cache: Path | None = None  # set by _providers when the TensorRT provider caches engines
        providers = self._providers(ort, options)
        try:
            try:
                self.session = ort.InferenceSession(str(self.path), session_options(ort, self.threads),
                                                    providers=providers)
            except Exception as e:  # noqa: BLE001 - ORT raises its own exception types (Fail, InvalidGraph, ...)
                if self._trt_cache is None or STALE_ENGINE_ERROR not in str(e).lower():
                    raise
                removed = remove_cached_engines(self._trt_cache)  # our own folder (trt_cache_folder): rebuild once
                log.warning("ONNX Runtime cannot load its cached TensorRT engine for %s; removed %d engine file(s) "
                            "from %s and building it again", self.path, len(removed), self._trt_cache)
                self.session = ort.InferenceSession(str(self.path), session_options(ort, self.threads),
                                                    providers=providers)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path}: ONNX Runtime cannot load the model: {first}") from None
        self.provider = self.session.get_providers()[0]
        if self.device.type == "cuda" and self.provider == "CPUExecutionProvider":
            raise ValueError(f"device {self.device}: this onnxruntime has no working CUDA execution provider "
                             "(install onnxruntime-gpu instead of onnxruntime, with a matching CUDA)")
        self.precision = "fp16" if (options.precision == "fp16" and self.provider == "TensorrtExecutionProvider"
                                    ) else self.file_precision
        self._check_io()
        self._binding = self.session.io_binding()
        self._run_options = ort.RunOptions()
        if self._stream is not None:
            # ORT runs on self._stream, whose order torch keeps: no device synchronisation after each run
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def _providers(self, ort: Any, options: BackendOptions) -> list[Any]:
        if self.device.type == "cpu":
            return ["CPUExecutionProvider"]
        if self.device.type != "cuda":
            raise ValueError(f"backend 'onnxruntime' runs on the CPU or CUDA, not {self.device}")
        problem = cuda_provider_problem(ort)
        if problem:
            raise ValueError(f"device {self.device}: {problem}")
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        # a stream of its own (ordered with the caller's in __call__): on the legacy default stream TensorRT adds
        # cudaStreamSynchronize calls of its own ("Using default stream in enqueueV3() may lead to performance
        # issues")
        self._stream = torch.cuda.Stream(self.device)
        stream = str(self._stream.cuda_stream)
        available = ort.get_available_providers()
        providers: list[Any] = []
        if "TensorrtExecutionProvider" in available:
            h, w = self.meta["network_size"]
            batch = profile_batch(self.meta)
            cache = trt_cache_folder(self.path, options.cache_dir)
            cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            from .tensorrt import cache_folder_problem, folder_problem

            # the folder it is made in too: whoever can write that one can swap the checked folder for their own
            problem = folder_problem(cache.parent, "the cache folder")
            if not problem:
                cache.mkdir(mode=0o700, exist_ok=True)
                problem = cache_folder_problem(cache)
            if problem:
                raise CheckpointError(f"{self.path}: refusing ONNX Runtime's TensorRT engine cache: {problem}; "
                                      "engines are native code that runs when loaded: chmod go-w the folder and its "
                                      "files (and own them), or set engine_cache to a folder of your own")
            self._trt_cache = cache
            trt = {"device_id": index, "user_compute_stream": stream, "trt_engine_cache_enable": True,
                   "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
                   "trt_timing_cache_path": str(cache), "trt_fp16_enable": options.precision == "fp16"}
            if batch is not None:  # dynamic batch axis: one profile for 1..batch instead of rebuilds per shape
                trt.update(trt_profile_min_shapes=f"{INPUT_NAME}:1x3x{h}x{w}",
                           trt_profile_opt_shapes=f"{INPUT_NAME}:{batch}x3x{h}x{w}",
                           trt_profile_max_shapes=f"{INPUT_NAME}:{batch}x3x{h}x{w}")
            providers.append(("TensorrtExecutionProvider", trt))
        if "CUDAExecutionProvider" in available:
            providers.append(("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": stream}))
        return providers + ["CPUExecutionProvider"]

    def _check_io(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
            raise CheckpointError(f"{self.path}: expected one input {INPUT_NAME!r} and one output {OUTPUT_NAME!r}, "
                                  f"got inputs {[i.name for i in inputs]}, outputs {[o.name for o in outputs]}")
        inp, out = inputs[0], outputs[0]
        if inp.type not in _TYPES or out.type not in _TYPES or len(inp.shape) != 4 or inp.shape[1] != 3:
            raise CheckpointError(f"{self.path}: unsupported input {inp.type} {inp.shape} / output {out.type}")
        self.input_dtype, self._np_in = _TYPES[inp.type]
        self.output_dtype, self._np_out = _TYPES[out.type]
        n, _, h, w = inp.shape
        if isinstance(n, int) and not 1 <= n <= MAX_EXPORT_BATCH:  # every call is padded to a fixed batch
            raise CheckpointError(f"{self.path}: the graph's fixed batch is {n}, not 1 to {MAX_EXPORT_BATCH}")
        self.max_batch: int | None = n if isinstance(n, int) else None
        self.exact_batch = self.max_batch is not None  # a fixed batch axis (a TensorRT profile is a limit)
        if self.provider == "TensorrtExecutionProvider" and self.max_batch is None:
            self.max_batch = profile_batch(self.meta)
        network = tuple(self.meta["network_size"])  # validated: at most MAX_UPSCALED_PIXELS
        if any(isinstance(d, int) and d != v for d, v in zip((h, w), network)):
            raise CheckpointError(f"{self.path}: the graph's input is {h}x{w}, the metadata's network_size "
                                  f"{network[0]}x{network[1]}; a model file sets one network size")
        # the network size is the metadata's also where the graph leaves H or W symbolic (an edited file): its
        # pyramid pooling was exported for that size, and frames resized by ``auto`` to another failed in ORT,
        # every one, with a multi-line message (OpenVINO refuses such a file at load)
        self.fixed_size: tuple[int, int] | None = (int(network[0]), int(network[1]))
        self.num_classes = int(self.meta["arch"]["num_classes"])
        self.logits_size = ICNetConfig.from_dict(self.meta["arch"]).logits_size  # validated with the metadata
        # the logits must be what the metadata says (labels index its classes): the class axis where the graph fixes
        # it (ORT checks the rest against the bound output buffer when running)
        expected = (self.max_batch if self.exact_batch else None, self.num_classes, *self.logits_size(*network))
        if len(out.shape) != 4:
            raise CheckpointError(f"{self.path}: the graph's output is {out.shape}, not N x classes x H x W logits")
        for name, got, want in zip(("batch", "class", "height", "width"), out.shape, expected):
            if isinstance(got, int) and want is not None and got != want:
                raise CheckpointError(f"{self.path}: the graph's output {name} dimension is {got}, the metadata "
                                      f"needs {want} ({self.num_classes} classes at {network[0]}x{network[1]})")

    def __call__(self, x: Tensor) -> Tensor:
        x = checked_input(self, x, self.path.name)
        out = logits_buffer(x, self.num_classes, self.output_dtype, self.logits_size)
        # IO binding on both devices: ORT reads the input tensor's memory and writes the preallocated output
        b, kind, idx = self._binding, self.device.type, self.device.index or 0
        b.bind_input(INPUT_NAME, kind, idx, self._np_in, list(x.shape), x.data_ptr())
        b.bind_output(OUTPUT_NAME, kind, idx, self._np_out, list(out.shape), out.data_ptr())
        try:
            if self._stream is None:
                self.session.run_with_iobinding(b, self._run_options)
            else:
                current = torch.cuda.current_stream(self.device)
                other = current != self._stream
                if other:
                    self._stream.wait_stream(current)  # the input is written on the caller's stream
                self.session.run_with_iobinding(b, self._run_options)
                if other:
                    current.wait_stream(self._stream)
        finally:
            b.clear_binding_inputs()
            b.clear_binding_outputs()
        return out

    def describe(self) -> str:
        size = "x".join(map(str, self.fixed_size)) if self.fixed_size else "any size"
        batch = "dynamic batch" if self.max_batch is None else f"batch <= {self.max_batch}"
        threads = f", {self.threads} threads" if self.device.type == "cpu" else ""
        return (f"onnxruntime {require('onnxruntime', 'onnxruntime', 'onnx').__version__} {self.provider} "
                f"({self.device}{threads}) | {self.path.name} {self.precision} | input {size}, {batch}")

    def close(self) -> None:
        self.__dict__.pop("_binding", None)
        self.__dict__.pop("session", None)


def open_backend(path: str | Path, options: BackendOptions = BackendOptions()) -> OnnxRuntimeBackend:
    """An ONNX Runtime session for an exported ONNX file (see the module docstring)."""
    return OnnxRuntimeBackend(path, options)


__all__ = ["OnnxRuntimeBackend", "open_backend", "remove_cached_engines", "session_options",
           "trt_cache_folder"]
