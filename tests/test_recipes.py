"""Launch commands as written: every ``aropd fit|validate`` command in a config's header comment and in
the docs' code blocks resolves, to the settings that matter; the paper's recipes (one per domain, the
method composed on top) carry the original runs' settings; and a recipe runs on CPU with the tiny model."""

import contextlib
import functools
import io
import json
import re
import shlex
import warnings
from pathlib import Path

import pytest
import yaml

from aropd.cli import main
from aropd.experiments.sweep import Sweep, plan, split_values

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "benchmarks"
DOMAINS = ("math", "code", "medical")
SUITES = {"math": ["math500", "amc23", "aime24"], "code": ["humaneval_plus", "mbpp_plus"],
          "medical": ["medqa", "medmcqa", "mmlu_medical"]}
OPD = "aropd.module.PrivilegedDistillation"
SFT = "aropd.sft.SupervisedFineTuning"
TARGETS = {"ar_opd": "aropd.targets.AnchoredResidual", "full_opd": "aropd.targets.FullView",
           "partial_opd": "aropd.targets.PartialView"}
METHODS = ("sft", *TARGETS)
# The privilege controls set only which trace the teacher sees; the target is the method config's before them.
CONTROLS = {"no_trace": "none", "shuffled_trace": "shuffled"}
LAM = "--model.init_args.target.init_args.lam"


# ---- finding the commands -----------------------------------------------------------------------
def joined(lines: list[str]) -> list[str]:
    """Lines with their ``\\`` continuations joined."""
    out, cur = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
        else:
            out.append(cur + line)
            cur = ""
    return out


def launches(lines: list[str], program: str = r"aropd (fit|validate)") -> list[list[str]]:
    """The argument lists of the lines that start with ``program`` (shell comments dropped). Lines with
    shell expansions (``$domain`` in a loop) or an elided part (an argument ``...``) are left out: they
    are not commands as written."""
    out = []
    for line in joined(lines):
        text = line.strip()
        if re.match(program + r"\b", text) and "$" not in text:
            argv = shlex.split(text, comments=True)
            if not {"...", "…"} & set(argv):
                out.append(argv)
    return out


def header(path: Path) -> list[str]:
    """A config's leading comment block, ``#`` and one space stripped."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return lines


def code_blocks(path: Path) -> list[str]:
    lines, inside = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return lines


CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml"))
HEADER_COMMANDS = [(f"{p}:{i}", argv) for p in CONFIGS for i, argv in enumerate(launches(header(ROOT / p)))]
DOCS = [Path("README.md"), *sorted(p.relative_to(ROOT) for p in (ROOT / "docs").glob("*.md"))]
DOC_COMMANDS = [(f"{p}:{i}", argv) for p in DOCS for i, argv in enumerate(launches(code_blocks(ROOT / p)))]


# ---- resolving ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _resolve(argv: tuple[str, ...]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter")  # pytest's own sys.argv
        main([*argv, "--print_config"])
    assert e.value.code == 0, argv
    return out.getvalue()


def resolve(argv: list[str]) -> dict:
    """``aropd <argv> --print_config`` from the repository root, as a mapping (cached per command)."""
    assert argv[0] == "aropd", argv
    return yaml.safe_load(_resolve(tuple(argv[1:])))


def flag(argv: list[str], name: str) -> str | None:
    """The value of the last ``name VALUE`` in ``argv``."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values[-1] if values else None


def configs_of(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]


def overrides(argv: list[str]) -> dict[str, object]:
    """``--dotted.key VALUE`` flags, their values parsed as YAML as the CLI does."""
    return {a[2:]: yaml.safe_load(argv[i + 1]) for i, a in enumerate(argv[:-1])
            if a.startswith("--") and a not in ("--config", "--print_config") and "+=" not in a}


def get(cfg: dict, dotted: str) -> object:
    for key in dotted.split("."):
        cfg = cfg[key]
    return cfg


