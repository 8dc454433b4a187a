"""Input normalisation shared by the Segmenter, evaluation and training: uint8 images -> the network's input.

A checkpoint's ``normalization`` (``mean``, ``std`` on 0..255 values, ``channel_order``) says what the network was
trained on; frames may arrive in either channel order, and the flip is folded into the mean/std lookup.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .checkpoint import MMSEG_NORMALIZATION


class Normalizer:
    """Turns uint8 NHWC or NCHW images (RGB or BGR) into normalised float NCHW tensors on the tensor's device."""

    def __init__(self, normalization: dict[str, Any] | None = None) -> None:
        norm = normalization or MMSEG_NORMALIZATION
        self.channel_order: str = norm["channel_order"]
        self.mean = torch.tensor(norm["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(norm["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self._cache: dict[tuple[torch.device, torch.dtype, str], tuple[Tensor, Tensor]] = {}

    def _params(self, device: torch.device, dtype: torch.dtype, order: str) -> tuple[Tensor, Tensor]:
        """scale and shift with the model's channel order mapped onto the input's: out = x * scale + shift."""
        key = (device, dtype, order)
        if key not in self._cache:
            mean, std = self.mean, self.std
            if order != self.channel_order:
                mean, std = mean.flip(1), std.flip(1)
            self._cache[key] = ((1.0 / std).to(device, dtype), (-mean / std).to(device, dtype))
        return self._cache[key]

    def __call__(self, images: Tensor, channel_order: str = "RGB", channels_last_input: bool = True,
                 dtype: torch.dtype = torch.float32) -> Tensor:
        """``images``: uint8 (or float on 0..255) N x H x W x 3 (``channels_last_input``) or N x 3 x H x W, in
        ``channel_order``. Returns float N x 3 x H x W in the model's channel order (same device)."""
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
        x = images.permute(0, 3, 1, 2) if channels_last_input else images
        scale, shift = self._params(x.device, dtype, channel_order)
        x = x.to(dtype) * scale + shift
        if channel_order != self.channel_order:
            x = x.flip(1)
        return x
