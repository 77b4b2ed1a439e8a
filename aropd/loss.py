"""Chunked, memory-bounded token losses over the vocabulary, and the diagnostics probes they run.

Log-probs are computed from hidden states through the output layer ``chunk_size`` positions at a
time; each chunk runs under activation checkpointing, so neither the forward nor the backward holds
more than one chunk's ``[B, chunk, V]`` fp32 tensors (for the student and both teacher views). The
per-position diagnostics a callback asks for (``Probes``) come out of the same chunk pass, so
callbacks need no second forward; with none asked for, the pass computes the loss alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from aropd import diagnostics as D
from aropd.divergences import forward_kl, generalized_jsd, reverse_kl, sampled_token_kl
from aropd.targets import Target, TargetOutput
from aropd.types import TeacherScores


def _gather(lp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


# Each divergence as (target log-probs [..,V], student log-probs [..,V], sampled ids [..]) -> [..].
DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": lambda t, s, y, beta: forward_kl(t, s),
    "reverse_kl": lambda t, s, y, beta: reverse_kl(t, s),
    "jsd": lambda t, s, y, beta: generalized_jsd(t, s, beta),
    "sampled_token": lambda t, s, y, beta: sampled_token_kl(_gather(t, y), _gather(s, y)),
}


@dataclass(frozen=True)
class Probes:
    """Per-position quantities the diagnostics ask the loss pass for; nothing is computed unasked.

    Each enabled diagnostics callback says which it reads (its ``probes``); the module runs the union.
    """

    sampled: bool = False
    """Log-probs of the sampled token under the student, both views and the target."""
    shift: bool = False
    """The privileged belief shift ``KL(q_F ‖ q_P)``."""
    residual: bool = False
    """The target's clipped residual at the sampled token, and the clip fraction."""
    support_top_p: float | None = None
    """Support mismatch of the full view, the partial view and the target outside the student's top-p nucleus."""

    def __or__(self, other: Probes) -> Probes:
        tops = {p for p in (self.support_top_p, other.support_top_p) if p is not None}
        if len(tops) > 1:
            raise ValueError(f"diagnostics ask for the support mismatch at different top_p: {sorted(tops)}")
        return Probes(self.sampled or other.sampled, self.shift or other.shift, self.residual or other.residual,
                      tops.pop() if tops else None)

    @property
    def any(self) -> bool:
        return self.sampled or self.shift or self.residual or self.support_top_p is not None

    @property
    def views(self) -> frozenset[str]:
        """The teacher views these probes read (beyond the target's own)."""
        both = self.sampled or self.shift or self.support_top_p is not None
        return frozenset({"full", "partial"}) if both else frozenset()


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
    scores: TeacherScores,
    student_head: torch.nn.Module,
    teacher_head: torch.nn.Module,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    target: Target,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    skip_tokens: int = 0,
    chunk_size: int | None = 256,
    probes: Probes = Probes(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distill the student toward the target on its own rollout.

    Args:
        student_hidden: ``[B, T, H]`` student states predicting each completion token (with grad).
        scores: the teacher's ``[B, T, H]`` states per view; the target's views (and the probes') must be there.
        completion_ids / completion_mask: ``[B, T]``.
        target: maps the views' log-probs to ``log π*`` (``aropd.targets``).
        skip_tokens: the first k completion tokens carry no loss.
        probes: the per-position diagnostics to compute in the same chunk pass.

    Returns:
        The scalar loss and a dict of detached per-position ``[B, T]`` diagnostics (``StepRecord``
        fields, ``mismatch`` ``[3, B, T]``), only those the probes asked for.
    """
    missing = sorted(v for v in target.views | probes.views if getattr(scores, v) is None)
    if missing:
        raise ValueError(f"teacher scores lack the view(s) {missing} that {target!r} and the probes need")
    loss_mask = completion_mask.clone()
    loss_mask[:, :skip_tokens] = 0
    div = functools.partial(DIVERGENCES[divergence], beta=jsd_beta)
    out: dict[str, list[torch.Tensor]] = {}
    done: set[int] = set()

    def view_logprobs(hidden: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
        return None if hidden is None else teacher_head(hidden[:, sl]).float().log_softmax(-1)

    def per_position(s_lp: torch.Tensor, sl: slice) -> torch.Tensor:
        y = completion_ids[:, sl]
        with torch.no_grad():
            f_lp, p_lp = view_logprobs(scores.full, sl), view_logprobs(scores.partial, sl)
            t = target(f_lp, p_lp, details=probes.residual)
        per = div(t.logprobs, s_lp, y)
        if probes.any and sl.start not in done:  # first pass only: a checkpoint recomputation must not record twice
            done.add(sl.start)
            with torch.no_grad():
                _record_chunk(out, probes, s_lp.detach(), f_lp, p_lp, t, y)
        return per

    loss = chunked_token_loss(student_hidden, student_head, sequence_weights(loss_mask), per_position, chunk_size)
    return loss, {k: torch.cat(v, dim=-1) for k, v in out.items()}


def _record_chunk(out, probes: Probes, s_lp, f_lp, p_lp, t: TargetOutput, y) -> None:
    rows: dict[str, torch.Tensor] = {}
    if probes.sampled:
        rows.update(student_lp=_gather(s_lp, y), full_lp=_gather(f_lp, y), partial_lp=_gather(p_lp, y),
                    target_lp=_gather(t.logprobs, y))
    if probes.shift:
        rows["shift"] = D.privileged_shift(f_lp, p_lp)
    if probes.residual and t.residual is not None:  # targets without a residual (a single view) have none
        rows["residual"] = _gather(t.residual, y).nan_to_num(0.0)
        rows["clip_frac"] = D.residual_clip_fraction(f_lp, t.clipped)
    if probes.support_top_p is not None:  # one nucleus (one sort) serves all three views
        nucleus = D.nucleus_mask(s_lp, probes.support_top_p)
        rows["mismatch"] = torch.stack([D.mass_outside(lp, nucleus) for lp in (f_lp, p_lp, t.logprobs)])
    for k, v in rows.items():
        out.setdefault(k, []).append(v)
