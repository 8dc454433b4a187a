"""Training augmentations on (image, label) pairs: identical geometry for both, nearest-neighbour for labels.

Images are H x W x 3 uint8 arrays (RGB), labels H x W uint8 arrays of train ids (255 = ignore). Every transform
takes the pair and a :class:`numpy.random.Generator`; the dataset derives that generator from a per-sample seed
chosen by the sampler, so augmentation is reproducible regardless of the number of DataLoader workers and is
replayed exactly when a run is resumed.

The pipeline follows the usual semantic-segmentation recipe (as in MMSegmentation): random resize over a ratio
range, random crop that caps the share of a single class, horizontal flip, photometric distortion.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import cv2
import numpy as np

from ..classes import IGNORE_INDEX

Pair = tuple[np.ndarray, np.ndarray]
#: the most pixels :class:`RandomResize` makes of one frame: 4x the image files' own bound (50 megapixels; a
#: 4000x3200 frame at x2 is 51 Mpx and trains in 0.6 GB). The training config is checked against it on its first
#: frame (a typo such as data.ratio_range=[0.5, 20] asked for tens of GB); a larger frame later in the dataset is
#: resized by less, to this many pixels
MAX_RESIZED_PIXELS = 200_000_000


class Transform(Protocol):
    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Pair: ...


def resize_pair(image: np.ndarray, label: np.ndarray, size: tuple[int, int]) -> Pair:
    """Resize to ``size`` = (H, W): bilinear for the image (as the evaluator and the node resize frames), nearest
    for the label, both with pixel centres aligned: each label pixel takes the source pixel under its centre
    (``INTER_NEAREST_EXACT``). OpenCV's ``INTER_NEAREST`` takes the one under its top-left corner, which moves the
    labels up to a source pixel up and left of the bilinear image (1.3% of CamVid's label pixels at x1.5, 3.4% at
    x0.5) and drops one-pixel structures such as poles that the image keeps."""
    h, w = size
    if (h, w) == image.shape[:2]:
        return image, label
    return (cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR),
            cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST_EXACT))


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Pair:
        for t in self.transforms:
            image, label = t(image, label, rng)
        return image, label

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomResize:
    """Resize by ``scale`` x a ratio drawn uniformly from ``ratio_range`` (aspect ratio kept), to at most
    :data:`MAX_RESIZED_PIXELS` pixels (a frame that the ratio would take above it is resized to that many).

    ``scale`` is the fixed input scale of the dataset (e.g. 2.0 to train CamVid at twice its native size);
    ``base_size``, when given, replaces ``scale``: the image is scaled (aspect ratio kept) so that its long side
    fits the larger and its short side the smaller of the two numbers, whatever its orientation (mmseg's rule: a
    portrait frame with base_size (512, 1024) comes out 1024 x 512).
    """

    def __init__(self, ratio_range: tuple[float, float] = (0.5, 2.0), scale: float = 1.0,
                 base_size: tuple[int, int] | None = None) -> None:
        lo, hi = float(ratio_range[0]), float(ratio_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {ratio_range!r}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.ratio_range = (lo, hi)
        self.scale = float(scale)
        self.base_size = tuple(base_size) if base_size else None

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Pair:
        h, w = image.shape[:2]
        base = base_scale(h, w, self.scale, self.base_size)
        lo, hi = self.ratio_range
        ratio = base * (float(rng.uniform(lo, hi)) if hi > lo else lo)
        # bounded per frame: the config check sees the first frame only, and a 50-megapixel one further on took
        # gigabytes per worker at the largest ratio
        ratio = min(ratio, math.sqrt(MAX_RESIZED_PIXELS / (h * w)))
        return resize_pair(image, label, (max(1, round(h * ratio)), max(1, round(w * ratio))))

    def __repr__(self) -> str:
        return f"RandomResize(ratio_range={self.ratio_range}, scale={self.scale}, base_size={self.base_size})"


def base_scale(h: int, w: int, scale: float = 1.0, base_size: tuple[int, int] | None = None) -> float:
    """The factor that maps an H x W image to the dataset's working resolution (see :class:`RandomResize`)."""
    if base_size:
        long_side, short_side = max(base_size), min(base_size)
        return min(long_side / max(h, w), short_side / min(h, w))
    return scale


class RandomCrop:
    """Crop ``crop_size`` = (H, W) at a random position, retrying (up to ``max_tries``) while one class covers
    more than ``cat_max_ratio`` of the labelled pixels. Images smaller than the crop are padded at the bottom /
    right: the image with ``pad_value`` (use the normalisation mean so padding normalises to ~0), the label with
    ``ignore_index``."""

    def __init__(self, crop_size: tuple[int, int], cat_max_ratio: float = 0.75, max_tries: int = 10,
                 pad_value: Sequence[float] = (0, 0, 0), ignore_index: int = IGNORE_INDEX) -> None:
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise ValueError(f"crop_size must be (H, W) with positive sides, got {crop_size!r}")
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.max_tries = int(max_tries)
        self.pad_value = tuple(int(round(v)) for v in pad_value)
        self.ignore_index = ignore_index

    def _window(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
        ch, cw = self.crop_size
        return int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1))

    def _acceptable(self, label: np.ndarray) -> bool:
        """At least two classes, none above ``cat_max_ratio`` of the labelled pixels (as mmseg's RandomCrop); a
        window without labelled pixels is not (it was accepted at once, ending the search: on a label 60% void,
        3 crops in 4 carried no loss)."""
        counts = np.bincount(label.ravel(), minlength=256)
        counts[self.ignore_index] = 0
        return np.count_nonzero(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum()

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Pair:
        ch, cw = self.crop_size
        h, w = image.shape[:2]
        y, x = self._window(h, w, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries - 1):
                if self._acceptable(label[y:y + ch, x:x + cw]):
                    break
                y, x = self._window(h, w, rng)
        image, label = image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
        ph, pw = ch - image.shape[0], cw - image.shape[1]
        if ph > 0 or pw > 0:
            image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=self.pad_value)
            label = cv2.copyMakeBorder(label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=self.ignore_index)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)

    def __repr__(self) -> str:
        return f"RandomCrop(crop_size={self.crop_size}, cat_max_ratio={self.cat_max_ratio})"


