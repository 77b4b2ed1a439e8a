"""Pretrain the toy base model from scratch: a small Llama and its tokenizer, on the toy task.

The model learns three formats of the same worked solutions (loss on the response only):

* **student**: the student prompt (question alone) -> trace + EOS, so it can solve toy problems;
* **full view**: a teacher prompt with the whole reference trace in context -> trace + EOS;
* **partial view**: a teacher prompt with the first ``partial_ratio`` of the reasoning and the
  answer -> trace + EOS, so the late values must be computed, not copied.

Prompts and the reference response are the training pipeline's own (``aropd.data.build_example``),
so the base model sees exactly the token layout that distillation later feeds it. The two teacher
views really differ where hindsight helps (the late values), which :func:`view_divergence` measures
as the mean per-token KL(q_full || q_partial) on the reference traces of the test split. Greedy
accuracy on the test split is the base model's score. Seeded: the same arguments give the same model
(on the same torch build); ``threads`` and ``probe_every`` do not change the weights (greedy probes
draw no random numbers).

Measured, on the committed base (two runs: the defaults, seed 2, a copy share of 0.3 from the first
step, half of it partial-view copies, a tenth of the examples long-problem prefixes, 2% long problems
of 13-90 steps, the model at step 1,200 of a 1,400-step schedule; then ``LONG_STAGE``, 400 steps
continuing it; one thread): see ``aropd/assets/toy-base/pretrain.json`` and docs/cpu_study.md. The
arithmetic is learnt in a sharp transition (the loss sits near 0.5 for hundreds of steps, then falls
as the units digits are learnt), so ``stop_at`` places the base inside the 20-60% accuracy band. A
view copies the example trace only once an induction head forms, and whether and when it forms
depends on the seed and the data order: in the first run both views copy from step ~800, before the
arithmetic (the same recipe with six-step prefixes had not formed it by step 900, and had learnt the
arithmetic first). That copy holds only for traces of at most ``max_steps`` steps, the ones the run's
copy examples had; the second run's long copy examples extend it to 90 steps. On the test problems
the full view then predicts the tokens the partial view hides almost exactly
(``copy_nll_ratio_hidden`` ~0.05 short, ~0.002 long) and the partial view copies what it is shown,
so the views disagree about a hundred times more on hidden than on shown tokens. Right after a
response's slip in the hidden steps the full view still gives the reference's next result (0.83)
where the partial view and the student follow the response's own chain (:func:`slip_report`).

Options: ``copy_frac`` (a copy curriculum: full-view examples whose shown trace has random
results, so only copying predicts them), with ``copy_long_frac`` of them long and
``copy_partial_frac`` of them partial-view ones, ``prefix_frac`` (a label curriculum), ``init``
(continue from a pretrained folder), ``stop_at`` (keep the model a longer schedule has at that step)
and ``snapshot_every`` (save the candidates of a band). :func:`views_report` measures the outcome
(the copy figures, ``copy_nll_ratio_hidden`` and ``kl_hidden_to_shown_ratio``, over the test
problems and split by length); the probes report them during training. docs/cpu_study.md has every
run so far.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from aropd.buckets import bucket_index, bucket_names
from aropd.data import PrivilegedExample, build_example, pad
from aropd.divergences import forward_kl
from aropd.models import train_tiny_tokenizer
from aropd.paths import resolve
from aropd.toy import MOD, STEP_TOKENS, TOY_TEMPLATE, apply_op, make_problem, parse_question, read_split, scramble
from aropd.views import Budgets, PromptTemplate, partial_view

VIEWS = ("student", "full", "partial")  # the prompt fields of aropd.data.PrivilegedExample
POOL = 256  # examples drawn at a time and sorted by length into batches (:func:`batches`)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


@dataclass
class PretrainArgs:
    """Everything that sets the pretraining run (``pretrain.json`` records it as ``args``)."""

    out: str = "aropd/assets/toy-base"
    """Folder of the model, its tokenizer and ``pretrain.json``."""
    splits: str = "aropd/assets/toy"
    """Folder of ``{train,val,test}.jsonl``: none is trained on (their questions are excluded)."""
    seed: int = 2
    """Seed of the weights, the problem stream and the batch order."""
    threads: int = 1
    """torch intra-op threads (does not change the weights)."""
    hidden: int = 192
    """Hidden size."""
    layers: int = 4
    """Decoder layers."""
    heads: int = 6
    """Attention heads (as many key/value heads)."""
    intermediate: int = 512
    """MLP inner size."""
    vocab_size: int = 512
    """BPE vocabulary size before the step tokens are added."""
    max_positions: int = 4096
    """Longest sequence the model takes."""
    min_steps: int = 1
    """Fewest steps of a training problem."""
    max_steps: int = 12
    """Most steps of a training problem (outside the long share)."""
    long_frac: float = 0.02
    """Share of training problems drawn from ``long_steps``, so traces of a few hundred tokens occur."""
    long_steps: tuple[int, int] = (13, 90)
    """Step range of the long share."""
    mix: tuple[float, float, float] = (0.5, 0.25, 0.25)
    """Weights of the student, full-view and partial-view formats."""
    copy_frac: float = 0.3
    """Share of training examples that teach the full view to copy (a copy curriculum): a full-view
    prompt whose example trace has random results (``aropd.toy.scramble``: the layout kept, the
    arithmetic not), with that trace + EOS as the target, so only copying the example predicts it;
    the rest follow ``mix``. 0: none. In [0, 1)."""
    copy_long_frac: float = 0.0
    """Share of the copy examples whose problem has ``long_steps`` steps (drawn apart from the problem
    stream, from its seed, none a split's question), so the full view also learns to copy traces as
    long as the long test problems' without taking the student format's budget. 0: the stream's
    problem, like every other example. In [0, 1]; needs ``copy_frac`` > 0."""
    prefix_frac: float = 0.1
    """Share of training examples that are the first ``prefix_steps`` steps of a long problem's trace
    (``long_steps`` steps) after the student prompt, with no EOS: a label curriculum. Step labels are
    single tokens, and labels above ``max_steps`` occur only in the long share, so a model can count
    down from ``#9`` yet copy ``#78`` from the question as ``#37``, and stop a 78-step problem after 37
    steps; a prefix teaches the copy of the first label and its first decrements in a tenth of a long
    example's tokens. Drawn apart from the problem stream (like ``copy_long_frac``'s); a prefix says
    nothing of the answer. 0: none. In [0, 1); ``copy_frac`` applies to the other examples."""
    prefix_steps: int = 2
    """Steps of the trace in each prefix example (see ``prefix_frac``)."""
    copy_partial_frac: float = 0.5
    """Share of the copy examples that teach the partial view to copy what it shows: a partial-view
    prompt of a problem whose shown steps have random results and whose later steps are computed from
    them (``aropd.toy.scramble`` with ``steps``), with the shown steps as the target (no more: the loss
    teaches copying, not arithmetic). Without it only the full view learns to copy, and the partial
    view recomputes even the steps it is shown, so the views disagree as much on the shown tokens as
    on the hidden ones. A problem whose partial view shows no whole step is a full-view copy example
    instead. In [0, 1]; needs ``copy_frac`` > 0."""
    init: str | None = None
    """A pretrained model folder (with its tokenizer) to continue from; None: a fresh model and
    tokenizer. ``seen_questions`` then also covers the problems of the run that made ``init``."""
    partial_ratio: float = 0.5
    """Fraction of the reasoning the partial view shows."""
    tokenizer_problems: int = 2000
    """Problems the tokenizer is trained on."""
    steps: int = 1400
    """Length of the learning-rate schedule, in optimizer steps."""
    stop_at: int | None = 1200
    """Stop after this many steps of the ``steps``-long schedule: the model a longer run has at that
    step, bit for bit (the arithmetic is learnt in a sharp transition, and the band where the base is
    useful is a few hundred steps wide). None: at ``steps``."""
    batch_tokens: int = 6144
    """Padded tokens per batch."""
    lr: float = 2e-3
    """Peak learning rate (AdamW)."""
    warmup: int = 100
    """Linear warm-up steps, then cosine to a tenth of the peak."""
    weight_decay: float = 0.01
    """AdamW weight decay of the matrices (not of norms)."""
    log_every: int = 50
    """Steps per logged mean loss."""
    eval_limit: int = 0
    """Test problems of the greedy accuracy (0: all)."""
    kl_limit: int = 64
    """Test problems of KL(full || partial) (0: all)."""
    eval_batch: int = 16
    """Problems per greedy-generation batch."""
    probe_every: int = 100
    """Greedy accuracy and the copy figures (``copy_nll_ratio_hidden``, ``kl_hidden_to_shown_ratio``)
    on ``probe_size`` short val problems every this many steps (0: never)."""
    probe_size: int = 32
    """Short val problems of each probe."""
    probe_long: int = 8
    """Long val problems (more than ``max_steps`` steps) whose copy ratio each probe also reports
    (``probe_long_copy_ratio``; the short problems' ratio says nothing about the long ones')."""
    snapshot_every: int = 0
    """Save the model and tokenizer every this many steps in ``out/snapshots/step-N`` (0: never). Does
    not change the weights; ``stop_at`` N reproduces a snapshot as a base with its report."""


# The committed base is two runs of the script: the defaults, then this continuation of their model
# (``--long-stage --init <the first run's folder>``), which teaches the long problems two things the
# first run leaves out. Their labels: the first run skips in the countdown among the highest
# (``#70``-``#90``, the rarest: only problems at least that long teach their decrements), which
# six-step prefixes of long problems teach. Their copy: the first run's views copy only traces of
# at most ``max_steps`` steps (a 13-25-step trace is computed, not copied); half of the examples
# here are copy examples of 13-90-step scrambled traces, and both views copy long traces from
# about step 150 on, their short copy figures kept.
LONG_STAGE: dict[str, Any] = {"seed": 3, "steps": 400, "stop_at": 400, "warmup": 20, "lr": 5e-4,
                              "prefix_frac": 0.3, "prefix_steps": 6, "copy_frac": 0.5, "copy_long_frac": 1.0}


def args_from(values: dict[str, Any]) -> PretrainArgs:
    """``PretrainArgs`` from a plain dict (parsed options, or a ``pretrain.json``'s ``args``: lists for tuples)."""
    return PretrainArgs(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def shown_steps(problem: dict[str, str], ratio: float) -> int:
    """How many whole steps of ``problem``'s trace its partial view shows."""
    return partial_view(problem["reasoning"], ratio).count(".")


class Result(NamedTuple):
    model: Any
    tokenizer: Any
    report: dict[str, Any]


# --------------------------------------------------------------------------------------------- model


def train_toy_tokenizer(texts: list[str], vocab_size: int = 512) -> Any:
    """Byte-level BPE with every digit its own token (arithmetic stays digit-wise), plus chat template;
    step labels and operations are single tokens (``aropd.toy.STEP_TOKENS``).

    Saved with ``save_pretrained`` and reloaded with ``AutoTokenizer`` it gives the same ids.
    """
    tok = train_tiny_tokenizer(texts, vocab_size, split_digits=True)
    tok.add_tokens(STEP_TOKENS)
    return tok


def build_model(tok: Any, a: PretrainArgs) -> Any:
    # Not aropd.models.build_tiny_llama: that one fixes the MLP at 4 x hidden and 2048 positions.
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads,
        max_position_embeddings=a.max_positions,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


# ---------------------------------------------------------------------------------------------- data


def example(tok: Any, template: PromptTemplate, problem: dict[str, str], ratio: float) -> PrivilegedExample:
    """The three prompts and the reference response (trace + EOS) of a problem, as training builds them."""
    return build_example(tok, template, problem["question"], problem["reasoning"], problem["answer"],
                         Budgets.unlimited(), ratio)  # every toy problem fits the model's positions whole


def encode(tok: Any, template: PromptTemplate, problem: dict[str, str], view: str, ratio: float, prefix_steps: int = 0):
    """``(ids, labels)`` of one view's prompt followed by the reference; the loss is on the reference.

    ``prefix_steps`` > 0: the reference stops after that many steps of the trace (no closing tags, no
    answer, no EOS).
    """
    ex = example(tok, template, problem, ratio)
    prompt, target = getattr(ex, view), ex.reference
    if prefix_steps:
        steps = problem["reasoning"].split(" #")[:prefix_steps]
        head = template.trace_head + " #".join(steps)
        n = len(tok(head, add_special_tokens=False)["input_ids"])
        target = target[:n]
    return prompt + target, [-100] * len(prompt) + target


class ProblemStream:
    """Seeded endless stream of training problems, none of whose questions is in ``exclude``.

    Step counts are uniform on ``[min_steps, max_steps]``, except a ``long_frac`` share drawn from
    ``long_steps`` so the model also sees traces of a few hundred tokens.
    """

    def __init__(
        self, seed: int, min_steps: int, max_steps: int, long_frac: float, long_steps: tuple[int, int], exclude: set[str]
    ):
        self.rng, self.exclude = random.Random(seed), exclude
        self.min_steps, self.max_steps = min_steps, max_steps
        self.long_frac, self.long_steps = long_frac, long_steps

    def __iter__(self) -> Iterator[dict[str, str]]:
        while True:
            lo, hi = self.long_steps if self.rng.random() < self.long_frac else (self.min_steps, self.max_steps)
            p = make_problem(self.rng, self.rng.randint(lo, hi))
            if p["question"] not in self.exclude:
                yield p


def curriculum(
    stream: Iterator[dict[str, str]], rng: random.Random, args: PretrainArgs, exclude: set[str]
) -> Iterator[tuple[str, dict[str, str]]]:
    """The training examples as ``(format, problem)``: a format of ``VIEWS`` drawn by ``mix`` with the
    stream's next problem, or ``"copy"`` (a ``copy_frac`` share: a full-view example of a scrambled
    problem, whose trace only copying predicts). A ``copy_long_frac`` share of the copy examples take a
    problem with ``long_steps`` steps instead of the stream's.
    """
    for prob in stream:
        # (no draw at prefix_frac 0 or copy_frac 0: the plain run's example stream is unchanged)
        if args.prefix_frac and rng.random() < args.prefix_frac:
            yield "prefix", long_problem(rng, args.long_steps, exclude)
            continue
        if args.copy_frac and rng.random() < args.copy_frac:
            if args.copy_long_frac and rng.random() < args.copy_long_frac:
                # Its own draw rather than the stream's next, so the stream (which seen_questions
                # replays) is unchanged; its scrambled trace teaches nothing about the answer.
                prob = long_problem(rng, args.long_steps, exclude)
            if args.copy_partial_frac and rng.random() < args.copy_partial_frac:
                shown = shown_steps(prob, args.partial_ratio)
                if shown:
                    yield "copy_partial", scramble(prob, rng, shown)
                    continue
            yield "copy", scramble(prob, rng)
            continue
        yield rng.choices(VIEWS, weights=args.mix)[0], prob


def long_problem(rng: random.Random, long_steps: tuple[int, int], exclude: set[str]) -> dict[str, str]:
    """A problem with ``long_steps`` steps, drawn from ``rng``, whose question is not in ``exclude``."""
    while True:
        prob = make_problem(rng, rng.randint(*long_steps))
        if prob["question"] not in exclude:
            return prob


def seen_questions(report: dict[str, Any]) -> set[str]:
    """Every question that the pretraining run of ``report`` (its ``pretrain.json``) can have trained on.

    The run's problem stream and example curriculum replayed from the recorded args: the tokenizer's
    problems, then the problems of the examples seen (the stream's, and those the curriculum draws
    apart from it), plus two pools of look-ahead (a batch pool is drawn whole before it is used), so
    the set holds all the run drew and a few hundred more. A new evaluation split that excludes it
    holds no problem the base model was trained on.
    """
    a = report["args"]
    args = args_from(a)
    splits = [read_split(Path(resolve(args.splits)) / f"{s}.jsonl") for s in ("train", "val", "test")]
    exclude = {r["question"] for rows in splits for r in rows}
    stream = iter(ProblemStream(args.seed, args.min_steps, args.max_steps, args.long_frac, args.long_steps, exclude))
    seen = {next(stream)["question"] for _ in range(args.tokenizer_problems)}

    def drawn():  # every stream problem the curriculum takes, used or not
        for p in stream:
            seen.add(p["question"])
            yield p

    # pretrain's data_rng: the same seed, so the same examples
    for _, prob in islice(curriculum(drawn(), random.Random(args.seed + 1), args, exclude), report["examples_seen"] + 2 * POOL):
        seen.add(prob["question"])
    # A continued run: the problems of the run that made its starting point too (a report written
    # before reports kept it names only the folder).
    if report.get("init_report"):
        seen |= seen_questions(report["init_report"])
    elif args.init and "init_report" not in report:
        seen |= seen_questions(json.loads((Path(resolve(args.init)) / "pretrain.json").read_text()))
    return seen


def batches(examples: Iterator[tuple[list[int], list[int]]], rng: random.Random, max_tokens: int, pool: int):
    """Length-bucketed batches of at most ``max_tokens`` (padded) tokens, shuffled within each pool."""
    while True:
        chunk = sorted((next(examples) for _ in range(pool)), key=lambda e: len(e[0]))
        out, cur = [], []
        for ex in chunk:
            if cur and (len(cur) + 1) * len(ex[0]) > max_tokens:
                out.append(cur)
                cur = []
            cur.append(ex)
        out.append(cur)
        rng.shuffle(out)
        yield from out


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = pad([e[0] for e in batch], pad_id, left=False)
    labels, _ = pad([e[1] for e in batch], -100, left=False)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of the batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)


# ---------------------------------------------------------------------------------------- evaluation


def extract_answer(text: str) -> int | None:
    m = _ANSWER.search(text)
    try:
        return int(m.group(1).strip()) if m else None
    except ValueError:
        return None


@torch.no_grad()
def greedy_accuracy(
    model: Any, tok: Any, template: PromptTemplate, problems: list[dict[str, str]], batch_size: int = 16
) -> dict[str, Any]:
    """Greedy ``model.generate`` on each question; exact integer match of the ``<answer>``.

    ``by_length`` splits it by response length in the library's buckets (``aropd.buckets``), the
    non-empty ones only.
    """
    model.eval()
    order = sorted(range(len(problems)), key=lambda i: len(problems[i]["reasoning"]))
    correct, lengths = [False] * len(problems), [0] * len(problems)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        exs = [example(tok, template, problems[i], 1.0) for i in idx]
        budget = max(len(e.reference) for e in exs) * 5 // 4 + 16
        ids, mask = pad([e.student for e in exs], tok.pad_token_id, left=True)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=budget, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )[:, ids.shape[1] :].tolist()
        for i, seq in zip(idx, out):
            seq = seq[: seq.index(tok.eos_token_id) + 1] if tok.eos_token_id in seq else seq
            lengths[i] = len(seq)
            correct[i] = extract_answer(tok.decode(seq, skip_special_tokens=True)) == int(problems[i]["answer"])
    names = bucket_names("len")
    hits, counts = [0] * len(names), [0] * len(names)
    for c, b in zip(correct, bucket_index(torch.tensor(lengths)).tolist()):
        hits[b] += int(c)
        counts[b] += 1
    return {
        "accuracy": sum(correct) / max(len(problems), 1),
        "n": len(problems),
        "mean_response_tokens": sum(lengths) / max(len(lengths), 1),
        "by_length": {name: {"accuracy": h / n, "n": n} for name, h, n in zip(names, hits, counts) if n},
    }


