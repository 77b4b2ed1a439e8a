"""A grid of ``aropd fit`` runs over a base config: named runs, finished ones skipped, SLURM job
scripts, and a table of the finished runs.

Every combination of the grid's axes is one run, named after its values (``lam=0.4``,
``lam=0.4_partial_ratio=0.25``: the shortest dotted suffix that tells the keys apart), in
``<root>/<name>/<run>/``, the run's log dir (``aropd.experiments.runs``). Finished runs are skipped;
stale ones are skipped with a warning, or with ``force`` moved aside to ``<run>.stale-<time>`` and
run afresh. Every command ends in ``--ckpt_path last``, so an unfinished run (killed, preempted, its
job resubmitted) resumes from its last checkpoint when its config saves one.

Locally the runs go one after another, each ``python -m aropd fit ...`` in its own process. With
SLURM each pending run gets a job script ``<run>/job.sbatch`` (``srun`` one task per GPU; the script
writes ``DONE`` once the fit completed), optionally submitted. A fit that exits 0 without completing
(it ran out of ``max_time``: ``aropd.experiments.runs``) gets no ``DONE``, so the next sweep resumes
it. Nodes and GPUs default to the config's ``trainer.num_nodes`` and ``trainer.devices``; other
values are passed on as overrides, so the job and the trainer agree. The finished runs' table goes to ``<root>/<name>/table.md``.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aropd.experiments import runs
from aropd.experiments.runs import ExperimentError
from aropd.experiments.tables import benchmark_table


@dataclass
class Slurm:
    """The resources each run's job script asks SLURM for."""

    nodes: int | None = None
    """Nodes per run; None: the config's ``trainer.num_nodes``."""
    gpus_per_node: int | None = None
    """GPUs (= tasks) per node; None: the config's ``trainer.devices``."""
    time: str = "24:00:00"
    """Wall-clock limit per job."""
    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    cpus_per_task: int = 8
    """CPUs per task."""
    mem: str | None = None
    """Memory per node, e.g. ``0`` (all) or ``500G``."""
    sbatch: list[str] = field(default_factory=list)
    """More ``#SBATCH`` options, e.g. ``--qos=high``."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before ``srun``, e.g. ``source .venv/bin/activate``."""
    submit: bool = False
    """Also pass each script to ``sbatch``."""


@dataclass
class Sweep:
    """A grid of runs over one base config."""

    name: str
    """The runs go to ``<root>/<name>/<run>/``."""
    configs: list[str]
    """Base configs, composed left to right as repeated ``--config``."""
    grid: dict[str, list[str]] = field(default_factory=dict)
    """Dotted config key -> its values; every combination is one run."""
    sets: dict[str, str] = field(default_factory=dict)
    """Overrides for every run (not part of the run names)."""
    root: Path = Path("runs")
    """Parent folder of the sweep."""
    python: str = sys.executable
    """Interpreter of the runs."""
    slurm: Slurm | None = None
    """Write (and submit) job scripts instead of running locally."""

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


@dataclass
class Run:
    """One planned run of a sweep."""

    name: str
    """Folder name, from the grid values (``lam=0.6``)."""
    overrides: dict[str, str]
    """Its grid values."""
    dir: Path
    """Its run folder (log dir)."""
    args: list[str]
    """The arguments of ``aropd fit``."""
    config_hash: str
    """SHA-256 of its resolved config."""
    resolved: dict[str, Any]
    """Its resolved config."""


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
        raise ExperimentError(f"empty value in {text!r}")
    return out


