"""Weight averaging: an exponential moving average (EMA) of the model's weights over the training iterations.

``optim.ema_decay = d`` (0: off) keeps ``ema = d * ema + (1 - d) * weights`` after every optimizer step, for the
parameters and the floating-point buffers (batch-norm running statistics; integer buffers are copied). The average
starts from the weights the run starts from. It is what validation measures and what ``best.safetensors`` and
``last.safetensors`` hold; the raw training weights travel in ``train_state.pt`` for an exact resume. Over the last
``1 / (1 - d)`` iterations or so the average smooths the step-to-step noise of SGD (0.995: about 200 iterations).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class ModelEMA:
    """An exponential moving average of ``model``'s parameters and buffers, kept in a copy of the model."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @staticmethod
    def _pairs(model: nn.Module, ema: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """(averaged ema tensors, their model tensors, copied ema tensors, their model tensors), in order."""
        avg_e, avg_m, copy_e, copy_m = [], [], [], []
        model_t = dict(model.named_parameters())
        model_t.update(model.named_buffers())
        ema_t = dict(ema.named_parameters())
        ema_t.update(ema.named_buffers())
        if model_t.keys() != ema_t.keys():
            raise ValueError("the EMA copy and the model have different tensors")
        for name, e in ema_t.items():
            m = model_t[name]
            if e.is_floating_point():
                avg_e.append(e)
                avg_m.append(m.detach())
            else:
                copy_e.append(e)
                copy_m.append(m)
        return avg_e, avg_m, copy_e, copy_m

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step: ``ema <- decay * ema + (1 - decay) * model`` (float tensors), integer buffers copied."""
        avg_e, avg_m, copy_e, copy_m = self._pairs(model, self.module)
        if avg_e:
            torch._foreach_lerp_(avg_e, avg_m, 1.0 - self.decay)
        for e, m in zip(copy_e, copy_m):
            e.copy_(m)

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()


__all__ = ["ModelEMA"]
