#!/usr/bin/env python
"""The CPU method study: Base, SFT, Full OPD, Partial OPD and AR-OPD (λ ∈ {0.6, 0.8, 1.2}) from one
base model, the same step budget and several seeds each; one markdown table.

    python scripts/cpu_study.py [--model aropd/assets/toy-base] [--seeds 0 1 2] [--steps N]
                                [--root runs/cpu_study] [--val-limit 128] [--quick] [--force]
                                [--launch inline|subprocess] [--table-only]

Every run is ``aropd fit --config configs/quickstart.yaml --config configs/methods/<method>.yaml``
with the model, seed, step budget and test-split validation overridden, in
``<root>/<method>/seed<k>/``: the run's log dir (``config.yaml``, TensorBoard events, ``fit.log``,
``val/step_<steps>/results.json``, ``DONE``). Base is ``aropd validate`` of the base model alone
(greedy decoding: one run, ``<root>/base/seed<first>/validate/results.json``). Validation runs once,
after the last step, on the ``toy`` benchmark's *test* split (``--test-data``; the benchmark itself
defaults to the val split). A run whose ``DONE`` exists is skipped (``--force`` reruns it).

The table (``<root>/table.md``) has, per method, mean ± sample std over seeds of:

- **Toy acc**: ``results.json`` ``benchmarks.toy.accuracy`` (percent);
- **Long acc**: accuracy on the longest response-length bucket that is non-empty in *every* run
  (``acc_len_<lo>_<hi>``; the bucket is named in the header), so all rows compare the same bucket;
- **Shortcut /1k**: ``diag/shortcut/events_per_1k`` from the TensorBoard events, averaged over all
  logged steps of the run (the mean over the run, not the last value);
- **Early answer**: ``diag/early_answer_rate``, mean over all logged steps of the run (percent);
- **Priv. shift**: ``train/privileged_shift`` (mean KL(q_F ‖ q_P) per token, nats), mean over the run;
- **Shift @1**: ``train/privileged_shift`` at the first step, where the teacher is still the base
  model: how much the privileged views differ on the base model.

SFT has no rollout and no teacher, Base no training: their diagnostic columns are ``n/a``.
``--quick`` is a smoke test (1 seed, 4 steps, batch 4, 8 test problems, 24-token budgets): it shows the
pipeline works, not which method is better.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = "configs/quickstart.yaml"
TOY_BASE = "aropd/assets/toy-base"
TINY = "aropd/assets/tiny-llama"
TEST_DATA = "aropd/assets/toy/test.jsonl"
LAMBDAS = (0.6, 0.8, 1.2)

SHORTCUT_TAG = "diag/shortcut/events_per_1k"
EARLY_TAG = "diag/early_answer_rate"
SHIFT_TAG = "train/privileged_shift"
BENCH = "toy"


def _load_sweep():
    """scripts/sweep.py (not a package): its run naming, logger and DONE helpers."""
    spec = importlib.util.spec_from_file_location("aropd_sweep", ROOT / "scripts" / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


sweep = _load_sweep()


def default_model() -> str:
    return TOY_BASE if (ROOT / TOY_BASE).is_dir() else TINY


# ---- the methods -----------------------------------------------------------------------------------
@dataclass
class Method:
    name: str          # folder name
    label: str         # table row
    config: str | None  # configs/methods/<x>.yaml (None: Base)
    sets: dict[str, str] = field(default_factory=dict)
    rollout: bool = True  # has a rollout and a teacher (diagnostic columns)

    @property
    def trains(self) -> bool:
        return self.config is not None


def methods() -> list[Method]:
    out = [Method("base", "Base", None, rollout=False),
           Method("sft", "SFT", "configs/methods/sft.yaml", rollout=False),
           Method("full_opd", "Full OPD", "configs/methods/full_opd.yaml"),
           Method("partial_opd", "Partial OPD", "configs/methods/partial_opd.yaml")]
    for lam in LAMBDAS:
        out.append(Method(f"ar_opd_lam{lam}", f"AR-OPD λ={lam}", "configs/methods/ar_opd.yaml",
                          {"model.init_args.lam": str(lam)}))
    return out


@dataclass
class StudyRun:
    method: Method
    seed: int
    dir: Path
    subcommand: str
    args: list[str]
    config_hash: str = ""

    @property
    def name(self) -> str:
        return f"{self.method.name}/seed{self.seed}"

    def results_path(self) -> Path | None:
        """The results.json of the run's final validation."""
        if self.subcommand == "validate":
            p = self.dir / "validate" / "results.json"
            return p if p.is_file() else None
        found = sorted((self.dir / "val").glob("step_*/results.json"),
                       key=lambda p: int(p.parent.name.removeprefix("step_")))
        return found[-1] if found else None


