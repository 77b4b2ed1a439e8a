#!/usr/bin/env python
"""Pretrain the toy base model from scratch (aropd.experiments.pretrain): a small Llama and its
tokenizer on the toy task, with its test accuracy and KL(q_full || q_partial) in ``pretrain.json``.

    python scripts/pretrain_base.py --out aropd/assets/toy-base

The committed ``aropd/assets/toy-base`` is two runs: the defaults (about 35 minutes on one core), then
a stage that continues their model on long problems (``LONG_STAGE``, about 15 minutes)::

    python scripts/pretrain_base.py --out runs/toy-base-stage1
    python scripts/pretrain_base.py --long-stage --init runs/toy-base-stage1 --out aropd/assets/toy-base

``--views-only`` trains nothing: it recomputes the copy figures (``views``, ``views_by_length``) and
the after-slip figures (``after_slip``) of the model already in ``--out`` into its ``pretrain.json``,
on the problems its recorded args name.
"""

from __future__ import annotations

import argparse
import json
import sys

from aropd.experiments.pretrain import LONG_STAGE, PretrainArgs, Result, args_from, pretrain, record_views


def parse_args(argv: list[str] | None) -> tuple[PretrainArgs, bool]:
    d = PretrainArgs()  # the defaults live in the dataclass, so the committed run's args are its defaults
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=d.out)
    p.add_argument("--splits", default=d.splits, help="{train,val,test}.jsonl; none is trained on")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=d.hidden)
    g.add_argument("--layers", type=int, default=d.layers)
    g.add_argument("--heads", type=int, default=d.heads)
    g.add_argument("--intermediate", type=int, default=d.intermediate)
    g.add_argument("--vocab-size", type=int, default=d.vocab_size)
    g.add_argument("--max-positions", type=int, default=d.max_positions)
    g = p.add_argument_group("data")
    g.add_argument("--min-steps", type=int, default=d.min_steps)
    g.add_argument("--max-steps", type=int, default=d.max_steps)
    g.add_argument("--long-frac", type=float, default=d.long_frac, help="share of training problems drawn from --long-steps")
    g.add_argument("--long-steps", type=int, nargs=2, default=d.long_steps)
    g.add_argument("--mix", type=float, nargs=3, default=d.mix, metavar=("STUDENT", "FULL", "PARTIAL"))
    g.add_argument("--partial-ratio", type=float, default=d.partial_ratio)
    g.add_argument("--copy-frac", type=float, default=d.copy_frac,
                   help="share of examples that teach the full view to copy a trace with random results")
    g.add_argument("--copy-long-frac", type=float, default=d.copy_long_frac,
                   help="share of the copy examples whose problem has --long-steps steps")
    g.add_argument("--copy-partial-frac", type=float, default=d.copy_partial_frac,
                   help="share of the copy examples that teach the partial view to copy the steps it shows")
    g.add_argument("--prefix-frac", type=float, default=d.prefix_frac,
                   help="share of examples that are the first --prefix-steps steps of a long problem (a label curriculum)")
    g.add_argument("--prefix-steps", type=int, default=d.prefix_steps)
    g.add_argument("--init", default=d.init, help="continue from this pretrained model folder (default: from scratch)")
    g.add_argument("--tokenizer-problems", type=int, default=d.tokenizer_problems)
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=d.steps, help="length of the learning-rate schedule")
    g.add_argument("--stop-at", type=int, default=d.stop_at,
                   help="stop after this many steps of the schedule (a snapshot of a longer run; default: --steps)")
    g.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help="padded tokens per batch")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--warmup", type=int, default=d.warmup)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--log-every", type=int, default=d.log_every)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-limit", type=int, default=d.eval_limit, help="evaluate on the first N test problems (0: all)")
    g.add_argument("--kl-limit", type=int, default=d.kl_limit, help="problems used for KL(full||partial) (0: all)")
    g.add_argument("--eval-batch", type=int, default=d.eval_batch)
    g.add_argument("--probe-every", type=int, default=d.probe_every,
                   help="greedy accuracy on --probe-size short val problems every N steps")
    g.add_argument("--probe-size", type=int, default=d.probe_size)
    g.add_argument("--probe-long", type=int, default=d.probe_long,
                   help="long val problems whose copy ratio each probe also reports")
    g.add_argument("--snapshot-every", type=int, default=d.snapshot_every,
                   help="save the model every N steps in OUT/snapshots/step-N (0: never)")
    p.add_argument("--long-stage", action="store_true",
                   help="the committed base's second run: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in LONG_STAGE.items())
                   + " (needs --init; an option given explicitly keeps its value)")
    p.add_argument("--views-only", action="store_true",
                   help="train nothing: recompute the copy and after-slip figures of the model in --out into its pretrain.json")
    if "--long-stage" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**LONG_STAGE)  # explicit options still win over the stage's values
    a = vars(p.parse_args(argv))
    views_only = a.pop("views_only")
    if a.pop("long_stage") and a["init"] is None:
        p.error("--long-stage continues a model: pass --init (the first run's folder)")
    return args_from(a), views_only


def main(argv: list[str] | None = None) -> Result | dict:
    args, views_only = parse_args(argv)
    if views_only:
        views = record_views(args.out, args.threads)
        print(json.dumps(views, indent=1))
        return views
    return pretrain(args)


if __name__ == "__main__":
    main()
    sys.exit(0)
