"""Answer extraction (math, choice, code, toy integers) on hand-written responses, and the
math equivalence check through the timeout-guarded worker pool."""

import time
from pathlib import Path

import pytest

from aropd.evaluators.grade_choice import extract_choice, grade_choice
from aropd.evaluators.grade_code import extract_code, pass_at_k
from aropd.evaluators.grade_math import extract_math_answer, grade_integer, grade_math, math_equal
from aropd.evaluators.pool import map_with_timeout


# -- math extraction ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    # rule 1: last top-level box, nested braces kept whole, \fbox too
    (r"first \boxed{\frac{1}{2}} then \boxed{\frac{\sqrt{3}}{2}}.", r"\frac{\sqrt{3}}{2}"),
    (r"so \fbox{42}", "42"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{\boxed{7}}", r"\boxed{7}"),
    (r"answer \boxed 5 done", "5"),
    (r"The answer is 5. But wait, \boxed{6}", "6"),  # a box beats an earlier statement
    (r"<answer>12</answer> and \boxed{13}", "13"),  # box before answer tag in the order
    # a truncated box is not an answer; the next rule applies
    (r"Hence <answer>3</answer> so \boxed{\frac{1}{2", "3"),
    # rule 2: answer tag (last), whitespace stripped
    ("<reasoning>1+1=2</reasoning><answer> 2 </answer>", "2"),
    ("<answer>1</answer> hmm <answer>$-4$</answer>", "-4"),
    # rule 3: statements; the math span is taken, the trailing full stop dropped
    (r"Thus, the answer is $\frac{3}{4}$.", r"\frac{3}{4}"),
    ("Final answer: 12", "12"),
    ("The final answer is:\n**17**", "17"),
    ("The answer is 3. Actually the answer is 4.", "4"),
    # rule 4: GSM8K hashes
    ("so in total\n#### 1,234", "1,234"),
    # rule 5: last line: last math span, else last number
    ("Computation gives 3 then 7\nSo we get 10 apples.", "10"),
    ("we need x\nTherefore $x = 4$ holds", "x = 4"),
    ("-3.5", "-3.5"),
])
def test_math_extraction(text, expected):
    assert extract_math_answer(text) == expected


@pytest.mark.parametrize("text", ["", "   \n ", "I don't know.", "Let me think about this step by step",
                                  r"\boxed{", r"\boxed{}"])
def test_math_no_answer(text):
    assert extract_math_answer(text) is None


def test_grade_math_verdicts_in_worker_processes():
    responses = [r"\boxed{0.5}", "The answer is 1/2", r"\boxed{2}", "no idea at all",
                 r"\boxed{\dfrac{1}{2}}", r"\boxed{x=10}", r"\boxed{\text{Evelyn}}", r"\boxed{(3,\pi/2)}", ""]
    golds = [r"\frac{1}{2}", r"\frac12", "3", "1", r"\frac{1}{2}", "10", r"\text{Evelyn}",
             r"\left( 3, \frac{\pi}{2} \right)", "5"]
    v = grade_math(responses, golds, workers=2)
    assert [x.correct for x in v] == [True, True, False, False, True, True, True, True, False]
    assert [x.reason for x in v] == ["correct", "correct", "wrong answer", "no answer", "correct", "correct",
                                     "correct", "correct", "no answer"]
    assert v[0].extracted == "0.5" and v[3].extracted is None and v[8].extracted is None


def test_math_equal_in_this_thread_and_off_main_thread():
    # math-verify's own alarm-based timeout is off, so it works off the main thread too
    from concurrent.futures import ThreadPoolExecutor

    pairs = [(r"\frac{1}{2}", "0.5"), ("3", "2"), (r"3\sqrt{2}", r"\sqrt{18}"), ("1,000", "1000")]
    with ThreadPoolExecutor(2) as ex:
        got = list(ex.map(lambda p: math_equal(*p), pairs))
    assert got == [True, False, True, True]
    assert grade_math([r"\boxed{\sqrt{18}}"], [r"3\sqrt{2}"], workers=0)[0].correct


def test_pool_timeout_kills_only_the_slow_task():
    t0 = time.monotonic()
    res = map_with_timeout("time:sleep", [(0.01,), (60,), (0.02,)], workers=2, timeout_s=1.5, retries=0)
    assert time.monotonic() - t0 < 20
    assert res == [(True, None), (False, "timeout"), (True, None)]
    err = map_with_timeout("math:sqrt", [(-1.0,), (4.0,)], workers=1, timeout_s=10)
    assert err[0][0] is False and "ValueError" in err[0][1] and err[1] == (True, 2.0)


def test_pool_retries_a_timeout_once_on_a_fresh_worker(tmp_path, monkeypatch):
    # The first try hangs (a loaded machine), the second answers: graded on the second, not a timeout.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent / "fixtures" / "pool"))
    markers = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert map_with_timeout("slow_once:slow_once", [(m,) for m in markers], workers=2, timeout_s=1.5) == [
        (True, "fast"), (True, "fast")]
    # With no retry left, the same hang is a timeout, and the worker that replaced it still serves.
    fresh = str(tmp_path / "c")
    res = map_with_timeout("slow_once:slow_once", [(fresh,), (markers[0],)], workers=1, timeout_s=1.5, retries=0)
    assert res == [(False, "timeout"), (True, "fast")]


