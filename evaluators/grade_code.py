"""Code: extract the program from a response, append the benchmark's tests, run it in the sandbox.

A sample passes only if the whole program — candidate code, then the tests — runs to the end in
the sandbox (see :mod:`.sandbox`). Programs run in parallel, one sandboxed process each, with
``workers`` at a time.

Program layout:

* HumanEval / HumanEval+ (``style="humaneval"``): if the extracted code defines the entry point, it
  is preceded by the prompt's preamble (the imports and helper functions before the entry point's
  ``def``); otherwise it is taken as the body that completes the prompt (``prompt + code``). Then
  the ``test`` code and ``check(<entry_point>)``.
* MBPP+ (``style="mbpp"``): ``test_imports``, the code, then the ``test`` code (which calls the
  function by name).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from math import comb

from aropd.answers import answer_tags, code_blocks

from .base import Verdict
from .sandbox import Limits, RunResult, isolation_mode, run_program


def extract_code(text: str, entry_point: str | None = None) -> str | None:
    """The code in a response. Where the response has ``<answer>…</answer>`` tags (the trained
    format, ``<answer>```python…```</answer>``), only the last non-empty one is read, else the
    whole response. In it: among fenced blocks (python or unlabelled, as
    :func:`aropd.answers.code_blocks` reads them; an unclosed final fence counts, as a truncated
    response has one), the last that defines ``entry_point``, else the first; with no fence, the
    whole text read. ``None`` when there is no code at all."""
    if not text or not text.strip():
        return None
    tags = [t for t in answer_tags(text) if t.strip()]
    text = tags[-1] if tags else text
    blocks = code_blocks(text)
    py = [b.code for b in blocks if b.language in ("python", "") and b.code.strip()]
    if py:
        if entry_point:
            defining = [b for b in py if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", b, re.M)]
            if defining:
                return defining[-1]
        return py[0]
    if blocks:  # only blocks in other languages
        return None
    return text


def humaneval_program(record: dict, code: str) -> str:
    ep = record["entry_point"]
    prompt = record["prompt"]
    if re.search(rf"^\s*def\s+{re.escape(ep)}\s*\(", code, re.M):
        m = re.search(rf"^def\s+{re.escape(ep)}\s*\(", prompt, re.M)
        body = (prompt[: m.start()] if m else "") + "\n" + code
    else:
        body = prompt + code
    return f"{body}\n\n{record['test']}\n\ncheck({ep})\n"


def mbpp_program(record: dict, code: str) -> str:
    imports = "\n".join(record.get("test_imports") or [])
    return f"{imports}\n{code}\n\n{record['test']}\n"


def build_program(record: dict, code: str) -> str:
    return mbpp_program(record, code) if record.get("style") == "mbpp" else humaneval_program(record, code)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al., 2021): ``1 - C(n-c, k) / C(n, k)``."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def grade_code(responses: list[str], records: list[dict], workers: int | None = None,
               limits: Limits | None = None, mode: str | None = None) -> list[Verdict]:
    """Run each response's program with its record's tests; ``workers`` programs at a time."""
    if len(responses) != len(records):
        raise ValueError(f"{len(responses)} responses for {len(records)} records")
    mode = mode or isolation_mode()
    verdicts: list[Verdict | None] = [None] * len(responses)
    jobs: list[tuple[int, str, str, Limits]] = []
    for i, (resp, rec) in enumerate(zip(responses, records)):
        code = extract_code(resp, rec.get("entry_point"))
        if code is None or not code.strip():
            verdicts[i] = Verdict(False, None, "no answer")
            continue
        lim = limits or Limits(timeout_s=float(rec.get("timeout_s", 10.0)))
        jobs.append((i, code, build_program(rec, code), lim))

    def run(job) -> tuple[int, str, RunResult]:
        i, code, program, lim = job
        try:
            return i, code, run_program(program, lim, mode=mode)
        except Exception as e:  # noqa: BLE001 - a sandbox failure is a failed sample, not a crash
            return i, code, RunResult(False, f"sandbox error: {type(e).__name__}: {e}", 0.0, mode)

    n = max(1, min(workers or default_workers(), len(jobs) or 1))
    with ThreadPoolExecutor(max_workers=n) as ex:
        for i, code, res in ex.map(run, jobs):
            verdicts[i] = Verdict(res.passed, code, res.reason)
    return verdicts  # type: ignore[return-value]
