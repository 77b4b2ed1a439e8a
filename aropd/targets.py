"""Distillation targets over the vocabulary: pure tensor functions, fp32, vocabulary last."""

from __future__ import annotations

import math

import torch


def check_lam_clip(lam: float, clip: float | None) -> None:
    if not lam >= 0:  # also rejects NaN
        raise ValueError(f"lam must be >= 0, got {lam}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 (or None for no clip), got {clip}")


def anchored_residual_target(
    full_logprobs: torch.Tensor, partial_logprobs: torch.Tensor, lam: float = 0.8, clip: float | None = 5.0
) -> torch.Tensor:
    """``log_softmax(ℓ_P + λ · clamp(ℓ_F − ℓ_P, −c, c))`` over the last dimension.

    Args:
        full_logprobs: ``[..., V]`` log-probs of the full-view teacher.
        partial_logprobs: ``[..., V]`` log-probs of the partial-view teacher (the anchor).
        lam: residual scale λ ≥ 0. 0 is the partial view, 1 (no clip) the full view, > 1 extrapolates.
        clip: residual clip c > 0 in nats; ``None`` or ``inf`` means no clip.

    Returns:
        ``[..., V]`` fp32 normalized target log-probs.
    """
    check_lam_clip(lam, clip)
    full, partial = full_logprobs.float(), partial_logprobs.float()
    no_clip = clip is None or math.isinf(clip)
    # The endpoints return their view as is, so the Partial/Full OPD presets are bit-identical to it.
    if lam == 0:
        return partial
    if lam == 1 and no_clip:
        return full
    residual = full - partial
    if not no_clip:
        residual = residual.clamp(-clip, clip)
    # Entries where both views put zero mass give -inf - -inf = NaN; they stay at zero mass.
    logits = torch.where(torch.isneginf(partial), partial, partial + lam * residual.nan_to_num(0.0))
    return logits.log_softmax(-1)
