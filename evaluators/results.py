"""Per-sample rows and ``results.json``, shared by ``aropd validate`` and ``aropd-score``.

``results.json`` layout::

    {
      "benchmarks": {
        "<name>": {"n": 40, "correct": 23, "accuracy": 0.575, "n_problems": 40, "no_answer": 2,
                   "acc_len_0_256": 0.6, "count_len_0_256": 10, ..., "acc_len_1024_inf": null,
                   "count_len_1024_inf": 0,
                   "pass_at_k": {"pass@1": 0.575},          # more k when problems have several samples
                   "isolation": "bwrap"},                    # code benchmarks only
        ...
      },
      "average": {"accuracy": 0.61, "n_benchmarks": 7},     # unweighted mean over benchmarks
      "by_length": {"acc_len_0_256": ..., "count_len_0_256": ..., ...},   # all samples pooled
      "code_isolation": "bwrap" | null,
      "length_edges": [0, 256, 512, 768, 1024, "inf"],
      "meta": {...}                                          # whatever the caller passed
    }

An empty bucket has accuracy ``null`` and count 0. Files are written atomically
(:func:`aropd.io.atomic_write_text`), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

import torch

from aropd.buckets import EDGES, bucket_index, bucket_names
from aropd.io import atomic_write_text

from .base import Benchmark, Verdict
from .grade_code import pass_at_k
from .registry import get_benchmark

PASS_KS = (1, 2, 5, 10, 100)


def _code_isolation() -> str:
    from .sandbox import isolation_mode

    try:
        return isolation_mode()
    except RuntimeError:
        return "unavailable"


def sample_rows(benchmark: Benchmark | str, records: list[dict], responses: list[str], verdicts: list[Verdict],
                lengths: list[int]) -> list[dict]:
    """One row per sample: ``id``, ``response``, ``extracted``, ``correct``, ``reason``,
    ``length_tokens`` (plus ``isolation`` for code benchmarks)."""
    b = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    n = len(records)
    if not (len(responses) == len(verdicts) == len(lengths) == n):
        raise ValueError(f"{b.name}: {n} records, {len(responses)} responses, {len(verdicts)} verdicts, "
                         f"{len(lengths)} lengths: they must match")
    iso = _code_isolation() if b.kind == "code" else None
    rows = []
    for rec, resp, v, ln in zip(records, responses, verdicts, lengths):
        row = {"id": rec[b.id_field], "response": resp, "extracted": v.extracted, "correct": bool(v.correct),
               "reason": v.reason, "length_tokens": int(ln)}
        if iso is not None:
            row["isolation"] = iso
        rows.append(row)
    return rows


def _by_length(rows: list[dict]) -> dict:
    names = bucket_names("len")
    out: dict = {}
    if rows:
        idx = bucket_index(torch.tensor([r["length_tokens"] for r in rows], dtype=torch.float64)).tolist()
    else:
        idx = []
    for b, name in enumerate(names):
        hit = [r["correct"] for r, k in zip(rows, idx) if k == b]
        out[f"acc_{name}"] = (sum(hit) / len(hit)) if hit else None
        out[f"count_{name}"] = len(hit)
    return out


def _pass_at_k(rows: list[dict]) -> dict:
    per: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        per[str(r["id"])].append(bool(r["correct"]))
    if not per:
        return {}
    n_min = min(len(v) for v in per.values())
    out = {}
    for k in PASS_KS:
        if k <= n_min:
            out[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in per.values()) / len(per)
    return out


def summarize(name: str, rows: list[dict]) -> dict:
    n = len(rows)
    correct = sum(bool(r["correct"]) for r in rows)
    s = {"n": n, "correct": correct, "accuracy": correct / n if n else None,
         "n_problems": len({str(r["id"]) for r in rows}),
         "no_answer": sum(r.get("reason") == "no answer" for r in rows)}
    s.update(_by_length(rows))
    s["pass_at_k"] = _pass_at_k(rows)
    isos = sorted({r["isolation"] for r in rows if r.get("isolation")})
    if isos:
        s["isolation"] = isos[0] if len(isos) == 1 else isos
    return s


def write_results(out_dir: str | os.PathLike, per_benchmark: dict[str, list[dict]], meta: dict) -> dict:
    """Write ``<benchmark>.jsonl`` per benchmark and ``results.json`` into ``out_dir``; return the
    summary that ``results.json`` holds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    benches = {}
    for name, rows in per_benchmark.items():
        if "/" in name or name.startswith("."):
            raise ValueError(f"benchmark name {name!r} cannot be a file name")
        lines = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
        atomic_write_text(out / f"{name}.jsonl", lines)
        benches[name] = summarize(name, rows)
    accs = [b["accuracy"] for b in benches.values() if b["accuracy"] is not None]
    all_rows = [r for rows in per_benchmark.values() for r in rows]
    isos = sorted({str(b["isolation"]) for b in benches.values() if "isolation" in b})
    summary = {
        "benchmarks": benches,
        "average": {"accuracy": sum(accs) / len(accs) if accs else None, "n_benchmarks": len(accs)},
        "by_length": _by_length(all_rows),
        "code_isolation": (isos[0] if len(isos) == 1 else isos) if isos else None,
        "length_edges": [("inf" if math.isinf(e) else int(e)) for e in EDGES],
        "meta": meta,
    }
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n")
    return summary
