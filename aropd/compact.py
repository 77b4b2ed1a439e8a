"""A compact one-token decode step for Llama-family causal LMs, used by :class:`aropd.rollout.LeanDecode`.

A decode step of a small model is mostly not arithmetic: transformers' forward spends as long on
its per-layer Python (attention dispatch, mask building, cache bookkeeping, output records) as on
the matrix products, and the products themselves, at a handful of rows, run ~3× faster on a CPU
through oneDNN with the weight packed once than through the default GEMM (the same values: every
output element is the same dot product). This step runs the model's own arithmetic — its norms, its
rotary embedding, its weights — with none of that: the q/k/v and gate/up weights concatenated into
one product each, packed for oneDNN on a CPU, keys and values written straight into the key/value
buffers that :func:`aropd.rollout._make_room` gave the cache, and eager attention over them.

It applies to the layouts it reproduces exactly (``SUPPORTED``: Llama, Mistral, Qwen2, Qwen3 —
biases and per-head q/k norms included) with plain weights; :func:`unsupported` names why any other
model takes the model's own forward (adapters, sharded or hooked modules, a sliding window shorter
than the rollout, other activations). Prefill stays the model's forward, so padding and prompt
positions are handled by transformers itself. Packed and concatenated weights are copies, made per
rollout (the weights change at every optimizer step): on a CPU that is the model's projection
weights once more while the rollout runs; elsewhere nothing is copied and the step reads the
modules' own weights.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def unsupported(model: nn.Module, length: int) -> str | None:
    """Why the compact step cannot stand in for ``model``'s forward up to ``length`` positions, or None."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        return f"model type {kind!r} is not one of {', '.join(SUPPORTED)}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r} (the step implements silu)"
    if (getattr(config, "pretraining_tp", 1) or 1) != 1:
        return "pretraining_tp > 1"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "not the usual <Model>ForCausalLM layout"
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"module {name or '(root)'} has forward hooks (sharded or instrumented)"
    for layer in inner.layers:
        linears = [getattr(layer.self_attn, p, None) for p in _PROJ] + [getattr(layer.mlp, p, None) for p in _MLP]
        if any(type(m) is not nn.Linear for m in linears):
            return "a projection is not a plain nn.Linear (an adapter or a quantized layer)"
        window = getattr(layer.self_attn, "sliding_window", getattr(config, "sliding_window", None))
        if window is not None and window < length:
            return f"sliding window {window} < {length} positions"
    if type(getattr(model, "lm_head", None)) is not nn.Linear or type(inner.embed_tokens) is not nn.Embedding:
        return "the embedding or the output layer is not a plain module"
    if any(type(p) is not nn.Parameter and type(p) is not torch.Tensor for p in model.parameters()):
        return "parameters are not plain tensors (sharded)"
    return None


def _packs(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    # oneDNN's bf16 linear needs AVX-512 (or AVX-NE-CONVERT); on an AVX2-only CPU it raises, so bf16
    # there takes F.linear.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, rows: int, pack: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x ↦ x Wᵀ + b``, through oneDNN with ``weight`` packed for about ``rows`` rows when ``pack``."""
    if not pack:
        return lambda x: F.linear(x, weight, bias)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


def _cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if all(t is None for t in tensors) else torch.cat(tensors)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CompactStep:
    """One decode step of ``model`` over its (roomy) key/value cache: ``(tokens [n], positions [n, 1],
    attend [n, 1, 1, L] bool) → logits [n, V]``, with L = the cached length + 1.

    Built per rollout (see the module docstring); ``pack`` (default: on a CPU) routes the products
    through packed oneDNN weights. The cache must be one :func:`aropd.rollout._make_room` made roomy.
    """

    def __init__(self, model: nn.Module, cache, rows: int, pack: bool | None = None) -> None:
        inner, config = model.model, model.config
        weight = model.lm_head.weight
        self.pack = _packs(weight.device, weight.dtype) if pack is None else pack
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.embed, self.norm, self.rotary = inner.embed_tokens.weight, inner.norm, inner.rotary_emb
        self.lm_head = _linear(weight, model.lm_head.bias, rows, self.pack)
        self.cache_layers = list(cache.layers)
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            qkv, gate_up = [a.q_proj, a.k_proj, a.v_proj], [m.gate_proj, m.up_proj]
            if self.pack:  # one product for q/k/v and one for gate/up (the copy is made anyway)
                projections = [_linear(torch.cat([p.weight for p in ps]), _cat([p.bias for p in ps]), rows, True)
                               for ps in (qkv, gate_up)]
            else:  # no copies: one product per module
                projections = [[_linear(p.weight, p.bias, rows, False) for p in ps] for ps in (qkv, gate_up)]
            self.layers.append((
                layer.input_layernorm, projections[0], getattr(a, "q_norm", None), getattr(a, "k_norm", None),
                _linear(a.o_proj.weight, a.o_proj.bias, rows, self.pack), a.scaling,
                layer.post_attention_layernorm, projections[1], _linear(m.down_proj.weight, m.down_proj.bias, rows, self.pack),
            ))

    @staticmethod
    def _apply(projection, x: torch.Tensor, sizes: list[int] | None = None) -> list[torch.Tensor]:
        """The outputs of one layer's separate products, or of their fused product cut into ``sizes``
        (None: two halves)."""
        if isinstance(projection, list):
            return [p(x) for p in projection]
        y = projection(x)
        return list(y.chunk(2, dim=-1) if sizes is None else y.split(sizes, dim=-1))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        n, heads, kv_heads, d = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        group, blocked = heads // kv_heads, ~attend  # [n, 1, 1, L]
        h = F.embedding(tokens[:, None], self.embed)  # [n, 1, C]
        cos, sin = self.rotary(h, positions)  # [n, 1, D]
        cos, sin = cos[:, :, None], sin[:, :, None]  # [n, 1, 1, D]: broadcast over heads in [n, 1, heads, D]
        for (ln1, qkv, q_norm, k_norm, o_proj, scaling, ln2, gate_up, down), cached in zip(self.layers, self.cache_layers):
            q, k, v = self._apply(qkv, ln1(h), [heads * d, kv_heads * d, kv_heads * d])
            q, k, v = q.view(n, 1, heads, d), k.view(n, 1, kv_heads, d), v.view(n, 1, kv_heads, d)
            if q_norm is not None:
                q, k = q_norm(q), k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = cached.update(k.transpose(1, 2), v.transpose(1, 2))  # [n, kv_heads, L, D]
            # eager attention, each key/value head serving its group of query heads: [n, kv, group, L]
            scores = torch.matmul(q.view(n, kv_heads, group, d), keys.transpose(-1, -2)) * scaling
            probs = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1, dtype=torch.float32)
            attn = torch.matmul(probs.to(values.dtype), values)  # [n, kv, group, D]
            h = h + o_proj(attn.reshape(n, 1, heads * d))
            gate, up = self._apply(gate_up, ln2(h))
            h = h + down(F.silu(gate) * up)
        return self.lm_head(self.norm(h))[:, 0]
