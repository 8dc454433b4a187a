"""Cascade label guidance loss against hand computations: weights, ignore index, upsampling, class weights, OHEM,
the Lovasz-softmax term, boundary weights."""
import math

import pytest
import torch
import torch.nn.functional as F

from icnet_ros.losses import CascadeLoss, LovaszSoftmax, SegmentationCE, label_boundary
from icnet_ros.models import CascadeLogits, build_icnet


# one image, 3 classes, 2 x 2 pixels; pixel (1, 0) is ignored
LOGITS = [[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]],
          [[0.0, 0.0, 3.0], [1.0, 2.0, 0.5]]]  # [row][col] -> class scores
LABELS = [[0, 1], [255, 0]]


def _logits(values=LOGITS):
    return torch.tensor(values).permute(2, 0, 1).unsqueeze(0)  # 1 x C x H x W


def _labels():
    return torch.tensor([LABELS], dtype=torch.uint8)


def _ce(z, y):
    """-log softmax(z)[y], by hand."""
    return math.log(sum(math.exp(v) for v in z)) - z[y]


def _prob(z, y):
    return math.exp(z[y]) / sum(math.exp(v) for v in z)


COUNTED = [(LOGITS[0][0], 0), (LOGITS[0][1], 1), (LOGITS[1][1], 0)]


def test_cross_entropy_ignores_pixels():
    expected = sum(_ce(z, y) for z, y in COUNTED) / 3
    assert SegmentationCE()(_logits(), _labels()).item() == pytest.approx(expected, rel=1e-6)


def test_cascade_loss_equals_hand_computation():
    main = _logits()
    sub24 = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)  # 1 x 1: upsampled to a constant 2 x 2 map
    sub12 = torch.zeros(1, 3, 2, 2)
    l_main = sum(_ce(z, y) for z, y in COUNTED) / 3
    l_24 = (2 * _ce([1.0, 0.0, 0.0], 0) + _ce([1.0, 0.0, 0.0], 1)) / 3
    l_12 = math.log(3.0)
    total, parts = CascadeLoss()(CascadeLogits(main, sub24, sub12), _labels())
    assert total.item() == pytest.approx(1.0 * l_main + 0.4 * l_24 + 0.4 * l_12, rel=1e-6)
    assert parts["main"].item() == pytest.approx(l_main, rel=1e-6)
    assert parts["sub24"].item() == pytest.approx(l_24, rel=1e-6)
    assert parts["sub12"].item() == pytest.approx(l_12, rel=1e-6)
    # configurable weights (the TensorFlow port's 0.16 for sub24)
    total, _ = CascadeLoss(main_weight=1.0, sub24_weight=0.16, sub12_weight=0.4)(
        CascadeLogits(main, sub24, sub12), _labels())
    assert total.item() == pytest.approx(l_main + 0.16 * l_24 + 0.4 * l_12, rel=1e-6)
    # a model without auxiliary heads: main only
    total, parts = CascadeLoss()(CascadeLogits(main, None, None), _labels())
    assert total.item() == pytest.approx(l_main, rel=1e-6) and set(parts) == {"main"}


def test_logits_are_upsampled_bilinearly_to_the_label_size():
    # class-0 scores [0, 4] at width 2 -> width 4 with align_corners=False: [0, 1, 3, 4]
    logits = torch.tensor([[[[0.0, 4.0]], [[0.0, 0.0]]]])  # 1 x 2 x 1 x 2
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    expected = sum(math.log(1 + math.exp(-z)) for z in (0.0, 1.0, 3.0, 4.0)) / 4
    assert SegmentationCE()(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_class_weights_give_a_weighted_mean():
    w = [2.0, 1.0, 0.5]
    expected = sum(w[y] * _ce(z, y) for z, y in COUNTED) / sum(w[y] for _, y in COUNTED)
    assert SegmentationCE(class_weights=w)(_logits(), _labels()).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="2 class weights for 3 classes"):
        SegmentationCE(class_weights=[1.0, 1.0])(_logits(), _labels())


