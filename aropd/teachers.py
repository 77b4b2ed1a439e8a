"""The teacher (EMA / frozen / separate model) and scoring a completion under prompts.

One teacher scores the *same* completion under the full and the partial view in one batched
forward (``score_views``): the two prompt sets are left-padded to one width and stacked, the
completion ids are appended unchanged, and the hidden states at the completion positions come back
per view, by name, as ``TeacherScores``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from aropd.lora import EMA_ADAPTER, AdapterTeacher, is_adapted
from aropd.models import check_same_vocabulary, load_causal_lm, load_tokenizer
from aropd.types import VIEWS, PrivilegedBatch, Rollout, TeacherScores


class Teacher:
    """How the teacher model is made from the student, and how it follows training."""

    def build(self, student: nn.Module, student_tokenizer) -> nn.Module:
        raise NotImplementedError

    @torch.no_grad()
    def update(self, teacher: nn.Module, student: nn.Module) -> None:
        """Called after every optimizer step. Default: the teacher stays as it is."""


def _frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


class EMATeacher(Teacher):
    """Self-distillation: a copy of the student, ``θ_T ← (1 − α) θ_T + α θ_S`` after each optimizer step.

    With a LoRA student only the adapter is averaged: an EMA adapter beside the student's, used for the
    teacher's forward over the shared base weights (``aropd.lora.AdapterTeacher``).
    """

    def __init__(self, alpha: float = 0.01) -> None:
        if not 0 <= alpha <= 1:
            raise ValueError(f"teacher alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def build(self, student, student_tokenizer):
        if is_adapted(student):
            return AdapterTeacher(student, EMA_ADAPTER)
        return _frozen(copy.deepcopy(student))

    @torch.no_grad()
    def update(self, teacher, student):
        if isinstance(teacher, AdapterTeacher):
            t_params, s_params = teacher.ema_pairs()
        else:
            t_params, s_params = list(teacher.parameters()), [p.detach() for p in student.parameters()]
        torch._foreach_lerp_(t_params, s_params, self.alpha)


class FrozenTeacher(Teacher):
    """A frozen copy of the initial student; with a LoRA student, its base model (the adapter switched
    off for the teacher's forward, no second copy)."""

    def build(self, student, student_tokenizer):
        if is_adapted(student):
            return AdapterTeacher(student, None)
        return _frozen(copy.deepcopy(student))


class SeparateTeacher(Teacher):
    """A different model (hub id, folder or ``.gguf`` file) with the student's tokenizer."""

    def __init__(self, model: str, dtype: str = "float32") -> None:
        self.model, self.dtype = model, dtype

    def build(self, student, student_tokenizer):
        check_same_vocabulary(student_tokenizer, load_tokenizer(self.model), self.model)
        teacher = load_causal_lm(self.model, self.dtype)
        if teacher.get_output_embeddings().weight.shape[0] != student.get_output_embeddings().weight.shape[0]:
            raise ValueError(f"teacher {self.model!r}: output layer size differs from the student's")
        return _frozen(teacher)


def left_pad_stack(batches: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack left-padded ``(ids, mask)`` batches ``[B, L_i]`` into ``[len·B, max L_i]``."""
    width = max(ids.shape[1] for ids, _ in batches)

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    return torch.cat([pad(ids, pad_id) for ids, _ in batches]), torch.cat([pad(m, 0) for _, m in batches])


@torch.no_grad()
def score_views(
    teacher: nn.Module, batch: PrivilegedBatch, rollout: Rollout, views: frozenset[str], pad_id: int
) -> TeacherScores:
    """The teacher's states at the rollout's completion positions under each of ``views``, in one forward."""
    names = [v for v in VIEWS if v in views]
    if not names:
        return TeacherScores()
    prompts = [(getattr(batch, f"{v}_ids"), getattr(batch, f"{v}_mask")) for v in names]
    ids, mask = left_pad_stack(prompts, pad_id)
    k = len(names)
    hidden = completion_hidden(
        teacher, ids, mask, rollout.completion_ids.repeat(k, 1), rollout.completion_mask.repeat(k, 1)
    )
    return TeacherScores(**dict(zip(names, hidden.chunk(k))))


def completion_hidden(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Final hidden states that predict each completion token: ``[B, T, H]``.

    The completion ids are appended to the (left-padded) prompt ids as they are, so row ``t`` of
    the result is the state right before completion token ``t`` — the same token for every prompt.
    """
    ids = torch.cat([prompt_ids, completion_ids[:, :-1]], dim=1)
    mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)
    # Left padding shifts positions; count them from each row's first real token, as generate does.
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state[:, prompt_ids.shape[1] - 1 :]
