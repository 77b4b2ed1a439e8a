"""Markdown tables of finished runs: one row per run, one column per benchmark plus the average."""

from __future__ import annotations

import json
from pathlib import Path

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
