"""Image sizes given as text ("HxW", "H W") and the 32-pixel grid of ICNet's network inputs: one place for the
CLIs, the node parameters and the Segmenter (the input-size policy itself is parsed by
:func:`icnet_ros.engine_config.parse_input_size`). No torch, no ROS."""
from __future__ import annotations

import math
import re

MIN_INPUT_SIZE = 64  # the network's minimum (icnet_ros.models.icnet.MIN_INPUT_SIZE)
MAX_SCALE = 4.0  # the most a frame is upscaled per side (a scale factor; input_size auto)
MAX_UPSCALED_PIXELS = 4096 * 4096  # the largest network input a frame is upscaled to (bounded memory)
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

