"""Multiple choice: find the option letter a response chose.

Order (first rule that finds a valid letter wins; within a rule the last occurrence):

1. ``<answer>…</answer>``: a letter alone (``B``, ``(B)``, ``B.``, ``B) text``), or an option's text.
2. ``\\boxed{B}`` / ``\\boxed{\\text{B}}`` / ``\\boxed{(b)}`` (boxes read by :mod:`aropd.answers`).
3. A statement: "answer is (B)", "Answer: B", "correct option is B", "I choose C", "answer is
   <option text>".
4. A lone letter at the end: the last line is just a letter (``B``, ``(B)``, ``**B.**``,
   ``Answer: B``, ``B. <option text>``) or ends with one after "is"/"be"/"option"/"choice"
   (``…so it is C.``); "…deficiency of vitamin A." is not a choice.

Letters must be among the record's options. Lower-case letters count only when bracketed
(``(b)``) or alone in an answer tag, and an upper-case ``A`` or ``I`` followed by a lower-case word
(``A patient…``, ``I think…``) is read as the article / pronoun, never as an option; the article
"a" is therefore never taken for option A.
"""

from __future__ import annotations

import re

from aropd.answers import answer_tags, boxed_answers

from .base import Verdict

_CONNECTORS = {"because", "since", "as", "which", "and", "with", "given", "due", "for", "is", "was", "seems",
               "would", "should", "here", "in", "from", "or", "but", "so", "then", "to", "on", "at"}
_STATEMENT = re.compile(
    r"(?:answer|option|choice)\s*(?:is|would\s+be|should\s+be|will\s+be|:|=)\s*:?\s*|"
    r"\bI\s+(?:choose|pick|select|go\s+with)\s+(?:option\s+|choice\s+)?",
    re.I)


# A box holding one letter: "C", "(c)", "\\text{D}", "\\textbf{(B)}", "\\mathrm{A}".
_TEX_LETTER = re.compile(r"\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{)?\s*\(?\s*([A-Za-z])\s*\)?\s*\}?\s*")


def _strip_md(s: str) -> str:
    return re.sub(r"[*_`#>]+", "", s).strip()


def _letter_at(s: str, valid: str, strict_case: bool = True) -> str | None:
    """A letter at the very start of ``s`` (after optional "option"/brackets), if it is one."""
    s = _strip_md(s)
    s = re.sub(r"^(?:option|choice)\s+", "", s, flags=re.I)
    m = re.match(r"\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])(?![A-Za-z0-9'])", s)
    if not m:
        return None
    bracketed = m.group(1) or m.group(2)
    letter = bracketed or m.group(3)
    if not bracketed:
        if letter.islower() and strict_case:
            return None
        rest = s[m.end():]
        nxt = re.match(r"\s+([a-z][a-z']*)", rest)
        # "A patient ...", "I think ...": an article or pronoun, not an option (unless "A because")
        if letter in "AI" and nxt and nxt.group(1) not in _CONNECTORS:
            return None
        if re.match(r"\s*[-+*/=^]", rest) and not re.match(r"\s*-\s", rest):  # "A = ..." is algebra
            return None
    letter = letter.upper()
    return letter if letter in valid else None


def _match_text(s: str, options: list[str] | None, valid: str) -> str | None:
    if not options:
        return None
    t = _strip_md(s).rstrip(".").strip().lower()
    hits = [valid[i] for i, o in enumerate(options[: len(valid)]) if t and str(o).strip().lower() == t]
    return hits[0] if len(hits) == 1 else None


def extract_choice(text: str, n_options: int = 4, options: list[str] | None = None) -> str | None:
    """The chosen letter (upper case) or ``None``."""
    if not text or not text.strip():
        return None
    valid = "ABCDEFGHIJKLMNOP"[:n_options]
    for inner in reversed(answer_tags(text)):
        core = _strip_md(inner).strip()
        lone = re.fullmatch(r"\(?([A-Za-z])\)?[.)]?", core)
        if lone and lone.group(1).upper() in valid:
            return lone.group(1).upper()
        hit = _letter_at(core, valid) or _match_text(core, options, valid)
        if hit:
            return hit
    for inner in reversed(boxed_answers(text)):
        lone = _TEX_LETTER.fullmatch(inner)
        if lone and lone.group(1).upper() in valid:
            return lone.group(1).upper()
    hits = []
    for m in _STATEMENT.finditer(text):
        rest = text[m.end():]
        line = rest.split("\n", 1)[0]
        hit = _letter_at(rest, valid) or _match_text(re.split(r"[.;]\s|\n", line)[0], options, valid)
        if hit:
            hits.append(hit)
    if hits:
        return hits[-1]
    lines = [ln for ln in text.strip().splitlines() if _strip_md(ln)]
    if lines:
        last = _strip_md(lines[-1])
        last = re.sub(r"^(?:final\s+)?(?:answer|option|choice)\s*[:\-]?\s*", "", last, flags=re.I)
        m = re.fullmatch(r"\(?([A-Z])\)?[.):]?(?:\s+.*)?", last)
        if m and m.group(1) in valid and (len(last) <= 4 or _letter_at(last, valid)):
            return m.group(1)
        m = re.search(r"(?:^|\b(?i:is|be|option|choice|answer|pick|choose)\s*:?\s*)\(?([A-Z])\)?[.!)]*\s*$", last)
        if m and m.group(1) in valid:
            return m.group(1)
    return None


def grade_choice(responses: list[str], records: list[dict]) -> list[Verdict]:
    """Records carry ``options`` (list of texts) and ``answer`` (the gold letter)."""
    if len(responses) != len(records):
        raise ValueError(f"{len(responses)} responses for {len(records)} records")
    out = []
    for r, rec in zip(responses, records):
        e = extract_choice(r, len(rec["options"]), rec["options"])
        if e is None:
            out.append(Verdict(False, None, "no answer"))
        else:
            ok = e == rec["answer"]
            out.append(Verdict(ok, e, "correct" if ok else "wrong answer"))
    return out
