"""The teacher (EMA / frozen / separate model) and scoring a completion under prompts.

One teacher scores the *same* completion under the full and the partial view in one batched
forward: the two prompt sets are left-padded to one width and stacked, the completion ids are
appended unchanged, and the hidden states at the completion positions come back as ``[2B, T, H]``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from aropd.models import check_same_vocabulary, load_causal_lm, load_tokenizer


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
    """Self-distillation: a copy of the student, ``θ_T ← (1 − α) θ_T + α θ_S`` after each optimizer step."""

    def __init__(self, alpha: float = 0.01) -> None:
        if not 0 <= alpha <= 1:
            raise ValueError(f"teacher alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def build(self, student, student_tokenizer):
        return _frozen(copy.deepcopy(student))

    @torch.no_grad()
    def update(self, teacher, student):
        t_params, s_params = list(teacher.parameters()), list(student.parameters())
        torch._foreach_lerp_(t_params, [p.detach() for p in s_params], self.alpha)


class FrozenTeacher(Teacher):
    """A frozen copy of the initial student."""

    def build(self, student, student_tokenizer):
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


def left_pad_stack(a: torch.Tensor, a_mask: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor, pad_id: int):
    """Stack two left-padded id batches ``[B, La]``, ``[B, Lb]`` into ``[2B, max(La, Lb)]``."""
    width = max(a.shape[1], b.shape[1])

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    return torch.cat([pad(a, pad_id), pad(b, pad_id)]), torch.cat([pad(a_mask, 0), pad(b_mask, 0)])


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
