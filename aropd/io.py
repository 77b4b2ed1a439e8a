"""Reading records and writing files: one reader and one atomic writer for the whole package.

Records (:func:`read_records`, :func:`open_records`) come from

* a ``.jsonl`` file (one JSON object per line, blank lines skipped), a ``.json`` file (a JSON list
  of objects, or JSON Lines) or a ``.csv`` file (a header, then one record per row), each also
  compressed as ``.gz``, ``.bz2`` or ``.xz``;
* a ``.parquet`` file;
* a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` whose
  ``split`` is taken), or a folder of data files such as a cloned hub repository;
* anything else of the form ``owner/name`` that is not a local path: a hub dataset, through
  ``datasets.load_dataset``.

Each record is a dict. Errors name the file and the line (text formats) or the record index:
:class:`RecordError` for what is in the source, ``FileNotFoundError`` for a local path that is not
there. Failures of the hub itself (no network, gated data set) are raised as ``datasets`` raises
them, for the caller to add its own hint.

Files (:func:`atomic_writes`, :func:`atomic_write_text`, :func:`atomic_write_bytes`) are written
under a temporary name in the target's folder, synced to disk and renamed over the target, so a
reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import hashlib
import json
import lzma
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["RecordError", "Records", "open_records", "read_records", "atomic_writes", "atomic_write_text",
           "atomic_write_bytes"]


class RecordError(ValueError):
    """A source that cannot be read as records, or a malformed record: the message names the file
    and the line or the record index."""


_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_TEXT_FORMATS = (".jsonl", ".json", ".csv")
_DATA_SUFFIXES = (*_TEXT_FORMATS, ".parquet", ".arrow")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class Records(Sequence):
    """The rows of one source, each a dict. Rows of an Arrow-backed source (parquet, saved folder,
    hub) are decoded one at a time when indexed, so a large source is never all held as Python
    objects."""

    def __init__(self, source: str, rows: Any, fingerprint: str | None = None):
        self.source = source
        self._rows = rows  # list[dict] or datasets.Dataset
        self.fingerprint = fingerprint if fingerprint is not None else getattr(rows, "_fingerprint", None)
        """sha256 of a local text file's bytes, or the ``datasets`` fingerprint of an Arrow source."""

    @property
    def columns(self) -> list[str]:
        """Field names, in order of first appearance."""
        if isinstance(self._rows, list):
            return list(dict.fromkeys(k for row in self._rows for k in row))
        return list(self._rows.column_names)

    def select(self, columns: Sequence[str]) -> Records:
        """Only these fields (those present); the others of an Arrow source are then never decoded."""
        wanted = set(columns)
        keep = [c for c in self.columns if c in wanted]
        if isinstance(self._rows, list):
            rows = [{k: row[k] for k in keep if k in row} for row in self._rows]
        else:
            rows = self._rows.select_columns(keep)
        return Records(self.source, rows, self.fingerprint)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._rows[i] if isinstance(self._rows, list) else dict(self._rows[i])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._rows) if isinstance(self._rows, list) else (dict(r) for r in self._rows)


def read_records(source: str | os.PathLike, split: str | None = "train", *, config: str | None = None,
                 cache_dir: str | None = None, hub: bool = True) -> list[dict[str, Any]]:
    """All rows of ``source`` as a list of dicts (see the module docstring for what ``source`` may be).

    ``split`` picks the split of a hub dataset or saved ``DatasetDict`` (None: the only one there
    is); ``config`` is a hub dataset's configuration; ``cache_dir`` is the ``datasets`` cache. With
    ``hub=False`` only local paths are read: a missing one is never looked up on the hub."""
    return list(open_records(source, split, config=config, cache_dir=cache_dir, hub=hub))


def open_records(source: str | os.PathLike, split: str | None = "train", *, config: str | None = None,
                 cache_dir: str | None = None, hub: bool = True) -> Records:
    """:func:`read_records` as a :class:`Records` sequence, for sources too large to decode at once."""
    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder(path, split, cache_dir)
    if path.is_file():
        suffix = _format(path)
        if suffix == ".parquet":
            return _arrow(path, lambda hf: hf.load_dataset("parquet", data_files=str(path), split="train",
                                                          cache_dir=cache_dir))
        if suffix not in _TEXT_FORMATS:
            raise RecordError(f"{path}: unknown file type (use {', '.join(_DATA_SUFFIXES[:-1])}, "
                              f"text ones optionally {'/'.join(_COMPRESSED)})")
        data = _read_bytes(path)
        text = _decode(path, data)
        if suffix == ".csv":
            rows = _csv_rows(path, text)
        elif suffix == ".json" and text.lstrip().startswith("["):
            rows = _json_list(path, text)
        else:
            rows = _json_lines(path, text)
        return Records(str(path), rows, hashlib.sha256(data).hexdigest())
    looks_local = source.startswith((".", "/", "~")) or _format(path) in _DATA_SUFFIXES
    if not hub:
        raise FileNotFoundError(f"{source}: no such file or folder")
    if looks_local or not _HUB_ID.fullmatch(source):
        raise FileNotFoundError(f"{source}: no such file or folder (a hub dataset id is owner/name)")
    import datasets

    ds = datasets.load_dataset(source, config, split=split, cache_dir=cache_dir)
    return Records(source, _one_split(ds, source, split))


