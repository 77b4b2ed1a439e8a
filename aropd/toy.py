"""A seeded synthetic task whose worked solutions carry hindsight: chains of arithmetic mod 100.

A problem gives a two-digit start value, two operations applied in turn and a step count; the
worked solution counts its steps down from ``#n`` to ``#1``, each naming the operation, the running
value and the result, and the answer is the last value::

    question:  Working mod 100, apply -2 and +5 in turn from #3 down to #1, starting at 98.
    reasoning: #3 -2 on 98=96. #2 +5 on 96=01. #1 -2 on 01=99.
    answer:    99

Why privilege matters here. Every value depends on all earlier ones, so a student must compute the
chain in order; a teacher that sees the full solution can copy any late value (and the answer) the
moment it is needed, with no computation. A partial view (the first half of the reasoning plus the
answer) knows the early values and the answer but must compute the late values itself. So the two
teacher views agree on the first half of a trace and disagree exactly where hindsight helps, and
once a student's chain goes wrong the full view still endorses the reference's late values, which
no longer follow from the student's own prefix: a hindsight shortcut.

Design choices, all so that a 2M-parameter model pretrained for 15 CPU minutes can do the task:

* Every step has the same token layout (labels and operations are one token each with the toy-base
  tokenizer, ``STEP_TOKENS``; values are always two digits), and the question ends with the step
  count, the operations and the start value. So everything a step copies sits a fixed number of
  tokens back: the operation two steps up, the running value in the step before, the first two
  steps' inputs at the end of the question. Fixed-offset copies are learnt in minutes. A version
  with a different operation per step, looked up by its label in the question, needs an induction
  head; after 15 CPU minutes that lookup was still at chance (2.9 nats) while all else was learnt.
* Labels count down, so the trace ends after ``#1`` whatever the length (no comparison with the
  question's count is needed).
* Every operation is a bijection mod 100 (``*`` only multiplies by 3, 7 or 9, units mod 100), so
  values (and answers) stay uniform on 0..99 instead of collapsing onto multiples of 10 or 0. The
  committed splits use ``+`` and ``-`` only (``OPS``): the units digit of a product is a table the
  small model learns too slowly.
* Length is set by the number of steps: 11 tokens per step with the toy-base tokenizer
  (``approx_response_tokens``), from ~35 tokens (2 steps) to ~1,000 (90 steps); labels go to #99.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import NamedTuple

from aropd.views import PromptTemplate

MOD = 100
OPERANDS: dict[str, tuple[int, ...]] = {
    "+": tuple(range(1, 10)),
    "-": tuple(range(1, 10)),
    "*": (3, 7, 9),  # units mod 100: multiplication stays a bijection
}
OPS = ("+", "-")  # the committed splits (see the module docstring)
# One token each for the step labels and the operations (see the module docstring).
MAX_LABEL = 99
STEP_TOKENS = [f"#{i}" for i in range(1, MAX_LABEL + 1)] + [f" {o}{k}" for o in OPS for k in OPERANDS[o]]
# Response length in toy-base tokens (exact; tests/test_pretrain.py checks it): 11 per step (label,
# op, " on", " ", 2 digits, "=", 2 digits, ".", " ") and 12 for the tags, the answer and EOS, less
# the last step's space and its "." that merges into ".</".
_TOKENS_BASE, _TOKENS_PER_STEP = 12, 11

# No system message and a one-line instruction: on a tiny model every prompt token is compute that
# teaches nothing (the loss is on the response), and the generic wording was half of each example.
TOY_TEMPLATE = PromptTemplate(
    system="",
    teacher_user="{question}\nExample: {trace}\nNow you.",
)

_STEP = re.compile(r"#(\d+) ([-+*])(\d+) on (\d\d)=(\d\d)\.")
_OP = r"([-+*]\d)"
_QUESTION = re.compile(
    rf"Working mod (\d+), apply {_OP} and {_OP} in turn from #(\d+) down to #1, starting at (\d\d)\."
)


def apply_op(value: int, op: str, k: int, mod: int = MOD) -> int:
    if op == "+":
        return (value + k) % mod
    if op == "-":
        return (value - k) % mod
    if op == "*":
        return (value * k) % mod
    raise ValueError(f"unknown operation {op!r}")


def make_problem(rng: random.Random, steps: int, ops: tuple[str, ...] = OPS) -> dict[str, str]:
    """One problem with ``steps`` steps: ``{"question", "reasoning", "answer"}``."""
    if not 1 <= steps <= MAX_LABEL:
        raise ValueError(f"steps must be in [1, {MAX_LABEL}], got {steps}")
    value = rng.randrange(MOD)
    pair = []
    for _ in range(2):
        op = rng.choice(ops)
        pair.append((op, rng.choice(OPERANDS[op])))
    (oa, ka), (ob, kb) = pair
    question = (
        f"Working mod {MOD}, apply {oa}{ka} and {ob}{kb} in turn from #{steps} down to #1, "
        f"starting at {value:02d}."
    )
    lines = []
    for i in range(steps):
        o, k = pair[i % 2]
        new = apply_op(value, o, k)
        lines.append(f"#{steps - i} {o}{k} on {value:02d}={new:02d}.")
        value = new
    return {"question": question, "reasoning": " ".join(lines), "answer": f"{value:02d}"}


def scramble(problem: dict[str, str], rng: random.Random, steps: int | None = None) -> dict[str, str]:
    """``problem`` with a trace whose results are random two-digit values.

    The question, the step labels, the operations and the start value are kept, and each step's input
    is the previous step's (random) result, so the trace has the layout of a worked solution but its
    arithmetic is wrong from the first result on: no value in it can be computed, only copied from a
    context that shows it (the copy curriculum of ``aropd.experiments.pretrain``). The answer is the
    last result.

    ``steps``: only the first ``steps`` results are random; the later ones are computed from the last
    random one, so a view that shows those steps (the partial view) must copy them and compute the
    rest. None: all (the draws of ``rng`` are then those of a full scramble whatever the length).
    """
    value, chain = parse_question(problem["question"])
    lines = []
    for i, (op, k) in enumerate(chain):
        new = rng.randrange(MOD) if steps is None or i < steps else apply_op(value, op, k)
        lines.append(f"#{len(chain) - i} {op}{k} on {value:02d}={new:02d}.")
        value = new
    return {"question": problem["question"], "reasoning": " ".join(lines), "answer": f"{value:02d}"}


def parse_question(question: str) -> tuple[int, list[tuple[str, int]]]:
    """The start value and the ``(op, k)`` of every step of a question written by :func:`make_problem`."""
    m = _QUESTION.fullmatch(question)
    if not m or int(m.group(1)) != MOD or not 1 <= int(m.group(4)) <= MAX_LABEL:
        raise ValueError(f"not a toy question: {question!r}")
    pair = [(op[0], int(op[1:])) for op in (m.group(2), m.group(3))]
    for op, k in pair:
        if k not in OPERANDS[op]:
            raise ValueError(f"bad operation {op}{k} in {question!r}")
    return int(m.group(5)), [pair[i % 2] for i in range(int(m.group(4)))]


def solve(question: str) -> int:
    """The answer of a toy question, computed from the question alone."""
    value, chain = parse_question(question)
    for op, k in chain:
        value = apply_op(value, op, k)
    return value


def check_reasoning(problem: dict[str, str]) -> list[str]:
    """Problems with a worked solution (empty when every step follows from the question and the last)."""
    value, chain = parse_question(problem["question"])
    steps = _STEP.findall(problem["reasoning"])
    errors = []
    if " ".join(f"#{i} {o}{k} on {a}={b}." for i, o, k, a, b in steps) != problem["reasoning"]:
        errors.append("reasoning is not a sequence of '#i <op>k on aa=bb.' steps")
    if len(steps) != len(chain):
        errors.append(f"{len(steps)} steps in the reasoning, {len(chain)} in the question")
    for n, ((i, o, k, a, b), (op, kk)) in enumerate(zip(steps, chain)):
        if int(i) != len(chain) - n or int(a) != value or (o, int(k)) != (op, kk) or int(b) != apply_op(value, op, kk):
            errors.append(f"step {n + 1} is wrong: #{i} {o}{k} on {a}={b}.")
        value = apply_op(value, op, kk)
    if problem["answer"] != f"{value:02d}":
        errors.append(f"answer {problem['answer']!r} != {value:02d}")
    return errors


class StepCheck(NamedTuple):
    """How a response's written steps follow from one another (:func:`check_steps`)."""

    steps: int
    """Steps written, up to the question's step count."""
    non_sequiturs: int
    """Steps that do not follow from what the response wrote before them: the input is not the previous
    step's result (the start value for the first step), or the result is not the question's operation
    applied to the input."""
    rejoins: int
    """Non-sequiturs after the response's own chain has left the correct one whose result is the correct
    chain's value: a step back onto the reference's values that the written steps do not lead to. A
    full view endorses exactly these after a student's slip (it copies the reference); a student that
    learns them has learnt a hindsight shortcut."""


