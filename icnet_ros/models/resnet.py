"""ResNetV1c (deep stem, dilated "D8") as an ICNet cascade encoder.

Layer names follow MMSegmentation's ``ResNetV1c`` so that its checkpoints map one to one:
``stem.{0..8}``, ``layer{1..4}.{i}.conv{1,2,3}`` / ``bn{1,2,3}`` and ``layer{k}.0.downsample.{0,1}``.

Cascade encoder contract (see :class:`CascadeEncoder`): ``forward(x_half)`` takes the image at half input
resolution and returns ``(medium, low)``: the medium-branch feature (stride 8 of ``x_half``) and the low-branch
feature (stride 16 of ``x_half``), computed from the medium feature resized x0.5 (ICNet's low branch shares the
shallow layers with the medium branch).
"""
from __future__ import annotations

from typing import Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from ..profiling import stage


def scale_channels(channels: int, width: float) -> int:
    """Channels at a width multiplier: rounded to a multiple of 8 (never below 8), exact at width 1.0."""
    if width == 1.0:
        return channels
    return max(8, int(round(channels * width / 8.0)) * 8)


class CascadeEncoder(Protocol):
    """What ICNet needs from a backbone: the two feature maps that feed the medium and low branches."""

    medium_channels: int
    low_channels: int

    def __call__(self, x_half: Tensor) -> tuple[Tensor, Tensor]: ...


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; only the first is strided and dilated (MMSegmentation convention)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride and dilation here, "pytorch" style) -> 1x1 x4."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# depth -> (block, blocks per stage)
RESNET_SPECS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNetV1c(nn.Module):
    """Dilated ResNetV1c: deep 3-conv stem, ceil-mode max pool, strides (1,2,1,1), dilations (1,1,2,4),
    contract dilation (the first block of a dilated stage uses half the dilation)."""

    def __init__(self, depth: int = 50, width: float = 1.0,
                 strides: tuple[int, int, int, int] = (1, 2, 1, 1),
                 dilations: tuple[int, int, int, int] = (1, 1, 2, 4)) -> None:
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_SPECS)}, got {depth}")
        block, counts = RESNET_SPECS[depth]
        self.depth = depth
        self.width = width
        stem_half = scale_channels(32, width)
        stem_out = scale_channels(64, width)
        self.stem = nn.Sequential(
            conv3x3(3, stem_half, stride=2), nn.BatchNorm2d(stem_half), nn.ReLU(inplace=True),
            conv3x3(stem_half, stem_half), nn.BatchNorm2d(stem_half), nn.ReLU(inplace=True),
            conv3x3(stem_half, stem_out), nn.BatchNorm2d(stem_out), nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        cin = stem_out
        stage_out = []
        for i, (n, s, d) in enumerate(zip(counts, strides, dilations)):
            planes = scale_channels(64 * 2 ** i, width)
            layer, cin = self._make_layer(block, cin, planes, n, s, d)
            self.add_module(f"layer{i + 1}", layer)
            stage_out.append(cin)
        self.medium_channels = stage_out[1]
        self.low_channels = stage_out[3]

    @staticmethod
    def _make_layer(block: type[BasicBlock] | type[Bottleneck], cin: int, planes: int, blocks: int,
                    stride: int, dilation: int) -> tuple[nn.Sequential, int]:
        cout = planes * block.expansion
        downsample = None
        if stride != 1 or cin != cout:
            downsample = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
        first_dilation = dilation // 2 if dilation > 1 else dilation  # contract dilation
        layers = [block(cin, planes, stride, first_dilation, downsample)]
        layers += [block(cout, planes, 1, dilation) for _ in range(blocks - 1)]
        return nn.Sequential(*layers), cout

    def forward(self, x_half: Tensor) -> tuple[Tensor, Tensor]:
        with stage("medium branch (sub2)"):
            x = self.layer2(self.layer1(self.maxpool(self.stem(x_half))))
        with stage("low branch (sub4)"):
            low = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
            low = self.layer4(self.layer3(low))
        return x, low


def resnet_v1c(depth: int, width: float = 1.0) -> ResNetV1c:
    return ResNetV1c(depth=depth, width=width)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs, unit BN (used when training from scratch)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


__all__ = ["CascadeEncoder", "ResNetV1c", "BasicBlock", "Bottleneck", "resnet_v1c", "scale_channels",
           "init_weights"]
