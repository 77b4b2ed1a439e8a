"""One run's bookkeeping: its resolved config and hash, its folder, ``DONE`` and its final results.

A run folder is the run's log dir: ``config.yaml`` (resolved), TensorBoard events, ``checkpoints/``,
``val/step_<k>/results.json`` (``validate/results.json`` for ``aropd validate``), plus ``run.json``
(what was launched), ``fit.log``, ``fit_end.json`` and ``DONE``. ``aropd fit`` writes
``fit_end.json`` when a fit returns: its step and epoch against the trainer's limits, and whether it
ran out of ``max_time`` first. A fit that ran out of time exits 0 like a finished one (a scheduler's
time-boxed run, to be resumed from ``last.ckpt``), so ``DONE`` is written only after the run exited
0 *and* its ``fit_end.json`` says it completed. It holds the SHA-256 of the run's resolved config,
so a finished run can be told from one that would now get another config (a base config or a
default changed): that run is *stale*.

    python -m aropd.experiments.runs RUN_DIR  # exit 0 if the fit in RUN_DIR completed, else 1 and why
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shlex
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Literal

Status = Literal["finished", "stale", "pending"]


class ExperimentError(Exception):
    """A run or grid that cannot be set up as asked (the message says why)."""


def resolve(subcommand: str, args: list[str]) -> str:
    """``aropd <subcommand> <args> --print_config`` in this process (parsing only: no model is loaded)."""
    from aropd.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. LightningCLI's note that this process has its own sys.argv
        try:
            cli_main([subcommand, *args, "--print_config"])
        except SystemExit as e:
            code = e.code
    if code not in (0, None):
        raise ExperimentError(
            f"the config does not parse: aropd {subcommand} {shlex.join(args)}\n{err.getvalue().strip()}")
    return out.getvalue()


def config_hash(resolved: str) -> str:
    """SHA-256 of a resolved config, comments dropped (they carry no setting)."""
    body = "\n".join(line for line in resolved.splitlines() if not line.lstrip().startswith("#"))
    return hashlib.sha256(body.encode()).hexdigest()


def logger_arg(run_dir: Path) -> str:
    # name "" and version "": the run folder is the log dir (config.yaml, events, checkpoints/, val/).
    return json.dumps({"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(run_dir), "name": "", "version": ""}})


def run_args(configs: list[str], overrides: dict[str, str], run_dir: Path, resume: bool = True) -> list[str]:
    """The arguments of ``aropd fit|validate`` for one run in ``run_dir``.

    ``resume`` ends them in ``--ckpt_path last``: a killed or resubmitted run goes on from its last
    checkpoint when its config saves one.
    """
    args = [a for c in configs for a in ("--config", c)]
    for key, value in overrides.items():
        args += [f"--{key}", value]
    args += ["--trainer.default_root_dir", str(run_dir), "--trainer.logger", logger_arg(run_dir)]
    return args + (["--ckpt_path", "last"] if resume else [])


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def status(run_dir: Path, config_hash: str) -> Status:
    """``finished`` (``DONE`` under this config), ``stale`` (finished or started under another) or ``pending``."""
    for record in (read_json(run_dir / "DONE"), read_json(run_dir / "run.json")):
        if record is not None and record.get("config_hash") not in (None, config_hash):
            return "stale"
    return "finished" if (run_dir / "DONE").exists() else "pending"


def write_record(run_dir: Path, **fields: Any) -> None:
    """``run.json``: what is launched in this folder (configs, overrides, command, config hash)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps(fields, indent=2) + "\n")


FIT_END = "fit_end.json"


def fit_end(trainer: Any) -> dict[str, Any]:
    """How a fit ended: ``global_step``, ``epoch`` and the trainer's ``max_steps`` / ``max_epochs``,
    ``out_of_time`` (its ``max_time`` ran out) and ``complete`` (it reached a step or epoch limit, or
    stopped for another reason than time: an early-stopping callback's decision is the run's end)."""
    from lightning.pytorch.callbacks import Timer

    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    remaining = timer.time_remaining() if timer is not None else None
    out_of_time = remaining is not None and remaining <= 0
    max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
    reached = (max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps) or (
        max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs)
    return {"global_step": trainer.global_step, "max_steps": max_steps, "epoch": trainer.current_epoch,
            "max_epochs": max_epochs, "out_of_time": out_of_time, "complete": bool(reached or not out_of_time)}


def write_fit_end(log_dir: Path, record: dict[str, Any]) -> None:
    from aropd.io import atomic_write_text

    log_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(log_dir / FIT_END, json.dumps(record) + "\n")


def unfinished_fit(run_dir: Path) -> str | None:
    """Why the fit in ``run_dir`` is not complete (None: it is), from its ``fit_end.json``."""
    record = read_json(run_dir / FIT_END)
    if record is None:
        return f"no readable {run_dir / FIT_END}: the fit did not return"
    if not record.get("complete"):
        return (f"it ran out of max_time at step {record.get('global_step')} of {record.get('max_steps')} "
                f"(epoch {record.get('epoch')} of {record.get('max_epochs')}); run it again to resume from last.ckpt")
    return None


def write_done(run_dir: Path, config_hash: str, **fields: Any) -> None:
    done = {"config_hash": config_hash, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
    (run_dir / "DONE").write_text(json.dumps(done) + "\n")


def final_results(run: Path) -> Path | None:
    """The ``results.json`` of a run's last evaluation: the newest one below the folder (or the file itself).

    Newest by modification time: a fit writes ``val/step_<k>/`` in step order, and a later
    ``aropd validate`` of the same run supersedes them.
    """
    if run.is_file() and run.name == "results.json":
        return run
    found = sorted(run.rglob("results.json"), key=lambda p: (p.stat().st_mtime, str(p))) if run.is_dir() else []
    return found[-1] if found else None


def launch(subcommand: str, args: list[str], log: Path, python: str | None = None) -> int:
    """Run ``aropd <subcommand> <args>``, its output appended to ``log``; the exit code.

    ``python`` runs it in its own process with that interpreter; ``None`` in this one (no start-up
    cost, but the run's imports and global state stay).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    if python is not None:
        with open(log, "ab") as f:
            return subprocess.run([python, "-m", "aropd", subcommand, *args], stdout=f, stderr=subprocess.STDOUT).returncode
    from aropd.cli import main as cli_main

    with open(log, "a", encoding="utf-8", buffering=1) as f, \
            contextlib.redirect_stdout(f), contextlib.redirect_stderr(f), warnings.catch_warnings():
        # LightningCLI notes that this process's own sys.argv (the caller's flags) is not what it parses
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter")
        try:
            cli_main([subcommand, *args])
        except SystemExit as e:
            return int(e.code or 0)
        except Exception:
            traceback.print_exc()
            return 1
    return 0


def log_tail(log: Path, lines: int = 15) -> str:
    """The last lines of a run's log, indented, for a failure message."""
    tail = log.read_text(errors="replace").splitlines()[-lines:] if log.is_file() else []
    return "    " + "\n    ".join(tail)


if __name__ == "__main__":  # a SLURM job script's check before it writes DONE
    if len(sys.argv) != 2:
        sys.exit("usage: python -m aropd.experiments.runs RUN_DIR")
    why = unfinished_fit(Path(sys.argv[1]))
    if why:
        sys.exit(f"{sys.argv[1]}: not finished: {why}")
