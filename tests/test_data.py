import json

import pytest

from aropd.data import PrivilegedDataModule, derangement, load_records
from aropd.views import PromptTemplate, partial_view, render


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [
    {"question": "Start at 3. +4 (mod 100). Result?", "reasoning": "3+4=7 done here", "answer": "7"},
    {"question": "Start at 10. *2 -1 (mod 100). Result?", "reasoning": "10*2=20 then 20-1=19", "answer": "19"},
]


def _dm(tiny_path, train, **kw):
    dm = PrivilegedDataModule(tokenizer=tiny_path, train=train, batch_size=2, **kw)
    dm.setup("fit")
    return dm


def test_missing_field_names_file_record_and_field(tmp_path, tiny_path):
    bad = _write(tmp_path / "bad.jsonl", [ROWS[0], {"question": "q", "answer": "1"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl: record 1: missing field 'reasoning'"):
        _dm(tiny_path, bad)


def test_invalid_json_names_file_and_line(tmp_path, tiny_path):
    p = tmp_path / "broken.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 2: not valid JSON"):
        _dm(tiny_path, str(p))


def test_missing_file_is_named(tiny_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        _dm(tiny_path, "nowhere.jsonl")


def test_custom_field_names(tmp_path, tiny_path):
    rows = [{"problem": r["question"], "cot": r["reasoning"], "final": r["answer"]} for r in ROWS]
    dm = _dm(tiny_path, _write(tmp_path / "c.jsonl", rows), fields={"question": "problem", "reasoning": "cot", "answer": "final"})
    assert [e.answer for e in dm.train_examples] == ["7", "19"]


def test_views_are_the_template_rendered_with_partial_reasoning(tmp_path, tiny_path, tokenizer):
    dm = _dm(tiny_path, _write(tmp_path / "d.jsonl", ROWS), partial_ratio=0.5)
    t = PromptTemplate()
    ex = dm.train_examples[1]
    q, r, a = ROWS[1]["question"], ROWS[1]["reasoning"], ROWS[1]["answer"]
    assert ex.student == render(tokenizer, t.student_messages(q))
    assert ex.full == render(tokenizer, t.teacher_messages(q, r, a))
    assert ex.partial == render(tokenizer, t.teacher_messages(q, "10*2=20 then", a)) == render(
        tokenizer, t.teacher_messages(q, partial_view(r, 0.5), a)
    )
    assert ex.reference[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.reference[:-1]) == t.format_trace(r, a)


def test_budgets_shorten_the_trace_and_drop_overlong_questions(tmp_path, tiny_path, tokenizer):
    long_reasoning = " ".join(f"{i}+1={i + 1}" for i in range(60))
    rows = ROWS + [{"question": "Start at 0. (mod 100). Result?", "reasoning": long_reasoning, "answer": "60"},
                   {"question": "x " * 400, "reasoning": "r", "answer": "1"}]
    t = PromptTemplate()
    budget = len(render(tokenizer, t.teacher_messages(rows[2]["question"], "", "60"))) + 40
    dm = _dm(tiny_path, _write(tmp_path / "e.jsonl", rows), max_teacher_tokens=budget, max_prompt_tokens=200)
    assert dm.stats == {"examples": 3, "dropped_too_long": 1, "truncated_trace": 1}
    for ex in dm.train_examples:
        assert len(ex.full) <= budget and len(ex.partial) <= budget and len(ex.student) <= 200
    text = tokenizer.decode(dm.train_examples[2].full)
    assert rows[2]["question"] in text and "<answer>60</answer>" in text and "Now answer the question" in text


def test_collated_batch_pads_prompts_left_and_references_right(tmp_path, tiny_path):
    dm = _dm(tiny_path, _write(tmp_path / "f.jsonl", ROWS))
    b = next(iter(dm.train_dataloader()))
    for ids, mask in ((b.student_ids, b.student_mask), (b.full_ids, b.full_mask), (b.partial_ids, b.partial_mask)):
        assert (mask[:, -1] == 1).all()  # every prompt ends at the last column
    assert (b.reference_mask[:, 0] == 1).all()
    assert (b.privileged_len == b.full_mask.sum(-1) - b.student_mask.sum(-1)).all()
    assert (b.privileged_len > 0).all()


def test_parquet_and_saved_dataset_read_the_same_records(tmp_path, tiny_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "r.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_records(str(tmp_path / "r.parquet")) == ROWS
    assert load_records(str(tmp_path / "saved")) == ROWS
    a = _dm(tiny_path, str(tmp_path / "saved")).train_examples
    b = _dm(tiny_path, _write(tmp_path / "g.jsonl", ROWS)).train_examples
    assert a == b


@pytest.mark.parametrize("kw,option", [({"partial_ratio": 1.5}, "partial_ratio"), ({"batch_size": 0}, "batch_size")])
def test_bad_options_name_themselves(tiny_path, kw, option):
    with pytest.raises(ValueError, match=option):
        PrivilegedDataModule(tokenizer=tiny_path, **kw)


# ---- privilege controls: which trace the teacher views show -----------------------------------------

THREE = ROWS + [{"question": "Start at 50. -5 (mod 100). Result?", "reasoning": "50-5=45 so far so good", "answer": "45"}]


@pytest.mark.parametrize("n", [2, 3, 5, 17, 128])
def test_derangement_is_a_seeded_permutation_without_fixed_points(n):
    for seed in range(5):
        p = derangement(n, seed)
        assert sorted(p) == list(range(n))
        assert all(p[i] != i for i in range(n))
        assert derangement(n, seed) == p  # a pure function of (n, seed): every rank and epoch agree
    if n == 2:
        assert derangement(2, 0) == [1, 0]  # the only derangement of two
    if n >= 5:
        assert len({tuple(derangement(n, s)) for s in range(5)}) > 1  # the seed matters
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, 0)


def test_no_trace_views_are_the_student_prompt(tmp_path, tiny_path, tokenizer):
    dm = _dm(tiny_path, _write(tmp_path / "n.jsonl", THREE), teacher_trace="none")
    t = PromptTemplate()
    for ex, row in zip(dm.train_examples, THREE):
        student = render(tokenizer, t.student_messages(row["question"]))
        assert ex.student == ex.full == ex.partial == student
        # no token of the trace reaches the teacher; the SFT target and the answer are still the problem's own
        assert row["reasoning"] not in tokenizer.decode(ex.full) and "Here is an example" not in tokenizer.decode(ex.full)
        assert tokenizer.decode(ex.reference[:-1]) == t.format_trace(row["reasoning"], row["answer"])
        assert ex.answer == row["answer"]
    b = next(iter(dm.train_dataloader()))
    assert (b.privileged_len == 0).all()


def test_shuffled_trace_views_show_another_problems_trace(tmp_path, tiny_path, tokenizer):
    dm = _dm(tiny_path, _write(tmp_path / "s.jsonl", THREE), teacher_trace="shuffled", seed=7)
    t = PromptTemplate()
    shown = []
    for i, (ex, row) in enumerate(zip(dm.train_examples, THREE)):
        q = row["question"]
        # which record's trace the full view shows, found from the rendered prompts alone
        j = [k for k, o in enumerate(THREE) if ex.full == render(tokenizer, t.teacher_messages(q, o["reasoning"], o["answer"]))]
        assert len(j) == 1 and j[0] != i, (i, j)
        other = THREE[j[0]]
        assert ex.partial == render(tokenizer, t.teacher_messages(q, partial_view(other["reasoning"], 0.5), other["answer"]))
        assert ex.student == render(tokenizer, t.student_messages(q))
        assert tokenizer.decode(ex.reference[:-1]) == t.format_trace(row["reasoning"], row["answer"]) and ex.answer == row["answer"]
        shown.append(j[0])
    # a derangement of three is one of the two 3-cycles; it is the library's, seeded by the data seed
    assert shown in ([1, 2, 0], [2, 0, 1]) and shown == derangement(3, 7)
    again = _dm(tiny_path, _write(tmp_path / "s2.jsonl", THREE), teacher_trace="shuffled", seed=7)
    assert again.train_examples == dm.train_examples


@pytest.mark.parametrize("kw,needle", [
    ({"teacher_trace": "random"}, "teacher_trace must be one of reference, none, shuffled"),
    ({"teacher_trace": "none", "partial_ratio": 0.3}, "partial_ratio"),
])
def test_bad_teacher_trace_options_name_themselves(tiny_path, kw, needle):
    with pytest.raises(ValueError, match=needle):
        PrivilegedDataModule(tokenizer=tiny_path, **kw)


def test_shuffled_trace_needs_two_records(tmp_path, tiny_path):
    with pytest.raises(ValueError, match="teacher_trace 'shuffled' needs at least 2"):
        _dm(tiny_path, _write(tmp_path / "one.jsonl", ROWS[:1]), teacher_trace="shuffled")
