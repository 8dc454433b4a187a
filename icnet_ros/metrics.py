"""Segmentation metrics from a confusion matrix accumulated on the device (``torch.bincount``).

Definitions (as in MMSegmentation's IoUMetric): pixels labelled ``ignore_index`` (or any value outside
0..C-1) are not counted. Per class, IoU = TP / (TP + FP + FN) and accuracy = TP / (TP + FN). A class with no
ground-truth pixels and no predictions has IoU NaN and is left out of the mean (mIoU = nanmean); a class that is
predicted but absent from the ground truth has IoU 0 and counts. Accuracy is NaN for classes without ground
truth. aAcc is the overall pixel accuracy. Metrics are fractions in [0, 1]; reports convert to percent.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .classes import IGNORE_INDEX


class ConfusionMatrix:
    """C x C matrix of (ground truth, prediction) pixel counts, kept as int64 on ``device``."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 device: str | torch.device = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, target: Tensor, check: bool = True) -> None:
        """Count predicted class ids ``pred`` against labels ``target`` (same shape; any integer dtype).

        ``check=False`` skips the range check of ``pred`` (a host sync on GPUs) for predictions known to be class
        ids, e.g. an argmax over the class dimension."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
        n = self.num_classes
        target = target.to(self.matrix.device).long().flatten()
        pred = pred.to(self.matrix.device).long().flatten()
        if check and ((pred < 0) | (pred >= n)).any():
            raise ValueError(f"predictions outside 0..{n - 1}")
        keep = (target != self.ignore_index) & (target >= 0) & (target < n)
        # uncounted pixels go to an extra bin (no data-dependent shapes, no host sync for a boolean mask)
        index = torch.where(keep, target * n + pred, torch.full_like(target, n * n))
        self.matrix += torch.bincount(index, minlength=n * n + 1)[: n * n].view(n, n)

    def update_logits(self, logits: Tensor, target: Tensor) -> None:
        """Count ``argmax`` of N x C x H x W logits (already at label size) against N x H x W labels."""
        self.update(logits.argmax(dim=1), target, check=False)

    def reset(self) -> None:
        self.matrix.zero_()

    def all_reduce(self) -> None:
        """Sum the matrices of all ranks (no-op outside torch.distributed)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix)

    def compute(self) -> dict[str, Any]:
        """``{"IoU": [C], "Acc": [C], "mIoU", "mAcc", "aAcc", "pixels"}`` as floats (NaN where undefined)."""
        return metrics_from_confusion(self.matrix)


def metrics_from_confusion(matrix: Tensor) -> dict[str, Any]:
    """Metrics from a C x C (ground truth, prediction) count matrix; see the module docstring."""
    m = matrix.detach().to("cpu", torch.float64)
    tp = m.diagonal()
    gt = m.sum(1)
    pred = m.sum(0)
    union = gt + pred - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
    total = m.sum()
    return {"IoU": iou.tolist(), "Acc": acc.tolist(), "mIoU": _nanmean(iou), "mAcc": _nanmean(acc),
            "aAcc": float(tp.sum() / total) if total > 0 else math.nan, "pixels": int(total)}


def _nanmean(x: Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan


def format_table(metrics: dict[str, Any], class_names: Sequence[str]) -> str:
    """A readable per-class table (IoU and accuracy in percent) followed by the summary line."""
    width = max([len("class")] + [len(c) for c in class_names])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}", f"{'-' * width}  {'-' * 6}  {'-' * 6}"]
    for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"]):
        lines.append(f"{name:<{width}}  {_pct(iou):>6}  {_pct(acc):>6}")
    lines.append(f"{'-' * width}  {'-' * 6}  {'-' * 6}")
    lines.append(f"mIoU {_pct(metrics['mIoU'])}  mAcc {_pct(metrics['mAcc'])}  aAcc {_pct(metrics['aAcc'])}"
                 f"  ({metrics['pixels']} labelled pixels; n/a: class absent from labels and predictions)")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100.0 * x:.2f}"


def to_percent(x: float) -> float | None:
    """Fraction -> percent (4 decimals); NaN -> None (JSON null)."""
    return None if x is None or math.isnan(x) else round(100.0 * x, 4)


__all__ = ["ConfusionMatrix", "format_table", "metrics_from_confusion", "to_percent"]
