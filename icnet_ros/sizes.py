"""Parsing of image sizes given as text ("HxW", "native", a scale factor): one place for the CLIs, the node
parameters and the Segmenter. No torch, no ROS."""
from __future__ import annotations

import math
import re

MIN_INPUT_SIZE = 64  # the network's minimum (icnet_ros.models.icnet.MIN_INPUT_SIZE)
MAX_SCALE = 4.0


def parse_hw(text: str, minimum: int = 1) -> tuple[int, int]:
    """'360x480' -> (360, 480) (height x width). Raises ValueError naming the problem."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"size must be HEIGHTxWIDTH, e.g. 360x480; got {text!r}")
    h, w = int(m.group(1)), int(m.group(2))
    if min(h, w) < minimum:
        raise ValueError(f"size {h}x{w}: height and width must each be >= {minimum}")
    return h, w


def parse_input_size(value: str) -> str | tuple[int, int] | float:
    """Network input size policy: 'native' | 'checkpoint' (the model's recommended size) | 'HxW' -> (H, W) (each
    >= 64) | '0.5' -> 0.5 (a scale factor in (0, 4]). Raises ValueError with what is allowed."""
    v = str(value).strip().lower()
    if v in ("native", "checkpoint"):
        return v
    if "x" in v:
        return parse_hw(v, MIN_INPUT_SIZE)
    try:
        scale = float(v)
    except ValueError:
        raise ValueError(f"'{value}' is not 'native', 'checkpoint', 'HxW' or a scale factor") from None
    if math.isnan(scale) or not 0.0 < scale <= MAX_SCALE:
        raise ValueError(f"scale {value} must be in (0, {MAX_SCALE:g}]")
    return scale
