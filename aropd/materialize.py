"""Turn public sources into aropd training JSONL: ``question``, ``reasoning``, ``answer``.

Each line also carries ``source`` (the source name: ``math``, ``code`` or ``medical``) and
``source_index`` (the row's index in the input split). A manifest ``<out stem>.manifest.json`` is
written next to the output with the counts in and out, every dropped row's index under its reason,
the seed, the arguments and the sha256 of the output.

Sources and how a row is split (every rule below is tested on hand-worked rows):

* ``math`` — NuminaMath-CoT (``AI-MO/NuminaMath-CoT``). The question is ``problem`` and the
  solution ``solution``; a row without both as non-empty strings is read from ``messages``, which
  must be exactly one user turn then one assistant turn. The answer is the content of the last
  ``\\boxed{...}`` or ``\\fbox{...}``, read as the graders read it (:mod:`aropd.answers`: nested
  braces matched, ``\\{``/``\\}`` are literal). The reasoning is the
  solution with every ``\\boxed{X}`` replaced by its content ``X``, so the closing sentence stays
  whole ("the answer is $12$.") and no ``\\boxed`` remains. Dropped: no ``\\boxed`` (``no_boxed``),
  one without a balanced ``{...}`` group, e.g. ``\\boxed 5`` (``malformed_boxed``), an empty one (``empty_answer``),
  several boxes with different contents, which are multi-part answers the last box would silently
  truncate (``multiple_answers``), and a solution that is nothing but the box (``empty_reasoning``).
* ``code`` — Magicoder-Evol-Instruct-110K (``ise-uiuc/Magicoder-Evol-Instruct-110K``). The question
  is ``instruction``; the answer is the *main* fenced code block of ``response`` (fences as
  :mod:`aropd.answers` reads them): among the blocks
  tagged with a language other than ``text``/``output``/``console``… (all blocks when none is), the
  last with at least half as many non-blank lines as the longest. That skips printed output,
  trailing usage examples and leading ``pip install`` lines (short), yet prefers a corrected version
  that follows the original. The answer is that block as written, fences and info string included
  (```` ```python ````…```` ``` ````), the form code graders extract; the reasoning is the rest of the
  response (the text before and after the block, other blocks included). Dropped: no fenced
  block with code (``no_code``; indented or inline code is not promoted to an answer), an unclosed
  fence (``unclosed_code_fence``), no text besides the block (``empty_reasoning``), and with
  ``--code-language`` a main block in another language (``code_language``).
* ``medical`` — MedMCQA (``openlifescienceai/medmcqa``). The question is ``question`` followed by
  the options as ``A. opa`` … ``D. opd``, one per line; the answer is the letter of ``cop`` (an int
  0–3). The reasoning is ``exp`` with leading answer cues removed: "Ans. a.", "Ans-B", "Ans is 'c'
  i.e.", "Answer is (d)", "Correct option: C", "Option C is correct", a bare "(c)" or "c." label, and
  the correct option's text right after such a cue or, at the very start, as a label (followed by
  punctuation, a bracket, a double space or the end). See :func:`clean_explanation` for the leak
  rule that drops what remains (``leaks_answer``, ``answer_mismatch``, ``multiple_answer_cue``).
  Also dropped: no label (``no_answer``: ``cop`` null or -1, as in the unlabelled test split), an
  empty option (``empty_option``), the correct option's text repeated under another letter
  (``duplicate_options``), and an empty explanation (``empty_explanation``).

A row in an unexpected schema (a field missing or of the wrong type) is dropped as ``bad_schema``,
never repaired. With ``--tokenizer``, rows are dropped when the student prompt, the full-view
teacher prompt (unshortened) or the reference response (the template's trace plus EOS) exceeds its
budget. Each dropped row counts under the first reason that applies, so the counts add up.

``--limit N --seed S`` ranks rows by ``sha256(f"{S}:{source_index}")`` and keeps the first N rows in
that order that pass every filter: a deterministic function of the seed and the input, whatever the
processing order, and only about N rows are converted. Output lines are in ``source_index`` order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from aropd.answers import LANGUAGE_ALIASES, Box, CodeBlock, code_blocks, find_boxes
from aropd.io import RecordError, Records, atomic_writes, open_records
from aropd.views import Budgets, PromptTemplate, render

# The paper's completion budget; the prompt budgets are the training defaults.
DEFAULT_BUDGETS = Budgets(max_new_tokens=1024)


class MaterializeError(Exception):
    """A problem with the command or its input; nothing has been written."""


class Drop(Exception):
    """This row is not turned into an example; ``reason`` names why (a manifest key)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