def same(resolved: object, expected: object) -> bool:
    # The CLI keeps some values as written (trainer.devices "8") and expands a class name to its
    # {class_path: ...}; compare what they denote.
    if isinstance(resolved, dict) and isinstance(expected, str):
        resolved = resolved.get("class_path")
    norm = lambda v: yaml.safe_load(v) if isinstance(v, str) else v  # noqa: E731
    return norm(resolved) == norm(expected)


# The original runs' settings (the AR-OPD paper), written out here independently of the configs.
PAPER = {
    "seed_everything": 0, "model.init_args.seed": None, "data.init_args.seed": None,  # both follow seed_everything
    "model.init_args.student": "Qwen/Qwen2.5-7B-Instruct",  # data.init_args.tokenizer is linked to it
    "model.init_args.optimizer.class_path": "torch.optim.AdamW",
    "model.init_args.optimizer.init_args.lr": 2e-5, "model.init_args.optimizer.init_args.weight_decay": 0.0,
    "model.init_args.scheduler.class_path": "aropd.schedules.WarmupCosine",
    "model.init_args.scheduler.init_args.warmup_ratio": 0.1, "model.init_args.scheduler.init_args.min_lr_ratio": 0.0,
    "trainer.gradient_clip_val": 1.0, "trainer.gradient_clip_algorithm": "norm",
    # bf16 compute through FSDP2's mixed-precision policy; fp32 master weights (and EMA teacher).
    "trainer.strategy.class_path": "aropd.sharding.FSDP2Strategy", "trainer.strategy.init_args.mixed_precision": "bf16",
    "trainer.precision": "32-true", "model.init_args.dtype": "float32",
    "model.init_args.gradient_checkpointing": True, "model.init_args.loss_chunk_size": 256,
    "model.init_args.max_new_tokens": 1024,  # the one completion budget; data.init_args.max_new_tokens is linked
    "data.init_args.max_prompt_tokens": 1024, "data.init_args.max_teacher_tokens": 2304,
    "data.init_args.partial_ratio": 0.5,
    # 256 rollouts per optimizer step: 2 nodes x 8 GPUs x micro-batch 1 (one rollout per prompt) x 16.
    "trainer.num_nodes": 2, "trainer.devices": 8, "data.init_args.batch_size": 1, "trainer.accumulate_grad_batches": 16,
    "trainer.max_epochs": 1, "trainer.max_steps": -1, "trainer.check_val_every_n_epoch": 1,
}
PAPER_OPD = {
    "model.init_args.teacher.class_path": "aropd.teachers.EMATeacher", "model.init_args.teacher.init_args.alpha": 0.01,
    "model.init_args.divergence": "forward_kl", "model.init_args.skip_tokens": 0,
    "model.init_args.sampling.temperature": 1.0, "model.init_args.sampling.top_p": 1.0,
    "model.init_args.sampling.top_k": 0,
}


def expected_settings(argv: list[str]) -> dict[str, object]:
    """What a command promises: the recipe's paper settings and its method's target, then its own flags."""
    configs = configs_of(argv)
    stems = [Path(c).stem for c in configs if c.startswith("configs/methods/")]
    methods = [m for m in stems if m not in CONTROLS]
    recipes = [Path(c).stem for c in configs if c.startswith("configs/recipes/")]
    method = methods[-1] if methods else None
    out: dict[str, object] = {}
    for control in (m for m in stems if m in CONTROLS):
        out["data.init_args.teacher_trace"] = CONTROLS[control]
    if recipes:
        out.update(PAPER, **({} if method == "sft" else PAPER_OPD))
        out["data.init_args.train"] = [f"data/{recipes[-1]}/train.jsonl"]
    if method == "sft":
        out["model.class_path"] = SFT
    elif method is not None:
        out["model.class_path"] = OPD
        out["model.init_args.target.class_path"] = TARGETS[method]
    if method == "ar_opd":  # the paper's λ and c unless the command overrides them
        out.update({"model.init_args.target.init_args.lam": 0.8, "model.init_args.target.init_args.clip": 5.0})
    if "configs/models/tiny-llama.yaml" in configs:
        out["model.init_args.student"] = "aropd/assets/tiny-llama"
    for c in configs:  # a variant composed after the recipe (configs/peft/) changes what it sets, as a flag would
        if c.startswith("configs/peft/"):
            for key in flat_keys(yaml.safe_load((ROOT / c).read_text())):
                out = {k: v for k, v in out.items() if k != key and not k.startswith(key + ".")}
    for key, value in overrides(argv).items():
        out = {k: v for k, v in out.items() if k != key and not k.startswith(key + ".")}  # --trainer.strategy auto
        if not isinstance(value, (list, dict)):  # a given list or mapping gains its defaults when resolved
            out[key] = value
    return out


