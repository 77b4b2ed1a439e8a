"""Build the quickstart's offline assets: toy task splits and a tiny random Llama with its tokenizer.

    python scripts/make_quickstart_assets.py --out aropd/assets

Deterministic for a given seed; the outputs are committed so a fresh clone needs no network.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aropd.models import build_tiny_llama, train_tiny_tokenizer
from aropd.toy import write_splits
from aropd.views import PromptTemplate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="aropd/assets")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    # Train: short-to-medium chains (2-8 steps, ~35-105 response tokens) for CPU rollout budgets.
    # Val/test: the same, plus one problem in eight with 20-90 steps (~230-1,000 tokens), so the
    # long-rollout length buckets are not empty.
    long = {"long_frac": 0.125, "long_steps": (20, 90)}
    paths = write_splits(
        out / "toy", {"train": 512, "val": 64, "test": 128}, seed=args.seed,
        min_steps=2, max_steps=8, split_kw={"val": long, "test": long},
    )
    rows = [json.loads(l) for l in paths["train"].read_text().splitlines()]
    t = PromptTemplate()
    texts = [t.system, t.teacher_user] + [
        r["question"] + "\n" + t.format_trace(r["reasoning"], r["answer"]) for r in rows
    ]
    tok = train_tiny_tokenizer(texts)
    model = build_tiny_llama(tok, seed=args.seed)
    model.save_pretrained(out / "tiny-llama")
    tok.save_pretrained(out / "tiny-llama")
    print(f"wrote {out / 'toy'} and {out / 'tiny-llama'} ({sum(p.numel() for p in model.parameters())} params)")


if __name__ == "__main__":
    main()
