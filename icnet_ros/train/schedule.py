"""The learning-rate schedule: poly decay with linear warm-up, by iteration."""
from __future__ import annotations

from typing import Any

import torch


class PolyLR:
    """``lr(i) = (lr - min_lr) * (1 - i / iterations) ** power + min_lr``, with optional linear warm-up from
    ``warmup_ratio * lr`` over the first ``warmup_iters``. Applied to every parameter group before each step."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, iterations: int, power: float = 0.9,
                 min_lr: float = 0.0, warmup_iters: int = 0, warmup_ratio: float = 0.1) -> None:
        self.optimizer = optimizer
        self.base_lr, self.iterations, self.power, self.min_lr = lr, iterations, power, min_lr
        self.warmup_iters, self.warmup_ratio = warmup_iters, warmup_ratio
        self.last_iter = -1

    def lr_at(self, i: int) -> float:
        frac = min(i, self.iterations) / self.iterations
        lr = (self.base_lr - self.min_lr) * (1.0 - frac) ** self.power + self.min_lr
        if i < self.warmup_iters:
            lr *= self.warmup_ratio + (1.0 - self.warmup_ratio) * i / self.warmup_iters
        return lr

    def step(self, i: int) -> float:
        """Set the learning rate of iteration ``i`` (0-based) and return it."""
        lr = self.lr_at(i)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_iter = i
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"base_lr": self.base_lr, "iterations": self.iterations, "power": self.power, "min_lr": self.min_lr,
                "warmup_iters": self.warmup_iters, "warmup_ratio": self.warmup_ratio, "last_iter": self.last_iter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_iter = int(state["last_iter"])
