"""ICNet (Zhao et al., ECCV 2018): image cascade network, split into backbone / neck / heads.

Module and parameter names follow MMSegmentation 1.2.2's ICNet (``backbone.backbone.*``, ``backbone.psp_modules``,
``neck.cff_24``, ``decode_head``, ``auxiliary_head.{0,1}``), so its checkpoints load one to one. The spec this code
implements is ``shared/ICNET.md`` of the project; its section 2 describes the data flow:

- sub1 (high branch): three 3x3 stride-2 conv-BN-ReLU on the full image -> 1/8.
- encoder (pluggable, :class:`~icnet_ros.models.resnet.CascadeEncoder`) on the image at 1/2 -> the medium feature
  (1/16, through ``conv_sub2``) and the low feature (1/32, through pyramid pooling and ``conv_sub4``).
- neck: two cascade feature fusion (CFF) units, 1/32 + 1/16 -> 1/16, then + 1/8 -> 1/8.
- heads: FCN decode head on the finest fusion (or the paper's classifier at 1/4); two auxiliary heads (cascade label
  guidance) in training.

``width`` scales every channel count (1.0 = MMSegmentation-compatible, 0.5 = the paper's compressed model, whose
preset ``icnet_r50_half`` also takes the paper's pooling, fusion and classifier: ``head="paper"``, x2 upsample and a
1x1 classifier at 1/4, instead of the FCN head at 1/8).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..profiling import stage

from .resnet import RESNET_SPECS, ResNetV1c, init_weights, scale_channels

MIN_INPUT_SIZE = 64
PPM_STYLES = ("concat", "sum")
CFF_STYLES = ("mmseg", "paper")
HEAD_STYLES = ("fcn", "paper")


@dataclass(frozen=True)
class ICNetConfig:
    """Architecture of an ICNet; stored in every native checkpoint (``meta["arch"]``)."""

    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 | efficientnet_lite{0,1,2}
    num_classes: int = 19
    width: float = 1.0
    ppm: str = "concat"  # "concat": MMSegmentation (concat + 3x3 conv); "sum": paper (sum + 1x1 conv)
    cff: str = "mmseg"  # "mmseg": both CFF convs conv-BN-ReLU; "paper": conv-BN only, ReLU after the sum
    aux_heads: bool = True  # the two cascade-label-guidance heads (training only; may be dropped for deployment)
    aux_dropout: float = 0.1
    head: str = "fcn"  # "fcn": MMSegmentation (3x3 conv-BN-ReLU + 1x1 classifier at 1/8); "paper": x2 upsample,
    #                    1x1 classifier at 1/4 (the official release's conv6_cls)

    def __post_init__(self) -> None:  # also the check of a checkpoint's metadata: every value is typed here
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) \
                or not 1 <= self.num_classes <= 255:
            raise ValueError(f"num_classes must be an integer in 1..255 (labels are uint8), got {self.num_classes!r}")
        if isinstance(self.width, bool) or not isinstance(self.width, (int, float)) or not 0.0 < self.width <= 4.0:
            raise ValueError(f"width must be in (0, 4], got {self.width!r}")
        if isinstance(self.aux_dropout, bool) or not isinstance(self.aux_dropout, (int, float)) \
                or not 0.0 <= self.aux_dropout < 1.0:
            raise ValueError(f"aux_dropout must be in [0, 1), got {self.aux_dropout!r}")
        if not isinstance(self.aux_heads, bool):
            raise ValueError(f"aux_heads must be true or false, got {self.aux_heads!r}")
        if self.ppm not in PPM_STYLES:
            raise ValueError(f"ppm must be one of {PPM_STYLES}, got {self.ppm!r}")
        if self.cff not in CFF_STYLES:
            raise ValueError(f"cff must be one of {CFF_STYLES}, got {self.cff!r}")
        if self.head not in HEAD_STYLES:
            raise ValueError(f"head must be one of {HEAD_STYLES}, got {self.head!r}")
        if not isinstance(self.backbone, str) or not (_is_resnet(self.backbone) or self.backbone in (
                "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")):
            raise ValueError(f"unknown backbone {self.backbone!r}: expected resnet{{{','.join(map(str, RESNET_SPECS))}}}"
                             " or efficientnet_lite{0,1,2}")

    @property
    def output_stride(self) -> int:
        """How many input pixels one logit covers per side: 8 (FCN head), 4 (paper head)."""
        return 4 if self.head == "paper" else 8

    def logits_size(self, height: int, width: int) -> tuple[int, int]:
        """The main logits' (H, W) for a network input of ``height`` x ``width``: ceil(H/8) x ceil(W/8) at 1/8,
        twice that with the paper head (its x2 upsample of the 1/8 map)."""
        h, w = -(-int(height) // 8), -(-int(width) // 8)
        return (2 * h, 2 * w) if self.head == "paper" else (h, w)

    def to_dict(self) -> dict[str, Any]:
        """The architecture record stored in checkpoints and exports. ``head`` is left out when it is the default
        ("fcn"): releases before the paper head refuse unknown fields, so an FCN model's files stay readable
        there."""
        d = asdict(self)
        if d["head"] == "fcn":
            del d["head"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ICNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ICNet architecture fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def _is_resnet(name: str) -> bool:
    return name.startswith("resnet") and name[6:].isdigit() and int(name[6:]) in RESNET_SPECS


# Named architectures (timm-style): the mmseg-compatible models and a half-width model with the paper's fusion.
MODEL_CONFIGS: dict[str, ICNetConfig] = {
    "icnet_r18": ICNetConfig(backbone="resnet18"),
    "icnet_r50": ICNetConfig(backbone="resnet50"),
    "icnet_r101": ICNetConfig(backbone="resnet101"),
    # the paper's compressed model: ResNet-50 with every layer at half width, the paper's sum-PPM, CFF and classifier
    "icnet_r50_half": ICNetConfig(backbone="resnet50", width=0.5, ppm="sum", cff="paper", head="paper"),
}


class ConvBNReLU(nn.Module):
    """Conv (no bias) + BN + optional ReLU; attribute names match mmcv's ConvModule (``conv``, ``bn``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1, stride: int = 1, dilation: int = 1,
                 relu: bool = True) -> None:
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class PyramidPooling(nn.Module):
    """Pyramid pooling over the low-branch feature, scales (1, 2, 3, 6).

    ``concat``: each scale is avg-pooled, projected by 1x1 conv-BN-ReLU, resized back; [p1, p2, p3, p6, x] is
    concatenated and fused by a 3x3 conv-BN-ReLU (``psp_bottleneck``). ``sum``: the pooled maps are resized back
    and summed with x, then a 1x1 conv-BN-ReLU.
    """

    def __init__(self, cin: int, cout: int, style: str = "concat", scales: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.style = style
        self.scales = scales
        if style == "concat":
            self.psp_modules = nn.ModuleList(
                nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(cin, cout, 1)) for s in scales)
            self.psp_bottleneck = ConvBNReLU(cin + len(scales) * cout, cout, 3)
        else:
            self.psp_modules = nn.ModuleList()
            self.psp_bottleneck = ConvBNReLU(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[2:]
        if self.style == "concat":
            outs = [F.interpolate(m(x), size=size, mode="bilinear", align_corners=False) for m in self.psp_modules]
            return self.psp_bottleneck(torch.cat(outs + [x], dim=1))
        out = x
        for s in self.scales:
            out = out + F.interpolate(F.adaptive_avg_pool2d(x, s), size=size, mode="bilinear", align_corners=False)
        return self.psp_bottleneck(out)


class ICNetBackbone(nn.Module):
    """The three input branches: sub1 (full image), sub2 (1/2 image) and sub4 (low branch + pyramid pooling).

    Returns (sub1 at 1/8, sub2 at ~1/16, sub4 at ~1/32). Named ``backbone`` inside :class:`ICNet` (as in mmseg),
    with the cascade encoder as ``backbone.backbone``. mmseg's ``backbone.psp_*`` keys live under ``backbone.ppm``.
    """

    def __init__(self, encoder: nn.Module, width: float = 1.0, ppm: str = "concat") -> None:
        super().__init__()
        c = lambda n: scale_channels(n, width)  # noqa: E731
        self.backbone = encoder
        self.conv_sub1 = nn.Sequential(
            ConvBNReLU(3, c(32), 3, stride=2), ConvBNReLU(c(32), c(32), 3, stride=2),
            ConvBNReLU(c(32), c(64), 3, stride=2))
        self.conv_sub2 = ConvBNReLU(encoder.medium_channels, c(256), 1)
        self.ppm = PyramidPooling(encoder.low_channels, c(512), style=ppm)
        self.conv_sub4 = ConvBNReLU(c(512), c(256), 1)
        self.out_channels = (c(64), c(256), c(256))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with stage("high branch (sub1)"):
            sub1 = self.conv_sub1(x)
        x_half = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        medium, low = self.backbone(x_half)  # ranges "medium branch (sub2)" and "low branch (sub4)" inside
        with stage("medium branch (sub2)"):
            sub2 = self.conv_sub2(medium)
        with stage("pyramid pooling"):
            sub4 = self.conv_sub4(self.ppm(low))
        return sub1, sub2, sub4


class CascadeFeatureFusion(nn.Module):
    """CFF(low, high): upsample low to high's size, 3x3 dilation-2 conv + BN (+ReLU in mmseg style); 1x1 conv + BN
    (+ReLU) on high; sum; ReLU. Also returns the projected low map, which feeds an auxiliary head."""

    def __init__(self, low_channels: int, high_channels: int, out_channels: int, style: str = "mmseg") -> None:
        super().__init__()
        branch_relu = style == "mmseg"
        self.conv_low = ConvBNReLU(low_channels, out_channels, 3, dilation=2, relu=branch_relu)
        self.conv_high = ConvBNReLU(high_channels, out_channels, 1, relu=branch_relu)

    def forward(self, x_low: Tensor, x_high: Tensor) -> tuple[Tensor, Tensor]:
        x_low = F.interpolate(x_low, size=x_high.shape[2:], mode="bilinear", align_corners=False)
        x_low = self.conv_low(x_low)
        return F.relu(x_low + self.conv_high(x_high)), x_low


class ICNeck(nn.Module):
    """Two CFF units: (sub4, sub2) -> 1/16, then (that, sub1) -> 1/8. Returns (x_24, x_12, x_cff_12)."""

    def __init__(self, in_channels: tuple[int, int, int], out_channels: int, style: str = "mmseg") -> None:
        super().__init__()
        c1, c2, c4 = in_channels
        self.cff_24 = CascadeFeatureFusion(c4, c2, out_channels, style)
        self.cff_12 = CascadeFeatureFusion(out_channels, c1, out_channels, style)

    def forward(self, sub1: Tensor, sub2: Tensor, sub4: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_cff_24, x_24 = self.cff_24(sub4, sub2)
        x_cff_12, x_12 = self.cff_12(x_cff_24, sub1)
        return x_24, x_12, x_cff_12


class FCNHead(nn.Module):
    """3x3 conv-BN-ReLU then a 1x1 classifier with bias (``conv_seg``); optional dropout before it."""

    def __init__(self, cin: int, channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.convs = nn.Sequential(ConvBNReLU(cin, channels, 3))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class PaperHead(nn.Module):
    """The official release's classifier: the 1/8 fusion upsampled x2 (bilinear), then a 1x1 classifier with bias
    (``conv_seg``) at 1/4; the logits are upsampled to the input size afterwards, as every head's are."""

    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_seg(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))


class CascadeLogits(NamedTuple):
    """Training-mode output of :class:`ICNet`, for cascade label guidance. All logits are unnormalised.

    ``main``: finest prediction (1/8; 1/4 with the paper head); ``sub24``: from the 1/32+1/16 fusion (1/16);
    ``sub12``: from the 1/16+1/8 fusion's low path (1/8). ``sub24``/``sub12`` are None for a model built without
    auxiliary heads.
    """

    main: Tensor
    sub24: Tensor | None
    sub12: Tensor | None


class ICNet(nn.Module):
    """ICNet. In eval mode ``model(x)`` returns the main logits, N x classes x ceil(H/8) x ceil(W/8) (twice that
    with the paper head: :meth:`ICNetConfig.logits_size`); in training mode a :class:`CascadeLogits`. ``x`` is a
    normalised N x 3 x H x W float tensor, H and W >= 64."""

    def __init__(self, config: ICNetConfig, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        w = config.width
        if encoder is None:
            encoder = build_encoder(config.backbone, w)
        self.backbone = ICNetBackbone(encoder, width=w, ppm=config.ppm)
        neck_channels = scale_channels(128, w)
        self.neck = ICNeck(self.backbone.out_channels, neck_channels, style=config.cff)
        self.decode_head: nn.Module = (PaperHead(neck_channels, config.num_classes) if config.head == "paper"
                                       else FCNHead(neck_channels, neck_channels, config.num_classes))
        self.auxiliary_head: nn.ModuleList | None = None
        if config.aux_heads:
            self.auxiliary_head = nn.ModuleList(
                FCNHead(neck_channels, neck_channels, config.num_classes, config.aux_dropout) for _ in range(2))
        self.meta: dict[str, Any] = {}

    def forward(self, x: Tensor) -> Tensor | CascadeLogits:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"ICNet expects an N x 3 x H x W tensor, got shape {tuple(x.shape)}")
        if x.shape[2] < MIN_INPUT_SIZE or x.shape[3] < MIN_INPUT_SIZE:
            raise ValueError(f"ICNet needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} px, "
                             f"got {x.shape[2]}x{x.shape[3]}")
        sub1, sub2, sub4 = self.backbone(x)
        with stage("CFF"):
            x_24, x_12, x_cff_12 = self.neck(sub1, sub2, sub4)
        with stage("head"):
            main = self.decode_head(x_cff_12)
        if not self.training:
            return main
        if self.auxiliary_head is None:
            return CascadeLogits(main, None, None)
        return CascadeLogits(main, self.auxiliary_head[0](x_24), self.auxiliary_head[1](x_12))


def build_encoder(name: str, width: float = 1.0) -> nn.Module:
    """The cascade encoder named ``name`` (see :class:`ICNetConfig.backbone`)."""
    if _is_resnet(name):
        return ResNetV1c(depth=int(name[6:]), width=width)
    if name.startswith("efficientnet_lite"):
        from .efficientnet import efficientnet_lite_encoder  # lazy: optional backbone

        return efficientnet_lite_encoder(name, width=width)
    raise ValueError(f"unknown backbone {name!r}")


def build_icnet(arch: str | ICNetConfig | dict[str, Any] = "icnet_r50", **overrides: Any) -> ICNet:
    """Build a freshly initialised ICNet from a preset name (:data:`MODEL_CONFIGS`), a config or a dict.

    Keyword overrides replace config fields, e.g. ``build_icnet("icnet_r18", num_classes=11)``.
    """
    if isinstance(arch, str):
        if arch not in MODEL_CONFIGS:
            raise ValueError(f"unknown ICNet preset {arch!r}; known: {sorted(MODEL_CONFIGS)}")
        config = MODEL_CONFIGS[arch]
    elif isinstance(arch, dict):
        config = ICNetConfig.from_dict(arch)
    else:
        config = arch
    if overrides:
        config = ICNetConfig.from_dict({**config.to_dict(), **overrides})
    model = ICNet(config)
    init_weights(model)
    heads = [model.decode_head] + list(model.auxiliary_head or [])
    for head in heads:
        nn.init.normal_(head.conv_seg.weight, std=0.01)
        nn.init.zeros_(head.conv_seg.bias)
    return model


def count_parameters(model: nn.Module, include_aux: bool = True) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if include_aux or not n.startswith("auxiliary_head"))
