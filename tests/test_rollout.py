"""Rollout engines (generate vs the lean decode loop) and generation windows (one call, several micro-batches)."""

import json
import math

import lightning as L
import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler

import aropd.rollout as rollout_mod
from aropd.data import PrivilegedDataModule
from aropd.models import load_causal_lm, load_tokenizer
from aropd.module import PrivilegedDistillation
from aropd.rollout import (
    GenerationWindowSampler,
    HFGenerate,
    LeanDecode,
    RolloutEngine,
    SamplingConfig,
    completion_mask,
    eos_ids_of,
    next_token_scores,
    pick_tokens,
    sampling_warpers,
    seeded,
)
from aropd.teachers import completion_hidden
from aropd.types import Rollout

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_path):
    return load_causal_lm(tiny_path, "float32").eval()


@pytest.fixture(scope="module")
def prompts(tiny_path, tmp_path_factory):
    """12 left-padded student prompts of different lengths."""
    train = tmp_path_factory.mktemp("prompts") / "train.jsonl"
    train.write_text("".join(
        json.dumps({"question": "Add " + " and ".join(["7"] * k) + ".", "reasoning": f"{k} sevens.", "answer": str(7 * k)})
        + "\n" for k in range(1, 13)
    ))
    dm = PrivilegedDataModule(train=[str(train)], tokenizer=tiny_path, batch_size=12)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    lengths = b.student_mask.sum(-1)
    assert len(set(lengths.tolist())) > 3 and b.student_mask[:, 0].min() == 0
    return b.student_ids, b.student_mask


@pytest.fixture(scope="module")
def ids(model, tiny_path):
    tok = load_tokenizer(tiny_path)
    return eos_ids_of(model, tok), tok.pad_token_id


def _force_eos_at(model, position: int, or_after: bool = False):
    """Make EOS the top logit wherever the next token sits at ``position`` (so rows of different
    prompt lengths end at different steps; ``or_after``: at any later position too) and impossible
    elsewhere: a hook on the model's forward."""
    eos = model.generation_config.eos_token_id

    def hook(mod, args, kwargs, out):
        pos = kwargs["position_ids"][:, -1] + 1
        out.logits[:, -1, eos] = torch.where(pos >= position if or_after else pos == position, 1e4, -math.inf)
        return out

    return model.register_forward_hook(hook, with_kwargs=True)


def test_greedy_lean_equals_generate_token_for_token(model, prompts, ids):
    eos, pad = ids
    lengths = prompts[1].sum(-1)
    handle = _force_eos_at(model, int(lengths.min()) + 12)  # row i ends after 13 - (len_i - min) tokens
    try:
        s = SamplingConfig(max_new_tokens=24, temperature=0.0)
        ref = HFGenerate().generate(model, *prompts, s, eos, pad)
        lean = LeanDecode().generate(model, *prompts, s, eos, pad)
    finally:
        handle.remove()
    ends = ref.completion_mask.sum(-1)
    assert len(set(ends.tolist())) > 3 and ends.max() == 24  # rows really finish at different steps
    assert torch.equal(lean.completion_ids, ref.completion_ids)
    assert torch.equal(lean.completion_mask, ref.completion_mask)
    assert torch.equal(lean.prompt_ids, prompts[0])


