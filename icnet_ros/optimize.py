"""Inference-time model optimisations, each independently switchable and measurable (``icnet-bench --ablation``).

- :func:`fold_batchnorm`: folds every eval-mode BatchNorm2d into the convolution that feeds it (conv weights are
  scaled per output channel, the BN shift becomes the conv bias) and replaces the BN by ``nn.Identity``. Conv -> BN
  pairs are found by running the model once on a probe input with hooks (no reliance on module names), so the
  function works for any backbone. Folding happens in float64 and is exact up to rounding: on CPU fp32 the logits
  of a folded ICNet match the plain model to ``max|diff| / max|logit| <= 1e-4`` (:data:`FOLD_RTOL`, tested).
  A folded model is for inference only (no BN left to train; do not save it as a checkpoint).
- :func:`factorize_pyramid_pooling`: replaces each concat pyramid pooling (mmseg's PPM: pooled branches resized
  back, concatenated with the feature, fused by a 3x3 conv) by :class:`FactorizedPyramidPooling`, which computes the
  same function with about half the multiply-adds (see its docstring). Exact up to float rounding.
- :func:`to_channels_last`: NHWC weights/activations (tensor cores on CUDA; oneDNN's native layout with bf16 on CPU).
- :func:`compile_model`: ``torch.compile`` for fixed shapes (needs a C++ compiler on CPU, Triton on CUDA).
- :class:`CUDAGraphRunner`: captures a function of fixed-shape tensors once and replays it (removes the per-kernel
  launch overhead that dominates small models on fast GPUs).
- :func:`compare_logits`: the agreement measures used to accept an optimisation (max abs diff, relative diff,
  argmax agreement).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

#: accepted relative logit error of BN folding on CPU fp32 (max |folded - plain| / max |plain|)
FOLD_RTOL = 1e-4
#: accepted argmax agreement of any optimisation against the plain fp32 model
MIN_ARGMAX_AGREEMENT = 0.999


def fuse_conv_bn_(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` (eval statistics) into ``conv`` in place: ``bn(conv(x)) == conv'(x)``. Computed in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    if conv.out_channels != bn.num_features:
        raise ValueError(f"conv has {conv.out_channels} output channels but the BN {bn.num_features} features")
    with torch.no_grad():
        w = conv.weight.detach().double()
        mean, var = bn.running_mean.double(), bn.running_var.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
        new_w = w * scale.view(-1, *([1] * (w.dim() - 1)))
        new_b = (bias - mean) * scale + beta
        dtype, device = conv.weight.dtype, conv.weight.device
        conv.weight.copy_(new_w.to(dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(new_b.to(device=device, dtype=dtype), requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(new_b.to(dtype))


def find_conv_bn_pairs(model: nn.Module, example_input: Tensor | Sequence[Tensor]) -> list[tuple[str, str]]:
    """Names of (conv, bn) pairs where the BN's input is exactly the conv's output, found by one probe forward.

    A pair is kept only when both modules run exactly once, the conv is not transposed, and the BN (eval mode,
    with running statistics) is the only pairing of either module."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[nn.Module, Tensor]] = {}
    calls: dict[nn.Module, int] = {}
    candidates: list[tuple[nn.Module, nn.Module]] = []

    def conv_hook(mod: nn.Module, _inp: tuple, out: Tensor) -> None:
        calls[mod] = calls.get(mod, 0) + 1
        if isinstance(out, Tensor):
            produced[id(out)] = (mod, out)  # keep the tensor alive so its id cannot be reused

    def bn_pre_hook(mod: nn.Module, inp: tuple) -> None:
        calls[mod] = calls.get(mod, 0) + 1
        x = inp[0] if inp else None
        entry = produced.get(id(x))
        if entry is not None and entry[1] is x:
            candidates.append((entry[0], mod))

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(bn_pre_hook))
    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        produced.clear()
    convs = [c for c, _ in candidates]
    bns = [b for _, b in candidates]
    pairs = []
    for conv, bn in candidates:
        if calls.get(conv) != 1 or calls.get(bn) != 1 or convs.count(conv) != 1 or bns.count(bn) != 1:
            continue
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        pairs.append((names[conv], names[bn]))
    return pairs


