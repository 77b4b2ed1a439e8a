"""Student rollouts: sampling settings, the ``Rollout`` that flows between stages, and engines."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch


class Rollout(NamedTuple):
    """Prompts and the completions sampled for them; the unit the teacher and the loss consume.

    ``completion_mask`` is 1 up to and including the first EOS and 0 after it, so a completion that
    ends at once carries one token (its EOS) and a padded row carries none.
    """

    prompt_ids: torch.Tensor  # [B, Lp] left-padded
    prompt_mask: torch.Tensor  # [B, Lp]
    completion_ids: torch.Tensor  # [B, T] right-padded
    completion_mask: torch.Tensor  # [B, T]


@dataclass
class SamplingConfig:
    """How the student samples its rollouts."""

    max_new_tokens: int = 128
    """Completion budget in tokens."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if problems:
            raise ValueError("sampling: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it. ``[B, T] → [B, T]`` (long)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    return (eos_before == 0).long()


def eos_ids_of(model: torch.nn.Module, tokenizer) -> list[int]:
    """All ids that end a completion: the generation config's (may be a list) plus the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer and the model's generation config define no EOS token")
    return ids


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Draw from a seed-determined RNG without disturbing the global one.

    Rollouts seeded from (run seed, epoch, batch) repeat exactly, also after a resume, with no RNG
    state to carry: the counters that make the seed are in the checkpoint already.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class RolloutEngine:
    """Turns prompts into a :class:`Rollout`. Subclasses implement :meth:`generate`."""

    def generate(
        self,
        model: torch.nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        eos_ids: list[int],
        pad_id: int,
        synced: bool = False,
    ) -> Rollout:
        raise NotImplementedError


class HFGenerate(RolloutEngine):
    """The reference engine: transformers' ``generate`` with the KV cache."""

    def generate(self, model, prompt_ids, prompt_mask, sampling, eos_ids, pad_id, synced=False) -> Rollout:
        from transformers import GenerationConfig

        kw = dict(max_new_tokens=sampling.max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True)
        if sampling.greedy:
            cfg = GenerationConfig(do_sample=False, **kw)
        else:
            cfg = GenerationConfig(
                do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, **kw
            )
        out = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=cfg, synced_gpus=synced
        )
        completion = out[:, prompt_ids.shape[1] :]
        mask = completion_mask(completion, eos_ids)
        completion = completion.masked_fill(mask == 0, pad_id)
        return Rollout(prompt_ids, prompt_mask, completion, mask)