def _format(path: Path) -> str:
    """The data suffix under any compression suffix: ``x.jsonl.gz`` → ``.jsonl``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _read_bytes(path: Path) -> bytes:
    opener = _COMPRESSED.get(path.suffix.lower())
    if opener is None:
        return path.read_bytes()
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:  # a bad or truncated archive
        raise RecordError(f"{path}: not a readable {path.suffix} file ({e})") from None


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # -sig: a leading byte-order mark is not part of line 1
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise RecordError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column})") \
            from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    # Split on "\n" only: str.splitlines also breaks at U+2028 and other characters that JSON
    # strings may hold unescaped, which would cut a record in two.
    for n, line in enumerate(text.split("\n"), 1):
        yield n, line.removesuffix("\r")


def _json_lines(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in _lines(text):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise RecordError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _json_list(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RecordError(f"{path}: record {i}: expected a JSON object, got {type(row).__name__}")
    return rows


_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _csv_rows(path: Path, text: str) -> list[dict[str, Any]]:
    """Rows under the header. Cells are text, typed per column the way ``pandas`` reads them: a
    column whose every non-empty cell is an integer holds ints, else floats if every one is a
    number; an empty cell is None."""
    reader = csv.reader(line for _, line in _lines(text))
    try:
        header = next(reader, None)
        if header is None:
            return []
        rows = []
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise RecordError(f"{path}: line {reader.line_num}: {len(cells)} fields, the header has {len(header)}")
            rows.append(dict(zip(header, cells)))
    except csv.Error as e:
        raise RecordError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
    for col in header:
        cells = [r[col] for r in rows if r[col] != ""]
        kind = int if all(_INT.fullmatch(c) for c in cells) else float if all(_FLOAT.fullmatch(c) for c in cells) \
            else str
        for r in rows:
            r[col] = None if r[col] == "" else kind(r[col])
    return rows


def _folder(path: Path, split: str | None, cache_dir: str | None) -> Records:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _arrow(path, lambda hf: _one_split(hf.load_from_disk(str(path)), path, split))
    if any(_format(p) in _DATA_SUFFIXES for p in path.rglob("*") if p.is_file() and ".git" not in p.parts):
        return _arrow(path, lambda hf: _one_split(hf.load_dataset(str(path), split=split, cache_dir=cache_dir),
                                                  path, split))
    raise RecordError(f"{path}: a folder, but neither a saved `datasets` folder (no dataset_dict.json or "
                      f"state.json) nor a folder of data files ({', '.join(_DATA_SUFFIXES)})")


def _one_split(ds: Any, where: Any, split: str | None) -> Any:
    """The ``Dataset`` itself, or the named split of a ``DatasetDict`` (with ``split=None``, its only one)."""
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return ds
    if split is None and len(ds) == 1:
        return next(iter(ds.values()))
    if split not in ds:
        raise RecordError(f"{where}: a DatasetDict with splits {sorted(ds)}; "
                          + ("name one" if split is None else f"none is {split!r}"))
    return ds[split]


def _arrow(path: Path, load) -> Records:
    """Records of the ``Dataset`` that ``load(datasets)`` returns; its failures become a
    :class:`RecordError` naming ``path``."""
    import datasets

    try:
        ds = load(datasets)
    except RecordError:
        raise
    except Exception as e:  # datasets and pyarrow raise many types; all mean "cannot read this"
        raise RecordError(f"{path}: cannot read it ({type(e).__name__}: {e})") from e
    return Records(str(path), ds)


# ---- atomic writes ----------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_writes(*paths: str | os.PathLike, binary: bool = False) -> Iterator[list[IO]]:
    """Files to write ``paths`` through, published together when the block ends without error.

    Each file is a hidden temporary sibling of its path (UTF-8 text, or bytes with ``binary``).
    At the end of the block all are synced to disk, then renamed over their paths in order. On any
    error nothing is renamed and no temporary file is left; an ``OSError`` (a full disk, a
    read-only folder) is raised again as an ``OSError`` of the same errno whose message names the
    path and the system's reason, e.g. ``[Errno 28] cannot write out/results.json: No space left on
    device``.
    """
    targets = [Path(p) for p in paths]
    temps = [t.with_name(f".{t.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}") for t in targets]
    files: list[IO] = []
    current: Any = targets[0]
    try:
        for target, tmp in zip(targets, temps):
            current = target
            files.append(open(tmp, "xb") if binary else open(tmp, "x", encoding="utf-8"))
        current = ", ".join(map(str, targets))  # an error in the block may come from any of the files
        yield files
        for target, f in zip(targets, files):
            current = target
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for target, tmp in zip(targets, temps):
            current = target
            os.replace(tmp, target)
        for folder in dict.fromkeys(t.parent for t in targets):
            _fsync_folder(folder)  # makes the renames themselves durable
    except OSError as e:
        reason = e.strerror or str(e)
        message = f"cannot write {current}: {reason}"
        raise (OSError(e.errno, message) if e.errno is not None else OSError(message)) from e
    finally:
        for f in files:
            with contextlib.suppress(OSError):
                f.close()
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically; see :func:`atomic_writes`."""
    with atomic_writes(path) as (f,):
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically; see :func:`atomic_writes`."""
    with atomic_writes(path, binary=True) as (f,):
        f.write(data)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is done either way
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
