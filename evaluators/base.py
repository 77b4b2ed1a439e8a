"""The verdict type and the benchmark base class: loading, validation, prompts, grading."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aropd.io import RecordError, read_records

__all__ = ["Benchmark", "RecordError", "Verdict", "require"]


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None
    reason: str


def require(row: dict, key: str, types: type | tuple[type, ...], where: str, i: int,
            nonempty: bool = True) -> Any:
    """``row[key]`` checked for presence and type; else :class:`RecordError` naming source, index
    and field."""
    if key not in row or row[key] is None:
        raise RecordError(f"{where}: record {i}: missing field {key!r} (has {sorted(row)[:12]})")
    v = row[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
        want = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise RecordError(f"{where}: record {i}: field {key!r} should be {want}, got {type(v).__name__}")
    if nonempty and isinstance(v, (str, list, dict)) and len(v) == 0:
        raise RecordError(f"{where}: record {i}: field {key!r} is empty")
    return v


@dataclass
class Benchmark:
    """One registered benchmark.

    ``normalize(row, index, where)`` maps a raw row of the dataset's own schema to the record the
    prompt and grader use (always holding ``id_field``), raising :class:`RecordError` for a
    malformed row. ``grader(benchmark, responses, records, workers)`` returns verdicts.
    """

    name: str
    kind: str  # "math" | "code" | "choice" | "integer"
    hub_id: str | None
    split: str | None
    id_field: str
    max_new_tokens: int
    normalize: Callable[[dict, int, str], dict] = field(repr=False)
    make_prompt: Callable[[dict], str] = field(repr=False)
    grader: Callable[..., list[Verdict]] = field(repr=False)
    hub_configs: tuple[str | None, ...] = (None,)
    default_path: Callable[[], str] | None = field(default=None, repr=False)
    description: str = ""

    # -- data -----------------------------------------------------------------------------------
    def load(self, data_path: str | None = None, limit: int | None = None) -> list[dict]:
        """Records from ``data_path`` (JSONL / JSON / parquet / saved datasets folder, in the hub
        dataset's schema) or, when None, from the default source (the hub, or a file shipped with a
        package). Each record is validated; errors name the file, the record index and the field."""
        if limit is not None and limit < 0:
            raise ValueError(f"{self.name}: limit must be >= 0, got {limit}")
        if data_path is None and self.default_path is not None:
            data_path = self.default_path()
        if data_path is not None:
            where = str(Path(data_path).expanduser())
            try:
                rows = read_records(where, self.split, hub=False)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{self.name}: {e}") from None
        else:
            where = f"{self.hub_id} (split {self.split})"
            rows = self._load_hub()
        if limit is not None:
            rows = rows[:limit]
        records = [self.normalize(r, i, where) for i, r in enumerate(rows)]
        seen: dict[str, int] = {}
        for i, rec in enumerate(records):
            k = rec[self.id_field]
            if k in seen:
                raise RecordError(f"{where}: record {i}: duplicate {self.id_field} {k!r} (also record {seen[k]})")
            seen[k] = i
        return records

    def _load_hub(self) -> list[dict]:
        rows: list[dict] = []
        for cfg in self.hub_configs:
            try:
                ds = read_records(self.hub_id, self.split, config=cfg)
            except Exception as e:  # no network, gated dataset, ...
                raise RuntimeError(
                    f"{self.name}: could not load {self.hub_id}"
                    f"{'' if cfg is None else f' (config {cfg})'} split {self.split!r} from the hub "
                    f"({type(e).__name__}: {e}); pass a local copy with data_path / --data") from e
            rows.extend(dict(r, **({"subject": r.get("subject") or cfg} if cfg else {})) for r in ds)
        return rows

    # -- prompting and grading --------------------------------------------------------------------
    def prompt(self, record: dict) -> str:
        """The user-turn text shown to the student: the question and the answer-format instruction."""
        return self.make_prompt(record)

    def grade(self, responses: list[str], records: list[dict], workers: int | None = None) -> list[Verdict]:
        """One verdict per (response, record) pair; never raises because of a response."""
        if len(responses) != len(records):
            raise ValueError(f"{self.name}: {len(responses)} responses for {len(records)} records")
        responses = [r if isinstance(r, str) else "" for r in responses]
        return self.grader(self, responses, records, workers)