def parse_assignment(text: str, what: str) -> tuple[str, str]:
    """``KEY=VALUE`` (a leading ``--`` on the key is dropped) → ``(key, value)``."""
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
        raise ExperimentError(
            f"{what} {text!r}: expected KEY=VALUE with a dotted config key (model.init_args.max_new_tokens=64)")
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
    """``text`` as a file name: runs of other characters become ``-``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def expand(grid: dict[str, list[str]]) -> list[tuple[str, dict[str, str]]]:
    """Every combination of the grid's values as ``(run name, overrides)``; no grid is one run, ``base``."""
    short = short_names(list(grid))
    out = []
    for combo in itertools.product(*grid.values()):
        overrides = dict(zip(grid, combo))
        name = "_".join(f"{safe(short[k])}={safe(v)}" for k, v in overrides.items()) or "base"
        out.append((name, overrides))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ExperimentError(f"grid values give the same run name: {dup}")
    return out


def plan(sweep: Sweep) -> list[Run]:
    """The sweep's runs, each with its arguments and resolved config (raises if any does not parse)."""
    for c in sweep.configs:
        if not Path(c).is_file():
            raise ExperimentError(f"config {c!r} does not exist")
    if set(sweep.grid) & set(sweep.sets):
        raise ExperimentError("each key may be one grid axis or one set, not several")
    out = []
    for name, overrides in expand(sweep.grid):
        sets = dict(sweep.sets)
        if sweep.slurm:  # the job's nodes x GPUs and the trainer's must agree
            for value, key in ((sweep.slurm.nodes, "trainer.num_nodes"), (sweep.slurm.gpus_per_node, "trainer.devices")):
                if value is not None and key not in overrides:
                    sets[key] = str(value)
        run_dir = sweep.dir / name
        args = runs.run_args(sweep.configs, {**sets, **overrides}, run_dir)
        text = runs.resolve("fit", args)
        out.append(Run(name, overrides, run_dir, args, runs.config_hash(text), yaml.safe_load(text) or {}))
    return out


# ---- SLURM ------------------------------------------------------------------------------------------
def slurm_script(run: Run, sweep: Sweep) -> str:
    """The job script of one run: ``srun`` one task per GPU, then ``DONE`` if the fit completed."""
    s = sweep.slurm or Slurm()
    t = run.resolved.get("trainer", {})
    nodes = s.nodes or int(t.get("num_nodes") or 1)
    gpus = s.gpus_per_node or (t.get("devices") if isinstance(t.get("devices"), int) else 1)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={safe(sweep.name + '.' + run.name)}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={gpus}",
        f"#SBATCH --gpus-per-node={gpus}",
        f"#SBATCH --cpus-per-task={s.cpus_per_task}",
        f"#SBATCH --time={s.time}",
    ]
    lines += [f"#SBATCH --{k}={v}" for k, v in (("mem", s.mem), ("partition", s.partition), ("account", s.account)) if v]
    lines += [f"#SBATCH --output={run.dir.resolve() / 'slurm-%j.out'}", *(f"#SBATCH {x}" for x in s.sbatch)]
    done = json.dumps({"config_hash": run.config_hash, "finished_at": "%s", "slurm_job_id": "%s"})
    lines += [
        f"# Sweep {sweep.name!r}, run {run.name!r}, config hash {run.config_hash[:12]} (aropd.experiments.sweep).",
        "# One task per GPU; Lightning reads the SLURM environment. Resubmitting resumes from last.ckpt.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd().resolve()))}",
        *s.setup,
        "export TOKENIZERS_PARALLELISM=false",
        "srun " + shlex.join([sweep.python, "-m", "aropd", "fit", *run.args]),
        "# A fit that ran out of max_time exits 0 too: DONE only if it completed.",
        shlex.join([sweep.python, "-m", "aropd.experiments.runs", str(run.dir)]),
        f"printf {shlex.quote(done + chr(10))} \"$(date -Iseconds)\" \"${{SLURM_JOB_ID:-}}\" "
        f"> {shlex.quote(str(run.dir / 'DONE'))}",
    ]
    return "\n".join(lines) + "\n"


