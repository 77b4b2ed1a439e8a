"""aropd.answers on hand-written text: boxes with nesting and escapes, answer tags, code fences with
languages, and the graders and the materializer reading by the same rules."""

from __future__ import annotations

import pytest

from aropd import materialize as M
from aropd.answers import Box, answer_tags, boxed_answers, code_blocks, find_boxes
from aropd.evaluators.grade_choice import extract_choice
from aropd.evaluators.grade_code import extract_code
from aropd.evaluators.grade_math import extract_math_answer


# -- boxes ---------------------------------------------------------------------------------------------
def test_boxes_nest_and_report_their_spans():
    text = r"So \boxed{\frac{1}{2}} or \fbox{x}"
    # "So " is 3 characters; \boxed{\frac{1}{2}} is 19; " or " 4; \fbox{x} 8
    assert find_boxes(text) == [Box(3, 22, r"\frac{1}{2}", True), Box(26, 34, "x", True)]
    assert boxed_answers(r"\boxed{\boxed{7}}") == [r"\boxed{7}"]  # a box in a box is the outer's content
    assert boxed_answers(r"\boxed{a\{b}") == [r"a\{b"]  # \{ is a literal brace
    assert boxed_answers(r"\boxed{x \\{y}}") == [r"x \\{y}"]  # \\ is a backslash: its { opens a group


@pytest.mark.parametrize("text, boxes", [
    (r"\boxed 5.", [Box(0, 9, "5.", False)]),  # the bare TeX form: up to a space, $ or brace
    (r"$\boxed$", [Box(1, 7, None, False)]),  # nothing boxed
    (r"\boxed{\frac{1}{2", [Box(0, 7, None, True)]),  # never closed (a truncated response)
    (r"\boxed{ \boxed{3}", [Box(0, 7, None, True), Box(8, 17, "3", True)]),  # a complete box inside counts
    (r"\boxedx{1} \boxes{2}", []),  # other commands
])
def test_malformed_boxes_are_reported(text, boxes):
    assert find_boxes(text) == boxes


def test_the_grader_reads_what_the_materializer_writes():
    # the materializer drops a bare or unbalanced box; the grader reads the complete boxes it can
    for solution in (r"We get \boxed 5.", r"so \boxed{ \boxed{3}"):
        with pytest.raises(M.Drop, match="malformed_boxed"):
            M.split_math_solution(solution)
    assert extract_math_answer(r"We get \boxed 5.") == "5"
    assert extract_math_answer(r"so \boxed{ \boxed{3}") == "3"
    # an escaped backslash before a brace: both sides read the same group
    solution = r"Thus \boxed{\begin{matrix}1\\{2}\end{matrix}}."
    reasoning, answer = M.split_math_solution(solution)
    assert answer == r"\begin{matrix}1\\{2}\end{matrix}" == extract_math_answer(solution)
    assert reasoning == r"Thus \begin{matrix}1\\{2}\end{matrix}."
    # \fbox is an answer box on both sides
    assert M.split_math_solution(r"Area is \fbox{12}.") == ("Area is 12.", "12")


# -- answer tags ---------------------------------------------------------------------------------------
def test_answer_tags():
    assert answer_tags("<answer>1</answer> x <ANSWER>\n2\n</Answer>") == ["1", "\n2\n"]
    assert answer_tags("<answer>cut off") == []


# -- code fences ---------------------------------------------------------------------------------------
def test_fences_with_languages():
    text = ("Intro\n```python3\nx = 1\n```\n"  # offsets: "Intro\n" is 6, the block 11 + 6 + 4 more
            "~~~~ {.js}\nlet y\n~~~~\n"
            "```c++ title=main\nint z;\n```\n"
            "```\nplain\n```")
    blocks = code_blocks(text)
    assert [(b.info, b.language, b.code, b.fence) for b in blocks] == [
        ("python3", "python", "x = 1", "```"), ("{.js}", "javascript", "let y", "~~~~"),
        ("c++ title=main", "cpp", "int z;", "```"), ("", "", "plain", "```")]
    assert (blocks[0].start, blocks[0].end) == (6, 27) and text[6:27] == "```python3\nx = 1\n```\n"
    assert blocks[0].fenced == "```python3\nx = 1\n```" and all(b.closed for b in blocks)


def test_fence_rules():
    # a closing fence is at least as long as the opening one: ``` inside a ```` block is code
    assert code_blocks("````md\n```py\nx\n```\n````\n")[0].code == "```py\nx\n```"
    # ```x``` on one line is inline code; a ``` after text on a line opens nothing
    assert code_blocks("Use ```x``` or say ```python here\nno block\n") == []
    # indented fences (a list item) lose that indentation from each code line
    block = code_blocks("1. Step\n   ```py\n   def f():\n       pass\n   ```\n")[0]
    assert block.code == "def f():\n    pass" and block.lines == 2
    # an unclosed fence runs to the end of the text
    last = code_blocks("```python\ndef f():\n    return 1\n")[-1]
    assert (last.closed, last.code) == (False, "def f():\n    return 1")


def test_unclosed_fence_drops_a_training_row_but_is_graded():
    response = "Fix:\n```python\ndef f():\n    return 1\n"
    with pytest.raises(M.Drop, match="unclosed_code_fence"):
        M.split_code_response(response)
    assert extract_code(response, "f") == "def f():\n    return 1"


def test_code_grader_reads_the_answer_tag_of_the_trained_format():
    # the trace puts the fence right after <answer>: the tag's content is read, not the reasoning's blocks
    trace = ("<reasoning>The bug:\n```python\ndef f():\n    return 0\n```\n</reasoning>"
             "<answer>```python\ndef f():\n    return 1\n```</answer>")
    assert extract_code(trace, "f") == "def f():\n    return 1"
    assert extract_code("<answer>def f():\n    return 2</answer>", "f") == "def f():\n    return 2"


# -- choices -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    (r"\boxed{B}", "B"),
    (r"\boxed{(c)}", "C"),
    (r"\boxed{\textbf{D}}", "D"),
    (r"\boxed{ \text{ (A) } }", "A"),
    (r"first \boxed{A}, finally \boxed{\mathrm{C}}", "C"),  # the last box
    (r"\boxed{E}", None),  # not among four options
    (r"\boxed{AB}", None),  # two letters are not one choice
])
def test_choice_letters_in_boxes(text, expected):
    assert extract_choice(text, 4) == expected
