"""Image sizes given as text ("HxW", "H W"), the 32-pixel grid of ICNet's network inputs and the input-size policy
(which network input a frame gets): one place for the CLIs, the node parameters, the Segmenter and icnet-eval (the
``input_size`` option's text is parsed by :func:`icnet_ros.engine_config.parse_input_size`). No torch, no ROS."""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import IO, Any

MIN_INPUT_SIZE = 64  # the network's minimum (icnet_ros.models.icnet.MIN_INPUT_SIZE)
MAX_SCALE = 4.0  # the most a frame is upscaled per side (a scale factor; input_size auto)
#: the smallest input_size scale factor: below it only frames over 4096x4096 reach the network's minimum input
#: (and warming up needs such a frame: input_size 0.001 asked for a 64001x64001 one, 11 GiB)
MIN_SCALE = 1 / 64
MAX_UPSCALED_PIXELS = 4096 * 4096  # the largest network input a frame is upscaled to (bounded memory)
#: that bound in messages: "16777216 pixels (4096x4096)"
MAX_UPSCALED_TEXT = (f"{MAX_UPSCALED_PIXELS} pixels "
                     f"({math.isqrt(MAX_UPSCALED_PIXELS)}x{math.isqrt(MAX_UPSCALED_PIXELS)})")
#: the most frames in one forward pass: the node's max_batch, an export's batch (a TensorRT profile covers 1..it)
MAX_BATCH = 64
#: the most CPU threads torch is asked for: the node's num_threads, icnet-segment's and icnet-bench's --threads
#: (torch.set_num_threads(100000) crashed the process with a segmentation fault, 5000 hung it)
MAX_THREADS = 256
#: ICNet's coarsest map is 1/32 of its input. At other sizes the stride-2 layers round up (45 -> 23 -> 12) and
#: the cascade's x2 upsampling no longer lands on the finer map's grid: the branches disagree by up to half a
#: coarse cell (16 px), and the model trained on aligned crops loses accuracy (the stage-6 default model, CamVid val,
#: 480x360 frames: 61.2 mIoU at 360x480, 65.5 at 352x480; BENCHMARKS.md). Network inputs are rounded to it.
SIZE_DIVISOR = 32


