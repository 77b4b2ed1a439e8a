"""The toy task family: hand-checked arithmetic, worked solutions, disjoint seeded splits, length knob."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest

from aropd.toy import (
    MOD,
    OPERANDS,
    apply_op,
    approx_response_tokens,
    check_reasoning,
    make_problem,
    make_split,
    parse_question,
    read_split,
    solve,
    steps_for_tokens,
    write_splits,
)
from aropd.views import partial_view

ASSETS = Path(__file__).resolve().parents[1] / "aropd" / "assets" / "toy"

# Worked by hand: 98-2=96; 96*7=672 -> 72; 72+5=77; 77-9=68.
HAND = {
    "question": "Start at 98. Working mod 100, apply #1 -2, #2 *7, #3 +5, #4 -9. Result?",
    "reasoning": "#1 -2 on 98=96. #2 *7 on 96=72. #3 +5 on 72=77. #4 -9 on 77=68.",
    "answer": "68",
}
# Two-digit values throughout: 03+9=12; 12*9=108 -> 08; 08-9=-1 -> 99.
HAND_PADDED = {
    "question": "Start at 03. Working mod 100, apply #1 +9, #2 *9, #3 -9. Result?",
    "reasoning": "#1 +9 on 03=12. #2 *9 on 12=08. #3 -9 on 08=99.",
    "answer": "99",
}


def test_apply_op_hand_values():
    assert apply_op(98, "-", 2) == 96
    assert apply_op(96, "*", 7) == 72  # 672 mod 100
    assert apply_op(95, "+", 7) == 2  # wraps past 99
    assert apply_op(5, "-", 9) == 96  # wraps below 0
    assert apply_op(99, "*", 9) == 91  # 891 mod 100
    with pytest.raises(ValueError):
        apply_op(1, "/", 2)


def test_every_operation_is_a_bijection_mod_100():
    # So values and answers stay uniform instead of collapsing onto 0 or multiples of 10.
    for op, ks in OPERANDS.items():
        for k in ks:
            assert sorted(apply_op(v, op, k) for v in range(MOD)) == list(range(MOD)), (op, k)


def test_hand_problems_check_and_solve():
    assert solve(HAND["question"]) == 68
    assert parse_question(HAND["question"]) == (98, [("-", 2), ("*", 7), ("+", 5), ("-", 9)])
    assert check_reasoning(HAND) == []
    assert solve(HAND_PADDED["question"]) == 99
    assert check_reasoning(HAND_PADDED) == []
    assert check_reasoning({**HAND_PADDED, "reasoning": HAND_PADDED["reasoning"].replace("=08", "=8")})


@pytest.mark.parametrize(
    "field, value, complaint",
    [
        ("answer", "67", "answer"),
        ("reasoning", "#1 -2 on 98=96. #2 *7 on 96=73. #3 +5 on 73=78. #4 -9 on 78=69.", "step 2"),  # a slip
        ("reasoning", "#1 -2 on 98=96. #2 *7 on 96=72. #3 +5 on 72=77.", "3 steps"),
        ("reasoning", "#1 -2 on 98=96. #3 *7 on 96=72. #2 +5 on 72=77. #4 -9 on 77=68.", "step 2"),
        ("reasoning", "#1 -2 on 98=96. #2 +7 on 96=03. #3 +5 on 03=08. #4 -9 on 08=99.", "step 2"),  # wrong op
        ("answer", "99", "answer"),
    ],
)
def test_check_reasoning_catches_wrong_solutions(field, value, complaint):
    errors = check_reasoning({**HAND, field: value})
    assert errors and any(complaint in e for e in errors), errors


def test_generated_reasoning_recomputes_to_the_answer():
    rng = random.Random(123)
    for steps in (1, 2, 5, 13, 40, 80):
        p = make_problem(rng, steps)
        assert check_reasoning(p) == [], p
        assert solve(p["question"]) == int(p["answer"])
        assert p["reasoning"].count("#") == steps
        assert p["reasoning"].endswith(f"={p['answer']}.") and len(p["answer"]) == 2


def test_determinism_by_seed(tmp_path):
    a = write_splits(tmp_path / "a", {"train": 50, "test": 20}, seed=7, long_frac=0.1)
    b = write_splits(tmp_path / "b", {"train": 50, "test": 20}, seed=7, long_frac=0.1)
    c = write_splits(tmp_path / "c", {"train": 50, "test": 20}, seed=8, long_frac=0.1)
    for split in ("train", "test"):
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()
    # Fixed value for seed 0 (a change here changes every committed split: regenerate them).
    assert make_problem(random.Random(0), 3) == {
        "question": "Start at 49. Working mod 100, apply #1 -1, #2 -9, #3 -7. Result?",
        "reasoning": "#1 -1 on 49=48. #2 -9 on 48=39. #3 -7 on 39=32.",
        "answer": "32",
    }


def test_splits_are_disjoint_and_exclude_is_honoured(tmp_path):
    # Short chains collide often (1 step: only 100 * 21 questions), so disjointness is really exercised.
    paths = write_splits(tmp_path, {"train": 600, "val": 300, "test": 300}, seed=0, min_steps=1, max_steps=1)
    qs = {s: [r["question"] for r in read_split(p)] for s, p in paths.items()}
    for s, rows in qs.items():
        assert len(rows) == len(set(rows)), f"{s} repeats a question"
    assert not set(qs["train"]) & set(qs["val"])
    assert not set(qs["train"]) & set(qs["test"])
    assert not set(qs["val"]) & set(qs["test"])


def test_answers_are_spread_over_0_99():
    answers = [int(p["answer"]) for p in make_split(2000, seed=3)]
    assert len(set(answers)) == 100
    assert max(answers.count(v) for v in set(answers)) < 50  # uniform would give ~20 each


def test_length_knob_is_monotone():
    lengths = []
    for steps in (1, 2, 4, 8, 16, 32, 64, 80):
        rows = make_split(30, seed=1, min_steps=steps, max_steps=steps)
        lengths.append(statistics.mean(len(r["reasoning"]) for r in rows))
    assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths)
    assert [approx_response_tokens(s) for s in range(1, 100)] == sorted(approx_response_tokens(s) for s in range(1, 100))
    assert approx_response_tokens(76) == 999  # the knob reaches ~1,000-token traces
    assert steps_for_tokens(1000) == 76
    for s in (2, 8, 40, 76):
        assert steps_for_tokens(approx_response_tokens(s)) == s


def test_long_fraction_of_a_split():
    rows = make_split(80, seed=2, min_steps=2, max_steps=8, long_frac=0.125, long_steps=(20, 76))
    steps = [r["reasoning"].count("#") for r in rows]
    assert sum(s >= 20 for s in steps) == 10
    assert all(2 <= s <= 8 or 20 <= s <= 76 for s in steps)


def test_partial_view_hides_the_late_values():
    # The privileged gap: the half view keeps the early steps and drops the late results.
    kept = partial_view(HAND["reasoning"], 0.5)
    assert kept.startswith("#1 -2 on 98=96. #2 *7 on 96=72.")
    assert "=68" not in kept and "=77" not in kept


def test_committed_splits():
    splits = {s: read_split(ASSETS / f"{s}.jsonl") for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in splits.items()} == {"train": 512, "val": 64, "test": 128}
    for rows in splits.values():
        for r in rows:
            assert set(r) == {"question", "reasoning", "answer"}
            assert check_reasoning(r) == [], r
    qs = {s: {r["question"] for r in rows} for s, rows in splits.items()}
    assert not (qs["train"] & qs["val"] or qs["train"] & qs["test"] or qs["val"] & qs["test"])
    # Train is short-to-medium; val/test also hold a few long problems (> 256 response tokens).
    assert max(r["reasoning"].count("#") for r in splits["train"]) <= 8
    for s in ("val", "test"):
        n_long = sum(approx_response_tokens(r["reasoning"].count("#")) > 256 for r in splits[s])
        assert n_long == len(splits[s]) // 8
