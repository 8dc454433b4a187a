"""Logits -> the uint8 outputs, on the device: upsampling, argmax, confidence, palette, overlay, the copy back.

Label values: class ids ``0..num_classes-1``; the class set's ignore index (:data:`UNKNOWN` = 255, the
project-wide ignore value, unless a model's metadata names another) marks pixels whose max softmax probability is
below ``confidence_threshold`` (never produced by argmax); it is the value the node announces as
``classes.ignore_index``. Unknown pixels are
black in the colour mask and keep the original frame in the overlay. On the CPU the work runs on OpenCV, one class
plane at a time (:meth:`Postprocessor._labels_cpu`, :meth:`Postprocessor._render_cpu`); on CUDA in torch.
"""
from __future__ import annotations

import threading

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .classes import IGNORE_INDEX, ClassSet
from .preprocess import follow_torch_threads

#: label value for pixels the segmenter does not classify
UNKNOWN = IGNORE_INDEX


class Postprocessor:
    """Turns logits into labels, confidences, colour masks and overlays on ``device`` (see the module docstring).

    ``overlay_alpha`` and ``confidence_threshold`` (0 = off) may change between calls."""

    def __init__(self, class_set: ClassSet, device: torch.device, overlay_alpha: float = 0.5,
                 confidence_threshold: float = 0.0, compile_render: bool = False) -> None:
        self.device = device
        self.overlay_alpha = float(overlay_alpha)
        self.confidence_threshold = float(confidence_threshold)
        self.unknown = int(class_set.ignore_index)  # the label value of unclassified pixels (not a class id)
        palette = torch.from_numpy(class_set.palette_array()).to(device)
        self._palettes = {"RGB": palette, "BGR": palette.flip(1).contiguous()}
        # 256 x 1 x 3 lookup tables for cv2.LUT (the CPU path): label value -> colour, unknown black
        self._luts = {k: np.ascontiguousarray(v.cpu().numpy().reshape(256, 1, 3)) for k, v in self._palettes.items()}
        # colour/overlay rendering is a chain of memory-bound element-wise ops that inductor fuses into one loop
        # (CPU, 2 megapixels: ~58 ms eager, ~2 ms compiled, identical bytes); on the CPU OpenCV's table lookup and
        # weighted sum do the same in about 1 ms at 540x720 (15 ms for the eager torch ops, one thread)
        # the CPU label pass's H x W float/uint8 work planes, per thread, kept for the last output size: fresh
        # frame-sized arrays per class plane were mapped and unmapped by malloc each time (1920x1080 with
        # confidence: ~95 ms instead of ~45 ms a frame, in page faults)
        self._scratch = threading.local()
        if device.type == "cpu":
            self.render = self._render_cpu
        else:
            self.render = torch.compile(self._render, dynamic=False) if compile_render else self._render

    def labels(self, logits: Tensor, out_size: tuple[int, int], want_confidence: bool
               ) -> tuple[Tensor, Tensor | None]:
        """Logits -> (uint8 N x H x W labels, uint8 confidence or None) at ``out_size``: bilinear upsampling in
        float32, argmax; max softmax probability only for the confidence or the confidence threshold."""
        if logits.device.type == "cpu":
            return self._labels_cpu(logits, out_size, want_confidence)
        return self._labels_torch(logits, out_size, want_confidence)

    def _labels_torch(self, logits: Tensor, out_size: tuple[int, int], want_confidence: bool
                      ) -> tuple[Tensor, Tensor | None]:
        """:meth:`labels` in torch ops on any device (the CUDA path; the tests run it on CPU tensors too)."""
        # NHWC: the class axis is innermost, so upsampling and the per-pixel argmax/max/sum run on contiguous
        # memory (on the CPU this is ~2-4x faster than reducing over dim 1 of an NCHW tensor)
        x = logits.float().contiguous(memory_format=torch.channels_last)
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        threshold = self.confidence_threshold
        if not (want_confidence or threshold > 0):
            return x.argmax(1).to(torch.uint8), None
        top, idx = x.max(1)
        # max softmax probability = 1 / sum_c exp(l_c - l_max); in place only on our own temporary
        shifted = x.sub_(top.unsqueeze(1)) if x is not logits else x - top.unsqueeze(1)
        prob = shifted.exp_().sum(1).reciprocal_()
        label = idx.to(torch.uint8)
        if threshold > 0:
            label.masked_fill_(prob < threshold, self.unknown)
        conf = prob.mul_(255.0).round_().to(torch.uint8) if want_confidence else None
        return label, conf

    def _labels_cpu(self, logits: Tensor, out_size: tuple[int, int], want_confidence: bool
                    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`labels` on the CPU, one class plane at a time: OpenCV's single-channel bilinear resize (the same
        half-pixel sampling as ``F.interpolate(align_corners=False)``, SIMD) and a running maximum, so no
        N x C x H x W float map is ever allocated. 540x720 from 11 x 68 x 92 on one thread: ~3 ms against ~18 ms
        for upsampling the whole map and reducing it. Ties keep the lower class id, like argmax."""
        follow_torch_threads()
        h, w = out_size
        n, c = logits.shape[:2]
        planes = logits.detach().float().contiguous().numpy()
        same = tuple(planes.shape[2:]) == (h, w)
        work = getattr(self._scratch, "planes", None)
        if work is None or work[0].shape != (h, w):  # resized, best, exp, total (float); higher, kmask (uint8)
            dtypes = (np.float32,) * 4 + (np.uint8,) * 2
            work = self._scratch.planes = tuple(np.empty((h, w), dtype) for dtype in dtypes)
        resized, best, e, total, higher, kmask = work

        def plane(i: int, k: int) -> np.ndarray:  # valid until the next call
            p = planes[i, k]
            return p if same else cv2.resize(p, (w, h), dst=resized, interpolation=cv2.INTER_LINEAR)

        labels = np.zeros((n, h, w), np.uint8)
        tiny = h * w <= 16
        threshold = self.confidence_threshold
        conf = np.empty((n, h, w), np.uint8) if want_confidence else None
        for i in range(n):
            np.copyto(best, plane(i, 0))
            label = labels[i]
            for k in range(1, c):
                p = plane(i, k)
                cv2.compare(p, best, cv2.CMP_GT, dst=higher)  # 255 where class k leads so far
                cv2.max(best, p, dst=best)
                # every label so far is < k, so "k where higher" is max(label, min(higher, k)): SIMD, no masking
                if tiny:  # OpenCV's binding reads a (1, 1) or (4, 1) array as a Scalar: cv2.min gave 4 numbers
                    np.maximum(label, np.minimum(higher, k), out=label)  # (and those frames were labelled 0)
                else:
                    cv2.max(label, cv2.min(higher, k, dst=kmask), dst=label)
            if want_confidence or threshold > 0:
                # max softmax probability = 1 / sum_k exp(l_k - l_max), a second pass over the planes
                total.fill(0.0)
                for k in range(c):
                    np.subtract(plane(i, k), best, out=e)
                    total += np.exp(e, out=e)
                prob = np.reciprocal(total, out=total)
                if threshold > 0:
                    label[prob < threshold] = self.unknown
                if conf is not None:
                    conf[i] = np.rint(np.multiply(prob, 255.0, out=prob), out=prob)
        return torch.from_numpy(labels), None if conf is None else torch.from_numpy(conf)

    def _render(self, label: Tensor, frames: Tensor, order: str, out_size: tuple[int, int],
                want: frozenset[str]) -> dict[str, Tensor]:
        """Colour mask (palette lookup) and overlay (blend with the frame), uint8 N x H x W x 3 in ``order``."""
        color = self._palettes[order].index_select(0, label.reshape(-1).long()).view(*label.shape, 3)
        out = {}
        if "color" in want:
            out["color"] = color
        if "overlay" in want:
            base = frames
            if tuple(base.shape[1:3]) != tuple(out_size):
                base = F.interpolate(base.permute(0, 3, 1, 2).float(), size=out_size, mode="bilinear",
                                     align_corners=False).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            if base.shape[3] == 1:
                base = base.expand(-1, -1, -1, 3)
            a = self.overlay_alpha
            blend = torch.lerp(base.float(), color.float(), a) if 0.0 < a < 1.0 else (
                color.float() if a == 1.0 else base.float())
            overlay = blend.round_().to(torch.uint8)
            if self.confidence_threshold > 0:  # unknown pixels keep the frame
                overlay = torch.where((label == self.unknown).unsqueeze(-1), base, overlay)
            out["overlay"] = overlay
        return out

    def _render_cpu(self, label: Tensor, frames: Tensor, order: str, out_size: tuple[int, int],
                    want: frozenset[str]) -> dict[str, Tensor]:
        """:meth:`_render` with OpenCV on CPU tensors: ``cv2.LUT`` for the palette and ``cv2.addWeighted`` for the
        blend (rounded to nearest; within 1 of the float blend, equal at alpha 0.5)."""
        if tuple(frames.shape[1:3]) != tuple(out_size):  # output_size: network (rare): the exact float resize
            return self._render(label, frames, order, out_size, want)
        follow_torch_threads()
        labels, bases = label.numpy(), frames.numpy()
        lut, a = self._luts[order], self.overlay_alpha
        colors = np.empty((*labels.shape, 3), np.uint8)
        overlays = np.empty_like(colors) if "overlay" in want else None
        for i, lab in enumerate(labels):
            color = cv2.LUT(cv2.cvtColor(lab, cv2.COLOR_GRAY2BGR), lut, dst=colors[i])
            if overlays is None:
                continue
            base = bases[i]
            base = cv2.cvtColor(base, cv2.COLOR_GRAY2BGR) if base.ndim == 2 or base.shape[2] == 1 else base
            if a == 1.0:
                overlays[i] = color
            elif a == 0.0:
                overlays[i] = base
            else:
                cv2.addWeighted(base, 1.0 - a, color, a, 0.0, dst=overlays[i])
            if self.confidence_threshold > 0:  # unknown pixels keep the frame
                np.copyto(overlays[i], base, where=(lab == self.unknown)[:, :, None])
        out = {}
        if "color" in want:
            out["color"] = torch.from_numpy(colors)
        if overlays is not None:
            out["overlay"] = torch.from_numpy(overlays)
        return out

    def to_host(self, device_outputs: list[dict[str, Tensor]]) -> list[dict[str, np.ndarray]]:
        """Copy device tensors to numpy: CPU tensors are shared (no copy); CUDA tensors go to pinned buffers with
        non-blocking copies and one synchronisation."""
        if self.device.type != "cuda":
            return [{k: v.contiguous().numpy() for k, v in d.items()} for d in device_outputs]
        host = []
        for d in device_outputs:
            h = {}
            for k, v in d.items():
                buf = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                buf.copy_(v, non_blocking=True)
                h[k] = buf
            host.append(h)
        # one synchronisation, on an event: Stream.synchronize() counts as a hidden sync under
        # torch.cuda.set_sync_debug_mode (the check that no other one happens), an event's does not
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        done.synchronize()
        return [{k: v.numpy() for k, v in h.items()} for h in host]


__all__ = ["Postprocessor", "UNKNOWN"]
