"""The backend contract: a backend only maps a normalised input batch to logits.

The Segmenter owns everything around it (:mod:`icnet_ros.engine`): upload, resize to the network size,
normalisation and channel order before; upsampling, argmax, confidence, palette, overlay and the copy back after.
A backend is created from a model file by its module's ``open_backend(path, options)`` (or, for the torch backend,
from a module) and is called from one thread at a time.

Contract of ``backend(x)``:

- ``x``: ``N x 3 x H x W`` tensor on ``backend.device`` with dtype ``backend.input_dtype``, normalised exactly
  as the model's metadata says (the Segmenter does it), contiguous in ``backend.memory_format``.
  ``N <= backend.max_batch`` when that is set (``N == max_batch`` when ``backend.exact_batch``: the Segmenter
  pads a short batch); ``(H, W) == backend.fixed_size`` when that is set.
- returns: ``N x classes x ceil(H/8) x ceil(W/8)`` logits (twice that with the paper head), a float tensor (any
  float dtype) on ``backend.device``.
  The caller consumes it before the next call (a backend may return a view of a reused buffer).

Optional: ``backend.warming_up()``, a context manager the Segmenter's warm-up runs inside; what a backend makes
per input shape there (the torch backend's CUDA graphs) it keeps for its life instead of in a bounded cache.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..engine_config import MissingRuntimeError  # (defined there, torch-free, for the CLIs; raised from here)

#: backend name -> (module that implements it, pip extra that installs its runtime)
BACKENDS: dict[str, tuple[str, str | None]] = {
    "torch": ("icnet_ros.backends.torch_backend", None),
    "onnxruntime": ("icnet_ros.backends.onnxruntime", "onnx"),
    "openvino": ("icnet_ros.backends.openvino", "openvino"),
    "tensorrt": ("icnet_ros.backends.tensorrt", "tensorrt"),
}


def require(backend: str, module: str, extra: str) -> Any:
    """Import a runtime module or raise :class:`MissingRuntimeError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingRuntimeError(backend, module, extra) from None


@dataclass(frozen=True)
class BackendOptions:
    """What a backend needs to know beyond the model file (a subset of the Segmenter's configuration)."""

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"  # fp32 | fp16 | bf16 (torch only) | int8 (an INT8 model file)
    threads: int = 0  # runtime intra-op threads on the CPU; 0 = the process's torch.get_num_threads()
    cache_dir: str | None = None  # TensorRT engine cache (ORT TensorRT EP / native TensorRT); None = next to the model


@runtime_checkable
class Backend(Protocol):
    """See the module docstring for the call contract."""

    name: str  # "torch" | "onnxruntime" | "openvino" | "tensorrt"
    provider: str  # what actually runs it, e.g. "CPUExecutionProvider", "CPU", "cuda:0 (TensorRT 10.x)"
    device: torch.device  # where inputs must live and logits come back
    input_dtype: torch.dtype
    memory_format: torch.memory_format
    fixed_size: tuple[int, int] | None  # exported models have a fixed network input (H, W); None = any size
    max_batch: int | None  # None = any batch size
    exact_batch: bool  # True: every call takes exactly max_batch rows (an export with a fixed batch)

    def __call__(self, x: Tensor) -> Tensor: ...

    def describe(self) -> str: ...  # one line for logs and /diagnostics

    def close(self) -> None: ...  # release the session / engine / device memory


def checked_input(backend: Any, x: Tensor, name: str) -> Tensor:
    """``x`` checked against the call contract of an exported ``backend`` (``name``: the model file, for the
    message): N x 3 x H x W at its fixed size, within its batch limit, in its dtype on its device; contiguous."""
    fixed = backend.fixed_size
    if x.dim() != 4 or x.shape[1] != 3 or (fixed is not None and tuple(x.shape[2:]) != tuple(fixed)):
        size = f"{fixed[0]}x{fixed[1]}" if fixed is not None else "any size"
        raise ValueError(f"{name} was exported for {size} inputs (N x 3 x H x W), got shape {tuple(x.shape)}")
    if backend.max_batch is not None and x.shape[0] > backend.max_batch:
        raise ValueError(f"batch of {x.shape[0]} exceeds {name}'s maximum batch {backend.max_batch}")
    if backend.exact_batch and x.shape[0] != backend.max_batch:
        raise ValueError(f"{name} was exported with a fixed batch of {backend.max_batch}, got {x.shape[0]} frames")
    if x.dtype != backend.input_dtype or x.device != backend.device:
        raise ValueError(f"expected a {backend.input_dtype} tensor on {backend.device}, got {x.dtype} on {x.device}")
    return x.contiguous()


def in_chunks(backend: Any, batch: Tensor, run: Callable[[Tensor], Tensor] | None = None
              ) -> Iterator[tuple[int, Tensor]]:
    """Run ``backend`` (or ``run``, a call of it) on ``batch`` in chunks of at most its batch limit: yields (first
    row, logits). An export with a fixed batch gets a short chunk padded with copies of its last frame (their
    logits are not yielded). A chunk's logits may be the backend's output buffer: consume them before taking the
    next chunk. A torch module (no limit) runs the batch whole."""
    run = backend if run is None else run
    step = getattr(backend, "max_batch", None) or batch.shape[0]
    for start in range(0, batch.shape[0], step):
        chunk = batch[start:start + step]
        rows = chunk.shape[0]
        if getattr(backend, "exact_batch", False) and rows < step:
            pad = chunk[-1:].expand(step - rows, *chunk.shape[1:])
            chunk = torch.cat([chunk, pad]).contiguous(memory_format=backend.memory_format)
            yield start, run(chunk)[:rows]
        else:
            yield start, run(chunk)


def logits_buffer(x: Tensor, num_classes: int, dtype: torch.dtype,
                  logits_size: Callable[[int, int], tuple[int, int]]) -> Tensor:
    """The output tensor a runtime writes for input ``x``: N x classes x ``logits_size(H, W)`` on x's device (the
    model's :meth:`~icnet_ros.models.icnet.ICNetConfig.logits_size`: ceil(H/8) x ceil(W/8), twice that with the
    paper head)."""
    n, _, h, w = x.shape
    return torch.empty((n, num_classes, *logits_size(h, w)), dtype=dtype, device=x.device)


__all__ = ["BACKENDS", "Backend", "BackendOptions", "MissingRuntimeError", "checked_input", "in_chunks",
           "logits_buffer", "require"]
