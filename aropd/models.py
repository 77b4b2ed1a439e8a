"""Loading causal LMs and tokenizers (hub id, local folder or GGUF file), and the tiny offline model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aropd.paths import resolve

# A minimal ChatML-like template for tokenizers that ship none (the tiny offline model).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_SPECIAL = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _split_gguf(name: str) -> tuple[str, str | None]:
    # "folder/model.gguf" loads through transformers' GGUF reader (needs `gguf` and `accelerate`).
    name = resolve(name)
    p = Path(name)
    return (str(p.parent), p.name) if p.suffix == ".gguf" else (name, None)


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    path, gguf = _split_gguf(name)
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(name: str, dtype: str = "float32") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    path, gguf = _split_gguf(name)
    kw: dict[str, Any] = {"dtype": _DTYPES[dtype]}
    if gguf:
        kw["gguf_file"] = gguf
    return AutoModelForCausalLM.from_pretrained(path, **kw)


def check_same_vocabulary(student_tok: Any, teacher_tok: Any, teacher_name: str) -> None:
    """A separate teacher must share the student's tokenizer: the target is over the student's ids."""
    problems = []
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        problems.append(f"vocabulary differs ({len(student_tok)} vs {len(teacher_tok)} entries)")
    for attr in ("eos_token_id", "pad_token_id"):
        if getattr(student_tok, attr) != getattr(teacher_tok, attr):
            problems.append(f"{attr} differs")
    if problems:
        raise ValueError(f"teacher {teacher_name!r} is incompatible with the student: " + "; ".join(problems))


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 384, split_digits: bool = False) -> Any:
    """A byte-level BPE trained on ``texts``, wrapped as a fast tokenizer with a chat template.

    ``split_digits`` makes every digit its own token, so arithmetic stays digit-wise.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=TINY_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|end|>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_tiny_llama(tokenizer: Any, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)
