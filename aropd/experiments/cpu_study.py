"""The CPU method study: Base, SFT, Full OPD, Partial OPD, AR-OPD (λ ∈ {0.6, 0.8, 1.2}) and the two
privilege controls (AR-OPD λ=0.8 with no trace or a shuffled one) from one base model, the same step
budget and several seeds each; one markdown table and the paired per-problem comparisons under it.

Every run is ``aropd fit --config configs/quickstart.yaml --config configs/methods/<method>.yaml``
(the controls add ``configs/methods/no_trace.yaml`` or ``shuffled_trace.yaml``)
with the model, seed, step budget and test-split validation overridden, in
``<root>/<method>/seed<k>/``: the run's log dir (``config.yaml``, TensorBoard events, ``fit.log``,
``val/step_<steps>/results.json``, ``DONE``). Base is ``aropd validate`` of the base model alone
(greedy decoding: one run, ``<root>/base/seed<first>/validate/results.json``). Validation runs once,
after the last step, on the ``toy`` benchmark's *test* split (the benchmark itself defaults to the
val split). A run finished under the same resolved config is skipped; any other starts afresh in an
emptied folder, since a stale run's TensorBoard events would mix into the new run's means.

The table (``<root>/table.md``) has, per method, mean ± sample std over seeds of:

- **Toy acc**: ``results.json`` ``benchmarks.toy.accuracy`` (percent);
- **Long acc**: accuracy on the longest response-length bucket that is non-empty in *every* run
  (``acc_len_<lo>_<hi>``; the bucket is named in the header), so all rows compare the same bucket;
- **Long n**: responses in that bucket per run (``count_len_<lo>_<hi>``), so a reader sees what the
  long accuracy rests on;
- **Shortcut /1k**: ``diag/shortcut/events_per_1k`` from the TensorBoard events, averaged over all
  logged steps of the run (the mean over the run, not the last value);
- **Target p @shortcut**: ``diag/shortcut/target_prob``, the target's probability of the sampled
  token on shortcut events (how much hindsight the target passes on), mean over the steps that had
  events;
- **Early answer**: ``diag/early_answer_rate``, mean over all logged steps of the run (percent). The
  note under the table gives the task's chance rate: the same test on the test split's own reference
  solutions, which reach their answers honestly (:func:`early_answer_chance`);
- **Priv. shift**: ``diag/privileged_shift`` (mean KL(q_F ‖ q_P) per token, nats; written by the
  TeacherReliability callback every step), mean over the run;
- **Shift @1**: ``diag/privileged_shift`` at the first step, where the teacher is still the base
  model: how much the privileged views differ on the base model.

- **Non-seq. steps**: the share of a final validation response's written steps that do not follow
  from the response's own earlier steps (``aropd.toy.check_steps``), averaged over the responses
  (percent; :func:`step_rates`): the student's slips, and also what a target that endorses the
  reference's values after a slip teaches;
- **Rejoins**: the same for the non-sequiturs that land back on the correct chain after the response
  has left it (percent): the hindsight shortcut itself, in the student's output.

SFT has no rollout and no teacher, Base no training: their diagnostic columns are ``n/a`` (the
last two come from the validation responses, so every row has them).

A second table gives the support gap (``diag/support_gap/pos_<lo>_<hi>``: full-view minus
partial-view support mismatch) per completion-position bucket, mean over the run and over seeds.

Under them, for each pair of :data:`PAIRS` (A, B) with finished runs, a paired comparison on the
test problems (``aropd.experiments.tables.paired_comparison``): each problem's score is its mean
over a method's seeds (from the runs' ``toy.jsonl`` rows), Δ is the difference of accuracies ± its
paired standard error over problems, and p the exact sign test on the problems each did better on.
When the long-acc bucket is not the first, the same again on the problems whose reference solution
is that long (:func:`long_problems`): the long-rollout comparison with a paired error bar.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from aropd.experiments import runs
from aropd.experiments.tables import Paired, markdown, paired_comparison, paired_table, per_problem

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = "configs/quickstart.yaml"
TOY_BASE = "aropd/assets/toy-base"
TINY = "aropd/assets/tiny-llama"
TEST_DATA = "aropd/assets/toy/test.jsonl"
LAMBDAS = (0.6, 0.8, 1.2)
# λ = 1 is the full view's own log-probs except where the clip bites (unclipped it is Full OPD, whose
# row is there), so these rows isolate what the clip does.
CLIPS = (1.0, 2.0, 5.0)
BENCH = "toy"
SHORTCUT_TAG = "diag/shortcut/events_per_1k"
EARLY_TAG = "diag/early_answer_rate"
SHIFT_TAG = "diag/privileged_shift"
TARGET_PROB_TAG = "diag/shortcut/target_prob"
GAP_PREFIX = "diag/support_gap/pos_"


def default_model() -> str:
    return TOY_BASE if (ROOT / TOY_BASE).is_dir() else TINY


# ---- the methods -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    name: str
    """Folder name."""
    label: str
    """Table row."""
    configs: tuple[str, ...]
    """``configs/methods/<x>.yaml`` composed in order onto the base config; empty: Base (validation
    of the base model, no training)."""
    sets: dict[str, str] = field(default_factory=dict)
    """The method's own overrides (λ)."""
    rollout: bool = True
    """Has a rollout and a teacher (the diagnostic columns)."""

    @property
    def trains(self) -> bool:
        return bool(self.configs)


