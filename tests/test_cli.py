import json
import subprocess
import sys
from pathlib import Path

import pytest

from aropd.cli import main
from aropd.data import PrivilegedDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml"))
TINY_CONF = ROOT / "tests" / "conf" / "tiny.yaml"  # the quickstart with the tiny random model: fits in seconds


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_shipped_config_parses_on_top_of_the_quickstart(config, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", "configs/quickstart.yaml", "--config", str(config), "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "PrivilegedDistillation" in out or "SupervisedFineTuning" in out


def test_method_preset_composes(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/quickstart.yaml", "--config", "configs/methods/full_opd.yaml", "--print_config"])
    out = capsys.readouterr().out
    assert "class_path: aropd.targets.FullView" in out and "lam:" not in out
    # The tokenizer follows the student: one value, linked.
    assert "student: aropd/assets/toy-base" in out


def test_python_dash_m_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "aropd", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "fit" in out.stdout and "validate" in out.stdout


def _fit(tmp_path, *extra):
    cli = main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(TINY_CONF),
                "--trainer.default_root_dir", str(tmp_path), *extra])
    return Path(cli.trainer.log_dir)


def test_fit_on_a_fixed_batch_lowers_kl_to_the_target(tmp_path, monkeypatch, tokenizer):
    monkeypatch.chdir(ROOT)
    from aropd.models import build_tiny_llama

    # A separate teacher that disagrees with the student, so there is a gap to close.
    teacher = tmp_path / "teacher"
    model = build_tiny_llama(tokenizer, seed=1)
    model.lm_head.weight.data *= 10  # a confident teacher: a random init is close to uniform
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    rows = [json.loads(l) for l in (ROOT / "aropd/assets/toy/train.jsonl").read_text().splitlines()[:8]]
    train = tmp_path / "fixed.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log_dir = _fit(
        tmp_path, "--data.init_args.train", f"[{train}]", "--data.init_args.batch_size", "8",
        "--data.init_args.val_benchmarks", "[]", "--trainer.max_steps", "15", "--trainer.gradient_clip_val", "null",
        "--model.init_args.optimizer.init_args.lr", "3e-3", "--model.init_args.scheduler", "null",
        "--model.init_args.teacher", "aropd.teachers.SeparateTeacher",
        "--model.init_args.teacher.init_args.model", str(teacher),
        "--model.init_args.max_new_tokens", "16",
    )
    s = scalars(log_dir)
    for tag in ("train/loss", "diag/privileged_shift", "train/completion_len"):
        assert len(s[tag]) == 15, tag
    # With forward KL and no skipped tokens the loss is the KL to the target.
    kl = [v for _, v in s["train/loss"]]
    assert sum(kl[-3:]) / 3 < 0.9 * sum(kl[:3]) / 3  # a frozen student would stay within noise (~3%)
    assert all(v > 0 for _, v in s["diag/privileged_shift"])


def test_quickstart_runs_from_another_working_directory(tmp_path, monkeypatch):
    """Packaged assets named `aropd/assets/...` in a config resolve inside the package."""
    monkeypatch.chdir(tmp_path)  # no aropd/ folder here
    cli = main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(TINY_CONF),
                "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", "out"])
    assert cli.trainer.global_step == 1
    assert (tmp_path / "out").is_dir()