def check_steps(question: str, response: str) -> StepCheck:
    """Check each ``#i <op>k on aa=bb.`` step of a model's ``response`` to a toy ``question`` against the
    response's own earlier steps (not against the reference): a wrong value that the next steps carry
    on from is one slip, not a run of errors."""
    value, chain = parse_question(question)
    correct, written = value, value  # the correct chain's value and the response's, before each step
    steps = non_seq = rejoins = 0
    for m, (op, k) in zip(_STEP.finditer(response), chain):
        a, b = int(m.group(4)), int(m.group(5))
        steps += 1
        off_chain = written != correct
        correct = apply_op(correct, op, k)
        if a != written or b != apply_op(a, op, k):
            non_seq += 1
            rejoins += off_chain and b == correct
        written = b
    return StepCheck(steps, non_seq, rejoins)


def approx_response_tokens(steps: int) -> int:
    """Roughly how many tokens a trace of ``steps`` steps takes with the toy-base tokenizer."""
    return round(_TOKENS_BASE + _TOKENS_PER_STEP * steps)


def steps_for_tokens(tokens: int) -> int:
    """The number of steps whose trace takes about ``tokens`` tokens (the length knob in tokens)."""
    return max(1, math.floor((tokens - _TOKENS_BASE) / _TOKENS_PER_STEP))


