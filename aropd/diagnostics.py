"""Reliability diagnostics (DESIGN.md §2): pure functions, tensor in, tensor out, no Lightning.

Per-position functions take ``[..., V]`` log-probs (or ``[...]`` log-probs of the sampled token) and
return ``[...]``; masking and reduction are the caller's, so the training step can produce all of
them chunk by chunk alongside the loss.
"""

from __future__ import annotations

import math
import re

import torch

from aropd.divergences import forward_kl


def nucleus_mask(student_logprobs: torch.Tensor, top_p: float = 0.9) -> torch.Tensor:
    """Boolean ``[..., V]``: the student's top-p nucleus, as top-p sampling keeps it.

    Tokens are taken in order of probability while the mass before each is below ``top_p``, so the
    token that crosses ``top_p`` is in (and the most likely token always is).
    """
    probs = student_logprobs.float().exp()
    sorted_p, order = probs.sort(-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def support_mismatch(view_logprobs: torch.Tensor, student_logprobs: torch.Tensor, top_p: float = 0.9) -> torch.Tensor:
    """Mass the view puts outside the student's top-p nucleus: ``1 − Σ_{v∈N} q(v)``, ``[...]`` in [0, 1]."""
    inside = (view_logprobs.float().exp() * nucleus_mask(student_logprobs, top_p)).sum(-1)
    return (1.0 - inside).clamp(0.0, 1.0)


def shortcut_events(
    full_logprob_sampled: torch.Tensor,
    partial_logprob_sampled: torch.Tensor,
    delta: float = math.log(20),
    min_prob: float = 0.5,
) -> torch.Tensor:
    """Boolean ``[...]``: the full view strongly endorses the sampled token and the partial view does not.

    ``log q_F(y) − log q_P(y) ≥ delta`` and ``q_F(y) ≥ min_prob``.
    """
    f, p = full_logprob_sampled.float(), partial_logprob_sampled.float()
    return (f - p >= delta) & (f >= math.log(min_prob))


def privileged_shift(full_logprobs: torch.Tensor, partial_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(q_F ‖ q_P)`` ``[..., V] → [...]``: how far hindsight moves the teacher."""
    return forward_kl(full_logprobs, partial_logprobs)


def residual_clip_fraction(
    full_logprobs: torch.Tensor, partial_logprobs: torch.Tensor, clip: float | None
) -> torch.Tensor:
    """``q_F`` mass on entries whose residual ``|ℓ_F − ℓ_P|`` exceeds ``clip`` ``[..., V] → [...]``."""
    full = full_logprobs.float()
    if clip is None or math.isinf(clip):
        return torch.zeros(full.shape[:-1], dtype=full.dtype, device=full.device)
    clipped = (full - partial_logprobs.float()).abs() > clip
    return (full.exp() * clipped).sum(-1)


def _answer_pattern(answer: str) -> re.Pattern:
    # The answer as a whole token: "7" must not match inside "17" or "7.5".
    return re.compile(r"(?<![\w.])" + re.escape(answer.strip()) + r"(?![\w]|\.\d)")


def early_answer(completion: str, answer: str) -> bool:
    """Does the gold ``answer`` first appear in the first half of ``completion`` (as a whole token)?"""
    if not answer.strip() or not completion:
        return False
    m = _answer_pattern(answer).search(completion)
    return m is not None and m.start() < len(completion) / 2


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D samples (average ranks for ties); NaN when undefined."""
    if x.numel() < 2:
        return float("nan")

    def ranks(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        r = torch.empty_like(v)
        order = v.argsort()
        r[order] = torch.arange(1, len(v) + 1, dtype=torch.float64)
        for val in v.unique():  # average ranks of ties
            tie = v == val
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")