@pytest.mark.parametrize("method,expected", [
    ("ar_opd", {"class_path": "aropd.targets.AnchoredResidual", "init_args": {"lam": 0.8, "clip": 5.0}}),
    ("full_opd", {"class_path": "aropd.targets.FullView"}),
    ("partial_opd", {"class_path": "aropd.targets.PartialView"}),
    ("sft", None),
])
def test_saved_hyperparameters_are_what_trained(tmp_path, monkeypatch, method, expected):
    monkeypatch.chdir(ROOT)
    import yaml

    cli = main(["fit", "--config", "configs/quickstart.yaml", "--config", str(TINY_CONF),
                "--config", f"configs/methods/{method}.yaml", "--trainer.max_steps", "1",
                "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(tmp_path)])
    log_dir = Path(cli.trainer.log_dir)
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    config = yaml.safe_load((log_dir / "config.yaml").read_text())["model"]
    model = cli.model
    if expected is None:
        assert type(model).__name__ == "SupervisedFineTuning" and "target" not in hparams and "lam" not in hparams
        return
    assert hparams["target"] == expected and config["init_args"]["target"] == expected
    assert "lam" not in hparams and "method" not in hparams  # the target's own args are the only place λ lives
    trained = model.target  # the object that trained carries those values
    assert type(trained).__name__ == expected["class_path"].rsplit(".", 1)[1]
    assert vars(trained) == expected.get("init_args", {})


@pytest.mark.parametrize("option", ["--model.init_args.target.init_args.lam", "--model.init_args.lam"])
def test_lambda_on_a_full_opd_run_is_an_error_naming_it(monkeypatch, capsys, option):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", "configs/quickstart.yaml", "--config", "configs/methods/full_opd.yaml",
              option, "0.3", "--print_config"])
    assert e.value.code != 0
    assert "lam" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--trainer.max_step", "5"], "--trainer.max_step"),  # an abbreviation is not taken for max_steps
    (["--config", "configs/methods/ar_opd.yaml", "--model.init_args.target.init_args.lam", ".inf"], "lam"),
    (["--config", "configs/methods/ar_opd.yaml", "--model.init_args.target.init_args.lam", "nan"], "lam"),
])
def test_bad_options_are_rejected_before_any_work_naming_them(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(ROOT)
    with pytest.raises((SystemExit, ValueError)) as e:
        main(["fit", "--config", "configs/quickstart.yaml", "--config", str(TINY_CONF), *args,
              "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(tmp_path)])
    text = str(e.value) + capsys.readouterr().err
    assert not (tmp_path / "lightning_logs").exists()  # nothing written before the options were checked
    assert needle in text


def _losses(tmp_path, name, *extra):
    out = tmp_path / name
    main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(TINY_CONF),
          "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(out),
          "--trainer.callbacks+", json.dumps({"class_path": "run_recorders.LossRecorder", "init_args": {"out": str(out)}}),
          *extra])
    return [json.loads(line)["loss"] for line in (out / "losses-rank0.jsonl").read_text().splitlines()]


def test_seed_everything_reaches_the_rollouts_and_the_data_order(tmp_path, monkeypatch):
    """One seed: the rollout streams and the data order follow seed_everything unless set explicitly."""
    monkeypatch.chdir(ROOT)
    a = _losses(tmp_path, "a", "--seed_everything", "0")
    b = _losses(tmp_path, "b", "--seed_everything", "0")
    c = _losses(tmp_path, "c", "--seed_everything", "1")
    # Seed 1 for everything but the rollout and data seeds, pinned to 0: the same runs as seed 0 where those
    # streams decide (the student is loaded, not initialized, so nothing else draws from the global seed).
    d = _losses(tmp_path, "d", "--seed_everything", "1", "--model.init_args.seed", "0", "--data.init_args.seed", "0")
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]
    assert d == a


