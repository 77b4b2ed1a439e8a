"""Chunked, memory-bounded token losses over the vocabulary, fused with their gradient, and the
diagnostics probes they run.

For each chunk of ``chunk_size`` positions one pass computes, without an autograd graph, the teacher
views' log-probs, the target, the student's logits, the per-position loss and its gradient with
respect to the student's logits in closed form (``aropd.divergences``, ``*_with_grad``); the
logit gradient is contracted at once with the output layer into the gradients of the student's hidden
states and of the output layer's weight, and only those outlive the chunk. So neither forward nor
backward holds more than one chunk's ``[B, chunk, V]`` fp32 tensors, and backward recomputes nothing:
it scales the stored gradients. The per-position diagnostics a callback asks for (``Probes``)
come out of the same pass, so callbacks need no second forward; with none asked for, the pass
computes the loss alone.

An output layer sharded as a DTensor (FSDP2) takes the autograd path instead: through the module's
own forward and backward (which gather the shards and reduce-scatter the gradient), each chunk under
activation checkpointing, its backward recomputing the chunk; only the logit gradient is still the
closed form. Contracting a gradient with a sharded weight is FSDP's business, not this module's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from aropd import diagnostics as D
from aropd.divergences import (
    cross_entropy_with_grad,
    forward_kl_with_grad,
    generalized_jsd_with_grad,
    reverse_kl_with_grad,
    sampled_token_kl_with_grad,
)
from aropd.targets import Target, TargetOutput
from aropd.types import TeacherScores


def _gather(lp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


# Each divergence as (target log-probs [.., V], student log-probs [.., V], sampled ids [..], jsd β, grad)
# -> (per-position value [..], its gradient w.r.t. the student's logits [.., V] or None when not grad).
DIVERGENCES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {
    "forward_kl": lambda t, s, y, beta, grad: forward_kl_with_grad(t, s, grad),
    "reverse_kl": lambda t, s, y, beta, grad: reverse_kl_with_grad(t, s, grad),
    "jsd": lambda t, s, y, beta, grad: generalized_jsd_with_grad(t, s, beta, grad),
    "sampled_token": lambda t, s, y, beta, grad: sampled_token_kl_with_grad(t, s, y, grad),
}

ChunkTerms = Callable[[torch.Tensor, slice, bool], tuple[torch.Tensor, torch.Tensor | None]]
"""``(student log-probs [B, c, V] fp32, positions, grad) → (loss [B, c], ∂loss/∂logits [B, c, V] or None)``.