def fold_batchnorm(model: nn.Module, example_input: Tensor | Sequence[Tensor], verify: bool = True) -> int:
    """Fold every foldable BN of ``model`` into its conv, in place; returns the number folded.

    ``example_input`` drives the probe forward (any valid input; for ICNet e.g. ``torch.randn(1, 3, 128, 128)``).
    Running statistics are used (eval semantics): copy the model first if the original must stay trainable.
    ``verify`` compares the model's output on ``example_input`` before and after folding (float32 models; every
    float tensor of a tuple or dict output; ``ValueError`` if it holds none); beyond :data:`FOLD_RTOL` or below
    :data:`MIN_ARGMAX_AGREEMENT` (a conv output that also feeds something other than its BN) it restores the
    model unfolded and raises ``RuntimeError``.
    """
    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    before = _probe(model, inputs) if verify else []
    if verify and not before:
        raise ValueError("fold_batchnorm(verify=True) compares the model's float output tensors, and this model's "
                         "output holds none (of 2+ dimensions); pass verify=False to fold unchecked")
    pairs = find_conv_bn_pairs(model, inputs)
    modules = dict(model.named_modules())
    undo: list[tuple[nn.Conv2d, Tensor, Tensor | None, nn.Module, str, nn.Module]] = []
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        parent_name, _, attr = bn_name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        undo.append((conv, conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone(),
                     parent, attr, bn))
        fuse_conv_bn_(conv, bn)
        setattr(parent, attr, nn.Identity())
    if before and before[0].dtype == torch.float32:
        agreement = _agreement(before, _probe(model, inputs))
        if not agreement.ok():
            with torch.no_grad():  # put the model back as it was
                for conv, w, b, parent, attr, bn in undo:
                    conv.weight.copy_(w)
                    if b is None:
                        conv.bias = None
                    else:
                        conv.bias.copy_(b)
                    setattr(parent, attr, bn)
            raise RuntimeError(f"BN folding changed the model's output beyond tolerance ({agreement}); the model "
                               "was restored unfolded (a conv output probably also feeds something besides its BN)")
    return len(pairs)


