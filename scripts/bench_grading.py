#!/usr/bin/env python
"""Graded programs per second on HumanEval's canonical solutions, 1 worker vs 2 (or ``--workers``).

    python scripts/bench_grading.py [--repeats 3] [--limit 164] [--workers 1 2]

Each program is one sandboxed process (see ``aropd.evaluators.sandbox``); the figure includes
sandbox start-up, the test run and clean-up. Prints one line per worker count, the median over
``--repeats`` runs, and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_grading.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="first N problems (default: all 164)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)

    from aropd.evaluators import get_benchmark
    from aropd.evaluators.sandbox import isolation_mode

    b = get_benchmark("humaneval")
    recs = b.load(limit=args.limit)
    responses = [f"```python\n{r['prompt']}{r['canonical_solution']}\n```" for r in recs]
    mode = isolation_mode()
    out = {"programs": len(recs), "isolation": mode, "repeats": args.repeats, "programs_per_s": {}}
    for w in args.workers:
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            verdicts = b.grade(responses, recs, workers=w)
            dt = time.perf_counter() - t0
            bad = [r["task_id"] for r, v in zip(recs, verdicts) if not v.correct]
            if bad:
                print(f"canonical solutions failed: {bad[:5]}", file=sys.stderr)
                return 1
            rates.append(len(recs) / dt)
        med = statistics.median(rates)
        out["programs_per_s"][str(w)] = round(med, 2)
        print(f"workers={w}: {med:.2f} graded programs/s (median of {args.repeats}; "
              f"runs: {', '.join(f'{r:.2f}' for r in rates)}; isolation={mode})")
    ws = [str(w) for w in args.workers]
    if len(ws) >= 2:
        out["speedup"] = round(out["programs_per_s"][ws[-1]] / out["programs_per_s"][ws[0]], 2)
        print(f"speed-up {ws[-1]} vs {ws[0]} workers: {out['speedup']:.2f}x")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
