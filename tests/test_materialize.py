"""Materializing training sets from NuminaMath-CoT, Magicoder-Evol-Instruct and MedMCQA fixture rows.

The fixtures in tests/fixtures/sources/ are written in each source's real schema; every expected
value below is worked out by hand from those rows.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from aropd import materialize as M
from aropd.materialize import Drop, clean_explanation, materialize

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "sources"
TINY = str(ROOT / "aropd" / "assets" / "tiny-llama")
FILES = {"math": "numinamath.jsonl", "code": "magicoder.jsonl", "medical": "medmcqa.jsonl"}


def run(tmp_path, source, input=None, name="train.jsonl", **kw):
    out = tmp_path / source / name
    manifest = materialize(source, out, input or str(FIXTURES / FILES[source]), cache_dir=str(tmp_path / "cache"), **kw)
    return manifest, [json.loads(line) for line in out.read_text().splitlines()]


def by_index(records):
    return {r["source_index"]: r for r in records}


def drops(manifest):
    return {k: v["indices"] for k, v in manifest["dropped"].items()}


# ------------------------------------------------------------------------------------------------
# the split of each source, on hand-worked fixture rows


def test_math_split_and_drops(tmp_path):
    manifest, recs = run(tmp_path, "math")
    got = by_index(recs)
    assert got[0] == {
        "question": "What is $2+3$?",
        "reasoning": "We add the two numbers: $2+3=5$. The answer is $5$.",
        "answer": "5",
        "source": "math",
        "source_index": 0,
    }
    # nested braces inside the box
    assert got[1]["answer"] == r"\frac{1}{2}"
    assert got[1]["reasoning"] == r"Dividing both sides by 2 gives $x = \frac{1}{2}$."
    # a row with only `messages` (problem/solution null); \{ \} are literal braces
    assert got[2]["question"] == "List the roots of $(x-1)(x-2)=0$."
    assert got[2]["answer"] == r"\{1,2\}"
    assert got[2]["reasoning"] == r"Each factor vanishes once, so the set of roots is $\{1,2\}$."
    # the same answer boxed twice is one answer; both boxes are unboxed in the reasoning
    assert got[5]["answer"] == "3" and got[5]["reasoning"] == r"$6 \div 2 = 3$, so the answer is $3$."
    assert all(r"\boxed" not in r["reasoning"] for r in recs)
    assert drops(manifest) == {
        "no_boxed": [3],
        "multiple_answers": [4],  # (1) a = 3, (2) b = 4: the last box alone would be a wrong answer
        "malformed_boxed": [6],
        # a system turn in messages; no problem/solution/messages at all; messages a string
        "bad_schema": [7, 8, 12],
        "empty_reasoning": [9],
        "empty_answer": [10],
        "empty_question": [11],
    }
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_dropped"]) == (13, 4, 9)


@pytest.mark.parametrize(
    "solution, expected",
    [
        (r"So $x = \boxed{\boxed{2}}$ here.", ("So $x = 2$ here.", "2")),
        (r"Thus \boxed { 7 }.", ("Thus 7.", "7")),
        (r"Area is $\boxed{\dfrac{\sqrt{3}}{4}}$.", (r"Area is $\dfrac{\sqrt{3}}{4}$.", r"\dfrac{\sqrt{3}}{4}")),
        (r"Pick $\boxed{\text{(B)}}$", (r"Pick $\text{(B)}$", r"\text{(B)}")),
    ],
)
def test_math_boxed_variants(solution, expected):
    assert M.split_math_solution(solution) == expected


@pytest.mark.parametrize(
    "solution, reason",
    [
        (r"We get \boxed 5.", "malformed_boxed"),
        (r"We get $\boxed{5$.", "malformed_boxed"),
        (r"(a) $\boxed{1}$ (b) $\boxed{2}$", "multiple_answers"),
        (r"$$\boxed{12}$$", "empty_reasoning"),
        ("No box here.", "no_boxed"),
    ],
)
def test_math_drops(solution, reason):
    with pytest.raises(Drop) as e:
        M.split_math_solution(solution)
    assert e.value.reason == reason


def test_code_split_and_drops(tmp_path):
    manifest, recs = run(tmp_path, "code")
    got = by_index(recs)
    assert got[0] == {
        "question": "Write a Python function that reverses a string.",
        "reasoning": "We can use slicing with a step of -1.\n\nSlicing builds a new string from the end to the start.",
        "answer": "```python\ndef reverse(s):\n    return s[::-1]\n```",
        "source": "code",
        "source_index": 0,
    }
    # pip install (1 line) and the usage example (1 line) are not the main block (5 lines); they stay
    # in the reasoning
    assert got[1]["answer"] == (
        "```python\nimport numpy as np\n\ndef total(xs):\n    arr = np.asarray(xs)\n    return arr.sum()\n```"
    )
    assert got[1]["reasoning"] == (
        "Install numpy first:\n\n```bash\npip install numpy\n```\n\nThen convert and sum:\n\n"
        "Example:\n\n```python\nprint(total([1, 2]))\n```"
    )
    # two blocks of equal size: the later (corrected) one is the answer
    assert got[2]["answer"] == "```python\ndef add(a, b):\n    return a + b\n```"
    assert got[2]["reasoning"] == (
        "The original subtracts:\n\n```python\ndef add(a, b):\n    return a - b\n```\n\nThe corrected version adds:"
    )
    # a ~~~ fence holds ``` lines as code
    assert got[6]["answer"] == "~~~markdown\n# Title\n```py\nx = 1\n```\n~~~"
    assert got[6]["reasoning"] == "A fenced block inside a tilde fence:\n\nThe inner backticks are part of the snippet."
    assert got[8]["answer"] == "```js\nfunction double(x) {\n  return 2 * x;\n}\n```"
    assert got[8]["reasoning"] == "Multiply by two:"
    # an untagged output block (as long as the code) is not the answer when a tagged code block exists
    assert got[9]["answer"] == "```python\nfor i in range(1, 4):\n    sq = i * i\n    print(sq)\n```"
    assert got[9]["reasoning"] == "Loop and print:\n\nOutput:\n\n```\n1\n4\n9\n```"
    assert drops(manifest) == {"no_code": [3], "unclosed_code_fence": [4], "empty_reasoning": [5], "bad_schema": [7]}


def test_code_language_filter(tmp_path):
    manifest, recs = run(tmp_path, "code", code_languages=["python"])
    assert sorted(r["source_index"] for r in recs) == [0, 1, 2, 9]
    assert drops(manifest)["code_language"] == [6, 8]  # markdown, js


def test_medical_split_and_drops(tmp_path):
    manifest, recs = run(tmp_path, "medical")
    got = by_index(recs)
    q = (
        "Beck's triad is seen in:\n\nA. Cardiac tamponade\nB. Tension pneumothorax\nC. Hypothyroidism\n"
        "D. All of the above"
    )
    assert got[0] == {
        "question": q,
        "reasoning": "(Ref: Harrison 19/e p1572) Beck's triad is hypotension, raised JVP and muffled heart sounds.",
        "answer": "A",
        "source": "medical",
        "source_index": 0,
    }
    expected = {
        1: ("C", "Low thyroid hormone slows the metabolic rate."),  # Ans-C (Hypothyroidism)
        2: ("A", "Fluid in the pericardium compresses the heart."),  # Ans is 'a' i.e., Cardiac tamponade
        3: ("D", "Each of these reduces cardiac output."),  # Answer is (d) All of the above.
        4: ("C", "Thyroid hormone deficiency slows metabolism."),  # Option C is correct.
        5: ("A", "Pericardial fluid limits diastolic filling."),  # the option text as a label
        14: ("A", "Antibiotic use disrupts the colonic flora, letting toxigenic strains overgrow."),  # "C. difficile"
        15: ("A", "Beck's triad includes muffled heart sounds."),  # "Cardiac tamponadeBeck's" glued
    }
    assert {i: (r["answer"], r["reasoning"]) for i, r in got.items() if i != 0} == expected
    assert got[14]["question"].endswith("A. C. difficile\nB. E. coli\nC. S. aureus\nD. Klebsiella")
    assert drops(manifest) == {
        "leaks_answer": [6, 7],  # opens with the answer as a subject; "Hence the answer is (a)."
        "answer_mismatch": [8],  # "Ans. b." but cop = 0
        "empty_explanation": [9, 10],  # only the cue; null
        "no_answer": [11],  # cop = -1 (the unlabelled test split)
        "empty_option": [12],
        "bad_schema": [13],  # cop = 7
    }


OPTS = ["Cardiac tamponade", "Tension pneumothorax", "Hypothyroidism", "All of the above"]


@pytest.mark.parametrize(
    "exp, correct, expected",
    [
        ("Ans. a. Cardiac tamponade Beck's triad.", 0, "Beck's triad."),
        ("Ans: B. Tension pneumothorax The trachea shifts.", 1, "The trachea shifts."),
        ("ANSWER: (A) CARDIAC TAMPONADE REF: Harrison.", 0, "REF: Harrison."),
        ("Correct Answer: A Cardiac tamponade Beck's triad.", 0, "Beck's triad."),
        ("The correct option is 'c'. TSH is raised.", 2, "TSH is raised."),
        ("The answer is B. The trachea shifts.", 1, "The trachea shifts."),
        ("Right answer: (b) The trachea shifts.", 1, "The trachea shifts."),
        ("Ans.(b)The trachea shifts.", 1, "The trachea shifts."),
        ("Ans. BRef: Bailey 27/e. The trachea shifts away.", 1, "Ref: Bailey 27/e. The trachea shifts away."),
        ("Ans. Cardiac tamponade Beck's triad is seen.", 0, "Beck's triad is seen."),
        ("a i.e. Cardiac tamponade Beck's triad.", 0, "Beck's triad."),
        ("Ans. a. cardiac-tamponade Beck's triad.", 0, "Beck's triad."),  # spacing, case, punctuation free
        ("(a) Pericardial fluid compresses the heart.", 0, "Pericardial fluid compresses the heart."),
        # kept as is: not cues
        ("C. difficile is unrelated; Beck's triad is seen.", 0, "C. difficile is unrelated; Beck's triad is seen."),
        ("The answer is a combination of findings.", 0, "The answer is a combination of findings."),
        ("Option B: the trachea shifts there. Beck's triad is seen here.", 0,
         "Option B: the trachea shifts there. Beck's triad is seen here."),
        # the correct option's text later on is the justification, not a leak
        ("Muffled heart sounds and low BP point to cardiac tamponade.", 0,
         "Muffled heart sounds and low BP point to cardiac tamponade."),
    ],
)
def test_clean_explanation(exp, correct, expected):
    assert clean_explanation(exp, OPTS, correct) == expected


@pytest.mark.parametrize(
    "exp, correct, reason",
    [
        ("Cardiac tamponade is characterised by Beck's triad.", 0, "leaks_answer"),
        ("Ans. Cardiac tamponade is characterised by Beck's triad.", 0, "leaks_answer"),
        ("Beck's triad is seen. Hence the answer is (a).", 0, "leaks_answer"),
        ("Beck's triad is seen; option A is correct here.", 0, "leaks_answer"),
        ("Beck's triad is seen; (a) is the answer.", 0, "leaks_answer"),
        ("Beck's triad is seen, so the answer is Cardiac tamponade.", 0, "leaks_answer"),
        ("Ans. a. Beck's triad. Ans is 'a'", 0, "leaks_answer"),
        ("Ans. b. Tension pneumothorax.", 0, "answer_mismatch"),
        ("Ans is 'b' i.e., Tension pneumothorax", 0, "answer_mismatch"),
        ("Answer: Tension pneumothorax. The trachea shifts.", 0, "answer_mismatch"),
        ("Beck's triad is seen. Ans: c", 0, "answer_mismatch"),
        ("Ans. a, b Both cause hypotension.", 0, "multiple_answer_cue"),
        ("Answer- A. Cardiac-tamponadeCardiac tamponade is fluid around the heart.", 0, "leaks_answer"),
        ("Ans. a", 0, "empty_explanation"),
        ("Ans. a. Cardiac tamponade.", 0, "empty_explanation"),
    ],
)
def test_leak_filter(exp, correct, reason):
    with pytest.raises(Drop) as e:
        clean_explanation(exp, OPTS, correct)
    assert e.value.reason == reason


def test_medical_schema_rows():
    row = {"question": "Q?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 1, "exp": "Ans. b. Because."}
    assert M.convert_medical(row) == ("Q?\n\nA. w\nB. x\nC. y\nD. z", "Because.", "B")
    for bad, reason in (
        ({"cop": "1"}, "bad_schema"),  # a string label is not guessed at (0- or 1-based?)
        ({"cop": True}, "bad_schema"),
        ({"cop": None}, "no_answer"),
        ({"opc": None}, "bad_schema"),
        ({"exp": 3}, "bad_schema"),
        ({"opa": "X"}, "duplicate_options"),
        ({"question": "  "}, "empty_question"),
    ):
        with pytest.raises(Drop) as e:
            M.convert_medical({**row, **bad})
        assert e.value.reason == reason, bad


def test_graders_read_the_reference_response(tmp_path):
    """The reference response (the template's trace) of each record grades as correct against its own
    answer: no box left in a math reasoning outranks the <answer> tag, the code answer is the block the
    code grader extracts, and the letter is what the choice grader reads."""
    grade_math = pytest.importorskip("aropd.evaluators.grade_math")
    grade_code = pytest.importorskip("aropd.evaluators.grade_code")
    grade_choice = pytest.importorskip("aropd.evaluators.grade_choice")
    from aropd.views import PromptTemplate

    trace = PromptTemplate().format_trace
    _, math = run(tmp_path, "math")
    for r in math:
        got = grade_math.extract_math_answer(trace(r["reasoning"], r["answer"]))
        assert got == grade_math.clean_answer(r["answer"])
    _, code = run(tmp_path, "code", code_languages=["python"])
    # benchmarks give the grader an entry point; with one, the block that defines it is taken even when
    # the reasoning holds other python blocks (row 1: a usage example; row 2: the buggy original)
    entry = {0: "reverse", 1: "total", 2: "add"}
    for r in code:
        if r["source_index"] in entry:
            got = grade_code.extract_code(trace(r["reasoning"], r["answer"]), entry[r["source_index"]])
            assert got.strip() == M.fenced_blocks(r["answer"])[0].code
    _, medical = run(tmp_path, "medical")
    for r in medical:
        assert grade_choice.extract_choice(trace(r["reasoning"], r["answer"])) == r["answer"]


# ------------------------------------------------------------------------------------------------
# subsets, manifest, length filters


def _math_rows(n):
    """``n`` NuminaMath-style rows; every 5th has no box (dropped)."""
    rows = []
    for i in range(n):
        sol = f"Adding gives {i}+1={i + 1}." + ("" if i % 5 == 4 else f" The answer is $\\boxed{{{i + 1}}}$.")
        rows.append({"source": "synthetic_math", "problem": f"What is {i}+1?", "solution": sol, "messages": None})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_subset_is_seeded_and_order_free(tmp_path):
    src = _write_jsonl(tmp_path / "rows.jsonl", _math_rows(60))
    full, _ = run(tmp_path, "math", src, name="all.jsonl")
    passing = [i for i in range(60) if i % 5 != 4]
    assert full["rows_out"] == 48 and drops(full) == {"no_boxed": [i for i in range(60) if i % 5 == 4]}

    m1, r1 = run(tmp_path, "math", src, name="a.jsonl", limit=10, seed=3)
    m2, r2 = run(tmp_path, "math", src, name="b.jsonl", limit=10, seed=3)
    assert r1 == r2 and m1["outputs"]["a.jsonl"]["sha256"] == m2["outputs"]["b.jsonl"]["sha256"]
    # the subset is the 10 passing rows with the smallest sha256(f"{seed}:{index}") — a function of
    # the seed and the rows alone, not of which rows were looked at first — written in index order
    def key(i):
        return hashlib.sha256(f"3:{i}".encode()).digest()

    assert [r["source_index"] for r in r1] == sorted(sorted(passing, key=key)[:10])
    assert [r["source_index"] for r in r1] != list(range(10))  # not the first rows
    assert m1["rows_examined"] == 10 + len(m1["dropped"].get("no_boxed", {"indices": []})["indices"])
    # a larger limit extends the subset; another seed gives another subset
    _, r3 = run(tmp_path, "math", src, name="c.jsonl", limit=15, seed=3)
    assert {r["source_index"] for r in r1} < {r["source_index"] for r in r3}
    _, r4 = run(tmp_path, "math", src, name="d.jsonl", limit=10, seed=4)
    assert {r["source_index"] for r in r4} != {r["source_index"] for r in r1}
    # more than there is: everything that passes, and a warning
    msgs = []
    m5 = materialize("math", tmp_path / "e.jsonl", src, limit=100, seed=3, cache_dir=str(tmp_path / "cache"),
                     log=msgs.append)
    assert m5["rows_out"] == 48 and "fewer than --limit 100" in msgs[0]


def test_manifest(tmp_path):
    manifest, recs = run(tmp_path, "medical", limit=5, seed=1)
    out = tmp_path / "medical" / "train.jsonl"
    on_disk = json.loads((tmp_path / "medical" / "train.manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["outputs"] == {
        "train.jsonl": {"rows": 5, "bytes": out.stat().st_size, "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    }
    assert manifest["rows_in"] == 16 and manifest["rows_out"] == len(recs) == 5
    dropped = [i for v in manifest["dropped"].values() for i in v["indices"]]
    assert manifest["rows_dropped"] == len(dropped) == sum(v["count"] for v in manifest["dropped"].values())
    assert manifest["rows_examined"] == 5 + len(dropped)
    assert not set(dropped) & {r["source_index"] for r in recs}
    assert (manifest["seed"], manifest["limit"], manifest["source"], manifest["split"]) == (1, 5, "medical", "train")
    assert manifest["args"]["seed"] == 1 and manifest["input"].endswith("medmcqa.jsonl")
    assert manifest["length_filter"] is None and manifest["template"]["trace"].startswith("<reasoning>")


def test_length_filters(tmp_path):
    from aropd.models import load_tokenizer
    from aropd.views import PromptTemplate, render

    tok, tpl = load_tokenizer(TINY), PromptTemplate()
    _, recs = run(tmp_path, "math", name="unfiltered.jsonl")
    lens = {
        r["source_index"]: (
            len(render(tok, tpl.student_messages(r["question"]))),
            len(render(tok, tpl.teacher_messages(r["question"], r["reasoning"], r["answer"]))),
            len(tok(tpl.format_trace(r["reasoning"], r["answer"]), add_special_tokens=False)["input_ids"]) + 1,
        )
        for r in recs
    }
    # budgets just under the largest of each length, one at a time
    for k, (arg, reason) in enumerate(
        [("max_prompt_tokens", "student_prompt_too_long"), ("max_teacher_tokens", "teacher_prompt_too_long"),
         ("max_new_tokens", "completion_too_long")]
    ):
        top = max(v[k] for v in lens.values())
        budgets = M.Budgets(**{**{"max_prompt_tokens": 10**6, "max_teacher_tokens": 10**6,
                                  "max_new_tokens": 10**6}, arg: top - 1})
        m, kept = run(tmp_path, "math", name=f"{arg}.jsonl", tokenizer=TINY, budgets=budgets)
        too_long = sorted(i for i, v in lens.items() if v[k] > top - 1)
        assert too_long and drops(m)[reason] == too_long
        assert sorted(r["source_index"] for r in kept) == sorted(set(lens) - set(too_long))
        assert m["length_filter"]["tokenizer"] == TINY and m["length_filter"][arg] == top - 1
        assert m["length_filter"]["max_kept"][["student_prompt", "teacher_prompt", "completion"][k]] <= top - 1


def test_template_file(tmp_path):
    spec = tmp_path / "fit.yaml"
    spec.write_text(yaml.safe_dump({"data": {"init_args": {"template": {"system": ""}}}}))
    m, _ = run(tmp_path, "math", template=str(spec), tokenizer=TINY)
    assert m["template"]["system"] == ""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"trace": "{reasoning} only"}))
    with pytest.raises(M.MaterializeError, match="lacks {answer}"):
        run(tmp_path, "math", template=str(bad))


def test_reads_parquet_and_saved_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([json.loads(x) for x in (FIXTURES / "medmcqa.jsonl").read_text().splitlines()])
    ds.to_parquet(str(tmp_path / "medmcqa.parquet"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))}).save_to_disk(str(tmp_path / "saved"))
    _, from_jsonl = run(tmp_path, "medical")
    _, from_parquet = run(tmp_path, "medical", str(tmp_path / "medmcqa.parquet"), name="p.jsonl")
    _, from_saved = run(tmp_path, "medical", str(tmp_path / "saved"), name="s.jsonl")
    m, from_val = run(tmp_path, "medical", str(tmp_path / "saved"), name="v.jsonl", split="validation")
    gz = tmp_path / "medmcqa.jsonl.gz"
    gz.write_bytes(gzip.compress((FIXTURES / "medmcqa.jsonl").read_bytes()))
    _, from_gz = run(tmp_path, "medical", str(gz), name="g.jsonl")
    assert from_parquet == from_jsonl == from_saved == from_gz
    assert [r["source_index"] for r in from_val] == [0, 1, 2] and m["split"] == "validation"


# ------------------------------------------------------------------------------------------------
# errors and atomic writes


def test_errors_name_the_problem_and_write_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o" / "train.jsonl"
    with pytest.raises(M.MaterializeError, match="unknown source 'chemistry'"):
        materialize("chemistry", out, str(FIXTURES / "medmcqa.jsonl"))
    with pytest.raises(M.MaterializeError, match="cannot read input: .*missing.jsonl: no such file"):
        materialize("math", out, str(tmp_path / "missing.jsonl"))
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text('{"problem": "x", "solution": "y"}\nnot json\n')
    with pytest.raises(M.MaterializeError, match="cannot read input: .*garbage.jsonl: line 2: not valid JSON"):
        materialize("math", out, str(garbage), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(M.MaterializeError, match="has none of the math columns"):
        materialize("math", out, str(FIXTURES / "medmcqa.jsonl"), cache_dir=str(tmp_path / "cache"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(M.MaterializeError, match="cannot create the output folder '.*a-file'"):
        materialize("math", tmp_path / "a-file" / "train.jsonl", str(FIXTURES / "numinamath.jsonl"),
                    cache_dir=str(tmp_path / "cache"))
    with pytest.raises(M.MaterializeError, match="cannot load tokenizer '.*no-such-tokenizer'"):
        materialize("math", out, str(FIXTURES / "numinamath.jsonl"), tokenizer=str(tmp_path / "no-such-tokenizer"))

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'AI-MO/NuminaMath-CoT' on the Hub (LocalEntryNotFoundError)")

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(M.MaterializeError, match="cannot read input 'AI-MO/NuminaMath-CoT': ConnectionError"):
        materialize("math", out)  # the default input is the hub id
    assert not (tmp_path / "o").exists()

    # the command line: exit status 2 and the message, nothing written
    assert M.main(["physics", "--out", str(out), "--input", str(FIXTURES / "numinamath.jsonl")]) == 2
    assert "unknown source 'physics'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_failure_midway_leaves_previous_output(tmp_path, monkeypatch):
    manifest, _ = run(tmp_path, "math")
    out = tmp_path / "math" / "train.jsonl"
    before = (out.read_bytes(), M.manifest_path(out).read_bytes())
    convert = M.SOURCES["math"].convert

    def flaky(row):
        if row.get("problem") == "Solve $2x = 1$.":
            raise KeyError("boom")
        return convert(row)

    monkeypatch.setitem(M.SOURCES, "math", M.Source("math", "x", M.SOURCES["math"].columns, flaky))
    with pytest.raises(RuntimeError, match=r"math row 1 of .*numinamath.jsonl.*KeyError"):
        run(tmp_path, "math")
    assert (out.read_bytes(), M.manifest_path(out).read_bytes()) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.jsonl", "train.manifest.json"]

    # a failure after both files are written (the disk fills as they are moved into place) moves
    # nothing into place either, and names the file and the reason
    monkeypatch.setitem(M.SOURCES, "math", M.Source("math", "x", M.SOURCES["math"].columns, convert))
    import errno
    import os

    def full_disk(src, dst):
        assert Path(src).read_text().count("\n") >= 2  # the temporary file was complete
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*train\.jsonl: No space left on device"):
        run(tmp_path, "math", limit=2)
    assert (out.read_bytes(), M.manifest_path(out).read_bytes()) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.jsonl", "train.manifest.json"]


def test_script_runs(tmp_path):
    import subprocess

    out = tmp_path / "m" / "train.jsonl"
    cmd = [sys.executable, str(ROOT / "scripts" / "materialize.py"), "medmcqa", "--out", str(out),
           "--input", str(FIXTURES / "medmcqa.jsonl"), "--limit", "3", "--cache-dir", str(tmp_path / "cache")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "medical: 3 examples" in res.stderr and len(out.read_text().splitlines()) == 3


# ------------------------------------------------------------------------------------------------
# the configs and `aropd fit`


@pytest.mark.parametrize("source", ["math", "code", "medical"])
def test_data_config_matches_its_command(source):
    path = ROOT / "configs" / "data" / f"{source}.yaml"
    text = path.read_text()
    cfg = yaml.safe_load(text)
    train = cfg["data"]["init_args"]["train"]
    lines = [ln for ln in text.splitlines() if "scripts/materialize.py" in ln or ln.startswith("#     --")]
    command = " ".join(ln.lstrip("# ").rstrip("\\ ") for ln in lines)
    args = shlex.split(command[command.index("scripts/materialize.py"):])[1:]
    parsed = M.build_parser().parse_args(args)
    assert M.get_source(parsed.source).name == source and train == [parsed.out]
    assert parsed.limit and parsed.tokenizer
    assert parsed.max_prompt_tokens == cfg["data"]["init_args"]["max_prompt_tokens"]
    assert parsed.max_teacher_tokens == cfg["data"]["init_args"]["max_teacher_tokens"]
    assert f"aropd fit --config configs/quickstart.yaml --config configs/data/{source}.yaml" in text


@pytest.mark.slow
def test_aropd_fit_reads_the_output(tmp_path, monkeypatch):
    cli = pytest.importorskip("aropd.cli")
    # materialized for the quickstart's tiny student, with the rollout budget the fit below uses
    budgets = M.Budgets(max_prompt_tokens=512, max_teacher_tokens=1024, max_new_tokens=100)
    paths, rows = [], 0
    for source in ("math", "code", "medical"):
        rows += run(tmp_path, source, tokenizer=TINY, budgets=budgets)[0]["rows_out"]
        paths.append(str(tmp_path / source / "train.jsonl"))
    monkeypatch.chdir(ROOT)  # the configs name repository paths
    run_cli = cli.main([
        "fit", "--config", "configs/quickstart.yaml", "--config", "tests/conf/tiny.yaml",
        "--config", "configs/data/math.yaml",
        "--data.init_args.train", json.dumps(paths), "--data.init_args.batch_size", "4",
        "--data.init_args.val_benchmarks", "[]", "--model.init_args.max_new_tokens", "100",
        "--trainer.max_steps", "2", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_checkpointing", "false",
    ])
    # every materialized record is used, none dropped or shortened by the datamodule's own budgets
    assert run_cli.datamodule.stats == {"examples": rows, "dropped_too_long": 0, "truncated_trace": 0}
    assert rows >= 8 and run_cli.trainer.global_step == 2