def test_sampled_logprobs_match_a_teacher_forced_forward(model, prompts, ids):
    s = SamplingConfig(max_new_tokens=40, temperature=0.9, top_k=100, top_p=0.95)
    eos, pad = ids
    stops = eos + list(range(40, 44))  # a few common ids end completions too: rows leave at different steps
    with seeded(11, CPU):
        r = LeanDecode().decode(model, *prompts, s, stops, pad)
        lp = r.logprobs
    lengths = r.completion_mask.sum(-1)
    assert len(set(lengths.tolist())) > 3  # rows were dropped at different steps
    with torch.no_grad():
        h = completion_hidden(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        ref = model.get_output_embeddings()(h).float().log_softmax(-1)
    ref = ref.gather(-1, r.completion_ids[..., None]).squeeze(-1) * r.completion_mask
    assert torch.allclose(lp, ref, atol=1e-5, rtol=0)
    assert (lp[r.completion_mask == 0] == 0).all()


def test_same_seed_same_tokens(model, prompts, ids):
    s = SamplingConfig(max_new_tokens=16, temperature=1.0)
    outs = []
    for seed in (3, 3, 4):
        with seeded(seed, CPU):
            outs.append(LeanDecode().generate(model, *prompts, s, *ids).completion_ids)
    assert torch.equal(outs[0], outs[1])
    assert outs[0].shape != outs[2].shape or not torch.equal(outs[0], outs[2])


def test_synced_dummy_row_keeps_stepping_and_changes_nothing(model, prompts, ids, monkeypatch):
    """Another rank still decoding (simulated): this rank steps a dummy row to the budget, tokens unchanged."""
    s = SamplingConfig(max_new_tokens=30, temperature=1.0)
    with seeded(5, CPU):
        alone = LeanDecode().generate(model, *prompts, s, *ids)
    calls = []
    monkeypatch.setattr(rollout_mod, "_any_rank", lambda flag, device: calls.append(flag) or True)
    forwards = []
    handle = model.register_forward_hook(lambda m, a, kw, o: forwards.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        with seeded(5, CPU):
            synced = LeanDecode().generate(model, *prompts, s, *ids, synced=True)
    finally:
        handle.remove()
    assert torch.equal(synced.completion_ids, alone.completion_ids[:, : synced.completion_ids.shape[1]])
    assert synced.completion_ids.shape[1] == alone.completion_ids.shape[1]
    assert len(forwards) == 30 and len(calls) == 29  # prefill + every step to the budget, one vote per step
    if not all(calls):  # this rank finished before the budget: the rest were one-row dummy forwards
        assert forwards[-1] == 1


def _support(scores):
    return set(torch.isfinite(scores[0]).nonzero().squeeze(-1).tolist())


def test_top_k_then_top_p_restrict_to_the_right_support():
    probs = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04]])
    logits = probs.log()
    assert _support(next_token_scores(logits, sampling_warpers(SamplingConfig(top_k=2)))) == {0, 1}
    # top-p keeps the most likely tokens while the mass before each is below p: .40, .65, .80 ≥ .75
    assert _support(next_token_scores(logits, sampling_warpers(SamplingConfig(top_p=0.75)))) == {0, 1, 2}
    # top-k first, renormalised (.50, .3125, .1875), then top-p .75: .50, .8125 → {0, 1}
    both = sampling_warpers(SamplingConfig(top_k=3, top_p=0.75))
    assert _support(next_token_scores(logits, both)) == {0, 1}
    # temperature comes first: flatter at T = 4, so top-p 0.75 needs more tokens
    hot = sampling_warpers(SamplingConfig(temperature=4.0, top_p=0.75))
    assert [type(w).__name__ for w in hot] == ["TemperatureLogitsWarper", "TopPLogitsWarper"]
    assert _support(next_token_scores(logits, hot)) == {0, 1, 2, 3, 4}
    # draws stay inside the support; greedy is the argmax
    with seeded(0, CPU):
        draws = pick_tokens(logits.expand(2000, -1), SamplingConfig(top_k=3, top_p=0.75), both)
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.40 / 0.65) < 0.05
    assert pick_tokens(logits, SamplingConfig(temperature=0.0), []).item() == 0


# ---- generation windows ---------------------------------------------------------------------------
def test_window_sampler_yields_batch_samplers_micro_batches_with_their_window():
    shard = dict(num_replicas=2, rank=1, shuffle=True, seed=3)
    base = list(BatchSampler(DistributedSampler(range(75), **shard), 4, True))
    sampler = GenerationWindowSampler.following(DistributedSampler(range(75), **shard), 4, 12, True)
    keys = list(sampler)
    assert len(keys) == len(base) == len(sampler) == 9
    assert [[i for i, _, mine in k if mine] for k in keys] == base
    assert [k[0][1] for k in keys] == [0, 1, 2] * 3
    for w in range(3):
        window = [i for mb in base[3 * w : 3 * w + 3] for i in mb]
        assert all([i for i, _, _ in k] == window for k in keys[3 * w : 3 * w + 3])
    sampler.set_epoch(1)  # a new order per epoch, as the plain sampler's
    assert [[i for i, _, mine in k if mine] for k in sampler][0] != base[0]
    with pytest.raises(ValueError, match="multiple of batch_size"):
        GenerationWindowSampler(range(8), 4, 6, num_replicas=1, rank=0)


