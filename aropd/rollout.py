"""Student rollouts: sampling settings, rollout engines, and generation windows."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
from torch.utils.data import BatchSampler, DistributedSampler

from aropd.types import Rollout

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    """How the student samples its rollouts."""

    temperature: float = 1.0
    """Sampling temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if getattr(self, "max_new_tokens", 1) < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if problems:
            raise ValueError("sampling: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class SamplingConfig(Sampling):
    """What an engine is given: how to sample, and how many tokens at most."""

    max_new_tokens: int = 128
    """Completion budget in tokens."""


def run_seed(seed: int | None) -> int:
    """``seed``, or when it is None the run's ``seed_everything`` (0 when none was set)."""
    return seed if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))


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

    keeps_logprobs = False
    """Whether its rollouts carry the sampled tokens' log-probs (``Rollout.logprobs``)."""

    def weights_updated(self) -> None:
        """The student's weights changed (an optimizer step, a restore). Engines that sample from their
        own copy of the weights refresh it before they next sample; the others read the student's."""

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
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion, completion_mask=mask)


# ---- sampling -----------------------------------------------------------------------------------
def sampling_warpers(sampling: SamplingConfig) -> list:
    """transformers' own logits warpers, in ``generate``'s order: temperature, then top-k, then top-p.

    Reusing the very classes ``generate`` builds (with its defaults: ``min_tokens_to_keep=1``, filter
    value −inf) makes the lean loop sample from exactly the distribution ``generate`` samples from.
    """
    if sampling.greedy:
        return []
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers: list = []
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
    return warpers


def next_token_scores(logits: torch.Tensor, warpers: list) -> torch.Tensor:
    """fp32 scores to sample from: ``[B, V]`` logits through the warpers (filtered entries are −inf)."""
    scores = logits.float()
    for w in warpers:
        scores = w(None, scores)
    return scores


