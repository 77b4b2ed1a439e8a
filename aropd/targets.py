"""Distillation targets: the component that says what the student is distilled toward.

A target maps the teacher's log-probs under the privileged views to the target log-probs
``log π*`` over the vocabulary (fp32, vocabulary last). Its own init arguments are the only place
its parameters live, so the saved config says what trained. ``views`` names the teacher views it
reads; a step scores only those (plus any a requested diagnostic needs).

| method      | target                          |
|-------------|---------------------------------|
| Full OPD    | ``FullView()``                  |
| Partial OPD | ``PartialView()``               |
| AR-OPD      | ``AnchoredResidual(lam, clip)`` |
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class TargetOutput(NamedTuple):
    """A target over ``[..., V]``, with what the diagnostics read from it."""

    logprobs: torch.Tensor  # [..., V] fp32, normalized
    residual: torch.Tensor | None = None  # [..., V] the residual as applied (clipped); None: the target has none
    clipped: torch.Tensor | None = None  # [..., V] bool, entries whose residual was clipped; None: no clip


class Target:
    """Base of the targets. ``__call__(full, partial, details)`` gets None for a view not in ``views``."""

    views: frozenset[str] = frozenset()

    def __call__(
        self, full: torch.Tensor | None, partial: torch.Tensor | None, details: bool = False
    ) -> TargetOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class FullView(Target):
    """Full OPD: the full-view teacher is the target (the anchored residual at λ = 1 with no clip)."""

    views = frozenset({"full"})

    def __call__(self, full, partial, details=False):
        return TargetOutput(full.float())


class PartialView(Target):
    """Partial OPD: the partial-view teacher is the target (the anchored residual at λ = 0)."""

    views = frozenset({"partial"})

    def __call__(self, full, partial, details=False):
        return TargetOutput(partial.float())


def check_lam_clip(lam: float, clip: float | None) -> None:
    problems = []
    if not (math.isfinite(lam) and lam >= 0):  # also rejects NaN and inf
        problems.append(f"lam must be a finite number >= 0, got {lam}")
    if clip is not None and not clip > 0:  # inf is allowed: the same as no clip
        problems.append(f"clip must be > 0 (or null for no clip), got {clip}")
    if problems:
        raise ValueError("; ".join(problems))


class AnchoredResidual(Target):
    """AR-OPD: ``log π* = log_softmax(ℓ_P + λ · clamp(ℓ_F − ℓ_P, −c, c))``."""

    views = frozenset({"full", "partial"})

    def __init__(self, lam: float = 0.8, clip: float | None = 5.0) -> None:
        """
        Args:
            lam: Residual scale λ ≥ 0: 0 is the partial view, 1 (no clip) the full view, > 1 extrapolates past it.
            clip: Residual clip c > 0 in nats; null for no clip.
        """
        check_lam_clip(lam, clip)
        self.lam, self.clip = lam, clip

    def __call__(self, full, partial, details=False):
        return anchored_residual(full, partial, self.lam, self.clip, details)


def anchored_residual(
    full_logprobs: torch.Tensor,
    partial_logprobs: torch.Tensor,
    lam: float = 0.8,
    clip: float | None = 5.0,
    details: bool = False,
) -> TargetOutput:
    """The anchored residual target over the last dimension, and (``details``) its residual and clip mask.

    Args:
        full_logprobs: ``[..., V]`` log-probs of the full-view teacher.
        partial_logprobs: ``[..., V]`` log-probs of the partial-view teacher (the anchor).
        lam: residual scale λ ≥ 0.
        clip: residual clip c > 0 in nats; ``None`` or ``inf`` means no clip.
        details: also return the clipped residual and the clip mask (for the diagnostics).
    """
    check_lam_clip(lam, clip)
    full, partial = full_logprobs.float(), partial_logprobs.float()
    no_clip = clip is None or math.isinf(clip)
    residual = clipped = None
    if details or not (lam == 0 or (lam == 1 and no_clip)):
        # One new [..., V] tensor, worked on in place (each [..., V] pass is a large part of the target's time).
        residual = full - partial
        if details and not no_clip:
            clipped = residual.abs() > clip
        if not no_clip:
            residual.clamp_(-clip, clip)
        # Entries where both views put zero mass give -inf - -inf = NaN: a zero residual, kept at zero mass below.
        residual.nan_to_num_(0.0)
    # The endpoints return their view as is, so they are bit-identical to FullView / PartialView.
    if lam == 0:
        logprobs = partial
    elif lam == 1 and no_clip:
        logprobs = full
    else:
        # ℓ_P + λ·r, in the residual's own buffer unless a diagnostic reads the residual.
        logits = partial + lam * residual if details else residual.mul_(lam).add_(partial)
        # Zero partial mass stays zero (an unclipped +inf residual, nan_to_num'd to the largest float, times
        # λ > 1 would overflow and meet -inf as NaN).
        logprobs = logits.masked_fill_(torch.isneginf(partial), -math.inf).log_softmax(-1)
    return TargetOutput(logprobs, residual if details else None, clipped)


def anchored_residual_target(
    full_logprobs: torch.Tensor, partial_logprobs: torch.Tensor, lam: float = 0.8, clip: float | None = 5.0
) -> torch.Tensor:
    """``log_softmax(ℓ_P + λ · clamp(ℓ_F − ℓ_P, −c, c))``: ``[..., V], [..., V] → [..., V]`` fp32."""
    return anchored_residual(full_logprobs, partial_logprobs, lam, clip).logprobs
