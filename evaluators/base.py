"""The verdict type and the benchmark base class: loading, validation, prompts, grading."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None
    reason: str


class RecordError(ValueError):
    """A malformed benchmark record: the message names the source, the record index and the field."""


def _read_local(path: Path, split: str | None) -> list[dict]:
    """Raw rows of a local JSONL (optionally .gz), JSON list, parquet file or saved ``datasets``
    folder."""
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split and split in ds:
                ds = ds[split]
            elif len(ds) == 1:
                ds = next(iter(ds.values()))
            else:
                raise ValueError(f"{path}: saved DatasetDict has splits {sorted(ds)}; none is {split!r}")
        return [dict(r) for r in ds]
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(str(path)).to_pylist()
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if name.endswith((".json", ".json.gz")) and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise RecordError(f"{path}: record {i}: expected a JSON object, got {type(r).__name__}")
    return rows


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
            path = Path(data_path).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"{self.name}: data file {str(path)!r} does not exist")
            where = str(path)
            rows = _read_local(path, self.split)
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
        import datasets

        rows: list[dict] = []
        for cfg in self.hub_configs:
            try:
                ds = datasets.load_dataset(self.hub_id, cfg, split=self.split)
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
