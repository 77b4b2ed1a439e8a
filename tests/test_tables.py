"""aropd.experiments.tables: paired per-problem comparisons against values worked out by hand."""

import math

import pytest

from aropd.experiments.tables import paired_comparison, paired_table, per_problem, sign_test


def _runs(*scores):
    return {f"p{i}": list(s) if isinstance(s, (list, tuple)) else [s] for i, s in enumerate(scores)}


def test_one_run_each_is_mcnemar_by_hand():
    a = _runs(1, 1, 0, 1, 0, 1, 1, 0, 1, 1)  # 7/10
    b = _runs(1, 0, 0, 0, 0, 1, 0, 1, 1, 0)  # 4/10
    got = paired_comparison(a, b)
    # d = 0 1 0 1 0 0 1 -1 0 1: mean 0.3; squared deviations 5 x 0.09 + 4 x 0.49 + 1.69 = 4.1 over 9
    assert (got.n, got.a_better, got.b_better) == (10, 4, 1)
    assert got.diff == pytest.approx(0.3)
    assert got.se == pytest.approx(math.sqrt(4.1 / 9) / math.sqrt(10))  # 0.21344
    assert got.se == pytest.approx(0.213437, abs=1e-6)
    # 5 discordant problems, 1 the other way: 2 * (C(5,0) + C(5,1)) / 2^5 = 12/32
    assert got.p_value == pytest.approx(0.375)


def test_several_runs_are_averaged_per_problem_first():
    a = _runs([1, 1, 1], [0, 0, 0], [1, 0, 0], [1, 1, 0])
    b = _runs([0, 0, 1], [0, 0, 0], [1, 1, 1], [0, 0, 0])
    got = paired_comparison(a, b)
    # d = 2/3, 0, -2/3, 2/3: mean 1/6; squared deviations 1/4 + 1/36 + 25/36 + 1/4 = 44/36 over 3
    assert got.diff == pytest.approx(1 / 6)
    assert got.se == pytest.approx(math.sqrt(44 / 108) / 2)
    assert (got.a_better, got.b_better) == (2, 1)
    assert got.p_value == pytest.approx(1.0)  # 2 * (1 + 3) / 8, capped at 1
    assert got.n == 4  # problems, not the 12 problem-run pairs: runs are not pooled as if they were problems


def test_sign_test_by_hand():
    assert sign_test(0, 0) == 1.0
    assert sign_test(6, 0) == pytest.approx(2 / 64)
    assert sign_test(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.03857
    assert sign_test(3, 3) == 1.0


def test_problem_sets_must_match_and_be_named():
    with pytest.raises(ValueError, match="1 only in A .*'p2'.*0 only in B"):
        paired_comparison(_runs(1, 0, 1), _runs(1, 0))
    with pytest.raises(ValueError, match="no run"):
        paired_comparison({"x": []}, {"x": [1]})


def test_per_problem_reads_the_final_evaluation_rows(tmp_path):
    from aropd.evaluators.results import write_results

    run = tmp_path / "run"
    rows = [{"id": 0, "correct": True, "length_tokens": 10, "reason": "ok"},
            {"id": 1, "correct": False, "length_tokens": 12, "reason": "wrong"},
            {"id": 1, "correct": True, "length_tokens": 12, "reason": "ok"}]
    write_results(run / "val" / "step_4", {"toy": rows}, meta={})
    assert per_problem(run, "toy") == {"0": 1.0, "1": 0.5}
    with pytest.raises(FileNotFoundError, match="math500.jsonl"):
        per_problem(run, "math500")


def test_paired_table_cells():
    got = paired_comparison(_runs(1, 1, 0, 1, 0, 1, 1, 0, 1, 1), _runs(1, 0, 0, 0, 0, 1, 0, 1, 1, 0))
    table = paired_table([("AR-OPD", "Full OPD", got)])
    assert "| AR-OPD − Full OPD | +30.0 ± 21.3 | 10 | 4 / 1 | 0.375 |" in table
