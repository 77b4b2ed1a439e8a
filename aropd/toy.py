"""A seeded synthetic task whose worked solutions carry hindsight: chained arithmetic.

Each problem starts from a number and applies a chain of operations modulo 100; the reasoning writes
one step per line and the answer is the last value. A teacher that sees the whole solution knows
every intermediate value (and the answer) before the student has computed them — the privileged
hindsight the method controls. ``steps`` sets the length, from a few tokens to about a thousand.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_OPS = ("+", "-", "*")


def make_problem(rng: random.Random, steps: int) -> dict[str, str]:
    value = rng.randrange(1, 100)
    ops = [(rng.choice(_OPS), rng.randrange(2, 10)) for _ in range(steps)]
    question = f"Start at {value}. " + " ".join(f"{o}{k}" for o, k in ops) + " (mod 100). Result?"
    lines = []
    for o, k in ops:
        new = {"+": value + k, "-": value - k, "*": value * k}[o] % 100
        lines.append(f"{value}{o}{k}={new}")
        value = new
    return {"question": question, "reasoning": " ".join(lines), "answer": str(value)}


def make_split(n: int, seed: int, min_steps: int = 2, max_steps: int = 6, exclude: set[str] | None = None):
    """``n`` distinct problems (no question repeated, none in ``exclude``)."""
    rng, seen, out = random.Random(seed), set(exclude or ()), []
    while len(out) < n:
        p = make_problem(rng, rng.randint(min_steps, max_steps))
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


def write_splits(out_dir: str | Path, sizes: dict[str, int], seed: int = 0, **kw) -> dict[str, Path]:
    """Write disjoint ``<split>.jsonl`` files; each split's seed is derived from ``seed``."""
    out_dir, used, paths = Path(out_dir), set(), {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate(sizes.items()):
        rows = make_split(n, seed * 1000 + i, exclude=used, **kw)
        used.update(r["question"] for r in rows)
        paths[split] = out_dir / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