def _response_logprobs(model: Any, seqs: list[list[int]], starts: list[int], pad_id: int) -> list[torch.Tensor]:
    """Log-probs (fp32, full vocabulary) predicting each token from ``starts[i]`` on: ``[len - start, V]``."""
    ids, mask = pad(seqs, pad_id, left=False)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return [torch.log_softmax(logits[i, st - 1 : len(s) - 1], -1) for i, (s, st) in enumerate(zip(seqs, starts))]


def view_divergence(
    model: Any, tok: Any, template: PromptTemplate, problems: list[dict[str, str]], ratio: float, batch_size: int = 8
) -> dict[str, float]:
    """How the teacher views read the reference traces of ``problems``: the copy figures.

    Per response token (the reference trace + EOS after each prompt), split into the tokens the
    partial view hides (the reasoning past its cut) and all others ("shown": the kept reasoning, the
    tags, the answer, EOS):

    * ``kl_full_partial_*``: mean KL(q_full || q_partial) (``aropd.divergences.forward_kl``) over all,
      hidden and shown tokens;
    * ``nll_<view>_*``: mean NLL of the reference token under the student prompt and each view, over
      all, hidden and shown tokens;
    * ``copy_nll_ratio_hidden``: ``nll_full_hidden_tokens / nll_student_hidden_tokens``. A full view
      that copies the trace it sees predicts the hidden tokens far better than the question alone
      does (ratio well below 1); one that does not copy sits near or above 1;
    * ``kl_hidden_to_shown_ratio``: ``kl_full_partial_hidden_tokens / kl_full_partial_shown_tokens``:
      how much more the two views disagree where only the full view has the trace.
    """
    return _view_means(_view_sums(model, tok, template, problems, ratio, batch_size))


