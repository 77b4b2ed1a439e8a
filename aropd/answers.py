"""Answers inside text: ``\\boxed{…}`` groups, ``<answer>…</answer>`` tags and fenced code blocks.

One reader per form, shared by the training-set materializer (:mod:`aropd.materialize`), which
splits reference solutions into reasoning and answer, and the graders (:mod:`aropd.evaluators`),
which read a model's response; so an answer written for training is read back by the same rule.
Each reader reports every form it sees, malformed ones included (an unbalanced box, an unclosed
fence): a grader reads what it can from a truncated response, the materializer drops the row.

Rules (where the two earlier readers differed, the choice is noted):

* Boxes: ``\\boxed`` or ``\\fbox`` (the graders' set) followed by a ``{…}`` group. Braces nest; a
  backslash escapes the next character, so ``\\{`` is a literal brace but ``\\\\{`` opens a group
  (the materializer's rule; the graders' look-behind read ``\\\\{`` as literal). A box inside a box
  is part of the outer one. ``\\boxed 5`` (no braces, as TeX allows) boxes the run of characters up
  to a space, ``$`` or brace (the graders read it; the materializer drops the row). A ``{`` never
  closed makes an unbalanced box; the search goes on inside it, so a complete box there still counts.
* Answer tags: the text between ``<answer>`` and the next ``</answer>``, any case.
* Code fences: markdown's rule (the materializer's): a line of three or more ````` ` ````` or ``~``,
  then an info string (no backtick in it after backticks), closed by a line of the same character
  at least as long. Unlike CommonMark, a fence may be indented any amount (models indent fences
  inside list items); that indentation is removed from the code lines. An unclosed fence runs to
  the end of the text (CommonMark's rule; it is how a truncated response ends). A ``` ``` ``` in the
  middle of a line neither opens nor closes a block (the graders' regex took one anywhere, which
  cut a block at a ``"```"`` inside the code).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# -- boxes ---------------------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BARE = re.compile(r"[^\s${}]+")


@dataclass(frozen=True)
class Box:
    start: int  # offset of the backslash
    end: int  # offset just past the closing brace (or the bare argument, or the unclosed ``{``)
    content: str | None  # None: a ``{`` never closed, or nothing after a bare ``\boxed``
    braced: bool  # False for the bare form ``\boxed 5``


def _closing_brace(text: str, i: int) -> int | None:
    """Offset of the ``}`` that closes the ``{`` at ``i``, or None."""
    depth, j = 0, i
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return None


def find_boxes(text: str) -> list[Box]:
    """Every top-level ``\\boxed``/``\\fbox`` in ``text``, in order, malformed ones included."""
    out: list[Box] = []
    pos = 0
    while m := _BOX.search(text, pos):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            j = _closing_brace(text, i)
            if j is None:
                out.append(Box(m.start(), i + 1, None, True))
                pos = i + 1
            else:
                out.append(Box(m.start(), j + 1, text[i + 1 : j], True))
                pos = j + 1
        else:
            bare = _BARE.match(text, i)
            out.append(Box(m.start(), bare.end() if bare else i, bare.group() if bare else None, False))
            pos = bare.end() if bare else i
    return out


def boxed_answers(text: str) -> list[str]:
    """Contents of the readable boxes in ``text``, in order (unbalanced ones skipped)."""
    return [b.content for b in find_boxes(text) if b.content is not None]


# -- answer tags ---------------------------------------------------------------------------------------

_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)


def answer_tags(text: str) -> list[str]:
    """Contents of the ``<answer>…</answer>`` tags in ``text``, in order, as written."""
    return _TAG.findall(text)


# -- fenced code blocks --------------------------------------------------------------------------------

LANGUAGE_ALIASES = {
    "py": "python", "python3": "python", "py3": "python", "js": "javascript", "c++": "cpp", "ts": "typescript"
}
_FENCE_OPEN = re.compile(r"^([ \t]*)(`{3,}|~{3,})(.*)$")


@dataclass
class CodeBlock:
    start: int  # offset of the opening fence line
    end: int  # offset just past the closing fence line (its newline included), or the end of the text
    info: str  # the info string, e.g. "python"
    code: str  # the lines between the fences, without the last line break
    fence: str = "```"  # the opening fence as written (``` or ~~~, three or more)
    closed: bool = True  # False: no closing fence before the end of the text

    @property
    def fenced(self) -> str:
        """The block as markdown: fence and info string, the code, the closing fence."""
        return f"{self.fence}{self.info}\n{self.code}\n{self.fence}"

    @property
    def language(self) -> str:
        """The info string's leading word, lower case, aliases resolved (``py3`` → ``python``);
        ``{python}``, ``.python`` (R Markdown, pandoc) and ``python:main.py`` count as ``python``."""
        word = re.match(r"[{.]*([\w+#-]*)", self.info).group(1).lower()
        return LANGUAGE_ALIASES.get(word, word)

    @property
    def lines(self) -> int:
        """Non-blank code lines."""
        return sum(1 for line in self.code.splitlines() if line.strip())


def code_blocks(text: str) -> list[CodeBlock]:
    """Fenced code blocks of ``text``, in order (see the module docstring for the rule)."""
    blocks, pos = [], 0
    # Lines end at "\n" only: str.splitlines would also end one at a form feed or U+2028 inside code.
    lines = [line for line in re.split(r"(?<=\n)", text) if line]
    i = 0
    while i < len(lines):
        line, start = lines[i], pos
        pos += len(line)
        i += 1
        m = _FENCE_OPEN.match(line.rstrip("\r\n"))
        if not m or (m.group(2)[0] == "`" and "`" in m.group(3)):
            continue  # ```x``` on one line is inline code, not a fence
        indent, fence, info = len(m.group(1)), m.group(2), m.group(3).strip()
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body = []
        while i < len(lines) and not close.match(lines[i].rstrip("\r\n")):
            body.append(re.sub(rf"^[ \t]{{0,{indent}}}", "", lines[i]))
            pos += len(lines[i])
            i += 1
        closed = i < len(lines)
        if closed:
            pos += len(lines[i])
            i += 1
        blocks.append(CodeBlock(start, pos, info, "".join(body).rstrip("\r\n"), fence, closed))
    return blocks
