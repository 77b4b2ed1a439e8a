"""The fast option check that runs before Lightning is imported: it must know exactly the options the
real parser knows (read back from `--print_config`), reject what the real parser rejects, and never
reject a shipped config."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aropd.cli import main
from aropd.precheck import LINKS, ConfigError, check_argv, init_params, top_level_keys

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT) for p in [*(ROOT / "configs").rglob("*.yaml"), *(ROOT / "tests" / "conf").glob("*.yaml")])
TRAINER = "lightning.pytorch.trainer.trainer.Trainer"


def printed_config(capsys, *args) -> dict:
    with pytest.raises(SystemExit) as e:
        main([*args, "--print_config"])
    assert e.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("subcommand,method", [("fit", "configs/methods/ar_opd.yaml"), ("fit", "configs/methods/sft.yaml"),
                                                ("validate", "configs/methods/full_opd.yaml")])
def test_the_options_it_knows_are_the_real_parsers(monkeypatch, capsys, subcommand, method):
    monkeypatch.chdir(ROOT)
    cfg = printed_config(capsys, subcommand, "--config", "configs/quickstart.yaml", "--config", method)
    # `config` and `print_config` are arguments, never printed.
    assert set(cfg) == top_level_keys(subcommand) - {"config", "print_config"}
    assert set(cfg["trainer"]) == init_params(TRAINER)
    assert set(cfg["model"]["init_args"]) == init_params(cfg["model"]["class_path"])
    linked = {t.rpartition(".")[2] for _, t in LINKS}  # set through their sources only
    assert set(cfg["data"]["init_args"]) == init_params(cfg["data"]["class_path"]) - linked


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD = {
    "abbreviated trainer option": (lambda t: ["--trainer.max_step", "5"],
                                   "--trainer.max_step: 'max_step' is not an option of the Trainer (did you mean max_steps?)"),
    "model option typo": (lambda t: ["--model.init_args.max_new_token", "5"],
                          "'max_new_token' is not an option of aropd.module.PrivilegedDistillation (did you mean max_new_tokens?)"),
    "trainer typo in a file": (lambda t: ["--config", _write(t, "a.yaml", "trainer:\n  max_epoch: 1\n")],
                               "a.yaml: trainer.max_epoch: 'max_epoch' is not an option of the Trainer (did you mean max_epochs?)"),
    "top-level typo in a file": (lambda t: ["--config", _write(t, "b.yaml", "seed_everythin: 3\n")],
                                 "b.yaml: seed_everythin: 'seed_everythin' is not an option of `aropd fit` (did you mean seed_everything?)"),
    "a distillation option after switching to SFT": (
        lambda t: ["--config", "configs/methods/sft.yaml", "--model.init_args.divergence", "jsd"],
        "--model.init_args.divergence: 'divergence' is not an option of aropd.sft.SupervisedFineTuning"),
    "data option typo": (lambda t: ["--data.init_args.batch_sizes", "4"],
                         "'batch_sizes' is not an option of aropd.data.PrivilegedDataModule (did you mean batch_size?)"),
    "missing config": (lambda t: ["--config", str(t / "nope.yaml")], "nope.yaml: no such file"),
    "config is a folder": (lambda t: ["--config", str(t)], "is a directory, not a YAML file"),
    "config is not YAML": (lambda t: ["--config", _write(t, "c.yaml", "trainer:\n  max_steps: 1\n bad: [\n")],
                           "c.yaml line 3: not valid YAML"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_options_are_named_at_once_and_the_real_parser_agrees(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(ROOT)
    make, message = BAD[case]
    argv = ["fit", "--config", "configs/quickstart.yaml", *make(tmp_path)]
    with pytest.raises(ConfigError) as e:
        check_argv(argv)
    assert message in str(e.value)
    # The real parser (what runs when the check is unsure) rejects the same input.
    with pytest.raises((SystemExit, ValueError, OSError)) as real:
        main([*argv, "--trainer.default_root_dir", str(tmp_path / "run")])
    assert getattr(real.value, "code", 2) != 0
    assert not (tmp_path / "run").exists()


def test_a_linked_option_set_directly_is_an_error(monkeypatch):
    # The parser would overwrite it with its link's source without a word: an option that does nothing.
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="--data.init_args.tokenizer: follows model.init_args.student and cannot be set"):
        check_argv(["fit", "--config", "configs/quickstart.yaml", "--data.init_args.tokenizer", "gpt2"])


def test_every_problem_is_named_in_one_error(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as e:
        check_argv(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_step", "5", "--model.init_args.lamm", "1"])
    assert "max_step" in str(e.value) and "lamm" in str(e.value)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_no_shipped_config_is_rejected(monkeypatch, config):
    monkeypatch.chdir(ROOT)
    for subcommand in ("fit", "validate"):
        check_argv([subcommand, "--config", "configs/quickstart.yaml", "--config", str(config)])


def test_the_console_script_answers_a_typo_without_importing_lightning():
    code = ("import sys\nfrom aropd.console import entry\ntry:\n    entry(['fit', '--trainer.max_step', '5'])\n"
            "except SystemExit as e:\n    print(e.code, 'lightning' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["2", "False", "False"]
    assert out.stderr.strip().splitlines()[-1] == (
        "aropd: error: --trainer.max_step: 'max_step' is not an option of the Trainer (did you mean max_steps?)")