def common_sets(a: argparse.Namespace) -> dict[str, str]:
    # limit always explicit: a missing key would keep the base config's (the quickstart's 64)
    bench = {"name": BENCH, "data_path": a.test_data, "limit": a.val_limit or None}
    s = {
        "model.init_args.student": a.model,
        "data.init_args.val_benchmarks": json.dumps([bench]),
        "trainer.max_steps": str(a.steps),
        "trainer.val_check_interval": str(a.steps),   # validate once, after the last step
        "trainer.enable_checkpointing": "false",
        "trainer.log_every_n_steps": "1",             # every step in the events: the run means use them all
    }
    if a.max_new_tokens:
        s["model.init_args.sampling.max_new_tokens"] = str(a.max_new_tokens)
    # No cap by default: the toy benchmark's own budget (1024 tokens) lets the 90-step problems finish.
    s["model.init_args.val_max_new_tokens"] = str(a.val_max_new_tokens) if a.val_max_new_tokens else "null"
    if a.batch_size:
        s["data.init_args.batch_size"] = str(a.batch_size)
    return s


def plan(a: argparse.Namespace) -> list[StudyRun]:
    root = Path(a.root)
    runs = []
    for m in methods():
        if m.name not in a.methods:
            continue
        seeds = a.seeds if m.trains else a.seeds[:1]  # Base: greedy validation, the seed changes nothing
        for seed in seeds:
            d = root / m.name / f"seed{seed}"
            # seed_everything alone does not reach the rollout streams or the data order: set all three
            sets = {**common_sets(a), **m.sets, "seed_everything": str(seed)}
            if m.trains:
                sets.update({"model.init_args.seed": str(seed), "data.init_args.seed": str(seed)})
            configs = [a.base_config] + ([m.config] if m.config else [])
            args = sweep.fit_args(configs, sets, {}, d)[:-2]  # no `--ckpt_path last`: short runs, no checkpoints
            runs.append(StudyRun(m, seed, d, "fit" if m.trains else "validate", args))
    return runs


def config_hash(run: StudyRun) -> str:
    import io

    from aropd.cli import main as cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cli_main([run.subcommand, *run.args, "--print_config"])
        except SystemExit as e:
            if e.code not in (0, None):
                raise RuntimeError(f"{run.name}: the config does not parse: aropd {run.subcommand} "
                                   f"{shlex.join(run.args)}") from None
    return sweep.config_hash(out.getvalue())


def is_done(run: StudyRun) -> bool:
    done = sweep.read_json(run.dir / "DONE")
    return bool(done) and done.get("config_hash") == run.config_hash and run.results_path() is not None


def launch(run: StudyRun, how: str) -> int:
    run.dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "aropd", run.subcommand, *run.args]
    (run.dir / "run.json").write_text(json.dumps(
        {"method": run.method.name, "seed": run.seed, "command": command, "config_hash": run.config_hash},
        indent=2) + "\n")
    if how == "subprocess":
        with open(run.dir / "fit.log", "ab") as log:
            return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    from aropd.cli import main as cli_main

    with open(run.dir / "fit.log", "a", encoding="utf-8", buffering=1) as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
        # LightningCLI notes that this process's own sys.argv (the study's flags) is not what it parses
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter")
        try:
            cli_main([run.subcommand, *run.args])
        except SystemExit as e:
            return int(e.code or 0)
        except Exception:
            traceback.print_exc()
            return 1
    return 0


