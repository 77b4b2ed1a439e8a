"""aropd.experiments.cpu_study (scripts/cpu_study.py) quick: every method runs, one table row each, and the
table's numbers are the runs' own (results.json and TensorBoard events, read here independently)."""

import json
import math
import re
import shutil
import statistics
import time
from itertools import islice
from pathlib import Path

import pytest
import yaml

from aropd.experiments import cpu_study
from aropd.experiments.cpu_study import Study

ROOT = Path(__file__).resolve().parents[1]

LABELS = {"base": "Base", "sft": "SFT", "full_opd": "Full OPD", "partial_opd": "Partial OPD",
          "ar_opd_lam0.6": "AR-OPD λ=0.6", "ar_opd_lam0.8": "AR-OPD λ=0.8", "ar_opd_lam1.2": "AR-OPD λ=1.2",
          "ar_opd_lam1_clip1": "AR-OPD λ=1, c=1", "ar_opd_lam1_clip2": "AR-OPD λ=1, c=2",
          "ar_opd_lam1_clip5": "AR-OPD λ=1, c=5",
          "no_trace": "No trace (control)", "shuffled_trace": "Shuffled trace (control)"}
NO_ROLLOUT = {"base", "sft"}
CELL = re.compile(r"^(-?\d+(?:\.\d+)?(?:e[-+]\d+)?) ± (\d+(?:\.\d+)?(?:e[-+]\d+)?)$")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu_study")
    start = time.time()
    rc = cpu_study.run_study(Study(root=root).resolved(quick=True))
    seconds = time.time() - start
    assert rc == 0
    return root, seconds


def parse_table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The first markdown table of ``text``: its header and its rows by first cell."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    lines = lines[start:end]
    split = lambda ln: [c.strip() for c in ln.strip("|").split("|")]  # noqa: E731
    header = split(lines[0])
    assert set(lines[1].replace("|", "").replace(":", "").replace("-", "")) == set()
    rows = {}
    for ln in lines[2:]:
        cells = split(ln)
        assert len(cells) == len(header), ln
        assert cells[0] not in rows, f"two rows for {cells[0]}"
        rows[cells[0]] = cells
    return header, rows


