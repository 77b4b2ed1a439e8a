"""Privileged views of a reference solution and the prompts built from them.

The student sees the question alone. The teacher sees the question plus a trace of the reference
solution, presented as an example response, under one of two views (docs/method.md):

* **full**: the whole reasoning and the final answer;
* **partial**: the first ``ratio`` of the reasoning (cut at a word boundary) and the final answer.

Every prompt here is rendered with the tokenizer's own chat template, and the completion that is
scored is appended to these ids unchanged (see ``aropd.teachers``), so position ``t`` names the same
token for the student and both views.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple


def _is_word_char(ch: str) -> bool:
    # Backslash counts as a word character so a cut never splits a LaTeX command such as \frac.
    return ch.isalnum() or ch in "_\\"


def partial_view(reasoning: str, ratio: float) -> str:
    """The first ``ratio`` of ``reasoning``, ending on a word boundary, right-stripped.

    The cut is at character ``ceil(len * ratio)``; when the characters on both sides of it are word
    characters (letters, digits, ``_`` or ``\\``) it moves forward to the end of that word. Reasoning
    of at most two words is kept whole, and ``ratio == 1`` returns the whole text.
    """
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise ValueError(f"partial_ratio must be in [0, 1], got {ratio}")
    if ratio >= 1.0 or len(reasoning.split()) <= 2:
        return reasoning
    cut = math.ceil(len(reasoning) * ratio)
    if 0 < cut < len(reasoning) and _is_word_char(reasoning[cut - 1]) and _is_word_char(reasoning[cut]):
        while cut < len(reasoning) and _is_word_char(reasoning[cut]):
            cut += 1
    return reasoning[:cut].rstrip()


@dataclass(frozen=True)
class Budgets:
    """Token budgets of one training example: its prompts and its completion."""

    max_prompt_tokens: int = 512
    """The student prompt; a longer question is dropped."""
    max_teacher_tokens: int = 1024
    """Each teacher prompt; the trace's reasoning is shortened to fit."""
    max_new_tokens: int = 128
    """The completion: the rollout length, and where SFT's reference response is cut."""

    @classmethod
    def unlimited(cls) -> Budgets:
        return cls(sys.maxsize, sys.maxsize, sys.maxsize)


@dataclass
class PromptTemplate:
    """How the student and teacher prompts are worded. One template serves both teacher views.

    Placeholders: ``{question}`` and ``{trace}`` in ``teacher_user``; ``{reasoning}`` and ``{answer}``
    in ``trace``. ``trace`` is also the format of the reference response used by SFT, so the student
    learns to answer in the shape the graders read (``<answer>…</answer>``).
    """

    system: str = (
        "You are a careful problem solver. Think step by step inside <reasoning></reasoning>, "
        "then give only the final answer inside <answer></answer>."
    )
    """System message shared by the student and both teacher views (``""`` for none)."""
    teacher_user: str = (
        "{question}\n\nHere is an example response to this question:\n{trace}\n\n"
        "Now answer the question with a response of your own, thinking included."
    )
    """Teacher's user turn: the question, the trace as an example response, then the instruction."""
    trace: str = "<reasoning>{reasoning}</reasoning><answer>{answer}</answer>"
    """How a reasoning and an answer are laid out, in the teacher's trace and the SFT target."""

    def __post_init__(self) -> None:
        problems = []
        for field, keys in (("teacher_user", ("{question}", "{trace}")), ("trace", ("{reasoning}", "{answer}"))):
            problems += [f"template.{field} lacks {k}" for k in keys if k not in getattr(self, field)]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def trace_head(self) -> str:
        """What the trace puts before the reasoning (``<reasoning>`` by default)."""
        return self.trace.split("{reasoning}")[0]

    def _messages(self, user: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": user}]

    def student_messages(self, question: str) -> list[dict[str, str]]:
        return self._messages(question)

    def teacher_messages(self, question: str, reasoning: str, answer: str) -> list[dict[str, str]]:
        trace = self.format_trace(reasoning, answer)
        return self._messages(self.teacher_user.format(question=question, trace=trace))

    def format_trace(self, reasoning: str, answer: str) -> str:
        return self.trace.format(reasoning=reasoning, answer=answer)


def render(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, ending in the assistant header."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class PromptTooLong(ValueError):
    """The question, instruction and answer alone exceed the budget; no trace cut can help."""


class TeacherPrompt(NamedTuple):
    ids: list[int]
    reasoning_kept: str
    truncated: bool


def teacher_prompt(
    tokenizer: Any, template: PromptTemplate, question: str, reasoning: str, answer: str, budget: int
) -> TeacherPrompt:
    """Render a teacher prompt within ``budget`` tokens by shortening the reasoning, never anything else.

    Reasoning is cut after whole words, keeping as many words as fit (binary search: O(log words)
    tokenizations). Raises :class:`PromptTooLong` when even an empty reasoning does not fit.
    """
    ids = render(tokenizer, template.teacher_messages(question, reasoning, answer))
    if len(ids) <= budget:
        return TeacherPrompt(ids, reasoning, False)
    # Word ends as cut points; ``ends[k]`` keeps the first k words.
    ends, in_word = [0], False
    for i, ch in enumerate(reasoning):
        if ch.isspace() and in_word:
            ends.append(i)
        in_word = not ch.isspace()
    lo, hi, best = 0, len(ends) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        kept = reasoning[: ends[mid]].rstrip()
        cand = render(tokenizer, template.teacher_messages(question, kept, answer))
        if len(cand) <= budget:
            best, lo = TeacherPrompt(cand, kept, True), mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise PromptTooLong(f"teacher prompt exceeds {budget} tokens even with no reasoning")
    return best