CONTROL_LAM = 0.8  # the privilege controls keep AR-OPD's target at the paper's λ, so they pair with that row


def methods() -> list[Method]:
    m = "configs/methods/"
    out = [Method("base", "Base", (), rollout=False),
           Method("sft", "SFT", (m + "sft.yaml",), rollout=False),
           Method("full_opd", "Full OPD", (m + "full_opd.yaml",)),
           Method("partial_opd", "Partial OPD", (m + "partial_opd.yaml",))]
    for lam in LAMBDAS:
        out.append(Method(f"ar_opd_lam{lam}", f"AR-OPD λ={lam}", (m + "ar_opd.yaml",),
                          {"model.init_args.target.init_args.lam": str(lam)}))
    for clip in CLIPS:
        out.append(Method(f"ar_opd_lam1_clip{clip:g}", f"AR-OPD λ=1, c={clip:g}", (m + "ar_opd.yaml",),
                          {"model.init_args.target.init_args.lam": "1.0",
                           "model.init_args.target.init_args.clip": str(clip)}))
    # The privilege controls (docs/method.md): AR-OPD λ=0.8 whose teacher sees no trace (plain
    # self-distillation) or another problem's trace. An AR-OPD gain that survives them is not hindsight.
    lam = {"model.init_args.target.init_args.lam": str(CONTROL_LAM)}
    out += [Method("no_trace", "No trace (control)", (m + "ar_opd.yaml", m + "no_trace.yaml"), lam),
            Method("shuffled_trace", "Shuffled trace (control)", (m + "ar_opd.yaml", m + "shuffled_trace.yaml"), lam)]
    return out


# The paired per-problem comparisons under the table (A, B): what the method claims (AR-OPD against
# Full and Partial OPD), the anchor against the full view, and the controls against what they control.
PAIRS = [(f"ar_opd_lam{CONTROL_LAM}", "full_opd"), (f"ar_opd_lam{CONTROL_LAM}", "partial_opd"),
         ("partial_opd", "full_opd"), (f"ar_opd_lam{CONTROL_LAM}", "no_trace"),
         (f"ar_opd_lam{CONTROL_LAM}", "shuffled_trace"), ("full_opd", "no_trace")]


METHOD_NAMES = [m.name for m in methods()]