Called once per chunk, under ``no_grad``, and (on the sharded path) once more when backward recomputes
the chunk; side effects must tolerate that. It must not modify the log-probs it is given.
"""


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


def _weigh(per: torch.Tensor, grad: torch.Tensor | None, weights: torch.Tensor):
    """A chunk's ``Σ w · per`` and its logit gradient scaled by ``w`` per position (in place).

    Positions of weight 0 give exactly 0 to both, even where their terms are not finite (a padded
    position whose target has zero mass on a token the student likes, under reverse KL).

    Args:
        per: ``[B, c]`` per-position loss.
        grad: ``[B, c, V]`` its gradient w.r.t. the logits, or None.
        weights: ``[B, c]`` loss weights.

    Returns:
        The scalar ``Σ w · per`` and the weighted gradient ``[B, c, V]`` (``grad`` itself) or None.
    """
    keep = weights > 0
    loss = torch.where(keep, per * weights, 0.0).sum()
    if grad is not None:
        grad = grad.mul_(weights.unsqueeze(-1))
        # Finite terms have finite gradients, which the 0 weight has zeroed; only rows whose value is not
        # finite (reverse KL toward zero target mass) can hold inf · 0 = NaN, so only they are cleared,
        # rather than a masked pass over the whole [B, c, V] chunk.
        bad = ~(keep | per.isfinite())
        if bad.any():
            grad[bad] = 0.0
    return loss, grad


def _fused_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weights: torch.Tensor,
    terms: ChunkTerms,
    chunk_size: int | None,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The loss through a linear output layer and, as ``need`` says, its gradients, chunk by chunk.

    Args:
        hidden: ``[B, T, H]`` states before the output layer.
        weight / bias: the output layer's ``[V, H]`` weight and ``[V]`` bias (or None).
        weights: ``[B, T]`` loss weights.
        need: whether to compute the gradient w.r.t. hidden, weight, bias.

    Returns:
        The fp32 scalar loss and the gradients ``[B, T, H]``, ``[V, H]``, ``[V]`` in their inputs' dtypes,
        fp16 held as fp32 (``_held``); None where not needed. Each chunk's fp32 logit gradient is
        contracted with the layer at once (``∂/∂h = g W``, ``∂/∂W += gᵀ h``, ``∂/∂b += Σ g``) and dropped,
        so what outlives a chunk is the size of the inputs, never ``[B, T, V]``; keeping the logit
        gradients for backward instead would hold ``T · V`` of them per row. The weight's gradient sums
        over chunks in fp32.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    grad_h = torch.zeros_like(hidden, dtype=_held(hidden.dtype)) if need[0] else None
    grad_w = grad_b = None
    # The logits in the dtype F.linear would give (autocast's, if on); the gradient products in the same,
    # but fp16 as fp32: they run before the loss scale of fp16 mixed precision reaches the gradient,
    # whose small entries would underflow in fp16. Our casts are explicit and made once, with autocast
    # off around our own products; the teacher and the target (``terms``) run under the caller's autocast.
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    grad_dtype = _held(dtype)
    own = functools.partial(torch.autocast, device, enabled=False)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    w_grad = w.to(grad_dtype)
    for sl in _chunks(hidden.shape[1], chunk_size):  # at least one, if empty: every gradient gets made
        h = hidden[:, sl]
        with own():
            s_lp = F.linear(h.to(dtype), w, b).float().log_softmax(-1)  # the logits are not kept alongside
        per, g = terms(s_lp, sl, any(need))
        del s_lp
        loss, g = _weigh(per, g, weights[:, sl])
        total = total + loss
        if g is None:
            continue
        with own():
            g = g.to(grad_dtype)
            if need[0]:
                grad_h[:, sl] = g @ w_grad
            g2 = g.reshape(-1, g.shape[-1])
            if need[1]:
                h2 = h.reshape(-1, h.shape[-1]).to(grad_dtype)
                if grad_w is None:
                    grad_w = (g2.T @ h2).float()
                elif grad_dtype == torch.float32:
                    grad_w.addmm_(g2.T, h2)  # no [V, H] temporary
                else:
                    grad_w.add_(g2.T @ h2)
            if need[2]:
                part = g2.float().sum(0)
                grad_b = part if grad_b is None else grad_b.add_(part)
    return (total, grad_h, None if grad_w is None else grad_w.to(_held(weight.dtype)),
            None if grad_b is None else grad_b.to(_held(bias.dtype)))


def _held(dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient waits for backward in: fp16 as fp32, since it is not yet multiplied by the
    incoming gradient (a loss scale, under fp16 mixed precision) and small entries would underflow."""
    return torch.float32 if dtype == torch.float16 else dtype


