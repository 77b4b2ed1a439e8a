"""Per-position divergences between a target and the student: pure tensor functions, fp32.

Each takes log-probs ``[..., V]`` and returns ``[...]``, summed over the vocabulary; the sampled-token
estimator takes log-probs of the sampled tokens ``[...]``. Zero-mass entries contribute exactly 0.
"""

from __future__ import annotations

import math

import torch


def _kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v))``, with ``0 · log 0 = 0``."""
    p, q = p_logprobs.float(), q_logprobs.float()
    terms = p.exp() * (p - q)
    return torch.where(torch.isneginf(p), torch.zeros_like(terms), terms).sum(-1)


def forward_kl(target_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(π* ‖ π_θ)``: mass-covering, the default. ``[..., V], [..., V] → [...]``."""
    return _kl(target_logprobs, student_logprobs)


def reverse_kl(target_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(π_θ ‖ π*)``: mode-seeking. ``[..., V], [..., V] → [...]``."""
    return _kl(student_logprobs, target_logprobs)


def generalized_jsd(target_logprobs: torch.Tensor, student_logprobs: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized Jensen–Shannon divergence of GKD (Agarwal et al., 2024), as TRL defines it.

    ``M = β π* + (1 − β) π_θ``; ``JSD_β = β KL(π* ‖ M) + (1 − β) KL(π_θ ‖ M)``. The interior tends to
    0 at both ends, so the ends are defined as their limits' usual stand-ins: β = 0 is forward KL and
    β = 1 reverse KL. ``[..., V], [..., V] → [...]``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd_beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(target_logprobs, student_logprobs)
    if beta == 1.0:
        return reverse_kl(target_logprobs, student_logprobs)
    t, s = target_logprobs.float(), student_logprobs.float()
    mix = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
    return beta * _kl(t, mix) + (1 - beta) * _kl(s, mix)


def sampled_token_kl(target_logprob: torch.Tensor, student_logprob: torch.Tensor) -> torch.Tensor:
    """``exp(d) − d − 1`` with ``d = log π*(y_t) − log π_θ(y_t)`` on the sampled tokens ``[...] → [...]``.

    Non-negative, and an unbiased estimate of ``KL(π_θ ‖ π*)`` when ``y_t ~ π_θ`` (Schulman's k3);
    it needs only the teacher's log-prob of the sampled token.
    """
    d = target_logprob.float() - student_logprob.float()
    return torch.expm1(d) - d
