"""LoRA students (peft): only the adapter trains, the frozen teacher is exactly the base model, the EMA
teacher averages the adapter alone, checkpoints hold the adapters and resume exactly, the merged export
is the adapted model, and 2 FSDP2 processes train as one."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

pytest.importorskip("peft")

from aropd.data import PrivilegedDataModule  # noqa: E402
from aropd.lora import EMA_ADAPTER, STUDENT_ADAPTER, LoRA, add_lora, adapter_parameters, export_merged, is_adapter_key  # noqa: E402
from aropd.models import load_causal_lm  # noqa: E402
from aropd.module import PrivilegedDistillation  # noqa: E402
from aropd.teachers import EMATeacher, FrozenTeacher, completion_hidden, score_views  # noqa: E402
from aropd.types import Rollout  # noqa: E402
from test_distributed import env, finish, fit_cmd, free_port, global_loss, kill_when, read_losses, start  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "aropd" / "assets" / "toy-base")
SMALL = LoRA(rank=4, alpha=8.0)  # every default target: q/k/v/o and the MLP projections


@pytest.fixture(scope="module")
def batch(tiny_path):
    dm = PrivilegedDataModule(tokenizer=tiny_path, batch_size=4, max_new_tokens=8)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _fit(module, tiny_path, steps: int, *callbacks) -> None:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, PrivilegedDataModule(tokenizer=tiny_path, batch_size=4, max_new_tokens=8))


def _logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    with torch.no_grad():
        h = completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        return model.get_output_embeddings()(h).log_softmax(-1)


def _greedy_rollout(module, batch) -> Rollout:
    from aropd.rollout import SamplingConfig

    return module.rollout(batch.student_ids, batch.student_mask, SamplingConfig(temperature=0.0, max_new_tokens=8), 0)


# ---- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    (dict(rank=0), r"lora: rank must be >= 1, got 0"),
    (dict(alpha=0.0), r"lora: alpha must be > 0"),
    (dict(dropout=1.0), r"lora: dropout must be in \[0, 1\)"),
    (dict(target_modules=[]), r"lora: target_modules is empty"),
    (dict(target_modules=["q_proj", "qproj", "lm_head"]), r"lora.target_modules: \['lm_head', 'qproj'\] name no linear layer"),
])
def test_bad_lora_options_raise_naming_them_before_any_weight_is_loaded(tiny_path, options, match):
    with pytest.raises(ValueError, match=match):
        PrivilegedDistillation(student=tiny_path, lora=options)  # a mapping, as the CLI passes it


# ---- training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method, checkpointing", [("ar_opd", False), ("ar_opd", True), ("sft", True)])
def test_only_the_student_adapter_gets_gradients_and_the_optimizer(tiny_path, batch, method, checkpointing):
    from aropd.sft import SupervisedFineTuning

    cls = SupervisedFineTuning if method == "sft" else PrivilegedDistillation
    m = cls(student=tiny_path, lora=SMALL, max_new_tokens=8, gradient_checkpointing=checkpointing)  # EMA teacher
    m.configure_model()
    teacher = getattr(m, "teacher_model", None)  # SFT has none
    assert teacher is None or list(teacher.parameters()) == []  # no second copy of the model
    out = m.training_step(batch, 0)
    (out["loss"] if isinstance(out, dict) else out).backward()
    student_adapter = {n for n, _ in m.student.named_parameters() if is_adapter_key(n) and f".{STUDENT_ADAPTER}." in n}
    with_grad = {n for n, p in m.student.named_parameters() if p.grad is not None}
    assert with_grad == student_adapter and len(student_adapter) == 2 * 7 * 2  # A and B × 7 projections × 2 layers
    assert sum(p.grad.abs().sum() for n, p in m.student.named_parameters() if n in with_grad) > 0
    assert {id(p) for p in m.configure_optimizers().param_groups[0]["params"]} == {
        id(p) for n, p in m.student.named_parameters() if n in student_adapter}
    # The teacher's forward switched adapters and back: the same parameters train afterwards.
    assert {n for n, p in m.student.named_parameters() if p.requires_grad} == student_adapter


def test_frozen_teacher_is_exactly_the_base_model_while_the_student_moves(tiny_path, batch):
    m = PrivilegedDistillation(student=tiny_path, lora=SMALL, teacher=FrozenTeacher(), max_new_tokens=8,
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    _fit(m, tiny_path, 2)
    base = load_causal_lm(tiny_path).eval()
    r = _greedy_rollout(m, batch)
    scores = score_views(m.teacher_model, batch, r, frozenset({"full", "partial"}), m.tokenizer.pad_token_id)
    expected = score_views(base, batch, r, frozenset({"full", "partial"}), m.tokenizer.pad_token_id)
    assert torch.equal(scores.full, expected.full) and torch.equal(scores.partial, expected.partial)
    teacher_lp = _logprobs(m.teacher_model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    base_lp = _logprobs(base, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    student_lp = _logprobs(m.student.eval(), r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    assert torch.equal(teacher_lp, base_lp)
    assert (student_lp - base_lp).abs().max() > 1e-3  # two steps of SGD moved the adapted student
    # ... and only its adapter: the base weights are the loaded ones, bit for bit.
    trained = {k.replace(".base_layer.", "."): v for k, v in m.student.state_dict().items() if not is_adapter_key(k)}
    assert all(torch.equal(trained[k], v) for k, v in base.state_dict().items())


class _AdapterSnapshots(L.Callback):
    def __init__(self):
        self.student, self.ema = [], []

    def _snap(self, pl_module):
        self.student.append([p.detach().clone() for p in adapter_parameters(pl_module.student, STUDENT_ADAPTER)])
        self.ema.append([p.detach().clone() for p in adapter_parameters(pl_module.student, EMA_ADAPTER)])

    def on_train_start(self, trainer, pl_module):
        self._snap(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._snap(pl_module)


def test_ema_teacher_averages_the_adapter_by_the_ema_rule_and_scores_with_it(tiny_path, batch):
    alpha = 0.25
    m = PrivilegedDistillation(student=tiny_path, lora=SMALL, teacher=EMATeacher(alpha), max_new_tokens=8,
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    snaps = _AdapterSnapshots()
    _fit(m, tiny_path, 3, snaps)
    assert len(snaps.ema) == 4 and len(snaps.ema[0]) == 28
    assert all(torch.equal(s, t) for s, t in zip(snaps.student[0], snaps.ema[0]))  # starts as the student's adapter
    for k in range(1, 4):
        for t_prev, t_now, s_now in zip(snaps.ema[k - 1], snaps.ema[k], snaps.student[k]):
            assert torch.allclose(t_now, (1 - alpha) * t_prev + alpha * s_now, atol=1e-7, rtol=0)
    assert any(not torch.equal(a, b) for a, b in zip(snaps.ema[3], snaps.ema[0]))  # it moved
    # The teacher's forward is the base model with the EMA weights as its adapter, built independently.
    reference = add_lora(load_causal_lm(tiny_path), SMALL).eval()
    with torch.no_grad():
        for p, w in zip(adapter_parameters(reference, STUDENT_ADAPTER), snaps.ema[3]):
            p.copy_(w)
    r = _greedy_rollout(m, batch)
    got = _logprobs(m.teacher_model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    want = _logprobs(reference, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    assert torch.equal(got, want)


# ---- checkpoints and export ---------------------------------------------------------------------
def test_checkpoint_holds_the_adapters_and_the_merged_export_is_the_adapted_model(tmp_path, monkeypatch):
    from aropd.cli import main

    monkeypatch.chdir(ROOT)
    base = ["--config", "configs/quickstart.yaml", "--config", "tests/conf/tiny.yaml"]
    lora = ["--config", "configs/peft/lora.yaml"]
    main(["fit", *base, *lora, "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "2",
          "--trainer.limit_val_batches", "0", "--trainer.callbacks", "[]", "--model.init_args.max_new_tokens", "16"])
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)  # plain types only: the lora options are a mapping
    keys = set(ckpt["state_dict"])
    assert keys and all(is_adapter_key(k) for k in keys)  # no frozen base weights
    assert {k.split(".")[-2] for k in keys} == {STUDENT_ADAPTER, EMA_ADAPTER}
    assert ckpt["hyper_parameters"]["lora"] == {"rank": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    # AdamW holds moments for the student's adapter alone.
    n_adapter = sum(v.numel() for k, v in ckpt["state_dict"].items() if f".{STUDENT_ADAPTER}." in k)
    moments = sum(s["exp_avg"].numel() for s in ckpt["optimizer_states"][0]["state"].values())
    assert moments == n_adapter

    # The adapted model, rebuilt by hand from the base and the checkpoint's adapter.
    adapted = add_lora(load_causal_lm("aropd/assets/tiny-llama"), LoRA())
    adapted.load_state_dict({k[len("student."):]: v for k, v in ckpt["state_dict"].items() if f".{STUDENT_ADAPTER}." in k},
                            strict=False)
    assert any(p.abs().sum() > 0 for p in adapter_parameters(adapted, STUDENT_ADAPTER)[1::2])  # B moved off zero
    out = export_merged(ckpt_path, tmp_path / "merged")
    merged = load_causal_lm(str(out))
    assert not any(is_adapter_key(k) for k in merged.state_dict()) and not hasattr(merged, "peft_config")
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = adapted.eval()(input_ids=ids).logits, merged.eval()(input_ids=ids).logits
    print("max |logits(merged) - logits(adapted)|:", (want - got).abs().max().item())
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert (got - load_causal_lm("aropd/assets/tiny-llama")(input_ids=ids).logits).abs().max() > 1e-4

    # `aropd validate` loads the merged folder as a plain student, and the LoRA checkpoint with its options.
    val = [*base, "--config", "configs/suites/toy.yaml", "--data.init_args.val_benchmarks", "[{name: toy, limit: 4}]",
           "--model.init_args.val_max_new_tokens", "4"]
    cli = main(["validate", *val, "--model.init_args.student", str(out), "--trainer.default_root_dir", str(tmp_path / "v1")])
    assert "val/toy/accuracy" in cli.trainer.callback_metrics
    cli = main(["validate", *val, *lora, "--ckpt_path", str(ckpt_path), "--trainer.default_root_dir", str(tmp_path / "v2")])
    assert cli.trainer.callback_metrics["val/toy/accuracy"] == pytest.approx(
        json.loads(next((tmp_path / "v1").rglob("results.json")).read_text())["benchmarks"]["toy"]["accuracy"])
    with pytest.raises(ValueError, match="holds a LoRA adapter, but the config trains no adapter"):
        main(["validate", *val, "--ckpt_path", str(ckpt_path), "--trainer.default_root_dir", str(tmp_path / "v3")])


# ---- multi-process ------------------------------------------------------------------------------
LORA_RUN = ("--config", "configs/peft/lora.yaml")


@pytest.mark.slow
def test_lora_sigkill_after_a_checkpoint_then_resume_gives_the_uninterrupted_losses(tmp_path):
    """The quickstart with a LoRA student (sampled rollouts, EMA adapter, AdamW, schedule, diagnostics),
    checkpointing every 2 steps, SIGKILLed after step 4 and resumed from its adapter-only checkpoint:
    every per-step loss equals the uninterrupted run's to 1e-6."""
    steps = ("--trainer.max_steps", "6", *LORA_RUN)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    pw = start(fit_cmd(whole, *steps))
    pk = start(fit_cmd(killed, *steps, "--trainer.callbacks+=run_recorders.StallAfterStep",
                       "--trainer.callbacks.step", "4", "--trainer.callbacks.marker", str(tmp_path / "stalled")))
    kill_when(pk, tmp_path / "stalled")
    ckpt = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and all(is_adapter_key(k) for k in ckpt["state_dict"])
    finish(start(fit_cmd(killed, *steps, "--ckpt_path", "last")))
    finish(pw)
    lw, lk = read_losses(whole / "rec"), read_losses(killed / "rec")
    assert sorted(lw) == sorted(lk) == [1, 2, 3, 4, 5, 6]
    diffs = [abs(lw[s][0][0] - lk[s][0][0]) for s in lw]
    print("LoRA: per-step |loss(killed + resumed) - loss(uninterrupted)|:", diffs)
    assert max(diffs) <= 1e-6, diffs
    assert len({lw[s][0][0] for s in lw}) == 6  # the losses really move


