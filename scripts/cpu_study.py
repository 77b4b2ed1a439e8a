#!/usr/bin/env python
"""The CPU method study: Base, SFT, Full OPD, Partial OPD, AR-OPD (λ ∈ {0.6, 0.8, 1.2}; clips 1, 2, 5
at λ = 1) and the two privilege controls from one base model, the same step budget and several seeds
each; one markdown table.

    python scripts/cpu_study.py [--model aropd/assets/toy-base] [--seeds 0 1 2] [--steps N]
                                [--root runs/cpu_study] [--val-limit 128] [--test-size 1000] [--quick]
                                [--force] [--launch inline|subprocess] [--table-only]

The runs go to <root>/<method>/seed<k>/, the table and the paired per-problem comparisons to
<root>/table.md; what each column means is in
aropd.experiments.cpu_study. --quick is a smoke test (1 seed, 4 steps, batch 4, 8 test problems,
24-token budgets, under 3 minutes): it shows the pipeline works, not which method is better.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aropd.experiments.cpu_study import METHOD_NAMES, QUICKSTART, TEST_DATA, TINY, TOY_BASE, Study, run_study
from aropd.experiments.runs import ExperimentError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cpu_study.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    ap.add_argument("--model", default=None, help=f"base model folder (default: {TOY_BASE} if present, else {TINY})")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2; --quick: 0)")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps per run (default: the base config's trainer.max_steps; --quick: 4)")
    ap.add_argument("--root", default="runs/cpu_study", help="output folder (default: runs/cpu_study)")
    ap.add_argument("--base-config", default=QUICKSTART, help=f"base config (default: {QUICKSTART})")
    ap.add_argument("--test-data", default=TEST_DATA, help=f"toy test split (default: {TEST_DATA})")
    ap.add_argument("--test-size", type=int, default=None,
                    help="validate on N fresh toy problems drawn like the test split, none seen in pretraining, "
                         "written to <root>/toy_test<N>.jsonl (e.g. 1000; default: --test-data)")
    ap.add_argument("--val-limit", type=int, default=None, help="test problems (default: all; --quick: 8)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="completion budget (default: the config's; --quick: 24)")
    ap.add_argument("--val-max-new-tokens", type=int, default=None,
                    help="validation budget (default: the toy benchmark's, 1024; --quick: 24)")
    ap.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the config's; --quick: 4)")
    ap.add_argument("--lr", type=float, default=Study.lr, help="peak learning rate of every run (default: %(default)s)")
    ap.add_argument("--methods", nargs="+", default=METHOD_NAMES, choices=METHOD_NAMES,
                    help="subset of methods (default: all)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 4 steps, small budgets (< 3 min)")
    ap.add_argument("--launch", choices=("inline", "subprocess"), default="inline",
                    help="runs in this process one after another (default) or each in its own process")
    ap.add_argument("--force", action="store_true", help="rerun finished runs")
    ap.add_argument("--table-only", action="store_true", help="only (re)write the table from finished runs")
    return ap


def to_study(a: argparse.Namespace) -> Study:
    return Study(model=a.model, seeds=a.seeds, steps=a.steps, root=Path(a.root), base_config=a.base_config,
                 test_data=a.test_data, test_size=a.test_size, val_limit=a.val_limit, max_new_tokens=a.max_new_tokens,
                 val_max_new_tokens=a.val_max_new_tokens, batch_size=a.batch_size, lr=a.lr, methods=a.methods,
                 subprocess=a.launch == "subprocess").resolved(quick=a.quick)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return run_study(to_study(a), force=a.force, table_only=a.table_only)
    except ExperimentError as e:
        print(f"cpu_study.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