def tb_scalars(run_dir: Path) -> dict[str, list[float]]:
    """Independent read: every scalar of the run's event files, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(run_dir.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard events in {run_dir}"
    out: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {t: [v for _, v in sorted(vs, key=lambda x: x[0])] for t, vs in out.items()}


def close(cell: str, expected: float, fmt: str) -> None:
    m = CELL.match(cell)
    assert m, f"malformed cell {cell!r}"
    assert float(m.group(2)) == 0.0  # one seed: no spread
    assert m.group(1) == f"{expected:{fmt}}", (cell, expected)


def chance_note(table: str) -> float:
    return float(re.search(r"Early-answer chance rate on this task: ([\d.]+)%", table).group(1))


def naive_early_chance(path: Path) -> float:
    """Share of reference solutions whose answer, as a whole number, first occurs in the first half."""
    from aropd.toy import TOY_TEMPLATE

    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    hits = 0
    for r in rows:
        text = TOY_TEMPLATE.format_trace(r["reasoning"], r["answer"])
        for m in re.finditer(r"\d+", text):
            before = text[m.start() - 1] if m.start() else " "
            after = text[m.end(): m.end() + 2]
            whole = not (before.isalnum() or before in "._") and not (after[:1].isalnum() or after[:1] == "_"
                                                                       or (after[:1] == "." and after[1:2].isdigit()))
            if whole and m.group() == r["answer"]:
                hits += m.start() < len(text) / 2
                break
    return hits / len(rows)


@pytest.mark.slow
def test_quick_study_table_matches_the_runs(study):
    root, seconds = study
    print(f"cpu_study --quick: {seconds:.0f}s")
    table = (root / "table.md").read_text()
    header, rows = parse_table(table)
    assert header[:2] == ["Method", "Seeds"]
    assert sorted(rows) == sorted(LABELS.values())
    bucket_col = header[3]
    m = re.search(r"\[(\d+)–(\d+|inf)\]", bucket_col)
    assert m, bucket_col
    bucket = f"len_{m.group(1)}_{m.group(2)}"
    gap_header, gap_rows = parse_table(table[table.index("Support gap"):])
    assert gap_header[:2] == ["Method", "0–256"]
    assert chance_note(table) == pytest.approx(100 * naive_early_chance(cpu_study.ROOT / "aropd/assets/toy/test.jsonl"), abs=0.05)

    from aropd.toy import check_steps, read_split

    test_rows = read_split(ROOT / "aropd/assets/toy/test.jsonl")  # no ids: a row's id is its index
    assert header[10:] == ["Non-seq. steps (%)", "Rejoins (%)"]

    def res_dir(run_dir):
        return run_dir / "validate" if run_dir.parent.name == "base" else run_dir / "val" / "step_4"

    for name, label in LABELS.items():
        run_dir = root / name / "seed0"
        cells = rows[label]
        assert cells[1] == "0"
        if name == "base":
            res = json.loads((run_dir / "validate" / "results.json").read_text())
        else:
            res = json.loads((run_dir / "val" / "step_4" / "results.json").read_text())
            assert res["meta"]["global_step"] == 4
        toy = res["benchmarks"]["toy"]
        assert toy["n"] == 8  # the quick limit on the test split
        close(cells[2], 100 * toy["accuracy"], ".1f")
        assert toy[f"count_{bucket}"] > 0
        close(cells[3], 100 * toy[f"acc_{bucket}"], ".1f")
        close(cells[4], toy[f"count_{bucket}"], ".1f")
        # the step checks of the validation responses, each response's shares averaged (every row has them)
        responses = [json.loads(ln) for ln in (res_dir(run_dir) / "toy.jsonl").read_text().splitlines()]
        checks = [check_steps(test_rows[int(r["id"])]["question"], r["response"]) for r in responses]
        checks = [c for c in checks if c.steps]
        assert checks
        close(cells[10], 100 * statistics.fmean(c.non_sequiturs / c.steps for c in checks), ".2f")
        close(cells[11], 100 * statistics.fmean(c.rejoins / c.steps for c in checks), ".2f")
        if name in NO_ROLLOUT:
            assert cells[5:10] == ["n/a"] * 5, (label, cells)
            assert label not in gap_rows
            continue
        tb = tb_scalars(run_dir)
        assert len(tb["diag/privileged_shift"]) == 4  # one per step
        close(cells[5], statistics.fmean(tb["diag/shortcut/events_per_1k"]), ".2f")
        if "diag/shortcut/target_prob" in tb:  # written only on steps with events
            close(cells[6], statistics.fmean(tb["diag/shortcut/target_prob"]), ".3f")
        else:
            assert cells[6] == "n/a"
        close(cells[7], 100 * statistics.fmean(tb["diag/early_answer_rate"]), ".1f")
        shift = tb["diag/privileged_shift"]
        assert all(math.isfinite(s) and s >= 0 for s in shift)
        close(cells[8], statistics.fmean(shift), ".3g")
        close(cells[9], shift[0], ".3g")
        for col, cell in zip(gap_header[1:], gap_rows[label][1:]):
            lo, hi = col.split("–")
            close(cell, statistics.fmean(tb[f"diag/support_gap/pos_{lo}_{hi}"]), ".3f")

    # the test split, not the benchmark's default val split
    for name in ("full_opd", "sft"):
        cfg = yaml.safe_load((root / name / "seed0" / "config.yaml").read_text())
        (bench,) = cfg["data"]["init_args"]["val_benchmarks"]
        assert (bench["name"], bench["data_path"], bench["limit"]) == ("toy", "aropd/assets/toy/test.jsonl", 8)
        assert cfg["trainer"]["max_steps"] == 4
    assert "test.jsonl" in table

    # the controls: AR-OPD λ=0.8 with the teacher's trace taken away or swapped
    for name, trace in (("no_trace", "none"), ("shuffled_trace", "shuffled")):
        cfg = yaml.safe_load((root / name / "seed0" / "config.yaml").read_text())
        assert cfg["data"]["init_args"]["teacher_trace"] == trace
        assert cfg["model"]["init_args"]["target"]["init_args"]["lam"] == 0.8

    # the clip sweep: λ = 1 with each clip, saved as trained
    for clip in (1, 2, 5):
        target = yaml.safe_load((root / f"ar_opd_lam1_clip{clip}" / "seed0" / "config.yaml").read_text())
        target = target["model"]["init_args"]["target"]
        assert target["class_path"].endswith("AnchoredResidual")
        assert (target["init_args"]["lam"], target["init_args"]["clip"]) == (1.0, float(clip))

    # the paired comparisons, recomputed from the runs' per-problem rows
    header, pairs = parse_table(table[table.index("Paired per-problem"):])
    assert header[0] == "A − B" and len(pairs) == len(cpu_study.PAIRS)

    def correct(name):
        res = "validate" if name == "base" else "val/step_4"
        rows = [json.loads(ln) for ln in (root / name / "seed0" / res / "toy.jsonl").read_text().splitlines()]
        return {r["id"]: int(r["correct"]) for r in rows}

    for a, b in cpu_study.PAIRS:
        ca, cb = correct(a), correct(b)
        assert sorted(ca) == sorted(cb) and len(ca) == 8
        d = [ca[i] - cb[i] for i in ca]
        cells = pairs[f"{LABELS[a]} − {LABELS[b]}"]
        se = statistics.stdev(d) / math.sqrt(len(d))
        assert cells[1] == f"{100 * statistics.fmean(d):+.1f} ± {100 * se:.1f}", cells
        assert cells[2] == "8" and cells[3] == f"{d.count(1)} / {d.count(-1)}"

    # on a subset of the problems (how the long problems' table is made): the same, on those alone
    finished = [r for r in cpu_study.plan(Study(root=root).resolved(quick=True)) if r.finished()]
    some, name = {"0", "3", "5", "6"}, {v: k for k, v in LABELS.items()}
    subset = cpu_study.paired_rows(cpu_study.problem_scores(finished), some)
    assert len(subset) == len(cpu_study.PAIRS)
    for la, lb, p in subset:
        ca, cb = correct(name[la]), correct(name[lb])
        d = [ca[i] - cb[i] for i in sorted(some)]
        assert p.n == 4 and p.diff == pytest.approx(statistics.fmean(d))
        assert (p.a_better, p.b_better) == (d.count(1), d.count(-1))


@pytest.mark.slow
def test_finished_runs_are_skipped(study, capsys):
    root, _ = study
    before = (root / "table.md").read_text()
    assert cpu_study.run_study(Study(root=root, methods=["base", "full_opd"]).resolved(quick=True)) == 0
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 2
    assert (root / "table.md").read_text().count("\n| ") < before.count("\n| ")  # only the two methods asked


@pytest.mark.slow
def test_the_table_leaves_out_runs_that_have_not_finished(study, tmp_path):
    """A run still training already has a results.json (its step-0 validation, the base model's); the table
    written beside it (``--table-only`` while the study runs) must not count it as finished."""
    root, _ = study
    run = root / "full_opd" / "seed0"
    aside = {p: tmp_path / p.name for p in (run / "DONE", run / "val" / "step_4", root / "table.md")}
    for p, q in aside.items():  # the run as it is mid-training; put back after (the fixture is shared)
        shutil.move(p, q)
    try:
        assert [p.parent.name for p in run.rglob("results.json")] == ["step_0"]
        assert cpu_study.run_study(Study(root=root).resolved(quick=True), table_only=True) == 0
        _, rows = parse_table((root / "table.md").read_text())
        assert LABELS["full_opd"] not in rows and LABELS["partial_opd"] in rows
    finally:
        (root / "table.md").unlink(missing_ok=True)
        for p, q in aside.items():
            shutil.move(q, p)


def test_large_test_split_is_fresh_deterministic_and_drawn_like_the_test_split(tmp_path):
    from aropd.evaluators import get_benchmark
    from aropd.experiments.pretrain import ProblemStream, seen_questions
    from aropd.toy import check_reasoning, parse_question, read_split

    path = cpu_study.large_test_split(1000, tmp_path / "a.jsonl", "aropd/assets/toy-base")
    rows = read_split(path)
    questions = [r["question"] for r in rows]
    assert len(set(questions)) == 1000
    committed = {r["question"] for s in ("train", "val", "test") for r in read_split(ROOT / f"aropd/assets/toy/{s}.jsonl")}
    report = json.loads((ROOT / "aropd/assets/toy-base/pretrain.json").read_text())
    seen = seen_questions(report)
    # every problem the base's run drew (the tokenizer's, then one per example: an example takes the
    # stream's next problem even when it trains on a long one drawn apart, a long copy or a prefix),
    # replayed here from the recorded args. Short problems repeat in a stream this long (a one-step
    # problem is one of a few thousand), so the set is smaller than the draws. The base is a continued
    # run: the run it continued drew its own stream.
    assert report["init_report"] and not report["init_report"].get("init_report")
    for run in (report, report["init_report"]):
        a = run["args"]
        stream = ProblemStream(a["seed"], a["min_steps"], a["max_steps"], a["long_frac"], tuple(a["long_steps"]), committed)
        drawn = {p["question"] for p in islice(stream, a["tokenizer_problems"] + run["examples_seen"])}
        assert drawn <= seen and len(drawn) > 0.9 * (a["tokenizer_problems"] + run["examples_seen"])
    assert not set(questions) & (committed | seen)
    steps = [len(parse_question(q)[1]) for q in questions]
    assert sum(20 <= n <= 90 for n in steps) == 125 and sum(2 <= n <= 8 for n in steps) == 875  # 1 in 8 long
    assert all(not check_reasoning(r) for r in rows)
    again = cpu_study.large_test_split(1000, tmp_path / "b.jsonl", "aropd/assets/toy-base")
    assert again.read_bytes() == path.read_bytes()
    # A study's chunks run side by side on one file: the same split is not written again, and another
    # one replaces it whole (no temporary file left beside it).
    before = again.stat()
    cpu_study.large_test_split(1000, again, "aropd/assets/toy-base")
    assert (again.stat().st_ino, again.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    cpu_study.large_test_split(10, again, "aropd/assets/toy-base")
    assert len(read_split(again)) == 10 and sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]
    assert len(get_benchmark("toy").load(str(path))) == 1000  # the benchmark reads it as a split
    s = Study(root=tmp_path, test_size=1000).resolved()
    assert s.test_data == str(tmp_path / "toy_test1000.jsonl")
    with pytest.raises(cpu_study.runs.ExperimentError, match="test_size"):
        Study(test_size=1000, test_data="x.jsonl").resolved()


def test_model_default_prefers_toy_base():
    expected = "aropd/assets/toy-base" if (ROOT / "aropd/assets/toy-base").is_dir() else "aropd/assets/tiny-llama"
    assert cpu_study.default_model() == expected
    quick = Study().resolved(quick=True)
    assert (quick.model, quick.seeds, quick.steps) == (expected, [0], 4)
    assert (quick.val_limit, quick.max_new_tokens, quick.val_max_new_tokens, quick.batch_size) == (8, 24, 24, 4)
    full = Study().resolved()
    quickstart = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    assert len(full.seeds) >= 3 and full.val_limit is None and full.steps == quickstart["trainer"]["max_steps"]
    assert Study(seeds=[5], steps=7).resolved(quick=True).seeds == [5]


def test_runs_take_the_studys_lr_whatever_the_base_config_says(tmp_path):
    from aropd.experiments import runs

    cfg = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    cfg["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 3e-4
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(cfg))
    study = Study(root=tmp_path / "r", base_config=str(base), lr=2e-5, seeds=[0], methods=["base", "sft"])
    for r in cpu_study.plan(study.resolved()):
        model = yaml.safe_load(runs.resolve(r.subcommand, r.args))["model"]
        assert model["init_args"]["optimizer"]["init_args"]["lr"] == 2e-5, r.name


def test_a_fit_that_exits_0_short_of_its_steps_is_a_failure_not_a_result(tmp_path, capsys):
    """A fit can end with exit status 0 before max_steps (here at max_epochs): its last results are an
    earlier step's, and the table would report them as the method's."""
    cfg = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    cfg["trainer"].update(max_epochs=1, limit_train_batches=1)  # one epoch of one batch: over after step 1
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(cfg))
    study = Study(root=tmp_path / "r", base_config=str(base), methods=["full_opd"]).resolved(quick=True)
    planned = cpu_study.plan(study)
    assert cpu_study.execute(planned) == ["full_opd/seed0"]
    run = planned[0]
    assert run.last_step() is not None and run.last_step() < 4
    assert f"its last validation is at step {run.last_step()}, not 4" in capsys.readouterr().err
    assert not (run.dir / "DONE").exists() and not run.finished()


def test_long_problems_are_those_whose_reference_is_that_many_toy_base_tokens():
    """Counted here with the toy-base tokenizer itself (the reference response as training builds it),
    not with the step formula the study uses."""
    from transformers import AutoTokenizer

    from aropd.experiments.pretrain import example
    from aropd.toy import TOY_TEMPLATE, read_split

    tok = AutoTokenizer.from_pretrained(ROOT / "aropd/assets/toy-base")
    rows = read_split(ROOT / "aropd/assets/toy/test.jsonl")
    length = [len(example(tok, TOY_TEMPLATE, r, 0.5).reference) for r in rows]
    for lo, hi in ((768, 1024), (512, 768), (256, 512)):
        want = {str(i) for i, n in enumerate(length) if lo <= n < hi}
        assert cpu_study.long_problems("aropd/assets/toy/test.jsonl", f"len_{lo}_{hi}") == want
        assert 0 < len(want) < 10
    assert cpu_study.long_problems("aropd/assets/toy/test.jsonl", "len_768_1024", limit=50) == \
        {i for i in cpu_study.long_problems("aropd/assets/toy/test.jsonl", "len_768_1024") if int(i) < 50}