# ---- the study --------------------------------------------------------------------------------------
@dataclass
class Study:
    """What the study runs. None fields take their defaults from :meth:`resolved`."""

    model: str | None = None
    """Base model folder; None: ``aropd/assets/toy-base`` if present, else the tiny Llama."""
    seeds: list[int] | None = None
    """Seeds of every trained method; None: 0 1 2 (quick: 0)."""
    steps: int | None = None
    """Optimizer steps per run; None: the base config's ``trainer.max_steps`` (quick: 4)."""
    root: Path = Path("runs/cpu_study")
    """Output folder."""
    base_config: str = QUICKSTART
    """The config every run composes its method onto."""
    test_data: str = TEST_DATA
    """The toy test split validated on."""
    val_limit: int | None = None
    """Test problems; None: all (quick: 8)."""
    max_new_tokens: int | None = None
    """Completion budget; None: the config's (quick: 24)."""
    val_max_new_tokens: int | None = None
    """Validation budget; None: the toy benchmark's, 1024, so the 90-step problems finish (quick: 24)."""
    batch_size: int | None = None
    """Training batch size; None: the config's (quick: 4)."""
    lr: float = 1e-5
    """Peak learning rate of every run: the study's own, so that a change to the base config's (the
    quickstart's, tuned for its 20 steps) does not change the study."""
    test_size: int | None = None
    """Validate on this many toy problems drawn as the committed test split is, none of them in the
    committed splits or the base model's pretraining (:func:`large_test_split`), written to
    ``<root>/toy_test<n>.jsonl``, instead of ``test_data``; None: ``test_data``."""
    methods: list[str] = field(default_factory=lambda: list(METHOD_NAMES))
    """The methods run and tabulated."""
    subprocess: bool = False
    """Each run in its own process rather than one after another in this one."""

    def resolved(self, quick: bool = False) -> Study:
        """The defaults filled in; ``quick`` is a smoke test (1 seed, 4 steps, batch 4, 8 test problems,
        24-token budgets): it shows the pipeline works, not which method is better."""
        s = replace(self, model=self.model or default_model(), seeds=self.seeds or ([0] if quick else [0, 1, 2]),
                    steps=self.steps or (4 if quick else config_steps(self.base_config)))
        if s.test_size is not None:
            if s.test_size < 1:
                raise runs.ExperimentError(f"test_size must be >= 1, got {s.test_size}")
            if s.test_data != TEST_DATA:
                raise runs.ExperimentError(f"test_size ({s.test_size}) and test_data ({s.test_data}) both name the test split")
            s = replace(s, test_data=str(Path(s.root) / f"toy_test{s.test_size}.jsonl"))
        if quick:
            s = replace(s, val_limit=s.val_limit or 8, max_new_tokens=s.max_new_tokens or 24,
                        val_max_new_tokens=s.val_max_new_tokens or 24, batch_size=s.batch_size or 4)
        return s


def large_test_split(n: int, path: Path, model: str, seed: int = 1) -> Path:
    """Write ``n`` toy problems to ``path``, drawn as the committed test split is (``aropd.toy.EVAL_SPLIT``:
    2-8 steps, one in eight with 20-90), none of them in the committed splits nor, when ``model`` has a
    ``pretrain.json``, among the problems its pretraining can have drawn (``seen_questions``).

    Deterministic for ``(n, seed, model)``, so a rerun of the study scores the same problems. The
    committed 128-problem split has a binomial standard error of about ±4 points; 1,000 problems
    bring it to about ±1.5, and paired comparisons lower it further.
    """
    from aropd.experiments.pretrain import seen_questions
    from aropd.io import atomic_write_text
    from aropd.paths import resolve
    from aropd.toy import EVAL_SPLIT, make_split, read_split

    committed = Path(resolve("aropd/assets/toy"))
    exclude = {r["question"] for split in ("train", "val", "test") for r in read_split(committed / f"{split}.jsonl")}
    report = Path(resolve(model)) / "pretrain.json"
    if report.is_file():
        exclude |= seen_questions(json.loads(report.read_text()))
    rows = make_split(n, seed, exclude=exclude, **EVAL_SPLIT)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    # Chunks of one study run side by side: one may be validating on the file another would rewrite,
    # so the same split is left alone and a new one replaces the file whole.
    if path.is_file() and path.read_text() == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def config_steps(config: str) -> int:
    path = Path(config) if Path(config).is_file() else ROOT / config
    steps = ((yaml.safe_load(path.read_text()) or {}).get("trainer") or {}).get("max_steps")
    if not isinstance(steps, int) or steps <= 0:
        raise runs.ExperimentError(f"{config} sets no trainer.max_steps; pass the steps")
    return steps


