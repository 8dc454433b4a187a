"""ICNet architecture: shapes at many sizes, train vs eval outputs, presets, width multiplier, config errors."""
import pytest
import torch
import torch.nn.functional as F

from icnet_ros.models import MODEL_CONFIGS, CascadeLogits, ICNetConfig, build_icnet, count_parameters
from icnet_ros.models.resnet import ResNetV1c


@pytest.fixture(scope="module")
def r18_small():
    torch.manual_seed(0)
    return build_icnet("icnet_r18", width=0.25, num_classes=11).eval()


@pytest.mark.parametrize("size", [(64, 64), (65, 97), (360, 480), (513, 1023)])
def test_eval_output_is_main_logits_at_one_eighth(r18_small, size):
    h, w = size
    with torch.inference_mode():
        y = r18_small(torch.randn(1, 3, h, w))
    assert isinstance(y, torch.Tensor)
    assert y.shape == (1, 11, -(-h // 8), -(-w // 8))
    assert torch.isfinite(y).all()


@pytest.mark.slow
def test_full_resolution_odd_size_r18():
    model = build_icnet("icnet_r18", width=0.5, num_classes=19).eval()
    with torch.inference_mode():
        y = model(torch.randn(1, 3, 1025, 2049))
    assert y.shape == (1, 19, 129, 257)


def test_train_mode_returns_three_branch_logits(r18_small):
    r18_small.train()
    try:
        out = r18_small(torch.randn(2, 3, 128, 160))
    finally:
        r18_small.eval()
    assert isinstance(out, CascadeLogits)
    assert out.main.shape == (2, 11, 16, 20)
    assert out.sub12.shape == (2, 11, 16, 20)  # 1/8
    assert out.sub24.shape == (2, 11, 9, 11)  # ~1/16 (ceil-mode max pool: 32 -> 17 -> 9)
    loss = sum(t.mean() for t in out)
    loss.backward()  # every branch is differentiable
    assert r18_small.auxiliary_head[0].conv_seg.weight.grad is not None
    r18_small.zero_grad(set_to_none=True)


def test_model_without_aux_heads_returns_none_branches():
    model = build_icnet("icnet_r18", width=0.25, num_classes=3, aux_heads=False).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.sub24 is None and out.sub12 is None and out.main.shape == (2, 3, 8, 8)
    assert not any(k.startswith("auxiliary_head") for k in model.state_dict())


@pytest.mark.parametrize("shape", [(1, 3, 63, 128), (1, 3, 128, 40), (1, 1, 128, 128), (3, 128, 128)])
def test_bad_input_shapes_raise_clear_errors(r18_small, shape):
    with pytest.raises(ValueError, match="ICNet"):
        r18_small(torch.randn(*shape))


def test_mmseg_entry_and_parameter_counts():
    # spec section 2: entry counts R18 240, R50 438, R101 744; 25.2M / 47.8M / 66.8M parameters with aux heads
    expected = {"icnet_r18": (240, 25.2), "icnet_r50": (438, 47.8), "icnet_r101": (744, 66.8)}
    for name, (entries, params) in expected.items():
        model = build_icnet(name)
        assert len(model.state_dict()) == entries
        assert count_parameters(model) / 1e6 == pytest.approx(params, abs=0.05)


def test_paper_compressed_model_size():
    # ResNet-50 at half width with the paper's sum-PPM, CFF and classifier: the paper's ~6.7M-parameter model
    model = build_icnet("icnet_r50_half")
    assert 6.0e6 < count_parameters(model) < 7.0e6
    assert model.config.width == 0.5 and model.config.ppm == "sum" and model.config.cff == "paper"
    assert model.config.head == "paper" and model.config.output_stride == 4


@pytest.mark.parametrize("size", [(64, 64), (97, 131), (160, 224)])
def test_paper_head_classifies_at_a_quarter(size):
    """The official release's classifier (spec section 1): the 1/8 fusion upsampled x2, then a 1x1 classifier with
    bias, at 1/4 (the FCN head has a 3x3 conv-BN-ReLU and classifies at 1/8). logits_size says which size every
    backend's output buffer must have; training's auxiliary outputs stay at 1/16 and 1/8."""
    from icnet_ros.models.icnet import PaperHead

    torch.manual_seed(0)
    fcn = build_icnet("icnet_r18", width=0.25, num_classes=5).eval()
    paper = build_icnet("icnet_r18", width=0.25, num_classes=5, head="paper").eval()
    assert isinstance(paper.decode_head, PaperHead) and not hasattr(paper.decode_head, "convs")
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        a, b = fcn(x), paper(x)
    h8, w8 = -(-size[0] // 8), -(-size[1] // 8)
    assert a.shape == (2, 5, h8, w8) and fcn.config.logits_size(*size) == (h8, w8)
    assert b.shape == (2, 5, 2 * h8, 2 * w8) and paper.config.logits_size(*size) == (2 * h8, 2 * w8)
    # the head is exactly: bilinear x2 of the neck's 1/8 output, then conv_seg
    with torch.no_grad():
        neck = paper.neck(*paper.backbone(x))[2]
        expected = paper.decode_head.conv_seg(F.interpolate(neck, scale_factor=2.0, mode="bilinear",
                                                            align_corners=False))
    torch.testing.assert_close(b, expected)
    paper.train()
    out = paper(x)
    assert out.main.shape[2:] == (2 * h8, 2 * w8) and out.sub12.shape[2:] == (h8, w8)
    sum(t.mean() for t in out).backward()
    assert paper.decode_head.conv_seg.weight.grad is not None
    with pytest.raises(ValueError, match="head must be one of"):
        build_icnet("icnet_r18", head="deeplab")
    # an FCN model's architecture record has no 'head' (releases before it refuse unknown fields)
    assert "head" not in fcn.config.to_dict() and paper.config.to_dict()["head"] == "paper"
    assert ICNetConfig.from_dict(fcn.config.to_dict()) == fcn.config


def test_width_multiplier_scales_channels():
    full, half = build_icnet("icnet_r50"), build_icnet("icnet_r50", width=0.5)
    assert full.backbone.backbone.low_channels == 2048 and half.backbone.backbone.low_channels == 1024
    assert half.neck.cff_12.conv_low.conv.out_channels == 64
    assert 3.5 < count_parameters(full) / count_parameters(half) < 4.5


def test_resnet_dilation_layout():
    r = ResNetV1c(50)
    # contract dilation: first block of stage 3 dilation 1, rest 2; stage 4 first 2, rest 4; strides only in stage 2
    assert r.layer3[0].conv2.dilation == (1, 1) and r.layer3[1].conv2.dilation == (2, 2)
    assert r.layer4[0].conv2.dilation == (2, 2) and r.layer4[2].conv2.dilation == (4, 4)
    assert r.layer2[0].conv2.stride == (2, 2) and r.layer3[0].conv2.stride == (1, 1)
    assert r.maxpool.ceil_mode
    x = torch.randn(1, 3, 240, 480)
    med, low = r.eval()(x)
    assert med.shape[2:] == (31, 61) and low.shape[2:] == (15, 30)  # ceil-mode pool: 120 -> 61


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 0}, "num_classes"), ({"num_classes": 256}, "num_classes"), ({"width": 0}, "width"),
    ({"ppm": "max"}, "ppm"), ({"cff": "x"}, "cff"), ({"backbone": "resnet42"}, "unknown backbone"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ICNetConfig(**kwargs)


def test_config_dict_round_trip_and_unknown_fields():
    for cfg in MODEL_CONFIGS.values():
        assert ICNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ICNet architecture fields"):
        ICNetConfig.from_dict({"backbone": "resnet18", "depth": 18})
    with pytest.raises(ValueError, match="unknown ICNet preset"):
        build_icnet("icnet_r999")


@pytest.mark.parametrize("style", ["paper", "mmseg"])
def test_cascade_feature_fusion_branches_by_style(style):
    """The paper's CFF: 3x3 dilation-2 conv + BN on the upsampled low map and 1x1 conv + BN on the high map, no
    ReLU on either branch, then sum and ReLU; mmseg's puts a ReLU on each branch. The projected low map (which
    feeds an auxiliary head) is returned as the branch gives it."""
    from icnet_ros.models.icnet import CascadeFeatureFusion
    torch.manual_seed(0)
    cff = CascadeFeatureFusion(6, 5, 8, style=style).eval()
    for bn in (cff.conv_low.bn, cff.conv_high.bn):  # statistics that make half the outputs negative
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    low, high = torch.randn(2, 6, 5, 7), torch.randn(2, 5, 10, 13)
    with torch.no_grad():
        fused, x_low = cff(low, high)
        up = F.interpolate(low, size=(10, 13), mode="bilinear", align_corners=False)
        low_branch = cff.conv_low.bn(F.conv2d(up, cff.conv_low.conv.weight, padding=2, dilation=2))
        high_branch = cff.conv_high.bn(F.conv2d(high, cff.conv_high.conv.weight))
    if style == "mmseg":
        low_branch, high_branch = low_branch.relu(), high_branch.relu()
    else:
        assert (x_low < 0).any()  # no ReLU: the auxiliary head sees the signed projection
    torch.testing.assert_close(x_low, low_branch)
    torch.testing.assert_close(fused, (low_branch + high_branch).relu())


def test_heads_dropout_layout():
    """No dropout before the main classifier; ``aux_dropout`` before each auxiliary classifier."""
    model = build_icnet("icnet_r18", width=0.25, num_classes=5, aux_dropout=0.2)
    assert isinstance(model.decode_head.dropout, torch.nn.Identity)
    for head in model.auxiliary_head:
        assert isinstance(head.dropout, torch.nn.Dropout2d) and head.dropout.p == 0.2
