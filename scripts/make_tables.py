#!/usr/bin/env python
"""Turn run folders into a paper-style markdown table (aropd.experiments.tables.benchmark_table).

    python scripts/make_tables.py runs/full_opd runs/ar_opd [--out table.md] [--names "Full OPD" "AR-OPD"]
                                  [--benchmarks math500 amc23 ...] [--digits 1]

Each run folder holds a ``results.json`` somewhere below it (``<run>/results.json``,
``<run>/validate/results.json``, ``<run>/val/step_<k>/results.json`` ...); the newest one is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aropd.experiments.tables import benchmark_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make_tables.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (or results.json files)")
    ap.add_argument("--names", nargs="+", default=None, help="row labels, one per run (default: folder names)")
    ap.add_argument("--benchmarks", nargs="+", default=None, help="columns (default: every benchmark found)")
    ap.add_argument("--digits", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    try:
        table = benchmark_table(args.runs, args.names, args.benchmarks, args.digits)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        print(f"make_tables.py: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
