"""Cascade label guidance: the ICNet training loss.

``loss = w_main * CE(main) + w_sub24 * CE(sub24) + w_sub12 * CE(sub12)``, each branch's logits upsampled
bilinearly to the label size first (defaults 1.0 / 0.4 / 0.4, as in MMSegmentation; the paper's TensorFlow port
used 0.16 for sub24). Pixels labelled ``ignore_index`` count nowhere. Optional class weights (weighted mean, as
:func:`torch.nn.functional.cross_entropy`) and online hard example mining (OHEM): only pixels whose predicted
probability of the true class is below ``ohem_thresh`` are kept, but at least ``ohem_min_kept`` per image.
An optional Lovasz-softmax term (Berman et al., CVPR 2018: a convex surrogate of the per-class Jaccard loss, which
weighs a class by its IoU rather than by its pixel count) is added to the main branch: ``w_main * (CE + w_lovasz *
Lovasz)``. An optional boundary weight counts the labelled pixels within ``boundary_radius`` label pixels of another
class ``1 + boundary_weight`` times in every branch's cross entropy (thin objects such as poles are almost all
boundary), on top of the class weights.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .classes import IGNORE_INDEX
from .models.icnet import CascadeLogits


def upsample_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear (align_corners=False) resize of N x C x h x w logits to ``size`` = (H, W); a no-op at that size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def label_boundary(target: Tensor, radius: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """N x H x W bool: labelled pixels with a pixel of another class within ``radius`` (a (2r+1)^2 square).

    Ignored pixels are neither boundary nor make their neighbours boundary (a void region's rim is not a class
    edge). Two max-pools over the label map; no host synchronisation."""
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    valid = target != ignore_index
    labels = target.float().unsqueeze(1)  # N x 1 x H x W; class ids are exact in float32
    k = 2 * radius + 1

    def square_max(x: Tensor) -> Tensor:  # separable: a row pass, then a column pass
        x = F.max_pool2d(x, kernel_size=(1, k), stride=1, padding=(0, radius))
        return F.max_pool2d(x, kernel_size=(k, 1), stride=1, padding=(radius, 0))

    ignored = ~valid.unsqueeze(1)  # +-inf: never the window's extreme while a labelled pixel is in it
    highest = square_max(labels.masked_fill(ignored, float("-inf")))
    lowest = -square_max(-labels.masked_fill(ignored, float("inf")))
    return valid & (highest != lowest).squeeze(1)


class SegmentationCE(nn.Module):
    """Pixel-wise cross entropy on logits upsampled to the label size, with ignore index, class weights, boundary
    weights and OHEM.

    The result is the weighted mean over the counted pixels; 0 (with gradient) when none is counted. A pixel's
    weight is its class weight, times ``1 + boundary_weight`` when it lies within ``boundary_radius`` pixels of
    another class (:func:`label_boundary`).
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, class_weights: Sequence[float] | Tensor | None = None,
                 ohem_thresh: float | None = None, ohem_min_kept: int = 100_000, boundary_weight: float = 0.0,
                 boundary_radius: int = 3) -> None:
        super().__init__()
        if ohem_thresh is not None and not 0 < ohem_thresh <= 1:
            raise ValueError(f"ohem_thresh must be in (0, 1], got {ohem_thresh}")
        if ohem_min_kept < 0:
            raise ValueError(f"ohem_min_kept must be >= 0, got {ohem_min_kept}")
        if boundary_weight < 0 or boundary_radius < 1:
            raise ValueError(f"need boundary_weight >= 0 and boundary_radius >= 1, got {boundary_weight}, "
                             f"{boundary_radius}")
        self.ignore_index = ignore_index
        self.ohem_thresh = ohem_thresh
        self.ohem_min_kept = int(ohem_min_kept)
        self.boundary_weight = float(boundary_weight)
        self.boundary_radius = int(boundary_radius)
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if weights is not None and (weights.dim() != 1 or (weights < 0).any()):
            raise ValueError("class_weights must be a 1-D sequence of non-negative numbers")
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: Tensor, target: Tensor, boundary: Tensor | None = None) -> Tensor:
        """``boundary``: :func:`label_boundary` of ``target`` when the caller has it already (computed here if
        needed and not given)."""
        logits = upsample_logits(logits.float(), target.shape[-2:])
        target = target.long()
        if self.class_weights is not None and self.class_weights.numel() != logits.shape[1]:
            raise ValueError(f"{self.class_weights.numel()} class weights for {logits.shape[1]} classes")
        pixel_loss = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")
        valid = target != self.ignore_index
        # class weights applied by hand (not cross_entropy's weight=) so that they combine cleanly with OHEM
        weight = valid.float()
        if self.class_weights is not None:
            weight = weight * self.class_weights[target.clamp(0, logits.shape[1] - 1)]
        if self.boundary_weight > 0:
            if boundary is None:
                boundary = label_boundary(target, self.boundary_radius, self.ignore_index)
            weight = weight * (1.0 + self.boundary_weight * boundary.float())
        if self.ohem_thresh is not None:
            weight = weight * self._ohem_mask(logits.detach(), target, valid)
        # no counted pixel: 0 / eps = 0, still connected to the graph (and no host sync to test for it)
        return (pixel_loss * weight).sum() / weight.sum().clamp_min(1e-12)

    def _ohem_mask(self, logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        """1 for kept pixels: probability of the true class below the threshold, plus (when fewer) the
        ``min_kept`` x batch hardest labelled pixels."""
        prob = logits.softmax(dim=1).gather(1, target.clamp(0, logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
        keep = prob < self.ohem_thresh
        min_kept = self.ohem_min_kept * target.shape[0]
        if min_kept > 0:
            n_valid = int(valid.sum())
            if n_valid > 0:
                kth = prob.masked_fill(~valid, 2.0).flatten().kthvalue(min(min_kept, n_valid)).values
                keep |= prob <= kth
        return (keep & valid).float()


def _lovasz_grad(fg_sorted: Tensor) -> Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss at errors sorted in decreasing order (Berman et al.,
    Algorithm 1): the Jaccard loss of each prefix of the sorted pixels, differenced."""
    total = fg_sorted.sum()
    intersection = total - fg_sorted.cumsum(0)
    union = total + (1.0 - fg_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
    return jaccard


class LovaszSoftmax(nn.Module):
    """Lovasz-softmax loss over the classes present in the batch's labels (logits upsampled to the label size).

    For each present class c: the pixels' errors ``|[y = c] - p_c|`` sorted in decreasing order, dotted with
    :func:`_lovasz_grad` of the sorted ground truth; the mean over present classes. Ignored pixels count nowhere;
    0 (with gradient) when no pixel is labelled. ``label_stride`` k > 1 evaluates it on every k-th label pixel in
    each direction (the centre of each k x k cell) with the logits upsampled to the label size there: the per-class
    sorts dominate the cost (about 4.5 s per batch of eight 384x512 crops on one CPU thread at k = 1, k**2 times
    less at k).
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, label_stride: int = 1) -> None:
        super().__init__()
        if label_stride < 1:
            raise ValueError(f"label_stride must be >= 1, got {label_stride}")
        self.ignore_index = ignore_index
        self.label_stride = int(label_stride)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        k = self.label_stride
        logits = upsample_logits(logits.float(), target.shape[-2:])
        if k > 1:  # the logits at those pixels' own centres (resizing them to the sparse grid put each cell's
            # value half a label pixel away from its pixel's at even k)
            target = target[..., k // 2::k, k // 2::k]
            logits = logits[..., k // 2::k, k // 2::k]
        probs = logits.softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
        labels = target.reshape(-1).long()
        valid = labels != self.ignore_index
        probs, labels = probs[valid], labels[valid]
        losses = []
        for c in labels.unique().tolist():
            if not 0 <= c < probs.shape[1]:
                raise ValueError(f"label {c} outside the {probs.shape[1]} classes")
            fg = (labels == c).float()
            errors, order = (fg - probs[:, c]).abs().sort(descending=True)
            losses.append(torch.dot(errors, _lovasz_grad(fg[order])))
        if not losses:
            return logits.sum() * 0.0
        return torch.stack(losses).mean()


class CascadeLoss(nn.Module):
    """ICNet's cascade label guidance loss over :class:`~icnet_ros.models.icnet.CascadeLogits`.

    Returns ``(total, parts)`` where ``parts`` holds the detached per-branch losses (``main``, ``sub24``,
    ``sub12``) for logging. Auxiliary branches that are None (model without auxiliary heads) or weighted 0 are
    skipped. ``lovasz_weight`` > 0 adds that much Lovasz-softmax to the main branch's cross entropy (its value is
    logged as ``lovasz``), evaluated on every ``lovasz_stride``-th label pixel. ``boundary_weight`` > 0 up-weights
    the pixels near class edges in every branch's cross entropy (:class:`SegmentationCE`)."""

    def __init__(self, main_weight: float = 1.0, sub24_weight: float = 0.4, sub12_weight: float = 0.4,
                 ignore_index: int = IGNORE_INDEX, class_weights: Sequence[float] | Tensor | None = None,
                 ohem_thresh: float | None = None, ohem_min_kept: int = 100_000, lovasz_weight: float = 0.0,
                 lovasz_stride: int = 1, boundary_weight: float = 0.0, boundary_radius: int = 3) -> None:
        super().__init__()
        if min(main_weight, sub24_weight, sub12_weight, lovasz_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        self.weights = {"main": float(main_weight), "sub24": float(sub24_weight), "sub12": float(sub12_weight)}
        self.ce = SegmentationCE(ignore_index, class_weights, ohem_thresh, ohem_min_kept, boundary_weight,
                                 boundary_radius)
        self.lovasz_weight = float(lovasz_weight)
        self.lovasz = LovaszSoftmax(ignore_index, lovasz_stride) if lovasz_weight > 0 else None

    def forward(self, outputs: CascadeLogits | Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(outputs, Tensor):
            outputs = CascadeLogits(outputs, None, None)
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        boundary = None  # the same label edges for every branch: found once (~0.1 s per batch on one CPU thread)
        if self.ce.boundary_weight > 0:
            boundary = label_boundary(target.long(), self.ce.boundary_radius, self.ce.ignore_index)
        for name, logits in zip(("main", "sub24", "sub12"), outputs):
            w = self.weights[name]
            if logits is None or (w == 0 and name != "main"):
                continue
            loss = self.ce(logits, target, boundary)
            parts[name] = loss.detach()
            if name == "main" and self.lovasz is not None:
                lovasz = self.lovasz(logits, target)
                parts["lovasz"] = lovasz.detach()
                loss = loss + self.lovasz_weight * lovasz
            total = loss * w if total is None else total + loss * w
        assert total is not None
        return total, parts


__all__ = ["CascadeLoss", "LovaszSoftmax", "SegmentationCE", "label_boundary", "upsample_logits"]
