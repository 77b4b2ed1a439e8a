"""``aropd-score``: grade already generated responses without a model.

    aropd-score --benchmark humaneval --responses samples.jsonl --out scored/ [--data problems.jsonl]

``--responses`` is a JSONL file with one object per sample: ``id`` (the value of the benchmark's id
field, e.g. HumanEval's ``task_id``) and ``response`` (the model's raw text). Several lines with the
same id are several samples of that problem (pass@k is then reported). Prints one JSON object with
``benchmark``, ``n``, ``accuracy`` and more on standard output, and writes ``<benchmark>.jsonl`` and
``results.json`` into ``--out``. Response length is counted with ``--tokenizer`` when given, else in
whitespace-separated tokens (``length_unit`` says which).

Every problem of the benchmark (of ``--data`` when given) should have a response: a file that lacks
some is an error naming how many and the first few ids, since an accuracy over the problems that
happen to be there is not the benchmark's accuracy. ``--missing wrong`` counts each missing problem
as one wrong sample (reason ``no response``, empty response, length 0); ``--missing skip`` grades only
the responses given. The printed object and ``results.json``'s ``meta`` say which, as
``"missing": {"policy": ..., "count": ..., "ids": [...]}`` (every missing id, in benchmark order).
"""

from __future__ import annotations

import argparse
import json
import sys

from aropd.io import read_records

from .base import RecordError, Verdict
from .registry import BENCHMARKS, get_benchmark
from .results import sample_rows, write_results


def read_responses(path: str) -> list[dict]:
    """The samples of a responses file (:func:`aropd.io.read_records`: JSONL, or any format it reads),
    each checked for ``id`` and a string ``response``."""
    rows = read_records(path, hub=False)
    for i, row in enumerate(rows):
        for key in ("id", "response"):
            if key not in row:
                raise RecordError(f"{path}: record {i}: missing field {key!r}")
        if not isinstance(row["response"], str):
            raise RecordError(f"{path}: record {i}: field 'response' should be a string")
    return rows


MISSING_POLICIES = ("error", "wrong", "skip")
MISSING_REASON = "no response"
SHOWN_IDS = 5  # ids an error message names


def missing_ids(records: list[dict], id_field: str, rows: list[dict]) -> list[str]:
    """Ids of the benchmark's problems that no response row names, in the benchmark's order."""
    present = {str(r["id"]) for r in rows}
    return list(dict.fromkeys(str(r[id_field]) for r in records if str(r[id_field]) not in present))


def _lengths(texts: list[str], tokenizer: str | None) -> tuple[list[int], str]:
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts], f"tokens ({tokenizer})"
    return [len(t.split()) for t in texts], "whitespace tokens (no tokenizer given)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="aropd-score", description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", required=True, help=f"one of: {', '.join(sorted(BENCHMARKS))}")
    ap.add_argument("--responses", required=True, help="JSONL with fields id and response")
    ap.add_argument("--out", required=True, help="output folder for <benchmark>.jsonl and results.json")
    ap.add_argument("--data", default=None, help="local file with the benchmark's records (its hub schema)")
    ap.add_argument("--workers", type=int, default=None, help="parallel grading processes")
    ap.add_argument("--tokenizer", default=None, help="tokenizer (path or name) to count response lengths")
    ap.add_argument("--missing", choices=MISSING_POLICIES, default="error",
                    help="problems with no response: an error (default), counted as wrong, or left out (skip)")
    return ap


def score(args: argparse.Namespace) -> dict:
    b = get_benchmark(args.benchmark)
    records = b.load(args.data)
    by_id = {str(r[b.id_field]): r for r in records}
    rows = read_responses(args.responses)
    missing = [str(r["id"]) for r in rows if str(r["id"]) not in by_id]
    if missing:
        raise RecordError(f"{args.responses}: {len(missing)} response id(s) not in {b.name} "
                          f"(its {b.id_field!r} field), e.g. {missing[:3]}")
    policy = getattr(args, "missing", "error")
    absent = missing_ids(records, b.id_field, rows)
    if absent and policy == "error":
        shown = ", ".join(repr(i) for i in absent[:SHOWN_IDS]) + (", ..." if len(absent) > SHOWN_IDS else "")
        raise RecordError(
            f"{args.responses}: no response for {len(absent)} of the {len(by_id)} {b.name} problems "
            f"(by its {b.id_field!r} field): {shown}. Pass --missing wrong to count them as wrong, "
            f"or --missing skip to grade only the responses given")
    recs = [by_id[str(r["id"])] for r in rows]
    texts = [r["response"] for r in rows]
    verdicts = b.grade(texts, recs, workers=args.workers) if rows else []
    lengths, unit = _lengths(texts, args.tokenizer)
    if policy == "wrong" and absent:  # one wrong, empty sample per missing problem, after the given ones
        recs += [by_id[i] for i in absent]
        texts += [""] * len(absent)
        verdicts = list(verdicts) + [Verdict(False, None, MISSING_REASON)] * len(absent)
        lengths = list(lengths) + [0] * len(absent)
    sample = sample_rows(b, recs, texts, verdicts, lengths)
    missing = {"policy": policy, "count": len(absent), "ids": absent}
    meta = {"source": "aropd-score", "benchmark": b.name, "responses": str(args.responses),
            "data": args.data, "length_unit": unit, "missing": missing}
    summary = write_results(args.out, {b.name: sample}, meta)
    s = summary["benchmarks"][b.name]
    out = {"benchmark": b.name, "n": s["n"], "accuracy": s["accuracy"], "correct": s["correct"],
           "n_problems": s["n_problems"], "no_answer": s["no_answer"], "pass_at_k": s["pass_at_k"],
           "length_unit": unit, "missing": missing, "out": str(args.out)}
    if "isolation" in s:
        out["isolation"] = s["isolation"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = score(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # RecordError is a ValueError
        print(f"aropd-score: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