def pick_tokens(logits: torch.Tensor, sampling: SamplingConfig, warpers: list) -> torch.Tensor:
    """One token per row: the argmax when greedy, else a draw from the warped distribution.

    The draw inverts the CDF with one uniform number per row. ``torch.multinomial`` (what ``generate``
    uses) draws one exponential number per vocabulary entry, which on a CPU costs more than the rest
    of a small model's decode step; the distribution is the same, the random stream is not, so the
    lean loop's samples repeat under a seed but differ from ``generate``'s under the same seed.
    """
    if sampling.greedy:
        return logits.float().argmax(-1)
    probs = torch.softmax(next_token_scores(logits, warpers), dim=-1)
    cdf = probs.cumsum(-1)
    u = torch.rand((probs.shape[0], 1), device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # first entry whose CDF exceeds u: p > 0
    if bool((tok >= probs.shape[-1]).any()):  # u rounded up to the total: take the last entry with p > 0
        last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.uint8).argmax(-1)
        tok = torch.minimum(tok, last)
    return tok


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` OR-ed over all ranks (just ``flag`` without an initialized process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _make_room(cache, extra: int) -> None:
    """Let each full-attention ``DynamicLayer`` of ``cache`` grow in place by ``extra`` positions.

    ``DynamicLayer.update`` concatenates, copying the whole cache at every step (a fifth of a batch-64
    step of the tiny model); these layers write into a buffer with room for the budget and hand out
    views of its filled part. Layers of any other kind (sliding window, other transformers versions)
    are left as they are.
    """
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers 4.x: no per-layer objects
        return
    for layer in getattr(cache, "layers", []):
        if type(layer) is DynamicLayer and getattr(layer, "is_initialized", False) and layer.keys.dim() == 4:
            layer.__class__ = _RoomyLayer
            layer.make_room(extra)


try:
    from transformers.cache_utils import DynamicLayer as _DynamicLayer
except ImportError:  # transformers 4.x
    _DynamicLayer = object


class _RoomyLayer(_DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of buffers with room to grow (see :func:`_make_room`)."""

    def make_room(self, extra: int) -> None:
        self._length = self.keys.shape[-2]
        self._kbuf = self._with_room(self.keys, self._length + extra)
        self._vbuf = self._with_room(self.values, self._length + extra)

    @staticmethod
    def _with_room(x: torch.Tensor, size: int) -> torch.Tensor:
        buf = x.new_empty((*x.shape[:-2], size, x.shape[-1]))
        buf[..., : x.shape[-2], :] = x
        return buf

    def update(self, key_states, value_states, *args, **kwargs):
        end = self._length + key_states.shape[-2]
        if end > self._kbuf.shape[-2]:  # out of room: double it
            self._kbuf = self._with_room(self._kbuf[..., : self._length, :], 2 * end)
            self._vbuf = self._with_room(self._vbuf[..., : self._length, :], 2 * end)
        self._kbuf[..., self._length : end, :] = key_states
        self._vbuf[..., self._length : end, :] = value_states
        self._length = end
        self.keys, self.values = self._kbuf[..., :end, :], self._vbuf[..., :end, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]
        self.keys, self.values = self._kbuf[..., : self._length, :], self._vbuf[..., : self._length, :]


def _takes_4d_mask(model: torch.nn.Module) -> bool:
    """Whether ``model`` takes a 4D boolean mask as SDPA's mask as it is (not with other attention
    kernels, nor on transformers 4.x)."""
    import transformers

    config = getattr(model, "config", None)
    return int(transformers.__version__.split(".")[0]) >= 5 and getattr(config, "_attn_implementation", None) == "sdpa"


def _decode_mask_4d(prompt_mask: torch.Tensor, budget: int) -> torch.Tensor:
    """``[B, 1, 1, Lp + budget]`` bool (True = attend) for one-token decode steps."""
    full = torch.ones((prompt_mask.shape[0], 1, 1, prompt_mask.shape[1] + budget), dtype=torch.bool,
                      device=prompt_mask.device)
    full[:, 0, 0, : prompt_mask.shape[1]] = prompt_mask.bool()
    return full


class LeanDecode(RolloutEngine):
    """A decode loop over the model's forward and its key/value cache that drops finished rows.

    Each step feeds only the rows that have not produced an EOS yet: their cache rows, attention
    mask and positions are selected (``DynamicCache.batch_select_indices``) and the finished ones
    leave the batch, so a batch whose completions end early stops paying for them. Positions are
    counted from each row's first real prompt token, as ``generate`` counts them; sampling uses
    ``generate``'s own warpers in its order (:func:`sampling_warpers`) and draws from the global RNG
    (one uniform number per row and step, :func:`pick_tokens`), so the :func:`seeded` context makes
    it repeat exactly. Greedy decoding gives ``generate``'s tokens.

    ``synced=True`` (sharded parameters: every rank must join every forward) keeps stepping until no
    rank has a row left — one ``all_reduce`` of an "unfinished" flag per step; a rank whose rows have
    all finished feeds one dummy row (its outputs are discarded) so the sharded forwards stay in step.

    Decode steps after the prompt's run through :class:`aropd.compact.CompactStep` where the model's
    layout allows (Llama, Mistral, Qwen2, Qwen3 with plain weights; not with ``synced``): the model's
    own arithmetic without transformers' per-layer overhead, and on a CPU through packed oneDNN
    products (~1.5× faster rollouts on the 5M model of ``scripts/bench_step.py --vs-trl``). Its
    log-probs agree with the model's forward to float rounding; greedy tokens are the same.
    """

    def __init__(self, compact: bool = True) -> None:
        """
        Args:
            compact: run decode steps through the compact step where the model supports it (see
                :func:`aropd.compact.unsupported`; the reason is logged once when it does not); False:
                the model's own forward at every step.
        """
        self.compact = compact
        self._said: set[str] = set()

    def generate(self, model, prompt_ids, prompt_mask, sampling, eos_ids, pad_id, synced=False) -> Rollout:
        return self.decode(model, prompt_ids, prompt_mask, sampling, eos_ids, pad_id, synced, logprobs=False)

    @torch.no_grad()
    def decode(
        self,
        model: torch.nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        eos_ids: list[int],
        pad_id: int,
        synced: bool = False,
        logprobs: bool = True,
    ) -> Rollout:
        """The rollout, with (``logprobs=True``) ``[B, T]`` fp32 ``log π(y_t)`` of each sampled token.

        The log-probs are the model's own (log-softmax of its logits: no temperature, no top-k/top-p),
        i.e. what a teacher-forced forward over prompt + completion gives; 0 after the first EOS.
        """
        device = prompt_ids.device
        n, budget = prompt_ids.shape[0], sampling.max_new_tokens
        warpers = sampling_warpers(sampling)
        eos = torch.tensor(eos_ids, device=device)
        tokens = torch.full((n, budget), pad_id, dtype=torch.long, device=device)
        token_lp = torch.zeros((n, budget), dtype=torch.float32, device=device) if logprobs else None
        rows = torch.arange(n, device=device)  # original row of each row still in the batch
        dummy = False  # synced only: this rank is done and steps one row whose outputs are discarded
        mask = prompt_mask
        # generate's positions: counted from the first real token (padding gets 0).
        position = (mask.long().cumsum(-1) - 1).clamp(min=0)
        # transformers 5 names the cache argument and output ``cache``; 4.x names them ``past_key_values``.
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
        cache, position = out.get(cache_arg), position[:, -1:]
        _make_room(cache, budget)
        # Decode steps attend to every cached position but the prompt's padding. With SDPA (transformers
        # 5 takes a 4D mask as it is) that mask is a view of one boolean buffer instead of a 2D mask
        # grown and expanded to 4D by the model at every step.
        # (a sliding-window layer holds fewer keys than positions: the model builds its masks itself)
        roomy = all(isinstance(layer, _RoomyLayer) for layer in getattr(cache, "layers", [None]))
        step = self._compact_step(model, cache, n, prompt_ids.shape[1] + budget, synced, roomy)
        full = _decode_mask_4d(mask, budget) if step is not None or (roomy and _takes_4d_mask(model)) else None
        logits = out.logits[:, -1]
        width = 0
        for t in range(budget):
            tok = pick_tokens(logits, sampling, warpers)
            if dummy:
                local_unfinished, keep = False, None
            else:
                tokens[rows, t] = tok
                if token_lp is not None:
                    token_lp[rows, t] = torch.log_softmax(logits.float(), -1).gather(-1, tok[:, None]).squeeze(-1)
                width = t + 1
                keep = ~torch.isin(tok, eos)
                local_unfinished = bool(keep.any())
            if t + 1 == budget:
                break
            if not (_any_rank(local_unfinished, device) if synced else local_unfinished):
                break
            if keep is not None and not local_unfinished:  # synced: others still decode; keep one dummy row
                keep = torch.zeros_like(keep)
                keep[0] = dummy = True
            if keep is not None and not bool(keep.all()):
                idx = keep.nonzero().squeeze(-1)
                cache.batch_select_indices(idx)
                rows, position, tok = rows[idx], position[idx], tok[idx]
                if full is not None:
                    full = full[idx]
                else:
                    mask = mask[idx]
            if full is not None:
                step_mask = full[..., : prompt_ids.shape[1] + t + 1]
            else:
                mask = step_mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            position = position + 1
            if step is not None:
                logits = step(tok, position, step_mask)
            else:
                logits = model(
                    input_ids=tok[:, None], attention_mask=step_mask, position_ids=position,
                    use_cache=True, logits_to_keep=1, **{cache_arg: cache},
                ).logits[:, -1]
        completion = tokens[:, : max(width, 1)]
        cmask = completion_mask(completion, eos_ids)
        completion = completion.masked_fill(cmask == 0, pad_id)
        if token_lp is not None:
            token_lp = token_lp[:, : completion.shape[1]] * cmask
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion, completion_mask=cmask,
                       logprobs=token_lp)

    def _compact_step(self, model, cache, rows: int, length: int, synced: bool, roomy: bool):
        """The compact step for this rollout, or None (the model's forward) with the reason logged once."""
        from aropd.compact import CompactStep, unsupported

        if not self.compact:
            return None
        why = "sharded parameters (synced decoding)" if synced else unsupported(model, length)
        if why is None and not roomy:
            why = "the key/value cache is not the dynamic one"
        if why is not None:
            if why not in self._said:
                self._said.add(why)
                log.info("LeanDecode: decoding with the model's forward (%s)", why)
            return None
        return CompactStep(model, cache, rows)


# ---- generation windows: one generate call for several micro-batches ----------------------------
class GenerationWindow(NamedTuple):
    """A generation batch's student prompts, carried by each of its micro-batches.

    The micro-batch at ``index`` 0 generates rollouts for all rows in one call; every micro-batch
    (0 included) then trains on rows ``start:stop`` of them. Every micro-batch carries the prompts,
    so one that finds no buffered rollouts (a resume inside a window) can regenerate them.
    """

    prompt_ids: torch.Tensor  # [G, Lp] left-padded
    prompt_mask: torch.Tensor
    index: int  # the micro-batch's place in its window
    start: int  # its rows in the window
    stop: int


class GenerationWindowSampler(DistributedSampler):
    """This rank's share of a ``DistributedSampler`` order, cut into micro-batches, grouped into windows.

    Micro-batches are consecutive runs of ``batch_size`` indices of the (seed, epoch)-fixed order (the
    last partial one dropped if ``drop_last_batch``), exactly those of ``BatchSampler(DistributedSampler
    (...), batch_size, drop_last_batch)``, so a run with windows sees the same data as one without;
    ``generation_batch_size // batch_size`` consecutive micro-batches make a window. Each item is one
    micro-batch: keys ``(dataset index, index in window, in this micro-batch)`` for every row of its
    window, in window order; ``aropd.data.collate_window`` turns them into the micro-batch plus its
    :class:`GenerationWindow`. Use it as a ``DataLoader``'s ``sampler`` with ``batch_size=None``.

    Why a ``DistributedSampler``: Lightning leaves a loader whose ``sampler`` is one as it is (and sets
    its epoch), where it would rebuild a custom batch sampler around its own, unshuffled one under DDP.
    """

    def __init__(
        self, dataset, batch_size: int, generation_batch_size: int, drop_last_batch: bool = True, **distributed
    ) -> None:
        super().__init__(dataset, **distributed)
        if batch_size < 1 or generation_batch_size < batch_size or generation_batch_size % batch_size:
            raise ValueError(
                f"generation_batch_size must be a multiple of batch_size ({batch_size}), got {generation_batch_size}"
            )
        self.batch_size, self.generation_batch_size = batch_size, generation_batch_size
        self.drop_last_batch = drop_last_batch
        self.per_window = generation_batch_size // batch_size

    @classmethod
    def following(cls, sampler: DistributedSampler, batch_size: int, generation_batch_size: int, drop_last_batch: bool):
        """The windows over ``sampler``'s order (same dataset, replicas, rank, shuffle, seed, epoch)."""
        out = cls(
            sampler.dataset, batch_size, generation_batch_size, drop_last_batch, num_replicas=sampler.num_replicas,
            rank=sampler.rank, shuffle=sampler.shuffle, seed=sampler.seed, drop_last=sampler.drop_last,
        )
        out.set_epoch(sampler.epoch)
        return out

    def micro_batches(self) -> Iterator[list[int]]:
        return iter(BatchSampler(list(super().__iter__()), self.batch_size, self.drop_last_batch))

    def __len__(self) -> int:
        n = super().__len__()
        return n // self.batch_size if self.drop_last_batch else -(-n // self.batch_size)

    def __iter__(self):
        micro = self.micro_batches()
        while window := list(itertools.islice(micro, self.per_window)):
            flat = [i for mb in window for i in mb]
            start = 0
            for j, mb in enumerate(window):
                yield [(i, j, start <= r < start + len(mb)) for r, i in enumerate(flat)]
                start += len(mb)


class WindowKeyed(torch.utils.data.Dataset):
    """A map-style dataset read one micro-batch (a list of :class:`GenerationWindowSampler` keys) at a time."""

    def __init__(self, items) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, keys):
        return [(self.items[i], index, mine) for i, index, mine in keys]


class RolloutBuffer:
    """The current window's rollouts, handed out to its micro-batches in order.

    A window's rollouts are all sampled by the student as it is at the window's first micro-batch.
    With ``accumulate_grad_batches · batch_size`` a multiple of the generation batch, windows never
    straddle an optimizer step and every rollout is on-policy (staleness 0). Otherwise micro-batches
    after a step boundary train on rollouts one step old (two or more if the generation batch spans
    more than one step: warned once). Staleness = optimizer steps since the rollout was generated.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.rollout: Rollout | None = None
        self.step = 0
        self._warned = False

    def take(
        self,
        key: tuple,
        window: GenerationWindow,
        global_step: int,
        generate: Callable[[], Rollout],
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
    ) -> tuple[Rollout, int]:
        """The micro-batch's rows of window ``key``'s rollouts (generated now if not buffered), and
        their staleness. The prompts are the micro-batch's own (the same tokens, its own padding);
        the completions are cut to the longest completion among its rows, as ``generate`` would."""
        if key != self.key:
            if window.index != 0:
                log.warning("rollout window %s entered at micro-batch %d (resumed?): regenerating it", key, window.index)
            self.key, self.rollout, self.step = None, None, global_step
            self.rollout = generate()
            self.key = key
        r = self.rollout
        cmask = r.completion_mask[window.start : window.stop]
        width = max(int(cmask.sum(-1).max()), 1)
        rows = slice(window.start, window.stop)
        out = Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=r.completion_ids[rows, :width],
                      completion_mask=cmask[:, :width], logprobs=None if r.logprobs is None else r.logprobs[rows, :width])
        staleness = global_step - self.step
        if staleness > 1 and not self._warned:
            self._warned = True
            log.warning(
                "rollouts are %d optimizer steps stale: the generation batch spans more than one optimizer step "
                "(make it at most accumulate_grad_batches × batch_size)", staleness,
            )
        return out, staleness
