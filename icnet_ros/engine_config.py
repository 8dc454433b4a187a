"""Every option of the inference engine, defined once: :class:`SegmenterConfig`.

Each field carries its default, its allowed values, a one-line description, whether it can change while a
:class:`~icnet_ros.engine.Segmenter` runs (``live``: :meth:`~icnet_ros.engine.Segmenter.reconfigure`) and how it
appears elsewhere. The node's parameters (:mod:`icnet_ros.node_params`, ``config/icnet.yaml``) and the command-line
flags of ``icnet-segment``, ``icnet-eval`` and ``icnet-bench`` are derived from :data:`OPTIONS`, so an option is
named, documented and validated in this file only. ROS-free and torch-free.

Values: ``SegmenterConfig().replace(**options)`` (or ``SegmenterConfig(...).checked()``) parses text forms
(``"540x720"``, ``"1.5"``, ``"auto"``) into canonical values and raises :class:`ConfigError` naming the option, the
value and what is allowed. A frame that ``Segmenter.segment()`` cannot take raises :class:`FrameError` (defined here,
torch-free, for the callers that drop that frame and go on: the node's frame pipeline, ``icnet-segment``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .sizes import (MAX_SCALE, MAX_UPSCALED_PIXELS, MAX_UPSCALED_TEXT, MIN_INPUT_SIZE, MIN_SCALE, SIZE_DIVISOR,
                    parse_hw)

OUTPUTS: tuple[str, ...] = ("label", "color", "overlay", "confidence")
BACKENDS: tuple[str, ...] = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
PRECISION_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
OUTPUT_SIZES: tuple[str, ...] = ("input", "model")
INPUT_SIZE_WORDS: tuple[str, ...] = ("auto", "native", "checkpoint")
COMPILE_MODES: tuple[str, ...] = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """A bad engine option; the message names the option, the value and what is allowed (one line)."""


class FrameError(ValueError):
    """One frame of a ``segment()`` call that the engine cannot take (wrong type, empty, too small for the network,
    ...): ``index`` is its position in the call, ``reason`` the problem; the message is ``frame {index}: {reason}``.
    Nothing of the call was segmented; the caller may drop that frame and segment the others."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"frame {index}: {reason}")
        self.index = index
        self.reason = reason


class MissingRuntimeError(RuntimeError):
    """The runtime a backend needs is not installed; the message names the pip extra (one line). Defined here, with
    the engine's other errors, so that a CLI can catch it without importing torch (icnet_ros.backends.base, where
    the backends raise it, imports torch)."""

    def __init__(self, backend: str, module: str, extra: str) -> None:
        super().__init__(f"backend {backend!r} needs the Python package {module!r}, which is not installed: "
                         f"pip install 'icnet_ros[{extra}]'")
        self.backend, self.module, self.extra = backend, module, extra


