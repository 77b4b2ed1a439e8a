#!/usr/bin/env python
"""Run a grid of ``aropd fit`` runs over a base config, skip the finished ones, tabulate the results.

    python scripts/sweep.py --name lambda --config configs/recipes/math.yaml --config configs/methods/ar_opd.yaml \\
        --grid model.init_args.target.init_args.lam=0.6,0.8,1.2 [--grid data.init_args.partial_ratio=0.25,0.75] \\
        [--set trainer.max_steps=100 ...] [--root runs] [--dry-run] [--force]
        [--slurm [--nodes N] [--gpus-per-node G] [--time 24:00:00] [--partition P] [--account A] [--submit]]
        [--table-only]

Each run goes to <root>/<name>/<run>/ (its log dir, with run.json, fit.log and DONE), named after its
grid values (lam=0.6). DONE is written once a fit exits 0 having completed (not run out of max_time).
A run whose DONE exists under the same resolved config is skipped; one recorded
under another config is stale (skipped, or with --force moved aside and rerun). Every command ends in
--ckpt_path last, so an unfinished run resumes. --slurm writes <run>/job.sbatch per pending run
(--submit also sbatches it). The finished runs' table goes to <root>/<name>/table.md. The library is
aropd.experiments.sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aropd.experiments.runs import ExperimentError
from aropd.experiments.sweep import Slurm, Sweep, parse_assignment, run_sweep, split_values


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    ap.add_argument("--name", required=True, help="sweep name: the runs go to <root>/<name>/<run>/")
    ap.add_argument("--config", action="append", required=True, help="base config (repeat to compose, left to right)")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="one axis of the grid (repeat for several axes); commas inside [] or {} do not split")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every run (not part of the run names)")
    ap.add_argument("--root", default="runs", help="parent folder of the sweep (default: runs)")
    ap.add_argument("--dry-run", action="store_true", help="list the runs, their status and commands; run nothing")
    ap.add_argument("--force", action="store_true", help="move stale runs aside and run them afresh")
    ap.add_argument("--table-only", action="store_true", help="only make the table of the finished runs")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the runs (default: this one)")
    s = ap.add_argument_group("SLURM")
    s.add_argument("--slurm", action="store_true", help="write <run>/job.sbatch per pending run instead of running")
    s.add_argument("--submit", action="store_true", help="with --slurm: also sbatch each script")
    s.add_argument("--nodes", type=int, help="nodes per run (default: the config's trainer.num_nodes)")
    s.add_argument("--gpus-per-node", type=int, help="GPUs (= tasks) per node (default: the config's trainer.devices)")
    s.add_argument("--time", default="24:00:00", help="wall-clock limit per job (default: 24:00:00)")
    s.add_argument("--partition", help="SLURM partition")
    s.add_argument("--account", help="SLURM account")
    s.add_argument("--cpus-per-task", type=int, default=8, help="CPUs per task (default: 8)")
    s.add_argument("--mem", help="memory per node, e.g. 0 (all) or 500G")
    s.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH line, e.g. --sbatch=--qos=high (repeatable)")
    s.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="a shell line run before srun, e.g. 'source .venv/bin/activate' (repeatable)")
    return ap


def assignments(texts: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for text in texts:
        key, value = parse_assignment(text, what)
        if key in out:
            raise ExperimentError(f"{what} {key} given twice")
        out[key] = value
    return out


def to_sweep(a: argparse.Namespace) -> Sweep:
    if a.submit and not a.slurm:
        raise ExperimentError("--submit needs --slurm")
    slurm = Slurm(nodes=a.nodes, gpus_per_node=a.gpus_per_node, time=a.time, partition=a.partition,
                  account=a.account, cpus_per_task=a.cpus_per_task, mem=a.mem, sbatch=a.sbatch, setup=a.setup,
                  submit=a.submit) if a.slurm else None
    grid = {k: split_values(v) for k, v in assignments(a.grid, "--grid").items()}
    return Sweep(name=a.name, configs=a.config, grid=grid, sets=assignments(a.set, "--set"), root=Path(a.root),
                 python=a.python, slurm=slurm)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return run_sweep(to_sweep(a), a.dry_run, a.force, a.table_only)
    except ExperimentError as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
