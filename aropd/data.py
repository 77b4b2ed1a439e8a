"""Training data with privileged views, and benchmark prompts for validation.

Records carry a question, a reference reasoning and a final answer. Each becomes three prompts —
student (question only), full view and partial view — plus the reference response for SFT, all
tokenized once at set-up with the student's chat template.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from aropd.checkpointing import ResumableDataLoader
from aropd.io import read_records
from aropd.paths import resolve
from aropd.rollout import GenerationWindow, GenerationWindowSampler, WindowKeyed, run_seed
from aropd.types import PrivilegedBatch, PromptBatch
from aropd.views import Budgets, PromptTemplate, PromptTooLong, partial_view, render, teacher_prompt

log = logging.getLogger(__name__)

DEFAULT_TRAIN = str(Path(__file__).parent / "assets" / "toy" / "train.jsonl")

TeacherTrace = Literal["reference", "none", "shuffled"]
"""Which trace the teacher views show (``PrivilegedDataModule(teacher_trace=...)``, docs/method.md)."""


@dataclass
class FieldNames:
    """Which record fields hold the question, the reference reasoning and the final answer."""

    question: str = "question"
    reasoning: str = "reasoning"
    answer: str = "answer"


@dataclass
class BenchmarkSpec:
    """A benchmark to validate on (see ``aropd.evaluators``)."""

    name: str
    """Registered benchmark name, e.g. ``math500`` or ``toy``."""
    data_path: str | None = None
    """Local JSONL / parquet / saved-``datasets`` folder in the benchmark's schema, instead of the hub."""
    limit: int | None = None
    """Use only the first ``limit`` records."""


def load_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a JSONL/JSON/CSV/parquet file, a saved ``datasets`` folder, or a hub dataset id
    (:func:`aropd.io.read_records`; its errors name the file and the line)."""
    return read_records(source, split)


def check_records(rows: list[dict[str, Any]], fields: FieldNames, source: str) -> None:
    """Every record must have every field as a non-empty value; all problems are reported at once."""
    problems = []
    for i, row in enumerate(rows):
        for f in (fields.question, fields.reasoning, fields.answer):
            value = row.get(f)
            if value is None or (isinstance(value, str) and not value.strip() and f != fields.reasoning):
                problems.append(f"{source}: record {i}: missing field {f!r}")
            elif not isinstance(value, (str, int, float)):
                problems.append(f"{source}: record {i}: field {f!r} must be text, got {type(value).__name__}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ValueError("; ".join(problems[:10]) + more)


class PrivilegedExample(NamedTuple):
    student: list[int]
    full: list[int]
    partial: list[int]
    reference: list[int]  # the reference response + EOS (the SFT target)
    answer: str
    truncated: bool  # a view's reasoning had to be shortened to fit its budget


def build_example(
    tokenizer, template: PromptTemplate, q: str, r: str, a: str, budget: Budgets, partial_ratio: float
) -> PrivilegedExample:
    student = render(tokenizer, template.student_messages(q))
    if len(student) > budget.max_prompt_tokens:
        raise PromptTooLong(f"student prompt has {len(student)} tokens > max_prompt_tokens")
    full = teacher_prompt(tokenizer, template, q, r, a, budget.max_teacher_tokens)
    part = teacher_prompt(tokenizer, template, q, partial_view(r, partial_ratio), a, budget.max_teacher_tokens)
    reference = tokenizer(template.format_trace(r, a), add_special_tokens=False)["input_ids"]
    reference = reference[: budget.max_new_tokens - 1] + [tokenizer.eos_token_id]
    return PrivilegedExample(student, full.ids, part.ids, reference, a, full.truncated or part.truncated)


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation ``p`` of ``range(n)`` with ``p[i] != i`` for every ``i`` (needs ``n >= 2``).

    Sattolo's algorithm: a uniformly random permutation with a single cycle through all ``n``, so
    no index maps to itself. Pure function of ``(n, seed)``: every rank and every epoch gets the same.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    p, rng = list(range(n)), random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i (not <= i): what makes the permutation one cycle
        p[i], p[j] = p[j], p[i]
    return p


def pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols], mask[i, cols] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def collate_privileged(examples: list[PrivilegedExample], pad_id: int) -> PrivilegedBatch:
    s, sm = pad([e.student for e in examples], pad_id, left=True)
    f, fm = pad([e.full for e in examples], pad_id, left=True)
    p, pm = pad([e.partial for e in examples], pad_id, left=True)
    r, rm = pad([e.reference for e in examples], pad_id, left=False)
    priv = torch.tensor([len(e.full) - len(e.student) for e in examples])
    return PrivilegedBatch(
        student_ids=s, student_mask=sm, full_ids=f, full_mask=fm, partial_ids=p, partial_mask=pm,
        reference_ids=r, reference_mask=rm, privileged_len=priv, answers=[e.answer for e in examples],
    )


def collate_window(keyed: list[tuple[PrivilegedExample, int, bool]], pad_id: int) -> PrivilegedBatch:
    """A micro-batch plus its generation window's student prompts (keys of ``GenerationWindowSampler``)."""
    rows = [r for r, (_, _, mine) in enumerate(keyed) if mine]
    ids, mask = pad([e.student for e, _, _ in keyed], pad_id, left=True)
    micro = collate_privileged([keyed[r][0] for r in rows], pad_id)
    return micro.replace(window=GenerationWindow(ids, mask, keyed[0][1], rows[0], rows[-1] + 1))