Sums = tuple[dict[str, float], dict[str, int]]  # per-token sums by name and part, token counts by part


@torch.no_grad()
def _view_sums(
    model: Any, tok: Any, template: PromptTemplate, problems: list[dict[str, str]], ratio: float, batch_size: int = 8
) -> list[Sums]:
    """Per problem: the sums over its response tokens that :func:`view_divergence` averages."""
    model.eval()
    out: list[Sums] = []
    open_tag = template.trace_head
    for s in range(0, len(problems), batch_size):
        chunk = problems[s : s + batch_size]
        exs = [example(tok, template, p, ratio) for p in chunk]
        lp = {}
        for v in VIEWS:
            prompts = [getattr(e, v) for e in exs]
            seqs = [p + e.reference for p, e in zip(prompts, exs)]
            lp[v] = _response_logprobs(model, seqs, [len(p) for p in prompts], tok.pad_token_id)
        for j, (p, e) in enumerate(zip(chunk, exs)):
            target = torch.tensor(e.reference)
            per_token = {f"nll_{v}": -lp[v][j].gather(-1, target[:, None])[:, 0] for v in VIEWS}
            per_token["kl_full_partial"] = forward_kl(lp["full"][j], lp["partial"][j])
            trace = template.format_trace(p["reasoning"], p["answer"])
            offsets = tok(trace, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            cut = len(open_tag) + len(partial_view(p["reasoning"], ratio))
            hidden = torch.tensor([cut <= a < len(open_tag) + len(p["reasoning"]) for a, _ in offsets] + [False])
            sums, counts = {}, {}
            for part, mask in (("all", torch.ones_like(hidden)), ("hidden", hidden), ("shown", ~hidden)):
                counts[part] = int(mask.sum())
                for name, values in per_token.items():
                    sums[f"{name}_{part}"] = values[mask].sum().item()
            out.append((sums, counts))
    return out


SLIP_SHIFT = 50  # a slipped result is the correct one + 50 (mod 100): its tens digit differs


def slipped_trace(problem: dict[str, str], j: int) -> tuple[str, int, int]:
    """The reference trace of ``problem`` up to step ``j + 1``'s ``=``, with step ``j``'s (0-based)
    result slipped by :data:`SLIP_SHIFT` and step ``j + 1`` written on the slipped value, as a student
    that slipped there writes it; then the result that follows from it (the response's own chain) and
    the reference's result of step ``j + 1``. They differ: every operation is a bijection."""
    value, chain = parse_question(problem["question"])
    n, lines = len(chain), []
    if not 0 <= j < n - 1:
        raise ValueError(f"a slip at step {j} needs a step after it; the problem has {n}")
    for i, (op, k) in enumerate(chain[: j + 1]):
        new = apply_op(value, op, k)
        written = (new + SLIP_SHIFT) % MOD if i == j else new
        lines.append(f"#{n - i} {op}{k} on {value:02d}={written:02d}.")
        value = new
    op, k = chain[j + 1]
    lines.append(f"#{n - j - 1} {op}{k} on {written:02d}=")
    return " ".join(lines), apply_op(written, op, k), apply_op(value, op, k)


@torch.no_grad()
def slip_report(model: Any, tok: Any, template: PromptTemplate, problems: list[dict[str, str]], ratio: float) -> dict:
    """What each prompt predicts right after a response's slip: the hindsight shortcut, measured.

    Each problem's reference trace with one result slipped (:func:`slipped_trace`), and the next step
    written on the slipped value. Per prompt, the mean probability of the next result that follows the
    response's own chain, ``p_own_<view>``, and of the reference's next result, ``p_ref_<view>``. A
    view that copies its example trace endorses the reference's value, which the response's steps do
    not lead to; a student distilled towards it learns results that do not follow from their inputs
    (``aropd.toy.check_steps``). Two places, each over the problems that have it: ``hidden``, a slip
    at the first step the partial view hides (the next step hidden too); ``shown``, at the first step
    when the partial view shows the next one too.
    """
    model.eval()
    sums: dict[str, dict[str, float]] = {"hidden": {}, "shown": {}}
    counts = {"hidden": 0, "shown": 0}
    for p in problems:
        steps, shown = n_steps(p), shown_steps(p, ratio)
        slips = {"hidden": shown if shown + 1 < steps else None, "shown": 0 if shown >= 2 else None}
        ex = example(tok, template, p, ratio)
        for part, j in slips.items():
            if j is None:
                continue
            text, own, ref = slipped_trace(p, j)
            prefix = tok(template.trace_head + text, add_special_tokens=False)["input_ids"]
            for v in VIEWS:
                prompt = getattr(ex, v)
                for name, value in (("own", own), ("ref", ref)):
                    ids = tok(template.trace_head + text + f"{value:02d}", add_special_tokens=False)["input_ids"]
                    if ids[: len(prefix)] != prefix:
                        raise ValueError(f"the tokenizer merges the value into the text before it: {text!r}")
                    seq = torch.tensor([prompt + ids])
                    lp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
                    start = len(prompt) + len(prefix)
                    logp = sum(lp[t - 1, seq[0, t]].item() for t in range(start, seq.shape[1]))
                    key = f"p_{name}_{v}"
                    sums[part][key] = sums[part].get(key, 0.0) + math.exp(logp)
            counts[part] += 1
    return {part: {"problems": n, **{k: v / n for k, v in sorted(sums[part].items())}}
            for part, n in counts.items() if n}


def _view_means(per_problem: list[Sums]) -> dict[str, float]:
    """The figures of :func:`view_divergence` from the per-problem sums of a set of problems."""
    sums: dict[str, float] = {}
    counts = {"all": 0, "hidden": 0, "shown": 0}
    for s, c in per_problem:
        for k, v in s.items():
            sums[k] = sums.get(k, 0.0) + v
        for k, v in c.items():
            counts[k] += v
    mean = {k: v / max(counts[k.rsplit("_", 1)[1]], 1) for k, v in sums.items()}
    # The names of the first version of this report (the committed base's pretrain.json) are kept.
    out = {
        "kl_full_partial_per_token": mean["kl_full_partial_all"],
        "kl_full_partial_hidden_tokens": mean["kl_full_partial_hidden"],
        "kl_full_partial_shown_tokens": mean["kl_full_partial_shown"],
        "hidden_token_fraction": counts["hidden"] / counts["all"],
        **{f"nll_{v}_per_token": mean[f"nll_{v}_all"] for v in VIEWS},
        "tokens": counts["all"],
    }
    out.update({f"nll_{v}_{part}_tokens": mean[f"nll_{v}_{part}"] for part in ("hidden", "shown") for v in VIEWS})
    out["copy_nll_ratio_hidden"] = out["nll_full_hidden_tokens"] / max(out["nll_student_hidden_tokens"], 1e-12)
    out["kl_hidden_to_shown_ratio"] = out["kl_full_partial_hidden_tokens"] / max(out["kl_full_partial_shown_tokens"], 1e-12)
    return out


# ------------------------------------------------------------------------------------------- the run


def pretrain(args: PretrainArgs) -> Result:
    """Train, evaluate and save the model, its tokenizer and ``pretrain.json`` in ``args.out``."""
    if not 0.0 <= args.copy_frac < 1.0:
        raise ValueError(f"copy_frac must be in [0, 1), got {args.copy_frac}")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        raise ValueError(f"stop_at must be in [1, steps={args.steps}], got {args.stop_at}")
    if not 0.0 <= args.copy_long_frac <= 1.0 or (args.copy_long_frac and not args.copy_frac):
        raise ValueError(f"copy_long_frac must be in [0, 1] and needs copy_frac > 0, got {args.copy_long_frac} "
                         f"with copy_frac {args.copy_frac}")
    if not 0.0 <= args.copy_partial_frac <= 1.0 or (args.copy_partial_frac and not args.copy_frac):
        raise ValueError(f"copy_partial_frac must be in [0, 1] and needs copy_frac > 0, got {args.copy_partial_frac} "
                         f"with copy_frac {args.copy_frac}")
    if not 0.0 <= args.prefix_frac < 1.0 or args.prefix_steps < 1:
        raise ValueError(f"prefix_frac must be in [0, 1) and prefix_steps >= 1, got {args.prefix_frac} and {args.prefix_steps}")
    for name in ("probe_every", "snapshot_every", "probe_long"):
        if getattr(args, name) < 0:
            raise ValueError(f"{name} must be >= 0 (0: off), got {getattr(args, name)}")
    last = args.stop_at or args.steps
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    template = TOY_TEMPLATE
    splits = {s: read_split(Path(args.splits) / f"{s}.jsonl") for s in ("train", "val", "test")}
    exclude = {r["question"] for rows in splits.values() for r in rows}
    stream = iter(
        ProblemStream(args.seed, args.min_steps, args.max_steps, args.long_frac, tuple(args.long_steps), exclude)
    )

    corpus_problems = [next(stream) for _ in range(args.tokenizer_problems)]
    texts = [template.system, template.teacher_user] + [
        p["question"] + "\n" + template.format_trace(p["reasoning"], p["answer"]) for p in corpus_problems
    ]
    if args.init is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok, model = AutoTokenizer.from_pretrained(args.init), AutoModelForCausalLM.from_pretrained(args.init)
        # Kept in this run's report, so seen_questions covers the first run's problems without its folder.
        first = Path(args.init) / "pretrain.json"
        init_report = json.loads(first.read_text()) if first.exists() else None
    else:
        init_report = None
        tok = train_toy_tokenizer(texts, args.vocab_size)
        model = build_model(tok, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params, vocab {len(tok)}", flush=True)

    data_rng = random.Random(args.seed + 1)

    def examples():
        for kind, prob in curriculum(stream, data_rng, args, exclude):
            if kind == "prefix":
                yield encode(tok, template, prob, "student", args.partial_ratio, args.prefix_steps)
            elif kind == "copy_partial":
                yield encode(tok, template, prob, "partial", args.partial_ratio, shown_steps(prob, args.partial_ratio))
            else:
                yield encode(tok, template, prob, "full" if kind == "copy" else kind, args.partial_ratio)

    batch_iter = batches(examples(), random.Random(args.seed + 2), args.batch_tokens, pool=POOL)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(args.steps - args.warmup, 1)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    probe = [p for p in splits["val"] if len(p["reasoning"]) < 200][: args.probe_size]
    probe_long = [p for p in splits["val"] if n_steps(p) > args.max_steps][: args.probe_long]
    model.train()
    losses, log, examples_seen, t_train, c_train = [], [], 0, time.time(), time.process_time()
    for step in range(last):
        batch = next(batch_iter)
        examples_seen += len(batch)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = response_loss(model, collate(batch, tok.pad_token_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        probing = args.probe_every and (step + 1) % args.probe_every == 0
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == last or probing:  # probes land on their step
            recent = sum(losses[-args.log_every :]) / len(losses[-args.log_every :])
            log.append({"step": step + 1, "loss": round(recent, 4), "seconds": round(time.time() - t_train, 1)})
            print(f"step {step + 1}/{args.steps} loss {recent:.4f} lr {lr_at(step):.2e} "
                  f"examples {examples_seen} {time.time() - t_train:.0f}s", flush=True)
        if probing:
            acc = greedy_accuracy(model, tok, template, probe, args.eval_batch)
            # The copy ratio moves with the arithmetic (the full view copies only while the chain is
            # not yet computed), so the probe tracks both to show where a run crosses the band.
            views = view_divergence(model, tok, template, probe, args.partial_ratio)
            log[-1].update(probe_accuracy=acc["accuracy"], probe_copy_ratio=views["copy_nll_ratio_hidden"],
                           probe_kl_ratio=views["kl_hidden_to_shown_ratio"])
            print(f"  probe accuracy {acc['accuracy']:.3f}, copy ratio {views['copy_nll_ratio_hidden']:.3f}, "
                  f"KL hidden/shown {views['kl_hidden_to_shown_ratio']:.2f} on {len(probe)} short val problems",
                  flush=True)
            if probe_long:
                long_views = view_divergence(model, tok, template, probe_long, args.partial_ratio)
                log[-1].update(probe_long_copy_ratio=long_views["copy_nll_ratio_hidden"])
                print(f"  copy ratio {long_views['copy_nll_ratio_hidden']:.3f} on {len(probe_long)} long val problems",
                      flush=True)
            model.train()
        if args.snapshot_every and (step + 1) % args.snapshot_every == 0:
            snap = Path(args.out) / "snapshots" / f"step-{step + 1}"
            model.save_pretrained(snap)
            tok.save_pretrained(snap)
    train_seconds, train_cpu = time.time() - t_train, time.process_time() - c_train

    t_eval = time.time()
    test = splits["test"][: args.eval_limit or None]
    acc = greedy_accuracy(model, tok, template, test, args.eval_batch)
    acc_seconds = time.time() - t_eval
    views = views_report(model, tok, splits["test"][: args.kl_limit or None], args.partial_ratio, args.max_steps)
    kl = views["views"]
    eval_seconds = time.time() - t_eval
    tail = losses[-args.log_every :]
    report = {
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()},
        "seed": args.seed,
        "params": n_params,
        "vocab_size": len(tok),
        "examples_seen": examples_seen,
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu, 1),
        "accuracy_seconds": round(acc_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "wall_seconds": round(time.time() - t0, 1),
        "cpu_seconds": round(time.process_time(), 1),
        "test": acc,
        **views,
        "log": log,
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": sys.version.split()[0],
        },
        "threads": args.threads,
        "init_report": {k: init_report[k] for k in ("args", "examples_seen", "init_report", "wall_seconds")
                        if init_report.get(k)}
        if init_report else None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"test accuracy {acc['accuracy']:.3f} (n={acc['n']}), "
        f"KL(full||partial) {kl['kl_full_partial_per_token']:.4f} nats/token, "
        f"train {train_seconds:.0f}s, wall {report['wall_seconds']:.0f}s -> {out}",
        flush=True,
    )
    return Result(model, tok, report)


def record_views(out: str | Path, threads: int = 2) -> dict:
    """Recompute the copy figures (:func:`views_report`: ``views``, ``views_by_length``, ``after_slip``) of the model
    in ``out`` into its ``pretrain.json``; they are returned.

    For a base pretrained before a figure was added: its recorded ``args`` (``splits``, ``kl_limit``,
    ``partial_ratio``) choose the same problems the run measured, and nothing else in the report or
    the model changes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    out = Path(out)
    report = json.loads((out / "pretrain.json").read_text())
    a = report["args"]
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    problems = read_split(Path(resolve(a["splits"])) / "test.jsonl")[: a["kl_limit"] or None]
    views = views_report(model, tok, problems, a["partial_ratio"], a["max_steps"])
    report.update(views)
    (out / "pretrain.json").write_text(json.dumps(report, indent=1) + "\n")
    return views


def views_report(model: Any, tok: Any, problems: list[dict[str, str]], ratio: float, max_steps: int) -> dict:
    """``views``: :func:`view_divergence` on ``problems``; ``views_by_length``: the same on the problems
    within the training step range (``short``: at most ``max_steps`` steps) and on the longer ones
    (``long``), each present when it has problems. The long traces hold most of the tokens of a test
    split with long problems, and a full view can copy the short ones and not the long, so the
    overall figures alone would hide either. ``after_slip``: :func:`slip_report` on the same problems.
    """
    per_problem = _view_sums(model, tok, TOY_TEMPLATE, problems, ratio)
    short = [n_steps(p) <= max_steps for p in problems]
    groups = {"short": [x for x, k in zip(per_problem, short) if k], "long": [x for x, k in zip(per_problem, short) if not k]}
    return {"views": _view_means(per_problem), "views_by_length": {k: _view_means(g) for k, g in groups.items() if g},
            "after_slip": slip_report(model, tok, TOY_TEMPLATE, problems, ratio)}


def n_steps(problem: dict[str, str]) -> int:
    """The number of steps of a toy problem (read from its question)."""
    return len(parse_question(problem["question"])[1])