def aligned_size(height: float, width: float, divisor: int = SIZE_DIVISOR) -> tuple[int, int]:
    """(height, width) rounded to the nearest multiples of ``divisor`` (halves up), each at least
    MIN_INPUT_SIZE rounded up to a multiple; ``divisor=1`` only rounds to integers and applies the minimum."""
    if int(divisor) < 1:
        raise ValueError(f"size divisor must be >= 1, got {divisor}")
    d = int(divisor)
    low = -(-MIN_INPUT_SIZE // d) * d
    return tuple(max(low, int(math.floor(v / d + 0.5)) * d) for v in (height, width))  # type: ignore[return-value]


def declared_image_size(source: str | os.PathLike | IO[bytes]) -> tuple[int, int] | None:
    """(height, width) that an encoded image file declares in its header, read by Pillow without decoding its
    pixels (a few hundred KB of PNG can declare 16000 x 16000: gigabytes once decoded). None when Pillow does not
    recognise it (missing, corrupt, truncated, or a format Pillow lacks). Raises :class:`OverflowError` for an image
    beyond Pillow's own decompression-bomb limit (2 x ``PIL.Image.MAX_IMAGE_PIXELS``; its exact size unknown)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:  # parses the header only
                width, height = im.size
    except Image.DecompressionBombError as e:
        raise OverflowError(str(e)) from None
    except Exception:  # noqa: BLE001 - Pillow tries every plugin it has on any bytes, whatever the file's suffix,
        return None  # and some raise what no caller expects on junk (DDS: NotImplementedError, SPIDER:
    return height, width  # AttributeError, a damaged AVIF: RuntimeError); the decoder refuses such bytes later


def parse_hw(text: str, minimum: int = 1) -> tuple[int, int]:
    """'360x480' -> (360, 480) (height x width). Raises ValueError naming the problem."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"size must be HEIGHTxWIDTH, e.g. 360x480; got {text!r}")
    h, w = int(m.group(1)), int(m.group(2))
    if min(h, w) < minimum:
        raise ValueError(f"size {h}x{w}: height and width must each be >= {minimum}")
    return h, w


def parse_sizes(tokens: str | list[str], minimum: int = 1) -> list[tuple[int, int]]:
    """Command-line sizes, the same way in every tool: ``HxW`` tokens (``540x720``) and/or plain ``H W`` pairs
    (``540 720``), e.g. ``["540x720", "720", "960"]`` -> [(540, 720), (720, 960)]. Raises ValueError."""
    items = tokens.split() if isinstance(tokens, str) else [t for tok in tokens for t in str(tok).split()]
    sizes: list[tuple[int, int]] = []
    i = 0
    while i < len(items):
        if "x" in items[i].lower():
            sizes.append(parse_hw(items[i], minimum))
            i += 1
        elif i + 1 < len(items) and items[i].isdigit() and items[i + 1].isdigit():
            sizes.append(parse_hw(f"{items[i]}x{items[i + 1]}", minimum))
            i += 2
        else:
            raise ValueError(f"sizes are HEIGHTxWIDTH or HEIGHT WIDTH (HxW or H W), e.g. 540x720 or 540 720; got "
                             f"{' '.join(items)!r}")
    return sizes



@dataclass(frozen=True)
class InputSizePolicy:
    """Which network input a frame of a given size gets. ``kind``: ``native`` (the frame's own size), ``fixed``
    (``param`` = (H, W)), ``scale`` (``param`` = factor) or ``width`` (``param`` = the model's trained network width:
    ``input_size: auto``; the aspect ratio kept, upscaling at most :data:`MAX_SCALE`, downscaling a frame at least
    :data:`MIN_INPUT_SIZE` high no lower than that). Sizes are then rounded to multiples of ``size_divisor`` (1:
    exact)."""

    kind: str
    param: Any = None
    size_divisor: int = SIZE_DIVISOR

    @classmethod
    def from_option(cls, input_size: Any, meta: dict[str, Any], size_divisor: int = SIZE_DIVISOR,
                    fixed_size: tuple[int, int] | None = None) -> InputSizePolicy:
        """The policy for a parsed ``input_size`` option and a model's metadata: ``auto`` is the trained width
        (``network_width``), else the recorded fixed ``input_size``, else native. ``fixed_size``: an exported
        model's (H, W), which every frame gets (no rounding)."""
        if fixed_size is not None:
            return cls("fixed", (int(fixed_size[0]), int(fixed_size[1])), 1)
        if input_size == "auto":
            width = meta.get("network_width")
            if width:
                return cls("width", int(width), size_divisor)
            input_size = "checkpoint"
        if input_size == "checkpoint":
            size = meta.get("input_size")
            return cls("fixed", tuple(size), size_divisor) if size else cls("native", None, size_divisor)
        if input_size == "native":
            return cls("native", None, size_divisor)
        if isinstance(input_size, tuple):
            return cls("fixed", input_size, size_divisor)
        return cls("scale", float(input_size), size_divisor)

    def _exact_size(self, height: int, width: int) -> tuple[float, float]:
        if self.kind == "fixed":
            return self.param
        if self.kind == "scale":
            s = float(self.param)
        elif self.kind == "width":  # upscaling at most MAX_SCALE: a narrow frame stays narrower; downscaling a frame
            # of the network minimum's height or more at most to it (a 64x4000 panorama: 64 rows, not 12, refused)
            s = min(int(self.param) / width, MAX_SCALE)
            if height >= MIN_INPUT_SIZE:
                s = max(s, MIN_INPUT_SIZE / height)
        else:
            return height, width
        return height * s, width * s

    def policy_size(self, height: int, width: int) -> tuple[int, int]:
        """The policy's (H, W) for a frame, before rounding to the grid (to integers, halves up)."""
        h, w = self._exact_size(height, width)
        return max(1, math.floor(h + 0.5)), max(1, math.floor(w + 0.5))

    def network_size(self, height: int, width: int, scale: float = 1.0) -> tuple[int, int]:
        """The network input (H, W) for a frame of ``height`` x ``width``: the policy's size (times a test-time
        ``scale``) rounded once to multiples of ``size_divisor`` (as training validation rounds its sizes)."""
        h, w = self._exact_size(height, width)
        return aligned_size(h * scale, w * scale, self.size_divisor)

    def describe(self) -> str:
        if self.kind == "fixed":
            return "x".join(map(str, self.param))
        if self.kind == "scale":
            return f"scale {self.param:g}"
        return f"auto (width {self.param})" if self.kind == "width" else "native"
