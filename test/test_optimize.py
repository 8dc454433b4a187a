"""Inference optimisations: BN folding (exactness, coverage, safety), channels_last, agreement measures,
pyramid-pooling factorization (exactness, safety), torch.compile (slow) and the CUDA-graph runner's input checks."""
import copy

import pytest
import torch
from helpers import make_checkpoint
from torch import nn

from icnet_ros.checkpoint import load_model
from icnet_ros.models import build_icnet
from icnet_ros.optimize import (FOLD_RTOL, MIN_ARGMAX_AGREEMENT, CUDAGraphRunner, FactorizedPyramidPooling,
                                compare_logits, count_batchnorms, factorize_pyramid_pooling,
                                find_conv_bn_pairs, fold_batchnorm, fuse_conv_bn_, to_channels_last)


def _randomise_bn(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.3)
    return module


def test_fuse_conv_bn_single_pair():
    torch.manual_seed(0)
    for bias, groups in ((False, 1), (True, 1), (False, 4)):
        conv = nn.Conv2d(8, 12, 3, padding=2, dilation=2, bias=bias, groups=groups)
        bn = _randomise_bn(nn.BatchNorm2d(12, eps=1e-3)).eval()
        x = torch.randn(2, 8, 17, 23)
        with torch.no_grad():
            expected = bn(conv(x))
            fuse_conv_bn_(conv, bn)
            got = conv(x)
        assert conv.bias is not None
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["icnet_r18", "icnet_r50", "icnet_r50_half"])
def test_fold_icnet_matches_plain(tmp_path, arch):
    """Non-trivial BN statistics (make_checkpoint), odd input size: logits within FOLD_RTOL, argmax >= 99.9%."""
    plain = load_model(make_checkpoint(tmp_path / "m.safetensors", arch=arch, width=0.25), "cpu")
    folded = copy.deepcopy(plain)
    n_bn = count_batchnorms(plain)
    n = fold_batchnorm(folded, torch.randn(1, 3, 128, 128))
    aux_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.auxiliary_head.modules())
    assert n == n_bn - aux_bn  # every BN the eval forward uses is folded (aux heads do not run in eval)
    assert count_batchnorms(folded) == aux_bn
    x = torch.randn(2, 3, 100, 130)
    with torch.inference_mode():
        a = compare_logits(plain(x), folded(x))
    assert a.relative_diff <= FOLD_RTOL, str(a)
    assert a.argmax_agreement >= MIN_ARGMAX_AGREEMENT, str(a)
    assert a.ok()


def test_fold_does_not_touch_unpaired_bns():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_in = nn.BatchNorm2d(3)  # BN on the input: no conv before it
            self.shared = nn.Conv2d(3, 3, 1, bias=False)  # called twice: not foldable
            self.bn_a = nn.BatchNorm2d(3)
            self.bn_b = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            x = self.bn_in(x)
            x = self.bn_a(self.shared(x)) + self.bn_b(self.shared(x))
            return self.bn(self.conv(x))

    net = _randomise_bn(Net()).eval()
    assert find_conv_bn_pairs(net, torch.randn(1, 3, 8, 8)) == [("conv", "bn")]
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        expected = net(x)
    assert fold_batchnorm(net, torch.randn(1, 3, 8, 8)) == 1
    assert isinstance(net.bn, nn.Identity) and isinstance(net.bn_a, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


def test_fold_verification_restores_model_when_conv_output_is_reused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output also bypasses the BN: folding would be wrong

    net = _randomise_bn(Branchy()).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = net(x)
    with pytest.raises(RuntimeError, match="restored unfolded"):
        fold_batchnorm(net, x)
    assert isinstance(net.bn, nn.BatchNorm2d) and net.conv.bias is None
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected)



