"""The paper's recipes: generated from their components, parse, carry the original runs' settings,
equal their components composed by the CLI, and run (tiny model substituted) on CPU."""

import functools
import json
import sys
from pathlib import Path

import pytest
import yaml

from aropd.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "benchmarks"
sys.path.insert(0, str(ROOT / "scripts"))
import make_recipes  # noqa: E402

RECIPES = {r.path: r for r in make_recipes.recipes()}
SUITES = {"math": ["math500", "amc23", "aime24"], "code": ["humaneval_plus", "mbpp_plus"],
          "medical": ["medqa", "medmcqa", "mmlu_medical"]}


def print_config(*args: str) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(["fit", *args, "--print_config"])
    assert e.value.code in (0, None)
    return out.getvalue()


@functools.lru_cache(maxsize=None)
def resolved_recipe(path: str) -> str:
    """``--print_config`` of one recipe (run from the repository root), once per session."""
    return print_config("--config", path)


def test_the_matrix_is_three_domains_by_six_methods():
    assert len(RECIPES) == 18
    assert {(r.domain, r.variant) for r in RECIPES.values()} == {
        (d, v) for d in ("math", "code", "medical")
        for v in ("sft", "full_opd", "partial_opd", "ar_opd_lam0.6", "ar_opd_lam0.8", "ar_opd_lam1.2")}
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "configs/recipes").rglob("*.yaml")} - {make_recipes.BASE}
    assert shipped == set(RECIPES)


def test_recipes_are_what_their_components_give(capsys):
    """Single source of truth: regenerating writes the same bytes (run make_recipes.py after editing a component)."""
    assert make_recipes.main(["--check"]) == 0, capsys.readouterr().err


def test_deep_merge_follows_config_composition():
    base = {"a": {"x": 1, "y": [1, 2]}, "t": {"class_path": "A", "init_args": {"p": 1, "q": 2}}}
    over = {"a": {"y": [3]}, "t": {"init_args": {"q": 5}}}
    assert make_recipes.deep_merge(base, over) == {"a": {"x": 1, "y": [3]},
                                                   "t": {"class_path": "A", "init_args": {"p": 1, "q": 5}}}
    new_class = {"t": {"class_path": "B", "init_args": {"r": 0}}}
    assert make_recipes.deep_merge(base, new_class)["t"] == {"class_path": "B", "init_args": {"r": 0}}
    assert base["a"]["y"] == [1, 2]  # inputs untouched


@pytest.mark.parametrize("path", sorted(RECIPES), ids=str)
def test_recipe_parses_with_the_original_runs_settings(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    r = RECIPES[path]
    cfg = yaml.safe_load(resolved_recipe(path))
    t, m, d = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    method = make_recipes.VARIANTS[r.variant][0]
    assert m["student"] == "Qwen/Qwen2.5-7B-Instruct"  # data.init_args.tokenizer is linked to it
    assert m["teacher"] == {"class_path": "aropd.teachers.EMATeacher", "init_args": {"alpha": 0.01}}
    assert m["method"] == method and m["divergence"] == "forward_kl"
    if method == "ar_opd":
        assert m["lam"] == float(r.variant.removeprefix("ar_opd_lam")) and m["clip"] == 5.0
    assert m["optimizer"]["class_path"] == "torch.optim.AdamW" and m["optimizer"]["init_args"]["lr"] == 2e-5
    assert m["scheduler"]["class_path"] == "aropd.schedules.WarmupCosine"
    assert m["scheduler"]["init_args"]["warmup_ratio"] == 0.1 and m["scheduler"]["init_args"]["min_lr_ratio"] == 0.0
    assert t["gradient_clip_val"] == 1.0 and t["gradient_clip_algorithm"] == "norm"
    # bf16 compute through FSDP2's mixed-precision policy; fp32 master weights (and EMA teacher).
    assert t["strategy"]["class_path"] == "aropd.sharding.FSDP2Strategy"
    assert t["strategy"]["init_args"]["mixed_precision"] == "bf16"
    assert t["precision"] == "32-true" and m["dtype"] == "float32"
    assert m["sampling"]["temperature"] == 1.0 and m["sampling"]["max_new_tokens"] == 1024  # linked to the data's
    assert m["sampling"]["top_p"] == 1.0 and m["sampling"]["top_k"] == 0
    assert d["max_prompt_tokens"] == 1024 and d["max_teacher_tokens"] >= 2048 + 1
    assert d["partial_ratio"] == 0.5 and d["train"] == [f"data/{r.domain}/train.jsonl"]
    # 256 rollouts per optimizer step: 2 nodes x 8 GPUs x micro-batch 1 (one rollout per prompt) x 16.
    assert (t["num_nodes"], t["devices"], d["batch_size"], t["accumulate_grad_batches"]) == (2, 8, 1, 16)
    assert t["max_epochs"] == 1 and t["max_steps"] == -1
    assert [b["name"] for b in d["val_benchmarks"]] == SUITES[r.domain]
    # The run folder is the log dir: config.yaml, events, checkpoints and results land together.
    assert t["default_root_dir"] == t["logger"]["init_args"]["save_dir"] == r.run_dir
    assert (t["logger"]["init_args"]["name"], t["logger"]["init_args"]["version"]) == ("", "")
    text = (ROOT / path).read_text()
    assert f"--config {path}" in text and "Hardware: 2 nodes x 8 GPUs" in text


@pytest.mark.parametrize("path", sorted(RECIPES), ids=str)
def test_recipe_equals_its_components_composed_with_repeated_config(path, monkeypatch, tmp_path):
    """The generator's merge is the CLI's: `--config recipe` == `--config c1 ... --config cN --config own`."""
    monkeypatch.chdir(ROOT)
    r = RECIPES[path]
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump(r.own))
    chain = [a for c in r.components for a in ("--config", c)]
    assert resolved_recipe(path) == print_config(*chain, "--config", str(own))


