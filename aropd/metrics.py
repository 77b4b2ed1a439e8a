"""Validation accuracy by response-length bucket, summed across ranks by torchmetrics."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from aropd.buckets import EDGES, bucket_index


class BucketAccuracy(Metric):
    """Accuracy overall and per length bucket; ``compute() → (accuracy, bucket_accuracy[K], counts[K])``.

    Empty buckets report accuracy 0 with count 0; read the counts before the accuracy.
    """

    full_state_update = False

    def __init__(self, edges: tuple[float, ...] = EDGES) -> None:
        super().__init__()
        self.edges = edges
        k = len(edges) - 1
        self.add_state("correct", torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, lengths: torch.Tensor) -> None:
        idx = bucket_index(lengths, self.edges).to(self.correct.device)
        self.correct += torch.bincount(idx, weights=correct.float().to(idx.device), minlength=len(self.correct)).long()
        self.total += torch.bincount(idx, minlength=len(self.total))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        overall = self.correct.sum().float() / self.total.sum().clamp(min=1)
        return overall, self.correct.float() / self.total.clamp(min=1), self.total