class RandomFlip:
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5) -> None:
        if not 0 <= prob <= 1:
            raise ValueError(f"flip probability must be in [0, 1], got {prob}")
        self.prob = float(prob)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Pair:
        if self.prob > 0 and rng.random() < self.prob:
            return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label[:, ::-1])
        return image, label

    def __repr__(self) -> str:
        return f"RandomFlip(prob={self.prob})"


class PhotoMetricDistortion:
    """Random brightness, contrast, saturation and hue changes, each applied with probability 0.5; contrast comes
    either before or after the HSV changes. Labels are untouched.

    Two differences from mmseg's PhotoMetricDistortion, kept because the shipped models were trained and selected
    with them: ``hue_delta`` is in degrees (the default 18 shifts hue by up to +-18 degrees; mmseg's 18 is in
    OpenCV's half-degree units, +-36 degrees), and it runs after :class:`RandomCrop`'s padding, so the padded
    border (the normalisation mean) is shifted with the image (mmseg pads after normalising: exactly 0). The
    brightness step clips to 0..255 as mmseg's does (since 2026-12-07; the shipped models were trained without that
    clip: a pixel at 250 brightened by 30, then contrast x0.6, became 168 instead of 153)."""

    def __init__(self, brightness_delta: float = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: float = 18) -> None:
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = float(hue_delta)

    def _contrast(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < 0.5:
            img *= rng.uniform(*self.contrast_range)
        return img

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Pair:
        img = image.astype(np.float32)
        if rng.random() < 0.5:  # clipped at once, as mmseg's: a pixel brightened past 255 is 255 for the contrast
            img = np.clip(img + rng.uniform(-self.brightness_delta, self.brightness_delta), 0, 255)
        contrast_first = rng.random() < 0.5
        if contrast_first:
            img = self._contrast(img, rng)
        do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
        if do_sat or do_hue:
            # float HSV: H in degrees [0, 360), S in [0, 1], V on the input's scale
            hsv = cv2.cvtColor(np.clip(img, 0, 255) / 255.0, cv2.COLOR_RGB2HSV)
            if do_sat:
                hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*self.saturation_range), 0, 1)
            if do_hue:
                hsv[..., 0] = (hsv[..., 0] + rng.uniform(-self.hue_delta, self.hue_delta)) % 360.0
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0
        if not contrast_first:
            img = self._contrast(img, rng)
        return np.clip(img, 0, 255).round().astype(np.uint8), label

    def __repr__(self) -> str:
        return (f"PhotoMetricDistortion(brightness_delta={self.brightness_delta}, contrast={self.contrast_range}, "
                f"saturation={self.saturation_range}, hue_delta={self.hue_delta})")


class Resize:
    """Deterministic resize by the dataset's input scale (or into ``base_size``); for evaluation-style inputs."""

    def __init__(self, scale: float = 1.0, base_size: tuple[int, int] | None = None) -> None:
        self.scale = float(scale)
        self.base_size = tuple(base_size) if base_size else None

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Pair:
        h, w = image.shape[:2]
        s = base_scale(h, w, self.scale, self.base_size)
        if s == 1.0:
            return image, label
        return resize_pair(image, label, (max(1, round(h * s)), max(1, round(w * s))))


def train_transforms(crop_size: tuple[int, int], ratio_range: tuple[float, float] = (0.5, 2.0),
                     scale: float = 1.0, base_size: tuple[int, int] | None = None, cat_max_ratio: float = 0.75,
                     flip_prob: float = 0.5, photometric: bool = True, pad_value: Sequence[float] = (0, 0, 0),
                     ignore_index: int = IGNORE_INDEX) -> Compose:
    """The standard training pipeline: random resize, class-capped random crop, flip, photometric distortion."""
    steps: list[Transform] = [RandomResize(ratio_range, scale, base_size),
                              RandomCrop(crop_size, cat_max_ratio, pad_value=pad_value, ignore_index=ignore_index)]
    if flip_prob > 0:
        steps.append(RandomFlip(flip_prob))
    if photometric:
        steps.append(PhotoMetricDistortion())
    return Compose(steps)


__all__ = ["Compose", "PhotoMetricDistortion", "RandomCrop", "RandomFlip", "RandomResize", "Resize", "base_scale",
           "resize_pair", "train_transforms"]