def test_datamodule_windows_carry_the_same_micro_batches(tiny_path):
    plain = PrivilegedDataModule(tokenizer=tiny_path, batch_size=4)
    windowed = PrivilegedDataModule(tokenizer=tiny_path, batch_size=4, generation_batch_size=12)
    for dm in (plain, windowed):
        dm.setup("fit")
    for k, (a, b) in enumerate(zip(plain.train_dataloader(), windowed.train_dataloader())):
        assert a.window is None and b.window.index == k % 3 and (b.window.start, b.window.stop) == (4 * (k % 3), 4 * (k % 3) + 4)
        for name in ("student_ids", "student_mask", "full_ids", "partial_ids", "reference_ids", "privileged_len"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        rows = b.window.prompt_mask[b.window.start : b.window.stop].bool()
        mine = b.student_mask.bool()
        for r in range(4):  # the window's rows are the micro-batch's prompts, padded wider
            assert torch.equal(b.window.prompt_ids[b.window.start + r][rows[r]], b.student_ids[r][mine[r]])
        if k == 7:
            break
    with pytest.raises(ValueError, match="generation_batch_size"):
        PrivilegedDataModule(tokenizer=tiny_path, batch_size=4, generation_batch_size=6)


class PromptHash(RolloutEngine):
    """Completions that depend on each prompt alone (not on the batch it is in) — so a rollout sampled
    in a window of 16 equals the one sampled in a micro-batch of 8, and losses can be compared exactly."""

    def __init__(self):
        self.calls = []

    def generate(self, model, prompt_ids, prompt_mask, sampling, eos_ids, pad_id, synced=False) -> Rollout:
        self.calls.append(prompt_ids.shape[0])
        key = (prompt_ids * prompt_mask).sum(-1, keepdim=True)
        t = torch.arange(sampling.max_new_tokens)
        ids = (key * (t + 3) + 7 * t) % 300 + 5
        ends = 2 + key.squeeze(-1) % (sampling.max_new_tokens - 2)
        ids[torch.arange(len(ids)), ends] = eos_ids[0]
        mask = completion_mask(ids, eos_ids)
        width = int(mask.sum(-1).max())
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                       completion_ids=ids.masked_fill(mask == 0, pad_id)[:, :width], completion_mask=mask[:, :width])


class _Record(L.Callback):
    def __init__(self):
        self.losses, self.staleness, self.widths = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())
        self.widths.append(outputs["record"].mask.shape)
        s = trainer.callback_metrics.get("train/rollout_staleness")
        self.staleness.append(None if s is None else int(s))


@pytest.fixture(scope="module")
def examples(tiny_path):
    dm = PrivilegedDataModule(tokenizer=tiny_path, max_new_tokens=12)
    dm.setup("fit")
    return dm.train_examples[:64]


def _fit(tiny_path, examples, generation_batch_size, accumulate, steps):
    L.seed_everything(0)
    engine = PromptHash()
    m = PrivilegedDistillation(
        student=tiny_path, engine=engine, max_new_tokens=12,
        optimizer=lambda p: torch.optim.SGD(p, 0.5),
    )
    dm = PrivilegedDataModule(tokenizer=tiny_path, batch_size=8, max_new_tokens=12,
                              generation_batch_size=generation_batch_size)
    dm.train_examples = examples  # tokenized once for all fits
    rec = _Record()
    L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, accelerator="cpu", logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[rec]).fit(m, dm)
    return rec, engine.calls


