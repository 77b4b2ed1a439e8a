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
    check_steps,
    make_problem,
    make_split,
    parse_question,
    read_split,
    scramble,
    solve,
    steps_for_tokens,
    write_splits,
)
from aropd.views import partial_view

ASSETS = Path(__file__).resolve().parents[1] / "aropd" / "assets" / "toy"

# Worked by hand: 98-2=96; 96*7=672 -> 72; 72-2=70; 70*7=490 -> 90.
HAND = {
    "question": "Working mod 100, apply -2 and *7 in turn from #4 down to #1, starting at 98.",
    "reasoning": "#4 -2 on 98=96. #3 *7 on 96=72. #2 -2 on 72=70. #1 *7 on 70=90.",
    "answer": "90",
}
# Two-digit values throughout, wrapping both ways: 03-9=-6 -> 94; 94+9=103 -> 03; 03-9 -> 94.
HAND_PADDED = {
    "question": "Working mod 100, apply -9 and +9 in turn from #3 down to #1, starting at 03.",
    "reasoning": "#3 -9 on 03=94. #2 +9 on 94=03. #1 -9 on 03=94.",
    "answer": "94",
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
    assert solve(HAND["question"]) == 90
    assert parse_question(HAND["question"]) == (98, [("-", 2), ("*", 7), ("-", 2), ("*", 7)])
    assert check_reasoning(HAND) == []
    assert solve(HAND_PADDED["question"]) == 94
    assert check_reasoning(HAND_PADDED) == []
    assert check_reasoning({**HAND_PADDED, "reasoning": HAND_PADDED["reasoning"].replace("=03", "=3")})


@pytest.mark.parametrize(
    "question",
    [
        "Working mod 100, apply -2 and *7 in turn from #4 down to #1, starting at 8.",  # one digit
        "Working mod 10, apply -2 and *7 in turn from #4 down to #1, starting at 98.",  # modulus
        "Working mod 100, apply -2 and *5 in turn from #4 down to #1, starting at 98.",  # not a bijection
        "Working mod 100, apply -2 and *7 in turn from #0 down to #1, starting at 98.",  # no steps
        "Working mod 100, apply -2, *7 in turn from #4 down to #1, starting at 98.",
    ],
)
def test_parse_question_rejects_malformed(question):
    with pytest.raises(ValueError, match="toy question|bad operation"):
        parse_question(question)


@pytest.mark.parametrize(
    "field, value, complaint",
    [
        ("answer", "91", "answer"),
        ("reasoning", "#4 -2 on 98=96. #3 *7 on 96=73. #2 -2 on 73=71. #1 *7 on 71=97.", "step 2"),  # a slip
        ("reasoning", "#4 -2 on 98=96. #3 *7 on 96=72. #2 -2 on 72=70.", "3 steps"),
        ("reasoning", "#4 -2 on 98=96. #2 *7 on 96=72. #3 -2 on 72=70. #1 *7 on 70=90.", "step 2"),  # labels
        ("reasoning", "#1 -2 on 98=96. #2 *7 on 96=72. #3 -2 on 72=70. #4 *7 on 70=90.", "step 1"),  # counts up
        ("reasoning", "#4 -2 on 98=96. #3 +7 on 96=03. #2 -2 on 03=01. #1 *7 on 01=07.", "step 2"),  # wrong op
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
        "question": "Working mod 100, apply -1 and -9 in turn from #3 down to #1, starting at 49.",
        "reasoning": "#3 -1 on 49=48. #2 -9 on 48=39. #1 -1 on 39=38.",
        "answer": "38",
    }


def test_splits_are_disjoint_and_exclude_is_honoured(tmp_path):
    # Short chains collide often (1 step: only 100 * 18 * 18 questions), and the exclusion logic is exercised.
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
    assert approx_response_tokens(90) == 1002  # the knob reaches ~1,000-token traces
    assert steps_for_tokens(1000) == 89
    for s in (2, 8, 40, 90):
        assert steps_for_tokens(approx_response_tokens(s)) == s


def test_long_fraction_of_a_split():
    rows = make_split(80, seed=2, min_steps=2, max_steps=8, long_frac=0.125, long_steps=(20, 76))
    steps = [r["reasoning"].count("#") for r in rows]
    assert sum(s >= 20 for s in steps) == 10
    assert all(2 <= s <= 8 or 20 <= s <= 76 for s in steps)


def test_partial_view_hides_the_late_values():
    # The privileged gap: the half view keeps the early steps and drops the late results.
    kept = partial_view(HAND["reasoning"], 0.5)
    assert kept == "#4 -2 on 98=96. #3 *7 on 96=72."
    assert "=70" not in kept and "=90" not in kept


def test_committed_splits():
    splits = {s: read_split(ASSETS / f"{s}.jsonl") for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in splits.items()} == {"train": 512, "val": 64, "test": 128}
    for rows in splits.values():
        for r in rows:
            assert set(r) == {"question", "reasoning", "answer"}
            assert check_reasoning(r) == [], r
    qs = {s: {r["question"] for r in rows} for s, rows in splits.items()}
    assert not (qs["train"] & qs["val"] or qs["train"] & qs["test"] or qs["val"] & qs["test"])
    # Train is short-to-medium; val/test also hold one problem in eight of 20-90 steps (230-1,000 tokens).
    assert max(r["reasoning"].count("#") for r in splits["train"]) <= 8
    for s in ("val", "test"):
        n_long = sum(r["reasoning"].count("#") >= 20 for r in splits[s])
        assert n_long == len(splits[s]) // 8
        assert max(r["reasoning"].count("#") for r in splits[s]) <= 90


def test_quickstart_prompts_are_the_toy_template():
    # The toy base model was pretrained on TOY_TEMPLATE prompts; the quickstart must render the same.
    import yaml

    from aropd.toy import TOY_TEMPLATE
    from aropd.views import PromptTemplate

    cfg = yaml.safe_load((ASSETS.parents[2] / "configs" / "quickstart.yaml").read_text())
    assert cfg["model"]["init_args"]["student"] == "aropd/assets/toy-base"
    assert PromptTemplate(**cfg["data"]["init_args"]["template"]) == TOY_TEMPLATE


def test_scramble_keeps_the_layout_and_randomizes_the_results():
    import re

    got = scramble(HAND, random.Random(4))
    assert got["question"] == HAND["question"]
    steps = re.findall(r"#(\d+) ([-+*]\d) on (\d\d)=(\d\d)\.", got["reasoning"])
    assert " ".join(f"#{i} {o} on {a}={b}." for i, o, a, b in steps) == got["reasoning"]
    # the labels, the operations and the start value of the hand problem; each input the last result
    assert [(i, o) for i, o, _, _ in steps] == [("4", "-2"), ("3", "*7"), ("2", "-2"), ("1", "*7")]
    assert steps[0][2] == "98" and all(steps[k][2] == steps[k - 1][3] for k in range(1, 4))
    assert got["answer"] == steps[-1][3]
    assert scramble(HAND, random.Random(4)) == got  # seeded
    # the results are not the arithmetic: over many draws almost every scrambled trace fails the check
    rng = random.Random(0)
    problems = make_split(200, seed=3)
    wrong = sum(bool(check_reasoning(scramble(p, rng))) for p in problems)
    assert wrong >= 190



def test_scramble_of_the_first_steps_keeps_the_later_arithmetic():
    import re

    # HAND: -2 and *7 in turn from #4, starting at 98. Two random results, then the arithmetic from
    # the second of them, worked by hand from whatever it is.
    got = scramble(HAND, random.Random(4), steps=2)
    steps = re.findall(r"#(\d+) ([-+*]\d) on (\d\d)=(\d\d)\.", got["reasoning"])
    first_two = scramble(HAND, random.Random(4))["reasoning"].split(" #")[:2]
    assert got["reasoning"].split(" #")[:2] == first_two  # the same draws as a full scramble, so far
    r2 = int(steps[1][3])
    r3 = (r2 - 2) % 100
    r4 = (r3 * 7) % 100
    assert steps[2][2:] == (f"{r2:02d}", f"{r3:02d}") and steps[3][2:] == (f"{r3:02d}", f"{r4:02d}")
    assert got["answer"] == f"{r4:02d}"
    assert scramble(HAND, random.Random(4), steps=0) == HAND  # nothing scrambled: the worked solution


# HAND's question (98; -2, *7, -2, *7; correct chain 96, 72, 70, 90) answered with slips, checked by hand.
@pytest.mark.parametrize("response, expected", [
    # the reference itself: every step follows
    ("<reasoning>#4 -2 on 98=96. #3 *7 on 96=72. #2 -2 on 72=70. #1 *7 on 70=90.</reasoning><answer>90</answer>",
     (4, 0, 0)),
    # one slip (96*7 written as 73), then the next steps carry on from it (73-2=71, 71*7=497 -> 97):
    # one non-sequitur, no rejoin
    ("#4 -2 on 98=96. #3 *7 on 96=73. #2 -2 on 73=71. #1 *7 on 71=97.", (4, 1, 0)),
    # the same slip, then a step that writes the slipped input but the reference's result (70, not
    # 71): the hindsight shortcut, a non-sequitur back on the correct chain; then on from 70
    ("#4 -2 on 98=96. #3 *7 on 96=73. #2 -2 on 73=70. #1 *7 on 70=90.", (4, 2, 1)),
    # a copy slip: the input is not the previous result (72 written as 27), and 27-2=25 follows from it
    ("#4 -2 on 98=96. #3 *7 on 96=72. #2 -2 on 27=25.", (3, 1, 0)),
    # back on the chain by copying the correct value rather than the slipped one (70 after writing 71):
    # a non-sequitur whose result 90 is the correct chain's, so a rejoin
    ("#4 -2 on 98=96. #3 *7 on 96=72. #2 -2 on 72=71. #1 *7 on 70=90.", (4, 2, 1)),
    # a miscopied input (69 for 96) with the correct chain's result: a non-sequitur, but no rejoin, since
    # the response had not left the correct chain before it
    ("#4 -2 on 98=96. #3 *7 on 69=72.", (2, 1, 0)),
    # a slip in the first step, then steps that follow from it (72*7=504 -> 04): one non-sequitur
    ("#4 -2 on 98=72. #3 *7 on 72=04.", (2, 1, 0)),
    # steps past the question's count are not checked, and text that is no step is skipped
    ("#4 -2 on 98=96. junk #3 *7 on 96=72. #2 -2 on 72=70. #1 *7 on 70=90. #0 -2 on 90=11.", (4, 0, 0)),
    ("", (0, 0, 0)),
])
def test_check_steps_counts_slips_against_the_responses_own_steps(response, expected):
    assert tuple(check_steps(HAND["question"], response)) == expected
