"""aropd.io: every format read back to the same records, errors that name the file and the line,
and atomic writes that leave the old file and no temporary file when they fail."""

from __future__ import annotations

import bz2
import errno
import gzip
import json
import os

import pytest

from aropd.io import RecordError, atomic_write_bytes, atomic_write_text, atomic_writes, open_records, read_records

ROWS = [{"question": "2+2?", "answer": 4, "note": "é ✓"}, {"question": "3*3?", "answer": 9, "note": None}]


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# -- each format --------------------------------------------------------------------------------------
def test_every_format_reads_back_the_same_records(tmp_path):
    import datasets

    (tmp_path / "r.jsonl").write_text(_jsonl(ROWS), encoding="utf-8")
    (tmp_path / "r.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (tmp_path / "lines.json").write_text(_jsonl(ROWS), encoding="utf-8")  # JSON Lines under .json
    (tmp_path / "r.jsonl.gz").write_bytes(gzip.compress(_jsonl(ROWS).encode()))
    (tmp_path / "r.json.bz2").write_bytes(bz2.compress(json.dumps(ROWS).encode()))
    (tmp_path / "r.csv").write_text("question,answer,note\n2+2?,4,é ✓\n3*3?,9,\n", encoding="utf-8")
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "r.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds.select([0]), "test": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "repo" / "data").mkdir(parents=True)  # a cloned hub repository: a folder of data files
    ds.to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    for name in ("r.jsonl", "r.json", "lines.json", "r.jsonl.gz", "r.json.bz2", "r.csv", "r.parquet", "saved", "repo"):
        assert read_records(tmp_path / name) == ROWS, name
    assert read_records(str(tmp_path / "saved_dict"), "test") == ROWS
    assert read_records(str(tmp_path / "saved_dict")) == ROWS[:1]  # split="train" by default


def test_hub_ids_go_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(name, config=None, split=None, cache_dir=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert read_records("owner/name", "validation", config="cfg") == ROWS
    assert calls == [("owner/name", "cfg", "validation")]


def test_csv_cells_are_typed_per_column(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text('id,score,label,text\n1,0.5,7,"a, quoted"\n2,3,x,\n')
    # id: all ints; score: 0.5 and 3 are numbers, not all ints -> floats; label: "x" -> text; empty -> None
    assert read_records(p) == [{"id": 1, "score": 0.5, "label": "7", "text": "a, quoted"},
                               {"id": 2, "score": 3.0, "label": "x", "text": None}]


def test_open_records_decodes_arrow_rows_when_indexed(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    rows = open_records(tmp_path / "saved")
    assert len(rows) == 2 and rows[1] == ROWS[1] and rows[0:1] == ROWS[:1]
    assert rows.columns == ["question", "answer", "note"] and rows.fingerprint
    assert list(rows.select(["answer", "missing"])) == [{"answer": 4}, {"answer": 9}]
    (tmp_path / "r.jsonl").write_text(_jsonl(ROWS))
    text_rows = open_records(tmp_path / "r.jsonl")
    assert text_rows.select(["note"])[1] == {"note": None}
    import hashlib

    assert text_rows.fingerprint == hashlib.sha256((tmp_path / "r.jsonl").read_bytes()).hexdigest()


def test_unicode_line_separators_stay_inside_a_record(tmp_path):
    # U+2028 is legal unescaped in a JSON string; str.splitlines would cut the line there
    row = {"question": "a\u2028b", "answer": 1}
    (tmp_path / "u.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_records(tmp_path / "u.jsonl") == [row]


# -- errors -------------------------------------------------------------------------------------------
def test_non_utf8_names_file_line_and_byte(tmp_path):
    p = tmp_path / "latin.jsonl"
    # line 1 is fine; on line 2 "é" in Latin-1 is the byte 0xe9, 14 characters into the line
    p.write_bytes(b'{"q": "ok"}\n{"q": "caf\xe9 au lait"}\n')
    with pytest.raises(RecordError, match=r"latin\.jsonl: line 2: not UTF-8 text \(byte 0xe9 at column 11\)"):
        read_records(p)
    gz = tmp_path / "latin.jsonl.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    with pytest.raises(RecordError, match=r"latin\.jsonl\.gz: line 2: not UTF-8"):
        read_records(gz)
    csv = tmp_path / "latin.csv"
    csv.write_bytes(b"a,b\n1,2\n3,\xff\n")
    with pytest.raises(RecordError, match=r"latin\.csv: line 3: not UTF-8 text \(byte 0xff at column 3\)"):
        read_records(csv)


def test_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2,}\n')  # the blank line 2 still counts: the error is on line 3
    with pytest.raises(RecordError, match=r"bad\.jsonl: line 3: not valid JSON \(.* at column 9\)"):
        read_records(p)
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(RecordError, match=r"bad\.jsonl: line 2: expected a JSON object, got list"):
        read_records(p)
    js = tmp_path / "bad.json"
    js.write_text('[\n  {"a": 1},\n  {"a": 2\n]\n')
    with pytest.raises(RecordError, match=r"bad\.json: line 4: not valid JSON"):
        read_records(js)
    js.write_text('[{"a": 1}, 7]')
    with pytest.raises(RecordError, match=r"bad\.json: record 1: expected a JSON object, got int"):
        read_records(js)
    gz = tmp_path / "bad.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"a": 1}\n{oops\n'))
    with pytest.raises(RecordError, match=r"bad\.jsonl\.gz: line 2: not valid JSON"):
        read_records(gz)
    gz.write_bytes(gzip.compress(b'{"a": 1}\n')[:-6])  # truncated archive
    with pytest.raises(RecordError, match=r"bad\.jsonl\.gz: not a readable \.gz file"):
        read_records(gz)
    csv = tmp_path / "bad.csv"
    csv.write_text("a,b\n1,2\n3,4,5\n")
    with pytest.raises(RecordError, match=r"bad\.csv: line 3: 3 fields, the header has 2"):
        read_records(csv)


def test_folders_and_missing_paths_say_what_they_are(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.md").write_text("hello")
    with pytest.raises(RecordError, match=r"notes: a folder, but neither a saved `datasets` folder"):
        read_records(tmp_path / "notes")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl: no such file or folder"):
        read_records(tmp_path / "nowhere.jsonl")
    with pytest.raises(FileNotFoundError, match=r"^data/train: no such file or folder$"):
        read_records("data/train", hub=False)  # local only: never looked up on the hub
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl: no such file or folder"):
        read_records("data/train.jsonl")  # owner/name-shaped, but a data file's name: not a hub id
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(RecordError, match=r"x\.txt: unknown file type"):
        read_records(tmp_path / "x.txt")


def test_a_saved_dict_without_the_split_lists_its_splits(tmp_path):
    import datasets

    d = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS)})
    d.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(RecordError, match=r"dd: a DatasetDict with splits \['test', 'train'\]; none is 'val'"):
        read_records(tmp_path / "dd", "val")
    with pytest.raises(RecordError, match=r"name one"):
        read_records(tmp_path / "dd", None)


# -- atomic writes --------------------------------------------------------------------------------------
def test_atomic_write_replaces_the_file(tmp_path):
    p = tmp_path / "out.json"
    atomic_write_text(p, "old\n")
    atomic_write_text(p, "né\n")
    assert p.read_text(encoding="utf-8") == "né\n"
    atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["out.json"]


def test_full_disk_keeps_the_old_file_and_names_path_and_reason(tmp_path, monkeypatch):
    p = tmp_path / "results.json"
    p.write_text("old")

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*results\.json: No space left on device") as e:
        atomic_write_text(p, "new")
    assert e.value.errno == errno.ENOSPC
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]


def test_failed_sync_of_the_second_file_publishes_neither(tmp_path, monkeypatch):
    a, b = tmp_path / "a.jsonl", tmp_path / "a.manifest.json"
    a.write_text("A")
    real_fsync, synced = os.fsync, []

    def fsync(fd):
        synced.append(fd)
        if len(synced) == 2:  # the first file synced, the second hits a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match=r"cannot write .*a\.manifest\.json: No space left on device"):
        with atomic_writes(a, b) as (fa, fb):
            fa.write("new A")
            fb.write("new B")
    assert a.read_text() == "A" and os.listdir(tmp_path) == ["a.jsonl"]


def test_error_in_the_block_publishes_nothing(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "a.manifest.json"
    a.write_text("A")
    b.write_text("B")
    with pytest.raises(KeyError):
        with atomic_writes(a, b) as (fa, fb):
            fa.write("new A")
            fb.write("new B")
            raise KeyError("boom")
    assert (a.read_text(), b.read_text()) == ("A", "B") and sorted(os.listdir(tmp_path)) == [a.name, b.name]
    with atomic_writes(a, b) as (fa, fb):
        fa.write("new A")
        fb.write("new B")
    assert (a.read_text(), b.read_text()) == ("new A", "new B")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_named(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "f.txt").write_text("old")
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=r"cannot write .*f\.txt: Permission denied"):
            atomic_write_text(folder / "f.txt", "new")
        assert (folder / "f.txt").read_text() == "old" and os.listdir(folder) == ["f.txt"]
    finally:
        folder.chmod(0o755)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot write .*nope/f\.txt: No such file or directory"):
        atomic_write_text(tmp_path / "nope" / "f.txt", "x")
