#!/usr/bin/env python
"""Turn run folders into a paper-style markdown table: one row per run, one column per benchmark
plus the average.

    python scripts/make_tables.py runs/full_opd runs/ar_opd [--out table.md] [--names "Full OPD" "AR-OPD"]
                                  [--benchmarks math500 amc23 ...] [--digits 1]

Each run folder holds a ``results.json`` somewhere below it (``<run>/results.json``,
``<run>/validate/results.json``, ``<run>/version_3/validate/results.json`` ...), as written by
``aropd validate`` or ``aropd-score``; the newest one (by modification time) is used. Accuracies are
shown in percent. Columns follow the registry order (the paper's benchmarks first); a benchmark a
run lacks is shown as ``–``. The "Average" column is each run's own average over its benchmarks
(``results.json``'s ``average.accuracy``), so compare averages only between runs with the same
columns filled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from aropd.evaluators.registry import BENCHMARKS
    _ORDER = list(BENCHMARKS)
except Exception:  # pragma: no cover - the table does not need the package
    _ORDER = []

LABELS = {"math500": "MATH500", "amc23": "AMC23", "aime24": "AIME24", "humaneval_plus": "HumanEval+",
          "mbpp_plus": "MBPP+", "gpqa_diamond": "GPQA-D", "medqa": "MedQA", "medmcqa": "MedMCQA",
          "mmlu_medical": "MMLU-Med", "humaneval": "HumanEval", "toy": "Toy"}


def newest_results(run: Path) -> Path:
    if run.is_file() and run.name == "results.json":
        return run
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist")
    found = sorted(run.rglob("results.json"), key=lambda p: (p.stat().st_mtime, str(p)))
    if not found:
        raise FileNotFoundError(f"no results.json below {str(run)!r}")
    return found[-1]


def _fmt(v, digits: int) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}"


def make_table(runs: list[str | Path], names: list[str] | None = None, benchmarks: list[str] | None = None,
               digits: int = 1) -> str:
    runs = [Path(r) for r in runs]
    if names is not None and len(names) != len(runs):
        raise ValueError(f"{len(names)} names for {len(runs)} runs")
    summaries = [json.loads(newest_results(r).read_text()) for r in runs]
    if benchmarks is None:
        present = {b for s in summaries for b in s.get("benchmarks", {})}
        benchmarks = [b for b in _ORDER if b in present] + sorted(present - set(_ORDER))
    header = ["Run"] + [LABELS.get(b, b) for b in benchmarks] + ["Average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for i, (run, s) in enumerate(zip(runs, summaries)):
        name = names[i] if names else (run.name if run.is_dir() else run.parent.name)
        accs = [s.get("benchmarks", {}).get(b, {}).get("accuracy") for b in benchmarks]
        avg = (s.get("average") or {}).get("accuracy")
        lines.append("| " + " | ".join([name] + [_fmt(a, digits) for a in accs] + [_fmt(avg, digits)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make_tables.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (or results.json files)")
    ap.add_argument("--names", nargs="+", default=None, help="row labels, one per run (default: folder names)")
    ap.add_argument("--benchmarks", nargs="+", default=None, help="columns (default: every benchmark found)")
    ap.add_argument("--digits", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    try:
        table = make_table(args.runs, args.names, args.benchmarks, args.digits)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        print(f"make_tables.py: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
