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
    """An exponential moving average of ``model``'s parameters and buffers, kept in a copy of the model.

    The pairs of tensors are collected once: the model's tensors are updated in place by the optimizer and by
    ``load_state_dict``, so they stay the same objects for the whole run."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        model_t = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        ema_t = {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}
        # float tensors are averaged, integer buffers (num_batches_tracked) copied
        floats = [k for k, e in ema_t.items() if e.is_floating_point()]
        self._ema_floats = [ema_t[k] for k in floats]
        self._model_floats = [model_t[k].detach() for k in floats]
        self._copied = [(e, model_t[k]) for k, e in ema_t.items() if not e.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """One step: ``ema <- decay * ema + (1 - decay) * model`` (float tensors), integer buffers copied."""
        if self._ema_floats:
            torch._foreach_lerp_(self._ema_floats, self._model_floats, 1.0 - self.decay)
        for e, m in self._copied:
            e.copy_(m)

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()


__all__ = ["ModelEMA"]
