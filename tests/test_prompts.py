"""``aropd-prompts`` on the quickstart: the three prompts as the model sees them, and token counts that
match the tokenizer's own count of the same messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from aropd.models import load_tokenizer
from aropd.prompts import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TOY_TRAIN = ROOT / "aropd" / "assets" / "toy" / "train.jsonl"
TOY_TEST = ROOT / "aropd" / "assets" / "toy" / "test.jsonl"  # the quickstart's toy benchmark data
# The quickstart's template, written out here rather than read from the code under test.
TEACHER_USER = "{question}\nExample: <reasoning>{reasoning}</reasoning><answer>{answer}</answer>\nNow you."


def sections(out: str) -> list[dict[str, tuple[str, str]]]:
    """Per example: section name -> (its header line, its decoded text)."""
    examples = []
    for block in out.split("=" * 100)[1:]:
        if not block.strip().startswith("example from"):
            continue
        parts = re.split(r"^--- ", block, flags=re.M)[1:]
        ex = {}
        for part in parts:
            head, _, text = part.partition("\n")
            ex[head.split(":")[0]] = (head, text.rstrip("\n"))
        examples.append(ex)
    return examples


def count(head: str) -> int:
    return int(re.search(r": (\d+) tokens", head).group(1))


def chat_ids(tok, user: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def reasoning(text: str) -> str:
    return re.search(r"<reasoning>(.*?)</reasoning>", text, re.S).group(1)


@pytest.fixture(scope="module")
def toy_tokenizer():
    return load_tokenizer(str(ROOT / "aropd" / "assets" / "toy-base"))


def test_three_prompts_of_the_quickstart(capsys, toy_tokenizer):
    main(["--config", QUICKSTART, "--n", "3"])
    out = capsys.readouterr().out
    examples = sections(out)
    assert len(examples) == 3 and out.rstrip().endswith("examples shown: 3")
    records = [json.loads(line) for line in TOY_TRAIN.read_text().splitlines()[:3]]
    for ex, rec in zip(examples, records):
        assert list(ex)[:3] == ["student prompt", "full view", "partial view"]
        assert list(ex)[3].startswith("reference response") and len(ex) == 4
        (sh, student), (fh, full), (ph, partial) = ex["student prompt"], ex["full view"], ex["partial view"]
        for text in (student, full, partial):
            assert rec["question"] in text
        # Special tokens are visible: the chat markers are what the model conditions on.
        assert student.startswith("<|user|>") and student.endswith("<|assistant|>")
        assert "Now you." in full and "Now you." in partial and "Now you." not in student
        assert reasoning(full) == rec["reasoning"] and "trace shortened: no" in fh
        kept = reasoning(partial)
        assert kept and rec["reasoning"].startswith(kept) and len(kept) < len(rec["reasoning"])

        # Counts against ids built independently: the tokenizer's chat template over hand-built messages.
        assert count(sh) == len(chat_ids(toy_tokenizer, rec["question"]))
        fields = {"question": rec["question"], "answer": rec["answer"]}
        assert count(fh) == len(chat_ids(toy_tokenizer, TEACHER_USER.format(reasoning=rec["reasoning"], **fields)))
        assert count(ph) == len(chat_ids(toy_tokenizer, TEACHER_USER.format(reasoning=kept, **fields)))
        # ... and the printed text is those ids: it encodes back to the same count.
        for head, text in ((sh, student), (fh, full), (ph, partial)):
            assert len(toy_tokenizer(text, add_special_tokens=False)["input_ids"]) == count(head)


def test_shortened_trace_is_reported(capsys, toy_tokenizer):
    # A teacher budget below the first example's full view (138 tokens): its reasoning must be cut.
    main(["--config", QUICKSTART, "--n", "1", "--data.init_args.max_teacher_tokens", "100"])
    (ex,) = sections(capsys.readouterr().out)
    head, full = ex["full view"]
    assert "trace shortened: YES" in head and count(head) <= 100
    rec = json.loads(TOY_TRAIN.read_text().splitlines()[0])
    assert rec["reasoning"].startswith(reasoning(full)) and reasoning(full) != rec["reasoning"]


def test_benchmark_prompt(capsys, toy_tokenizer):
    main(["--config", QUICKSTART, "--benchmark", "toy"])
    out = capsys.readouterr().out
    first = json.loads(TOY_TEST.read_text().splitlines()[0])
    assert f"benchmark toy: first record '0' (gold: {first['answer']})" in out
    head = next(line for line in out.splitlines() if line.startswith("--- validation prompt"))
    assert first["question"] in out and count(head) == len(chat_ids(toy_tokenizer, first["question"]))
