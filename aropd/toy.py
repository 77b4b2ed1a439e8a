"""A seeded synthetic task whose worked solutions carry hindsight: numbered chains of arithmetic mod 100.

A problem starts from a two-digit number and lists numbered operations; the worked solution takes
them in order, each step naming the operation, the running value and the result, and the answer is
the last value::

    question:  Start at 98. Working mod 100, apply #1 -2, #2 *7, #3 +5. Result?
    reasoning: #1 -2 on 98=96. #2 *7 on 96=72. #3 +5 on 72=77.
    answer:    77

Why privilege matters here. Every value depends on all earlier ones, so a student must compute the
chain in order; a teacher that sees the full solution can copy any late value (and the answer) the
moment it is needed, with no computation. A partial view (the first half of the reasoning plus the
answer) knows the early values and the answer but must compute the late values itself. So the two
teacher views agree on the first half of a trace and disagree exactly where hindsight helps, and
once a student's chain goes wrong the full view still endorses the reference's late values, which
no longer follow from the student's own prefix: a hindsight shortcut.

Design choices:

* Step labels ``#i`` make "which operation comes next" an exact lookup, so long chains stay
  well-posed for a small model (an unlabelled list with repeated operations is ambiguous). The
  operation follows the label and is written as in the question (`` -2``), so it is one copy.
* Values are always two digits (``07``), answer included, so every step has the same layout.
* ``*`` only multiplies by 3, 7 or 9, units mod 100, so every operation is a bijection mod 100:
  values (and answers) stay uniform on 0..99 instead of collapsing onto multiples of 10 or 0,
  and an answer cannot be guessed from the operations without doing the chain.
* Length is set by the number of steps: about 13 tokens of reasoning per step with a digit-level
  tokenizer (``approx_response_tokens``), from ~37 tokens (2 steps) to ~1,000 (76 steps).
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

MOD = 100
OPERANDS: dict[str, tuple[int, ...]] = {
    "+": tuple(range(1, 10)),
    "-": tuple(range(1, 10)),
    "*": (3, 7, 9),  # units mod 100: multiplication stays a bijection
}
# Rough response length (tokens, digit-level tokenizer): trace tags + answer + EOS, plus per step.
_TOKENS_BASE, _TOKENS_PER_STEP = 11, 13.0

_STEP = re.compile(r"#(\d+) ([-+*])(\d+) on (\d\d)=(\d\d)\.")
_QUESTION = re.compile(r"Start at (\d\d)\. Working mod (\d+), apply (.*)\. Result\?")


def apply_op(value: int, op: str, k: int, mod: int = MOD) -> int:
    if op == "+":
        return (value + k) % mod
    if op == "-":
        return (value - k) % mod
    if op == "*":
        return (value * k) % mod
    raise ValueError(f"unknown operation {op!r}")


def make_problem(rng: random.Random, steps: int, ops: tuple[str, ...] = ("+", "-", "*")) -> dict[str, str]:
    """One problem with ``steps`` operations: ``{"question", "reasoning", "answer"}``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    value = rng.randrange(MOD)
    chain = []
    for _ in range(steps):
        op = rng.choice(ops)
        chain.append((op, rng.choice(OPERANDS[op])))
    question = (
        f"Start at {value:02d}. Working mod {MOD}, apply "
        + ", ".join(f"#{i} {o}{k}" for i, (o, k) in enumerate(chain, 1))
        + ". Result?"
    )
    lines = []
    for i, (o, k) in enumerate(chain, 1):
        new = apply_op(value, o, k)
        lines.append(f"#{i} {o}{k} on {value:02d}={new:02d}.")
        value = new
    return {"question": question, "reasoning": " ".join(lines), "answer": f"{value:02d}"}


def parse_question(question: str) -> tuple[int, list[tuple[str, int]]]:
    """The start value and the ``(op, k)`` chain of a question written by :func:`make_problem`."""
    m = _QUESTION.fullmatch(question)
    if not m or int(m.group(2)) != MOD:
        raise ValueError(f"not a toy question: {question!r}")
    chain = []
    for i, item in enumerate(m.group(3).split(", "), 1):
        label, op = item.split(" ")
        if label != f"#{i}" or op[0] not in OPERANDS:
            raise ValueError(f"bad step {item!r} in {question!r}")
        chain.append((op[0], int(op[1:])))
    return int(m.group(1)), chain


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
    for n, ((i, o, k, a, b), (op, kk)) in enumerate(zip(steps, chain), 1):
        if int(i) != n or int(a) != value or (o, int(k)) != (op, kk) or int(b) != apply_op(value, op, kk):
            errors.append(f"step {n} is wrong: #{i} {o}{k} on {a}={b}.")
        value = apply_op(value, op, kk)
    if problem["answer"] != f"{value:02d}":
        errors.append(f"answer {problem['answer']!r} != {value:02d}")
    return errors


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
    long_steps: tuple[int, int] = (20, 76),
    ops: tuple[str, ...] = ("+", "-", "*"),
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
