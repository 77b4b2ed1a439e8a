"""`aropd validate` end to end: generation, grading, TensorBoard tags and the results files agree."""

import json
from pathlib import Path

import pytest

from aropd.buckets import EDGES, bucket_names
from aropd.cli import main
from aropd.evaluators.score import main as score_main

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "benchmarks"


def _validate(tmp_path, suite):
    cli = main([
        "validate", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(ROOT / "tests/conf/tiny.yaml"),
        "--trainer.default_root_dir", str(tmp_path), "--model.init_args.val_max_new_tokens", "12",
        "--data.init_args.val_benchmarks", json.dumps(suite),
    ])
    return Path(cli.trainer.log_dir)


def test_validate_writes_tags_results_and_per_sample_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    suite = [{"name": "toy", "limit": 6}, {"name": "math500", "data_path": str(FIX / "math500.jsonl")}]
    log_dir = _validate(tmp_path, suite)
    from test_cli import scalars

    s = {k: v[-1][1] for k, v in scalars(log_dir).items()}
    results = json.loads((log_dir / "validate" / "results.json").read_text())
    accs = []
    for name in ("toy", "math500"):
        rows = [json.loads(l) for l in (log_dir / "validate" / f"{name}.jsonl").read_text().splitlines()]
        assert rows and all({"id", "response", "extracted", "correct", "reason", "length_tokens"} <= r.keys() for r in rows)
        assert all(1 <= r["length_tokens"] <= 12 for r in rows)
        acc = sum(r["correct"] for r in rows) / len(rows)
        accs.append(acc)
        assert s[f"val/{name}/accuracy"] == pytest.approx(acc)
        assert results["benchmarks"][name]["accuracy"] == pytest.approx(acc)
        # Bucket counts: every response is at most 12 tokens, so all fall in the first bucket.
        for tag in bucket_names("len"):
            expected = len(rows) if tag == "len_0_256" else 0
            assert s[f"val/{name}/count_{tag}"] == expected
        assert f"val/{name}/acc_len_0_256" in s
        # Re-grading the same responses without a model gives the same verdicts.
        responses = tmp_path / f"{name}_responses.jsonl"
        responses.write_text("".join(json.dumps({"id": r["id"], "response": r["response"]}) + "\n" for r in rows))
        # `limit` validated the first records only: the rest of the benchmark is not missing, just not asked.
        args = ["--benchmark", name, "--responses", str(responses), "--out", str(tmp_path / f"scored_{name}"),
                "--missing", "skip"]
        if name == "math500":
            args += ["--data", str(FIX / "math500.jsonl")]
        capsys.readouterr()
        score_main(args)
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert printed["n"] == len(rows) and printed["accuracy"] == pytest.approx(acc)
    assert s["val/average/accuracy"] == pytest.approx(sum(accs) / 2)
    assert results["average"]["accuracy"] == pytest.approx(sum(accs) / 2)
    assert len(EDGES) == 6


def test_unknown_benchmark_is_named_before_any_generation(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="no_such_bench"):
        _validate(tmp_path, [{"name": "no_such_bench"}])


def test_missing_local_benchmark_file_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(Exception, match="missing_file.jsonl"):
        _validate(tmp_path, [{"name": "math500", "data_path": str(tmp_path / "missing_file.jsonl")}])


def test_validate_from_a_checkpoint_takes_its_weights_and_the_command_lines_options(tmp_path, monkeypatch, capsys):
    """Trained with val_max_new_tokens 24, validated from its last.ckpt with 7: every response obeys 7
    (the toy benchmark allows far more, and the random tiny model rarely stops early, so some reach it),
    the saved config and --print_config say 7, and the weights are the checkpoint's."""
    import torch
    import yaml

    monkeypatch.chdir(ROOT)
    base = ["--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(ROOT / "tests/conf/tiny.yaml")]
    main(["fit", *base, "--trainer.default_root_dir", str(tmp_path / "train"), "--trainer.max_steps", "1",
          "--trainer.limit_val_batches", "0", "--model.init_args.val_max_new_tokens", "24"])
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["hyper_parameters"]["val_max_new_tokens"] == 24 and saved["global_step"] == 1

    args = ["validate", *base, "--trainer.default_root_dir", str(tmp_path / "val"), "--ckpt_path", str(ckpt),
            "--model.init_args.val_max_new_tokens", "7", "--data.init_args.val_benchmarks", "[{name: toy, limit: 8}]"]
    capsys.readouterr()  # the fit's output
    with pytest.raises(SystemExit):
        main([*args, "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["val_max_new_tokens"] == 7
    cli = main(args)
    log_dir = Path(cli.trainer.log_dir)
    lengths = [json.loads(l)["length_tokens"] for l in (log_dir / "validate" / "toy.jsonl").read_text().splitlines()]
    assert len(lengths) == 8 and max(lengths) == 7, lengths
    assert json.loads((log_dir / "validate" / "results.json").read_text())["benchmarks"]["toy"]
    assert yaml.safe_load((log_dir / "config.yaml").read_text())["model"]["init_args"]["val_max_new_tokens"] == 7
    assert cli.model.hparams.val_max_new_tokens == 7
    weights = cli.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in saved["state_dict"].items() if k.startswith("student."))
