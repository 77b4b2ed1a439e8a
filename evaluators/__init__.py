"""Benchmarks and graders for ``aropd validate`` and ``aropd-score``.

``get_benchmark(name)`` returns a :class:`Benchmark` (load records, build prompts, grade
responses into :class:`Verdict` s); :mod:`.results` writes per-sample JSONL and ``results.json``.
"""

from .base import Benchmark, RecordError, Verdict
from .registry import BENCHMARKS, SUITES, get_benchmark

__all__ = ["BENCHMARKS", "SUITES", "Benchmark", "RecordError", "Verdict", "get_benchmark"]