def test_math_timeout_reason_names_the_limit_and_tries():
    # A limit no check can meet (a fresh worker's first check imports math-verify, ~1 s): every try
    # times out, and the verdict says which limit was hit and how often.
    v = grade_math([r"\boxed{\frac{1}{2}}"], ["0.5"], workers=1, timeout_s=1e-3, retries=1)
    assert v[0].correct is False and v[0].reason == "grading timeout (0.001 s, 2 tries)"


def test_toy_integer_grading():
    responses = ["<reasoning>73+6=79</reasoning><answer>79</answer>", "73+6=79 79+9=88 88-9=79",
                 "<answer>79.0</answer>", "<answer>79.5</answer>", "<answer>80</answer>", "", "The answer is 79."]
    v = grade_integer(responses, ["79"] * len(responses))
    assert [x.correct for x in v] == [True, True, True, False, False, False, True]
    assert [x.reason for x in v] == ["correct", "correct", "correct", "not an integer", "wrong answer",
                                     "no answer", "correct"]


# -- choice extraction -----------------------------------------------------------------------------------
OPTS = ["Aspirin", "Ibuprofen", "Paracetamol", "Morphine"]


@pytest.mark.parametrize("text, expected", [
    ("<answer>B</answer>", "B"),
    ("<answer>(c)</answer>", "C"),
    ("<answer>D. Morphine</answer>", "D"),
    ("<answer>Ibuprofen</answer>", "B"),
    (r"so \boxed{C}", "C"),
    (r"\boxed{\text{D}}", "D"),
    ("Reasoning...\nThe answer is (B).", "B"),
    ("The answer is: A", "A"),
    ("The answer is A because aspirin inhibits COX.", "A"),
    ("The answer is (a).", "A"),
    ("Answer: D", "D"),
    ("So I choose C.", "C"),
    ("Option B is wrong; the answer is option C", "C"),
    ("I think the answer is B. Actually, the answer is D.", "D"),
    ("The correct answer is Paracetamol.", "C"),
    ("Final answer: **B**", "B"),
    ("Long reasoning here.\nC", "C"),
    ("Long reasoning.\n**(D)**", "D"),
    ("Long reasoning.\nB. Ibuprofen", "B"),
    ("After weighing all four, it is C.", "C"),
])
def test_choice_extraction(text, expected):
    assert extract_choice(text, 4, OPTS) == expected


@pytest.mark.parametrize("text", [
    "The answer is a bacterial infection.",          # the article, lower case
    "A patient presents with fever and the most likely diagnosis is pneumonia.",  # the article, capital
    "The answer is A patient-specific dose.",         # capital article after "answer is"
    "This is due to a deficiency of vitamin A.",      # a letter that is part of a name
    "I am not sure.",                                 # the pronoun
    "a",
    "The answer is E.",                               # not among 4 options
    "",
    "None of these options look right",
])
def test_choice_never_takes_the_article_or_invalid_letters(text):
    assert extract_choice(text, 4, OPTS) is None


def test_grade_choice_verdicts():
    recs = [{"options": OPTS, "answer": "B"}] * 3
    v = grade_choice(["The answer is (B).", "The answer is a guess.", "Answer: C"], recs)
    assert [(x.correct, x.extracted, x.reason) for x in v] == [
        (True, "B", "correct"), (False, None, "no answer"), (False, "C", "wrong answer")]


# -- code extraction -----------------------------------------------------------------------------------
def test_code_extraction():
    # a block's code is the lines between its fences, without the last line break (aropd.answers)
    two = "Here:\n```python\ndef f(x):\n    return x\n```\nUsage:\n```python\nprint(f(1))\n```\n"
    assert extract_code(two, "f") == "def f(x):\n    return x"
    assert extract_code(two, None) == "def f(x):\n    return x"  # first python block
    later = "```python\nimport math\n```\nthen\n```\ndef g():\n    return 1\n```"
    assert extract_code(later, "g") == "def g():\n    return 1"  # the block that defines it
    assert extract_code("```python\ndef f():\n    return 2\n", "f") == "def f():\n    return 2"  # unclosed
    # a fence closes only on a line of its own: "```" inside the code does not end the block
    inner = '```python\ndef f():\n    return "```"\n```\n'
    assert extract_code(inner, "f") == 'def f():\n    return "```"'
    # fences indented in a list item, ~~~ fences and py3 / python:file info strings count as python
    assert extract_code("1. Code:\n    ```py3\n    def f():\n        return 3\n    ```\n", "f") == \
        "def f():\n    return 3"
    assert extract_code("~~~python:sol.py\ndef f():\n    return 4\n~~~", "f") == "def f():\n    return 4"
    assert extract_code("    return x + 1\n", "f") == "    return x + 1\n"  # a bare completion body
    assert extract_code("```bash\nls\n```", "f") is None
    assert extract_code("", "f") is None and extract_code("  \n", "f") is None


def test_pass_at_k_matches_the_closed_form():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c < k
    assert pass_at_k(3, 1, 1) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)
