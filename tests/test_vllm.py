"""The vLLM rollout engine against the student itself, on toy-base (head_dim 32: vLLM's CPU attention
has no kernel for tiny-llama's 16). Runs in the vLLM stage of scripts/test.sh (its own venv, see
scripts/setup_vllm.sh); without vllm installed only the install-hint test runs."""

import copy
from pathlib import Path

import pytest
import torch

from aropd.rollout import HFGenerate, SamplingConfig, eos_ids_of, seeded
from aropd.vllm_engine import VLLMEngine, vllm_available

ROOT = Path(__file__).resolve().parents[1]
TOY_BASE = str(ROOT / "aropd/assets/toy-base")
needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vllm not installed (the vLLM stage: scripts/setup_vllm.sh)")
CPU = torch.device("cpu")


def test_without_vllm_the_engine_names_the_extra_to_install():
    if vllm_available():
        pytest.skip("vllm is installed")
    with pytest.raises(ValueError, match=r'aropd\[vllm\]'):
        VLLMEngine()


@pytest.fixture(scope="module")
def toy():
    """toy-base, its EOS ids, and a batch of 8 toy student prompts as training sees them (left-padded)."""
    from aropd.data import PrivilegedDataModule, pad
    from aropd.models import load_causal_lm
    from aropd.toy import TOY_TEMPLATE

    dm = PrivilegedDataModule(tokenizer=TOY_BASE, template=TOY_TEMPLATE, batch_size=8, max_new_tokens=96)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    model = load_causal_lm(TOY_BASE, "float32").eval()
    # Toy prompts all have one length: drop 2·i leading tokens of row i, so rows are left-padded differently.
    ids, mask = pad([row[2 * i :].tolist() for i, row in enumerate(batch.student_ids)], dm.tokenizer.pad_token_id, left=True)
    return model, eos_ids_of(model, dm.tokenizer), dm.tokenizer.pad_token_id, ids, mask


@pytest.fixture(scope="module")
def built(toy):
    """One engine for the module (a build costs seconds), with what its build did to the process."""
    model = toy[0]
    torch.manual_seed(123)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    engine = VLLMEngine(kv_cache_gib=0.5)
    engine.build(model, CPU)
    return engine, {"rng_kept": torch.equal(rng, torch.get_rng_state()), "threads_kept": torch.get_num_threads() == threads,
                    "set_num_threads_is_torch_own": getattr(torch.set_num_threads, "__module__", "").startswith("torch")}


def _rollout(engine, model, toy, sampling, seed=0):
    _, eos, pad_id, ids, mask = toy
    with torch.no_grad(), seeded(seed, CPU):
        return engine.generate(model, ids, mask, sampling, eos, pad_id)


def _rows(r):
    return [row[m.bool()].tolist() for row, m in zip(r.completion_ids, r.completion_mask)]


@needs_vllm
def test_building_leaves_the_trainers_rng_and_threads_alone(built):
    assert built[1] == {"rng_kept": True, "threads_kept": True, "set_num_threads_is_torch_own": True}


@needs_vllm
def test_greedy_tokens_equal_hf_generate(built, toy):
    engine, model = built[0], toy[0]
    engine.weights_updated()  # the other tests may have synced other weights
    greedy = SamplingConfig(max_new_tokens=96, temperature=0.0)
    got, want = _rollout(engine, model, toy, greedy), _rollout(HFGenerate(), model, toy, greedy)
    assert _rows(got) == _rows(want)  # 8/8 rows, EOS and masks included
    assert torch.equal(got.completion_mask, want.completion_mask)
    assert got.completion_mask.sum(-1).min() < got.completion_mask.sum(-1).max()  # rows end at different steps


