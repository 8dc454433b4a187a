"""The PyTorch backend: an ICNet module, optimised for inference, behind the backend contract (base.py).

Optimisations (each switchable, measured in BENCHMARKS.md, implemented in :mod:`icnet_ros.optimize`): batch norms
folded into the convolutions, the concat pyramid pooling factorized, NHWC (channels_last) weights and activations,
optionally ``torch.compile``, and on CUDA optionally CUDA graphs.

CUDA graphs: one graph per input shape (at most :data:`MAX_CUDA_GRAPHS`, least recently used evicted), captured on
the model's device and on a side stream as capture requires, all in one memory pool. A graph replays raw device
pointers, so every tensor it reads must outlive it: the runner keeps references to the resize matrices the
factorized pyramid pooling cached while it was captured (the pooling's own cache may evict them later; the graph
still reads them). Sizes known in advance are captured at warm-up (the Segmenter's ``warmup`` option with the
cameras' frame sizes), not on the hot path.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from ..optimize import (CUDAGraphRunner, FactorizedPyramidPooling, compile_model, factorize_pyramid_pooling,
                        fold_batchnorm)

MAX_CUDA_GRAPHS = 8


class TorchBackend:
    """An ICNet module in eval mode on ``device`` in ``dtype`` (see the module docstring).

    ``model`` must be a private copy: it is modified in place (folding, factorization, layout)."""

    name = "torch"
    fixed_size = None
    max_batch = None

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, optimize: bool = True,
                 channels_last: bool | None = None, compile: str = "", cuda_graphs: bool = False,  # noqa: A002
                 notes: list[str] | None = None) -> None:
        self.device, self.input_dtype = device, dtype
        self.notes = notes if notes is not None else []
        self.folded_batchnorms = 0
        self.factorized_ppms = 0
        if optimize:
            probe = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
            probe = probe.to(next(model.parameters()).device)
            try:
                self.folded_batchnorms = fold_batchnorm(model, probe)
            except RuntimeError as e:  # the model was restored unfolded: run it as it is
                self._note(str(e))
            try:
                self.factorized_ppms = factorize_pyramid_pooling(model, probe)
            except RuntimeError as e:  # restored as it was
                self._note(str(e))
        self.channels_last = bool(optimize if channels_last is None else channels_last)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        model = model.to(device=device, dtype=dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.compile_mode = compile or None
        self._compiled = compile_model(model, None if compile == "default" else compile) if compile else None
        if cuda_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs: OrderedDict[tuple, CUDAGraphRunner] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.provider = f"{device} eager" + (f" compile({self.compile_mode})" if self.compile_mode else "") + (
            " cuda-graphs" if self.cuda_graphs else "")

    def _note(self, text: str) -> None:
        warnings.warn(text, RuntimeWarning, stacklevel=3)
        self.notes.append(text)

    def __call__(self, x: Tensor) -> Tensor:
        if self._compiled is not None:
            return self._compiled(x)
        if self.cuda_graphs:
            return self._graph_for(x)(x)  # static output: consumed (upsampled) before the next replay
        return self.model(x)

    def _graph_for(self, x: Tensor) -> CUDAGraphRunner:
        key = (tuple(x.shape), x.stride(), x.dtype)
        runner = self._graphs.get(key)
        if runner is not None:
            self._graphs.move_to_end(key)
            return runner
        runner = CUDAGraphRunner(self.model, [x], pool=self._pool)
        # the tensors the pooling cached while capturing are baked into the graph: keep them alive with it
        runner.keep_alive = [m for mod in self.model.modules() if isinstance(mod, FactorizedPyramidPooling)
                             for m in mod.cached_tensors()]
        self._graphs[key] = runner
        while len(self._graphs) > MAX_CUDA_GRAPHS:
            self._graphs.popitem(last=False)
        return runner

    @property
    def graphs(self) -> int:
        return len(self._graphs)

    def describe(self) -> str:
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
        return f"torch {torch.__version__} on {self.device} | optimizations: {', '.join(opts) or 'none'}"

    def close(self) -> None:
        self._graphs.clear()
        self._compiled = None
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def torch_backend_from(model: Any, device: torch.device, dtype: torch.dtype, config: Any,
                       notes: list[str]) -> TorchBackend:
    """The torch backend for a Segmenter's private model copy and its :class:`SegmenterConfig`."""
    return TorchBackend(model, device, dtype, optimize=config.optimize, channels_last=config.channels_last,
                        compile=config.compile, cuda_graphs=config.cuda_graphs, notes=notes)


__all__ = ["MAX_CUDA_GRAPHS", "TorchBackend", "torch_backend_from"]