@dataclass
class StudyRun:
    """One planned run of the study."""

    method: Method
    seed: int
    dir: Path
    """``<root>/<method>/seed<k>``, the run's log dir."""
    subcommand: str
    """``fit``, or ``validate`` for Base."""
    args: list[str]
    """The arguments of ``aropd <subcommand>``."""
    config_hash: str
    """SHA-256 of its resolved config."""
    steps: int
    """The step its last validation must be at (``trainer.max_steps``; 0 for Base's validate)."""

    @property
    def name(self) -> str:
        return f"{self.method.name}/seed{self.seed}"

    def results(self) -> dict | None:
        """The toy benchmark's summary of the run's latest validation, or None before any."""
        path = runs.final_results(self.dir)
        return json.loads(path.read_text())["benchmarks"][BENCH] if path else None

    def last_step(self) -> int | None:
        """The global step of the run's latest validation, or None before any."""
        path = runs.final_results(self.dir)
        return json.loads(path.read_text())["meta"]["global_step"] if path else None

    def finished(self) -> bool:
        """Done under this config, with results of its last step. A run still training has results
        already (its step-0 validation, the base model's): only ``DONE`` tells a finished run from it."""
        return runs.status(self.dir, self.config_hash) == "finished" and self.last_step() == self.steps


def common_sets(s: Study) -> dict[str, str]:
    # limit always explicit: a missing key would keep the base config's (the quickstart's 64)
    bench = {"name": BENCH, "data_path": s.test_data, "limit": s.val_limit or None}
    out = {
        "model.init_args.student": s.model,
        "data.init_args.val_benchmarks": json.dumps([bench]),
        "trainer.max_steps": str(s.steps),
        "trainer.val_check_interval": str(s.steps),   # validate once, after the last step
        "trainer.enable_checkpointing": "false",
        "trainer.log_every_n_steps": "1",             # every step in the events: the run means use them all
        "model.init_args.val_max_new_tokens": str(s.val_max_new_tokens) if s.val_max_new_tokens else "null",
        # on Base's validate too, where it trains nothing: its resolved config (and so its hash) then does
        # not change with the base config's lr
        "model.init_args.optimizer.init_args.lr": str(s.lr),
    }
    if s.max_new_tokens:
        out["model.init_args.max_new_tokens"] = str(s.max_new_tokens)
    if s.batch_size:
        out["data.init_args.batch_size"] = str(s.batch_size)
    return out


def plan(s: Study) -> list[StudyRun]:
    """Every (method, seed) run of the study, with its resolved config's hash."""
    out = []
    for m in methods():
        if m.name not in s.methods:
            continue
        for seed in s.seeds if m.trains else s.seeds[:1]:  # Base: greedy validation, the seed changes nothing
            d = Path(s.root) / m.name / f"seed{seed}"
            # the rollout streams and the data order follow seed_everything (their own seeds are unset)
            sets = {**common_sets(s), **m.sets, "seed_everything": str(seed)}
            configs = [s.base_config, *m.configs]
            subcommand = "fit" if m.trains else "validate"
            args = runs.run_args(configs, sets, d, resume=False)  # short runs, no checkpoints
            out.append(StudyRun(m, seed, d, subcommand, args, runs.config_hash(runs.resolve(subcommand, args)),
                                s.steps if m.trains else 0))
    return out