def flat_keys(cfg: dict, prefix: str = "") -> list[str]:
    """The dotted keys of a config's leaves (a mapping's leaves; a list or scalar is one leaf)."""
    out = []
    for k, v in cfg.items():
        out += flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def check_command(argv: list[str]) -> dict:
    """Resolve one launch command and check what its configs and its own flags promise."""
    cfg = resolve(argv)
    for key, value in expected_settings(argv).items():
        assert same(get(cfg, key), value), (key, get(cfg, key), value)
    init = cfg["model"]["init_args"]
    if cfg["model"]["class_path"] == SFT:  # no distillation options left over from the configs before it
        assert not {"target", "teacher", "sampling"} & set(init)
    recipes = [Path(c).stem for c in configs_of(argv) if c.startswith("configs/recipes/")]
    if recipes and "--data.init_args.val_benchmarks" not in argv:
        assert [b["name"] for b in cfg["data"]["init_args"]["val_benchmarks"]] == SUITES[recipes[-1]]
    if recipes and "--trainer.callbacks" not in argv:
        callbacks = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in cfg["trainer"]["callbacks"]}
        assert callbacks["ResumableCheckpoint"]["every_n_train_steps"] == 10
        assert {"SupportMismatch", "ShortcutEvents", "TeacherReliability", "LongRolloutAccuracy"} <= set(callbacks)
    return cfg


def check_paper_settings(cfg: dict, domain: str, method: str) -> None:
    expected = {**PAPER, **({} if method == "sft" else PAPER_OPD), "data.init_args.train": [f"data/{domain}/train.jsonl"]}
    for key, value in expected.items():
        assert same(get(cfg, key), value), (key, get(cfg, key), value)
    assert [b["name"] for b in cfg["data"]["init_args"]["val_benchmarks"]] == SUITES[domain]


