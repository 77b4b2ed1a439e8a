"""Math answers: extract the final answer from a response, then decide equivalence with ``math-verify``.

Extraction order (the first rule that finds something wins; within a rule the *last* occurrence):

1. ``\\boxed{…}`` / ``\\fbox{…}`` with nested braces (also ``\\boxed 5``); a box inside a box counts
   as part of the outer one, an unbalanced one is skipped. These are :mod:`aropd.answers`' rules,
   the ones the training materializer reads reference answers by.
2. ``<answer>…</answer>`` (a box inside the tag is taken by rule 1 first).
3. "The (final) answer is …" / "Final answer: …" / "Answer: …", up to the end of the line.
4. ``#### …`` (GSM8K style), up to the end of the line.
5. Last-line fallback: on the last non-empty line, the last math span (``$…$``, ``\\(…\\)``,
   ``\\[…\\]``) or else the last number.

Nothing found → ``None`` (graded wrong with reason ``"no answer"``).

Equivalence: exact match after light normalisation first; otherwise ``math_verify.parse`` on both
sides (wrapped in ``$…$``) and ``math_verify.verify``, with math-verify's own ``signal.alarm``
timeouts disabled (``parsing_timeout=None``, ``timeout_seconds=None``) so it runs in any thread;
the timeout is enforced instead by running it in worker processes (:mod:`.pool`) that are killed
when they overrun.
"""

from __future__ import annotations

import logging
import os
import re

from aropd.answers import answer_tags, boxed_answers

from .base import Verdict
from .pool import map_with_timeout

_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?[ \t]*\n?", re.I)


def clean_answer(s: str) -> str:
    """Strip what surrounds an answer but is not part of it: markdown bold, ``$``/``\\(\\)``/
    ``\\[\\]`` delimiters, a trailing full stop, whitespace."""
    s = s.strip()
    for _ in range(3):
        s = s.strip().strip("*").strip()
        m = re.fullmatch(r"\$\$(.*)\$\$|\$(.*)\$|\\\((.*)\\\)|\\\[(.*)\\\]", s, re.S)
        if m:
            s = next(g for g in m.groups() if g is not None)
        s = re.sub(r"[.,;:]+$", "", s.strip())
    return s.strip()


def extract_math_answer(text: str) -> str | None:
    """The final answer in ``text`` per the documented order, cleaned, or ``None``."""
    if not text or not text.strip():
        return None
    boxed = [b for b in boxed_answers(text) if b.strip()]
    if boxed:
        return clean_answer(boxed[-1]) or None
    tags = [t for t in answer_tags(text) if t.strip()]
    if tags:
        return clean_answer(tags[-1]) or None
    said = [text[m.end():].split("\n", 1)[0].strip() for m in _ANSWER_IS.finditer(text)]
    said = [s for s in said if s]
    if said:
        s = said[-1]
        span = _MATH_SPAN.match(s.lstrip("*"))
        if span:  # "The answer is $\frac12$ since ..." -> the math span
            s = next(g for g in span.groups() if g)
        else:  # up to the end of the sentence
            s = re.split(r"\.(?:\s|$)", s)[0]
        return clean_answer(s) or None
    hashes = re.findall(r"####\s*(.+?)\s*(?:\n|$)", text)
    if hashes and hashes[-1].strip():
        return clean_answer(hashes[-1]) or None
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    spans = _MATH_SPAN.findall(last)
    if spans:
        return clean_answer(next(g for g in spans[-1] if g)) or None
    nums = _NUMBER.findall(last)
    if nums:
        return nums[-1].rstrip(".,")
    return None


def _norm(s: str) -> str:
    s = s.replace("\\!", "").replace("\\,", "").replace("\\ ", "").replace("dfrac", "frac").replace("tfrac", "frac")
    s = re.sub(r"\\left|\\right", "", s)
    s = re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r"\1", s)
    return re.sub(r"\s+", "", s).strip("$").rstrip(".")


_quiet = False


def math_equal(gold: str, pred: str) -> bool:
    """``pred`` equals ``gold`` mathematically (``math-verify``, no built-in alarm timeouts)."""
    global _quiet
    if _norm(gold) == _norm(pred):
        return True
    from math_verify import parse, verify

    if not _quiet:  # math-verify warns on every call that its timeout is off: we enforce our own
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        _quiet = True

    def p(s: str):
        s = s.strip()
        return parse(s if s.startswith("$") else f"${s}$", parsing_timeout=None) or parse(s, parsing_timeout=None)

    g, q = p(gold), p(pred)
    if not g or not q:
        return False
    return bool(verify(g, q, timeout_seconds=None))


def default_workers(n_items: int) -> int:
    return max(1, min(4, os.cpu_count() or 1, n_items))


def grade_math(responses: list[str], golds: list[str], workers: int | None = None,
               timeout_s: float = 10.0, retries: int = 1) -> list[Verdict]:
    """One :class:`Verdict` per response. Equivalence checks that are not settled by string match
    run in ``workers`` spawned processes, each check limited to ``timeout_s`` (``workers=0``: in
    this process, without a timeout); a check that times out is tried again ``retries`` times."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses for {len(golds)} records")
    extracted = [extract_math_answer(r) for r in responses]
    verdicts: list[Verdict | None] = [None] * len(responses)
    todo: list[int] = []
    for i, (e, g) in enumerate(zip(extracted, golds)):
        if e is None:
            verdicts[i] = Verdict(False, None, "no answer")
        elif _norm(e) == _norm(str(g)):
            verdicts[i] = Verdict(True, e, "correct")
        else:
            todo.append(i)
    if todo:
        n_workers = default_workers(len(todo)) if workers is None else workers
        res = map_with_timeout("aropd.evaluators.grade_math:math_equal",
                               [(str(golds[i]), extracted[i]) for i in todo], n_workers, timeout_s, retries=retries)
        for i, (ok, val) in zip(todo, res):
            if not ok:
                reason = f"grading timeout ({timeout_s:g} s, {1 + retries} tries)" if val == "timeout" else str(val)
                verdicts[i] = Verdict(False, extracted[i], reason)
            else:
                verdicts[i] = Verdict(bool(val), extracted[i], "correct" if val else "wrong answer")
    return verdicts  # type: ignore[return-value]


_INT = re.compile(r"[-+]?\d+(?:\.\d+)?")


def to_int(s: str | None) -> int | None:
    """The last number in ``s`` if it is an integer (``"79"``, ``"x = 79."``, ``"79.0"``), else None."""
    if s is None:
        return None
    nums = _INT.findall(s.replace(",", ""))
    if not nums:
        return None
    v = float(nums[-1])
    return int(v) if v == int(v) else None


def grade_integer(responses: list[str], golds: list[str]) -> list[Verdict]:
    """The toy task: extract like math, compare the integers exactly."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses for {len(golds)} records")
    out = []
    for r, g in zip(responses, golds):
        e = extract_math_answer(r)
        if e is None:
            out.append(Verdict(False, None, "no answer"))
            continue
        v = to_int(e)
        if v is None:
            out.append(Verdict(False, e, "not an integer"))
        else:
            ok = v == int(str(g).strip())
            out.append(Verdict(ok, e, "correct" if ok else "wrong answer"))
    return out