Example = tuple[str, str, str]  # question, reasoning, answer


def _text(row: dict[str, Any], key: str, reason: str = "bad_schema") -> str:
    """``row[key]`` as a string; a missing, null or non-string field drops the row."""
    value = row.get(key)
    if not isinstance(value, str):
        raise Drop(reason)
    return value


def _has_alnum(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


# --------------------------------------------------------------------------------------------------
# math: NuminaMath-CoT


def find_boxed(text: str) -> list[Box]:
    """Every top-level box in ``text`` (:func:`aropd.answers.find_boxes`); a bare ``\\boxed 5`` or an
    unbalanced group drops the row (``malformed_boxed``): unboxing the reasoning needs its braces."""
    boxes = find_boxes(text)
    if any(not b.braced or b.content is None for b in boxes):
        raise Drop("malformed_boxed")
    return boxes


def unbox(text: str) -> str:
    """``text`` with every ``\\boxed{X}`` replaced by ``X`` (nested boxes too)."""
    parts, last = [], 0
    for b in find_boxed(text):
        parts += [text[last : b.start], unbox(b.content).strip()]
        last = b.end
    return "".join(parts) + text[last:]


def split_math_solution(solution: str) -> tuple[str, str]:
    """``(reasoning, answer)`` of a solution: the last box's content, and the text with boxes unboxed."""
    boxes = find_boxed(solution)
    if not boxes:
        raise Drop("no_boxed")
    answer = unbox(boxes[-1].content).strip()
    if not answer:
        raise Drop("empty_answer")
    if len({re.sub(r"\s+", "", unbox(b.content)) for b in boxes}) > 1:
        raise Drop("multiple_answers")
    outside = "".join(solution[prev.end : b.start] for prev, b in zip([Box(0, 0, "", True)] + boxes, boxes))
    if not _has_alnum(outside + solution[boxes[-1].end :]):
        raise Drop("empty_reasoning")
    return unbox(solution).strip(), answer


def _math_question_solution(row: dict[str, Any]) -> tuple[str, str]:
    problem, solution, messages = row.get("problem"), row.get("solution"), row.get("messages")
    both = isinstance(problem, str) and isinstance(solution, str)
    if both and ((problem.strip() and solution.strip()) or messages is None):
        return problem, solution
    if messages is None:
        raise Drop("bad_schema")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise Drop("bad_schema")
    if [m["role"] for m in messages] != ["user", "assistant"]:
        raise Drop("bad_schema")
    return messages[0]["content"], messages[1]["content"]


def convert_math(row: dict[str, Any]) -> Example:
    question, solution = _math_question_solution(row)
    if not question.strip():
        raise Drop("empty_question")
    reasoning, answer = split_math_solution(solution)
    return question.strip(), reasoning, answer


# --------------------------------------------------------------------------------------------------
# code: Magicoder-Evol-Instruct-110K


def fenced_blocks(text: str) -> list[CodeBlock]:
    """Fenced code blocks (:func:`aropd.answers.code_blocks`); an unclosed fence drops the row."""
    blocks = code_blocks(text)
    if any(not b.closed for b in blocks):
        raise Drop("unclosed_code_fence")
    return blocks


# Info strings of blocks that show output or prose rather than code.
_NOT_CODE = {"", "text", "txt", "plaintext", "plain", "output", "out", "console", "log", "none", "shell-session"}


def main_block(blocks: list[CodeBlock]) -> CodeBlock:
    """The main code block: among the blocks tagged with a programming language (all blocks when none
    is), the last one with at least half as many non-blank lines as the longest."""
    candidates = [b for b in blocks if b.lines > 0]
    if not candidates:
        raise Drop("no_code")
    tagged = [b for b in candidates if b.language not in _NOT_CODE]
    candidates = tagged or candidates
    longest = max(b.lines for b in candidates)
    return [b for b in candidates if 2 * b.lines >= longest][-1]


def split_code_response(response: str, languages: Iterable[str] | None = None) -> tuple[str, str]:
    """``(reasoning, answer)``: the main block (fenced, as written), and the response without it."""
    block = main_block(fenced_blocks(response))
    if languages is not None:
        allowed = {LANGUAGE_ALIASES.get(x.lower(), x.lower()) for x in languages}
        if block.language not in allowed:
            raise Drop("code_language")
    before, after = response[: block.start].rstrip(), response[block.end :].strip()
    reasoning = (before + "\n\n" + after).strip() if before and after else (before or after).strip()
    if not _has_alnum(reasoning):
        raise Drop("empty_reasoning")
    return reasoning, block.fenced


def convert_code(row: dict[str, Any], languages: Iterable[str] | None = None) -> Example:
    question, response = _text(row, "instruction"), _text(row, "response")
    if not question.strip():
        raise Drop("empty_question")
    reasoning, answer = split_code_response(response, languages)
    return question.strip(), reasoning, answer


# --------------------------------------------------------------------------------------------------
# medical: MedMCQA

LETTERS = "ABCD"
_OPTION_KEYS = ("opa", "opb", "opc", "opd")
_OPEN = r"[(\[{'\"‘’“”`]"
_CLOSE = r"[)\]}'\"‘’“”`]"
_SEP = r"[\s.:;,\-–—=>]*"
# A cue word: "Ans", "Ans.", "Answer", "Answers", "Option", "Opt.", "Choice", optionally after
# "(the) correct/right/true/best". "ans…" or an adjective makes it strong: it asserts the answer.
_CUE = re.compile(
    r"(?:the\s+)?(?P<adj>(?:correct|right|true|best)\s+)?(?P<word>ans(?:wer)?s?|options?|opt|choices?)\b\.?",
    re.IGNORECASE,
)
_IS = re.compile(rf"{_SEP}(?:(?:is|was)\b{_SEP})?(?:(?:option|opt|choice)\b\.?\s*)?", re.IGNORECASE)
_AFFIRM = re.compile(
    r"\s*(?:is|was)?\s*(?:the\s+)?(?:correct|right|true|best|answer)\b"
    r"(?:\s+(?:answer|option|choice|one|response|statement))?",
    re.IGNORECASE,
)
_IE = re.compile(r"[\s,.:;\-–—]*(?:\bi\.?\s?e\b\.?|\bviz\b\.?|\bthat is\b)", re.IGNORECASE)
_JUNK = " \t\r\n.:;,-–—*#>=|"
# After a letter: what makes a letter a label ("a." "a)" "(a)" "'a'") rather than the article "a".
_LETTER_END = re.compile(r"(?=\s*$|\s*[.:;,)\]}\-–—(\[]|\s+i\.?\s?e\b|Ref)", re.IGNORECASE)
_MULTI = re.compile(
    rf"\s*(?:,|&|/|\+|\band\b|\bor\b)\s*{_OPEN}?\s*[a-dA-D]"
    rf"(?:\s*{_CLOSE}|(?=\s*(?:$|[.,;:&/+]|\band\b|\bor\b)|\s+[A-Z]))",
    re.IGNORECASE,
)


def _option_words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text)