def test_ohem_keeps_hard_pixels_and_at_least_min_kept():
    probs = [_prob(z, y) for z, y in COUNTED]
    assert probs[0] > 0.7 > probs[1] > probs[2]  # the first pixel is easy
    hard = sum(_ce(z, y) for (z, y), p in zip(COUNTED, probs) if p < 0.7) / 2
    assert SegmentationCE(ohem_thresh=0.7, ohem_min_kept=0)(_logits(), _labels()).item() == \
        pytest.approx(hard, rel=1e-6)
    # min_kept 3 per image: all three labelled pixels count again
    plain = sum(_ce(z, y) for z, y in COUNTED) / 3
    assert SegmentationCE(ohem_thresh=0.7, ohem_min_kept=3)(_logits(), _labels()).item() == \
        pytest.approx(plain, rel=1e-6)
    # a threshold below every probability with min_kept 1: only the hardest pixel
    assert SegmentationCE(ohem_thresh=0.01, ohem_min_kept=1)(_logits(), _labels()).item() == \
        pytest.approx(_ce(*COUNTED[2]), rel=1e-6)


def test_ohem_min_kept_counts_per_image():
    """``min_kept`` is per image (mmseg's rule): a batch of two keeps the two hardest labelled pixels of the batch,
    wherever they are."""
    second = [[[0.0, 1.0, 0.0], [0.0, 0.2, 0.0]], [[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]]
    logits = torch.cat([_logits(), _logits(second)])
    labels = torch.cat([_labels(), _labels()])
    counted = COUNTED + [(second[0][0], 0), (second[0][1], 1), (second[1][1], 0)]
    hardest = sorted(counted, key=lambda zy: _prob(*zy))[:2]
    assert _prob(*hardest[1]) < min(_prob(*zy) for zy in counted if zy not in hardest)
    assert SegmentationCE(ohem_thresh=0.01, ohem_min_kept=1)(logits, labels).item() == \
        pytest.approx(sum(_ce(*zy) for zy in hardest) / 2, rel=1e-6)


def test_all_ignored_gives_zero_with_gradient():
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss, _ = CascadeLoss()(CascadeLogits(logits, logits * 1.0, logits * 2.0), torch.full((2, 16, 16), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0


def test_matches_torch_cross_entropy_on_random_data_and_trains_all_heads():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 7)
    labels = torch.randint(0, 5, (2, 48, 56))
    labels[:, :3] = 255
    up = F.interpolate(logits, size=(48, 56), mode="bilinear", align_corners=False)
    assert SegmentationCE()(logits, labels).item() == pytest.approx(
        F.cross_entropy(up, labels, ignore_index=255).item(), rel=1e-5)
    model = build_icnet("icnet_r18", width=0.25, num_classes=5).train()
    out = model(torch.randn(2, 3, 64, 64))
    loss, _ = CascadeLoss()(out, torch.randint(0, 5, (2, 64, 64)))
    loss.backward()
    for head in (model.decode_head, *model.auxiliary_head):
        assert head.conv_seg.weight.grad is not None and head.conv_seg.weight.grad.abs().sum() > 0


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="ohem_thresh"):
        SegmentationCE(ohem_thresh=1.5)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        CascadeLoss(sub24_weight=-1)


def _jaccard_loss(fg, wrong):
    """Jaccard loss of one class when the pixels in ``wrong`` are mispredicted: 1 - |fg - wrong| / |fg | wrong|."""
    return 1.0 - len(fg - wrong) / len(fg | wrong)


def _lovasz_by_definition(probs, labels):
    """The Lovasz extension written out (Berman et al., eq. 8): errors sorted in decreasing order, each weighted by
    the increase of the Jaccard loss when its pixel joins the mispredicted set; mean over present classes."""
    total = []
    for c in sorted(set(labels)):
        fg = {i for i, y in enumerate(labels) if y == c}
        errors = sorted(((abs((y == c) - p[c]), i) for i, (p, y) in enumerate(zip(probs, labels))), reverse=True)
        loss, wrong = 0.0, set()
        for m, i in errors:
            before = _jaccard_loss(fg, wrong) if wrong else 0.0
            wrong = wrong | {i}
            loss += m * (_jaccard_loss(fg, wrong) - before)
        total.append(loss)
    return sum(total) / len(total)


def test_lovasz_softmax_equals_its_definition_and_skips_ignored_pixels():
    probs = [[_prob(z, k) for k in range(3)] for z, _ in COUNTED]
    expected = _lovasz_by_definition(probs, [y for _, y in COUNTED])
    assert LovaszSoftmax()(_logits(), _labels()).item() == pytest.approx(expected, rel=1e-6)
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 5, 6)
    labels = torch.randint(0, 4, (2, 5, 6))
    labels[0, 0] = 255
    flat_p = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, 4)
    flat_y = labels.reshape(-1)
    keep = flat_y != 255
    expected = _lovasz_by_definition(flat_p[keep].tolist(), flat_y[keep].tolist())
    assert LovaszSoftmax()(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_lovasz_softmax_of_confident_predictions_is_one_minus_iou():
    # near one-hot probabilities: the Lovasz extension equals the Jaccard loss of the hard prediction
    pred = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 1], [2, 2, 2, 1]])
    labels = torch.tensor([[[0, 0, 0, 1], [0, 2, 2, 1], [2, 2, 1, 255]]])
    logits = F.one_hot(pred, 3).permute(2, 0, 1).unsqueeze(0).float() * 40.0
    ious = []
    for c in range(3):
        p, y = (pred == c) & (labels[0] != 255), labels[0] == c
        ious.append((p & y).sum().item() / (p | y).sum().item())
    assert LovaszSoftmax()(logits, labels).item() == pytest.approx(1 - sum(ious) / 3, abs=1e-6)
    perfect = F.one_hot(labels[0].clamp(max=2), 3).permute(2, 0, 1).unsqueeze(0).float() * 40.0
    assert LovaszSoftmax()(perfect, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_cascade_loss_adds_weighted_lovasz_to_the_main_branch():
    torch.manual_seed(2)
    main = torch.randn(1, 3, 4, 4, requires_grad=True)
    sub24 = torch.randn(1, 3, 2, 2)
    labels = torch.randint(0, 3, (1, 8, 8))
    plain, parts = CascadeLoss()(CascadeLogits(main, sub24, None), labels)
    total, parts = CascadeLoss(lovasz_weight=0.5)(CascadeLogits(main, sub24, None), labels)
    lovasz = LovaszSoftmax()(main, labels)
    assert parts["lovasz"].item() == pytest.approx(lovasz.item(), rel=1e-6)
    assert total.item() == pytest.approx(plain.item() + 0.5 * lovasz.item(), rel=1e-6)
    total.backward()
    assert main.grad is not None and main.grad.abs().sum() > 0
    empty = torch.randn(1, 3, 4, 4, requires_grad=True)
    zero = LovaszSoftmax()(empty, torch.full((1, 4, 4), 255))
    zero.backward()
    assert zero.item() == 0.0 and torch.count_nonzero(empty.grad) == 0
    with pytest.raises(ValueError, match="weights must be >= 0"):
        CascadeLoss(lovasz_weight=-1)


def test_lovasz_label_stride_takes_the_centre_of_each_cell():
    """Every k-th label pixel, with the logits there: those of the full-size upsampled logits at the same pixels.
    Before, the logits were resized to the sparse grid, whose cells' centres lie half a label pixel from their
    pixels' at even k (the default 2)."""
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 6, 8)
    labels = torch.randint(0, 4, (2, 12, 16))
    sub = labels[:, 1::2, 1::2]
    at_pixels = F.interpolate(logits, size=(12, 16), mode="bilinear", align_corners=False)[..., 1::2, 1::2]
    assert LovaszSoftmax(label_stride=2)(logits, labels).item() == pytest.approx(
        LovaszSoftmax()(at_pixels, sub).item(), rel=1e-6)
    assert LovaszSoftmax(label_stride=3)(logits, labels).item() == pytest.approx(LovaszSoftmax()(
        F.interpolate(logits, size=(12, 16), mode="bilinear", align_corners=False)[..., 1::3, 1::3],
        labels[:, 1::3, 1::3]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="label_stride"):
        LovaszSoftmax(label_stride=0)


def test_label_boundary_marks_pixels_near_another_class_and_skips_ignored_ones():
    labels = torch.full((1, 5, 8), 2, dtype=torch.long)
    labels[0, :, 4:] = 5          # a vertical class edge between columns 3 and 4
    labels[0, 0, 0] = 255         # an ignored pixel far from the edge: neither boundary nor a neighbour's reason
    edge = label_boundary(labels, radius=1)
    expected = torch.zeros(1, 5, 8, dtype=torch.bool)
    expected[0, :, 3:5] = True
    assert torch.equal(edge, expected)
    wide = label_boundary(labels, radius=2)
    assert wide[0, :, 2:6].all() and not wide[0, :, :2].any() and not wide[0, :, 6:].any()
    # a 1-pixel-wide pole is boundary as a whole; ignored pixels never are
    pole = torch.zeros(1, 7, 7, dtype=torch.long)
    pole[0, :, 3] = 4
    pole[0, 3, 3] = 255
    edge = label_boundary(pole, radius=1)
    assert edge[0, :, 2:5].sum() == 20 and not edge[0, 3, 3] and not edge[0, :, :2].any()
    # another ignore index (below the class ids): its pixels still count for nothing
    other = torch.tensor([[[3, 3, 3, 0, 0], [3, -1, 3, 0, 0]]])
    assert label_boundary(other, radius=1, ignore_index=-1).int().tolist() == [[[0, 0, 1, 1, 0], [0, 0, 1, 1, 0]]]
    with pytest.raises(ValueError, match="radius"):
        label_boundary(labels, radius=0)


def test_boundary_weight_counts_edge_pixels_more_on_top_of_class_weights():
    # the 2 x 2 example: pixels (0, 0) and (0, 1) differ (classes 0 and 1), (1, 1) is class 0 next to (0, 1)
    # -> with radius 1 every counted pixel is boundary: boundary weight changes nothing in the weighted mean
    plain = SegmentationCE(class_weights=[2.0, 1.0, 0.5])(_logits(), _labels())
    assert SegmentationCE(class_weights=[2.0, 1.0, 0.5], boundary_weight=3.0, boundary_radius=1)(
        _logits(), _labels()).item() == pytest.approx(plain.item(), rel=1e-6)
    # a wider map where only some pixels are near the edge: boundary pixels count 1 + w times
    labels = torch.zeros(1, 1, 6, dtype=torch.long)
    labels[0, 0, 3:] = 1
    logits = torch.randn(1, 2, 1, 6, generator=torch.Generator().manual_seed(0))
    per_pixel = F.cross_entropy(logits, labels, reduction="none")[0, 0]
    w = torch.tensor([1.0, 1.0, 3.0, 3.0, 1.0, 1.0])  # radius 1, weight 2: columns 2 and 3 are boundary
    expected = (per_pixel * w).sum() / w.sum()
    got = SegmentationCE(boundary_weight=2.0, boundary_radius=1)(logits, labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    total, _ = CascadeLoss(boundary_weight=2.0, boundary_radius=1)(CascadeLogits(logits, None, None), labels)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="boundary_weight"):
        SegmentationCE(boundary_weight=-1.0)
