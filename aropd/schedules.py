"""Learning-rate schedules."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine(LambdaLR):
    """Linear warm-up over ``warmup_ratio`` of the run, then cosine decay to ``min_lr_ratio``.

    ``total_steps=None`` takes the run's length from the trainer (``set_total_steps``), so a recipe
    need not repeat the number of optimizer steps its data and batch size imply.
    """

    def __init__(
        self, optimizer: Optimizer, warmup_ratio: float = 0.1, min_lr_ratio: float = 0.0, total_steps: int | None = None
    ) -> None:
        problems = []
        if not 0 <= warmup_ratio < 1:  # also rejects NaN
            problems.append(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if not 0 <= min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if problems:
            raise ValueError("scheduler: " + "; ".join(problems))
        self.warmup_ratio, self.min_lr_ratio, self.total_steps = warmup_ratio, min_lr_ratio, total_steps
        super().__init__(optimizer, self._factor)

    def set_total_steps(self, total_steps: int) -> None:
        if self.total_steps is None:
            self.total_steps = max(int(total_steps), 1)

    def _factor(self, step: int) -> float:
        total = self.total_steps or 1
        warmup = int(self.warmup_ratio * total)
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