# ---- reading the runs --------------------------------------------------------------------------------
def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the run's TensorBoard events: ``{tag: [(step, value), ...]}`` in step order."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, float(e.value)) for e in acc.Scalars(tag))
    return {t: sorted(v, key=lambda sv: sv[0]) for t, v in out.items()}


def run_values(run: StudyRun, bucket: str | None) -> dict[str, float | None]:
    """The table's numbers of one run (fractions, not percent)."""
    res = json.loads(run.results_path().read_text())  # type: ignore[union-attr]
    toy = res["benchmarks"][BENCH]
    out: dict[str, float | None] = {"acc": toy["accuracy"], "long_acc": toy.get(f"acc_{bucket}") if bucket else None}
    tb = scalars(run.dir) if run.method.rollout else {}
    mean = lambda tag: statistics.fmean(v for _, v in tb[tag]) if tb.get(tag) else None  # noqa: E731
    out["shortcut"] = mean(SHORTCUT_TAG)
    out["early"] = mean(EARLY_TAG)
    out["shift"] = mean(SHIFT_TAG)
    out["shift_first"] = tb[SHIFT_TAG][0][1] if tb.get(SHIFT_TAG) else None
    return out


def longest_common_bucket(runs: list[StudyRun]) -> str | None:
    """The longest length bucket with at least one response in every run."""
    from aropd.buckets import bucket_names

    names = bucket_names("len")
    counts = [json.loads(r.results_path().read_text())["benchmarks"][BENCH] for r in runs]  # type: ignore[union-attr]
    for name in reversed(names):
        if all((c.get(f"count_{name}") or 0) > 0 for c in counts):
            return name
    return None


