"""``aropd-prompts``: the prompts of a config exactly as the model sees them, without training.

A template is easy to get subtly wrong — a chat template that adds its own system message, a trace
shortened to fit its budget, a partial view cut mid-sentence — and none of it shows in the loss.
This command builds the data module from the same ``--config`` files (and overrides) as
``aropd fit``, through the same parser, and prints the first ``--n`` training examples' three
prompts decoded from their token ids with special tokens visible, with their token counts::

    aropd-prompts --config configs/smollm2.yaml --n 3
    aropd-prompts --config configs/quickstart.yaml --benchmark toy   # one validation prompt

The ids come from ``aropd.data.build_example``, the function the data module trains on, so what
is printed is what is trained on; no model weights are loaded and no trainer is built.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Iterator

from aropd.cli import CLI_KWARGS, AropdCLI
from aropd.data import PrivilegedDataModule, PrivilegedExample, build_example, check_records, load_records
from aropd.module import StudentModule
from aropd.views import PromptTooLong, partial_view, render, teacher_prompt

RULE = "=" * 100


class _ParseOnlyCLI(AropdCLI):
    """The ``aropd`` parser and its links, instantiating the data module and model but no trainer.

    A trainer is what a config's accelerator or strategy is checked against: building one would
    make a GPU recipe's prompts unreadable on a laptop, and nothing here needs it.
    """

    def instantiate_classes(self) -> None:
        # jsonargparse renamed instantiate_classes to instantiate (4.49); either is the same call.
        instantiate = getattr(self.parser, "instantiate", None) or self.parser.instantiate_classes
        self.config_init = instantiate(self.config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        self.trainer = None


class _ArgvHidden:
    # LightningCLI warns when it is given args while sys.argv holds others (here: ours, already parsed).
    def __enter__(self):
        self.saved, sys.argv = sys.argv, sys.argv[:1]

    def __exit__(self, *exc):
        sys.argv = self.saved


def load_datamodule(cli_args: list[str]) -> PrivilegedDataModule:
    """The data module that ``aropd fit <cli_args>`` would train on (not set up)."""
    with _ArgvHidden():
        cli = _ParseOnlyCLI(StudentModule, PrivilegedDataModule, args=cli_args, run=False, **CLI_KWARGS)
    return cli.datamodule


def iter_examples(dm: PrivilegedDataModule) -> Iterator[tuple[str, int, dict[str, Any], PrivilegedExample | None]]:
    """(source, record index, record, example or None when the data module would drop it), in file order."""
    f = dm.fields
    for src in dm.train_sources:
        rows = load_records(src, dm.hparams.train_split)
        check_records(rows, f, src)
        for i, row in enumerate(rows):
            q, r, a = (str(row[k]) for k in (f.question, f.reasoning, f.answer))
            try:
                ex = build_example(dm.tokenizer, dm.template, q, r, a, dm.budgets, dm.partial_ratio)
            except PromptTooLong:
                ex = None
            yield src, i, {"question": q, "reasoning": r, "answer": a}, ex


def decode(tokenizer: Any, ids: list[int]) -> str:
    # Special tokens stay visible: the chat markers are part of what the model conditions on.
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _word_count(text: str) -> int:
    return len(text.split())


def format_example(dm: PrivilegedDataModule, src: str, index: int, rec: dict[str, Any], ex: PrivilegedExample) -> str:
    tok = dm.tokenizer
    q, r, a = rec["question"], rec["reasoning"], rec["answer"]
    # The same calls build_example makes, repeated only to say which view's trace was shortened.
    full = teacher_prompt(tok, dm.template, q, r, a, dm.budgets.max_teacher_tokens)
    part_reasoning = partial_view(r, dm.partial_ratio)
    part = teacher_prompt(tok, dm.template, q, part_reasoning, a, dm.budgets.max_teacher_tokens)
    assert full.ids == ex.full and part.ids == ex.partial, "prompt rendering is not deterministic"

    def shortened(kept: str, given: str, truncated: bool) -> str:
        if not truncated:
            return "no"
        return (f"YES, reasoning cut to {_word_count(kept)} of {_word_count(given)} words to fit "
                f"max_teacher_tokens={dm.budgets.max_teacher_tokens}")

    lines = [
        RULE,
        f"example from {src}, record {index}",
        f"--- student prompt: {len(ex.student)} tokens (max_prompt_tokens={dm.budgets.max_prompt_tokens})",
        decode(tok, ex.student),
        f"--- full view: {len(ex.full)} tokens; trace shortened: {shortened(full.reasoning_kept, r, full.truncated)}",
        decode(tok, ex.full),
        f"--- partial view: {len(ex.partial)} tokens; reasoning at partial_ratio={dm.partial_ratio}: "
        f"{_word_count(part_reasoning)} of {_word_count(r)} words; "
        f"trace shortened: {shortened(part.reasoning_kept, part_reasoning, part.truncated)}",
        decode(tok, ex.partial),
        f"--- reference response (the SFT target; cut to max_new_tokens={dm.budgets.max_new_tokens}): "
        f"{len(ex.reference)} tokens",
        decode(tok, ex.reference),
    ]
    return "\n".join(lines)


def format_benchmark(dm: PrivilegedDataModule, name: str) -> str:
    """The first validation prompt of benchmark ``name``, as ``PrivilegedDataModule`` collates it."""
    from aropd.evaluators import get_benchmark
    from aropd.paths import resolve

    bench = get_benchmark(name)
    spec = next((s for s in dm.val_benchmarks if s.name == name), None)
    data_path = spec.data_path if spec is not None else None
    records = bench.load(data_path and resolve(data_path), limit=1)
    if not records:
        raise SystemExit(f"benchmark {name!r} has no records")
    rec = records[0]
    ids = render(dm.tokenizer, dm.template.student_messages(bench.prompt(rec)))
    gold = rec.get("answer", "(graded by tests)")
    return "\n".join([
        RULE,
        f"benchmark {name}: first record {rec.get(bench.id_field)!r} (gold: {gold}); "
        f"generation budget {bench.max_new_tokens} tokens before the model's val_max_new_tokens cap",
        f"--- validation prompt: {len(ids)} tokens",
        decode(dm.tokenizer, ids),
    ])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="aropd-prompts",
        description="Print a config's student, full-view and partial-view prompts as the model sees them. "
        "Every other argument (--config FILE, --data.init_args.partial_ratio 0.3, ...) is read as by `aropd fit`.",
        allow_abbrev=False,
    )
    ap.add_argument("--n", type=int, default=3, help="training examples to show (default 3)")
    ap.add_argument("--benchmark", help="instead, show the first validation prompt of this benchmark")
    args, cli_args = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.n < 0:
        ap.error("--n must be >= 0")
    dm = load_datamodule(cli_args)
    try:
        show(dm, args.n, args.benchmark)
    except (FileNotFoundError, ValueError) as e:  # data not materialized, a bad record: say which, briefly
        raise SystemExit(f"aropd-prompts: {e}") from None


def show(dm: PrivilegedDataModule, n: int, benchmark: str | None) -> None:
    if benchmark:
        print(format_benchmark(dm, benchmark))
        return
    shown = dropped = 0
    for src, i, rec, ex in iter_examples(dm):
        if shown >= n:
            break
        if ex is None:
            dropped += 1
            print(f"{RULE}\nexample from {src}, record {i}: DROPPED (student prompt over "
                  f"max_prompt_tokens={dm.budgets.max_prompt_tokens}, or no trace fits max_teacher_tokens)")
            continue
        print(format_example(dm, src, i, rec, ex))
        shown += 1
    print(RULE)
    print(f"examples shown: {shown}" + (f", dropped: {dropped}" if dropped else ""))

if __name__ == "__main__":
    main()
