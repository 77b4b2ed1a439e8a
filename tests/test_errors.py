"""Bad input fails fast, in words, naming what is wrong, and leaves no run folder behind.

Each case below is a mistake a user makes (a truncated or foreign checkpoint, a model path that is not
there, a hub id without network, a GGUF file without its extra, a record without a field); each must
fail before the trainer writes anything, with an error naming the file or option and what was expected.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from aropd.cli import main
from aropd.console import entry

ROOT = Path(__file__).resolve().parents[1]
TINY_CONF = ROOT / "tests" / "conf" / "tiny.yaml"


def _run(sub: str, root: Path, *extra: str):
    return main([sub, "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(TINY_CONF),
                 "--trainer.default_root_dir", str(root), "--trainer.max_steps", "1",
                 "--data.init_args.val_benchmarks", "[{name: toy, limit: 2}]", *extra])


def _truncated_checkpoint(tmp: Path) -> list[str]:
    # The start of a real torch zip archive: the "PK\x03\x04" header is there, the central directory is not.
    whole = tmp / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(4096)}, "pytorch-lightning_version": "2.6"}, whole)
    cut = tmp / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[:5000])
    return ["--ckpt_path", str(cut)]


def _json_checkpoint(tmp: Path) -> list[str]:
    f = tmp / "metrics.json"
    f.write_text(json.dumps({"accuracy": 0.5}))
    return ["--ckpt_path", str(f)]


def _torch_file_without_state_dict(tmp: Path) -> list[str]:
    f = tmp / "weights.pt"
    torch.save({"w": torch.zeros(2)}, f)
    return ["--ckpt_path", str(f)]


def _other_architecture(tmp: Path) -> list[str]:
    # The tiny Llama has a 384 x 64 embedding (tests/conf/tiny.yaml's student); this one is 10 x 8.
    f = tmp / "other.ckpt"
    torch.save({"state_dict": {"student.model.embed_tokens.weight": torch.zeros(10, 8)},
                "pytorch-lightning_version": "2.6"}, f)
    return ["--ckpt_path", str(f)]


def _other_method(tmp: Path) -> list[str]:
    f = tmp / "sft.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "aropd.sft.SupervisedFineTuning"},
                "pytorch-lightning_version": "2.6"}, f)
    return ["--ckpt_path", str(f)]


def _gguf_without_package(tmp: Path, monkeypatch) -> list[str]:
    f = tmp / "model.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    return ["--model.init_args.student", str(f)]


def _missing_field(tmp: Path) -> list[str]:
    f = tmp / "train.jsonl"
    rows = [{"question": "1+1", "reasoning": "1+1=2", "answer": "2"}, {"question": "2+2", "answer": "4"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--data.init_args.train", f"[{f}]"]


def _separate_teacher(tmp: Path) -> list[str]:
    return ["--model.init_args.teacher", "aropd.teachers.SeparateTeacher",
            "--model.init_args.teacher.init_args.model", "./no-such-teacher"]


# (id, subcommand, how to make the arguments, the exception, what its message must contain)
CASES = [
    ("truncated_checkpoint", "validate", _truncated_checkpoint, ValueError,
     ["cut.ckpt", "truncated", "expected a Lightning checkpoint"]),
    ("json_as_checkpoint", "validate", _json_checkpoint, ValueError,
     ["metrics.json", "not a zip archive", "expected a Lightning checkpoint"]),
    ("torch_file_not_a_checkpoint", "validate", _torch_file_without_state_dict, ValueError,
     ["weights.pt", "not a Lightning checkpoint", "'w'"]),
    ("missing_checkpoint", "fit", lambda tmp: ["--ckpt_path", str(tmp / "nope.ckpt")], FileNotFoundError,
     ["nope.ckpt", "no such checkpoint"]),
    ("other_architecture", "validate", _other_architecture, ValueError,
     ["other.ckpt", "model.init_args.student='aropd/assets/tiny-llama'", "embed_tokens.weight: (10, 8)", "(384, 64)"]),
    ("other_method", "validate", _other_method, ValueError,
     ["sft.ckpt", "trained by aropd.sft.SupervisedFineTuning", "aropd.module.PrivilegedDistillation",
      "--model aropd.sft.SupervisedFineTuning"]),
    ("relative_student", "fit", lambda tmp: ["--model.init_args.student", "./my-model"], FileNotFoundError,
     ["model.init_args.student", "no such folder", "./my-model"]),
    ("absolute_student", "fit", lambda tmp: ["--model.init_args.student", str(tmp / "gone")], FileNotFoundError,
     ["model.init_args.student", "no such folder: {tmp}/gone"]),
    ("hub_shaped_local_path_offline", "fit", lambda tmp: ["--model.init_args.student", "runs/x"], FileNotFoundError,
     ["model.init_args.student", "no such folder 'runs/x'", "not in the local Hugging Face cache",
      "HF_HUB_OFFLINE", "hf download runs/x", "huggingface-cli download runs/x", "local folder"]),
    ("separate_teacher_path", "fit", _separate_teacher, FileNotFoundError,
     ["model.init_args.teacher.init_args.model", "no such folder", "./no-such-teacher"]),
    ("missing_field", "fit", _missing_field, ValueError,
     ["train.jsonl", "record 1", "missing field 'reasoning'"]),
]


@pytest.mark.parametrize("sub,make,error,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named_before_anything_is_written(tmp_path, monkeypatch, sub, make, error, needles):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    args = make(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(error) as e:
        _run(sub, run, *args)
    for needle in needles:
        needle = needle.format(tmp=tmp_path)
        assert needle in str(e.value), (needle, str(e.value))
    assert not run.exists(), sorted(str(p) for p in run.rglob("*"))  # no lightning_logs, no config.yaml
    print(f"{sub} failed in {time.monotonic() - t0:.1f} s: {e.value}")


def test_gguf_without_its_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    needs = r"model\.gguf is a GGUF file: loading it needs gguf: pip install 'aropd\[gguf\]'"
    with pytest.raises(ImportError, match=needs):
        _run("fit", tmp_path / "run", *_gguf_without_package(tmp_path, monkeypatch))
    assert not (tmp_path / "run").exists()


def test_an_unreachable_hub_fails_at_once_saying_how_to_run_offline(tmp_path, monkeypatch):
    """Not offline by the environment, but no network: one short request, not a minute of retries."""
    import huggingface_hub
    from huggingface_hub import constants

    calls = []

    def unreachable(url, timeout=None, **kw):
        calls.append((url, timeout))
        raise ConnectionError("Name or service not known")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        _run("fit", tmp_path / "run", "--model.init_args.student", "some-org/some-model")
    text = str(e.value)
    assert "model.init_args.student" in text and "not in the local Hugging Face cache" in text
    assert "unreachable" in text and "Name or service not known" in text
    assert "hf download some-org/some-model" in text and "or pass a local folder" in text
    assert len(calls) == 1 and calls[0][1] <= 10 and "some-org/some-model" in calls[0][0]
    assert time.monotonic() - t0 < 30  # the parse and one refused request; the hub client's retries took 78 s
    assert not (tmp_path / "run").exists()


def test_entry_prints_one_line_and_exits_2_and_the_traceback_only_when_debugging(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["aropd", "fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(TINY_CONF),
            "--trainer.default_root_dir", str(tmp_path / "run"), "--model.init_args.student", "./my-model"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("AROPD_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        entry()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"aropd: error: model.init_args.student: no such folder: ./my-model (relative to {tmp_path})"
    assert "AROPD_DEBUG=1" in err[-2]
    assert not any("Traceback" in line for line in err)
    monkeypatch.setenv("AROPD_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no such folder: ./my-model"):
        entry()


def test_resuming_from_last_checks_the_checkpoint_it_resolves_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _other_architecture(run / "checkpoints")
    (run / "checkpoints" / "other.ckpt").rename(run / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=r"last\.ckpt holds a different model than model\.init_args\.student"):
        _run("fit", run, "--ckpt_path", "last")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]  # no lightning_logs
