"""Per-position divergences between a target and the student: pure tensor functions, fp32.

Each takes log-probs ``[..., V]`` and returns ``[...]``, summed over the vocabulary; the sampled-token
estimator takes log-probs of the sampled tokens ``[...]``. Zero-mass entries contribute exactly 0.

The ``*_with_grad`` forms return, with the same value, its gradient with respect to the student's
logits ``z`` (``log π_θ = log_softmax(z)``) in closed form, so the fused loss (``aropd.loss``) gets
both from one forward over a chunk instead of an autograd graph over the vocabulary. With
``p = π_θ = softmax(z)`` and ``∂/∂z_u = p_u (∂/∂p_u − Σ_v p_v ∂/∂p_v)``:

| divergence                  | value                     | ``∂ value / ∂z``                              |
|-----------------------------|---------------------------|-----------------------------------------------|
| forward KL ``KL(π* ‖ π_θ)`` | ``Σ π* (log π* − log p)`` | ``p − π*``                                    |
| reverse KL ``KL(π_θ ‖ π*)`` | ``Σ p (log p − log π*)``  | ``p ⊙ ((log p − log π*) − KL)``               |
| JSD_β, ``0 < β < 1``        | ``generalized_jsd``       | ``(1 − β) p ⊙ ((log p − log M) − KL(p ‖ M))`` |
| sampled token at ``y``      | ``e^d − d − 1``           | ``(e^d − 1)(p − onehot(y))``                  |
| cross-entropy on ``y``      | ``−log p(y)``             | ``p − onehot(y)``                             |

with ``d = log π*(y) − log p(y)``. Reverse KL: ``∂/∂p_u = log p_u − log π*_u + 1``, and the
projection removes the constant 1. JSD, with ``M = β π* + (1 − β) p``: ``∂/∂p_u`` of ``β KL(π* ‖ M)``
is ``−β (1 − β) π*_u / M_u`` and of ``(1 − β) KL(p ‖ M)`` is
``(1 − β)(log p_u − log M_u + 1 − (1 − β) p_u / M_u)``; their sum is ``(1 − β)(log p_u − log M_u)``,
as ``β π*_u + (1 − β) p_u = M_u``. Forward KL's gradient assumes a normalized target (``Σ π* = 1``);
entries of zero target mass contribute 0 to every value and gradient.
"""

from __future__ import annotations

import math

import torch


