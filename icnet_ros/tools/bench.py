"""icnet-bench: time the network alone, the full Segmenter pipeline, its stages, and the mmseg reference.

For each combination of model (``--model`` checkpoints and/or ``--arch`` x ``--width`` presets), input size,
batch and precision, on one device:

- ``model``: the Segmenter's optimised network on a prepared input (what the GPU/CPU spends on ICNet itself);
- ``pipeline``: ``Segmenter.segment`` from uint8 frames on the host to the requested uint8 outputs on the host
  (default: label + overlay), including upload, resize, normalisation, upsampling, argmax, colour/overlay, copy back;
- ``--stages``: the pipeline under ``torch.profiler`` with the named ranges of :mod:`icnet_ros.profiling` on, in
  the paper's time-budget view (high / medium / low branches, pyramid pooling, CFF, head, upsample+argmax,
  colour/overlay, host transfer); the same ranges show in Nsight Systems (``ICNET_ROS_RANGES=1`` with
  ``torch.autograd.profiler.emit_nvtx()``);
- ``--reference mmseg``: MMSegmentation 1.2.2's ICNet forward (``EncoderDecoder._forward``, no_grad, the same
  precision) on the same input, and the ratio ``mmseg forward / our pipeline``;
- ``--ablation``: the network alone with each optimisation switched on in turn, each checked against the plain
  fp32 model (relative logit difference and argmax agreement);
- ``--backend torch onnxruntime openvino openvino-int8 tensorrt``: the same weights exported (``icnet-export``'s
  functions, at the network size, into a temporary folder) and timed side by side with the torch backend, model
  alone and full pipeline, all measurements round-robin in one loop (with the mmseg reference when asked), so
  the ratios are measured under the same load. ``openvino-int8`` is calibrated on ``--calib`` images.

Timings: warm-up iterations first, then ``--iters`` timed iterations (stopping early, after at least 3, once
``--max-seconds`` is spent on one measurement), CUDA synchronised before and after each iteration; median, mean,
p10/p90, min/max are reported. ``--sweep`` runs the BENCHMARKS.md grid; ``--json``/``--markdown`` write the results.
Bad values (every configuration's model, ``--width`` / ``--num-classes``, a precision its device cannot run,
``--max-seconds``, the result files) are refused before the first configuration is timed: one line, exit status 2.
Ctrl-C or SIGTERM stops the run (the configurations timed so far stay in the files): one line, exit status 130 or
143.

Timing presets build randomly initialised networks (speed does not depend on the weights); ``--model`` times a
real checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import itertools
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import engine_config
from ..engine_config import OPTIONS, PRECISIONS
from ..profiling import PREFIX, STAGES, ranges
from ..sizes import (MAX_BATCH, MAX_THREADS, MAX_UPSCALED_PIXELS, MAX_UPSCALED_TEXT, MIN_INPUT_SIZE, parse_hw,
                     parse_sizes)

#: the model timed without --model, --arch or --sweep (at each --width)
DEFAULT_ARCH = "icnet_r50"
SWEEP_ARCHS = ("icnet_r18", "icnet_r50")
SWEEP_WIDTHS = (1.0, 0.5)
SWEEP_SIZES = ((512, 1024), (1024, 2048))
DEFAULT_OUTPUTS = ("label", "overlay")


# ---------------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Summary of timed iterations, in milliseconds; ``fps`` = batch / median."""

    n: int
    median_ms: float
    mean_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    fps: float

    @classmethod
    def from_samples(cls, samples_s: list[float], batch: int = 1) -> Timing:
        ms = np.asarray(samples_s, dtype=np.float64) * 1000.0
        med = float(np.median(ms))
        return cls(n=len(ms), median_ms=med, mean_ms=float(ms.mean()), p10_ms=float(np.percentile(ms, 10)),
                   p90_ms=float(np.percentile(ms, 90)), min_ms=float(ms.min()), max_ms=float(ms.max()),
                   fps=batch * 1000.0 / med if med > 0 else math.inf)

    def __str__(self) -> str:
        return (f"median {self.median_ms:9.2f} ms  p10 {self.p10_ms:9.2f}  p90 {self.p90_ms:9.2f}  "
                f"({self.fps:7.2f} fps, n={self.n})")


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_fn(fn: Callable[[], Any], sync: Callable[[], None], iters: int = 10, warmup: int = 2,
            max_seconds: float = 30.0, min_iters: int = 3, batch: int = 1) -> Timing:
    """Time ``fn``: ``warmup`` untimed calls, then up to ``iters`` timed calls, each bracketed by ``sync``;
    stops early (after ``min_iters``) once ``max_seconds`` have been spent timing."""
    for _ in range(warmup):
        fn()
    sync()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < max(1, iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        samples.append(dt)
        spent += dt
        if spent > max_seconds and len(samples) >= min(min_iters, iters):
            break
    return Timing.from_samples(samples, batch)


def time_interleaved(fns: dict[str, Callable[[], Any]], sync: Callable[[], None], iters: int = 10,
                     warmup: int = 2, max_seconds: float = 30.0, min_iters: int = 3,
                     batch: int = 1) -> dict[str, Timing]:
    """Time several functions round-robin (the start rotates every round), so that all of them see the same
    machine load: ratios stay meaningful on a shared or throttling machine. Same stopping rule as
    :func:`time_fn`: the rounds stop once one function has taken ``max_seconds`` in all (after ``min_iters``)."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync()
    samples: dict[str, list[float]] = {n: [] for n in names}
    spent = dict.fromkeys(names, 0.0)
    for r in range(max(1, iters)):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            dt = time.perf_counter() - t0
            samples[name].append(dt)
            spent[name] += dt
        # one function past its budget ends the round robin for all (every function keeps the same samples)
        if max(spent.values()) > max_seconds and r + 1 >= min(min_iters, iters):
            break
    return {n: Timing.from_samples(v, batch) for n, v in samples.items()}


# ---------------------------------------------------------------------------------------------- model specs
@dataclass(frozen=True)
class ModelSpec:
    """A model to time: a checkpoint path, or a preset architecture at a width."""

    arch: str | None = None
    width: float = 1.0
    num_classes: int = 19
    path: str | None = None

    @property
    def name(self) -> str:
        if self.path:
            return Path(self.path).name
        return f"{self.arch} w{self.width:g}"

    def build(self) -> nn.Module:
        """An eval-mode ICNet with ``.meta`` (random weights with non-trivial BN statistics for presets)."""
        from icnet_ros.checkpoint import build_meta, load_model
        from icnet_ros.models import build_icnet

        if self.path:
            return load_model(self.path, "cpu")
        torch.manual_seed(0)
        model = build_icnet(self.arch, width=self.width, num_classes=self.num_classes, aux_heads=False)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        model.meta = build_meta(model.config)
        return model.eval()


def reference_depth(model: nn.Module) -> tuple[int, float, str | None]:
    """(ResNet depth, width, caveat) of the mmseg reference matching ``model``; raises ValueError if none can."""
    cfg = model.config
    if not (cfg.backbone.startswith("resnet") and cfg.backbone[6:].isdigit()):
        raise ValueError(f"no mmseg reference for backbone {cfg.backbone!r} (mmseg's ICNet uses ResNetV1c)")
    caveat = None
    if cfg.ppm != "concat" or cfg.cff != "mmseg" or cfg.head != "fcn":
        caveat = (f"model uses ppm={cfg.ppm!r}/cff={cfg.cff!r}/head={cfg.head!r}; the mmseg reference uses the concat "
                  "PPM, mmseg CFF and the FCN head at 1/8")
    return int(cfg.backbone[6:]), float(cfg.width), caveat


def build_reference(model: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, str | None]:
    from icnet_ros.reference import build_mmseg_icnet

    depth, width, caveat = reference_depth(model)
    with warnings.catch_warnings():  # mmcv-lite / mmseg deprecation chatter
        warnings.simplefilter("ignore", UserWarning)
        ref = build_mmseg_icnet(depth, num_classes=model.config.num_classes, width=width)
    return ref.to(device=device, dtype=dtype).eval(), caveat


# ---------------------------------------------------------------------------------------------------- stages
#: the paper-style grouping of stages for the summary line
STAGE_GROUPS = {
    "pre/post-processing": ("preprocess", "upsample+argmax", "color/overlay", "host transfer"),
    "high-res branch": ("high branch (sub1)",),
    "medium-res branch": ("medium branch (sub2)",),
    "low-res branch (+PPM)": ("low branch (sub4)", "pyramid pooling"),
    "fusion + head": ("CFF", "head"),
}


def profile_stages(seg: Any, arrays: list[np.ndarray], want: frozenset[str], order: str = "RGB"
                   ) -> dict[str, float]:
    """One pipeline call (``Segmenter.segment``) under ``torch.profiler`` with the named ranges on
    (:mod:`icnet_ros.profiling`): milliseconds per stage, in pipeline order. On CUDA a stage's time is the GPU time
    of its range (its kernels), on the CPU the range's wall time. The ranges live in the model and the engine, so
    the table follows the code; no stage is re-implemented here."""
    from torch.profiler import ProfilerActivity, profile

    cuda = seg.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with ranges(True), profile(activities=activities) as prof:
        seg.segment(arrays, channel_order=order, outputs=tuple(want))
        seg.synchronize()
    cpu: dict[str, float] = {}
    gpu: dict[str, float] = {}
    for evt in prof.events():
        if not evt.name.startswith(PREFIX):
            continue
        name = evt.name[len(PREFIX):]
        on_gpu = str(getattr(evt, "device_type", "")).endswith("CUDA")
        into = gpu if on_gpu else cpu
        into[name] = into.get(name, 0.0) + evt.time_range.elapsed_us() / 1000.0
    times = {**cpu, **gpu} if cuda else cpu
    return {name: times[name] for name in STAGES if name in times}


def stage_breakdown(seg: Any, arrays: list[np.ndarray], want: frozenset[str], iters: int, warmup: int,
                    max_seconds: float, order: str = "RGB") -> dict[str, Timing]:
    """Per-stage timings (:func:`profile_stages`) over several profiled pipeline calls: medians per stage. The
    pipeline is warm by then (the timed runs came first): at most 3 of ``warmup`` calls are made (20 full profiled
    calls on R50 at 1024x2048 were seconds outside ``max_seconds``)."""
    samples: dict[str, list[float]] = {}
    spent, timed = 0.0, 0
    warmup = min(warmup, 3)
    for it in range(warmup + max(1, iters)):
        t0 = time.perf_counter()
        stages = profile_stages(seg, arrays, want, order)
        if it < warmup:
            continue
        timed += 1
        spent += time.perf_counter() - t0
        for name, ms in stages.items():
            samples.setdefault(name, []).append(ms / 1000.0)
        if spent > max_seconds and timed >= min(3, iters):
            break
    batch = len(arrays)
    return {k: Timing.from_samples(v, batch) for k, v in samples.items()}


def format_stages(stages: dict[str, Timing], pipeline: Timing | None = None) -> str:
    total = sum(t.median_ms for t in stages.values())
    lines = [f"  {'stage (profiled)':<24}{'median ms':>11}{'share':>8}"]
    for name, t in stages.items():
        lines.append(f"  {name:<24}{t.median_ms:>11.2f}{100 * t.median_ms / total:>7.1f}%")
    lines.append(f"  {'sum of stages':<24}{total:>11.2f}{100.0:>7.1f}%")
    if pipeline is not None:
        lines.append(f"  {'pipeline (no stage syncs)':<24}{pipeline.median_ms:>11.2f}")
    groups = []
    for g, members in STAGE_GROUPS.items():
        ms = sum(stages[m].median_ms for m in members if m in stages)
        if ms:
            groups.append(f"{g} {100 * ms / total:.0f}%")
    lines.append("  budget: " + ", ".join(groups))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- ablation
ABLATION_STEPS = (
    ("plain fp32 (no_grad)", dict(fold=False, ppm=False, channels_last=False, precision="fp32", mode="no_grad")),
    ("+ inference_mode", dict(fold=False, ppm=False, channels_last=False, precision="fp32", mode="inference")),
    ("+ BN folding", dict(fold=True, ppm=False, channels_last=False, precision="fp32", mode="inference")),
    ("+ BN folding + PPM factorization", dict(fold=True, ppm=True, channels_last=False, precision="fp32",
                                              mode="inference")),
    ("+ BN folding + PPM factorization + channels_last", dict(fold=True, ppm=True, channels_last=True,
                                                              precision="fp32", mode="inference")),
    ("bf16 + BN folding + PPM factorization", dict(fold=True, ppm=True, channels_last=False, precision="bf16",
                                                   mode="inference")),
    ("bf16 + BN folding + PPM factorization + channels_last", dict(fold=True, ppm=True, channels_last=True,
                                                                   precision="bf16", mode="inference")),
    ("fp16 + BN folding + PPM factorization + channels_last", dict(fold=True, ppm=True, channels_last=True,
                                                                   precision="fp16", mode="inference")),
)


def ablation(model: nn.Module, size: tuple[int, int], batch: int, device: torch.device, iters: int, warmup: int,
             max_seconds: float, compile_mode: str | None = None) -> list[dict[str, Any]]:
    """The network alone under each optimisation step; each checked against the plain fp32 logits."""
    from icnet_ros.optimize import compare_logits, compile_model, factorize_pyramid_pooling, fold_batchnorm

    sync = synchronizer(device)
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(batch, 3, *size, generator=gen).to(device)
    plain = copy.deepcopy(model).to(device).eval()
    with torch.inference_mode():
        ref_logits = plain(x32).float()
    steps = list(ABLATION_STEPS)
    if compile_mode:
        steps.append((f"+ torch.compile ({compile_mode})",
                      dict(fold=True, ppm=True, channels_last=True, precision="fp32", mode="inference",
                           compile=compile_mode)))
    runs: dict[str, Callable[[], Tensor]] = {}
    agreements = {}
    for name, opt in steps:
        if opt["precision"] == "fp16" and device.type != "cuda":
            continue
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[opt["precision"]]
        m = copy.deepcopy(model).eval()
        if opt["fold"]:
            fold_batchnorm(m, torch.randn(1, 3, 128, 128, generator=gen))
        if opt["ppm"]:
            factorize_pyramid_pooling(m)
        fmt = torch.channels_last if opt["channels_last"] else torch.contiguous_format
        m = m.to(device=device, dtype=dtype, memory_format=fmt)
        x = x32.to(dtype=dtype, memory_format=fmt)
        fn_model = compile_model(m, opt["compile"]) if opt.get("compile") else m
        ctx = torch.no_grad if opt["mode"] == "no_grad" else torch.inference_mode

        def run(fn_model: Callable = fn_model, x: Tensor = x, ctx: Callable = ctx) -> Tensor:
            with ctx():
                return fn_model(x)
        agreements[name] = compare_logits(ref_logits, run())
        runs[name] = run
    timings = time_interleaved(runs, sync, iters, warmup, max_seconds, batch=batch)
    return [{"step": name, "timing": asdict(timings[name]), "relative_logit_diff": agreements[name].relative_diff,
             "argmax_agreement": agreements[name].argmax_agreement} for name in runs]


# ---------------------------------------------------------------------------------------------------- driver
@dataclass
class BenchConfig:
    spec: ModelSpec
    size: tuple[int, int]
    batch: int
    precision: str


@dataclass
class BenchResult:
    model: str
    arch: dict[str, Any]
    size: list[int]
    batch: int
    device: str
    precision: str
    outputs: list[str]
    optimizations: str
    network_size: list[int] | None = None  # the network's input (frame size rounded to multiples of 32)
    model_timing: dict[str, float] | None = None
    pipeline_timing: dict[str, float] | None = None
    reference_timing: dict[str, float] | None = None
    reference_ratio: float | None = None  # mmseg forward median / our pipeline median
    reference_note: str | None = None
    reference_precision: str | None = None
    stages: dict[str, dict[str, float]] | None = None
    ablation: list[dict[str, Any]] | None = None
    #: --backend: name -> {"provider", "model_timing", "pipeline_timing", "pipeline_speedup" (torch / it),
    #: "reference_ratio" (mmseg forward / its pipeline)}; the torch row is the result's own timings
    backends: dict[str, dict[str, Any]] | None = None
    notes: list[str] = field(default_factory=list)


def _size_text(r: BenchResult) -> str:
    """'360x480', or '360x480 (network 352x480)' when the network input differs from the frame."""
    text = f"{r.size[0]}x{r.size[1]}"
    if r.network_size and list(r.network_size) != list(r.size):
        text += f" (network {r.network_size[0]}x{r.network_size[1]})"
    return text


def environment(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
           "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": str(device)}
    with contextlib.suppress(OSError, AttributeError):
        env["loadavg_1m"] = round(os.getloadavg()[0], 2)  # > cpu_count: other processes competed for the CPU
    for dist in ("onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "tensorrt", "mmsegmentation", "mmcv-lite"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # the runtimes that may have been timed
            env[dist] = importlib.metadata.version(dist)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


_ABLATED: set[tuple] = set()


def wants_detail(cfg: BenchConfig, selectors: list[str] | None) -> bool:
    """Whether --stages/--ablation apply to ``cfg``: no --detail means all configurations; otherwise one of the
    ``NAME[:WIDTH]@HxW`` selectors must match (NAME: an --arch preset or a --model file name)."""
    if not selectors:
        return True
    for sel in selectors:
        name, _, size = sel.partition("@")
        arch, _, width = name.partition(":")
        if size and tuple(parse_size(size)) != tuple(cfg.size):
            continue
        spec = cfg.spec
        if spec.path:
            if Path(spec.path).name == name or spec.path == name:
                return True
        elif spec.arch == arch and (not width or float(width) == spec.width):
            return True
    return False


#: single-valued engine options taken as they are (--precision and --backend are grids here)
ENGINE_FLAGS = ("device", "optimize", "compile", "cuda_graphs")
BENCH_BACKENDS = ("torch", "onnxruntime", "openvino", "openvino-int8", "tensorrt")


def _exported_segmenter(name: str, model: nn.Module, net_size: tuple[int, int], cfg: BenchConfig,
                        args: argparse.Namespace, want: frozenset[str], workdir: Path) -> Any:
    """The same weights exported for backend ``name`` at the network size (into a folder under ``workdir``),
    behind a Segmenter."""
    import tempfile

    from icnet_ros.backends.base import BACKENDS, require
    from icnet_ros.engine import Segmenter, resolve_device

    runtime = "openvino" if name.startswith("openvino") else name
    if runtime in BACKENDS and BACKENDS[runtime][1]:  # a missing runtime is skipped before minutes of export
        require(runtime, runtime, BACKENDS[runtime][1])
    if name == "openvino-int8":  # its calibration needs NNCF too (the openvino extra installs it)
        require(runtime, "nncf", BACKENDS[runtime][1])
    if name not in BENCH_BACKENDS or name == "torch":
        raise ValueError(f"unknown --backend {name!r}; choose from {', '.join(BENCH_BACKENDS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        on_cuda = resolve_device(args.device).type == "cuda"
    if name == "onnxruntime" and on_cuda:  # the CPU wheel: refused before minutes of export, not after
        from icnet_ros.backends.onnxruntime import cuda_provider_problem

        problem = cuda_provider_problem()  # installed: required above
        if problem:
            raise ValueError(f"device cuda: {problem}")
    fp16 = cfg.precision == "fp16"
    folder = Path(tempfile.mkdtemp(prefix=f"{name}_", dir=workdir))
    if name in ("onnxruntime", "tensorrt"):
        from icnet_ros.export import export_onnx

        # the batch the torch rows run at (a TensorRT profile, a fixed batch, covers 1..batch)
        path = export_onnx(model, folder / "model.onnx", size=net_size, batch=cfg.batch, fp16=fp16)
    else:
        from icnet_ros.backends.openvino import export_openvino

        int8 = name == "openvino-int8"
        path = export_openvino(model, folder / "model.xml", size=net_size, fp16=fp16, int8=int8,
                               calib_dir=args.calib if int8 else None, calib_count=args.calib_count,
                               progress=not args.quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return Segmenter(str(path), backend="openvino" if name.startswith("openvino") else name,
                         device=args.device, precision="fp32" if name == "openvino-int8" else cfg.precision,
                         outputs=tuple(want), warmup=False)


def bench_one(cfg: BenchConfig, args: argparse.Namespace, log: Callable[[str], None]) -> BenchResult:
    """Time one configuration; the exported backends' Segmenters are closed and their temporary files removed
    when it ends (also on an error)."""
    import tempfile

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="icnet_bench_")))
        return _bench_one(cfg, args, log, stack, workdir)


def _bench_one(cfg: BenchConfig, args: argparse.Namespace, log: Callable[[str], None], stack: contextlib.ExitStack,
               workdir: Path) -> BenchResult:
    from icnet_ros.engine import Segmenter

    want = frozenset(args.outputs) | {"label"}
    if args.engine.compile or args.ablation_compile:
        # each configuration compiles ICNet.forward again: torch's recompile limit (8 per function) counts every
        # earlier configuration's compilations too, and past it the model runs eagerly, still labelled compiled
        torch._dynamo.reset()
    model = cfg.spec.build()
    with warnings.catch_warnings():  # fallbacks are logged below (res.notes)
        warnings.simplefilter("ignore", RuntimeWarning)
        seg = Segmenter(model, args.engine, precision=cfg.precision, input_size="native", outputs=tuple(want),
                        warmup=False)
    sync = synchronizer(seg.device)
    h, w = cfg.size
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(cfg.batch)]
    res = BenchResult(model=cfg.spec.name, arch=dict(seg.meta["arch"]), size=[h, w], batch=cfg.batch,
                      device=str(seg.device), precision=seg.precision, outputs=sorted(want),
                      optimizations=seg.describe().rsplit("optimizations: ", 1)[-1], notes=list(seg.notes))
    net_size = seg.network_size(h, w)
    res.network_size = list(net_size)
    log(f"== {cfg.spec.name} | {_size_text(res)} x{cfg.batch} | {seg.device} {seg.precision} | {res.optimizations}")
    for note in seg.notes:
        log(f"  note      {note}")
    it, wu, mx = args.iters, args.warmup, args.max_seconds

    with torch.inference_mode():
        x = seg.prepare(seg.upload(arrays), "RGB", net_size)  # the network alone, at the size the pipeline uses

    def run_model() -> Tensor:
        with torch.inference_mode():
            return seg.forward(x)
    fns: dict[str, Callable[[], Any]] = {"model": run_model,
                                         "pipeline": lambda: seg.segment(arrays, outputs=tuple(want))}
    from icnet_ros.backends.base import MissingRuntimeError

    exported = {}
    for b in (args.backend or []):
        if b == "torch":
            continue
        try:
            exported[b] = _exported_segmenter(b, model, net_size, cfg, args, want, workdir)
            stack.callback(exported[b].close)  # before the folder goes (callbacks run last in, first out)
        except (MissingRuntimeError, ValueError) as e:  # e.g. no CUDA build of the runtime: the others still run
            res.notes.append(f"{b} skipped: {e}")
            log(f"  {b:<9} skipped: {e}")
    for name, other in exported.items():
        with torch.inference_mode():
            xo = other.prepare(other.upload(arrays), "RGB", net_size)
        fns[f"{name} model"] = lambda other=other, xo=xo: other.forward(xo)
        fns[f"{name} pipeline"] = lambda other=other: other.segment(arrays, outputs=tuple(want))
    caveat = None
    if args.reference:
        try:
            ref_prec = seg.precision if args.reference_precision == "same" else args.reference_precision
            ref_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[ref_prec]
            ref, caveat = build_reference(model, ref_dtype, seg.device)
        except (ImportError, ValueError) as e:
            res.reference_note = f"reference unavailable: {e}"
        else:
            xr = x.to(dtype=ref_dtype, memory_format=torch.contiguous_format)
            res.reference_precision = ref_prec

            def run_ref() -> Tensor:
                with torch.no_grad():
                    return ref._forward(xr)
            fns["mmseg"] = run_ref
    timings = time_interleaved(fns, sync, it, wu, mx, batch=cfg.batch)
    res.model_timing = asdict(timings["model"])
    res.pipeline_timing = asdict(timings["pipeline"])
    log(f"  model     {timings['model']}")
    log(f"  pipeline  {timings['pipeline']}   [uint8 in -> {'+'.join(sorted(want))} on host]")
    if "mmseg" in timings:
        t_ref = timings["mmseg"]
        res.reference_timing = asdict(t_ref)
        res.reference_ratio = t_ref.median_ms / timings["pipeline"].median_ms
        res.reference_note = caveat
        log(f"  mmseg     {t_ref}   [forward only, {res.reference_precision}]")
        log(f"  ratio     mmseg forward / our pipeline = {res.reference_ratio:.2f}x"
            + (f"  ({caveat})" if caveat else ""))
        del fns["mmseg"], ref
    elif args.reference:
        log(f"  mmseg     {res.reference_note}")
    if exported:
        res.backends = {"torch": {"provider": seg.backend.provider, "device": str(seg.device),
                                  "precision": seg.precision, "threads": torch.get_num_threads(),
                                  "model_timing": res.model_timing,
                                  "pipeline_timing": res.pipeline_timing, "pipeline_speedup": 1.0,
                                  "reference_ratio": res.reference_ratio}}
        for name, other in exported.items():
            tm, tp = timings[f"{name} model"], timings[f"{name} pipeline"]
            speedup = timings["pipeline"].median_ms / tp.median_ms
            ratio = timings["mmseg"].median_ms / tp.median_ms if "mmseg" in timings else None
            res.backends[name] = {"provider": other.backend.provider, "device": str(other.device),
                                  "precision": other.precision,
                                  "threads": getattr(other.backend, "threads", None), "model_timing": asdict(tm),
                                  "pipeline_timing": asdict(tp), "pipeline_speedup": speedup,
                                  "reference_ratio": ratio}
            log(f"  {name:<9} model {tm}")
            log(f"  {name:<9} pipeline {tp}   x{speedup:.2f} vs torch pipeline"
                + (f", mmseg forward / it = {ratio:.2f}x" if ratio else ""))
            other.close()

    detailed = wants_detail(cfg, args.detail)
    if args.stages and detailed:
        stages = stage_breakdown(seg, arrays, want, it, wu, mx)
        res.stages = {k: asdict(v) for k, v in stages.items()}
        log(format_stages(stages, timings["pipeline"]))

    key = (cfg.spec, cfg.size, cfg.batch)
    if args.ablation and detailed and key not in _ABLATED:  # independent of --precision: once per model, size and batch
        _ABLATED.add(key)
        rows = ablation(model, net_size, cfg.batch, seg.device, it, wu, mx,
                        compile_mode=args.ablation_compile)
        res.ablation = rows
        base = rows[0]["timing"]["median_ms"]
        for r in rows:
            t = r["timing"]
            log(f"  ablation  {r['step']:<36} {t['median_ms']:9.2f} ms  x{base / t['median_ms']:.2f}  "
                f"rel.diff {r['relative_logit_diff']:.1e}  argmax {100 * r['argmax_agreement']:.2f}%")
    return res


def markdown_table(results: list[BenchResult]) -> str:
    head = ("| model | input | batch | device | precision | model ms | pipeline ms | pipeline fps | mmseg fwd ms "
            "| mmseg / ours |\n|---|---|---|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for r in results:
        ref = (f"{r.reference_timing['median_ms']:.1f} ({r.reference_precision})" if r.reference_timing else "-")
        ratio = f"{r.reference_ratio:.2f}x" if r.reference_ratio else "-"
        rows.append(f"| {r.model} | {_size_text(r)} | {r.batch} | {r.device} | {r.precision} | "
                    f"{r.model_timing['median_ms']:.1f} | {r.pipeline_timing['median_ms']:.1f} | "
                    f"{r.pipeline_timing['fps']:.2f} | {ref} | {ratio} |")
        for name, b in (r.backends or {}).items():
            if name == "torch":
                continue
            ratio_b = f"{b['reference_ratio']:.2f}x" if b.get("reference_ratio") else "-"
            rows.append(f"| {r.model} ({name}) | {_size_text(r)} | {r.batch} | {b.get('device', r.device)} | "
                        f"{b.get('precision', r.precision)} | {b['model_timing']['median_ms']:.1f} | "
                        f"{b['pipeline_timing']['median_ms']:.1f} | {b['pipeline_timing']['fps']:.2f} | {ref} | "
                        f"{ratio_b} |")
    out = [head + "\n" + "\n".join(rows)]
    for r in results:
        if r.stages:
            total = sum(s["median_ms"] for s in r.stages.values())
            out.append(f"\nStages, {r.model} {r.size[0]}x{r.size[1]} x{r.batch} {r.device} {r.precision}:\n\n"
                       "| stage | median ms | share |\n|---|---:|---:|\n" + "\n".join(
                           f"| {k} | {v['median_ms']:.2f} | {100 * v['median_ms'] / total:.1f}% |"
                           for k, v in r.stages.items()))
        if r.ablation:
            base = r.ablation[0]["timing"]["median_ms"]
            out.append(f"\nOptimizations (network alone), {r.model} {r.size[0]}x{r.size[1]} x{r.batch} {r.device}:"
                       "\n\n"
                       "| step | median ms | speed-up | rel. logit diff | argmax agreement |\n"
                       "|---|---:|---:|---:|---:|\n"
                       + "\n".join(f"| {a['step']} | {a['timing']['median_ms']:.1f} | "
                                   f"{base / a['timing']['median_ms']:.2f}x | {a['relative_logit_diff']:.1e} | "
                                   f"{100 * a['argmax_agreement']:.2f}% |" for a in r.ablation))
    return "\n".join(out) + "\n"


def parse_size(text: str) -> tuple[int, int]:
    return parse_hw(text, MIN_INPUT_SIZE)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="icnet-bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  icnet-bench --arch icnet_r50 --size 512x1024 --stages --reference mmseg\n"
               "  icnet-bench --model model.safetensors --device cuda --precision fp16 --batch 4\n"
               "  icnet-bench --sweep --precision fp32 bf16 --reference mmseg --stages --ablation \\\n"
               "      --detail icnet_r50:1.0@512x1024 --markdown bench.md --json bench.json")
    p.add_argument("--model", nargs="+", default=[], metavar="PATH", help="native checkpoint(s) to time")
    p.add_argument("--arch", nargs="+", default=[], help="preset architecture(s), e.g. icnet_r18 icnet_r50")
    p.add_argument("--width", nargs="+", type=float, default=None,
                   help=f"width multiplier(s) for --arch, or for {DEFAULT_ARCH} without --arch and --model (1.0)")
    p.add_argument("--num-classes", type=int, default=19, help="classes of --arch models (default 19)")
    p.add_argument("--size", nargs="+", default=None, metavar="HxW",
                   help="input size(s) (default 512x1024)")
    p.add_argument("--batch", nargs="+", type=int, default=[1], help="batch size(s) (default 1)")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=list(PRECISIONS), metavar="PRECISION",
                   help=f"precision(s) of the grid: {OPTIONS['precision'].description} Default: fp32.")
    p.add_argument("--outputs", default=",".join(DEFAULT_OUTPUTS),
                   help="pipeline outputs, comma-separated (default label,overlay)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per measurement (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations (default 2)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop a measurement early (after 3 iterations) past this many seconds, a finite number "
                        "> 0 (default 20)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--stages", action="store_true", help="per-stage time budget")
    p.add_argument("--detail", nargs="+", default=None, metavar="NAME[:W]@HxW",
                   help="run --stages/--ablation only for these configurations, e.g. icnet_r50:1.0@512x1024 "
                        "(default: all)")
    p.add_argument("--reference", choices=["mmseg"], default=None, help="also time the mmseg reference forward")
    p.add_argument("--reference-precision", default="fp32", choices=["fp32", "bf16", "fp16", "same"],
                   help="precision of the mmseg reference (default fp32, mmseg's usual inference; 'same' = ours)")
    p.add_argument("--ablation", action="store_true", help="time each optimisation of the network alone")
    p.add_argument("--ablation-compile", default=None, metavar="MODE",
                   help="add a torch.compile step to --ablation (e.g. default; slow to compile on CPU)")
    p.add_argument("--backend", nargs="+", default=None, choices=BENCH_BACKENDS, metavar="NAME",
                   help=f"also time these backends side by side with torch, one or more of "
                        f"{', '.join(BENCH_BACKENDS)}: the same weights exported at the network size "
                        "(openvino-int8: an INT8 OpenVINO export, calibrated on --calib images)")
    p.add_argument("--calib", default=None, metavar="DIR",
                   help="calibration images for --backend openvino-int8 (an image folder or a split folder)")
    p.add_argument("--calib-count", type=int, default=300, help="calibration images used (default 300)")
    p.add_argument("--sweep", action="store_true",
                   help="BENCHMARKS.md grid: icnet_r18/icnet_r50 x width 1.0/0.5 x 512x1024/1024x2048 "
                        "(explicit --arch/--width/--size override parts of it)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write results as JSON ('-' for stdout: the log lines then go to stderr)")
    p.add_argument("--markdown", default=None, metavar="PATH",
                   help="write a Markdown table ('-' for stdout: the log lines then go to stderr)")
    p.add_argument("--quiet", action="store_true", help="no per-measurement log lines")
    engine_config.add_arguments(p, names=ENGINE_FLAGS)
    return p


def configs(args: argparse.Namespace) -> Iterator[BenchConfig]:
    # without --model, --arch and --sweep: the default preset, at each --width (before: added after the arch x width
    # product, always at width 1.0, so --width was silently ignored)
    archs = args.arch or (list(SWEEP_ARCHS) if args.sweep else [] if args.model else [DEFAULT_ARCH])
    widths = args.width or (list(SWEEP_WIDTHS) if args.sweep else [1.0])
    sizes = args.size or (list(SWEEP_SIZES) if args.sweep else [(512, 1024)])
    specs = [ModelSpec(path=m) for m in args.model]
    specs += [ModelSpec(arch=a, width=w, num_classes=args.num_classes) for a, w in itertools.product(archs, widths)]
    for spec, size, batch, prec in itertools.product(specs, sizes, args.batch, args.precision):
        yield BenchConfig(spec, size, batch, prec)


def check_configs(cfgs: list[BenchConfig], device: str) -> None:
    """Every configuration's model and precision, checked before any is timed: CheckpointError or ValueError (one
    line, exit status 2). Before, each was checked only when its configuration was built, after the ones before it
    were timed, and the run then ended with exit status 2 and their results unprinted: a ``--model`` that is no
    checkpoint, ``--num-classes`` / ``--width`` outside the model's limits, ``--precision fp16`` on the CPU (which
    the Segmenter refuses unless the device is ``auto``, where it falls back to fp32)."""
    from icnet_ros.checkpoint import load_model, read_metadata
    from icnet_ros.engine import inference_device
    from icnet_ros.models import MODEL_CONFIGS, ICNetConfig

    for spec in dict.fromkeys(cfg.spec for cfg in cfgs):
        if spec.path:
            if Path(spec.path).suffix in (".pth", ".pt"):
                load_model(spec.path)  # refuses a pickle before reading it ('convert it first'), as the run would
            read_metadata(spec.path)  # the tensors are read when its configuration runs
            continue
        try:
            ICNetConfig.from_dict({**MODEL_CONFIGS[spec.arch].to_dict(), "width": spec.width,
                                   "num_classes": spec.num_classes, "aux_heads": False})
        except ValueError as e:
            raise ValueError(f"--arch {spec.arch} --width {spec.width:g} --num-classes {spec.num_classes}: "
                             f"{e}") from None
    if any(cfg.precision == "fp16" for cfg in cfgs) and str(device).strip().lower() != "auto":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            on_cpu = inference_device("torch", device).type == "cpu"
        if on_cpu:
            raise ValueError(f"--precision fp16 is not supported on the CPU (--device {device}; slow or missing "
                             "kernels): use bf16 or fp32, or run on CUDA")


def _check_detail(selectors: list[str] | None) -> None:
    """--detail selectors ``NAME[:WIDTH][@HxW]``, checked before anything is timed."""
    for sel in selectors or ():
        name, _, size = sel.partition("@")
        arch, _, width = name.partition(":")
        if not arch:
            raise ValueError(f"--detail {sel!r}: expected NAME[:WIDTH][@HxW], e.g. icnet_r50:1.0@512x1024")
        if width:
            try:
                float(width)
            except ValueError:
                raise ValueError(f"--detail {sel!r}: width {width!r} is not a number") from None
        if size:
            try:
                parse_size(size)
            except ValueError as e:
                raise ValueError(f"--detail {sel!r}: {e}") from None


def _stream_handlers_to(old: Any, new: Any) -> None:
    """Point every logging handler that writes to ``old`` (e.g. NNCF's, bound to stdout when it was imported) at
    ``new``."""
    import logging

    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and h.stream is old:
                h.setStream(new)


def main(argv: list[str] | None = None) -> int:
    from .cli_checks import run_stoppable

    # SIGTERM (kill, timeout) as Ctrl-C: the configurations timed so far kept, one line, exit status 143 (before:
    # 130 under the console script, whose handlers made it a KeyboardInterrupt; killed outright under python -m)
    return run_stoppable("icnet-bench", lambda stop: _main(argv, stop))


def _main(argv: list[str] | None, stop: Any) -> int:
    from icnet_ros.backends.base import MissingRuntimeError
    from icnet_ros.checkpoint import CheckpointError
    from icnet_ros.engine import resolve_device

    args = build_parser().parse_args(argv)
    _ABLATED.clear()
    from .cli_checks import output_file_problem

    # results on stdout ('-'): the log lines go to stderr, so that stdout is only the JSON / Markdown
    to_stdout = "-" in (args.json, args.markdown)
    real_stdout = sys.stdout
    log_file = sys.stderr if to_stdout else sys.stdout
    results: list[BenchResult] = []
    errors: list[str] = []
    device, load_start = None, None
    try:
        if args.threads is not None and not 0 <= args.threads <= MAX_THREADS:  # (100000: a segmentation fault)
            raise ValueError(f"--threads must be >= 1 and <= {MAX_THREADS} (0: torch's choice), got {args.threads}")
        problem = output_file_problem(args.json, "--json") or output_file_problem(args.markdown, "--markdown")
        if problem:  # before the run, not after it
            raise ValueError(problem)
        # (nan: no budget at all, every --iters timed; 0 and below: 3 iterations; inf: no budget)
        if not (math.isfinite(args.max_seconds) and args.max_seconds > 0):
            raise ValueError(f"--max-seconds must be a finite number > 0, got {args.max_seconds}")
        args.outputs = [o for o in args.outputs.replace(",", " ").split() if o]
        args.size = parse_sizes(args.size, MIN_INPUT_SIZE) if args.size else None  # HxW and/or H W, as every tool
        args.engine = engine_config.from_args(args, names=ENGINE_FLAGS)
        args.device = args.engine.device
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.arch:
            from icnet_ros.models import MODEL_CONFIGS
            bad = [a for a in args.arch if a not in MODEL_CONFIGS]
            if bad:
                raise ValueError(f"unknown --arch {bad}; known: {sorted(MODEL_CONFIGS)}")
        if "openvino-int8" in (args.backend or []):
            if not args.calib:
                raise ValueError("--backend openvino-int8 needs --calib DIR (calibration images, e.g. a training "
                                 "split)")
            if args.calib_count < 1:
                raise ValueError(f"--calib-count must be >= 1, got {args.calib_count}")
            from icnet_ros.backends.openvino import calibration_images

            calibration_images(args.calib, args.calib_count)  # the folder, its images, the count: now, not later
        if any(b < 1 for b in args.batch) or args.iters < 1 or args.warmup < 0:
            raise ValueError("--batch and --iters must be >= 1, --warmup >= 0")
        if max(args.batch) > MAX_BATCH:
            raise ValueError(f"--batch {max(args.batch)}: at most {MAX_BATCH} (the largest batch the node "
                             "forms and an export takes)")
        for h, w in args.size or ():
            if h * w > MAX_UPSCALED_PIXELS:  # a frame this large only ends in an out-of-memory error
                raise ValueError(f"--size {h}x{w}: more than {MAX_UPSCALED_TEXT}")
        if args.stages and (args.engine.compile or args.engine.cuda_graphs):
            # compiled code and a replayed CUDA graph run none of the model's named ranges: the table would show
            # pre/post-processing as 100% (and turning the ranges on recompiles the model)
            raise ValueError(f"--stages times the model's named stages, which "
                             f"{'--compile' if args.engine.compile else '--cuda-graphs'} leaves out; run --stages "
                             "without it")
        _check_detail(args.detail)
        grid = list(configs(args))
        check_configs(grid, args.device)
        if args.reference and args.reference_precision == "fp16":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                on_cpu = resolve_device(args.device).type == "cpu"
            if on_cpu:  # as for --precision fp16: slow or missing kernels; the ratio would flatter us ~6x
                raise ValueError("--reference-precision fp16 is not supported on the CPU (slow or missing kernels: "
                                 "the ratio would be meaningless); use fp32, bf16 or same")
        log = (lambda s: None) if args.quiet else (lambda s: print(s, file=log_file, flush=True))
        load_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        # with results on stdout, anything a library prints there (NNCF's progress bars and INFO lines) goes to
        # stderr: stdout is only the JSON / Markdown
        with contextlib.redirect_stdout(sys.stderr) if to_stdout else contextlib.nullcontext():
            if to_stdout:
                _stream_handlers_to(real_stdout, sys.stderr)
            done = []
            for cfg in grid:
                try:
                    r = bench_one(cfg, args, log)
                except MissingRuntimeError:
                    raise
                except RuntimeError as e:  # e.g. out of memory at one size: the other configurations still run
                    errors.append(f"{_config_text(cfg)}: {_one_line(e)}")
                    print(f"icnet-bench: error: {errors[-1]}", file=sys.stderr)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                device = torch.device(r.device)
                results.append(r)
                done.append(cfg)
                write_results(args, results, errors, device, load_start, to_files_only=True)
        for sel in args.detail or ():
            if not any(wants_detail(cfg, [sel]) for cfg in done):
                print(f"icnet-bench: warning: --detail {sel} matched no configuration", file=sys.stderr)
    except (CheckpointError, ValueError, OSError, MissingRuntimeError) as e:
        print(f"icnet-bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("icnet-bench: interrupted", file=sys.stderr)
        if results and "-" in (args.json, args.markdown):  # what was timed, on stdout as files keep it
            write_results(args, results, errors, device, load_start, stdout=real_stdout)
        return stop.exit_code
    write_results(args, results, errors, device, load_start, stdout=real_stdout)
    if not args.quiet and len(results) > 1:
        print(f"\n{len(results)} configurations; median pipeline fps: "
              + ", ".join(f"{r.model} {r.size[0]}x{r.size[1]} x{r.batch} {r.precision}: {r.pipeline_timing['fps']:.2f}"
                          for r in results), file=log_file)
    if errors:
        print(f"icnet-bench: {len(errors)} configuration(s) failed (listed above and under 'errors' in --json)",
              file=sys.stderr)
    return 1 if errors else 0


def _config_text(cfg: BenchConfig) -> str:
    spec = cfg.spec
    name = Path(spec.path).name if spec.path else f"{spec.arch} w{spec.width:g}"
    return f"{name} {cfg.size[0]}x{cfg.size[1]} x{cfg.batch} {cfg.precision}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_results(args: argparse.Namespace, results: list[BenchResult], errors: list[str],
                  device: torch.device | None, load_start: float | None, stdout: Any = None,
                  to_files_only: bool = False) -> None:
    """--json / --markdown: files are rewritten after every configuration (a run cut off by a time limit or
    killed keeps what it measured; the file is replaced whole, never left half-written); '-' prints once, at the
    end (``to_files_only`` skips it)."""
    from icnet_ros.video import write_text_atomically

    env = environment(device or torch.device("cpu"))
    env["load_start"] = load_start
    if args.json and not (to_files_only and args.json == "-"):
        doc = json.dumps({"environment": env, "results": [asdict(r) for r in results], "errors": errors}, indent=2)
        if args.json == "-":
            print(doc, file=stdout)
        else:
            write_text_atomically(args.json, doc + "\n")
    if args.markdown and not (to_files_only and args.markdown == "-"):
        load = f", load average {env['load_start']} -> {env.get('loadavg_1m')}" if "loadavg_1m" in env else ""
        md = (f"Environment: {env['cpu']} ({env['cpu_threads']} torch threads, {env['cpu_count']} CPUs{load})"
              + (f", {env['gpu']}" if "gpu" in env else "") + f", torch {env['torch']}\n\n" + markdown_table(results)
              + "".join(f"\nfailed: {e}" for e in errors))
        if args.markdown == "-":
            print(md, file=stdout)
        else:
            write_text_atomically(args.markdown, md)


if __name__ == "__main__":
    sys.exit(main())
