"""Length / position buckets shared by diagnostics (position in the completion) and validation
(response length): edges 0, 256, 512, 768, 1024, ∞, tagged ``<prefix>_<lo>_<hi>`` (last ``_1024_inf``)."""

from __future__ import annotations

import math

import torch

EDGES: tuple[float, ...] = (0, 256, 512, 768, 1024, math.inf)


def bucket_names(prefix: str, edges: tuple[float, ...] = EDGES) -> list[str]:
    """``["pos_0_256", …, "pos_1024_inf"]`` for ``prefix="pos"``."""
    fmt = lambda e: "inf" if math.isinf(e) else str(int(e))  # noqa: E731
    return [f"{prefix}_{fmt(lo)}_{fmt(hi)}" for lo, hi in zip(edges[:-1], edges[1:])]


def bucket_index(values: torch.Tensor, edges: tuple[float, ...] = EDGES) -> torch.Tensor:
    """Bucket of each value: ``i`` with ``edges[i] <= v < edges[i+1]`` (int64, same shape)."""
    inner = torch.tensor(edges[1:-1], dtype=torch.float64, device=values.device)
    return torch.bucketize(values.to(torch.float64), inner, right=True)
