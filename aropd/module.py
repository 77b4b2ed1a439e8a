"""The LightningModules: a student that rolls out and validates (``StudentModule``), and the
privileged on-policy distillation step on top of it: student rollout → dual-view teacher scoring →
target → distillation loss. SFT, the off-policy baseline, is ``aropd.sft.SupervisedFineTuning``."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from aropd.lora import LoRA
from aropd.loss import Probes, distillation_loss
from aropd.metrics import BucketAccuracy
from aropd.models import load_causal_lm, load_tokenizer
from aropd.rollout import LeanDecode, RolloutBuffer, RolloutEngine, Sampling, SamplingConfig, eos_ids_of, run_seed, seeded
from aropd.targets import AnchoredResidual, Target
from aropd.teachers import EMATeacher, Teacher, completion_hidden, score_views
from aropd.types import PrivilegedBatch, PromptBatch, Rollout, StepRecord


class StudentModule(L.LightningModule):
    """A student causal LM that samples rollouts and validates on benchmark suites.

    Subclasses implement ``training_step`` and may build more models in ``build_models``.
    """

    def __init__(
        self,
        student: str = "aropd/assets/tiny-llama",
        max_new_tokens: int = 128,
        val_max_new_tokens: int | None = None,
        loss_chunk_size: int | None = 256,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_checkpointing: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        engine: RolloutEngine | None = None,
        seed: int | None = None,
        lora: LoRA | None = None,
    ) -> None:
        """
        Args:
            student: Hub id, local folder or ``folder/file.gguf`` of the student causal LM.
            max_new_tokens: Completion budget in tokens: the rollout length, and the cut of SFT's references.
            val_max_new_tokens: Cap on each benchmark's generation budget during validation.
            loss_chunk_size: Completion positions per chunk of the memory-bounded loss; null = unchunked.
            dtype: Parameter dtype the student (and a copied teacher) are loaded in.
            gradient_checkpointing: Recompute the student's activations in backward to save memory.
            optimizer: Optimizer class and arguments.
            scheduler: Learning-rate scheduler; ``aropd.schedules.WarmupCosine`` learns its length from the trainer.
            engine: Rollout engine: ``LeanDecode`` (default: drops finished rows; ``generate``'s distribution),
                ``HFGenerate``, or ``aropd.vllm_engine.VLLMEngine`` (vLLM in this process, weights synced after each optimizer step).
            seed: Seed of the rollout sampling streams (one per epoch, batch and rank); null = ``seed_everything``.
            lora: Train a LoRA adapter (``aropd.lora.LoRA``) on the frozen student instead of every weight;
                null = full fine-tuning. Frozen and EMA teachers then share the student's base weights.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "engine"])  # the subclasses' options too
        # Saved as a plain mapping (checkpoints load with weights_only, which refuses other classes);
        # through a subclass's **kwargs the CLI passes one anyway.
        self.lora = LoRA(**lora) if isinstance(lora, dict) else lora
        if lora is not None:
            self.hparams.lora = dataclasses.asdict(self.lora)
        problems = self.option_problems()
        if problems:  # every problem at once, before any model is loaded
            raise ValueError("; ".join(problems))
        self.seed = run_seed(seed)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.engine = engine if engine is not None else LeanDecode()
        self.tokenizer = load_tokenizer(student)
        self.student: torch.nn.Module | None = None
        self.val_metrics = torch.nn.ModuleDict()
        self._val_rows: dict[str, list[dict[str, Any]]] = {}

    def option_problems(self) -> list[str]:
        """What is wrong with the options (``self.hparams``); subclasses extend the list."""
        h, problems = self.hparams, []
        if h.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {h.max_new_tokens}")
        if h.val_max_new_tokens is not None and h.val_max_new_tokens < 1:
            problems.append(f"val_max_new_tokens must be >= 1 or null, got {h.val_max_new_tokens}")
        if h.loss_chunk_size is not None and h.loss_chunk_size < 1:
            problems.append(f"loss_chunk_size must be >= 1 or null, got {h.loss_chunk_size}")
        if self.lora is not None:
            from aropd.lora import target_problems
            from aropd.models import meta_causal_lm

            try:  # the architecture on the meta device: target names checked before any weight is read
                model = meta_causal_lm(h.student)
            except Exception:
                model = None  # configure_model checks them on the loaded model
            if model is not None:
                problems += target_problems(self.lora, model)
        return problems

    @property
    def method_name(self) -> str:
        """How results files name what trained."""
        return type(self).__name__

    # ---- models -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.student is not None:  # idempotent: Lightning may call it more than once
            return
        self.student = load_causal_lm(self.hparams.student, self.hparams.dtype).train()
        if self.lora is not None:
            from aropd.lora import add_lora

            add_lora(self.student, self.lora)
        if self.hparams.gradient_checkpointing:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.build_models()
        self.eos_ids = eos_ids_of(self.student, self.tokenizer)
        # Under a ModelParallelStrategy: FSDP2 on the student and the teacher, each its own tree
        # (after the teacher was copied from the unsharded student). See aropd/sharding.py.
        from aropd.sharding import shard_module

        shard_module(self)

    def build_models(self) -> None:
        """Models beside the student, built from it before sharding (default: none)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A LoRA run's base weights are frozen and loaded again from `student`: the checkpoint keeps the
        # adapters (a sharded one too: FSDP2Strategy.load_checkpoint asks for the adapter keys only).
        # A full-state file written under FSDP2 (save_distributed_checkpoint: false) keeps the base:
        # Lightning loads that one strictly, broadcasting it from rank 0.
        from aropd.sharding import is_sharded

        full_state_under_fsdp = is_sharded(self.student) and not getattr(
            self.trainer.strategy, "_save_distributed_checkpoint", True)
        if self.lora is not None and not full_state_under_fsdp:
            from aropd.lora import drop_base_weights

            drop_base_weights(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.engine.weights_updated()  # an engine built before a restore holds the weights it replaces
        if self.lora is not None and "state_dict" in checkpoint:
            from aropd.lora import restore_base_weights

            restore_base_weights(checkpoint["state_dict"], self)

    @property
    def synced_generation(self) -> bool:
        """Sharded parameters need every rank in every forward, so generation must stop in step."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return False
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        return isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))

    def rollout_seed(self, batch_idx: int, stream: int = 0) -> int:
        epoch = self.current_epoch if self._trainer is not None else 0
        rank = self.global_rank if self._trainer is not None else 0
        key = (((self.seed * 1_000_003 + stream) * 1_000_003 + epoch) * 1_000_003 + batch_idx) * 65_537 + rank
        return key % (2**63 - 1)

    def phase(self, name: str):
        """A named span in the trainer's profiler (``scripts/bench_step.py`` reads them)."""
        return self._trainer.profiler.profile(f"aropd/{name}") if self._trainer is not None else contextlib.nullcontext()

    @torch.no_grad()
    def rollout(self, prompt_ids, prompt_mask, sampling: SamplingConfig, seed: int) -> Rollout:
        """Sample completions from the student (eval mode, KV cache, seeded stream)."""
        was_training = self.student.training
        self.student.eval()
        try:
            with seeded(seed, prompt_ids.device):
                return self.engine.generate(
                    self.student, prompt_ids, prompt_mask, sampling, self.eos_ids,
                    self.tokenizer.pad_token_id, synced=self.synced_generation,
                )
        finally:
            self.student.train(was_training)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.engine.weights_updated()

    def check_finite(self, loss: torch.Tensor, **inputs: torch.Tensor | None) -> None:
        """Stop before the optimizer step when the loss is not finite, naming the first input that is not.

        One host sync on the loss; the inputs are looked at only when it fails.
        """
        if bool(torch.isfinite(loss)):
            return
        culprit = next((name for name, t in inputs.items() if t is not None and not bool(torch.isfinite(t).all())), None)
        where = f"the {culprit} is not finite" if culprit else "its inputs are finite, so the loss computation overflowed"
        raise FloatingPointError(
            f"non-finite loss ({float(loss)}) at global step {self.global_step}: {where}; no optimizer step was taken"
        )

    def log_train(self, loss: torch.Tensor, mask: torch.Tensor) -> None:
        bs = mask.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/completion_len", mask.sum(-1).float().mean(), prog_bar=True, batch_size=bs)

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        opt = self.optimizer_factory(params)
        # torch checks lr >= 0 but lets inf and NaN through; they would poison the first step.
        bad = [f"{k}={v}" for k, v in opt.defaults.items() for x in (v if isinstance(v, tuple) else (v,))
               if isinstance(x, float) and not math.isfinite(x)]
        if bad:
            raise ValueError(f"optimizer ({type(opt).__name__}): non-finite option(s) {', '.join(sorted(set(bad)))}")
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt)
        if hasattr(sched, "set_total_steps"):
            sched.set_total_steps(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- validation ---------------------------------------------------------------------------
    def _benchmark(self, name: str):
        from aropd.evaluators import get_benchmark

        return get_benchmark(name)

    def on_validation_epoch_start(self) -> None:
        self._val_rows = {}
        for metric in self.val_metrics.values():
            metric.reset()

    def validation_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        from aropd.evaluators.results import sample_rows

        bench = self._benchmark(batch.benchmark)
        budget = min(bench.max_new_tokens, self.hparams.val_max_new_tokens or math.inf)
        sampling = SamplingConfig(max_new_tokens=int(budget), temperature=0.0)
        r = self.rollout(batch.prompt_ids, batch.prompt_mask, sampling, self.rollout_seed(batch_idx, 1 + dataloader_idx))
        lengths = r.completion_mask.sum(-1)
        responses = self.tokenizer.batch_decode(
            [ids[: int(n)] for ids, n in zip(r.completion_ids, lengths)], skip_special_tokens=True
        )
        verdicts = bench.grade(responses, batch.records)
        if bench.name not in self.val_metrics:
            self.val_metrics[bench.name] = BucketAccuracy().to(self.device)
        correct = torch.tensor([v.correct for v in verdicts], device=self.device)
        self.val_metrics[bench.name].update(correct, lengths)
        rows = sample_rows(bench, batch.records, responses, verdicts, lengths.tolist())
        self._val_rows.setdefault(bench.name, []).extend(rows)

    def on_validation_epoch_end(self) -> None:
        from aropd.buckets import bucket_names

        accs = []
        for name, metric in self.val_metrics.items():
            if metric.update_count == 0:
                continue
            acc, bucket_acc, counts = metric.compute()
            accs.append(acc)
            self.log(f"val/{name}/accuracy", acc, add_dataloader_idx=False)
            for tag, a, n in zip(bucket_names("len"), bucket_acc, counts):
                self.log(f"val/{name}/count_{tag}", n.float(), add_dataloader_idx=False)
                if n > 0:
                    self.log(f"val/{name}/acc_{tag}", a, add_dataloader_idx=False)
        if accs:
            self.log("val/average/accuracy", torch.stack(accs).mean(), prog_bar=True, add_dataloader_idx=False)
        self._write_results()

    def _write_results(self) -> None:
        trainer = self.trainer
        if trainer.sanity_checking:
            return
        from aropd.evaluators.results import write_results

        # Collectives first, on every rank: the gather, and log_dir (a broadcast under DDP).
        gathered: list[dict] = [self._val_rows]
        if trainer.world_size > 1:
            gathered = [None] * trainer.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(gathered, self._val_rows)
        root = Path(trainer.log_dir or trainer.default_root_dir)
        rows: dict[str, list] = {}
        for part in gathered:
            for name, r in part.items():
                rows.setdefault(name, []).extend(r)
        if not trainer.is_global_zero or not rows:
            return
        out = root / "validate" if trainer.state.fn == "validate" else root / "val" / f"step_{self.global_step}"
        write_results(out, rows, {"student": self.hparams.student, "global_step": self.global_step, "method": self.method_name})


class PrivilegedDistillation(StudentModule):
    """Privileged on-policy distillation: the student is distilled toward ``target`` on its own rollouts.

    The target is a component (``aropd.targets``): ``AnchoredResidual(lam, clip)`` is AR-OPD,
    ``FullView()`` Full OPD, ``PartialView()`` Partial OPD.
    """

    def __init__(
        self,
        student: str = "aropd/assets/tiny-llama",
        teacher: Teacher | None = None,
        target: Target | None = None,
        divergence: Literal["forward_kl", "reverse_kl", "jsd", "sampled_token"] = "forward_kl",
        jsd_beta: float = 0.5,
        skip_tokens: int = 0,
        sampling: Sampling | None = None,
        importance_cap: float | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            student: Hub id, local folder or ``folder/file.gguf`` of the student causal LM.
            teacher: Teacher scheme: ``EMATeacher`` (default, α = 0.01), ``FrozenTeacher`` or ``SeparateTeacher``.
            target: What the student is distilled toward: ``AnchoredResidual`` (default, λ 0.8, c 5), ``FullView``, ``PartialView``.
            divergence: Per-position divergence between target and student.
            jsd_beta: β of the generalized JSD (0 = forward KL, 1 = reverse KL); only with ``divergence: jsd``.
            skip_tokens: The first k completion tokens carry no loss.
            sampling: How rollouts are sampled (temperature, top-p, top-k); their length is ``max_new_tokens``.
            importance_cap: Truncated importance weights ``min(π_θ(y_t) / π_engine(y_t), C)`` on each token's
                loss, with C this cap; corrects for the engine's copy of the student differing from it
                (numerics, stale weights). null = off. Needs an engine that keeps log-probs (``VLLMEngine``).
        """
        super().__init__(student=student, **kwargs)
        self.teacher = teacher if teacher is not None else EMATeacher()
        self.target = target if target is not None else AnchoredResidual()
        sampling = sampling if sampling is not None else Sampling()
        self.sampling = SamplingConfig(**vars(sampling), max_new_tokens=self.hparams.max_new_tokens)
        self.teacher_model: torch.nn.Module | None = None
        self.probes = Probes()
        if importance_cap is not None and not self.engine.keeps_logprobs:
            raise ValueError(f"importance_cap: the engine {type(self.engine).__name__} does not keep the sampled "
                             "tokens' log-probs to weigh by (use aropd.vllm_engine.VLLMEngine)")

    def option_problems(self) -> list[str]:
        h, problems = self.hparams, super().option_problems()
        if not 0 <= h.jsd_beta <= 1:
            problems.append(f"jsd_beta must be in [0, 1], got {h.jsd_beta}")
        elif h.divergence != "jsd" and h.jsd_beta != 0.5:
            problems.append(f"jsd_beta={h.jsd_beta} is set but divergence is {h.divergence!r}: it would do nothing")
        if h.skip_tokens < 0:
            problems.append(f"skip_tokens must be >= 0, got {h.skip_tokens}")
        if h.importance_cap is not None and not (math.isfinite(h.importance_cap) and h.importance_cap > 0):
            problems.append(f"importance_cap must be a finite number > 0 or null, got {h.importance_cap}")
        return problems

    @property
    def method_name(self) -> str:
        return repr(self.target)

    def build_models(self) -> None:
        self.teacher_model = self.teacher.build(self.student, self.tokenizer)
        if self.lora is not None:  # which teacher a LoRA run has is not obvious from the config
            from lightning.pytorch.utilities import rank_zero_info

            from aropd.lora import AdapterTeacher

            what = (self.teacher_model.describe() if isinstance(self.teacher_model, AdapterTeacher)
                    else f"{type(self.teacher).__name__}: a model of its own, unchanged by the student's adapter")
            rank_zero_info(f"LoRA student ({self.lora}); teacher: {what}")

    def on_fit_start(self) -> None:
        # Per-position diagnostics are computed only when an enabled callback reads them.
        from aropd.callbacks.base import DiagnosticCallback

        probes = Probes()
        for cb in self.trainer.callbacks:
            if isinstance(cb, DiagnosticCallback) and cb.enabled:
                probes = probes | cb.probes
        self.probes = probes

    def train_rollout(self, batch: PrivilegedBatch, batch_idx: int) -> Rollout:
        """The micro-batch's rollouts: sampled now, or taken from its generation window's buffer.

        With ``data.generation_batch_size`` > ``batch_size`` the datamodule yields the usual
        micro-batches (so gradient accumulation, the EMA teacher after each optimizer step and the
        per-micro-batch ``{"loss", "record"}`` that callbacks read all stay as they are), each
        carrying its window's prompts; the window's first micro-batch samples rollouts for all of
        them in one call (seeded by the window's first batch index), the others take theirs in order.
        Chosen over manual optimization, which would re-implement accumulation, clipping and the
        optimizer-step hooks, and over peeking into Lightning's loader, which is private API.
        """
        window = batch.window
        if window is None:  # generation batch = micro-batch: on-policy, as always
            return self.rollout(batch.student_ids, batch.student_mask, self.sampling, self.rollout_seed(batch_idx))
        if getattr(self, "_rollout_buffer", None) is None:
            self._rollout_buffer = RolloutBuffer()
        first = batch_idx - window.index
        rollout, staleness = self._rollout_buffer.take(
            (self.current_epoch, first), window, self.global_step,
            lambda: self.rollout(window.prompt_ids, window.prompt_mask, self.sampling, self.rollout_seed(first)),
            batch.student_ids, batch.student_mask,
        )
        self.log("train/rollout_staleness", float(staleness), batch_size=batch.student_ids.shape[0])
        return rollout

    def training_step(self, batch: PrivilegedBatch, batch_idx: int):
        with self.phase("rollout"):
            rollout = self.train_rollout(batch, batch_idx)
        with self.phase("teacher_scoring"):
            scores = score_views(
                self.teacher_model, batch, rollout, self.target.views | self.probes.views, self.tokenizer.pad_token_id
            )
        with self.phase("student_forward_and_loss"):
            student_h = completion_hidden(
                self.student, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask
            )
            loss, per_pos = distillation_loss(
                student_h, scores, self.student.get_output_embeddings(), self.teacher_model.get_output_embeddings(),
                rollout.completion_ids, rollout.completion_mask, self.target,
                divergence=self.hparams.divergence, jsd_beta=self.hparams.jsd_beta,
                skip_tokens=self.hparams.skip_tokens, chunk_size=self.hparams.loss_chunk_size, probes=self.probes,
                rollout_logprobs=rollout.logprobs, importance_cap=self.hparams.importance_cap,
            )
            gap = per_pos.pop("rollout_gap", None)
        self.check_finite(**{"loss": loss, "full-view teacher output": scores.full,
                             "partial-view teacher output": scores.partial, "student output": student_h})
        record = StepRecord(
            mask=rollout.completion_mask.float(), completion_ids=rollout.completion_ids,
            privileged_len=batch.privileged_len, answers=batch.answers, **per_pos,
        )
        self.log_train(loss, rollout.completion_mask)
        if gap is not None:  # trainer-sampler mismatch: mean over completion tokens
            m = rollout.completion_mask.float()
            self.log("diag/rollout_logprob_gap", (gap * m).sum() / m.sum().clamp(min=1), batch_size=m.shape[0])
        return {"loss": loss, "record": record}

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.teacher.update(self.teacher_model, self.student)