def execute(planned: list[StudyRun], subprocess: bool = False, force: bool = False) -> list[str]:
    """Run every run not finished under its config, each in a fresh folder; the names of the failed ones."""
    failed = []
    for i, r in enumerate(planned, 1):
        tag = f"[{i}/{len(planned)}] {r.name}"
        if not force and r.finished():
            print(f"{tag}: finished, skipped", flush=True)
            continue
        shutil.rmtree(r.dir, ignore_errors=True)
        runs.write_record(r.dir, method=r.method.name, seed=r.seed, command=[sys.executable, "-m", "aropd", r.subcommand, *r.args],
                          config_hash=r.config_hash)
        start = time.time()
        rc = runs.launch(r.subcommand, r.args, r.dir / "fit.log", python=sys.executable if subprocess else None)
        seconds = round(time.time() - start, 1)
        # A fit can exit 0 short of max_steps (a max_time, an early stop); its last results are then
        # an earlier step's, and the table would report them as the method's.
        step = r.last_step()
        if rc != 0 or step != r.steps:
            failed.append(r.name)
            why = f"exit {rc}" if rc != 0 else f"exit 0, but its last validation is at step {step}, not {r.steps}"
            print(f"{tag}: FAILED ({why}) after {seconds}s; last lines of {r.dir / 'fit.log'}:\n"
                  + runs.log_tail(r.dir / "fit.log"), file=sys.stderr, flush=True)
            continue
        runs.write_done(r.dir, r.config_hash, seconds=seconds)
        print(f"{tag}: finished in {seconds}s", flush=True)
    return failed


# ---- the table --------------------------------------------------------------------------------------
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


def run_values(run: StudyRun, bucket: str | None, questions: dict[str, str]) -> dict[str, float | None]:
    """The table's numbers of one finished run (fractions, not percent); ``questions``: the test split's
    questions by problem id (:func:`split_questions`)."""
    toy = run.results() or {}
    out: dict[str, float | None] = {"acc": toy["accuracy"], "long_acc": toy.get(f"acc_{bucket}") if bucket else None,
                                    "long_n": toy.get(f"count_{bucket}") if bucket else None}
    out.update(step_rates(run.dir, questions))
    tb = scalars(run.dir) if run.method.rollout else {}
    mean = lambda tag: statistics.fmean(v for _, v in tb[tag]) if tb.get(tag) else None  # noqa: E731
    out["shortcut"] = mean(SHORTCUT_TAG)
    out["target_prob"] = mean(TARGET_PROB_TAG)
    out.update({tag: mean(tag) for tag in tb if tag.startswith(GAP_PREFIX)})
    out["early"] = mean(EARLY_TAG)
    out["shift"] = mean(SHIFT_TAG)
    out["shift_first"] = tb[SHIFT_TAG][0][1] if tb.get(SHIFT_TAG) else None
    return out


def longest_common_bucket(finished: list[StudyRun]) -> str | None:
    """The longest length bucket with at least one response in every run."""
    from aropd.buckets import bucket_names

    counts = [r.results() or {} for r in finished]
    for name in reversed(bucket_names("len")):
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
    ("long_n", "Long n", 1.0, ".1f"),
    ("shortcut", "Shortcut /1k tok", 1.0, ".2f"),
    ("target_prob", "Target p @shortcut", 1.0, ".3f"),
    ("early", "Early answer (%)", 100.0, ".1f"),
    ("shift", "Priv. shift (nats)", 1.0, ".3g"),
    ("shift_first", "Shift @step 1 (nats)", 1.0, ".3g"),
    ("non_seq", "Non-seq. steps (%)", 100.0, ".2f"),
    ("rejoin", "Rejoins (%)", 100.0, ".2f"),
]
# From the validation responses, so every row has them (the others need a rollout and a teacher).
RESPONSE_COLUMNS = ("acc", "long_acc", "long_n", "non_seq", "rejoin")