def _option_pattern(text: str) -> re.Pattern[str]:
    """An option's text as written in an explanation: its letters and digits in order, with case, spaces
    and punctuation free ("Vitamin B12" ~ "vitamin B-12", "C. difficile" ~ "C difficile"), ending at a
    word boundary or where glued text starts a capitalised word ("tamponadeBeck's")."""
    chars = "".join(_option_words(text))
    if not chars:
        return re.compile(r"(?!)")
    return re.compile(r"[\W_]*".join(map(re.escape, chars)) + r"(?-i:(?![^\W_A-Z]))", re.IGNORECASE)


@dataclass
class _Options:
    texts: list[str]
    correct: int
    patterns: list[re.Pattern[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.patterns = [_option_pattern(t) for t in self.texts]
        self.by_length = sorted(range(4), key=lambda k: -len(self.texts[k]))

    def at(self, text: str) -> tuple[int, int] | None:
        """``(option index, end)`` of the (longest) option text at the start of ``text``, in brackets or not."""
        m0 = re.match(rf"\s*{_OPEN}?\s*", text)
        for k in self.by_length:
            m = self.patterns[k].match(text, m0.end())
            if m:
                end = m.end()
                mc = re.match(rf"\s*{_CLOSE}", text[end:]) if m0.group().strip() else None
                return k, end + (mc.end() if mc else 0)
        return None


def _letter(text: str, after_option_word: bool, opts: _Options) -> tuple[int, int] | None:
    """``(letter index, end)`` when ``text`` opens with an option letter used as a label."""
    m = re.match(rf"\s*(?P<open>{_OPEN}?)\s*(?P<L>[a-dA-D])\s*(?P<close>{_CLOSE}?)", text)
    if not m:
        return None
    k, end = LETTERS.index(m.group("L").upper()), m.end()
    bracketed = bool(m.group("open") or m.group("close"))
    if bracketed or after_option_word or _LETTER_END.match(text, end):
        return k, end
    # "Ans. a Cardiac tamponade": the letter followed by that option's text
    hit = opts.at(text[end:])
    return (k, end) if hit and hit[0] == k else None


def _bare_label(text: str) -> tuple[int, int] | None:
    """A leading "(a)", "a)", "'a'", "a." or "a:" label followed by something capitalised, a bracket,
    "i.e." or the end; "C. difficile" (lowercase after the dot) is a genus, not a label."""
    m = re.match(
        rf"(?:{_OPEN}\s*(?P<L1>[a-dA-D])\s*{_CLOSE}"
        rf"|(?P<L2>[a-dA-D])\s*[.):](?=\s*$|\s*[A-Z0-9(\['\"‘“]|\s*i\.?\s?e\b)"
        rf"|(?P<L3>[a-dA-D])(?=\s+i\.?\s?e\b))",
        text,
    )
    if not m:
        return None
    letter = m.group("L1") or m.group("L2") or m.group("L3")
    return LETTERS.index(letter.upper()), m.end()


def _after_cue(text: str, opts: _Options) -> str:
    """Strip what follows a cue naming the correct answer: "i.e.", "is correct", the option's text."""
    for _ in range(3):
        before = text
        for pat in (_AFFIRM, _IE):
            m = pat.match(text)
            if m:
                text = text[m.end() :]
        text = text.lstrip(_JUNK)
        hit = opts.at(text)
        if hit:
            if hit[0] != opts.correct:
                raise Drop("answer_mismatch")
            if re.match(r"[ \t]+[a-z]", text[hit[1] :]):
                raise Drop("leaks_answer")  # "Ans. Atropine is the drug of choice": a sentence about the answer
            text = text[hit[1] :]
        text = text.lstrip(_JUNK)
        if text == before:
            break
    return text


def _strip_leading_cue(text: str, opts: _Options) -> str | None:
    """``text`` with one leading answer cue removed, or None when it opens with none."""
    text = text.lstrip(_JUNK)
    m = _CUE.match(text)
    if m:
        strong = bool(m.group("adj")) or m.group("word").lower().startswith("ans")
        rest = text[m.end() :]
        mi = _IS.match(rest)
        after_is, option_word = rest[mi.end() :], bool(re.search(r"(?:option|opt|choice)", mi.group(), re.I))
        option_word = option_word or not m.group("word").lower().startswith("ans")
        hit = opts.at(after_is) if strong else None
        if hit:
            # "Ans. Cardiac tamponade", "Answer: (Cardiac tamponade)"
            if hit[0] != opts.correct:
                raise Drop("answer_mismatch")
            return _after_cue(after_is, opts)
        lt = _letter(after_is, option_word, opts)
        if lt:
            k, end = lt
            tail = after_is[end:]
            if _MULTI.match(tail):
                raise Drop("multiple_answer_cue")
            affirmed = bool(_AFFIRM.match(tail))
            if k == opts.correct and (strong or affirmed or option_word):
                return _after_cue(tail, opts)
            if k != opts.correct and (strong or affirmed):
                raise Drop("answer_mismatch")
            return None  # "Option B: ..." discussing a distractor
        if strong and re.match(r"\s*[.:\-–—=]", rest):
            return rest.lstrip(_JUNK)  # "Ans." / "Answer:" with the answer given some other way
        return None
    lab = _bare_label(text)
    if lab:
        k, end = lab
        if k == opts.correct:
            return _after_cue(text[end:], opts)
        hit = opts.at(text[end:].lstrip(_JUNK))
        if hit and hit[0] == k:
            raise Drop("answer_mismatch")  # "b. <option b>" when the key says otherwise
        return None
    hit = opts.at(text)
    if hit and hit[0] == opts.correct and re.match(r"\s*(?:$|[.:;,\-–—(\[\n]|\s\s|Ref)", text[hit[1] :]):
        return text[hit[1] :].lstrip(_JUNK)  # the correct option as a label: "Cardiac tamponade. ..."
    return None


_ANS_ANYWHERE = re.compile(
    r"(?<![A-Za-z])(?P<adj>(?:correct|right|true|best)\s+)?(?P<word>ans(?:wer)?s?|options?|opt|choices?)\b\.?", re.I
)


def _leaks(text: str, opts: _Options) -> None:
    """Raise ``Drop`` when ``text`` still gives the answer away (see :func:`clean_explanation`)."""
    hit = opts.at(text)
    if hit and hit[0] == opts.correct:
        raise Drop("leaks_answer")
    for m in _ANS_ANYWHERE.finditer(text):
        strong = bool(m.group("adj")) or m.group("word").lower().startswith("ans")
        rest = text[m.end() :]
        mi = _IS.match(rest)
        after_is = rest[mi.end() :]
        option_word = bool(re.search(r"(?:option|opt|choice)", mi.group(), re.I)) or not strong
        if strong and opts.at(after_is) and opts.at(after_is)[0] == opts.correct:
            raise Drop("leaks_answer")
        lt = _letter(after_is, option_word, opts)
        if not lt:
            continue
        k, end = lt
        affirmed = bool(_AFFIRM.match(after_is[end:]))
        if k == opts.correct and (strong or affirmed):
            raise Drop("leaks_answer")
        if k != opts.correct and strong:
            raise Drop("answer_mismatch")
    for m in re.finditer(rf"{_OPEN}\s*([a-dA-D])\s*{_CLOSE}", text):
        if LETTERS.index(m.group(1).upper()) == opts.correct and _AFFIRM.match(text, m.end()):
            raise Drop("leaks_answer")  # "... (c) is correct ..."


def clean_explanation(exp: str, options: list[str], correct: int) -> str:
    """The explanation with leading answer cues removed; raises ``Drop`` when it still leaks.

    Leading cues are removed repeatedly (see the module docstring). A cue naming a *different*
    letter or option text than the key drops the row as ``answer_mismatch`` (the label or the
    explanation is wrong); a cue naming several letters drops it as ``multiple_answer_cue``.

    The leak rule, applied to what remains: the row is dropped as ``leaks_answer`` when
    (1) it opens with the correct option's text (even as a sentence's subject: the reasoning would
    announce the answer before deriving it); or (2) anywhere in it, an "ans"/"answer" cue (or
    "correct/right/true/best option/choice") names the correct letter ("... hence ans is c") or the
    correct option's text ("answer is Cardiac tamponade"); or (3) an option letter is affirmed —
    "option c is correct", "(c) is the answer", "choice C is true" — for the correct letter.
    An "ans" cue naming another letter anywhere drops it as ``answer_mismatch``. The correct option's
    text *later* in the explanation is kept: that is the justification the reasoning is for.
    Empty after removal (or empty to begin with): ``empty_explanation``.
    """
    opts = _Options(options, correct)
    text = exp.strip()
    for _ in range(8):
        stripped = _strip_leading_cue(text, opts)
        if stripped is None or stripped == text:
            break
        text = stripped
    text = text.strip()
    if not _has_alnum(text):
        raise Drop("empty_explanation")
    _leaks(text, opts)
    return text


def format_medical_question(question: str, options: list[str]) -> str:
    return question.strip() + "\n\n" + "\n".join(f"{L}. {o.strip()}" for L, o in zip(LETTERS, options))


def convert_medical(row: dict[str, Any]) -> Example:
    question = _text(row, "question")
    options = [_text(row, k) for k in _OPTION_KEYS]
    cop = row.get("cop")
    if cop is None or cop == -1:
        raise Drop("no_answer")  # the unlabelled test split has cop = -1
    if isinstance(cop, bool) or not isinstance(cop, int) or not 0 <= cop <= 3:
        raise Drop("bad_schema")
    exp = row.get("exp")
    if exp is not None and not isinstance(exp, str):
        raise Drop("bad_schema")
    if not question.strip():
        raise Drop("empty_question")
    if not all(o.strip() for o in options):
        raise Drop("empty_option")
    norm = [" ".join(_option_words(o.lower())) for o in options]
    if norm.count(norm[cop]) > 1:
        raise Drop("duplicate_options")  # the correct text names two letters: nothing to check cues by
    if exp is None or not _has_alnum(exp):
        raise Drop("empty_explanation")
    reasoning = clean_explanation(exp, options, cop)
    return format_medical_question(question, options), reasoning, LETTERS[cop]


# --------------------------------------------------------------------------------------------------
# sources, reading, subsets, length filter


@dataclass(frozen=True)
class Source:
    name: str
    hub_id: str
    columns: tuple[str, ...]  # the columns a converter reads (others are not decoded)
    convert: Callable[..., Example]


SOURCES = {
    "math": Source("math", "AI-MO/NuminaMath-CoT", ("problem", "solution", "messages"), convert_math),
    "code": Source("code", "ise-uiuc/Magicoder-Evol-Instruct-110K", ("instruction", "response"), convert_code),
    "medical": Source(
        "medical", "openlifescienceai/medmcqa", ("question", *_OPTION_KEYS, "cop", "exp"), convert_medical
    ),
}
ALIASES = {"numinamath": "math", "numina": "math", "magicoder": "code", "medmcqa": "medical"}


def get_source(name: str) -> Source:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SOURCES:
        raise MaterializeError(f"unknown source {name!r}; choose one of {sorted(SOURCES)} (aliases: {ALIASES})")
    return SOURCES[key]


def load_rows(input: str, split: str = "train", cache_dir: str | None = None) -> Records:
    """The rows of ``input`` (:func:`aropd.io.open_records`: a local file or folder, or a hub id). Any
    failure becomes a :class:`MaterializeError` naming ``input``."""
    try:
        return open_records(input, split, cache_dir=cache_dir)
    except (FileNotFoundError, RecordError) as e:  # their messages name the file and the line
        raise MaterializeError(f"cannot read input: {e}") from e
    except Exception as e:  # the hub: no network, gated, no such split...
        raise MaterializeError(f"cannot read input {input!r}: {type(e).__name__}: {e}") from e


def subset_key(seed: int, index: int) -> bytes:
    """The rank of row ``index`` under ``seed``: rows are taken in increasing key order."""
    return hashlib.sha256(f"{seed}:{index}".encode()).digest()[:16]


def row_order(n: int, seed: int, limit: int | None) -> Iterator[int]:
    if limit is None:
        return iter(range(n))
    return iter(sorted(range(n), key=lambda i: subset_key(seed, i)))


class LengthFilter:
    """Token lengths of the three things training builds from an example, against their budgets."""

    def __init__(self, tokenizer: Any, template: PromptTemplate, budgets: Budgets):
        self.tok, self.template, self.budgets = tokenizer, template, budgets
        self.max_seen = {"student_prompt": 0, "teacher_prompt": 0, "completion": 0}

    def _measures(self, question: str, reasoning: str, answer: str):
        eos = 1 if self.tok.eos_token_id is not None else 0  # the datamodule ends each SFT target with EOS
        yield "student_prompt", lambda: len(render(self.tok, self.template.student_messages(question)))
        yield "teacher_prompt", lambda: len(
            render(self.tok, self.template.teacher_messages(question, reasoning, answer))
        )
        trace = self.template.format_trace(reasoning, answer)
        yield "completion", lambda: len(self.tok(trace, add_special_tokens=False)["input_ids"]) + eos

    def lengths(self, question: str, reasoning: str, answer: str) -> dict[str, int]:
        return {key: measure() for key, measure in self._measures(question, reasoning, answer)}

    def check(self, example: Example) -> None:
        """Raise ``Drop`` for the first length over its budget (measured in this order, lazily)."""
        b = self.budgets
        budgets = {"student_prompt": b.max_prompt_tokens, "teacher_prompt": b.max_teacher_tokens,
                   "completion": b.max_new_tokens}
        n = {}
        for key, measure in self._measures(*example):
            n[key] = measure()
            if n[key] > budgets[key]:
                raise Drop(f"{key}_too_long")
        for key in n:
            self.max_seen[key] = max(self.max_seen[key], n[key])


def load_template(path: str | None) -> PromptTemplate:
    """A :class:`PromptTemplate` from a YAML/JSON file: its fields, or a fit config's
    ``data.init_args.template`` (with or without ``init_args``)."""
    if path is None:
        return PromptTemplate()
    import yaml

    try:
        spec = yaml.safe_load(Path(path).read_text())
    except Exception as e:
        raise MaterializeError(f"cannot read template {path!r}: {e}") from e
    if isinstance(spec, dict) and "data" in spec:
        spec = ((spec.get("data") or {}).get("init_args") or {}).get("template") or {}
    if isinstance(spec, dict) and "init_args" in spec:
        spec = spec["init_args"] or {}
    known = {f.name for f in fields(PromptTemplate)}
    if not isinstance(spec, dict) or set(spec) - known:
        raise MaterializeError(f"template {path!r} must map {sorted(known)}; got {spec!r}")
    try:
        return PromptTemplate(**spec)
    except ValueError as e:
        raise MaterializeError(f"template {path!r}: {e}") from e


# --------------------------------------------------------------------------------------------------
# the run


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".manifest.json")


def materialize(
    source: str,
    out: str | Path,
    input: str | None = None,
    *,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    tokenizer: str | None = None,
    budgets: Budgets | None = None,
    template: str | None = None,
    code_languages: list[str] | None = None,
    cache_dir: str | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> dict[str, Any]:
    """Write ``out`` (JSONL) and its manifest; return the manifest. See the module docstring."""
    args = {k: v for k, v in locals().items() if k != "log"}
    args["budgets"], args["out"] = asdict(budgets or DEFAULT_BUDGETS), str(out)
    src = get_source(source)
    out = Path(out)
    if out.suffix != ".jsonl":
        raise MaterializeError(f"output {str(out)!r} must end in .jsonl")
    if out.is_dir():
        raise MaterializeError(f"output {str(out)!r} is a folder")
    if limit is not None and limit < 1:
        raise MaterializeError(f"--limit must be at least 1, got {limit}")
    input = input or src.hub_id
    tpl = load_template(template)
    lengths = None
    if tokenizer is not None:
        from aropd.models import load_tokenizer

        try:
            tok = load_tokenizer(tokenizer)
        except Exception as e:
            raise MaterializeError(f"cannot load tokenizer {tokenizer!r}: {type(e).__name__}: {e}") from e
        lengths = LengthFilter(tok, tpl, budgets or DEFAULT_BUDGETS)
    ds = load_rows(input, split, cache_dir)
    if not set(src.columns) & set(ds.columns):
        raise MaterializeError(
            f"input {input!r} has none of the {src.name} columns {list(src.columns)} (it has {ds.columns})"
        )
    ds = ds.select(src.columns)
    try:  # fail now, not after the whole input has been processed
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MaterializeError(f"cannot create the output folder {str(out.parent)!r}: {e}") from e
    convert = (lambda row: convert_code(row, code_languages)) if src.name == "code" else src.convert

    drops: dict[str, list[int]] = {}
    counts = {"examined": 0, "out": 0}

    def converted() -> Iterator[dict[str, Any]]:
        """Examples in processing order; rows that fail a rule go to ``drops``."""
        for i in row_order(len(ds), seed, limit):
            if limit is not None and counts["out"] >= limit:
                return
            counts["examined"] += 1
            try:
                example = convert(ds[i])
                if lengths is not None:
                    lengths.check(example)
            except Drop as d:
                drops.setdefault(d.reason, []).append(i)
                continue
            except Exception as e:
                raise RuntimeError(f"{src.name} row {i} of {input!r}: {type(e).__name__}: {e}") from e
            counts["out"] += 1
            q, r, a = example
            yield {"question": q, "reasoning": r, "answer": a, "source": src.name, "source_index": i}

    # Without --limit rows are processed in index order and streamed to disk; a subset (at most
    # `limit` records) is collected, then written in index order.
    records = converted() if limit is None else iter(sorted(converted(), key=lambda rec: rec["source_index"]))

    def manifest() -> dict[str, Any]:
        if limit is not None and counts["out"] < limit:
            log(f"warning: only {counts['out']} of {len(ds)} rows pass the filters, fewer than --limit {limit}")
        length_filter = None
        if lengths is not None:
            length_filter = {"tokenizer": tokenizer, **asdict(lengths.budgets), "completion_counts_eos": True}
            length_filter["max_kept"] = lengths.max_seen
        return {
            "source": src.name,
            "input": input,
            "split": split,
            "input_fingerprint": ds.fingerprint,
            "rows_in": len(ds),
            "rows_examined": counts["examined"],
            "rows_out": counts["out"],
            "rows_dropped": sum(len(v) for v in drops.values()),
            "dropped": {k: {"count": len(v), "indices": sorted(v)} for k, v in sorted(drops.items())},
            "seed": seed,
            "limit": limit,
            "subset": "all rows"
            if limit is None
            else f"the first {limit} rows that pass, in order of sha256('{seed}:<source_index>')",
            "length_filter": length_filter,
            "template": asdict(tpl),
            "args": args,
            "outputs": {},
        }

    return _write_atomic(out, records, manifest)


def _write_atomic(out: Path, records: Iterable[dict[str, Any]], make_manifest: Callable[[], dict[str, Any]]) -> dict:
    """Write ``out``, then its manifest (which holds the output's size and sha256), and move both into
    place only when both are complete (:func:`aropd.io.atomic_writes`). On any error an existing
    output is left as it was."""
    with atomic_writes(out, manifest_path(out), binary=True) as (f, m):
        n, size, digest = 0, 0, hashlib.sha256()
        for rec in records:
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
            f.write(line)
            n, size = n + 1, size + len(line)
            digest.update(line)
        manifest = make_manifest()
        manifest["outputs"] = {out.name: {"rows": n, "bytes": size, "sha256": digest.hexdigest()}}
        m.write((json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n").encode())
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="materialize",
        description="Write aropd training JSONL (question, reasoning, answer) and a manifest from a public source.",
        epilog="Sources: math = AI-MO/NuminaMath-CoT, code = ise-uiuc/Magicoder-Evol-Instruct-110K, "
        "medical = openlifescienceai/medmcqa. The rules are in aropd/materialize.py's docstring.",
    )
    p.add_argument("source", help=f"one of {sorted(SOURCES)} (aliases: {', '.join(ALIASES)})")
    p.add_argument("--out", required=True, help="output JSONL; the manifest goes next to it as <stem>.manifest.json")
    p.add_argument(
        "--input", help="hub id, or a local JSONL/parquet file or saved dataset folder (default: the source's hub id)"
    )
    p.add_argument("--split", default="train", help="split of a hub id or saved DatasetDict (default: train)")
    p.add_argument("--limit", type=int, help="keep a seeded random subset of this many examples (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset (default: 0)")
    p.add_argument("--tokenizer", help="the student's tokenizer (hub id or folder); enables the length filters")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="student prompt budget (default: 512)")
    p.add_argument(
        "--max-teacher-tokens", type=int, default=1024, help="full-view teacher prompt budget (default: 1024)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=1024,
        help="completion budget: the reference response, EOS included, as the model's max_new_tokens (default: 1024)",
    )
    p.add_argument("--template", help="YAML with PromptTemplate fields, or a fit config with data.init_args.template")
    p.add_argument("--code-language", action="append", help="code: keep only main blocks in this language (repeatable)")
    p.add_argument("--cache-dir", help="datasets cache folder")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        manifest = materialize(
            a.source,
            a.out,
            a.input,
            split=a.split,
            limit=a.limit,
            seed=a.seed,
            tokenizer=a.tokenizer,
            budgets=Budgets(a.max_prompt_tokens, a.max_teacher_tokens, a.max_new_tokens),
            template=a.template,
            code_languages=a.code_language,
            cache_dir=a.cache_dir,
        )
    except MaterializeError as e:
        print(f"materialize: error: {e}", file=sys.stderr)
        return 2
    drops = ", ".join(f"{k} {v['count']}" for k, v in manifest["dropped"].items()) or "none"
    print(
        f"{manifest['source']}: {manifest['rows_out']} examples from {manifest['rows_examined']} rows examined "
        f"of {manifest['rows_in']} -> {a.out} (dropped: {drops})",
        file=sys.stderr,
    )
    return 0
