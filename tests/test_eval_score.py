"""aropd-score end to end, results.json (accuracy, length buckets, pass@k), and make_tables."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from aropd.evaluators import Verdict, get_benchmark
from aropd.evaluators.results import sample_rows, write_results
from aropd.evaluators.sandbox import isolation_mode
from aropd.evaluators.score import main as score_main

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "benchmarks"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_aropd_score_toy_end_to_end(tmp_path, capsys):
    long_ok = " ".join(["step"] * 300) + " <answer>73</answer>"  # 301 whitespace tokens
    resp = _jsonl(tmp_path / "responses.jsonl", [
        {"id": "0", "response": "<answer>79</answer>"},
        {"id": 1, "response": long_ok},                  # ids may be given as numbers
        {"id": "2", "response": "<answer>6</answer>"},
        {"id": "3", "response": "hmm"},
    ])
    out = tmp_path / "scored"
    rc = score_main(["--benchmark", "toy", "--responses", resp, "--out", str(out), "--data", str(FIX / "toy.jsonl")])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["benchmark"] == "toy" and printed["n"] == 4 and printed["correct"] == 2
    assert printed["accuracy"] == 0.5 and printed["no_answer"] == 1
    assert printed["length_unit"].startswith("whitespace tokens")
    assert printed["pass_at_k"] == {"pass@1": 0.5}

    rows = [json.loads(x) for x in (out / "toy.jsonl").read_text().splitlines()]
    assert [(r["id"], r["extracted"], r["correct"], r["reason"], r["length_tokens"]) for r in rows] == [
        ("0", "79", True, "correct", 1), ("1", "73", True, "correct", 301), ("2", "6", False, "wrong answer", 1),
        ("3", None, False, "no answer", 1)]
    assert rows[1]["response"] == long_ok

    res = json.loads((out / "results.json").read_text())
    t = res["benchmarks"]["toy"]
    assert (t["n"], t["correct"], t["accuracy"]) == (4, 2, 0.5)
    assert (t["count_len_0_256"], t["acc_len_0_256"]) == (3, pytest.approx(1 / 3))
    assert (t["count_len_256_512"], t["acc_len_256_512"]) == (1, 1.0)
    for name in ("512_768", "768_1024", "1024_inf"):
        assert (t[f"count_len_{name}"], t[f"acc_len_{name}"]) == (0, None)
    assert res["average"] == {"accuracy": 0.5, "n_benchmarks": 1}
    assert res["code_isolation"] is None
    assert res["meta"]["length_unit"] == printed["length_unit"]
    assert sorted(os.listdir(out)) == ["results.json", "toy.jsonl"]  # no temporary files left


def test_aropd_score_code_with_several_samples_reports_pass_at_k(tmp_path, capsys):
    recs = {r["task_id"]: r for r in get_benchmark("humaneval").load(limit=3)}
    r0, r2 = recs["HumanEval/0"], recs["HumanEval/2"]
    ok0 = "```python\n" + r0["prompt"] + r0["canonical_solution"] + "```"
    ok2 = "```python\n" + r2["prompt"] + r2["canonical_solution"] + "```"
    bad0 = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    resp = _jsonl(tmp_path / "samples.jsonl", [
        {"id": "HumanEval/0", "response": ok0}, {"id": "HumanEval/0", "response": bad0},
        {"id": "HumanEval/0", "response": "no code here, sorry"},
        {"id": "HumanEval/2", "response": ok2}, {"id": "HumanEval/2", "response": ok2},
        {"id": "HumanEval/2", "response": ok2}])
    rc = score_main(["--benchmark", "humaneval", "--responses", resp, "--out", str(tmp_path / "o"), "--workers", "2",
                     "--missing", "skip"])  # two of HumanEval's 164 problems
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n"] == 6 and printed["correct"] == 4 and printed["n_problems"] == 2
    assert printed["missing"]["policy"] == "skip" and printed["missing"]["count"] == 162
    assert "HumanEval/1" in printed["missing"]["ids"] and "HumanEval/0" not in printed["missing"]["ids"]
    # pass@1 = mean(1/3, 3/3); pass@2 = mean(1 - C(2,2)/C(3,2), 1) = mean(2/3, 1)
    assert printed["pass_at_k"]["pass@1"] == pytest.approx(2 / 3)
    assert printed["pass_at_k"]["pass@2"] == pytest.approx(5 / 6)
    assert set(printed["pass_at_k"]) == {"pass@1", "pass@2"}  # pass@5 needs 5 samples per problem
    assert printed["isolation"] == isolation_mode()
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["code_isolation"] == isolation_mode()
    rows = [json.loads(x) for x in (tmp_path / "o" / "humaneval.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, False, True, True, True]
    assert all(r["isolation"] == isolation_mode() for r in rows)


def _toy_partial(tmp_path: Path) -> str:
    """Responses for two of the four toy fixture problems: 1 and 3 have none."""
    return _jsonl(tmp_path / "partial.jsonl", [{"id": "0", "response": "<answer>79</answer>"},
                                               {"id": "2", "response": "<answer>5</answer>"}])


def test_aropd_score_missing_responses_are_an_error_naming_them(tmp_path, capsys):
    argv = ["--benchmark", "toy", "--responses", _toy_partial(tmp_path), "--out", str(tmp_path / "o"),
            "--data", str(FIX / "toy.jsonl")]
    assert score_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("aropd-score: error:") and "partial.jsonl" in err
    assert "no response for 2 of the 4 toy problems" in err and "'1', '3'" in err
    assert "--missing wrong" in err and "--missing skip" in err
    assert not (tmp_path / "o").exists()  # nothing written: no accuracy over a subset by accident
    assert score_main([*argv, "--missing", "error"]) == 2  # the default, spelled out
    capsys.readouterr()


def test_aropd_score_error_names_the_first_few_of_many_missing(tmp_path, capsys):
    b = get_benchmark("humaneval")
    recs = b.load(limit=2)
    resp = _jsonl(tmp_path / "r.jsonl", [{"id": r["task_id"], "response": "x"} for r in recs])
    assert score_main(["--benchmark", "humaneval", "--responses", resp, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    n = len(b.load())
    assert f"no response for {n - 2} of the {n} humaneval problems" in err
    assert "'HumanEval/2', 'HumanEval/3', 'HumanEval/4', 'HumanEval/5', 'HumanEval/6', ..." in err
    assert "HumanEval/7" not in err


def test_aropd_score_missing_counted_as_wrong(tmp_path, capsys):
    out = tmp_path / "o"
    rc = score_main(["--benchmark", "toy", "--responses", _toy_partial(tmp_path), "--out", str(out),
                     "--data", str(FIX / "toy.jsonl"), "--missing", "wrong"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["missing"] == {"policy": "wrong", "count": 2, "ids": ["1", "3"]}
    assert (printed["n"], printed["correct"], printed["accuracy"], printed["n_problems"]) == (4, 2, 0.5, 4)
    assert printed["no_answer"] == 0  # a missing response is not an unanswered one
    rows = [json.loads(x) for x in (out / "toy.jsonl").read_text().splitlines()]
    assert [(r["id"], r["correct"], r["reason"], r["response"], r["length_tokens"]) for r in rows] == [
        ("0", True, "correct", "<answer>79</answer>", 1), ("2", True, "correct", "<answer>5</answer>", 1),
        ("1", False, "no response", "", 0), ("3", False, "no response", "", 0)]
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["missing"] == printed["missing"]
    assert res["benchmarks"]["toy"]["accuracy"] == 0.5 and res["benchmarks"]["toy"]["count_len_0_256"] == 4


def test_aropd_score_missing_skipped(tmp_path, capsys):
    out = tmp_path / "o"
    rc = score_main(["--benchmark", "toy", "--responses", _toy_partial(tmp_path), "--out", str(out),
                     "--data", str(FIX / "toy.jsonl"), "--missing", "skip"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["missing"] == {"policy": "skip", "count": 2, "ids": ["1", "3"]}
    assert (printed["n"], printed["correct"], printed["accuracy"], printed["n_problems"]) == (2, 2, 1.0, 2)
    assert [json.loads(x)["id"] for x in (out / "toy.jsonl").read_text().splitlines()] == ["0", "2"]
    assert json.loads((out / "results.json").read_text())["meta"]["missing"] == printed["missing"]


def test_aropd_score_complete_responses_report_none_missing(tmp_path, capsys):
    resp = _jsonl(tmp_path / "all.jsonl", [{"id": str(i), "response": "x"} for i in range(4)])
    assert score_main(["--benchmark", "toy", "--responses", resp, "--out", str(tmp_path / "o"),
                       "--data", str(FIX / "toy.jsonl")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["missing"] == {"policy": "error", "count": 0, "ids": []}
    with pytest.raises(SystemExit):  # an unknown policy is refused by the parser
        score_main(["--benchmark", "toy", "--responses", resp, "--out", str(tmp_path / "o"), "--missing", "zero"])
    capsys.readouterr()


def test_aropd_score_errors_are_named(tmp_path, capsys):
    good = _jsonl(tmp_path / "r.jsonl", [{"id": "0", "response": "<answer>79</answer>"}])
    data = str(FIX / "toy.jsonl")
    cases = [
        (["--benchmark", "nope", "--responses", good, "--out", str(tmp_path)], "unknown benchmark 'nope'"),
        (["--benchmark", "toy", "--responses", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path),
          "--data", data], "missing.jsonl"),
        (["--benchmark", "toy", "--responses", _jsonl(tmp_path / "u.jsonl", [{"id": "99", "response": "x"}]),
          "--out", str(tmp_path), "--data", data], "'99'"),
        (["--benchmark", "toy", "--responses", _jsonl(tmp_path / "b.jsonl", ['{"id": "0", "response": "x"}', "{bad"]),
          "--out", str(tmp_path), "--data", data], "b.jsonl: line 2: not valid JSON"),
        (["--benchmark", "toy", "--responses", _jsonl(tmp_path / "m.jsonl", [{"id": "0"}]),
          "--out", str(tmp_path), "--data", data], "m.jsonl: record 0: missing field 'response'"),
        (["--benchmark", "toy", "--responses", good, "--out", str(tmp_path), "--data", str(tmp_path / "no.jsonl")],
         "no.jsonl"),
    ]
    for argv, needle in cases:
        assert score_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("aropd-score: error:") and needle in err, (needle, err)


def test_write_results_buckets_average_and_sample_rows(tmp_path):
    b = get_benchmark("toy")
    recs = b.load(str(FIX / "toy.jsonl"))
    verdicts = [Verdict(True, "79", "correct"), Verdict(False, "1", "wrong answer"), Verdict(True, "5", "correct"),
                Verdict(False, None, "no answer")]
    lengths = [255, 256, 1023, 1024]  # bucket edges: [0,256) [256,512) ... [768,1024) [1024,inf)
    rows = sample_rows("toy", recs, ["a", "b", "c", "d"], verdicts, lengths)
    assert rows[3] == {"id": "3", "response": "d", "extracted": None, "correct": False, "reason": "no answer",
                       "length_tokens": 1024}
    with pytest.raises(ValueError, match="must match"):
        sample_rows(b, recs, ["a"], verdicts, lengths)
    other = [{"id": "x", "response": "", "extracted": "A", "correct": True, "reason": "correct", "length_tokens": 10}]
    s = write_results(tmp_path, {"toy": rows, "medqa": other}, {"step": 7})
    t = s["benchmarks"]["toy"]
    assert t["accuracy"] == 0.5
    assert [t[f"count_len_{k}"] for k in ("0_256", "256_512", "512_768", "768_1024", "1024_inf")] == [1, 1, 0, 1, 1]
    assert [t[f"acc_len_{k}"] for k in ("0_256", "256_512", "512_768", "768_1024", "1024_inf")] == [
        1.0, 0.0, None, 1.0, 0.0]
    assert s["average"] == {"accuracy": (0.5 + 1.0) / 2, "n_benchmarks": 2}
    assert s["by_length"]["count_len_0_256"] == 2 and s["by_length"]["acc_len_0_256"] == 1.0
    assert s["length_edges"] == [0, 256, 512, 768, 1024, "inf"]
    assert s["meta"] == {"step": 7}
    assert json.loads((tmp_path / "results.json").read_text()) == s
    assert sorted(os.listdir(tmp_path)) == ["medqa.jsonl", "results.json", "toy.jsonl"]


def test_make_tables_two_runs(tmp_path, capsys):
    mt = _load_script("make_tables")

    def put(path: Path, accs: dict, avg: float, mtime: float):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"benchmarks": {k: {"accuracy": v} for k, v in accs.items()},
                                    "average": {"accuracy": avg}}))
        os.utime(path, (mtime, mtime))

    put(tmp_path / "ar_opd" / "old" / "results.json", {"math500": 0.1, "medqa": 0.1}, 0.1, 1_000_000)
    put(tmp_path / "ar_opd" / "validate" / "results.json", {"math500": 0.746, "medqa": 0.5}, 0.623, 2_000_000)
    put(tmp_path / "full_opd" / "results.json", {"math500": 0.71, "amc23": 0.55}, 0.63, 1_500_000)
    rc = mt.main([str(tmp_path / "full_opd"), str(tmp_path / "ar_opd"), "--out", str(tmp_path / "t.md")])
    assert rc == 0
    expected = ("| Run | MATH500 | AMC23 | MedQA | Average |\n"
                "|:---|---:|---:|---:|---:|\n"
                "| full_opd | 71.0 | 55.0 | – | 63.0 |\n"
                "| ar_opd | 74.6 | – | 50.0 | 62.3 |\n")
    assert capsys.readouterr().out == expected
    assert (tmp_path / "t.md").read_text() == expected
    assert mt.main([str(tmp_path / "ar_opd"), "--names", "AR-OPD", "--benchmarks", "medqa", "--digits", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "| AR-OPD | 50.00 | 62.30 |"
    assert mt.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