def make_table(planned: list[StudyRun], s: Study) -> str:
    finished = [r for r in planned if r.finished()]
    bucket = longest_common_bucket(finished) if finished else None
    questions = split_questions(s.test_data)
    values = {r.name: run_values(r, bucket, questions) for r in finished}  # one read of each run's events for both tables
    header = ["Method", "Seeds"] + [h.format(bucket=(bucket or "none").removeprefix("len_").replace("_", "–"))
                                    for _, h, _, _ in COLUMNS]
    rows = []
    for m in methods():
        mine = [r for r in finished if r.method.name == m.name]
        if not mine:
            continue
        vals = [values[r.name] for r in mine]
        cells = [m.label, ",".join(str(r.seed) for r in mine)]
        for key, _, scale, fmt in COLUMNS:
            diagnostic = key not in RESPONSE_COLUMNS
            cells.append("n/a" if diagnostic and not m.rollout else mean_std([v[key] for v in vals], scale, fmt))
        rows.append(cells)
    notes = [
        "",
        f"Model `{s.model}`; {s.steps} steps; seeds {' '.join(map(str, s.seeds or []))}; "
        f"`{BENCH}` test split `{s.test_data}`" + (f" (first {s.val_limit})" if s.val_limit else "") + ".",
        "Mean ± sample std over seeds (± 0.0: one run). Shortcut, early answer and privileged shift are "
        "means over all logged training steps; Shift @step 1 is the first step (teacher = base model). "
        "Base: one greedy validation, no training; SFT: no rollout or teacher, so n/a. Non-seq. steps and "
        "rejoins: per 100 steps of a validation response (`aropd.toy.check_steps`), averaged over the responses.",
    ]
    chance = early_answer_chance(s.test_data)
    notes.append(f"Early-answer chance rate on this task: {100 * chance:.1f}% (the same test on the test split's "
                 "reference solutions, which reach their answers honestly).")
    out = markdown(header, rows) + "\n".join(notes) + "\n"
    gaps = support_gap_table(finished, values)
    if gaps:
        out += ("\nSupport gap (full-view minus partial-view support mismatch, nucleus 0.9) by completion "
                "position, mean over each run's steps and over seeds:\n\n" + gaps)
    scores = problem_scores(finished)  # each run's per-problem rows, read once for both tables
    pairs = paired_rows(scores)
    if pairs:
        out += ("\nPaired per-problem comparisons (every run scored on the same test problems): a problem's "
                "score is its mean over the method's seeds; Δ is A's accuracy minus B's, ± the paired standard "
                "error over problems; p is the exact sign test on the problems each method did better on "
                "(McNemar's exact test with one seed).\n\n" + paired_table(pairs))
        # The long-bucket column counts the responses that reach the bucket, a different set per run;
        # the methods pair on the problems whose reference solution is that long.
        from aropd.buckets import bucket_names

        ids = long_problems(s.test_data, bucket, s.val_limit) if bucket not in (None, bucket_names("len")[0]) else set()
        if ids:
            span = bucket.removeprefix("len_").replace("_", "–")
            out += (f"\nThe same on the {len(ids)} problems whose reference solution is {span} tokens long "
                    "(the long-acc column's bucket; toy-base tokens):\n\n" + paired_table(paired_rows(scores, ids)))
    return out


def support_gap_table(finished: list[StudyRun], values: dict[str, dict]) -> str:
    """Markdown table of the support gap per position bucket (the buckets any run logged), per method;
    ``values`` holds each run's :func:`run_values`."""
    from aropd.buckets import bucket_names

    vals = {r.name: values[r.name] for r in finished if r.method.rollout}
    buckets = [b for b in bucket_names("pos") if any(GAP_PREFIX + b.removeprefix("pos_") in v for v in vals.values())]
    if not buckets:
        return ""
    rows = []
    for m in methods():
        mine = [vals[r.name] for r in finished if r.method.name == m.name and r.name in vals]
        if mine:
            rows.append([m.label] + [mean_std([v.get(GAP_PREFIX + b.removeprefix("pos_")) for v in mine], 1.0, ".3f")
                                     for b in buckets])
    return markdown(["Method"] + [b.removeprefix("pos_").replace("_", "–") for b in buckets], rows)


def early_answer_chance(test_data: str) -> float:
    """Share of the split's reference solutions in which the early-answer test fires: the rate an
    honest solver shows on this task (a value in the chain equals the answer by coincidence)."""
    from aropd.diagnostics import early_answer
    from aropd.paths import resolve
    from aropd.toy import TOY_TEMPLATE, read_split

    rows = read_split(resolve(test_data))
    return statistics.fmean(early_answer(TOY_TEMPLATE.format_trace(r["reasoning"], r["answer"]), r["answer"])
                            for r in rows)


def problem_scores(finished: list[StudyRun]) -> dict[str, dict[str, list[float]]]:
    """Each method's per-problem scores over its finished runs: ``{method: {problem id: [score per seed]}}``."""
    scores: dict[str, dict[str, list[float]]] = {}
    for r in finished:
        for pid, score in per_problem(r.dir, BENCH).items():
            scores.setdefault(r.method.name, {}).setdefault(pid, []).append(score)
    return scores


