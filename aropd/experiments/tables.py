"""Markdown tables of finished runs: one row per run, one column per benchmark plus the average; and
paired per-problem comparisons between two methods' runs on the same problems."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from aropd.experiments.runs import final_results

LABELS = {"math500": "MATH500", "amc23": "AMC23", "aime24": "AIME24", "humaneval_plus": "HumanEval+",
          "mbpp_plus": "MBPP+", "gpqa_diamond": "GPQA-D", "medqa": "MedQA", "medmcqa": "MedMCQA",
          "mmlu_medical": "MMLU-Med", "humaneval": "HumanEval", "toy": "Toy"}


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the first column left-aligned (names), the others right-aligned (numbers)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def registry_order() -> list[str]:
    """The benchmarks in registry order (the paper's first): the table's column order."""
    from aropd.evaluators.registry import BENCHMARKS

    return list(BENCHMARKS)


def _percent(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}"


def benchmark_table(runs: list[str | Path], names: list[str] | None = None, benchmarks: list[str] | None = None,
                    digits: int = 1) -> str:
    """Accuracies in percent from each run's final ``results.json`` (``aropd validate`` or ``aropd-score``).

    Columns follow the registry order unless ``benchmarks`` names them; a benchmark a run lacks is
    ``–``. "Average" is each run's own average over its benchmarks (``average.accuracy``), so compare
    averages only between runs with the same columns filled. Raises ``FileNotFoundError`` for a run
    without results and ``ValueError`` for a names list of the wrong length.
    """
    runs = [Path(r) for r in runs]
    if names is not None and len(names) != len(runs):
        raise ValueError(f"{len(names)} names for {len(runs)} runs")
    summaries = []
    for run in runs:
        results = final_results(run)
        if results is None:
            raise FileNotFoundError(f"no results.json below {str(run)!r}")
        summaries.append(json.loads(results.read_text()))
    if benchmarks is None:
        present = {b for s in summaries for b in s.get("benchmarks", {})}
        order = registry_order()
        benchmarks = [b for b in order if b in present] + sorted(present - set(order))
    rows = []
    for i, (run, s) in enumerate(zip(runs, summaries)):
        name = names[i] if names else (run.name if run.is_dir() else run.parent.name)
        accs = [s.get("benchmarks", {}).get(b, {}).get("accuracy") for b in benchmarks]
        avg = (s.get("average") or {}).get("accuracy")
        rows.append([name] + [_percent(a, digits) for a in accs] + [_percent(avg, digits)])
    return markdown(["Run"] + [LABELS.get(b, b) for b in benchmarks] + ["Average"], rows)


# ---- paired per-problem comparisons ---------------------------------------------------------------
def per_problem(run: str | Path, benchmark: str) -> dict[str, float]:
    """``{problem id: fraction correct}`` of a run's last evaluation of ``benchmark`` (its
    ``<benchmark>.jsonl`` beside the final ``results.json``; several samples of a problem are averaged).

    Raises ``FileNotFoundError`` naming the run when it has no such evaluation.
    """
    results = final_results(Path(run))
    rows_file = results.parent / f"{benchmark}.jsonl" if results is not None else None
    if rows_file is None or not rows_file.is_file():
        raise FileNotFoundError(f"no {benchmark}.jsonl beside a results.json below {str(run)!r}")
    hits: dict[str, list[bool]] = {}
    for line in rows_file.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            hits.setdefault(str(row["id"]), []).append(bool(row["correct"]))
    return {i: sum(h) / len(h) for i, h in hits.items()}


@dataclass(frozen=True)
class Paired:
    """Method A against method B on the same problems, each problem's score the mean over a method's runs."""

    n: int
    """Problems compared (those both methods were scored on; they must be the same set)."""
    diff: float
    """Mean over problems of A's score minus B's: the difference of accuracies (a fraction)."""
    se: float
    """Paired standard error of ``diff``: sample std of the per-problem differences over sqrt(n)
    (NaN for one problem). Problem difficulty, which both methods share, cancels out of it."""
    a_better: int
    """Problems where A scored higher."""
    b_better: int
    """Problems where B scored higher."""
    p_value: float
    """Exact two-sided sign test on ``a_better`` vs ``b_better`` (ties dropped): with one run per
    method each difference is ±1 or 0, and this is McNemar's exact test."""


def sign_test(a_better: int, b_better: int) -> float:
    """Two-sided exact binomial p-value of ``a_better`` successes in ``a_better + b_better`` fair coin
    flips: ``min(1, 2 P(X <= min))``; 1 when there is no discordant problem."""
    n, k = a_better + b_better, min(a_better, b_better)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired_comparison(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]]) -> Paired:
    """Compare two methods problem by problem: ``{problem id: [score of each run]}`` for each.

    A score is 1/0 (correct or not) or a fraction (several samples); each problem's scores are
    averaged over the method's runs (seeds) first, so the standard error is over problems, the unit
    the two methods share. Raises ``ValueError`` when the problem sets differ or a problem has no run.
    """
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"the two methods were scored on different problems: {len(only_a)} only in A "
                         f"(e.g. {only_a[:3]}), {len(only_b)} only in B (e.g. {only_b[:3]})")
    if not a:
        raise ValueError("no problems to compare")
    empty = sorted(i for i in a if not a[i] or not b[i])
    if empty:
        raise ValueError(f"problems with no run: {empty[:5]}")
    d = [statistics.fmean(a[i]) - statistics.fmean(b[i]) for i in sorted(a)]
    n = len(d)
    se = statistics.stdev(d) / math.sqrt(n) if n > 1 else math.nan
    a_better, b_better = sum(x > 0 for x in d), sum(x < 0 for x in d)
    return Paired(n, statistics.fmean(d), se, a_better, b_better, sign_test(a_better, b_better))


def paired_table(rows: list[tuple[str, str, Paired]], digits: int = 1) -> str:
    """A markdown table of paired comparisons ``(label A, label B, result)``: the difference of
    accuracies in points ± its paired standard error, the problems each won, and the sign-test p."""
    body = [[f"{la} − {lb}", f"{100 * p.diff:+.{digits}f} ± {100 * p.se:.{digits}f}", str(p.n),
             f"{p.a_better} / {p.b_better}", f"{p.p_value:.3g}"] for la, lb, p in rows]
    return markdown(["A − B", "Δ acc (points) ± paired SE", "Problems", "A better / B better", "p (sign test)"], body)

