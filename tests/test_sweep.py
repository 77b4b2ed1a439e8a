"""aropd.experiments.sweep (scripts/sweep.py): a grid of runs named after their overrides, finished runs
skipped, SLURM job scripts, and the results table."""

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from aropd.experiments import sweep
from aropd.experiments.runs import ExperimentError
from aropd.experiments.sweep import Slurm, Sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
LAM = "model.init_args.target.init_args.lam"
RUNS = ["lam=0.6_partial_ratio=0.25", "lam=0.6_partial_ratio=0.75",
        "lam=1.2_partial_ratio=0.25", "lam=1.2_partial_ratio=0.75"]


def test_grid_values_split_on_top_level_commas_only():
    assert sweep.split_values("0.4,0.6, 1.0") == ["0.4", "0.6", "1.0"]
    assert sweep.split_values("[a.jsonl,b.jsonl],[c.jsonl]") == ["[a.jsonl,b.jsonl]", "[c.jsonl]"]
    assert sweep.split_values('{name: toy, limit: 4},"x,y"') == ["{name: toy, limit: 4}", '"x,y"']
    with pytest.raises(ExperimentError):
        sweep.split_values("0.4,,0.6")


def test_run_names_use_the_shortest_distinct_key_suffix():
    assert sweep.short_names([LAM, "data.init_args.partial_ratio"]) == {
        LAM: "lam", "data.init_args.partial_ratio": "partial_ratio"}
    assert sweep.short_names(["model.init_args.seed", "data.init_args.seed"]) == {
        "model.init_args.seed": "model.init_args.seed", "data.init_args.seed": "data.init_args.seed"}
    names = [n for n, _ in sweep.expand({LAM: ["0.6", "1.2"], "data.init_args.partial_ratio": ["0.25", "0.75"]})]
    assert names == RUNS
    assert sweep.expand({"data.init_args.train": ["[data/a b.jsonl]"]})[0][0] == "train=data-a-b.jsonl"
    assert sweep.expand({})[0][0] == "base"
    with pytest.raises(ExperimentError, match="same run name"):
        sweep.expand({"model.init_args.student": ["a/b", "a b"]})


def test_bad_arguments_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ExperimentError, match="nope.yaml"):
        sweep.plan(Sweep("x", [str(tmp_path / "nope.yaml")]))
    with pytest.raises(ExperimentError, match="KEY=VALUE"):
        sweep.parse_assignment("lam", "--grid")
    base = ["configs/quickstart.yaml"]
    with pytest.raises(ExperimentError, match="one grid axis or one set"):
        sweep.plan(Sweep("x", base, grid={"a.b": ["1"]}, sets={"a.b": "2"}))
    with pytest.raises(ExperimentError, match="does not parse"):
        sweep.plan(Sweep("x", base, grid={"model.init_args.no_such_arg": ["1"]}))