@needs_vllm
def test_sampled_logprobs_equal_a_teacher_forced_forward(built, toy):
    from aropd.teachers import completion_hidden

    engine, model = built[0], toy[0]
    engine.weights_updated()
    r = _rollout(engine, model, toy, SamplingConfig(max_new_tokens=64, temperature=1.0))
    with torch.no_grad():
        h = completion_hidden(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        lp = model.lm_head(h).log_softmax(-1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    m = r.completion_mask.bool()
    gap = (lp - r.logprobs)[m].abs()
    assert m.sum() > 100 and gap.max() < 1e-4, float(gap.max())
    assert (r.logprobs[~m] == 0).all()


@needs_vllm
def test_a_seed_repeats_its_rollout_and_another_seed_does_not(built, toy):
    engine, model = built[0], toy[0]
    engine.weights_updated()
    s = SamplingConfig(max_new_tokens=48, temperature=1.0)
    a, b, c = (_rollout(engine, model, toy, s, seed) for seed in (7, 7, 8))
    assert _rows(a) == _rows(b) and torch.equal(a.logprobs, b.logprobs)
    assert sum(x != y for x, y in zip(_rows(a), _rows(c))) >= 6


@needs_vllm
def test_a_generation_batch_too_large_for_one_prefill_step_samples_with_its_seeds(built, toy):
    """48 rows of 4 toy prompts end to end (~5k prompt tokens, more than one step's 4096 by default):
    with chunked prefill vLLM's CPU build fails to rewind the seeded generators of rows cut mid-prompt."""
    engine, model = built[0], toy[0]
    _, eos, pad_id, ids, mask = toy
    rows = [r[m.bool()].tolist() * 4 for r, m in zip(ids, mask)] * 6
    from aropd.data import pad

    big_ids, big_mask = pad(rows, pad_id, left=True)
    assert big_mask.sum() > 4096
    s = SamplingConfig(max_new_tokens=4, temperature=1.0)
    with torch.no_grad(), seeded(3, CPU):
        a = engine.generate(model, big_ids, big_mask, s, eos, pad_id)
    with torch.no_grad(), seeded(3, CPU):
        b = engine.generate(model, big_ids, big_mask, s, eos, pad_id)
    assert a.completion_ids.shape[0] == 48 and torch.equal(a.completion_ids, b.completion_ids)


@needs_vllm
def test_after_a_sync_the_engine_samples_the_updated_weights_and_a_stale_one_does_not(built, toy):
    engine, model = built[0], toy[0]
    greedy = SamplingConfig(max_new_tokens=48, temperature=0.0)
    syncs = len(engine.sync_seconds)
    engine.weights_updated()
    before = _rollout(engine, model, toy, greedy)  # synced to the original weights
    changed = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(p.std() * torch.randn(p.shape, generator=g))
    want = _rows(_rollout(HFGenerate(), changed, toy, greedy))
    assert sum(x != y for x, y in zip(want, _rows(before))) >= 6  # the change changes greedy outputs
    stale = _rows(_rollout(engine, changed, toy, greedy))  # no weights_updated(): the engine keeps its copy
    engine.weights_updated()
    synced = _rows(_rollout(engine, changed, toy, greedy))
    assert synced == want  # 8/8
    assert stale == _rows(before) and sum(x != y for x, y in zip(stale, want)) >= 6  # the negative control
    assert len(engine.sync_seconds) == syncs + 2  # once per weights_updated(), none for the stale rollout
    engine.weights_updated()  # back to the original weights at the next rollout


@needs_vllm
def test_tied_embeddings_sync_too(toy):
    """A student whose output layer is its embedding (SmolLM2, Qwen2.5-0.5B): vLLM's CPU build packs the
    output layer's weight once at load, and a reload that sends the embedding alone leaves that packed copy
    stale; the engine unties the two in its own config and sends both."""
    from transformers import LlamaForCausalLM

    model, eos, pad_id, ids, mask = toy
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = True
    tied = LlamaForCausalLM(config).eval()
    tied.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, strict=False)
    tied.tie_weights()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    engine = VLLMEngine(kv_cache_gib=0.25)
    greedy = SamplingConfig(max_new_tokens=32, temperature=0.0)
    assert _rows(_rollout(engine, tied, toy, greedy)) == _rows(_rollout(HFGenerate(), tied, toy, greedy))
    with torch.no_grad():
        tied.model.embed_tokens.weight.add_(tied.model.embed_tokens.weight.std() * torch.randn_like(tied.lm_head.weight))
    engine.weights_updated()
    assert _rows(_rollout(engine, tied, toy, greedy)) == _rows(_rollout(HFGenerate(), tied, toy, greedy))


@needs_vllm
def test_bad_options_name_themselves_before_anything_is_built(toy):
    with pytest.raises(ValueError, match="gpu_memory_utilization is a GPU option"):
        VLLMEngine(gpu_memory_utilization=0.5)
    with pytest.raises(ValueError, match="sleep is a GPU option"):
        VLLMEngine(sleep=True)
    with pytest.raises(ValueError, match="kv_cache_gib must be > 0"):
        VLLMEngine(kv_cache_gib=0)
    from aropd.models import load_causal_lm

    tiny = load_causal_lm(str(ROOT / "aropd/assets/tiny-llama"), "float32")
    engine = VLLMEngine()
    with pytest.raises(ValueError, match="head_dim 16"):
        engine.build(tiny, CPU)
    assert engine.llm is None


@needs_vllm
def test_three_step_fit_with_the_engine_has_finite_losses_and_no_trainer_sampler_gap(tmp_path, monkeypatch):
    """Generation windows of two micro-batches, one optimizer step each: a sync per window, on-policy."""
    from aropd.cli import main

    monkeypatch.chdir(ROOT)
    cli = main([
        "fit", "--config", "configs/quickstart.yaml", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.accumulate_grad_batches", "2",
        "--model.init_args.engine", "aropd.vllm_engine.VLLMEngine", "--model.init_args.max_new_tokens", "48",
        "--model.init_args.importance_cap", "2.0",
        "--data.init_args.batch_size", "4", "--data.init_args.generation_batch_size", "8",
    ])
    s = _scalars(cli.trainer.log_dir)
    assert len(s["train/loss"]) == 3 and all(torch.isfinite(torch.tensor(s["train/loss"])))
    gaps = s["diag/rollout_logprob_gap"]
    assert len(gaps) == 3 and max(gaps) < 1e-3, gaps
    # One sync per window: at the build, then after each of the first two optimizer steps.
    assert len(cli.model.engine.sync_seconds) == 3


def _scalars(log_dir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


@needs_vllm
@pytest.mark.slow
def test_fsdp_two_processes_each_with_an_engine_synced_from_gathered_shards(tmp_path):
    """FSDP2 over gloo, 2 ranks: each rank's engine joins the trainer's process group (vLLM's external
    launcher mode) and is synced from parameters gathered shard by shard, in the same order on both."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "aropd", "fit", "--config", "configs/quickstart.yaml",
           "--config", "configs/strategies/fsdp.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.limit_val_batches", "0", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
           "--model.init_args.engine", "aropd.vllm_engine.VLLMEngine",
           "--model.init_args.engine.init_args.kv_cache_gib", "0.25",
           "--model.init_args.max_new_tokens", "32", "--data.init_args.batch_size", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    s = _scalars(next(tmp_path.rglob("events.out.tfevents*")).parent)
    assert len(s["train/loss"]) == 2 and all(torch.isfinite(torch.tensor(s["train/loss"])))
    assert len(s["diag/rollout_logprob_gap"]) == 2 and max(s["diag/rollout_logprob_gap"]) < 1e-3


@needs_vllm
def test_a_lora_student_is_synced_merged(toy):
    """vLLM holds a plain model: a LoRA student's weights reach it as base + adapter, under the base names,
    so the engine samples the adapted student (not its base, nor the EMA adapter)."""
    from aropd.lora import LoRA, add_lora, adapter_parameters, STUDENT_ADAPTER

    model, eos, pad_id, ids, mask = toy
    student = add_lora(copy.deepcopy(model), LoRA(rank=8, alpha=16))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero (adapter = no-op): move it so the adapter matters
        for p in adapter_parameters(student, STUDENT_ADAPTER):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    student.eval()
    greedy = SamplingConfig(max_new_tokens=32, temperature=0.0)
    want = _rows(_rollout(HFGenerate(), student, toy, greedy))
    base = _rows(_rollout(HFGenerate(), model, toy, greedy))
    assert sum(x != y for x, y in zip(want, base)) >= 6  # the adapter changes greedy outputs
    engine = VLLMEngine(kv_cache_gib=0.25)
    assert _rows(_rollout(engine, student, toy, greedy)) == want


@needs_vllm
def test_the_merged_lora_export_loads_in_vllm(toy, tmp_path, monkeypatch):
    """`aropd-merge`'s folder is a plain model to vLLM: loaded from disk, it decodes the adapted student's tokens."""
    import dataclasses

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process, as VLLMEngine runs it

    from vllm import LLM, SamplingParams, TokensPrompt

    from aropd.lora import LoRA, STUDENT_ADAPTER, adapter_parameters, add_lora, export_merged, is_adapter_key
    from aropd.vllm_engine import _own_rng_and_threads

    model, _, pad_id, ids, mask = toy
    lora = LoRA(rank=8, alpha=16)
    student = add_lora(copy.deepcopy(model), lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(student, STUDENT_ADAPTER):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    student.eval()
    # What a LoRA run's checkpoint holds: the options and the adapter weights, not the base.
    ckpt = tmp_path / "lora.ckpt"
    torch.save({"hyper_parameters": {"student": TOY_BASE, "dtype": "float32", "lora": dataclasses.asdict(lora)},
                "state_dict": {f"student.{k}": v for k, v in student.state_dict().items() if is_adapter_key(k)}}, ckpt)
    folder = export_merged(ckpt, tmp_path / "merged")
    greedy = SamplingConfig(max_new_tokens=24, temperature=0.0)
    with torch.no_grad():  # no EOS: every row decodes all 24 tokens in both
        want = HFGenerate().generate(student, ids, mask, greedy, [], pad_id).completion_ids.tolist()
    with _own_rng_and_threads():
        llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, seed=0, kv_cache_memory_bytes=2**28,
                  enable_chunked_prefill=False, max_num_batched_tokens=8192)
    prompts = [TokensPrompt(prompt_token_ids=row[m.bool()].tolist()) for row, m in zip(ids, mask)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == want
