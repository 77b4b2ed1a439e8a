#!/usr/bin/env python
"""Graded programs per second on HumanEval's canonical solutions, 1 worker vs 2 (or ``--workers``);
with ``--load N``, whether grading stays fair while N busy processes compete for the CPUs.

    python scripts/bench_grading.py [--repeats 3] [--limit 164] [--workers 1 2]
    python scripts/bench_grading.py --load 2 --workers 2 --repeats 5

Each program is one sandboxed process (see ``aropd.evaluators.sandbox``); the figure includes
sandbox start-up, the test run and clean-up. Prints one line per worker count, the median over
``--repeats`` runs, and a final JSON line. Under ``--load`` every canonical solution must still
pass (a slow machine must not turn a correct program into a timeout): each run prints
``k/164 canonical solutions passed`` and the reasons of any failures, and the exit status is 1
unless all passed in every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

# A pure-Python spin loop, as a CPU-bound neighbour on the grading machine would be. Bounded in
# time so that a crash of this script cannot leave it spinning for long.
SPIN = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end:\n    pass\n"


def start_load(n: int, max_s: float) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN.format(s=max_s)]) for _ in range(n)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_grading.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="first N problems (default: all 164)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--load", type=int, default=0, metavar="N",
                    help="run N busy processes while grading and report passes per run instead of failing fast")
    ap.add_argument("--load-max-s", type=float, default=3600.0,
                    help="the busy processes stop by themselves after this many seconds")
    args = ap.parse_args(argv)

    from aropd.evaluators import get_benchmark
    from aropd.evaluators.sandbox import isolation_mode

    b = get_benchmark("humaneval")
    recs = b.load(limit=args.limit)
    responses = [f"```python\n{r['prompt']}{r['canonical_solution']}\n```" for r in recs]
    mode = isolation_mode()
    out = {"programs": len(recs), "isolation": mode, "repeats": args.repeats, "load": args.load,
           "programs_per_s": {}}
    if args.load:
        out["passed"] = {}
    load = start_load(args.load, args.load_max_s)
    try:
        for w in args.workers:
            rates, passed = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                verdicts = b.grade(responses, recs, workers=w)
                dt = time.perf_counter() - t0
                bad = [(r["task_id"], v.reason) for r, v in zip(recs, verdicts) if not v.correct]
                retried = [(r["task_id"], v.reason) for r, v in zip(recs, verdicts)
                           if v.correct and v.reason != "passed"]
                rates.append(len(recs) / dt)
                if not args.load:
                    if bad:
                        print(f"canonical solutions failed: {bad[:5]}", file=sys.stderr)
                        return 1
                    continue
                passed.append(len(recs) - len(bad))
                print(f"workers={w} load={args.load}: {passed[-1]}/{len(recs)} canonical solutions passed "
                      f"({dt:.1f} s)", flush=True)
                for tid, reason in bad:
                    print(f"  failed {tid}: {reason}", flush=True)
                for tid, reason in retried:
                    print(f"  {tid}: {reason}", flush=True)
            med = statistics.median(rates)
            out["programs_per_s"][str(w)] = round(med, 2)
            if args.load:
                out["passed"][str(w)] = passed
            print(f"workers={w}: {med:.2f} graded programs/s (median of {args.repeats}; "
                  f"runs: {', '.join(f'{r:.2f}' for r in rates)}; isolation={mode}; load={args.load})")
    finally:
        stop_load(load)
    ws = [str(w) for w in args.workers]
    if len(ws) >= 2:
        out["speedup"] = round(out["programs_per_s"][ws[-1]] / out["programs_per_s"][ws[0]], 2)
        print(f"speed-up {ws[-1]} vs {ws[0]} workers: {out['speedup']:.2f}x")
    print(json.dumps(out))
    if args.load and any(k < len(recs) for ks in out["passed"].values() for k in ks):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