class PrivilegedDataModule(L.LightningDataModule):
    """Training records → student / full-view / partial-view prompts; benchmarks → validation prompts."""

    def __init__(
        self,
        tokenizer: str = "aropd/assets/tiny-llama",
        train: list[str] | str = DEFAULT_TRAIN,
        train_split: str = "train",
        fields: FieldNames | None = None,
        template: PromptTemplate | None = None,
        partial_ratio: float = 0.5,
        max_prompt_tokens: int = 512,
        max_teacher_tokens: int = 1024,
        max_new_tokens: int = 128,
        batch_size: int = 8,
        generation_batch_size: int | None = None,
        val_benchmarks: list[BenchmarkSpec] | None = None,
        val_batch_size: int = 16,
        num_workers: int = 0,
        seed: int | None = None,
        teacher_trace: TeacherTrace = "reference",
    ) -> None:
        """
        Args:
            tokenizer: The student's tokenizer (linked to ``model.init_args.student`` by the CLI).
            train: Training sources: JSONL/parquet files, saved ``datasets`` folders, or hub ids.
            train_split: Split to read from hub datasets and saved ``DatasetDict`` folders.
            fields: Record field names of the question, reasoning and answer.
            template: Wording of the student and teacher prompts.
            partial_ratio: Fraction ρ of the reasoning in the partial view, in [0, 1].
            max_prompt_tokens: Budget of the student prompt; longer questions are dropped and counted.
            max_teacher_tokens: Budget of each teacher prompt; the trace's reasoning is shortened to fit.
            max_new_tokens: Completion budget (linked to the model's rollout budget); caps SFT targets.
            batch_size: Prompts per training micro-batch (per device).
            generation_batch_size: Prompts whose rollouts are sampled in one call (per device), a multiple of
                ``batch_size``; the micro-batches of a window then train on them in order (README, "Fast
                rollouts"). Null = ``batch_size``: every micro-batch samples its own.
            val_benchmarks: Benchmarks for validation (``aropd validate`` and in-``fit`` validation).
            val_batch_size: Prompts per validation batch.
            num_workers: DataLoader worker processes.
            seed: Shuffling seed (and the ``shuffled`` control's pairing); null = the run's ``seed_everything``.
            teacher_trace: Which trace both teacher views show. ``reference``: the problem's own (the
                method). The privilege controls (``configs/methods/no_trace.yaml``, ``shuffled_trace.yaml``):
                ``none``: no trace, both views are the student prompt (plain self-distillation);
                ``shuffled``: the trace (reasoning and answer) of another training record, paired by a
                seeded derangement of the records (:func:`derangement`, seed ``seed``), so none gets its
                own and the pairing is the same on every rank and epoch. The SFT target, the answer and
                the student prompt stay the problem's own.
        """
        super().__init__()
        self.save_hyperparameters()
        problems = []
        if not 0.0 <= partial_ratio <= 1.0:
            problems.append(f"partial_ratio must be in [0, 1], got {partial_ratio}")
        for name in ("max_prompt_tokens", "max_teacher_tokens", "max_new_tokens", "batch_size", "val_batch_size"):
            if getattr(self.hparams, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self.hparams, name)}")
        gen = generation_batch_size
        if gen is not None and batch_size >= 1 and (gen < batch_size or gen % batch_size):
            problems.append(f"generation_batch_size must be a multiple of batch_size ({batch_size}), got {gen}")
        if teacher_trace not in get_args(TeacherTrace):
            problems.append(f"teacher_trace must be one of {', '.join(get_args(TeacherTrace))}, got {teacher_trace!r}")
        elif teacher_trace == "none" and partial_ratio != 0.5:
            # no trace, so no partial view to cut: a partial_ratio would silently do nothing
            problems.append(f"partial_ratio ({partial_ratio}) does nothing with teacher_trace 'none' (no trace is shown)")
        if problems:
            raise ValueError("; ".join(problems))
        self.train_sources = [resolve(src) for src in ([train] if isinstance(train, str) else train)]
        self.fields = FieldNames(**fields) if isinstance(fields, dict) else fields or FieldNames()
        self.template = PromptTemplate(**template) if isinstance(template, dict) else template or PromptTemplate()
        self.partial_ratio = partial_ratio
        self.teacher_trace = teacher_trace
        self.budgets = Budgets(max_prompt_tokens, max_teacher_tokens, max_new_tokens)
        self.val_benchmarks = list(val_benchmarks or [])
        self._tokenizer = None
        self.train_examples: list[PrivilegedExample] | None = None
        self.val_sets: list[tuple[Any, list[dict[str, Any]]]] | None = None
        self.stats: dict[str, int] = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from aropd.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_examples is None:
            self.train_examples = self._build_train()
        if stage in (None, "fit", "validate") and self.val_sets is None:
            self.val_sets = []
            for spec in self.val_benchmarks:
                from aropd.evaluators import get_benchmark

                bench = get_benchmark(spec.name)
                records = bench.load(spec.data_path and resolve(spec.data_path), limit=spec.limit)
                # Longer prompts tend to need longer answers: batching them together keeps a few long
                # generations from holding every batch open (rows are keyed by id, order is free).
                records.sort(key=lambda r: len(bench.prompt(r)))
                self.val_sets.append((bench, records))

    def _build_train(self) -> list[PrivilegedExample]:
        rows_by_source = [(src, load_records(src, self.hparams.train_split)) for src in self.train_sources]
        for src, rows in rows_by_source:  # every source checked before any tokenization
            check_records(rows, self.fields, src)
        f = self.fields
        records = [tuple(str(row[k]) for k in (f.question, f.reasoning, f.answer))
                   for _, rows in rows_by_source for row in rows]
        donors = list(range(len(records)))
        if self.teacher_trace == "shuffled":
            if len(records) < 2:
                raise ValueError(f"teacher_trace 'shuffled' needs at least 2 training records, got {len(records)}")
            # over all records before any is dropped, so dropping one does not re-pair the others
            donors = derangement(len(records), run_seed(self.hparams.seed))
        examples, dropped, truncated = [], 0, 0
        for (q, r, a), donor in zip(records, donors):
            try:
                ex = build_example(self.tokenizer, self.template, q, r, a, self.budgets, self.partial_ratio)
                if self.teacher_trace == "none":
                    ex = ex._replace(full=ex.student, partial=ex.student, truncated=False)
                elif self.teacher_trace == "shuffled":
                    _, r2, a2 = records[donor]
                    shown = build_example(self.tokenizer, self.template, q, r2, a2, self.budgets, self.partial_ratio)
                    ex = ex._replace(full=shown.full, partial=shown.partial, truncated=shown.truncated)
            except PromptTooLong:
                dropped += 1
                continue
            truncated += ex.truncated
            examples.append(ex)
        self.stats = {"examples": len(examples), "dropped_too_long": dropped, "truncated_trace": truncated}
        if dropped or truncated:
            log.warning(
                "training data: %d records dropped (question over budget), %d traces shortened to fit", dropped, truncated
            )
        if not examples:
            raise ValueError(f"no usable training records in {self.train_sources}")
        return examples

    def train_dataloader(self) -> DataLoader:
        gen = self.hparams.generation_batch_size
        if gen is not None and gen > self.hparams.batch_size:
            # The same micro-batches in the same order, each carrying its window's prompts (aropd.rollout).
            sampler = GenerationWindowSampler.following(
                self.train_sampler(), self.hparams.batch_size, gen, len(self.train_examples) >= self.hparams.batch_size
            )
            return ResumableDataLoader(
                WindowKeyed(self.train_examples), sampler=sampler, batch_size=None, num_workers=self.hparams.num_workers,
                collate_fn=functools.partial(collate_window, pad_id=self.tokenizer.pad_token_id),
            )
        # Resumable mid-epoch: the loader's position is saved in the checkpoint (aropd/checkpointing.py).
        return ResumableDataLoader(
            self.train_examples,
            batch_size=self.hparams.batch_size,
            sampler=self.train_sampler(),
            drop_last=len(self.train_examples) >= self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            collate_fn=functools.partial(collate_privileged, pad_id=self.tokenizer.pad_token_id),
        )

    def train_sampler(self) -> DistributedSampler:
        """The training order: one permutation per (seed, epoch), interleaved across data-parallel ranks.

        Rank r of W takes every W-th example from position r, so at step k the W ranks' batches of b
        hold exactly the examples of one process's batch of W·b. Lightning leaves a
        ``DistributedSampler`` as it is and sets its epoch.
        """
        shard = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        shard = shard or {"num_replicas": 1, "rank": 0}
        return DistributedSampler(self.train_examples, shuffle=True, seed=run_seed(self.hparams.seed), **shard)

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(
                records,
                batch_size=self.hparams.val_batch_size,
                shuffle=False,
                num_workers=self.hparams.num_workers,
                collate_fn=lambda recs, bench=bench: self._collate_prompts(bench, recs),
            )
            for bench, records in self.val_sets
        ]

    def _collate_prompts(self, bench, records: list[dict[str, Any]]) -> PromptBatch:
        seqs = [render(self.tokenizer, self.template.student_messages(bench.prompt(r))) for r in records]
        ids, mask = pad(seqs, self.tokenizer.pad_token_id, left=True)
        return PromptBatch(prompt_ids=ids, prompt_mask=mask, records=records, benchmark=bench.name)
