"""Confusion-matrix metrics on hand-made label maps: ignore pixels, absent classes, accumulation, the table."""
import math

import numpy as np
import pytest
import torch

from icnet_ros.metrics import ConfusionMatrix, format_table, metrics_from_confusion, to_percent

IGN = 255
GT = [[0, 0, 1, IGN],
      [0, 1, 1, IGN],
      [2, 2, 1, 1]]
PRED = [[0, 1, 1, 3],  # the ignored pixel predicted as class 3 must not count
        [0, 1, 2, 0],
        [2, 0, 1, 1]]


def _cm(num_classes=4, gt=GT, pred=PRED):
    cm = ConfusionMatrix(num_classes, ignore_index=IGN)
    cm.update(torch.tensor(pred), torch.tensor(gt, dtype=torch.uint8))
    return cm


def test_hand_made_maps_with_ignore_and_a_class_absent_everywhere():
    m = _cm().compute()
    # class 0: TP 2, GT 3, pred 3 -> 2/4; class 1: TP 4, GT 5, pred 5 -> 4/6; class 2: TP 1, GT 2, pred 2 -> 1/3
    # class 3: no labelled pixel and no prediction on a labelled pixel -> NaN, left out of the mean
    assert m["IoU"][:3] == pytest.approx([2 / 4, 4 / 6, 1 / 3])
    assert math.isnan(m["IoU"][3])
    assert m["mIoU"] == pytest.approx((2 / 4 + 4 / 6 + 1 / 3) / 3)
    assert m["Acc"][:3] == pytest.approx([2 / 3, 4 / 5, 1 / 2]) and math.isnan(m["Acc"][3])
    assert m["mAcc"] == pytest.approx((2 / 3 + 4 / 5 + 1 / 2) / 3)
    assert m["aAcc"] == pytest.approx(7 / 10) and m["pixels"] == 10


def test_class_predicted_but_absent_from_labels_counts_as_zero():
    pred = [row[:] for row in PRED]
    pred[2][3] = 4  # a labelled class-1 pixel predicted as class 4 (absent from the labels)
    m = _cm(5, pred=pred).compute()
    assert m["IoU"][4] == 0.0 and math.isnan(m["Acc"][4])
    assert m["IoU"][1] == pytest.approx(3 / 6)  # TP 3, GT 5, pred 4
    assert m["mIoU"] == pytest.approx((2 / 4 + 3 / 6 + 1 / 3 + 0.0) / 4)  # class 3 still NaN and excluded


def test_accumulation_equals_one_update_and_labels_outside_range_are_ignored():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, (4, 30, 40))
    gt[gt == 5] = IGN
    gt[0, 0, :3] = 17  # not a class: ignored like the ignore index
    pred = rng.integers(0, 5, (4, 30, 40))
    one = ConfusionMatrix(5, IGN)
    one.update(torch.from_numpy(pred), torch.from_numpy(gt))
    parts = ConfusionMatrix(5, IGN)
    for i in range(4):
        parts.update(torch.from_numpy(pred[i]), torch.from_numpy(gt[i]))
    assert torch.equal(one.matrix, parts.matrix)
    valid = (gt < 5)
    expected = np.zeros((5, 5), np.int64)
    np.add.at(expected, (gt[valid], pred[valid]), 1)
    assert np.array_equal(one.matrix.numpy(), expected)
    parts.reset()
    assert parts.matrix.sum() == 0


def test_update_from_logits_and_errors():
    cm = ConfusionMatrix(3)
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2] = 1.0
    cm.update_logits(logits, torch.tensor([[[2, 1], [255, 2]]]))
    assert cm.matrix[2, 2] == 2 and cm.matrix[1, 2] == 1 and cm.matrix.sum() == 3
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="outside 0..2"):
        cm.update(torch.full((2, 2), 3), torch.zeros(2, 2))


def test_empty_matrix_and_formatting():
    m = metrics_from_confusion(torch.zeros(3, 3, dtype=torch.int64))
    assert math.isnan(m["mIoU"]) and math.isnan(m["aAcc"]) and to_percent(m["mIoU"]) is None
    table = format_table(_cm().compute(), ["sky", "road", "car", "bicyclist"])
    assert "bicyclist" in table and "n/a" in table and "mIoU 50.00" in table and "66.67" in table
    assert to_percent(0.123456789) == pytest.approx(12.3457)


@pytest.mark.mmseg
def test_agrees_with_mmsegmentation_iou_metric():
    mmseg_metrics = pytest.importorskip("mmseg.evaluation.metrics", reason="mmsegmentation (test extra)")
    rng = np.random.default_rng(1)
    gt = torch.from_numpy(rng.integers(0, 8, (3, 20, 24)))
    gt[gt == 7] = IGN
    pred = torch.from_numpy(rng.integers(0, 6, (3, 20, 24)))  # class 6 never predicted; 6 present in labels
    cm = ConfusionMatrix(7, IGN)
    totals = [torch.zeros(7, dtype=torch.float64) for _ in range(4)]
    for i in range(3):
        cm.update(pred[i], gt[i])
        for t, a in zip(totals, mmseg_metrics.IoUMetric.intersect_and_union(pred[i], gt[i], 7, IGN)):
            t += a.double()
    ref = mmseg_metrics.IoUMetric.total_area_to_metrics(*totals, metrics=["mIoU"])
    ours = cm.compute()
    assert np.allclose(ours["IoU"], ref["IoU"], equal_nan=True)
    assert np.allclose(ours["Acc"], ref["Acc"], equal_nan=True)
    assert ours["aAcc"] == pytest.approx(float(ref["aAcc"]))
    assert ours["mIoU"] == pytest.approx(float(np.nanmean(ref["IoU"])))


def test_accuracy_in_the_json_report_and_the_table_is_recall():
    """Per-class Acc and mAcc (recall: TP / ground-truth pixels) where they differ from IoU, in icnet-eval's JSON
    report and in the table: no other test could tell the columns apart."""
    from icnet_ros.evaluate import metrics_report

    gt = torch.tensor([[0, 0, 1, 255], [0, 1, 1, 255], [2, 2, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 3], [0, 1, 2, 0], [2, 0, 1, 2]])  # class 1: TP 3, GT 5, predicted 4
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    m = cm.compute()
    names = ["sky", "road", "car", "bicyclist"]
    report = metrics_report(m, names)
    acc = {"sky": 2 / 3, "road": 3 / 5, "car": 1 / 2}  # TP / ground-truth pixels
    iou = {"sky": 2 / 4, "road": 3 / 6, "car": 1 / 4}
    for name in acc:
        assert report["per_class"][name]["Acc"] == pytest.approx(100 * acc[name], abs=1e-4)
        assert report["per_class"][name]["IoU"] == pytest.approx(100 * iou[name], abs=1e-4)
    assert report["per_class"]["bicyclist"] == {"IoU": None, "Acc": None}
    assert report["mAcc"] == pytest.approx(100 * sum(acc.values()) / 3, abs=1e-4)
    assert report["mIoU"] == pytest.approx(100 * sum(iou.values()) / 3, abs=1e-4)
    assert report["aAcc"] == pytest.approx(100 * 6 / 10, abs=1e-4)
    table = format_table(m, names).splitlines()
    assert table[3].split() == ["road", "50.00", "60.00"]
    assert table[-1].startswith("mIoU 41.67  mAcc 58.89  aAcc 60.00")
