"""Build, fully offline and seeded, the tiny Llama model + byte-level BPE tokenizer at ./tiny and the
256-prompt arithmetic set at ./prompts.jsonl (in the current folder).

The model of the paired comparison with TRL (``scripts/bench_step.py --vs-trl``, which runs this in
``build/peer/``): 5.0M parameters, vocabulary 8,192. Kept as it was written for the first side-by-side
measurement of aropd against TRL's SDFT trainer, so both systems train the very same model.

Usage: python scripts/peer/build_tiny.py   (from the folder to write into)
"""
import json
import os
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, GenerationConfig

OUT = "./tiny"
PROMPTS = "./prompts.jsonl"
VOCAB = 8192
SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

OPS = ["+", "-", "*"]
WORD = {"+": "plus", "-": "minus", "*": "times"}
TEMPLATES = [
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "Calculate {a} {w} {b}.",
    "A shop has {a} apples and the count changes by {op}{b}. Work out {a} {op} {b}.",
    "Find the value of {a} {op} {b}.",
]


def problem(rng: random.Random):
    op = rng.choice(OPS)
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
    else:
        a, b = rng.randint(10, 9999), rng.randint(10, 9999)
    q = rng.choice(TEMPLATES).format(a=a, b=b, op=op, w=WORD[op])
    if op == "+":
        r = a + b
        steps = [f"Add the units: {a % 10} + {b % 10} = {a % 10 + b % 10}."]
        steps.append(f"Add the tens and the rest: {a // 10 * 10} + {b // 10 * 10} = {a // 10 * 10 + b // 10 * 10}.")
        steps.append(f"Total: {a // 10 * 10 + b // 10 * 10} + {a % 10 + b % 10} = {r}.")
    elif op == "-":
        r = a - b
        steps = [f"Subtract {b} from {a}.", f"{a} - {b // 10 * 10} = {a - b // 10 * 10}.",
                 f"{a - b // 10 * 10} - {b % 10} = {r}."]
    else:
        r = a * b
        steps = [f"Split {b} = {b // 10 * 10} + {b % 10}.",
                 f"{a} * {b // 10 * 10} = {a * (b // 10 * 10)}.",
                 f"{a} * {b % 10} = {a * (b % 10)}.",
                 f"Sum: {a * (b // 10 * 10)} + {a * (b % 10)} = {r}."]
    return q, " ".join(steps), str(r)


def corpus(rng, n_chars=700_000):
    parts, size = [], 0
    while size < n_chars:
        q, reasoning, ans = problem(rng)
        s = f"Question: {q}\nReasoning: {reasoning}\nAnswer: {ans}\n\n"
        parts.append(s)
        size += len(s)
    return parts


def main():
    rng = random.Random(1234)
    os.makedirs(OUT, exist_ok=True)
    text = corpus(rng)
    print("corpus chars:", sum(map(len, text)), "docs:", len(text))

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, min_frequency=1, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(text, trainer=trainer)
    print("tokenizer vocab reached:", tok.get_vocab_size())

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        padding_side="left", truncation_side="left", model_max_length=2048,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(OUT)

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=2048,
        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
    )
    model.save_pretrained(OUT)
    n = sum(p.numel() for p in model.parameters())
    print("params (tied, counted once):", n)

    prng = random.Random(42)
    with open(PROMPTS, "w") as f:
        for _ in range(256):
            q, reasoning, ans = problem(prng)
            f.write(json.dumps({"question": q, "reasoning": reasoning, "answer": ans}) + "\n")
    print("wrote", PROMPTS)
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    print(repr(hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)))


if __name__ == "__main__":
    main()