# One recipe per method variant, the domains rotated so each appears twice: after the tiny model, CPU
# and toy training data are substituted, recipes differ only in (method, λ) and in their domain's
# benchmarks, so these six cover every value of both axes; the other twelve are parsed and
# composition-checked above. All 18 would add about a minute of CPU for no new code path.
SMOKE = ["configs/recipes/math/sft.yaml", "configs/recipes/code/full_opd.yaml",
         "configs/recipes/medical/partial_opd.yaml", "configs/recipes/math/ar_opd_lam0.6.yaml",
         "configs/recipes/code/ar_opd_lam0.8.yaml", "configs/recipes/medical/ar_opd_lam1.2.yaml"]


def tiny_substitution(recipe: str, run_dir: Path) -> list[str]:
    train = run_dir.parent / "train.jsonl"  # the 8 toy rows that 4 micro-batches of 2 use
    train.write_text("".join((ROOT / "aropd/assets/toy/train.jsonl").read_text().splitlines(keepends=True)[:8]))
    domain = RECIPES[recipe].domain
    suite = [{"name": b, "data_path": str(FIX / f"{b}.jsonl"), "limit": 1} for b in SUITES[domain]]
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(run_dir), "name": "", "version": ""}}
    return [
        "--config", recipe, "--config", "configs/models/tiny-llama.yaml",
        "--trainer.accelerator", "cpu", "--trainer.strategy", "auto", "--trainer.precision", "32-true",
        "--trainer.devices", "1", "--trainer.num_nodes", "1",
        "--trainer.accumulate_grad_batches", "2", "--trainer.limit_train_batches", "4",  # 2 optimizer steps
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(run_dir), "--trainer.logger", json.dumps(logger),
        "--model.init_args.sampling.max_new_tokens", "8", "--model.init_args.val_max_new_tokens", "4",
        "--data.init_args.train", f"[{train}]", "--data.init_args.batch_size", "2",
        "--data.init_args.val_batch_size", "4", "--data.init_args.val_benchmarks", json.dumps(suite),
    ]


def test_smoke_subset_covers_every_method_and_domain():
    assert {RECIPES[p].variant for p in SMOKE} == set(make_recipes.VARIANTS)
    assert sorted(RECIPES[p].domain for p in SMOKE) == sorted(list(make_recipes.DOMAINS) * 2)


@pytest.mark.parametrize("path", sorted(RECIPES), ids=str)
def test_tiny_substitution_resolves_for_every_recipe(path, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    cfg = yaml.safe_load(print_config(*tiny_substitution(path, tmp_path)))
    assert cfg["model"]["init_args"]["student"] == "aropd/assets/tiny-llama"
    assert cfg["trainer"]["strategy"] == "auto" and cfg["trainer"]["precision"] == "32-true"


@pytest.mark.slow
@pytest.mark.parametrize("path", SMOKE, ids=str)
def test_recipe_runs_with_the_tiny_model(path, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    cli = main(["fit", *tiny_substitution(path, run)])
    assert Path(cli.trainer.log_dir).resolve() == run.resolve()
    assert cli.trainer.global_step == 2
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["init_args"]["method"] == make_recipes.VARIANTS[RECIPES[path].variant][0]
    assert saved["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 2e-5
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.ckpt").exists()  # the resumable checkpoint, in the run folder
    results = json.loads((run / "val" / "step_2" / "results.json").read_text())
    assert sorted(results["benchmarks"]) == sorted(SUITES[RECIPES[path].domain])
