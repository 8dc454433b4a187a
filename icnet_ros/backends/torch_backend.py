"""The PyTorch backend: an ICNet module, optimised for inference, behind the backend contract (base.py).

Optimisations (each switchable, measured in BENCHMARKS.md, implemented in :mod:`icnet_ros.optimize`): batch norms
folded into the convolutions, the concat pyramid pooling factorized, NHWC (channels_last) weights and activations,
optionally ``torch.compile``, and on CUDA optionally CUDA graphs.

CUDA graphs: one graph per input shape, captured on the model's device and on a side stream as capture requires,
all in one memory pool. A graph replays raw device pointers, so every tensor it reads must outlive it: the runner
keeps references to the resize matrices the factorized pyramid pooling cached while it was captured (the pooling's
own cache may evict them later; the graph still reads them). Sizes known in advance are captured at warm-up (the
Segmenter's ``warmup`` option with the cameras' frame sizes, inside :meth:`TorchBackend.warming_up`), not on the
hot path, and those graphs are kept for the backend's life (at most :data:`MAX_PINNED_GRAPHS`); shapes first seen
on the hot path share :data:`MAX_CUDA_GRAPHS` more places, least recently used evicted (:class:`ShapeCache`), so
a stream of odd sizes can never evict the cameras' graphs and memory stays bounded.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from ..optimize import (CUDAGraphRunner, FactorizedPyramidPooling, compile_model, factorize_pyramid_pooling,
                        fold_batchnorm)

MAX_CUDA_GRAPHS = 8  # graphs for shapes first seen on the hot path (least recently used evicted)
MAX_PINNED_GRAPHS = 32  # graphs captured at warm-up, kept for the backend's life

V = TypeVar("V")


class ShapeCache(Generic[V]):
    """Values by key, bounded: those made while :attr:`pinning` is set are kept for the cache's life (at most
    ``max_pinned``; beyond that they are treated like the others), the others least recently used, at most
    ``max_recent`` (the oldest evicted). :attr:`evictions` counts the evicted, :attr:`unpinned` the lookups made
    while pinning that found no pinned place left."""

    def __init__(self, max_recent: int, max_pinned: int) -> None:
        if max_recent < 1 or max_pinned < 0:
            raise ValueError("ShapeCache needs max_recent >= 1 and max_pinned >= 0")
        self.max_recent, self.max_pinned = max_recent, max_pinned
        self.pinned: dict[Hashable, V] = {}
        self.recent: OrderedDict[Hashable, V] = OrderedDict()
        self.pinning = False
        self.evictions = 0
        self.unpinned = 0

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value for ``key``, made by ``make()`` the first time (and after an eviction)."""
        if key in self.pinned:
            return self.pinned[key]
        value = self.recent.pop(key) if key in self.recent else make()
        if self.pinning:  # a warm-up shape (also one seen before)
            if len(self.pinned) < self.max_pinned:
                self.pinned[key] = value
                return value
            self.unpinned += 1
        self.recent[key] = value  # (re)inserted as the most recently used
        while len(self.recent) > self.max_recent:
            self.recent.popitem(last=False)
            self.evictions += 1
        return value

    def __len__(self) -> int:
        return len(self.pinned) + len(self.recent)

    def clear(self) -> None:
        self.pinned.clear()
        self.recent.clear()


class TorchBackend:
    """An ICNet module in eval mode on ``device`` in ``dtype`` (see the module docstring).

    ``model`` must be a private copy: it is modified in place (folding, factorization, layout)."""

    name = "torch"
    fixed_size = None
    max_batch = None
    exact_batch = False

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
        self._eager_shapes: OrderedDict[tuple, None] = OrderedDict()  # shapes run eagerly before compiling
        if cuda_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs: ShapeCache[CUDAGraphRunner] = ShapeCache(MAX_CUDA_GRAPHS, MAX_PINNED_GRAPHS)
        self._warned_evictions = False
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.provider = f"{device} eager" + (f" compile({self.compile_mode})" if self.compile_mode else "") + (
            " cuda-graphs" if self.cuda_graphs else "")

    def _note(self, text: str) -> None:
        warnings.warn(text, RuntimeWarning, stacklevel=3)
        self.notes.append(text)

    def __call__(self, x: Tensor) -> Tensor:
        if self._compiled is not None:
            if self.factorized_ppms:
                self._fill_pooling_cache(x)
            return self._compiled(x)
        if self.cuda_graphs:
            return self._graph_for(x)(x)  # static output: consumed (upsampled) before the next replay
        return self.model(x)

    def _fill_pooling_cache(self, x: Tensor) -> None:
        """Before a shape's first compiled call, one eager forward caches the pyramid pooling's resize matrix for
        it: traced with the matrix cached, the compiled graph reads it as a constant; traced without, the graph
        builds it on every call (the cache is not filled while tracing: see
        :meth:`FactorizedPyramidPooling.resize_shift_matrix`)."""
        key = (tuple(x.shape), x.dtype, x.device)
        if key in self._eager_shapes:
            self._eager_shapes.move_to_end(key)
            return
        self.model(x)
        self._eager_shapes[key] = None
        while len(self._eager_shapes) > FactorizedPyramidPooling.MAX_CACHED:  # as many as the pooling caches
            self._eager_shapes.popitem(last=False)

    @contextmanager
    def warming_up(self) -> Iterator[None]:
        """Shapes first run inside this block (the Segmenter's warm-up) keep their CUDA graphs for the backend's
        life (at most :data:`MAX_PINNED_GRAPHS`)."""
        unpinned = self._graphs.unpinned
        self._graphs.pinning = True
        try:
            yield
        finally:
            self._graphs.pinning = False
        if self._graphs.unpinned > unpinned:
            self._note(f"CUDA graphs: warm-up made more than {MAX_PINNED_GRAPHS} input shapes (frame sizes x "
                       f"batches); the rest are kept like hot-path shapes ({MAX_CUDA_GRAPHS}, least recently used "
                       f"evicted)")

    def _graph_for(self, x: Tensor) -> CUDAGraphRunner:
        runner = self._graphs.get((tuple(x.shape), x.stride(), x.dtype), lambda: self._capture(x))
        if self._graphs.evictions and not self._warned_evictions and not self._graphs.pinning:
            self._warned_evictions = True
            warnings.warn(f"CUDA graphs: more than {MAX_CUDA_GRAPHS} input shapes seen after warm-up; the least "
                          f"recently used are evicted and captured again when they return (slow frames): list the "
                          f"cameras' frame sizes in 'warmup'", RuntimeWarning, stacklevel=2)
        return runner

    def _capture(self, x: Tensor) -> CUDAGraphRunner:
        runner = CUDAGraphRunner(self.model, [x], pool=self._pool)
        # the tensors the pooling cached while capturing are baked into the graph: keep them alive with it
        runner.keep_alive = [m for mod in self.model.modules() if isinstance(mod, FactorizedPyramidPooling)
                             for m in mod.cached_tensors()]
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


__all__ = ["MAX_CUDA_GRAPHS", "MAX_PINNED_GRAPHS", "ShapeCache", "TorchBackend", "torch_backend_from"]