# ---- the tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("where, argv", HEADER_COMMANDS, ids=[w for w, _ in HEADER_COMMANDS])
def test_config_header_command_resolves(where, argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    check_command(argv)


@pytest.mark.parametrize("where, argv", DOC_COMMANDS, ids=[w for w, _ in DOC_COMMANDS])
def test_docs_command_resolves(where, argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    check_command(argv)


def test_there_is_one_recipe_per_domain():
    assert sorted(p.name for p in (ROOT / "configs" / "recipes").iterdir()) == sorted(f"{d}.yaml" for d in DOMAINS)
    assert len(DOC_COMMANDS) >= 3  # the docs' commands were found (README and docs/ have some)


@pytest.mark.parametrize("domain", DOMAINS)
def test_recipe_header_launches_every_method_into_its_own_folder(domain, monkeypatch):
    """Every method composed on the recipe, each run in runs/paper/<domain>/<method>, plus a λ variant."""
    monkeypatch.chdir(ROOT)
    path = f"configs/recipes/{domain}.yaml"
    commands = launches(header(ROOT / path))
    runs = {}
    for argv in commands:
        assert configs_of(argv)[0] == path and flag(argv, "--ckpt_path") == "last"  # reruns resume
        runs[flag(argv, "--trainer.default_root_dir")] = argv
    assert {f"runs/paper/{domain}/{m}" for m in METHODS} <= set(runs)
    for m in METHODS:
        cfg = check_command(runs[f"runs/paper/{domain}/{m}"])
        assert cfg["trainer"]["default_root_dir"] == f"runs/paper/{domain}/{m}"
    variants = [a for a in commands if flag(a, LAM) is not None]
    assert variants and all(check_command(a)["model"]["init_args"]["target"]["init_args"]["lam"] != 0.8
                            for a in variants)


@pytest.mark.parametrize("domain", DOMAINS)
def test_recipe_header_sweep_gives_the_other_lambdas(domain, monkeypatch, tmp_path):
    """The header's sweep command, resolved run by run: λ 0.6 and 1.2 in runs/paper/<domain>/lam=<λ>."""
    monkeypatch.chdir(ROOT)
    (argv,) = launches(header(ROOT / f"configs/recipes/{domain}.yaml"), r"python scripts/sweep\.py")
    assert flag(argv, "--name") == f"paper/{domain}"
    key, values = flag(argv, "--grid").split("=", 1)
    grid = Sweep(name=flag(argv, "--name"), configs=configs_of(argv), grid={key: split_values(values)})
    runs = plan(grid)
    assert [r.dir for r in runs] == [Path(f"runs/paper/{domain}/lam={lam}") for lam in ("0.6", "1.2")]
    for run, lam in zip(runs, (0.6, 1.2)):
        init = run.resolved["model"]["init_args"]
        assert init["target"] == {"class_path": TARGETS["ar_opd"], "init_args": {"lam": lam, "clip": 5.0}}
        assert run.resolved["trainer"]["default_root_dir"] == str(run.dir)
        check_paper_settings(run.resolved, domain, "ar_opd")


def tiny_substitution(domain: str, method: str, run_dir: Path, *extra: str) -> list[str]:
    train = run_dir.parent / "train.jsonl"  # the 8 toy rows that 4 micro-batches of 2 use
    train.write_text("".join((ROOT / "aropd/assets/toy/train.jsonl").read_text().splitlines(keepends=True)[:8]))
    suite = [{"name": b, "data_path": str(FIX / f"{b}.jsonl"), "limit": 1} for b in SUITES[domain]]
    return [
        "fit", "--config", f"configs/recipes/{domain}.yaml", "--config", f"configs/methods/{method}.yaml",
        "--config", "configs/models/tiny-llama.yaml",
        "--trainer.accelerator", "cpu", "--trainer.strategy", "auto", "--trainer.devices", "1", "--trainer.num_nodes", "1",
        "--trainer.accumulate_grad_batches", "2", "--trainer.limit_train_batches", "4",  # 2 optimizer steps
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(run_dir),
        "--model.init_args.max_new_tokens", "8", "--model.init_args.val_max_new_tokens", "4",
        "--data.init_args.train", f"[{train}]", "--data.init_args.batch_size", "2",
        "--data.init_args.val_batch_size", "4", "--data.init_args.val_benchmarks", json.dumps(suite), *extra,
    ]


# One run per method, the domains rotated: after the tiny model, CPU and toy training data are
# substituted, recipes differ only in their domain's benchmarks, so these cover every method and
# every domain's graders; the other combinations are resolved above.
SMOKE = [("math", "sft", ()), ("code", "full_opd", ()), ("medical", "partial_opd", ()),
         ("math", "ar_opd", (LAM, "1.2"))]


@pytest.mark.slow
@pytest.mark.parametrize("domain, method, extra", SMOKE, ids=[f"{d}-{m}" for d, m, _ in SMOKE])
def test_recipe_runs_with_the_tiny_model(domain, method, extra, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    cli = main(tiny_substitution(domain, method, run, *extra))
    assert cli.trainer.global_step == 2
    # Everything below the run folder that the command names: checkpoints, then the log dir.
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir.resolve() == (run / "lightning_logs" / "version_0").resolve()
    assert (run / "checkpoints" / "last.ckpt").exists()  # the resumable checkpoint
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    if method == "sft":
        assert saved["model"]["class_path"] == SFT
    else:
        target = saved["model"]["init_args"]["target"]
        assert target["class_path"] == TARGETS[method]
        if method == "ar_opd":
            assert target["init_args"] == {"lam": 1.2, "clip": 5.0}
    assert saved["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 2e-5
    assert list(log_dir.glob("events.out.tfevents.*"))
    results = json.loads((log_dir / "val" / "step_2" / "results.json").read_text())
    assert sorted(results["benchmarks"]) == sorted(SUITES[domain])