def _kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v))``, with ``0 · log 0 = 0``."""
    p, q = p_logprobs.float(), q_logprobs.float()
    terms = p.exp() * (p - q)
    return torch.where(torch.isneginf(p), 0.0, terms).sum(-1)  # a scalar 0: no zeros tensor, nor its backward


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


def _gather(lp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``lp[..., ids]``: ``[..., V], [...] → [...]``."""
    return lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _masked_dot(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``Σ_v p(v) d(v)`` ``[..., V] → [...]``, consuming ``d``, with ``d = −inf`` (and ``p = 0``) counting 0.

    ``d`` is ``−inf`` only where the distribution ``p`` has zero mass, so clamping it to the lowest finite
    float makes those products exactly ``0 · finite = 0``; one in-place pass instead of a mask and a where.
    """
    return d.clamp_(min=torch.finfo(d.dtype).min).mul_(p).sum(-1)


def forward_kl_with_grad(
    target_logprobs: torch.Tensor, student_logprobs: torch.Tensor, grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``forward_kl`` and its gradient ``π_θ − π*`` w.r.t. the student's logits.

    Args:
        target_logprobs: ``[..., V]`` fp32, normalized; ``−inf`` entries contribute 0.
        student_logprobs: ``[..., V]`` fp32 ``log_softmax`` of the student's logits.
        grad: also return the gradient; False returns None in its place.

    Returns:
        The value ``[...]`` and the gradient ``[..., V]`` (or None).
    """
    t, s = target_logprobs.float(), student_logprobs.float()
    pt = t.exp()
    d = t - s
    value = _masked_dot(pt, d)
    if not grad:
        return value, None
    return value, torch.exp(s, out=d).sub_(pt)  # d's buffer is free again: no new [..., V] tensor


def reverse_kl_with_grad(
    target_logprobs: torch.Tensor, student_logprobs: torch.Tensor, grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``reverse_kl`` and its gradient ``π_θ ⊙ ((log π_θ − log π*) − KL)`` w.r.t. the student's logits.

    Shapes as ``forward_kl_with_grad``. A target with zero mass where the student has some makes the
    value ``+inf`` (as ``reverse_kl``); its gradient is then not finite either.
    """
    t, s = target_logprobs.float(), student_logprobs.float()
    p = s.exp()
    pr = (s - t).mul_(p)  # p (log p − log π*) per entry; p > 0 everywhere the student's logits are finite
    value = pr.sum(-1)
    if not grad:
        return value, None
    return value, pr.addcmul_(p, value.unsqueeze(-1), value=-1.0)


def generalized_jsd_with_grad(
    target_logprobs: torch.Tensor, student_logprobs: torch.Tensor, beta: float = 0.5, grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``generalized_jsd`` and its gradient w.r.t. the student's logits (the ends as forward / reverse KL).

    Inside, ``(1 − β) π_θ ⊙ ((log π_θ − log M) − KL(π_θ ‖ M))``. Shapes as ``forward_kl_with_grad``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd_beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl_with_grad(target_logprobs, student_logprobs, grad)
    if beta == 1.0:
        return reverse_kl_with_grad(target_logprobs, student_logprobs, grad)
    t, s = target_logprobs.float(), student_logprobs.float()
    # The mixture as generalized_jsd computes it, so the value is the same to the bit.
    tb = t + math.log(beta)
    mix = torch.logaddexp(tb, s + math.log1p(-beta))
    kl_t = _masked_dot(torch.exp(t, out=tb), t - mix)  # KL(π* ‖ M): t − log M is −inf only where π* = 0
    pr = s - mix
    p = torch.exp(s, out=mix)  # log M is read: its buffer holds p from here on
    kl_s = pr.mul_(p).sum(-1)  # pr: p (log p − log M) per entry
    value = beta * kl_t + (1 - beta) * kl_s
    if not grad:
        return value, None
    return value, pr.addcmul_(p, kl_s.unsqueeze(-1), value=-1.0).mul_(1 - beta)


def _sub_onehot_(g: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``g − scale · onehot(ids)`` in place: one scatter over ``[...]``, not a ``[..., V]`` one-hot."""
    src = torch.as_tensor(scale, dtype=g.dtype, device=g.device).expand(ids.shape)
    return g.scatter_add_(-1, ids.unsqueeze(-1), -src.unsqueeze(-1))


def sampled_token_kl_with_grad(
    target_logprobs: torch.Tensor, student_logprobs: torch.Tensor, ids: torch.Tensor, grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sampled_token_kl`` at ``ids`` and its gradient ``(e^d − 1)(π_θ − onehot(y))`` w.r.t. the logits.

    ``∂/∂ log π_θ(y)`` of ``e^d − d − 1`` is ``1 − e^d``, and ``∂ log π_θ(y) / ∂z = onehot(y) − π_θ``.
    Only the sampled entries are read for the value; the gradient needs the whole ``π_θ``.

    Args:
        target_logprobs / student_logprobs: ``[..., V]`` fp32.
        ids: ``[...]`` long, the sampled tokens.
    """
    s = student_logprobs.float()
    d = _gather(target_logprobs.float(), ids) - _gather(s, ids)
    em1 = torch.expm1(d)
    value = em1 - d
    if not grad:
        return value, None
    g = s.exp().mul_(em1.unsqueeze(-1))
    return value, _sub_onehot_(g, ids, em1)


def cross_entropy_with_grad(
    student_logprobs: torch.Tensor, ids: torch.Tensor, grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``−log π_θ(y)`` and its gradient ``π_θ − onehot(y)`` w.r.t. the student's logits.

    ``[..., V] fp32, [...] long → [...], [..., V]``.
    """
    s = student_logprobs.float()
    value = -_gather(s, ids)
    if not grad:
        return value, None
    return value, _sub_onehot_(s.exp(), ids)