def paired_rows(scores: dict[str, dict[str, list[float]]], only: set[str] | None = None) -> list[tuple[str, str, Paired]]:
    """The :data:`PAIRS` whose two methods both have scores (:func:`problem_scores`), compared problem by
    problem (on the problem ids in ``only``; None: all)."""
    labels = {m.name: m.label for m in methods()}
    if only is not None:
        kept = {m: {pid: v for pid, v in by_pid.items() if pid in only} for m, by_pid in scores.items()}
        scores = {m: by_pid for m, by_pid in kept.items() if by_pid}
    return [(labels[a], labels[b], paired_comparison(scores[a], scores[b]))
            for a, b in PAIRS if a in scores and b in scores]


def split_questions(test_data: str) -> dict[str, str]:
    """The test split's questions by the problem id its ``toy.jsonl`` rows carry (the row's ``id``, else
    its index)."""
    from aropd.paths import resolve
    from aropd.toy import read_split

    return {str(r["id"]) if r.get("id") is not None else str(i): r["question"]
            for i, r in enumerate(read_split(resolve(test_data)))}


def step_rates(run_dir: Path, questions: dict[str, str]) -> dict[str, float | None]:
    """Non-sequitur and rejoin steps (``aropd.toy.check_steps``) as a share of a response's written
    steps, averaged over the run's last validation responses that wrote a step: how far the student's
    steps follow from its own earlier ones. Each response weighs the same: pooled over steps, the
    few long problems (up to 90 steps, whose arithmetic a toy base mostly gets wrong) would outweigh
    the short ones that training is on."""
    from aropd.toy import check_steps

    results = runs.final_results(run_dir)
    rows = results.parent / f"{BENCH}.jsonl" if results else None
    shares = []
    for line in rows.read_text().splitlines() if rows and rows.is_file() else []:
        if line.strip():
            row = json.loads(line)
            c = check_steps(questions[str(row["id"])], row["response"])
            if c.steps:
                shares.append((c.non_sequiturs / c.steps, c.rejoins / c.steps))
    if not shares:
        return {"non_seq": None, "rejoin": None}
    return {"non_seq": statistics.fmean(n for n, _ in shares), "rejoin": statistics.fmean(r for _, r in shares)}


def long_problems(test_data: str, bucket: str, limit: int | None = None) -> set[str]:
    """Ids of the (first ``limit``) test problems whose reference solution is ``bucket`` long
    (``len_<lo>_<hi>``), in toy-base tokens (``aropd.toy.approx_response_tokens``, exact for that
    tokenizer). Unlike the responses that land in the bucket, these are the same problems for every
    method, so the methods pair on them."""
    import torch

    from aropd.buckets import bucket_index, bucket_names
    from aropd.toy import approx_response_tokens, parse_question

    rows = list(split_questions(test_data).items())[:limit]
    lengths = torch.tensor([approx_response_tokens(len(parse_question(q)[1])) for _, q in rows])
    want = bucket_names("len").index(bucket)
    return {pid for (pid, _), b in zip(rows, bucket_index(lengths).tolist()) if b == want}


def run_study(s: Study, force: bool = False, table_only: bool = False) -> int:
    """Run the study (``s`` resolved) and write ``<root>/table.md``; the exit code."""
    root = Path(s.root)
    if s.test_size is not None:
        large_test_split(s.test_size, Path(s.test_data), s.model)
    planned = plan(s)
    failed = []
    if not table_only:
        print(f"cpu_study: {len(planned)} run(s) in {root}/ (model {s.model}, {s.steps} steps, seeds {s.seeds})",
              flush=True)
        t0 = time.time()
        failed = execute(planned, s.subprocess, force)
        print(f"cpu_study: runs took {time.time() - t0:.0f}s", flush=True)
    if not any(r.finished() for r in planned):
        print("cpu_study: no finished run; no table", file=sys.stderr)
        return 1
    table = make_table(planned, s)
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(table)
    print(f"cpu_study: table in {root / 'table.md'}:\n{table}", end="")
    if failed:
        print(f"cpu_study: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