def test_window_aligned_with_the_optimizer_step_trains_exactly_as_without(tiny_path, examples):
    """Generation batch 16 = 2 accumulated micro-batches of 8: one call per step, staleness 0, and the
    same per-micro-batch losses (and records) as sampling each micro-batch on its own."""
    plain, plain_calls = _fit(tiny_path, examples, None, accumulate=2, steps=2)
    windowed, calls = _fit(tiny_path, examples, 16, accumulate=2, steps=2)
    assert plain_calls == [8] * 4 and calls == [16] * 2
    assert windowed.staleness == [0] * 4 and plain.staleness == [None] * 4
    assert windowed.widths == plain.widths
    assert windowed.losses == pytest.approx(plain.losses, abs=1e-6)


def test_window_spanning_steps_is_one_step_stale(tiny_path, examples):
    """Generation batch 16, no accumulation: the window's second micro-batch trains after an optimizer
    step on rollouts sampled before it (staleness 1); the first of each window is on-policy."""
    plain, _ = _fit(tiny_path, examples, None, accumulate=1, steps=4)
    windowed, calls = _fit(tiny_path, examples, 16, accumulate=1, steps=4)
    assert calls == [16, 16] and windowed.staleness == [0, 1, 0, 1]
    assert windowed.losses[0] == pytest.approx(plain.losses[0], abs=1e-6)
    # PromptHash ignores the weights, so stale and fresh rollouts coincide: the losses still match
    assert windowed.losses == pytest.approx(plain.losses, abs=1e-6)


# ---- sharded: synced stopping over 2 processes ------------------------------------------------------
def _synced_worker() -> None:
    """One rank of test_lean_decode_stays_in_step_under_fsdp2 (run as ``python tests/test_rollout.py``)."""
    import json
    import os
    from pathlib import Path

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from aropd.sharding import shard_causal_lm

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tiny = str(Path(__file__).resolve().parents[1] / "aropd/assets/tiny-llama")
    dm = PrivilegedDataModule(tokenizer=tiny, batch_size=8)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    rows = slice(4 * rank, 4 * rank + 4)
    ids, mask = b.student_ids[rows], b.student_mask[rows]
    # rank 0's rows end after 1 or 2 tokens, rank 1's run the whole budget of 12
    stop = int(mask.sum(-1).min()) + 1 if rank == 0 else 10**9
    s = SamplingConfig(max_new_tokens=12, temperature=0.0)
    model = load_causal_lm(tiny).eval()
    handle = _force_eos_at(model, stop, or_after=True)
    ref = LeanDecode().generate(model, ids, mask, s, [1], 0)  # unsharded, alone
    handle.remove()
    shard_causal_lm(model, init_device_mesh("cpu", (world,)))
    handle = _force_eos_at(model, stop, or_after=True)
    forwards = []
    model.register_forward_hook(lambda m, a, kw, o: forwards.append(kw["input_ids"].shape[0]), with_kwargs=True)
    out = LeanDecode().generate(model, ids, mask, s, [1], 0, synced=True)
    handle.remove()
    Path(os.environ["OUT"], f"rank{rank}.json").write_text(json.dumps({
        "same": torch.equal(out.completion_ids, ref.completion_ids[:, : out.completion_ids.shape[1]])
        and torch.equal(out.completion_mask.sum(-1), ref.completion_mask.sum(-1)),
        "lengths": out.completion_mask.sum(-1).tolist(), "forwards": forwards,
    }))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_lean_decode_stays_in_step_under_fsdp2(tmp_path):
    """FSDP2 over gloo, 2 ranks: rank 0's rows finish after a few tokens, rank 1's run the budget; rank 0
    keeps joining the sharded forwards with a dummy row (else both would hang) and each rank's tokens
    equal an unsharded decode of its rows."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(root), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OUT=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve())], cwd=root, env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["same"] and r1["same"]
    assert max(r0["lengths"]) <= 2 and r1["lengths"] == [12] * 4
    assert len(r0["forwards"]) == len(r1["forwards"]) == 12  # prefill + 11 steps on both ranks
    assert r0["forwards"][-1] == 1  # rank 0 stepped a dummy row at the end


if __name__ == "__main__":
    _synced_worker()
