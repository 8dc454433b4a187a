"""Input normalisation shared by the Segmenter, evaluation and training: uint8 images -> the network's input.
On the CPU the Segmenter's path runs on OpenCV (see :meth:`Preprocessor._prepare_cpu`).

A checkpoint's ``normalization`` (``mean``, ``std`` on 0..255 values, ``channel_order``) says what the network was
trained on; frames may arrive in either channel order, and the flip is folded into the mean/std lookup.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import MMSEG_NORMALIZATION


def follow_torch_threads() -> None:
    """OpenCV's thread pool follows PyTorch's intra-op thread count (the node's and the CLIs' ``threads``
    setting), so the CPU pre- and post-processing use no more cores than the network."""
    n = torch.get_num_threads()
    if cv2.getNumThreads() != n:
        cv2.setNumThreads(n)


class Normalizer:
    """Turns uint8 NHWC or NCHW images (RGB or BGR) into normalised float NCHW tensors on the tensor's device."""

    def __init__(self, normalization: dict[str, Any] | None = None) -> None:
        norm = normalization or MMSEG_NORMALIZATION
        self.channel_order: str = norm["channel_order"]
        self.mean = torch.tensor(norm["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(norm["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self._cache: dict[tuple[torch.device, torch.dtype, str], tuple[Tensor, Tensor]] = {}

    def scale_shift(self, device: torch.device, dtype: torch.dtype, order: str) -> tuple[Tensor, Tensor]:
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
        scale, shift = self.scale_shift(x.device, dtype, channel_order)
        x = x.to(dtype) * scale + shift
        if channel_order != self.channel_order:
            x = x.flip(1)
        return x


class Preprocessor:
    """uint8 frames on the host -> the backend's normalised input on the device.

    Upload (pinned host memory + one non-blocking copy on CUDA; no copy at all on the CPU for one frame), resize to
    the network size (bilinear, align_corners False, in float32), normalisation and channel order
    (:class:`Normalizer`), then the backend's dtype and memory format."""

    def __init__(self, normalization: dict[str, Any], device: torch.device, dtype: torch.dtype,
                 memory_format: torch.memory_format) -> None:
        self.normalizer = Normalizer(normalization)
        self.device, self.dtype, self.memory_format = device, dtype, memory_format
        if device.type == "cuda":  # both channel orders' constants now: built on the first frame (a bgr8 camera
            index = device.index if device.index is not None else torch.cuda.current_device()  # after an RGB
            for order in ("RGB", "BGR"):  # warm-up), their blocking upload synchronised the hot path once
                self.normalizer.scale_shift(torch.device("cuda", index), torch.float32, order)

    def upload(self, arrays: list) -> Tensor:
        """Same-size uint8 frames (H x W x 3 or H x W) -> N x H x W x C uint8 tensor on the device."""
        import numpy as np

        shape = (len(arrays), *arrays[0].shape[:2], 1 if arrays[0].ndim == 2 else 3)
        if self.device.type == "cuda":
            host = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
            view = host.numpy()
            for k, a in enumerate(arrays):
                view[k] = a.reshape(shape[1:])
            return host.to(self.device, non_blocking=True)
        if len(arrays) == 1:
            a = arrays[0].reshape(shape[1:])
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
            return from_numpy(a).unsqueeze(0)  # no copy
        return torch.from_numpy(np.stack([a.reshape(shape[1:]) for a in arrays]))

    def __call__(self, frames: Tensor, order: str, net_size: tuple[int, int]) -> Tensor:
        """uint8 N x H x W x C (C = 1 or 3) on the device -> normalised network input (backend dtype and layout)."""
        if frames.device.type == "cpu":
            return self._prepare_cpu(frames, order, net_size)
        return self._prepare_torch(frames, order, net_size)

    def _prepare_torch(self, frames: Tensor, order: str, net_size: tuple[int, int]) -> Tensor:
        """:meth:`__call__` in torch ops on any device (the CUDA path; the tests run it on CPU tensors too)."""
        x = frames.permute(0, 3, 1, 2)  # a view: NCHW with channels_last strides
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.to(dtype=torch.float32, memory_format=self.memory_format)  # one pass: convert + lay out
        if tuple(x.shape[2:]) != tuple(net_size):
            x = F.interpolate(x, size=net_size, mode="bilinear", align_corners=False)
        x = self.normalizer(x, order, channels_last_input=False)
        return x.to(dtype=self.dtype, memory_format=self.memory_format)

    def _prepare_cpu(self, frames: Tensor, order: str, net_size: tuple[int, int]) -> Tensor:
        """:meth:`__call__` on the CPU with OpenCV, frame by frame: float32 conversion, bilinear resize (half-pixel
        sampling as ``F.interpolate(align_corners=False)``; OpenCV rounds its interpolation weights, so values
        differ by up to ~0.006 on 0..255 at 360x480 -> 352x480, 0.04 at 1080x1920 -> 416x736, 0.1 at widths near
        5000 (2e-4 after normalisation at camera sizes); bilinear without antialiasing, as training and
        icnet-eval), then ``x * scale + shift`` per channel, written straight into the backend's layout.
        540x720 -> 544x736 on one thread: ~1.5 ms (channels_last) against 10-20 ms for the torch ops."""
        if order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {order!r}")
        follow_torch_threads()
        h, w = net_size
        n = frames.shape[0]
        flip = order != self.normalizer.channel_order  # frames flipped to the model's order, then its mean/std
        scale, shift = (t.view(3).numpy() for t in self.normalizer.scale_shift(
            torch.device("cpu"), torch.float32, self.normalizer.channel_order))
        scale4, shift4 = (*map(float, scale), 0.0), (*map(float, shift), 0.0)
        nhwc = self.memory_format == torch.channels_last
        out = np.empty((n, h, w, 3) if nhwc else (n, 3, h, w), np.float32)
        for i, f in enumerate(frames.numpy()):
            x = f.astype(np.float32)
            if x.shape[2] == 1:
                x = cv2.cvtColor(x, cv2.COLOR_GRAY2RGB)
            if x.shape[:2] != (h, w):
                x = cv2.resize(x, (w, h), interpolation=cv2.INTER_LINEAR)
            if flip:  # x is this call's own float copy: swapped in place (x[:, :, ::-1] made a strided copy)
                x = cv2.cvtColor(x, cv2.COLOR_BGR2RGB, dst=x)
            if nhwc:  # OpenCV's per-channel scalars (numpy's broadcast over a last axis of 3 is ~5x slower)
                cv2.multiply(x, scale4, dst=out[i])
                cv2.add(out[i], shift4, dst=out[i])
            else:
                for k in range(3):
                    np.multiply(x[:, :, k], scale[k], out=out[i, k])
                    out[i, k] += shift[k]
        t = torch.from_numpy(out)
        if nhwc:
            t = t.permute(0, 3, 1, 2)  # NCHW with channels_last strides, no copy
        return t if self.dtype == torch.float32 else t.to(dtype=self.dtype, memory_format=self.memory_format)


def from_numpy(a: Any) -> Tensor:
    """torch.from_numpy that accepts read-only arrays (ROS message buffers): the tensor is never written."""
    import warnings

    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)