def _probe(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    """The model's eval-mode float output tensors of 2+ dimensions, copied: a tensor, or those inside the tuples,
    named tuples, lists and dicts it returns (an encoder's feature maps, a training model's cascade logits)."""
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            out = model(*inputs)
    finally:
        model.train(was_training)
    leaves, _ = tree_flatten(out)
    return [t.clone() for t in leaves if isinstance(t, Tensor) and t.is_floating_point() and t.dim() >= 2]


def _agreement(before: list[Tensor], after: list[Tensor]) -> Agreement:
    """The worst agreement over the probe's output tensors (a changed output structure never agrees)."""
    if len(before) != len(after) or any(b.shape != a.shape for b, a in zip(before, after)):
        return Agreement(max_abs_diff=float("inf"), max_abs_reference=0.0, argmax_agreement=0.0)
    return min((compare_logits(b, a) for b, a in zip(before, after)),
               key=lambda g: (g.ok(), -g.relative_diff, g.argmax_agreement))


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class FactorizedPyramidPooling(nn.Module):
    """A concat :class:`~icnet_ros.models.icnet.PyramidPooling` rewritten for inference: same outputs, about half
    the multiply-adds.

    The concat PPM computes ``bottleneck(cat[up(b_1(x)), .., up(b_4(x)), x])`` where ``b_i`` pools x to s x s
    (s = 1, 2, 3, 6) and projects it (1x1 conv-BN-ReLU), ``up`` is bilinear resizing back to H x W and
    ``bottleneck`` a 3x3 conv-BN-ReLU over 4 x C_b + C_x channels. A convolution is linear in its input
    channels, so it splits into a 3x3 conv over x plus one 3x3 conv per pooled branch. For a pooled branch,
    each of the 9 taps is a 1x1 channel mix followed by a spatial shift, and a channel mix commutes with the
    (per-channel) bilinear resize. So the branch's contribution is
    ``sum_k shift_k(up(W_k @ p))``. Here the mix ``W_k @ p`` runs on the s x s map (at most 36 pixels instead of
    H x W). The resize and the shift are one fixed linear map from s x s to H x W pixels. All branches, all taps
    and those maps together are one matrix product: (C_out x 9*50) by (9*50 x H*W). That matrix is built by
    running ``F.interpolate`` on one-hot images, so it is exactly the resize the plain module applies.

    For ICNet-R50 at 512x1024 (a 16 x 32 x 2048 low-branch map) the bottleneck goes from 9.7 to 4.9 GMAC.
    Results match the plain module up to float rounding (a different summation order; relative difference ~1e-6
    in fp32). Inference only: use it on an eval-mode copy (the BN, if not folded, uses its running statistics).
    """

    MAX_CACHED = 16  # resize matrices kept, one per (H, W, dtype, device)

    def __init__(self, ppm: nn.Module) -> None:
        super().__init__()
        if getattr(ppm, "style", None) != "concat":
            raise ValueError("only a concat-style PyramidPooling can be factorized")
        conv: nn.Conv2d = ppm.psp_bottleneck.conv
        if (conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1)
                or conv.dilation != (1, 1) or conv.groups != 1):
            raise ValueError("expected a 3x3, padding 1, stride 1 bottleneck conv")
        self.scales = tuple(int(s) for s in ppm.scales)
        self.psp_modules = ppm.psp_modules
        self.branch_channels = [int(m[1].conv.out_channels) for m in ppm.psp_modules]
        cout, cin = conv.out_channels, conv.in_channels
        nb = sum(self.branch_channels)
        self.out_channels = cout
        # the feature's own part: an ordinary 3x3 conv over the last cin - nb input channels (concat order:
        # the branches first, x last)
        self.conv_x = nn.Conv2d(cin - nb, cout, 3, padding=1, bias=conv.bias is not None).to(conv.weight)
        with torch.no_grad():
            self.conv_x.weight.copy_(conv.weight[:, nb:])
            if conv.bias is not None:
                self.conv_x.bias.copy_(conv.bias)
        # per branch: the 9 taps as one (9 * cout) x C_b matrix, row = tap * cout + out_channel
        taps = conv.weight.detach()[:, :nb].permute(2, 3, 0, 1).reshape(9 * cout, nb)
        start = 0
        for i, cb in enumerate(self.branch_channels):
            self.register_buffer(f"taps{i}", taps[:, start:start + cb].contiguous().clone())
            start += cb
        self.bn = ppm.psp_bottleneck.bn
        self.act = ppm.psp_bottleneck.act
        self._matrices: OrderedDict[tuple, Tensor] = OrderedDict()

    def cached_tensors(self) -> list[Tensor]:
        """The resize matrices cached now (a CUDA graph captured over this module reads them)."""
        return list(self._matrices.values())

    def resize_shift_matrix(self, height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(9 * sum s^2) x (H * W): row ``tap * S + j`` maps pooled pixel j (all scales' pixels, concatenated) to
        the H x W map, resized (bilinear, align_corners=False) and shifted by the tap's offset (zero outside).

        Cached per size. Under ``torch.compile`` / ``torch.export`` a cached matrix is used (export fills the cache
        first: the matrix is a constant in the graph), but a missing one is built in the traced graph and not
        stored: stored while tracing, the lookup that missed is a guard ("key not in the cache") that the first run
        itself breaks, so every new input shape compiled twice and a warm-up's compilation did not serve the next
        frame (8.5 s more on the first real frame, CPU, 96x128)."""
        tracing = torch.compiler.is_compiling()
        key = (height, width, dtype, device)
        m = self._matrices.get(key)
        if m is not None:
            if not tracing:
                self._matrices.move_to_end(key)
            return m
        m = self._build_matrix(height, width, dtype, device)
        if not tracing:
            self._matrices[key] = m
            while len(self._matrices) > self.MAX_CACHED:
                self._matrices.popitem(last=False)
        return m

    def _build_matrix(self, height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        # built where it is used (under torch.compile without frozen weights it is built in the graph, every call:
        # on the CPU it was a host computation and a copy per frame for a CUDA model); float64 where supported
        work = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        blocks = []
        for s in self.scales:
            eye = torch.eye(s * s, dtype=work, device=device).view(s * s, 1, s, s)
            blocks.append(F.interpolate(eye, size=(height, width), mode="bilinear", align_corners=False)[:, 0])
        resize = F.pad(torch.cat(blocks), (1, 1, 1, 1))  # S x (H+2) x (W+2)
        # tap (ky, kx) of a 3x3 conv reads input pixel (y + ky - 1, x + kx - 1) for output pixel (y, x)
        shifted = [resize[:, ky:ky + height, kx:kx + width] for ky in range(3) for kx in range(3)]
        return torch.stack(shifted).reshape(-1, height * width).to(device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        y = self.conv_x(x)
        pooled = []
        for i, m in enumerate(self.psp_modules):
            p = m(x).flatten(2)  # N x C_b x s^2
            pooled.append(torch.matmul(getattr(self, f"taps{i}"), p))  # N x 9*cout x s^2
        t = torch.cat(pooled, 2)  # N x 9*cout x S
        s = t.shape[2]
        t = t.view(n, 9, self.out_channels, s).transpose(1, 2).reshape(n, self.out_channels, 9 * s)
        z = torch.matmul(t, self.resize_shift_matrix(h, w, t.dtype, t.device)).view(n, self.out_channels, h, w)
        return self.act(self.bn(y + z))


def factorize_pyramid_pooling(model: nn.Module, example_input: Tensor | Sequence[Tensor] | None = None) -> int:
    """Replace every concat-style pyramid pooling in ``model`` by :class:`FactorizedPyramidPooling`, in place;
    returns how many were replaced. Call it on an eval-mode inference copy, after :func:`fold_batchnorm` if used.

    With ``example_input`` the model's output before and after is compared; beyond :data:`FOLD_RTOL` or below
    :data:`MIN_ARGMAX_AGREEMENT` the original modules are put back and ``RuntimeError`` is raised."""
    from .models.icnet import PyramidPooling

    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, PyramidPooling) and m.style == "concat"]
    if not targets:
        return 0
    inputs = None if example_input is None else (
        (example_input,) if isinstance(example_input, Tensor) else tuple(example_input))
    before = _probe(model, inputs) if inputs is not None else []
    modules = dict(model.named_modules())
    undo = []
    for name, ppm in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        undo.append((parent, attr, ppm))
        setattr(parent, attr, FactorizedPyramidPooling(ppm))
    if before and before[0].dtype == torch.float32:
        agreement = _agreement(before, _probe(model, inputs))
        if not agreement.ok():
            for parent, attr, ppm in undo:
                setattr(parent, attr, ppm)
            raise RuntimeError(f"pyramid-pooling factorization changed the model's output beyond tolerance "
                               f"({agreement}); the original modules were restored")
    return len(targets)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert 4-D parameters and buffers to channels_last (NHWC) memory format, in place."""
    return model.to(memory_format=torch.channels_last)


def compile_model(model: nn.Module, mode: str | None = None, dynamic: bool = False,
                  freezing: bool | None = None) -> Callable[..., Tensor]:
    """``torch.compile`` the model for fixed shapes (``dynamic=False``: a recompilation per new input shape).

    ``mode``: None/"default", "reduce-overhead" (adds CUDA graphs on GPU) or "max-autotune". Compilation happens
    on the first call (seconds to minutes); on CPU it needs a working C++ compiler.
    ``freezing`` (default: on for a CPU model in the default mode): inductor treats the weights as constants, so
    it can pre-pack them for oneDNN once and fold constant subexpressions; the compiled function must then only be
    called under ``torch.inference_mode``/``no_grad`` and the weights must not change. It is an inductor option,
    which torch.compile accepts only in the default mode."""
    default_mode = mode in (None, "default")
    if freezing is None:
        param = next(model.parameters(), None)
        freezing = default_mode and param is not None and param.device.type == "cpu"
    if freezing and not default_mode:
        raise ValueError(f"freezing is an inductor option, which torch.compile accepts only in the default mode "
                         f"(got mode {mode!r})")
    if freezing:
        return torch.compile(model, dynamic=dynamic, fullgraph=False, options={"freezing": True})
    return torch.compile(model, mode=None if default_mode else mode, dynamic=dynamic, fullgraph=False)


class CUDAGraphRunner:
    """Capture ``fn(*inputs)`` (CUDA tensors of fixed shape, dtype and strides) in a CUDA graph and replay it.

    ``runner(*new_inputs)`` copies the new inputs into the captured (static) input tensors, replays the graph and
    returns the static output tensors: they are overwritten by the next replay, so consume or copy them first.
    ``fn`` must not synchronise with the host nor allocate differently between calls (ICNet's forward qualifies).
    Capture and replay must happen under the same autograd mode (the Segmenter uses ``torch.inference_mode``).
    """

    def __init__(self, fn: Callable[..., Tensor | tuple[Tensor, ...]], example_inputs: Sequence[Tensor],
                 warmup_iters: int = 3, pool: tuple | None = None) -> None:
        if not example_inputs or any(not isinstance(t, Tensor) or t.device.type != "cuda" for t in example_inputs):
            raise ValueError("CUDAGraphRunner needs CUDA tensor inputs")
        self.device = example_inputs[0].device
        self.static_inputs = [t.clone() for t in example_inputs]  # clone keeps the memory format
        self.fn = fn
        with torch.cuda.device(self.device):  # captured and replayed on the inputs' device (not the current one)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
                for _ in range(max(1, warmup_iters)):
                    fn(*self.static_inputs)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):  # pool: several graphs share one memory pool
                out = fn(*self.static_inputs)
        #: tensors the graph reads that something else owns (e.g. cached matrices): kept alive with the graph
        self.keep_alive: list[Tensor] = []
        self._single = isinstance(out, Tensor)
        self.static_outputs: tuple[Tensor, ...] = (out,) if self._single else tuple(out)

    def matches(self, *inputs: Tensor) -> bool:
        """Whether ``inputs`` have the captured shapes, dtypes, devices and strides."""
        return len(inputs) == len(self.static_inputs) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()
            for a, b in zip(inputs, self.static_inputs))

    def __call__(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        if not self.matches(*inputs):
            raise ValueError("CUDAGraphRunner: inputs differ from the captured shapes/dtypes/strides")
        with torch.cuda.device(self.device):
            for dst, src in zip(self.static_inputs, inputs):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src, non_blocking=True)
            self.graph.replay()
        return self.static_outputs[0] if self._single else self.static_outputs


