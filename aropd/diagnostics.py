"""Reliability diagnostics (docs/diagnostics.md): pure functions, tensor in, tensor out, no Lightning.

Per-position functions take ``[..., V]`` log-probs (or ``[...]`` log-probs of the sampled token) and
return ``[...]``; masking and reduction are the caller's, so the training step can produce all of
them chunk by chunk alongside the loss.
"""

from __future__ import annotations

import math
import re

import torch

from aropd.divergences import forward_kl

BOUNDARY_TOL = 1e-6  # nats; see shortcut_events


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _sorted_descending(probs: torch.Tensor) -> torch.Tensor:
    """The values of ``probs`` sorted in descending order along the last dim (no indices).

    On CPU, NumPy's value-only sort (SIMD) is ~30x faster than ``torch.sort``, which always builds
    the index tensor too; elsewhere ``torch.sort``. Both give the same values.
    """
    if probs.device.type == "cpu" and probs.dtype in (torch.float32, torch.float64) and probs.numel():
        import numpy as np

        return torch.from_numpy(np.ascontiguousarray(np.sort(probs.detach().numpy(), axis=-1)[..., ::-1]))
    return probs.sort(-1, descending=True).values


def nucleus_mask(student_logprobs: torch.Tensor, top_p: float = 0.9) -> torch.Tensor:
    """Boolean ``[..., V]``: the student's top-p nucleus, as top-p sampling keeps it.

    Tokens are taken in order of probability while the mass before each is below ``top_p``, so the
    token that crosses ``top_p`` is in (and the most likely token always is). Tokens of equal
    probability are taken in vocabulary order (top-p sampling's own order among ties is arbitrary).

    Computed as a threshold: the nucleus size ``n`` comes from the sorted probabilities, then a token
    is in if its probability is above the ``n``-th largest ``τ``, or equal to it and among the first
    ``n − #{p > τ}`` such tokens — the same set as scattering a sorted mask back, without the indices.
    """
    probs = student_logprobs.float().exp()
    if probs.shape[-1] == 0:
        return torch.zeros_like(probs, dtype=torch.bool)
    sorted_p = _sorted_descending(probs).to(probs.device)
    # Mass before each token as the exclusive running sum (not cumsum − p, whose rounding can slip a
    # token whose mass-before equals top_p into the nucleus).
    before = sorted_p.cumsum(-1)[..., :-1] < top_p
    n = 1 + before.sum(-1, keepdim=True)  # the kept tokens form a prefix of the sorted order
    tau = sorted_p.gather(-1, n - 1)
    above = probs > tau
    tied = probs == tau
    need = n - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1) <= need))


def support_mismatch(view_logprobs: torch.Tensor, student_logprobs: torch.Tensor, top_p: float = 0.9) -> torch.Tensor:
    """Mass the view puts outside the student's top-p nucleus: ``1 − Σ_{v∈N} q(v)``, ``[...]`` in [0, 1]."""
    return mass_outside(view_logprobs, nucleus_mask(student_logprobs, top_p))


def mass_outside(view_logprobs: torch.Tensor, nucleus: torch.Tensor) -> torch.Tensor:
    """``1 − Σ_{v∈N} q(v)`` for a given boolean nucleus ``[..., V]`` (broadcast), clamped to [0, 1]."""
    inside = (view_logprobs.float().exp() * nucleus).sum(-1)
    return (1.0 - inside).clamp(0.0, 1.0)


def shortcut_events(
    full_logprob_sampled: torch.Tensor,
    partial_logprob_sampled: torch.Tensor,
    delta: float = math.log(20),
    min_prob: float = 0.5,
) -> torch.Tensor:
    """Boolean ``[...]``: the full view strongly endorses the sampled token and the partial view does not.

    ``log q_F(y) − log q_P(y) ≥ delta`` and ``q_F(y) ≥ min_prob``. Both thresholds are inclusive, up to
    ``BOUNDARY_TOL`` nats: fp32 log-probs of probabilities exactly on a threshold (``q_F = 0.5``,
    ``q_F / q_P = 20``) land within a few ulps of it on either side, and they count as on it.
    """
    f, p = _at_least_fp32(full_logprob_sampled), _at_least_fp32(partial_logprob_sampled)
    min_logprob = math.log(min_prob) if min_prob > 0 else -math.inf
    return (f - p >= delta - BOUNDARY_TOL) & (f >= min_logprob - BOUNDARY_TOL)


def privileged_shift(full_logprobs: torch.Tensor, partial_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(q_F ‖ q_P)`` ``[..., V] → [...]``: how far hindsight moves the teacher."""
    return forward_kl(full_logprobs, partial_logprobs)


def residual_clip_fraction(full_logprobs: torch.Tensor, clipped: torch.Tensor | None) -> torch.Tensor:
    """``q_F`` mass on the entries the target clipped (its ``clipped`` mask; None: it clips nothing).

    ``[..., V], [..., V] bool → [...]``.
    """
    full = full_logprobs.float()
    if clipped is None:
        return torch.zeros(full.shape[:-1], dtype=full.dtype, device=full.device)
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


def early_answer_rate(completions: list[str], answers: list[str]) -> tuple[int, int]:
    """``(rollouts with an early answer, rollouts)`` over paired completions and gold answers."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    return sum(early_answer(c, a) for c, a in zip(completions, answers)), len(completions)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is set (over all dims); 0, not NaN, when nothing is."""
    mask = mask.to(values.dtype) if values.is_floating_point() else mask.float()
    return (values * mask).sum() / mask.sum().clamp(min=1)


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties given their average rank (float64)."""
    sorted_v, order = v.double().sort(stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2  # mean of start+1 … end
    ranks = torch.empty_like(sorted_v)
    ranks[order] = avg[inverse]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D samples (average ranks for ties); NaN when undefined
    (fewer than 2 points, or either sample constant)."""
    x, y = x.flatten(), y.flatten()
    if x.numel() != y.numel():
        raise ValueError(f"samples differ in size: {x.numel()} vs {y.numel()}")
    if x.numel() < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def quartile_means(key: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` within each quartile of ``key`` (1-D, paired): ``[4]``, float64.

    Quartiles by rank: samples sorted by ``key`` (stably, so ties keep their order) and split into four
    groups whose sizes differ by at most one; needs at least 4 samples (else all NaN).
    """
    key, values = key.flatten(), values.flatten().double()
    if key.numel() < 4:
        return torch.full((4,), float("nan"), dtype=torch.float64, device=values.device)
    order = key.double().sort(stable=True).indices
    return torch.stack([g.mean() for g in values[order].tensor_split(4)])
