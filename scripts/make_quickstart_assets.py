"""Build the quickstart's offline assets: toy task splits and a tiny random Llama with its tokenizer.

    python scripts/make_quickstart_assets.py --out aropd/assets

Deterministic for a given seed; the outputs are committed so a fresh clone needs no network.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aropd.models import build_tiny_llama, train_tiny_tokenizer
from aropd.toy import EVAL_SPLIT, TRAIN_SPLIT, write_splits
from aropd.views import PromptTemplate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="aropd/assets")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    # Train: TRAIN_SPLIT's chains; val/test: EVAL_SPLIT's, with long problems (aropd.toy).
    paths = write_splits(
        out / "toy", {"train": 512, "val": 64, "test": 128}, seed=args.seed,
        **TRAIN_SPLIT, split_kw={"val": EVAL_SPLIT, "test": EVAL_SPLIT},
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