@pytest.mark.parametrize("wrap", ["tuple", "dict", "second_of_two"])
def test_fold_verification_covers_tuple_and_dict_outputs(wrap):
    """An encoder returns its feature maps as a tuple: the check compares every float tensor in the output (it
    compared only a bare tensor and silently passed a wrong fold otherwise)."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.other = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            bad = self.bn(y) + y  # the conv output also bypasses the BN: folding would be wrong
            if wrap == "tuple":
                return (bad,)
            if wrap == "dict":
                return {"out": bad, "n": 3}
            return self.other(x), bad

    net = _randomise_bn(Branchy()).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError, match="restored unfolded"):
        fold_batchnorm(net, torch.randn(1, 3, 16, 16))
    assert isinstance(net.bn, nn.BatchNorm2d)
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_fold_verification_needs_an_output_tensor():
    class Counts(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return int(self.bn(self.conv(x)).numel())

    net = Counts().eval()
    with pytest.raises(ValueError, match="verify=False"):
        fold_batchnorm(net, torch.randn(1, 3, 8, 8))
    assert isinstance(net.bn, nn.BatchNorm2d)
    assert fold_batchnorm(net, torch.randn(1, 3, 8, 8), verify=False) == 1

def test_channels_last_keeps_outputs():
    model = _randomise_bn(build_icnet("icnet_r18", width=0.25, num_classes=7, aux_heads=False)).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        expected = model(x)
        cl = to_channels_last(copy.deepcopy(model))
        got = cl(x.contiguous(memory_format=torch.channels_last))
    assert cl.backbone.conv_sub1[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    a = compare_logits(expected, got)
    assert a.relative_diff <= FOLD_RTOL and a.argmax_agreement >= MIN_ARGMAX_AGREEMENT


def test_compare_logits_measures():
    ref = torch.zeros(1, 3, 2, 2)
    ref[:, 0] = 1.0
    test = ref.clone()
    test[0, 1, 0, 0] = 2.0  # one pixel of four flips to class 1
    a = compare_logits(ref, test)
    assert a.max_abs_diff == 2.0 and a.max_abs_reference == 1.0 and a.argmax_agreement == 0.75
    assert not a.ok() and "75.000%" in str(a)
    with pytest.raises(ValueError, match="shapes differ"):
        compare_logits(ref, ref[:, :2])


def test_cuda_graph_runner_needs_cuda_tensors():
    with pytest.raises(ValueError, match="CUDA tensor"):
        CUDAGraphRunner(lambda x: x * 2, [torch.zeros(2)])


# ------------------------------------------------------------------------------ pyramid-pooling factorization
def _concat_ppm(cin=24, cout=8, seed=0):
    from icnet_ros.models.icnet import PyramidPooling

    torch.manual_seed(seed)
    ppm = _randomise_bn(PyramidPooling(cin, cout, style="concat"), seed).eval()
    with torch.no_grad():
        for m in ppm.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 0.2)
    return ppm


@pytest.mark.parametrize("size", [(16, 32), (11, 17), (3, 5), (1, 1), (6, 6)])
@pytest.mark.parametrize("fold", [False, True])
def test_factorized_ppm_equals_concat_ppm(size, fold):
    """Odd sizes, maps smaller than the 6x6 pooling grid, batch 2, BN folded or not (then applied after the sum)."""
    ppm = _concat_ppm()
    x = torch.randn(2, 24, *size)
    if fold:
        fold_batchnorm(ppm, x)
    with torch.inference_mode():
        expected = ppm(x)
        fact = FactorizedPyramidPooling(ppm).eval()
        got = fact(x)
        got_cl = fact(x.contiguous(memory_format=torch.channels_last))
    assert isinstance(fact.bn, nn.Identity) == fold
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_cl, expected, rtol=1e-5, atol=1e-5)
    assert fact.conv_x.weight.shape == (8, 24, 3, 3)  # only the feature's channels remain a 3x3 conv
    assert [getattr(fact, f"taps{i}").shape for i in range(4)] == [(72, 8)] * 4


def test_factorized_ppm_resize_matrix_is_cached_per_shape_and_dtype():
    fact = FactorizedPyramidPooling(_concat_ppm()).eval()
    a = fact.resize_shift_matrix(5, 7, torch.float32, torch.device("cpu"))
    assert a.shape == (9 * (1 + 4 + 9 + 36), 35)
    assert fact.resize_shift_matrix(5, 7, torch.float32, torch.device("cpu")) is a
    b = fact.resize_shift_matrix(5, 7, torch.bfloat16, torch.device("cpu"))
    assert b.dtype == torch.bfloat16 and b is not a
    for k in range(FactorizedPyramidPooling.MAX_CACHED + 3):
        fact.resize_shift_matrix(4 + k, 4, torch.float32, torch.device("cpu"))
    assert len(fact._matrices) == FactorizedPyramidPooling.MAX_CACHED
    # the centre tap of the 1x1 scale is the constant resize: every output pixel reads the pooled value
    s = 1 + 4 + 9 + 36
    centre = fact.resize_shift_matrix(5, 7, torch.float32, torch.device("cpu"))[4 * s]
    torch.testing.assert_close(centre, torch.ones(35))


def test_factorize_icnet_matches_plain_and_skips_sum_ppm(tmp_path):
    plain = load_model(make_checkpoint(tmp_path / "m.safetensors", arch="icnet_r18", width=0.25), "cpu")
    opt = copy.deepcopy(plain)
    fold_batchnorm(opt, torch.randn(1, 3, 128, 128))
    assert factorize_pyramid_pooling(opt, torch.randn(1, 3, 128, 128)) == 1
    assert isinstance(opt.backbone.ppm, FactorizedPyramidPooling)
    assert factorize_pyramid_pooling(opt) == 0  # nothing left to replace
    x = torch.randn(2, 3, 161, 243)
    with torch.inference_mode():
        a = compare_logits(plain(x), opt(x))
        b = compare_logits(plain(x).to(torch.bfloat16).float(), copy.deepcopy(opt).to(torch.bfloat16)(
            x.to(torch.bfloat16)))
    assert a.relative_diff <= 1e-5 and a.argmax_agreement >= MIN_ARGMAX_AGREEMENT, str(a)
    assert b.argmax_agreement > 0.9  # bf16 runs (the resize matrix follows the dtype)
    half = build_icnet("icnet_r50_half", width=0.25, aux_heads=False).eval()  # sum-style PPM: nothing to do
    assert factorize_pyramid_pooling(half, torch.randn(1, 3, 64, 64)) == 0


def test_factorize_restores_the_model_when_the_output_changes(monkeypatch):
    model = _randomise_bn(build_icnet("icnet_r18", width=0.25, num_classes=5, aux_heads=False)).eval()
    original = model.backbone.ppm
    broken = FactorizedPyramidPooling.forward
    monkeypatch.setattr(FactorizedPyramidPooling, "forward", lambda self, x: broken(self, x) * 3.0 + 1.0)
    with pytest.raises(RuntimeError, match="restored"):
        factorize_pyramid_pooling(model, torch.randn(1, 3, 96, 96))
    assert model.backbone.ppm is original


def test_factorized_ppm_rejects_sum_style():
    from icnet_ros.models.icnet import PyramidPooling

    with pytest.raises(ValueError, match="concat"):
        FactorizedPyramidPooling(PyramidPooling(16, 8, style="sum"))
