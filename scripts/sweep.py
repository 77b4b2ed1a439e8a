#!/usr/bin/env python
"""Run a grid of ``aropd fit`` runs over a base config, skip the finished ones, tabulate the results.

    python scripts/sweep.py --name lambda --config configs/recipes/math/ar_opd_lam0.8.yaml \\
        --grid model.init_args.lam=0.4,0.6,0.8,1.0,1.2,1.4 [--grid data.init_args.partial_ratio=0.25,0.75] \\
        [--set trainer.max_steps=100 ...] [--root runs] [--dry-run] [--force]
        [--slurm [--nodes N] [--gpus-per-node G] [--time 24:00:00] [--partition P] [--account A] [--submit]]
        [--table-only]

Every combination of the ``--grid`` axes is one run, named after its values (``lam=0.4``,
``lam=0.4_partial_ratio=0.25``), in ``<root>/<name>/<run>/``: the run's log dir, so it holds
``config.yaml`` (fully resolved), the TensorBoard events, ``checkpoints/`` and
``val/step_<k>/results.json``, plus ``run.json`` (configs, overrides, command, config hash),
``fit.log`` (local runs) and ``DONE``.

A run is *finished* when its ``DONE`` exists: written only after ``aropd fit`` exited 0, it holds
the SHA-256 of the run's resolved config (``aropd fit ... --print_config``, comments dropped).
Finished runs are skipped. A run whose recorded hash differs from the config it would get now
(a base config or a default changed) is *stale*: skipped with a warning, or with ``--force`` moved
aside to ``<run>.stale-<hash>`` and run afresh. Every command ends in ``--ckpt_path last``, so an
unfinished run (killed, preempted, its job resubmitted) resumes from its last checkpoint when its
config saved one (``ModelCheckpoint(save_last=True)``, as the recipes do).

Locally the runs go one after another, each ``python -m aropd fit ...`` in its own process. With
``--slurm`` each pending run gets a job script ``<run>/job.sbatch`` (``srun`` one task per GPU;
the script writes ``DONE`` after success); ``--submit`` also passes it to ``sbatch``. Nodes and GPUs
default to the config's ``trainer.num_nodes`` and ``trainer.devices``; other values are passed on as
overrides, so the job and the trainer agree. At the end ``scripts/make_tables.py`` turns the finished
runs into ``<root>/<name>/table.md`` (``--table-only`` does just that, e.g. after the jobs finished).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
MAKE_TABLES = ROOT / "scripts" / "make_tables.py"


class SweepError(Exception):
    pass


# ---- the grid --------------------------------------------------------------------------------------
def split_values(text: str) -> list[str]:
    """``0.4,0.6`` → ``["0.4", "0.6"]``; commas inside ``[]``, ``{}`` or quotes do not split."""
    out, depth, cur, quote = [], 0, [], None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    if any(v == "" for v in out):
        raise SweepError(f"empty value in {text!r}")
    return out


def parse_assignment(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
        raise SweepError(f"{what} {text!r}: expected KEY=VALUE with a dotted config key (model.init_args.lam=0.8)")
    return key, value.strip()


def short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that tells it apart from the others."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if not any(o != key and (o == cand or o.endswith("." + cand)) for o in keys):
                break
        names[key] = cand
    return names


def safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


@dataclass
class Run:
    name: str
    overrides: dict[str, str]
    args: list[str] = field(default_factory=list)
    dir: Path = Path()
    config_hash: str = ""
    resolved: dict[str, Any] = field(default_factory=dict)


def expand(grid: list[tuple[str, list[str]]]) -> list[tuple[str, dict[str, str]]]:
    keys = [k for k, _ in grid]
    short = short_names(keys)
    runs = []
    for combo in itertools.product(*(vals for _, vals in grid)):
        overrides = dict(zip(keys, combo))
        name = "_".join(f"{safe(short[k])}={safe(v)}" for k, v in overrides.items()) or "base"
        runs.append((name, overrides))
    names = [n for n, _ in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SweepError(f"grid values give the same run name: {dup}")
    return runs


# ---- resolving a run's config ----------------------------------------------------------------------
def resolve(fit_args: list[str]) -> str:
    """``aropd fit <fit_args> --print_config`` in this process (parsing only: no model is loaded)."""
    from aropd.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. LightningCLI's note that this process has its own sys.argv
        try:
            cli_main(["fit", *fit_args, "--print_config"])
        except SystemExit as e:
            code = e.code
    if code not in (0, None):
        raise SweepError(f"the config does not parse: aropd fit {shlex.join(fit_args)}\n{err.getvalue().strip()}")
    return out.getvalue()


def config_hash(resolved: str) -> str:
    body = "\n".join(line for line in resolved.splitlines() if not line.lstrip().startswith("#"))
    return hashlib.sha256(body.encode()).hexdigest()


def logger_arg(run_dir: Path) -> str:
    # name "" and version "": the run folder is the log dir (config.yaml, events, checkpoints/, val/).
    return json.dumps({"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(run_dir), "name": "", "version": ""}})


def fit_args(configs: list[str], sets: dict[str, str], overrides: dict[str, str], run_dir: Path) -> list[str]:
    args = [a for c in configs for a in ("--config", c)]
    for key, value in {**sets, **overrides}.items():
        args += [f"--{key}", value]
    return args + ["--trainer.default_root_dir", str(run_dir), "--trainer.logger", logger_arg(run_dir),
                   "--ckpt_path", "last"]


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def status(run: Run) -> str:
    """``finished``, ``stale`` (finished or started under another config) or ``pending``."""
    done, record = read_json(run.dir / "DONE"), read_json(run.dir / "run.json")
    for rec in (done, record):
        if rec is not None and rec.get("config_hash") not in (None, run.config_hash):
            return "stale"
    if (run.dir / "DONE").exists():
        return "finished"
    return "pending"


# ---- SLURM ------------------------------------------------------------------------------------------
def slurm_script(run: Run, sweep: str, a: argparse.Namespace, nodes: int, gpus: int) -> str:
    cwd = Path.cwd().resolve()
    log = (run.dir.resolve() / "slurm-%j.out")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={safe(sweep + '.' + run.name)}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={gpus}",
        f"#SBATCH --gpus-per-node={gpus}",
        f"#SBATCH --cpus-per-task={a.cpus_per_task}",
        f"#SBATCH --time={a.time}",
    ]
    if a.mem:
        lines.append(f"#SBATCH --mem={a.mem}")
    if a.partition:
        lines.append(f"#SBATCH --partition={a.partition}")
    if a.account:
        lines.append(f"#SBATCH --account={a.account}")
    lines += [f"#SBATCH --output={log}", *(f"#SBATCH {x}" for x in a.sbatch)]
    done = {"config_hash": run.config_hash, "finished_at": "%s", "slurm_job_id": "%s"}
    printf = json.dumps(done)
    lines += [
        f"# Generated by scripts/sweep.py: sweep {sweep!r}, run {run.name!r}, config hash {run.config_hash[:12]}.",
        "# One task per GPU; Lightning reads the SLURM environment. Resubmitting resumes from last.ckpt.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(cwd))}",
        *a.setup,
        "export TOKENIZERS_PARALLELISM=false",
        "srun " + shlex.join([a.python, "-m", "aropd", "fit", *run.args]),
        f"printf {shlex.quote(printf + chr(10))} \"$(date -Iseconds)\" \"${{SLURM_JOB_ID:-}}\" "
        f"> {shlex.quote(str(run.dir / 'DONE'))}",
    ]
    return "\n".join(lines) + "\n"


# ---- the table --------------------------------------------------------------------------------------
def has_results(run_dir: Path) -> bool:
    return any(run_dir.rglob("results.json"))


def make_table(sweep_dir: Path, runs: list[Run]) -> Path | None:
    finished = [r for r in runs if status(r) == "finished"]
    if len(finished) < len(runs):
        print(f"sweep: {len(runs) - len(finished)} of {len(runs)} run(s) not finished (or stale); not in the table")
    with_results = [r for r in finished if has_results(r.dir)]
    for r in finished:
        if r not in with_results:
            print(f"sweep: {r.name}: finished but wrote no results.json (no val_benchmarks?); not in the table")
    if not with_results:
        print("sweep: no finished run with results yet; no table")
        return None
    out = sweep_dir / "table.md"
    cmd = [sys.executable, str(MAKE_TABLES), *(str(r.dir) for r in with_results), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SweepError(f"make_tables.py failed ({proc.returncode}): {proc.stderr.strip()}")
    print(f"sweep: table of {len(with_results)} finished run(s) in {out}:\n{proc.stdout}", end="")
    return out


# ---- main -------------------------------------------------------------------------------------------
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


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return _main(a)
    except SweepError as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        return 2


def _main(a: argparse.Namespace) -> int:
    if a.submit and not a.slurm:
        raise SweepError("--submit needs --slurm")
    for c in a.config:
        if not Path(c).is_file():
            raise SweepError(f"config {c!r} does not exist")
    grid = []
    for g in a.grid:
        key, values = parse_assignment(g, "--grid")
        grid.append((key, split_values(values)))
    sets = dict(parse_assignment(s, "--set") for s in a.set)
    keys = [k for k, _ in grid]
    if len(set(keys)) != len(keys) or set(keys) & set(sets):
        raise SweepError("each key may be one --grid axis or one --set, not several")
    sweep_dir = Path(a.root) / a.name

    runs = []
    for name, overrides in expand(grid):
        run = Run(name, overrides, dir=sweep_dir / name)
        run_sets = dict(sets)
        if a.slurm:  # the job's nodes x GPUs and the trainer's must agree
            for flag, key in ((a.nodes, "trainer.num_nodes"), (a.gpus_per_node, "trainer.devices")):
                if flag is not None and key not in overrides:
                    run_sets[key] = str(flag)
        run.args = fit_args(a.config, run_sets, overrides, run.dir)
        text = resolve(run.args)
        run.config_hash, run.resolved = config_hash(text), yaml.safe_load(text) or {}
        runs.append(run)

    if a.table_only:
        return 0 if make_table(sweep_dir, runs) is not None else 1

    print(f"sweep {a.name!r}: {len(runs)} run(s) in {sweep_dir}/")
    failed = []
    for i, run in enumerate(runs, 1):
        st = status(run)
        tag = f"[{i}/{len(runs)}] {run.name}"
        if st == "stale" and a.force and not a.dry_run:
            aside = run.dir.with_name(f"{run.dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            run.dir.rename(aside)
            print(f"{tag}: stale; moved to {aside}")
            st = "pending"
        if st == "finished":
            print(f"{tag}: finished, skipped")
            continue
        if st == "stale":
            print(f"{tag}: STALE (recorded under another config than it would get now); skipped. "
                  f"--force moves it aside and reruns it", file=sys.stderr)
            continue
        command = [a.python, "-m", "aropd", "fit", *run.args]
        if a.dry_run:
            print(f"{tag}: pending\n    {shlex.join(command)}")
            continue
        run.dir.mkdir(parents=True, exist_ok=True)
        record = {"sweep": a.name, "run": run.name, "configs": a.config, "set": sets, "overrides": run.overrides,
                  "command": command, "config_hash": run.config_hash}
        (run.dir / "run.json").write_text(json.dumps(record, indent=2) + "\n")
        if a.slurm:
            t = run.resolved.get("trainer", {})
            nodes = a.nodes or int(t.get("num_nodes") or 1)
            gpus = a.gpus_per_node or (t.get("devices") if isinstance(t.get("devices"), int) else 1)
            script = run.dir / "job.sbatch"
            script.write_text(slurm_script(run, a.name, a, nodes, gpus))
            script.chmod(0o755)
            msg = f"{tag}: wrote {script}"
            if a.submit:
                proc = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
                if proc.returncode != 0:
                    failed.append(run.name)
                    msg += f"; sbatch failed: {proc.stderr.strip()}"
                else:
                    msg += f"; {proc.stdout.strip()}"
            print(msg)
            continue
        print(f"{tag}: running (log: {run.dir / 'fit.log'})", flush=True)
        start = time.time()
        with open(run.dir / "fit.log", "ab") as log:
            rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds = round(time.time() - start, 1)
        if rc != 0:
            failed.append(run.name)
            tail = (run.dir / "fit.log").read_text(errors="replace").splitlines()[-15:]
            print(f"{tag}: FAILED (exit {rc}) after {seconds}s; last lines of fit.log:\n    " + "\n    ".join(tail),
                  file=sys.stderr)
            continue
        done = {"config_hash": run.config_hash, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": seconds}
        (run.dir / "DONE").write_text(json.dumps(done) + "\n")
        print(f"{tag}: finished in {seconds}s")

    if a.dry_run:
        return 0
    if a.slurm:
        print("sweep: when the jobs have finished, rerun this command with --table-only for the table")
    else:
        make_table(sweep_dir, runs)
    if failed:
        print(f"sweep: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