@pytest.mark.slow
def test_lora_fsdp_two_processes_match_one_process_through_a_kill_and_resume(tmp_path):
    """A LoRA student with its EMA adapter teacher on the sharded strategy, 2 processes × batch 4 vs 1
    process × batch 8, greedy rollouts; the 2-process run is SIGKILLed after its step-2 checkpoint (a
    sharded folder holding the adapters only) and resumed: the same per-step losses to 1e-6."""
    greedy = ("--model.init_args.sampling.temperature", "0", "--trainer.max_steps", "4", *LORA_RUN)
    sharded = ("--data.init_args.batch_size", "4", "--config", "configs/strategies/fsdp.yaml",
               "--trainer.accelerator", "cpu", "--trainer.devices", "2")
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = start(fit_cmd(one, *greedy, "--data.init_args.batch_size", "8"))
    p2 = start(fit_cmd(two, *greedy, *sharded, "--trainer.callbacks+=run_recorders.StallAfterStep",
                       "--trainer.callbacks.step", "2", "--trainer.callbacks.marker", str(tmp_path / "killed")))
    kill_when(p2, tmp_path / "killed")
    from aropd.lora import checkpoint_contents

    ckpt = two / "checkpoints" / "last.ckpt"
    at_kill = checkpoint_contents(ckpt)
    assert ckpt.is_symlink() and at_kill["global_step"] == 2
    assert at_kill["state_dict"] and all(is_adapter_key(k) for k in at_kill["state_dict"])  # no frozen base
    finish(start(fit_cmd(two, *greedy, *sharded, "--ckpt_path", "last")))
    finish(p1)
    l1, l2 = read_losses(one / "rec"), read_losses(two / "rec")
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    assert all(sorted(l2[s]) == [0, 1] for s in l2)  # both ranks, each step once: resumed at step 3
    diffs = [abs(global_loss(l2[s]) - l1[s][0][0]) for s in l1]
    print("LoRA: per-step |loss(2 procs, killed + resumed) - loss(1 proc)|:", diffs)
    assert max(diffs) <= 1e-6, diffs
    assert len({l1[s][0][0] for s in l1}) == 4
    # The sharded checkpoint's adapters are the one-process run's, and aropd-merge reads the folder.
    final, full = checkpoint_contents(ckpt), checkpoint_contents(one / "checkpoints" / "last.ckpt")
    assert set(final["state_dict"]) == set(full["state_dict"])
    wdiff = max((final["state_dict"][k] - v).abs().max().item() for k, v in full["state_dict"].items())
    print("LoRA: max |adapter(2 procs) - adapter(1 proc)| after 4 steps:", wdiff)
    assert wdiff <= 1e-5
    merged = export_merged(ckpt, tmp_path / "merged")
    assert (merged / "config.json").is_file()