@dataclass(frozen=True)
class Agreement:
    """How closely two logit tensors agree (``test`` against ``reference``)."""

    max_abs_diff: float
    max_abs_reference: float
    argmax_agreement: float

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_reference, 1e-12)

    def ok(self, rtol: float = FOLD_RTOL, min_agreement: float = MIN_ARGMAX_AGREEMENT) -> bool:
        return self.relative_diff <= rtol and self.argmax_agreement >= min_agreement

    def __str__(self) -> str:
        return (f"max|diff| {self.max_abs_diff:.3g} (relative {self.relative_diff:.3g}), "
                f"argmax agreement {100 * self.argmax_agreement:.3f}%")


def compare_logits(reference: Tensor, test: Tensor) -> Agreement:
    """Agreement of ``test`` logits with ``reference`` logits (N x C x H x W; compared in float32)."""
    if reference.shape != test.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference.shape)} vs {tuple(test.shape)}")
    ref, tst = reference.detach().float(), test.detach().float().to(reference.device)
    return Agreement(max_abs_diff=float((ref - tst).abs().max()), max_abs_reference=float(ref.abs().max()),
                     argmax_agreement=float((ref.argmax(1) == tst.argmax(1)).float().mean()))


__all__ = ["Agreement", "CUDAGraphRunner", "FOLD_RTOL", "FactorizedPyramidPooling", "MIN_ARGMAX_AGREEMENT",
           "compare_logits", "compile_model", "count_batchnorms", "factorize_pyramid_pooling", "find_conv_bn_pairs",
           "fold_batchnorm", "fuse_conv_bn_", "to_channels_last"]