def make_split(
    n: int,
    seed: int,
    min_steps: int = 2,
    max_steps: int = 8,
    exclude: set[str] | None = None,
    long_frac: float = 0.0,
    long_steps: tuple[int, int] = (20, 90),
    ops: tuple[str, ...] = OPS,
) -> list[dict[str, str]]:
    """``n`` distinct problems (no question repeated, none in ``exclude``).

    Step counts are uniform on ``[min_steps, max_steps]``; ``round(n * long_frac)`` of the problems
    (spread through the split) instead draw from ``long_steps`` for long-rollout length buckets.
    """
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    rng, seen, out = random.Random(seed), set(exclude or ()), []
    n_long = round(n * long_frac)
    is_long = set(rng.sample(range(n), n_long)) if n_long else set()
    while len(out) < n:
        lo, hi = long_steps if len(out) in is_long else (min_steps, max_steps)
        p = make_problem(rng, rng.randint(lo, hi), ops)
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


# How the committed splits are drawn (scripts/make_quickstart_assets.py): train problems have 2-8
# steps (~35-105 response tokens, for CPU rollout budgets); val and test add one problem in eight
# with 20-90 steps (~230-1,000 tokens), so the long-rollout length buckets are not empty.
TRAIN_SPLIT: dict = {"min_steps": 2, "max_steps": 8}
EVAL_SPLIT: dict = {**TRAIN_SPLIT, "long_frac": 0.125, "long_steps": (20, 90)}


def read_split(path: str | Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_splits(
    out_dir: str | Path, sizes: dict[str, int], seed: int = 0, split_kw: dict[str, dict] | None = None, **kw
) -> dict[str, Path]:
    """Write disjoint ``<split>.jsonl`` files; each split's seed is derived from ``seed``.

    ``kw`` goes to every :func:`make_split`; ``split_kw[split]`` overrides it for one split.
    """
    out_dir, used, paths = Path(out_dir), set(), {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate(sizes.items()):
        rows = make_split(n, seed * 1000 + i, exclude=used, **{**kw, **(split_kw or {}).get(split, {})})
        used.update(r["question"] for r in rows)
        paths[split] = out_dir / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
