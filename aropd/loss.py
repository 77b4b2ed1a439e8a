"""Chunked, memory-bounded token losses over the vocabulary, and the step record for diagnostics.

Log-probs are computed from hidden states through the output layer ``chunk_size`` positions at a
time; each chunk runs under activation checkpointing, so neither the forward nor the backward holds
more than one chunk's ``[B, chunk, V]`` fp32 tensors (for the student and both teacher views). The
per-position diagnostics come out of the same chunk pass, so callbacks need no second forward.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from aropd import diagnostics as D
from aropd.divergences import forward_kl, generalized_jsd, reverse_kl, sampled_token_kl


def _gather(lp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


# Each divergence as (target log-probs [..,V], student log-probs [..,V], sampled ids [..]) -> [..].
DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": lambda t, s, y, beta: forward_kl(t, s),
    "reverse_kl": lambda t, s, y, beta: reverse_kl(t, s),
    "jsd": lambda t, s, y, beta: generalized_jsd(t, s, beta),
    "sampled_token": lambda t, s, y, beta: sampled_token_kl(_gather(t, y), _gather(s, y)),
}


class StepRecord(NamedTuple):
    """Per-position scalars of one training step, ``[B, T]`` unless noted; detached, fp32.

    ``mask`` is the completion mask (every completion token, skipped ones included).
    """

    mask: torch.Tensor
    completion_ids: torch.Tensor  # [B, T] long
    student_lp: torch.Tensor  # log π_θ(y_t)
    full_lp: torch.Tensor  # log q_F(y_t)
    partial_lp: torch.Tensor  # log q_P(y_t)
    target_lp: torch.Tensor  # log π*(y_t)
    kl: torch.Tensor  # KL(π* ‖ π_θ) per position
    shift: torch.Tensor  # KL(q_F ‖ q_P) per position
    clip_frac: torch.Tensor  # q_F mass on clipped entries
    residual: torch.Tensor  # clipped ℓ_F − ℓ_P at y_t
    mismatch: torch.Tensor | None  # [3, B, T]: support mismatch of full, partial, target (None when off)
    privileged_len: torch.Tensor  # [B] full-view prompt tokens minus student prompt tokens
    answers: list[str]  # gold final answers


def sequence_weights(mask: torch.Tensor) -> torch.Tensor:
    """Weights ``[B, T]`` that make ``Σ w · loss`` the mean over tokens per sequence, then over sequences.

    Sequences with no loss token get weight 0 (no NaN); if none has any, all weights are 0.
    """
    mask = mask.float()
    tokens = mask.sum(-1, keepdim=True)
    valid = (tokens > 0).float()
    return mask * valid / tokens.clamp(min=1) / valid.sum().clamp(min=1)


def _chunks(length: int, chunk_size: int | None):
    step = length if not chunk_size else chunk_size
    return [slice(i, min(i + step, length)) for i in range(0, max(length, 1), max(step, 1))]


def chunked_token_loss(
    student_hidden: torch.Tensor,
    head: torch.nn.Module,
    weights: torch.Tensor,
    per_position: Callable[[torch.Tensor, slice], torch.Tensor],
    chunk_size: int | None,
) -> torch.Tensor:
    """``Σ_{b,t} weights · per_position(log π_θ)`` computed ``chunk_size`` positions at a time.

    Args:
        student_hidden: ``[B, T, H]`` hidden states before the output layer (with grad).
        head: the student's output layer.
        weights: ``[B, T]`` loss weights (zero where masked).
        per_position: ``(student_logprobs [B, c, V], positions) → [B, c]`` per-position loss. It may be
            called twice per chunk (checkpoint recomputation); side effects must tolerate that.
        chunk_size: positions per chunk; ``None`` computes all positions at once, without checkpointing.
    """
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for sl in _chunks(student_hidden.shape[1], chunk_size):

        def chunk_loss(h: torch.Tensor, sl: slice = sl) -> torch.Tensor:
            lp = head(h).float().log_softmax(-1)
            per = per_position(lp, sl)
            w = weights[:, sl]
            return torch.where(w > 0, per * w, torch.zeros_like(per)).sum()

        h = student_hidden[:, sl]
        total = total + (checkpoint(chunk_loss, h, use_reentrant=False) if chunk_size else chunk_loss(h))
    return total


def sft_loss(student_hidden, head, target_ids, mask, chunk_size: int | None) -> torch.Tensor:
    """Cross-entropy on the reference response: mean over its tokens, then over sequences."""
    return chunked_token_loss(
        student_hidden, head, sequence_weights(mask), lambda lp, sl: -_gather(lp, target_ids[:, sl]), chunk_size
    )


def distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: torch.nn.Module,
    teacher_head: torch.nn.Module,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    target_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    clip: float | None,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    skip_tokens: int = 0,
    chunk_size: int | None = 256,
    support_top_p: float | None = 0.9,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distill the student toward the target on its own rollout.

    Args:
        student_hidden: ``[B, T, H]`` student states predicting each completion token (with grad).
        teacher_hidden: ``[2B, T, H]`` teacher states, full view rows first, then partial view rows.
        completion_ids / completion_mask: ``[B, T]``.
        target_fn: ``(ℓ_F, ℓ_P) → log π*`` over ``[..., V]``.
        clip: residual clip used by the target (for the clip fraction and the clipped residual).
        skip_tokens: the first k completion tokens carry no loss.

    Returns:
        The scalar loss and a dict of detached per-position ``[B, T]`` diagnostics (``StepRecord``
        fields), computed in the same chunk pass.
    """
    B, T = completion_ids.shape
    loss_mask = completion_mask.clone()
    loss_mask[:, :skip_tokens] = 0
    div = functools.partial(DIVERGENCES[divergence], beta=jsd_beta)
    out: dict[str, list[torch.Tensor]] = {}
    done: set[int] = set()

    def per_position(s_lp: torch.Tensor, sl: slice) -> torch.Tensor:
        y = completion_ids[:, sl]
        with torch.no_grad():
            f_lp = teacher_head(teacher_hidden[:B, sl]).float().log_softmax(-1)
            p_lp = teacher_head(teacher_hidden[B:, sl]).float().log_softmax(-1)
            t_lp = target_fn(f_lp, p_lp)
        per = div(t_lp, s_lp, y)
        if sl.start not in done:  # first pass only: a checkpoint recomputation must not record twice
            done.add(sl.start)
            with torch.no_grad():
                _record_chunk(out, s_lp.detach(), f_lp, p_lp, t_lp, y, clip, support_top_p)
        return per

    loss = chunked_token_loss(student_hidden, student_head, sequence_weights(loss_mask), per_position, chunk_size)
    return loss, {k: torch.cat(v, dim=-1) for k, v in out.items()}


def _record_chunk(out, s_lp, f_lp, p_lp, t_lp, y, clip, top_p) -> None:
    residual = f_lp - p_lp
    if clip is not None:
        residual = residual.clamp(-clip, clip)
    rows = {
        "student_lp": _gather(s_lp, y),
        "full_lp": _gather(f_lp, y),
        "partial_lp": _gather(p_lp, y),
        "target_lp": _gather(t_lp, y),
        "kl": forward_kl(t_lp, s_lp),
        "shift": D.privileged_shift(f_lp, p_lp),
        "clip_frac": D.residual_clip_fraction(f_lp, p_lp, clip),
        "residual": _gather(residual, y).nan_to_num(0.0),
    }
    if top_p is not None:  # one nucleus (one sort) serves all three views
        nucleus = D.nucleus_mask(s_lp, top_p)
        rows["mismatch"] = torch.stack([D.mass_outside(lp, nucleus) for lp in (f_lp, p_lp, t_lp)])
    for k, v in rows.items():
        out.setdefault(k, []).append(v)
