"""The MMSegmentation 1.2.2 ICNet, built as the reference for parity tests and speed comparisons.

Only for tests and ``icnet-bench --reference mmseg``; never needed at run time. Requires the ``test`` extra
(``mmsegmentation==1.2.2 mmengine mmcv-lite==2.1.0 ftfy regex``). mmcv-lite has no compiled ``mmcv.ops``, which mmseg
imports for heads ICNet does not use: :func:`import_mmseg` installs a stand-in module whose members raise if
ever called, so a silent fallback is impossible.
"""
from __future__ import annotations

import sys
import types
from typing import Any

from torch import nn


class MMSegUnavailable(ImportError):
    """mmsegmentation (the test extra) is not installed."""


def _stub_mmcv_ops() -> None:
    try:
        import mmcv.ops  # noqa: F401  (a full mmcv with compiled ops: use it)
        return
    except Exception:  # noqa: BLE001 - mmcv-lite: `mmcv._ext` is missing
        sys.modules.pop("mmcv.ops", None)

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"mmcv.ops.{name} is not available with mmcv-lite (stubbed by icnet_ros.reference)")

        return type(name, (), {"__init__": unavailable, "__call__": unavailable}) if name[0].isupper() else unavailable

    stub = types.ModuleType("mmcv.ops")
    stub.__getattr__ = __getattr__  # type: ignore[method-assign]
    stub.__icnet_ros_stub__ = True  # type: ignore[attr-defined]
    sys.modules["mmcv.ops"] = stub


def import_mmseg() -> Any:
    """Import mmseg with its models registered; raises :class:`MMSegUnavailable` with the install hint."""
    try:
        import mmcv  # noqa: F401
        _stub_mmcv_ops()
        import mmseg.models  # noqa: F401
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    except ImportError as e:
        raise MMSegUnavailable(f"the mmseg reference needs the test extra (pip install 'icnet_ros[test]'): {e}") from e
    register_all_modules(init_default_scope=True)
    return MODELS


def mmseg_icnet_config(depth: int = 50, num_classes: int = 19, width: float = 1.0) -> dict[str, Any]:
    """mmseg's ``configs/_base_/models/icnet_r50-d8.py`` with plain BN, for ResNetV1c-``depth`` at ``width``.

    mmseg has no width multiplier; ``width`` scales the same channel counts icnet_ros scales (ResNet base and stem
    channels, light branch, PPM, branch outputs, neck and heads), so width 0.5 with the ``concat`` PPM and mmseg CFF
    is the same network as ``build_icnet(f"icnet_r{depth}", width=0.5)``. mmseg derives the ResNet's stem and stage
    channels from one base count (half of it, doubling per stage) where icnet_ros rounds each to a multiple of 8:
    at widths where the two differ (0.6, 0.3, ...) there is no same-sized reference and ``ValueError`` is raised
    (0.25, 0.5, 0.75 and 1.0 match).
    """
    from .models.resnet import scale_channels

    c = lambda n: scale_channels(n, width)  # noqa: E731
    ours = [scale_channels(32, width)] + [scale_channels(64 * 2 ** i, width) for i in range(4)]
    theirs = [c(64) // 2] + [c(64) * 2 ** i for i in range(4)]
    if ours != theirs:
        raise ValueError(f"no mmseg reference of the same size at width {width:g}: mmseg's ResNet stem and stages "
                         f"would have {theirs} channels, this model's have {ours}")
    expansion = 1 if depth in (18, 34) else 4
    norm = dict(type="BN", requires_grad=True)
    head = lambda idx, dropout: dict(  # noqa: E731
        type="FCNHead", in_channels=c(128), channels=c(128), num_convs=1, in_index=idx, dropout_ratio=dropout,
        num_classes=num_classes, norm_cfg=norm, concat_input=False, align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0))
    return dict(
        type="EncoderDecoder",
        backbone=dict(
            type="ICNet",
            backbone_cfg=dict(type="ResNetV1c", in_channels=3, depth=depth, num_stages=4, out_indices=(0, 1, 2, 3),
                              dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), norm_cfg=norm, norm_eval=False,
                              style="pytorch", contract_dilation=True, stem_channels=c(64), base_channels=c(64)),
            in_channels=3, layer_channels=(c(128) * expansion, c(512) * expansion),
            light_branch_middle_channels=c(32), psp_out_channels=c(512), out_channels=(c(64), c(256), c(256)),
            norm_cfg=norm, align_corners=False),
        neck=dict(type="ICNeck", in_channels=(c(64), c(256), c(256)), out_channels=c(128), norm_cfg=norm,
                  align_corners=False),
        decode_head=dict(head(2, 0.0)),
        auxiliary_head=[head(0, 0.1), head(1, 0.1)],
        train_cfg=dict(), test_cfg=dict(mode="whole"))


def build_mmseg_icnet(depth: int = 50, num_classes: int = 19, width: float = 1.0) -> nn.Module:
    """mmseg's ICNet (an ``EncoderDecoder``) in eval mode; ``model._forward(x)`` returns its logits at 1/8."""
    models = import_mmseg()
    model = models.build(mmseg_icnet_config(depth, num_classes, width))  # PyTorch's default initialisation
    return model.eval()


def mmseg_logits(model: nn.Module, x: Any) -> Any:
    """The reference's main logits for a normalised N x 3 x H x W tensor (what ``ICNet.eval()(x)`` returns)."""
    return model.decode_head(model.extract_feat(x))
