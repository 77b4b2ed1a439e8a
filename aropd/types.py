"""The values passed between the stages of a step, built by keyword and read by attribute.

    PrivilegedBatch ──rollout──▶ Rollout ──teacher scoring──▶ TeacherScores
                                   │                              │
                                   └──────── loss (target, probes) ◀┘ ──▶ StepRecord ──▶ callbacks

Shapes: ``B`` rows, prompt widths ``L*``, ``T`` completion positions, ``H`` hidden size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from aropd.rollout import GenerationWindow


@dataclass(kw_only=True)
class PrivilegedBatch:
    """A collated batch of privileged examples. Prompts are left-padded, references right-padded.

    Not frozen: Lightning moves batches between devices by rebuilding their fields.
    """

    student_ids: torch.Tensor  # [B, Ls] the question alone
    student_mask: torch.Tensor
    full_ids: torch.Tensor  # [B, Lf] question + the whole reference trace
    full_mask: torch.Tensor
    partial_ids: torch.Tensor  # [B, Lp] question + the first part of the reasoning + the answer
    partial_mask: torch.Tensor
    reference_ids: torch.Tensor  # [B, Lr] the reference response + EOS (SFT's target)
    reference_mask: torch.Tensor
    privileged_len: torch.Tensor  # [B] full-view prompt tokens minus student prompt tokens
    answers: list[str]  # gold final answers
    window: GenerationWindow | None = None  # the generation batch's prompts (generation_batch_size > batch_size)

    def replace(self, **changes: Any) -> PrivilegedBatch:
        return dataclasses.replace(self, **changes)


@dataclass(kw_only=True)
class PromptBatch:
    """A batch of benchmark prompts for validation."""

    prompt_ids: torch.Tensor  # [B, L] left-padded
    prompt_mask: torch.Tensor
    records: list[dict[str, Any]]
    benchmark: str


@dataclass(kw_only=True)
class Rollout:
    """Prompts and the completions sampled for them; the unit the teacher and the loss consume.

    ``completion_mask`` is 1 up to and including the first EOS and 0 after it, so a completion that
    ends at once carries one token (its EOS) and a padded row carries none.
    """

    prompt_ids: torch.Tensor  # [B, Lp] left-padded
    prompt_mask: torch.Tensor  # [B, Lp]
    completion_ids: torch.Tensor  # [B, T] right-padded
    completion_mask: torch.Tensor  # [B, T]
    logprobs: torch.Tensor | None = None  # [B, T] fp32 log π(y_t) of the sampling policy, 0 after EOS; when the engine keeps them

    def replace(self, **changes: Any) -> Rollout:
        return dataclasses.replace(self, **changes)


VIEWS = ("full", "partial")


@dataclass(kw_only=True)
class TeacherScores:
    """The teacher's final hidden states at the completion positions, per privileged view.

    Each is ``[B, T, H]`` (row ``t`` predicts completion token ``t``), or None when the step needed
    that view for neither the target nor a requested probe.
    """

    full: torch.Tensor | None = None
    partial: torch.Tensor | None = None


@dataclass(kw_only=True)
class StepRecord:
    """What one training step hands to the diagnostics callbacks (``outputs["record"]``).

    Per-position fields are ``[B, T]``, detached, fp32; the optional ones are None unless a probe
    asked for them (``aropd.loss.Probes``). ``mask`` is the completion mask (skipped tokens included).
    """

    mask: torch.Tensor
    completion_ids: torch.Tensor  # [B, T] long
    privileged_len: torch.Tensor  # [B] full-view prompt tokens minus student prompt tokens
    answers: list[str]  # gold final answers
    student_lp: torch.Tensor | None = None  # log π_θ(y_t)            (probe: sampled)
    full_lp: torch.Tensor | None = None  # log q_F(y_t)                (probe: sampled)
    partial_lp: torch.Tensor | None = None  # log q_P(y_t)             (probe: sampled)
    target_lp: torch.Tensor | None = None  # log π*(y_t)               (probe: sampled)
    shift: torch.Tensor | None = None  # KL(q_F ‖ q_P)                 (probe: shift)
    clip_frac: torch.Tensor | None = None  # q_F mass on clipped entries (probe: residual)
    residual: torch.Tensor | None = None  # the target's clipped residual at y_t (probe: residual)
    mismatch: torch.Tensor | None = None  # [3, B, T] support mismatch of full, partial, target (probe: support)