def test_the_command_line_names_bad_arguments_and_exits_2(tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "sweep.py"), "--name", "x", "--config", "configs/quickstart.yaml"]
    for extra, message in ((["--grid", "lam"], "KEY=VALUE"), (["--grid", "a.b=1", "--grid", "a.b=2"], "given twice"),
                           (["--submit"], "--submit needs --slurm")):
        proc = subprocess.run(script + extra, capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2 and message in proc.stderr, (extra, proc.stderr)


def tiny_sweep(tmp_path: Path, **sets: str) -> Sweep:
    train = tmp_path / "train.jsonl"
    if not train.exists():
        train.write_text("".join((ROOT / "aropd/assets/toy/train.jsonl").read_text().splitlines(keepends=True)[:8]))
    base = {
        "trainer.max_steps": "2", "trainer.val_check_interval": "2", "trainer.callbacks": "[]",
        "trainer.enable_progress_bar": "false", "trainer.enable_model_summary": "false",
        "data.init_args.train": f"[{train}]", "data.init_args.batch_size": "4",
        "model.init_args.max_new_tokens": "8", "model.init_args.val_max_new_tokens": "4",
        "data.init_args.val_benchmarks": "[{name: toy, limit: 4}]",
    }
    return Sweep(
        name="grid", root=tmp_path / "runs",
        configs=[str(ROOT / "configs/quickstart.yaml"), str(ROOT / "tests/conf/tiny.yaml"),
                 str(ROOT / "configs/methods/ar_opd.yaml")],
        grid={LAM: ["0.6", "1.2"], "data.init_args.partial_ratio": ["0.25", "0.75"]}, sets={**base, **sets},
    )


def snapshot(sweep_dir: Path) -> dict[str, float]:
    return {str(p.relative_to(sweep_dir)): p.stat().st_mtime_ns for p in sweep_dir.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_two_by_two_grid_runs_skips_finished_runs_and_tabulates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    sweep_dir = tmp_path / "runs" / "grid"
    assert run_sweep(tiny_sweep(tmp_path)) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == RUNS
    for name in RUNS:
        run = sweep_dir / name
        cfg = yaml.safe_load((run / "config.yaml").read_text())  # the resolved config, saved by LightningCLI
        lam, rho = re.fullmatch(r"lam=(.*)_partial_ratio=(.*)", name).groups()
        assert cfg["model"]["init_args"]["target"]["class_path"] == "aropd.targets.AnchoredResidual"
        assert cfg["model"]["init_args"]["target"]["init_args"]["lam"] == float(lam)
        assert cfg["data"]["init_args"]["partial_ratio"] == float(rho)
        assert cfg["trainer"]["max_steps"] == 2
        assert len(list(run.glob("events.out.tfevents.*"))) == 1
        assert list((run / "checkpoints").glob("*.ckpt"))
        assert (run / "val" / "step_2" / "results.json").is_file()
        done, record = json.loads((run / "DONE").read_text()), json.loads((run / "run.json").read_text())
        assert done["config_hash"] == record["config_hash"] and len(done["config_hash"]) == 64
        assert record["overrides"] == {LAM: lam, "data.init_args.partial_ratio": rho}
        assert f"[{RUNS.index(name) + 1}/4] {name}: finished in" in out
    table = (sweep_dir / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| lam=")]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == RUNS
    assert "Toy" in table.splitlines()[0]
    for row, name in zip(rows, RUNS):  # each row is that run's own toy accuracy, in percent
        res = json.loads((sweep_dir / name / "val" / "step_2" / "results.json").read_text())
        assert row.split(" | ")[1] == f"{100 * res['benchmarks']['toy']['accuracy']:.1f}"

    # Again: every run is finished, nothing runs (no file below the sweep changes but the table).
    before = snapshot(sweep_dir)
    assert run_sweep(tiny_sweep(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 4 and "running" not in out
    after = snapshot(sweep_dir)
    assert {k: v for k, v in after.items() if k != "table.md"} == {k: v for k, v in before.items() if k != "table.md"}
    assert (sweep_dir / "table.md").read_text() == table
    assert run_sweep(tiny_sweep(tmp_path), table_only=True) == 0
    assert capsys.readouterr().out.count("| lam=") == 4

    # A changed config makes the finished runs stale: reported and skipped, not silently rerun or reused.
    assert run_sweep(tiny_sweep(tmp_path, **{"trainer.max_steps": "3"})) == 0
    captured = capsys.readouterr()
    assert captured.err.count("STALE") == 4 and "running" not in captured.out
    assert snapshot(sweep_dir).keys() == after.keys()


def test_slurm_scripts_pass_bash_n_and_write_done_on_success(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # The stand-in srun logs its command and leaves the fit_end.json a fit would (FIT_END, in FIT_END_DIR).
    (fake_bin / "srun").write_text('#!/bin/sh\necho "srun $*" >> "$SRUN_LOG"\nprintf "%s" "$FIT_END" > "$FIT_END_DIR/fit_end.json"\n')
    (fake_bin / "sbatch").write_text('#!/bin/sh\necho "$1" >> "$SBATCH_LOG"\necho "Submitted batch job 42"\n')
    for f in fake_bin.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(tmp_path / "sbatch.log"))
    slurm = Slurm(nodes=2, gpus_per_node=4, time="02:00:00", partition="gpu", account="proj",
                  setup=["source .venv/bin/activate"], sbatch=["--qos=high"], submit=True)
    grid = replace(tiny_sweep(tmp_path), slurm=slurm)
    assert run_sweep(grid) == 0
    sweep_dir = tmp_path / "runs" / "grid"
    scripts = sorted(sweep_dir.glob("*/job.sbatch"))
    assert [s.parent.name for s in scripts] == RUNS
    assert (tmp_path / "sbatch.log").read_text().split() == [str(s) for s in scripts]
    for s in scripts:
        assert subprocess.run(["bash", "-n", str(s)], capture_output=True).returncode == 0, s
        text = s.read_text()
        for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                     "#SBATCH --time=02:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                     "#SBATCH --qos=high", "source .venv/bin/activate"):
            assert line in text.splitlines(), line
        assert "--trainer.num_nodes 2 --trainer.devices 4" in text and "--ckpt_path last" in text
        assert not (s.parent / "DONE").exists()
    # Run one job script with a stand-in srun: it runs `aropd fit` through srun, then writes DONE if the
    # fit completed. A fit that ran out of max_time exits 0 as well: the job fails and writes no DONE.
    run = scripts[0].parent
    env = {**os.environ, "SRUN_LOG": str(tmp_path / "srun.log"), "SLURM_JOB_ID": "42", "FIT_END_DIR": str(run)}
    out_of_time = {"global_step": 5, "max_steps": 9, "epoch": 0, "max_epochs": -1, "out_of_time": True, "complete": False}
    proc = subprocess.run(["bash", str(scripts[0])], capture_output=True, text=True,
                          env={**env, "FIT_END": json.dumps(out_of_time)})
    assert proc.returncode != 0 and "ran out of max_time at step 5 of 9" in proc.stderr
    assert not (run / "DONE").exists()
    (tmp_path / "srun.log").unlink()
    complete = {**out_of_time, "global_step": 9, "out_of_time": False, "complete": True}
    proc = subprocess.run(["bash", str(scripts[0])], capture_output=True, text=True, env={**env, "FIT_END": json.dumps(complete)})
    assert proc.returncode == 0, proc.stderr
    assert re.match(r"srun \S+ -m aropd fit --config ", (tmp_path / "srun.log").read_text())
    done = json.loads((run / "DONE").read_text())
    assert done["config_hash"] == json.loads((run / "run.json").read_text())["config_hash"]
    assert done["slurm_job_id"] == "42" and done["finished_at"]
    # The sweep now sees that run as finished and writes (and submits) scripts only for the others.
    capsys.readouterr()
    assert run_sweep(grid) == 0
    out = capsys.readouterr().out
    assert f"{run.name}: finished, skipped" in out and out.count("wrote") == 3


def test_dry_run_lists_commands_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert run_sweep(tiny_sweep(tmp_path), dry_run=True) == 0
    out = capsys.readouterr().out
    assert out.count(": pending") == 4 and out.count(" -m aropd fit ") == 4
    assert f"--{LAM} 1.2 --data.init_args.partial_ratio 0.75" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script, runs", [
    ("lambda.sh", ["lam=0.4", "lam=0.6", "lam=0.8", "lam=1.0", "lam=1.2", "lam=1.4"]),
    ("partial_rate.sh", ["partial_ratio=0.25", "partial_ratio=0.5", "partial_ratio=0.75"]),
])
def test_shipped_sweeps_resolve_every_run(script, runs, tmp_path):
    """The wrapper itself runs (from any folder), hands its arguments on, and every run's config parses."""
    path = ROOT / "configs" / "sweeps" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    proc = subprocess.run(["bash", str(path), "--dry-run", "--root", str(tmp_path)], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"\] (\S+): pending", proc.stdout) == runs
    assert "--config configs/recipes/math.yaml --config configs/methods/ar_opd.yaml" in proc.stdout
    assert not any(tmp_path.iterdir())


def test_shipped_sweeps_are_these():
    assert {s.name for s in (ROOT / "configs" / "sweeps").glob("*.sh")} == {"lambda.sh", "partial_rate.sh"}


def test_force_moves_a_stale_run_aside_and_starts_it_afresh(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "runs" / "grid" / RUNS[0]
    run.mkdir(parents=True)
    (run / "DONE").write_text(json.dumps({"config_hash": "0" * 64}) + "\n")  # finished under another config
    (run / "fit.log").write_text("old\n")
    grid = replace(tiny_sweep(tmp_path), slurm=Slurm())
    assert run_sweep(grid) == 0
    assert "STALE" in capsys.readouterr().err and (run / "DONE").exists()
    assert not (run / "job.sbatch").exists()
    assert run_sweep(grid, force=True) == 0
    aside = list(run.parent.glob(f"{RUNS[0]}.stale-*"))
    assert len(aside) == 1 and (aside[0] / "fit.log").read_text() == "old\n"
    assert (run / "job.sbatch").exists() and not (run / "DONE").exists()


def test_a_run_that_exits_0_out_of_time_is_not_finished(tmp_path, monkeypatch, capsys):
    """A fit stopped by ``max_time`` exits 0 like a finished one; the sweep reads its ``fit_end.json``,
    writes no ``DONE`` and leaves it out of the table, so the next sweep resumes it."""
    monkeypatch.chdir(ROOT)
    one = replace(tiny_sweep(tmp_path, **{"trainer.max_time": "00:00:00:00"}), grid={LAM: ["0.6"]})
    assert run_sweep(one) == 1
    captured = capsys.readouterr()
    assert "NOT FINISHED (exit 0)" in captured.err and "ran out of max_time at step 0 of 2" in captured.err
    run = tmp_path / "runs" / "grid" / "lam=0.6"
    assert (run / "fit_end.json").is_file() and not (run / "DONE").exists()
    assert "no finished run" in captured.out and not (tmp_path / "runs" / "grid" / "table.md").exists()