def mean_std(values: list[float | None], scale: float, fmt: str) -> str:
    """``mean ± std`` (sample std; 0 for one value) of the non-missing values, or ``n/a``."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "n/a"
    m = statistics.fmean(vals) * scale
    s = statistics.stdev(vals) * scale if len(vals) > 1 else 0.0
    return f"{m:{fmt}} ± {s:{fmt}}"


COLUMNS = [  # key, header, scale, format
    ("acc", "Toy acc (%)", 100.0, ".1f"),
    ("long_acc", "Long acc (%) [{bucket}]", 100.0, ".1f"),
    ("shortcut", "Shortcut /1k tok", 1.0, ".2f"),
    ("early", "Early answer (%)", 100.0, ".1f"),
    ("shift", "Priv. shift (nats)", 1.0, ".3g"),
    ("shift_first", "Shift @step 1 (nats)", 1.0, ".3g"),
]


def make_table(runs: list[StudyRun], a: argparse.Namespace) -> str:
    finished = [r for r in runs if r.results_path() is not None]
    bucket = longest_common_bucket(finished) if finished else None
    header = ["Method", "Seeds"] + [h.format(bucket=(bucket or "none").removeprefix("len_").replace("_", "–"))
                                    for _, h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---", "---:"] + ["---:"] * len(COLUMNS)) + "|"]
    for m in methods():
        mine = [r for r in finished if r.method.name == m.name]
        if not mine:
            continue
        vals = [run_values(r, bucket) for r in mine]
        cells = [m.label, ",".join(str(r.seed) for r in mine)]
        for key, _, scale, fmt in COLUMNS:
            if key not in ("acc", "long_acc") and not m.rollout:
                cells.append("n/a")
            else:
                cells.append(mean_std([v[key] for v in vals], scale, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Model `{a.model}`; {a.steps} steps; seeds {' '.join(map(str, a.seeds))}; "
        f"`{BENCH}` test split `{a.test_data}`" + (f" (first {a.val_limit})" if a.val_limit else "") + ".",
        "Mean ± sample std over seeds (± 0.0: one run). Shortcut, early answer and privileged shift are "
        "means over all logged training steps; Shift @step 1 is the first step (teacher = base model). "
        "Base: one greedy validation, no training; SFT: no rollout or teacher, so n/a.",
    ]
    return "\n".join(lines + notes) + "\n"


# ---- main -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cpu_study.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    ap.add_argument("--model", default=None, help=f"base model folder (default: {TOY_BASE} if present, else {TINY})")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2; --quick: 0)")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps per run (default: the base config's trainer.max_steps; --quick: 4)")
    ap.add_argument("--root", default="runs/cpu_study", help="output folder (default: runs/cpu_study)")
    ap.add_argument("--base-config", default=QUICKSTART, help=f"base config (default: {QUICKSTART})")
    ap.add_argument("--test-data", default=TEST_DATA, help=f"toy test split (default: {TEST_DATA})")
    ap.add_argument("--val-limit", type=int, default=None, help="test problems (default: all; --quick: 8)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="rollout budget (default: the config's; --quick: 24)")
    ap.add_argument("--val-max-new-tokens", type=int, default=None, help="validation budget (default: the toy benchmark's, 1024; --quick: 24)")
    ap.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the config's; --quick: 4)")
    ap.add_argument("--methods", nargs="+", default=[m.name for m in methods()],
                    choices=[m.name for m in methods()], help="subset of methods (default: all)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 4 steps, small budgets (< 3 min)")
    ap.add_argument("--launch", choices=("inline", "subprocess"), default="inline",
                    help="runs in this process one after another (default) or each in its own process")
    ap.add_argument("--force", action="store_true", help="rerun finished runs")
    ap.add_argument("--table-only", action="store_true", help="only (re)write the table from finished runs")
    return ap


def config_steps(config: str) -> int:
    import yaml

    path = Path(config) if Path(config).is_file() else ROOT / config
    steps = ((yaml.safe_load(path.read_text()) or {}).get("trainer") or {}).get("max_steps")
    if not isinstance(steps, int) or steps <= 0:
        raise SystemExit(f"cpu_study.py: error: {config} sets no trainer.max_steps; pass --steps")
    return steps


def apply_defaults(a: argparse.Namespace) -> argparse.Namespace:
    quick = a.quick
    a.model = a.model or default_model()
    a.seeds = a.seeds or ([0] if quick else [0, 1, 2])
    a.steps = a.steps or (4 if quick else config_steps(a.base_config))
    if quick:
        a.val_limit = a.val_limit or 8
        a.max_new_tokens = a.max_new_tokens or 24
        a.val_max_new_tokens = a.val_max_new_tokens or 24
        a.batch_size = a.batch_size or 4
    return a


def main(argv: list[str] | None = None) -> int:
    a = apply_defaults(build_parser().parse_args(argv))
    root = Path(a.root)
    runs = plan(a)
    for r in runs:
        r.config_hash = config_hash(r)
    failed = []
    if not a.table_only:
        print(f"cpu_study: {len(runs)} run(s) in {root}/ (model {a.model}, {a.steps} steps, seeds {a.seeds})",
              flush=True)
        t0 = time.time()
        for i, r in enumerate(runs, 1):
            tag = f"[{i}/{len(runs)}] {r.name}"
            if is_done(r) and not a.force:
                print(f"{tag}: finished, skipped", flush=True)
                continue
            # A fresh folder: a stale run's TensorBoard events would mix into this run's means.
            shutil.rmtree(r.dir, ignore_errors=True)
            start = time.time()
            rc = launch(r, a.launch)
            seconds = round(time.time() - start, 1)
            if rc != 0 or r.results_path() is None:
                failed.append(r.name)
                tail = (r.dir / "fit.log").read_text(errors="replace").splitlines()[-15:]
                print(f"{tag}: FAILED (exit {rc}) after {seconds}s; last lines of {r.dir / 'fit.log'}:\n    "
                      + "\n    ".join(tail), file=sys.stderr, flush=True)
                continue
            (r.dir / "DONE").write_text(json.dumps({"config_hash": r.config_hash, "seconds": seconds}) + "\n")
            print(f"{tag}: finished in {seconds}s", flush=True)
        print(f"cpu_study: runs took {time.time() - t0:.0f}s", flush=True)
    if not any(r.results_path() is not None for r in runs):
        print("cpu_study: no finished run; no table", file=sys.stderr)
        return 1
    table = make_table(runs, a)
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(table)
    print(f"cpu_study: table in {root / 'table.md'}:\n{table}", end="")
    if failed:
        print(f"cpu_study: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
