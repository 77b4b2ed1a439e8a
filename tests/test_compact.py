"""The compact decode step against the model's own forward, on each layout it stands in for."""

import logging

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from aropd.compact import CompactStep, unsupported
from aropd.rollout import HFGenerate, LeanDecode, SamplingConfig, _make_room, seeded

CPU = torch.device("cpu")
SIZE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
LAYOUTS = {
    # grouped-query attention, tied output layer
    "llama": LlamaConfig(**SIZE, num_key_value_heads=2, tie_word_embeddings=True),
    "llama-rope-scaled": LlamaConfig(**SIZE, num_key_value_heads=4, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    "mistral": MistralConfig(**SIZE, num_key_value_heads=1, sliding_window=None),
    "qwen2": Qwen2Config(**SIZE, num_key_value_heads=2),  # biases on q, k, v
    "qwen3": Qwen3Config(**SIZE, num_key_value_heads=2, head_dim=12),  # per-head q/k norms, head_dim ≠ C/H
}


def _model(config, dtype=torch.float32):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():  # random biases and norms, so a step that skipped them would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _prompts(n=5, width=9, seed=1):
    """Left-padded prompts of lengths 3..width."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (n, width), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        pad = (i * 2) % (width - 2)
        ids[i, :pad], mask[i, :pad] = 0, 0
    return ids, mask


def _prefilled(model, ids, mask, budget):
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
    _make_room(out.cache, budget)
    return out.cache, position[:, -1:]


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_step_logits_equal_the_model_forward(layout, pack):
    """Three decode steps from the same prefilled cache: the step's logits are the forward's."""
    model = _model(LAYOUTS[layout])
    assert unsupported(model, 64) is None
    ids, mask = _prompts()
    ours, pos = _prefilled(model, ids, mask, 8)
    theirs, _ = _prefilled(model, ids, mask, 8)
    step = CompactStep(model, ours, ids.shape[0], pack=pack)
    attend = torch.cat([mask, torch.ones(ids.shape[0], 8, dtype=torch.long)], -1).bool()[:, None, None]
    tokens = torch.tensor([5, 17, 3, 96, 40])
    for t in range(3):
        pos = pos + 1
        width = ids.shape[1] + t + 1
        got = step(tokens, pos, attend[..., :width])
        ref = model(input_ids=tokens[:, None], attention_mask=attend[:, 0, 0, :width].long(), position_ids=pos,
                    cache=theirs, use_cache=True).logits[:, -1]
        assert got.shape == ref.shape == (5, 97)
        assert torch.allclose(got, ref, atol=2e-5, rtol=1e-5), (got - ref).abs().max()
        tokens = ref.argmax(-1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lean_decode_is_the_same_with_and_without_the_step(layout):
    """Under one seed, the same sampled tokens and log-probs (to float rounding), greedy tokens too,
    with rows leaving the batch at different steps."""
    model = _model(LAYOUTS[layout])
    ids, mask = _prompts(n=6)
    stops = [1, *range(10, 20)]  # one token in nine ends a row: rows end at different steps
    for temperature in (1.0, 0.0):
        s = SamplingConfig(max_new_tokens=20, temperature=temperature)
        runs = []
        for engine in (LeanDecode(), LeanDecode(compact=False)):
            with seeded(3, CPU):
                runs.append(engine.decode(model, ids, mask, s, stops, 0))
        fast, slow = runs
        if temperature:
            assert len(set(slow.completion_mask.sum(-1).tolist())) > 2
        assert torch.equal(fast.completion_ids, slow.completion_ids)
        assert torch.allclose(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)


def test_sampled_rollouts_repeat_and_follow_the_model():
    """Sampling through the step: the same seed gives the same tokens, and each token's log-prob is
    what a teacher-forced forward over prompt + completion gives."""
    model = _model(LAYOUTS["qwen3"])
    ids, mask = _prompts(n=6)
    s = SamplingConfig(max_new_tokens=24, temperature=1.0)
    runs = []
    for _ in range(2):
        with seeded(7, CPU):
            runs.append(LeanDecode().decode(model, ids, mask, s, [1], 0))
    a, b = runs
    assert torch.equal(a.completion_ids, b.completion_ids)
    full = torch.cat([ids, a.completion_ids], -1)
    fmask = torch.cat([mask, a.completion_mask], -1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=fmask, position_ids=(fmask.cumsum(-1) - 1).clamp(min=0)).logits
    lp = logits[:, ids.shape[1] - 1 : -1].log_softmax(-1).gather(-1, a.completion_ids[..., None]).squeeze(-1)
    assert torch.allclose(a.logprobs, lp * a.completion_mask, atol=2e-5, rtol=0)


@torch.no_grad()
def test_bf16_step_stays_within_bf16_rounding_of_the_forward():
    model = _model(LAYOUTS["llama"], torch.bfloat16)
    ids, mask = _prompts()
    ours, pos = _prefilled(model, ids, mask, 4)
    theirs, _ = _prefilled(model, ids, mask, 4)
    attend = torch.cat([mask, torch.ones(ids.shape[0], 4, dtype=torch.long)], -1).bool()[:, None, None, : ids.shape[1] + 1]
    tokens = torch.tensor([5, 17, 3, 96, 40])
    got = CompactStep(model, ours, 5)(tokens, pos + 1, attend)
    ref = model(input_ids=tokens[:, None], attention_mask=attend[:, 0, 0].long(), position_ids=pos + 1, cache=theirs).logits[:, -1]
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref.float()).abs().max() < 0.05 * ref.float().abs().max()


def test_unsupported_models_name_the_reason_and_decode_with_their_forward(caplog):
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2))
    assert "'gpt2' is not one of llama" in unsupported(gpt2, 10)
    gelu = _model(LlamaConfig(**SIZE, hidden_act="gelu"))
    assert "activation 'gelu'" in unsupported(gelu, 10)
    windowed = _model(MistralConfig(**SIZE, num_key_value_heads=2, sliding_window=12))
    assert unsupported(windowed, 12) is None and "sliding window 12 < 13" in unsupported(windowed, 13)
    hooked = _model(LAYOUTS["llama"])
    handle = hooked.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert "model.layers.1.mlp has forward hooks" in unsupported(hooked, 10)
    handle.remove()
    assert unsupported(hooked, 10) is None
    adapted = _model(LAYOUTS["llama"])
    adapted.model.layers[0].self_attn.v_proj = torch.nn.Sequential(adapted.model.layers[0].self_attn.v_proj)
    assert "not a plain nn.Linear" in unsupported(adapted, 10)

    ids, mask = _prompts()
    s = SamplingConfig(max_new_tokens=6, temperature=0.0)
    engine = LeanDecode()
    with caplog.at_level(logging.INFO, logger="aropd.rollout"):
        for _ in range(2):
            out = engine.decode(windowed, ids, mask, s, [1], 0)
    said = [r.getMessage() for r in caplog.records if "sliding window" in r.getMessage()]
    assert said == ["LeanDecode: decoding with the model's forward (sliding window 12 < 15 positions)"]  # once
    ref = LeanDecode(compact=False).decode(windowed, ids, mask, s, [1], 0)
    assert torch.equal(out.completion_ids, ref.completion_ids) and torch.equal(out.logprobs, ref.logprobs)
    # past its window the model masks its own sliding layers (a full-length mask of ours would not fit them)
    assert torch.equal(out.completion_ids, HFGenerate().generate(windowed, ids, mask, s, [1], 0).completion_ids)