def submit(run: Run, sweep: Sweep) -> tuple[bool, str]:
    """Write ``<run>/job.sbatch`` and, if asked, ``sbatch`` it: ``(ok, what happened)``."""
    script = run.dir / "job.sbatch"
    script.write_text(slurm_script(run, sweep))
    script.chmod(0o755)
    if not (sweep.slurm and sweep.slurm.submit):
        return True, f"wrote {script}"
    proc = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        return False, f"wrote {script}; sbatch failed: {proc.stderr.strip()}"
    return True, f"wrote {script}; {proc.stdout.strip()}"


# ---- running ----------------------------------------------------------------------------------------
def execute(sweep: Sweep, planned: list[Run], dry_run: bool = False, force: bool = False) -> list[str]:
    """Run (or write job scripts for) every pending run, one after another; the names of the failed runs."""
    print(f"sweep {sweep.name!r}: {len(planned)} run(s) in {sweep.dir}/")
    failed = []
    for i, run in enumerate(planned, 1):
        st = runs.status(run.dir, run.config_hash)
        tag = f"[{i}/{len(planned)}] {run.name}"
        if st == "stale" and force and not dry_run:
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
        command = [sweep.python, "-m", "aropd", "fit", *run.args]
        if dry_run:
            print(f"{tag}: pending\n    {shlex.join(command)}")
            continue
        runs.write_record(run.dir, sweep=sweep.name, run=run.name, configs=sweep.configs, set=sweep.sets,
                          overrides=run.overrides, command=command, config_hash=run.config_hash)
        if sweep.slurm:
            ok, msg = submit(run, sweep)
            if not ok:
                failed.append(run.name)
            print(f"{tag}: {msg}")
            continue
        print(f"{tag}: running (log: {run.dir / 'fit.log'})", flush=True)
        start = time.time()
        rc = runs.launch("fit", run.args, run.dir / "fit.log", python=sweep.python)
        seconds = round(time.time() - start, 1)
        if rc != 0:
            failed.append(run.name)
            print(f"{tag}: FAILED (exit {rc}) after {seconds}s; last lines of fit.log:\n"
                  + runs.log_tail(run.dir / "fit.log"), file=sys.stderr)
            continue
        unfinished = runs.unfinished_fit(run.dir)
        if unfinished:
            failed.append(run.name)
            print(f"{tag}: NOT FINISHED (exit 0) after {seconds}s: {unfinished}", file=sys.stderr)
            continue
        runs.write_done(run.dir, run.config_hash, seconds=seconds)
        print(f"{tag}: finished in {seconds}s")
    return failed


def write_table(sweep: Sweep, planned: list[Run]) -> Path | None:
    """``<sweep>/table.md`` of the finished runs with results (None, and why, when there are none)."""
    finished = [r for r in planned if runs.status(r.dir, r.config_hash) == "finished"]
    if len(finished) < len(planned):
        print(f"sweep: {len(planned) - len(finished)} of {len(planned)} run(s) not finished (or stale); not in the table")
    with_results = [r for r in finished if runs.final_results(r.dir) is not None]
    for r in finished:
        if r not in with_results:
            print(f"sweep: {r.name}: finished but wrote no results.json (no val_benchmarks?); not in the table")
    if not with_results:
        print("sweep: no finished run with results yet; no table")
        return None
    table = benchmark_table([r.dir for r in with_results])
    out = sweep.dir / "table.md"
    out.write_text(table)
    print(f"sweep: table of {len(with_results)} finished run(s) in {out}:\n{table}", end="")
    return out


def run_sweep(sweep: Sweep, dry_run: bool = False, force: bool = False, table_only: bool = False) -> int:
    """Plan, run and tabulate a sweep; the exit code (1 if a run failed or, with ``table_only``, no table)."""
    planned = plan(sweep)
    if table_only:
        return 0 if write_table(sweep, planned) is not None else 1
    failed = execute(sweep, planned, dry_run, force)
    if dry_run:
        return 0
    if sweep.slurm:
        print("sweep: when the jobs have finished, rerun this command with --table-only for the table")
    else:
        write_table(sweep, planned)
    if failed:
        print(f"sweep: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