class _FusedLinearLoss(torch.autograd.Function):
    """``Σ weights · terms`` through a linear output layer, its gradients computed in the forward.

    Backward scales the stored gradients by the incoming one and hands them over (in place, without a
    copy), so it runs once: a second backward through the same graph is an error.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, weights, terms, chunk_size):
        total, *ctx.grads = _fused_pass(hidden, weight, bias, weights, terms, chunk_size, ctx.needs_input_grad[:3])
        ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias)]
        return total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("the fused loss hands its gradients over on the first backward; it has no second")
        grads, ctx.grads = ctx.grads, None
        out = (None if g is None else g.mul_(grad_out).to(dtype) for g, dtype in zip(grads, ctx.dtypes))
        return (*out, None, None, None)


class _LogitsLoss(torch.autograd.Function):
    """A chunk's ``Σ weights · terms`` from its logits ``[B, c, V]``, the logit gradient made in the forward.

    The sharded path's: autograd takes the gradient on through the output layer's own backward.
    """

    @staticmethod
    def forward(ctx, logits, weights, terms, sl):
        per, g = terms(logits.float().log_softmax(-1), sl, ctx.needs_input_grad[0])
        loss, g = _weigh(per, g, weights)
        # save_for_backward, not a ctx attribute, so that activation checkpointing drops it until backward
        ctx.save_for_backward(None if g is None else g.to(_held(logits.dtype)))
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return (None if g is None else (g * grad_out).to(ctx.dtype)), None, None, None


def _is_dtensor(t: torch.Tensor | None) -> bool:
    if t is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _fusable(head: torch.nn.Module) -> bool:
    """A plain ``nn.Linear`` with plain tensors and no hooks: ``F.linear`` with its parameters is its forward.

    FSDP2 makes its modules a subclass (and their parameters DTensors); other subclasses (quantized
    layers), hooks and a forward replaced on the instance (accelerate's offloading) change the forward,
    so all of those take the module's own.
    """
    return (type(head) is torch.nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
            and "forward" not in vars(head) and not any(_is_dtensor(p) for p in (head.weight, head.bias)))


def token_loss(
    student_hidden: torch.Tensor,
    head: torch.nn.Module,
    weights: torch.Tensor,
    terms: ChunkTerms,
    chunk_size: int | None,
) -> torch.Tensor:
    """``Σ_{b,t} weights · terms(log π_θ)`` computed ``chunk_size`` positions at a time.

    A plain ``nn.Linear`` head (tied or not) takes the fused pass: loss and gradients in one forward,
    backward only scales them. Any other head (see ``_fusable``; one sharded by FSDP2, whose weight is
    a DTensor, above all) runs through the module's own forward and backward, as FSDP gathers and
    reduce-scatters around the module, with each chunk under activation checkpointing (its backward
    recomputes the chunk: teacher views, target and student logits) and the same closed-form logit
    gradient.

    Args:
        student_hidden: ``[B, T, H]`` hidden states before the output layer (with grad).
        head: the student's output layer.
        weights: ``[B, T]`` loss weights (zero where masked).
        terms: the per-chunk loss and logit gradient (``ChunkTerms``).
        chunk_size: positions per chunk; ``None`` computes all positions at once (and, on the sharded
            path, without checkpointing).

    Returns:
        The fp32 scalar loss.
    """
    if _fusable(head):
        weight, bias = head.weight, head.bias
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (student_hidden, weight, bias)):
            return _FusedLinearLoss.apply(student_hidden, weight, bias, weights, terms, chunk_size)
        with torch.no_grad():  # nothing to differentiate (validation): the loss alone
            return _fused_pass(student_hidden, weight, bias, weights, terms, chunk_size, (False, False, False))[0]
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for sl in _chunks(student_hidden.shape[1], chunk_size):

        def chunk_loss(h: torch.Tensor, sl: slice = sl) -> torch.Tensor:
            return _LogitsLoss.apply(head(h), weights[:, sl], terms, sl)

        h = student_hidden[:, sl]
        total = total + (checkpoint(chunk_loss, h, use_reentrant=False) if chunk_size else chunk_loss(h))
    return total


def sft_loss(student_hidden, head, target_ids, mask, chunk_size: int | None) -> torch.Tensor:
    """Cross-entropy on the reference response: mean over its tokens, then over sequences.

    Args:
        student_hidden: ``[B, T, H]`` student states predicting each reference token (with grad).
        head: the student's output layer.
        target_ids / mask: ``[B, T]``.
        chunk_size: positions per chunk (``token_loss``).

    Returns:
        The fp32 scalar loss.
    """
    return token_loss(
        student_hidden, head, sequence_weights(mask),
        lambda lp, sl, grad: cross_entropy_with_grad(lp, target_ids[:, sl], grad), chunk_size,
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
    rollout_logprobs: torch.Tensor | None = None,
    importance_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distill the student toward the target on its own rollout.

    Args:
        student_hidden: ``[B, T, H]`` student states predicting each completion token (with grad).
        scores: the teacher's ``[B, T, H]`` states per view; the target's views (and the probes') must be there.
        completion_ids / completion_mask: ``[B, T]``.
        target: maps the views' log-probs to ``log π*`` (``aropd.targets``).
        skip_tokens: the first k completion tokens carry no loss.
        probes: the per-position diagnostics to compute in the same chunk pass.
        rollout_logprobs: ``[B, T]`` log-probs of the sampled tokens under the policy that sampled them
            (an engine's copy of the student); given, the result has ``rollout_gap`` = ``|log π_θ(y_t) −
            rollout_logprobs|`` per position, from this pass's student log-probs.
        importance_cap: with ``rollout_logprobs``, each position's loss (and gradient) is multiplied by the
            truncated importance weight ``min(π_θ(y_t) / π_rollout(y_t), importance_cap)``, held constant.

    Returns:
        The scalar loss and a dict of detached per-position ``[B, T]`` diagnostics (``StepRecord``
        fields, ``mismatch`` ``[3, B, T]``), only those the probes asked for, and ``rollout_gap``.
    """
    if importance_cap is not None and rollout_logprobs is None:
        raise ValueError("importance_cap needs the rollout's log-probs (an engine that keeps them)")
    missing = sorted(v for v in target.views | probes.views if getattr(scores, v) is None)
    if missing:
        raise ValueError(f"teacher scores lack the view(s) {missing} that {target!r} and the probes need")
    loss_mask = completion_mask.clone()
    loss_mask[:, :skip_tokens] = 0
    div = functools.partial(DIVERGENCES[divergence], beta=jsd_beta)
    out: dict[str, list[torch.Tensor]] = {}
    done: set[int] = set()

    def view_logprobs(hidden: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
        # A view's states are a strided slice of the teacher's output; matmul does not fold a strided
        # [B, c, H] into one matrix product but runs a batched one against the weight expanded B times
        # (~1.2x the time at V = 8192). The copy is [B, c, H], small beside the [B, c, V] product.
        return None if hidden is None else teacher_head(hidden[:, sl].contiguous()).float().log_softmax(-1)

    def terms(s_lp: torch.Tensor, sl: slice, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        y = completion_ids[:, sl]
        f_lp, p_lp = view_logprobs(scores.full, sl), view_logprobs(scores.partial, sl)
        t = target(f_lp, p_lp, details=probes.residual)
        t_lp = t.logprobs
        first = sl.start not in done  # a checkpoint recomputation must not record twice
        done.add(sl.start)
        record = probes.any and first
        if record:
            rows = _residual_rows(probes, f_lp, t, y)
        del t  # its residual and clip mask go before the other probes make their [B, c, V] tensors
        if record:
            # The student's log-probs, the views and the target are the loss's own, computed once.
            _record_chunk(out, probes, rows, s_lp, f_lp, p_lp, t_lp, y)
        del f_lp, p_lp  # the views go before the divergence makes its tensors
        per, g = div(t_lp, s_lp, y, grad=grad)
        if rollout_logprobs is None:
            return per, g
        log_ratio = _gather(s_lp, y) - rollout_logprobs[:, sl]
        if first:
            out.setdefault("rollout_gap", []).append(log_ratio.abs())
        if importance_cap is not None:
            # A constant weight per position (no gradient through the ratio), as in truncated IS for
            # off-policy corrections: it rescales what each sampled token teaches, not the target.
            w = log_ratio.exp().clamp(max=importance_cap)
            per = per * w
            if g is not None:
                g = g.mul_(w.unsqueeze(-1))
        return per, g

    loss = token_loss(student_hidden, student_head, sequence_weights(loss_mask), terms, chunk_size)
    return loss, {k: torch.cat(v, dim=-1) for k, v in out.items()}


def _residual_rows(probes: Probes, f_lp, t: TargetOutput, y) -> dict[str, torch.Tensor]:
    """The residual probe's rows ``[B, c]``: the target's residual at the sampled token, the clip fraction."""
    if not probes.residual or t.residual is None:  # targets without a residual (a single view) have none
        return {}
    return {"residual": _gather(t.residual, y).nan_to_num(0.0), "clip_frac": D.residual_clip_fraction(f_lp, t.clipped)}


def _record_chunk(out, probes: Probes, rows: dict[str, torch.Tensor], s_lp, f_lp, p_lp, t_lp, y) -> None:
    """Append a chunk's probe rows ``[B, c]`` (``mismatch`` ``[3, B, c]``) to ``out``, with ``rows`` already made."""
    if probes.sampled:
        rows.update(student_lp=_gather(s_lp, y), full_lp=_gather(f_lp, y), partial_lp=_gather(p_lp, y),
                    target_lp=_gather(t_lp, y))
    if probes.shift:
        rows["shift"] = D.privileged_shift(f_lp, p_lp)
    if probes.support_top_p is not None:  # one nucleus (one sort) serves all three views
        nucleus = D.nucleus_mask(s_lp, probes.support_top_p)
        rows["mismatch"] = torch.stack([D.mass_outside(lp, nucleus) for lp in (f_lp, p_lp, t_lp)])
    for k, v in rows.items():
        out.setdefault(k, []).append(v)
