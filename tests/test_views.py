import pytest

from aropd.views import PromptTemplate, PromptTooLong, partial_view, render, teacher_prompt


@pytest.mark.parametrize(
    "text,ratio,expected",
    [
        ("abc defgh ijk", 0.5, "abc defgh"),  # cut at 7 is inside "defgh": moves to its end
        ("abc defgh ijk", 0.3, "abc"),  # cut at 4 is after a space: prefix right-stripped
        ("abc defgh ijk", 0.0, ""),
        ("abc defgh ijk", 1.0, "abc defgh ijk"),
        ("two words", 0.1, "two words"),  # <= 2 words kept whole
        ("a b c d e f", 0.5, "a b c"),  # ceil(11 * .5) = 6 -> "a b c " -> stripped
        (r"x = \frac{1}{2} then y", 0.25, r"x = \frac"),  # ceil(5.5)=6 splits "\frac": backslash is a word char
        ("12+3=15 15*2=30 30-1=29", 0.5, "12+3=15 15*2"),  # ceil(11.5)=12: '2'|'=' is no word split
        ("12+3=15 15*2=30 30-1=29", 0.35, "12+3=15 15"),  # ceil(8.05)=9: '1'|'5' -> to the end of "15"
    ],
)
def test_partial_view_cut_rules(text, ratio, expected):
    assert partial_view(text, ratio) == expected


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_partial_view_bad_ratio_names_option(ratio):
    with pytest.raises(ValueError, match="partial_ratio"):
        partial_view("a b c", ratio)


def test_template_needs_its_placeholders():
    with pytest.raises(ValueError, match="teacher_user lacks {trace}"):
        PromptTemplate(teacher_user="{question}")


def test_teacher_prompt_shortens_only_the_reasoning(tokenizer):
    t = PromptTemplate()
    q, a = "Start at 5. +3 *2 (mod 100). Result?", "16"
    reasoning = " ".join(f"step{i} 5+3=8" for i in range(40))
    whole = render(tokenizer, t.teacher_messages(q, reasoning, a))
    empty = render(tokenizer, t.teacher_messages(q, "", a))
    budget = (len(whole) + len(empty)) // 2
    out = teacher_prompt(tokenizer, t, q, reasoning, a, budget)
    assert out.truncated and len(out.ids) <= budget
    assert reasoning.startswith(out.reasoning_kept) and 0 < len(out.reasoning_kept) < len(reasoning)
    # One more word would not have fit: the cut keeps as much as the budget allows.
    words = reasoning.split()
    k = len(out.reasoning_kept.split())
    assert len(render(tokenizer, t.teacher_messages(q, " ".join(words[: k + 1]), a))) > budget
    text = tokenizer.decode(out.ids)
    assert q in text and a in text and "Now answer the question" in text and text.endswith("<|assistant|>")
    assert not teacher_prompt(tokenizer, t, q, reasoning, a, len(whole)).truncated
    with pytest.raises(PromptTooLong):
        teacher_prompt(tokenizer, t, q, reasoning, a, len(empty) - 1)