# ----------------------------------------------------------------------------------------------- value parsers
def parse_input_size(value: Any, network: bool = True) -> str | tuple[int, int] | float:
    """Network input size policy -> ``"auto"`` | ``"native"`` | ``"checkpoint"`` | ``(H, W)`` | scale factor.

    Text: ``auto``, ``native``, ``checkpoint``, ``HxW`` / ``H W`` / ``H,W`` (each >= 64, at most
    :data:`~icnet_ros.sizes.MAX_UPSCALED_PIXELS` = 4096x4096 pixels together: the largest network input anything
    else in the package accepts) or a factor in [1/64, 4]. Also None / ``""`` / ``()`` (native), a 2-sequence (H, W)
    and a number (scale). ``network=False``: an HxW is a frame size (warm-up), not bounded as a network input
    (frames are bounded by max_pixels)."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return "native"
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{value!r}: expected (H, W)")
        h, w = (int(v) for v in value)
        if min(h, w) < MIN_INPUT_SIZE:
            raise ValueError(f"{h}x{w} is below the network minimum {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}")
        return check_network_pixels(h, w) if network else (h, w)
    if isinstance(value, (int, float)):
        s = float(value)
        if not (math.isfinite(s) and MIN_SCALE <= s <= MAX_SCALE):  # (below: frames over 4096x4096 only)
            raise ValueError(f"scale {value} must be in [1/{1 / MIN_SCALE:g}, {MAX_SCALE:g}]")
        return s
    text = str(value).strip().lower()
    if text in ("", "none"):
        return "native"
    if text in INPUT_SIZE_WORDS:
        return text
    parts = [p for p in re.split(r"[\sx,]+", text) if p]
    if len(parts) == 2 and ("x" in text or " " in text or "," in text):
        size = parse_hw(f"{parts[0]}x{parts[1]}", MIN_INPUT_SIZE)
        return check_network_pixels(*size) if network else size
    try:
        scale = float(text)
    except ValueError:
        raise ValueError(f"{value!r} is not auto, native, checkpoint, HxW or a scale factor") from None
    return parse_input_size(scale)


def check_network_pixels(height: int, width: int) -> tuple[int, int]:
    """(height, width) when a network input of that size has at most :data:`~icnet_ros.sizes.MAX_UPSCALED_PIXELS`
    pixels (4096x4096: the bound of an upscaled frame, of an icnet-export size and of a model file's size), else
    ValueError; a larger one only ends in an out-of-memory error (100000x100000 asked for 112 GiB)."""
    if height * width > MAX_UPSCALED_PIXELS:
        raise ValueError(f"{height}x{width} = {height * width} pixels exceeds the largest network input, "
                         + MAX_UPSCALED_TEXT)
    return height, width


def format_input_size(value: Any) -> str:
    """The text form of a parsed input size (what the node parameter and the CLI flag carry)."""
    if isinstance(value, tuple):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_outputs(value: Any) -> tuple[str, ...]:
    """``"label,color"`` / ``["label", "color"]`` -> ('label', 'color') in canonical order; label always included."""
    if value is None:
        return ("label",)
    items = [o for o in str(value).replace(",", " ").split() if o] if isinstance(value, str) else list(value)
    unknown = sorted(set(items) - set(OUTPUTS))
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; choose from {', '.join(OUTPUTS)}")
    wanted = set(items) | {"label"}
    return tuple(o for o in OUTPUTS if o in wanted)


def parse_precision(value: Any) -> str:
    p = str(value).strip().lower()
    p = PRECISION_ALIASES.get(p, p)
    if p not in PRECISIONS:
        raise ValueError(f"must be one of {', '.join(PRECISIONS)}")
    return p


def parse_device(value: Any) -> str:
    v = str(value).strip().lower()
    if not re.fullmatch(r"auto|cpu|(cuda|xpu)(:\d+)?", v):
        raise ValueError("must be auto, cpu, cuda, cuda:N, xpu or xpu:N (xpu: an Intel GPU, openvino backend)")
    return v


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        v = str(value).strip().lower()
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(repr(c) if not c else c for c in choices)}")
        return v
    return parse


def _number(lo: float, hi: float, kind: type = float) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"must be a number in [{lo}, {hi}]")
        try:
            v = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number in [{lo}, {hi}]") from None
        if kind is int and float(value) != v:
            raise ValueError(f"must be an integer in [{lo}, {hi}]")
        if not (lo <= v <= hi) or (isinstance(v, float) and math.isnan(v)):
            raise ValueError(f"must be in [{lo}, {hi}]")
        return v
    return parse


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _compile(value: Any) -> str:
    if value is True:
        return "default"
    if value is False or value is None:
        return ""
    return _choice(COMPILE_MODES)(value)


def _folder(value: Any) -> str:
    """A folder path; None and '' mean none. One that names an existing file (or lies under one) is refused here,
    before any work: the backends failed with a bare errno, the native TensorRT one after minutes of building."""
    if value is None:
        return ""
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"expected a folder path, got {type(value).__name__}")
    text = os.fspath(value)
    path = existing = os.path.expanduser(text)
    while text and not os.path.lexists(existing) and os.path.dirname(existing) != existing:  # the nearest existing
        existing = os.path.dirname(existing) or "."
    if text and os.path.lexists(existing) and not os.path.isdir(existing):
        raise ValueError("not a folder" if existing == path else f"not a folder ({existing} is a file)")
    return text


def shown(value: Any, limit: int = 200) -> str:
    """``repr(value)`` for a message, cut after ``limit`` characters (a refused value may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


#: the most distinct frame sizes ``warmup`` takes (6000 copies of one size blocked a node's services for 24 s)
MAX_WARMUP_SIZES = 16


def _warmup(value: Any) -> bool | tuple[tuple[int, int], ...]:
    """true | false | frame sizes to warm up at (CUDA graphs are captured there, not on the hot path)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value.strip().lower() in ("true", "false"):  # the node parameter's text form
            return _bool(value)
        value = [v for v in re.split(r"[;\s]+", value.strip()) if v]
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        value = [value]
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    sizes = []
    for v in items:
        try:
            size = parse_input_size(v, network=False)  # frame sizes: bounded by max_pixels (warmup_problem)
        except ValueError:
            size = None
        if not isinstance(size, tuple):  # a word, a scale factor, a bad size: not a frame size
            sizes = []
            break
        sizes.append(size)
    if not sizes:
        raise ValueError(f"must be true, false or frame sizes HxW[;HxW...] with each side >= {MIN_INPUT_SIZE}")
    sizes = list(dict.fromkeys(sizes))  # a size given twice is warmed up once
    if len(sizes) > MAX_WARMUP_SIZES:  # each is warmed up (at every batch, in the node) while services wait
        raise ValueError(f"at most {MAX_WARMUP_SIZES} frame sizes (the cameras' sizes), got {len(sizes)}")
    return tuple(sizes)


def _threshold(value: Any) -> float:
    return 0.0 if value is None else _number(0.0, 1.0)(value)


# ----------------------------------------------------------------------------------------------- the options
def _opt(default: Any, description: str, allowed: str, parse: Callable[[Any], Any], *, live: bool = False,
         node: bool = True, cli: bool = True, text_type: type | None = None) -> Any:
    """A dataclass field with its option metadata (see :class:`Option`)."""
    meta = {"description": description, "allowed": allowed, "parse": parse, "live": live, "node": node,
            "cli": cli, "text_type": text_type}
    if isinstance(default, (list, tuple)) and not isinstance(default, str):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SegmenterConfig:
    """The inference engine's options (frozen; ``dataclasses.replace`` then :meth:`checked` for a variant)."""

    backend: str = _opt(
        "auto", "Inference runtime: auto (by the model file: .safetensors -> torch, .onnx -> onnxruntime, "
        ".xml -> openvino, .engine/.plan -> tensorrt), torch, onnxruntime, openvino or tensorrt.",
        " | ".join(BACKENDS), _choice(BACKENDS))
    device: str = _opt("auto", "Inference device: auto (CUDA when available, else CPU; the CPU for the openvino "
                       "backend and for an onnxruntime without CUDA), cpu, cuda or cuda:N, or xpu / xpu:N (an Intel "
                       "GPU, openvino backend only).",
                       "auto | cpu | cuda | cuda:N | xpu | xpu:N", parse_device)
    precision: str = _opt("fp32", "Inference precision: fp32, fp16 or bf16 (fp16 needs CUDA; bf16 is fast on "
                          "CPUs with AVX512-BF16/AMX).", " | ".join(PRECISIONS), parse_precision)
    input_size: Any = _opt(
        "auto", "Network input size: 'auto' (each frame scaled, keeping its aspect ratio, to the width the model "
        "was trained at, from its metadata, upscaled at most 4x; for models without that record the metadata's fixed size if any, "
        "else native), 'native' (each frame at its own size), 'checkpoint' (the fixed size in the model's "
        "metadata), 'HxW' such as '512x1024', or a scale factor such as '1.5'. Rounded to multiples of "
        "size_divisor.", f"auto | native | checkpoint | HxW (each >= {MIN_INPUT_SIZE}, at most "
        f"{math.isqrt(MAX_UPSCALED_PIXELS)}x{math.isqrt(MAX_UPSCALED_PIXELS)} pixels) | scale in "
        f"[1/{1 / MIN_SCALE:g}, {MAX_SCALE:g}]",
        parse_input_size, live=True, text_type=str)
    size_divisor: int = _opt(SIZE_DIVISOR, "Network input sizes are rounded to multiples of this (32: ICNet's "
                             "branches misalign otherwise; 1 keeps sizes exact).", "[1, 256]", _number(1, 256, int))
    outputs: tuple[str, ...] = _opt(("label",), "Outputs computed per frame (label always).",
                                    "subset of " + ", ".join(OUTPUTS), parse_outputs, live=True, node=False)
    output_size: str = _opt("input", "Resolution of the outputs: 'input' (the frame's) or 'model' (the network "
                            "input's).", " | ".join(OUTPUT_SIZES), _choice(OUTPUT_SIZES), live=True)
    overlay_alpha: float = _opt(0.5, "Overlay = alpha * class color + (1 - alpha) * image.", "[0, 1]",
                                _number(0.0, 1.0), live=True)
    confidence_threshold: float = _opt(
        0.0, "Pixels whose max softmax probability is below this get the unknown label (the model's ignore index, 255 "
        "unless its metadata says otherwise); 0 = off.", "[0, 1]",
        _threshold, live=True)
    optimize: bool = _opt(True, "torch backend: fold batch norms, factorize pyramid pooling, channels_last.",
                          "true | false", _bool)
    channels_last: Any = _opt(None, "torch backend: NHWC memory format (None: same as optimize).",
                              "true | false | None", lambda v: None if v is None else _bool(v), node=False,
                              cli=False)
    compile: str = _opt("", "torch backend: torch.compile mode for the network and the rendering ('' = off).",
                        " | ".join(m or "''" for m in COMPILE_MODES), _compile)
    cuda_graphs: bool = _opt(False, "torch backend on CUDA: replay the network from CUDA graphs captured per "
                             "input shape (at warm-up for the configured sizes).", "true | false", _bool)
    engine_cache: str = _opt("", "TensorRT (native or ONNX Runtime's TensorRT provider): folder of the built "
                             "engines ('' = next to the model file, or ~/.cache/icnet_ros/tensorrt where that folder "
                             "is read-only or others can write it); OpenVINO: its compiled-model cache ('' = none). "
                             "Refused if others can write it.", "a folder or empty", _folder)
    warmup: Any = _opt(True, "Run the pipeline at start-up on a synthetic frame (true), not at all (false), or "
                       "at each of these frame sizes, e.g. '720x1280;480x640' (the cameras' sizes: the CUDA graphs "
                       "and torch.compile graphs for one frame of each are then made before the first frame instead "
                       "of on it).", f"true | false | HxW[;HxW...] (at most {MAX_WARMUP_SIZES} sizes)", _warmup, cli=False,
                       text_type=str)

    # ---------------------------------------------------------------------------------------------- building
    def checked(self) -> SegmenterConfig:
        """Every value parsed into its canonical form (raises :class:`ConfigError`)."""
        return dataclasses.replace(self, **{name: check(name, getattr(self, name)) for name in OPTIONS})

    def replace(self, **changes: Any) -> SegmenterConfig:
        """A checked copy with ``changes`` applied."""
        unknown = sorted(set(changes) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"unknown engine option(s) {unknown}; known: {', '.join(OPTIONS)}")
        return dataclasses.replace(self, **changes).checked()


@dataclass(frozen=True)
class Option:
    """One engine option as the node and the CLIs see it."""

    name: str
    default: Any
    description: str
    allowed: str
    parse: Callable[[Any], Any]
    live: bool  # can change on a running Segmenter (reconfigure); others need a new Segmenter
    node: bool  # exposed as a node parameter
    cli: bool  # exposed as a command-line flag
    text_type: type | None  # the parameter's type when it differs from the default's (input_size: a string)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def text_default(self) -> Any:
        """The default as a node parameter / YAML value (strings for sizes, lists for tuples)."""
        if self.text_type is str:
            return str(self.default).lower() if isinstance(self.default, bool) else format_input_size(self.default)
        return list(self.default) if isinstance(self.default, tuple) else self.default


OPTIONS: dict[str, Option] = {
    f.name: Option(f.name, f.default, f.metadata["description"], f.metadata["allowed"], f.metadata["parse"],
                   f.metadata["live"], f.metadata["node"], f.metadata["cli"], f.metadata["text_type"])
    for f in dataclasses.fields(SegmenterConfig)
}
LIVE_OPTIONS: frozenset[str] = frozenset(n for n, o in OPTIONS.items() if o.live)


def check(name: str, value: Any) -> Any:
    """Parse one option's value into its canonical form; :class:`ConfigError` names the option."""
    option = OPTIONS.get(name)
    if option is None:
        raise ConfigError(f"unknown engine option {name!r}; known: {', '.join(OPTIONS)}")
    try:
        return option.parse(value)
    except (ValueError, TypeError) as e:  # TypeError: a value of a type the option's parser cannot take
        raise ConfigError(f"{name} = {shown(value)}: {e}") from None


# ----------------------------------------------------------------------------------------------- CLI flags
def add_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None,
                  defaults: dict[str, Any] | None = None) -> None:
    """Add ``--backend``, ``--device``, ... (the CLI-exposed options, or ``names``) to ``parser``; values stay
    text until :func:`from_args` checks them. ``defaults`` overrides a tool's defaults (e.g. outputs)."""
    group = parser.add_argument_group("engine options (icnet_ros.engine_config)")
    for name in names or tuple(n for n, o in OPTIONS.items() if o.cli):
        o = OPTIONS[name]
        default = (defaults or {}).get(name, o.default)
        shown = format_input_size(default) if o.text_type is str else (
            ",".join(default) if isinstance(default, tuple) else default)
        help_text = f"{o.description} Allowed: {o.allowed}. Default: {shown!r}."
        if isinstance(o.default, bool):
            group.add_argument(o.flag, dest=name, default=default, action=argparse.BooleanOptionalAction,
                               help=help_text)
        elif name == "input_size":  # '540x720' and '540 720' both work
            group.add_argument(o.flag, dest=name, default=default, nargs="+", metavar="SIZE", help=help_text)
        else:
            group.add_argument(o.flag, dest=name, default=default, metavar=name.upper(), help=help_text)


def split_size_tokens(tokens: list[str]) -> tuple[list[str], list[str]]:
    """``--input-size`` takes one token (``540x720``, ``auto``, ``1.5``) or two integers (``540 720``); argparse
    hands it everything up to the next flag. Returns (the size's tokens, the rest: positional arguments that
    followed it, e.g. ``--input-size 1.5 video.mp4``)."""
    n = 2 if len(tokens) >= 2 and tokens[0].isdigit() and tokens[1].isdigit() else 1
    return tokens[:n], tokens[n:]


def from_args(args: argparse.Namespace, base: SegmenterConfig | None = None,
              names: tuple[str, ...] | None = None) -> SegmenterConfig:
    """The checked config from parsed CLI flags (``names``, default all options; those absent from ``args`` keep
    ``base``'s values)."""
    values = {}
    for name in names or tuple(OPTIONS):
        if hasattr(args, name):
            v = getattr(args, name)
            if name == "input_size" and isinstance(v, list):
                size, rest = split_size_tokens([str(t) for t in v])
                if rest:
                    raise ConfigError(f"input_size: {' '.join(rest)!r} follows the size; put positional "
                                      f"arguments before the options or use --input-size={'x'.join(size)}")
                v = " ".join(size)
            values[name] = v
    return (base or SegmenterConfig()).replace(**values)


__all__ = ["BACKENDS", "ConfigError", "LIVE_OPTIONS", "MissingRuntimeError", "OPTIONS", "OUTPUTS", "Option",
           "PRECISIONS", "SegmenterConfig", "add_arguments", "check", "check_network_pixels", "format_input_size", "from_args",
           "parse_input_size", "parse_outputs"]