@pytest.mark.parametrize("yaml_text,needle", [
    ("model: {init_args: {optimizer: {init_args: {lr: .inf}}}}", "lr=inf"),
    ("model: {init_args: {optimizer: {init_args: {weight_decay: .nan}}}}", "weight_decay"),  # torch names it itself
    ("model: {init_args: {scheduler: {init_args: {min_lr_ratio: 2.0}}}}", "min_lr_ratio"),
    ("model: {init_args: {sampling: {temperature: .inf}}}", "temperature"),
])
def test_non_finite_or_out_of_range_training_options_stop_before_the_first_step(tmp_path, monkeypatch, yaml_text, needle):
    """As a YAML config writes them (`.inf`, `.nan`): rejected naming the option, before any optimizer step."""
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_text + "\n")
    with pytest.raises((ValueError, SystemExit)) as e:
        main(["fit", "--config", "configs/quickstart.yaml", "--config", str(TINY_CONF), "--config", str(bad),
              "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(tmp_path)])
    assert needle in str(e.value) or needle in str(e.value.__context__)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("preset,trace", [("no_trace", "none"), ("shuffled_trace", "shuffled")])
def test_privilege_control_presets_fit_and_save_the_option(tmp_path, monkeypatch, preset, trace):
    monkeypatch.chdir(ROOT)
    import yaml

    cli = main(["fit", "--config", "configs/quickstart.yaml", "--config", str(TINY_CONF),
                "--config", "configs/methods/full_opd.yaml", "--config", f"configs/methods/{preset}.yaml",
                "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.global_step == 1
    config = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert config["data"]["init_args"]["teacher_trace"] == trace
    assert config["model"]["init_args"]["target"] == {"class_path": "aropd.targets.FullView"}  # composed, not replaced
    exs = cli.datamodule.train_examples
    if trace == "none":
        assert all(e.full == e.student == e.partial for e in exs)
    else:  # every full view differs from the one its own trace would give (the derangement has no fixed point)
        own = PrivilegedDataModule(tokenizer=cli.datamodule.hparams.tokenizer, train=cli.datamodule.hparams.train,
                                   template=cli.datamodule.template, max_new_tokens=cli.datamodule.hparams.max_new_tokens)
        own.setup("fit")
        assert len(own.train_examples) == len(exs)
        assert all(a.full != b.full and a.student == b.student for a, b in zip(exs, own.train_examples))


def test_privilege_control_on_sft_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="teacher_trace 'none' does nothing with SFT"):
        main(["fit", "--config", "configs/quickstart.yaml", "--config", str(TINY_CONF),
              "--config", "configs/methods/sft.yaml", "--config", "configs/methods/no_trace.yaml",
              "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(tmp_path)])
    assert not list(tmp_path.rglob("*.ckpt"))


class SigtermAtStep2(__import__("lightning").pytorch.Callback):
    """Sends this process SIGTERM (a scheduler's preemption) after the second optimizer step."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 2:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


def test_a_fit_stopped_by_sigterm_exits_143_not_0(tmp_path, monkeypatch):
    # Lightning ends the fit with a SystemExit that carries no code: a launcher would read 0, and a
    # study would mark a run that stopped at step 2 finished.
    from aropd.experiments import runs

    monkeypatch.chdir(ROOT)
    args = ["--config", "configs/quickstart.yaml", "--config", "tests/conf/tiny.yaml", "--trainer.max_steps", "20",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks+=test_cli.SigtermAtStep2"]
    assert runs.launch("fit", args, tmp_path / "fit.log") == 143
    assert "aropd: stopped by SIGTERM; exit status 143" in (tmp_path / "fit.log").read_text()


def test_fit_end_records_a_completed_fit_and_one_that_ran_out_of_time(tmp_path, monkeypatch):
    """``fit_end.json`` tells a completed fit from one stopped by ``max_time``: both exit 0, and only the
    first may be counted as finished (a sweep's ``DONE``); the second resumes from ``last.ckpt``."""
    from aropd.experiments.runs import unfinished_fit

    monkeypatch.chdir(ROOT)
    small = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--data.init_args.val_benchmarks",
             "[{name: toy, limit: 2}]", "--model.init_args.max_new_tokens", "8", "--model.init_args.val_max_new_tokens", "4"]
    done = _fit(tmp_path / "done", *small)
    record = json.loads((done / "fit_end.json").read_text())
    assert isinstance(record.pop("epoch"), int)  # how many passes over the data 3 steps took
    assert record == {"global_step": 3, "max_steps": 3, "max_epochs": -1, "out_of_time": False, "complete": True}
    assert unfinished_fit(done) is None
    # No time at all: the timer stops the fit before its first optimizer step, and it exits normally.
    cut = _fit(tmp_path / "cut", *small, "--trainer.max_time", "00:00:00:00")
    record = json.loads((cut / "fit_end.json").read_text())
    assert record["global_step"] == 0 and record["out_of_time"] and not record["complete"]
    assert "ran out of max_time at step 0 of 3" in unfinished_fit(cut)
    assert "did not return" in unfinished_fit(tmp_path)  # no fit_end.json there
    proc = subprocess.run([sys.executable, "-m", "aropd.experiments.runs", str(cut)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "ran out of max_time" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "aropd.experiments.runs", str(done)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
