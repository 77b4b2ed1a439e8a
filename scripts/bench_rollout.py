"""Rollout benchmark: decoded tokens per second and whole step time, per engine, generation batch and length profile.

    python scripts/bench_rollout.py [--repeats 3] [--max-new-tokens 128] [--batches 8 32 64] [--micro-batch 8]
    python scripts/bench_rollout.py --student aropd/assets/toy-base --engines generate lean vllm --profiles equal

For each engine (transformers' ``generate`` = ``HFGenerate``, the lean loop = ``LeanDecode``, vLLM in
this process = ``aropd.vllm_engine.VLLMEngine``: needs the ``vllm`` extra and a student whose head_dim
vLLM's CPU attention supports, e.g. toy-base, not the default tiny-llama), each generation batch G
(micro-batch 8: G / 8 micro-batches share one generate call) and each length profile:

- ``equal``: every row runs the whole budget (EOS is made impossible);
- ``varying``: half the rows (every other one) stop at 10 % of the budget, the rest run the whole budget.

Lengths are forced deterministically and identically for the transformers engines by a forward hook on
the student that sets the EOS logit from the position of the token being predicted: +1e4 at one position,
−inf elsewhere. vLLM does not run the student's forward, so it runs ``equal`` only, by being given no
EOS id to stop at (its tokens per step are the same work; the sampled tokens differ). Short rows have prompts of a length that reaches that position after 10 % of the budget;
long rows have longer prompts that are already past it. Everything else is the model's own sampling
(temperature 1), so the decoding work is real. The hook also means ``lean`` here decodes through the
model's forward: a hooked model does not get LeanDecode's compact step (``aropd.compact``), whose
speed-up ``scripts/bench_step.py --vs-trl`` measures.

``tok/s`` = completion tokens (up to and including EOS) / rollout seconds. ``step s`` = one window —
the rollout of G prompts plus, per micro-batch, ``training_step`` (teacher scoring of both views,
student forward + loss) + backward + optimizer step + EMA teacher update — divided by its G / 8
micro-batches: the time per optimizer micro-batch. With vLLM the rollout includes the weight sync that each
optimizer step makes due (``sync s``: seconds per sync, reported on its own too; with ``--no-step`` one sync
after each rollout is timed on its own). Configurations are interleaved within each repeat and
figures are medians over repeats; the machine is shared, so compare the ratios, which come from one run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Timed:
    """Wraps an engine; records the seconds and completion tokens of each call."""

    def __init__(self, engine, stop_at_eos: bool = True):
        self.engine, self.calls, self.stop_at_eos = engine, [], stop_at_eos
        self.keeps_logprobs = engine.keeps_logprobs

    def weights_updated(self):
        self.engine.weights_updated()

    def generate(self, model, prompt_ids, prompt_mask, sampling, eos_ids, pad_id, synced=False):
        t0 = time.perf_counter()
        r = self.engine.generate(model, prompt_ids, prompt_mask, sampling, eos_ids if self.stop_at_eos else [], pad_id,
                                 synced)
        self.calls.append((time.perf_counter() - t0, int(r.completion_mask.sum())))
        return r


def force_lengths(model, stop_position: int | None):
    """EOS logit +1e4 when the next token sits at ``stop_position``, −inf elsewhere (None: never)."""
    import torch

    eos = model.generation_config.eos_token_id

    def hook(mod, args, kwargs, out):
        pos = kwargs["position_ids"][:, -1]
        hit = pos + 1 == stop_position if stop_position is not None else torch.zeros_like(pos, dtype=torch.bool)
        out.logits[:, -1, eos] = torch.where(hit, 1e4, -math.inf)
        return out

    return model.register_forward_hook(hook, with_kwargs=True)


def make_windows(examples, G: int, micro: int, short_len: int, long_len: int, pad_id: int):
    """Micro-batches of real toy examples (real teacher views) whose student prompts are the last
    ``short_len`` (even rows) or ``long_len`` (odd rows) tokens of the real ones, with their window."""
    from aropd.data import collate_privileged, pad
    from aropd.rollout import GenerationWindow

    chosen = [examples[i % len(examples)] for i in range(G)]
    chosen = [e._replace(student=e.student[-(short_len if i % 2 == 0 else long_len) :]) for i, e in enumerate(chosen)]
    ids, mask = pad([e.student for e in chosen], pad_id, left=True)
    out = []
    for j in range(G // micro):
        b = collate_privileged(chosen[j * micro : (j + 1) * micro], pad_id)
        out.append(b.replace(window=GenerationWindow(ids, mask, j, j * micro, (j + 1) * micro)))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--engines", nargs="+", default=["generate", "lean"], choices=["generate", "lean", "vllm"])
    p.add_argument("--student", default="aropd/assets/tiny-llama", help="model folder (vllm: head_dim >= 32, e.g. toy-base)")
    p.add_argument("--profiles", nargs="+", default=["equal", "varying"], choices=["equal", "varying"])
    p.add_argument("--no-step", action="store_true", help="time the rollouts only")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)

    import lightning as L
    import torch

    from aropd.data import PrivilegedDataModule
    from aropd.module import PrivilegedDistillation
    from aropd.rollout import HFGenerate, LeanDecode, Sampling

    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    L.seed_everything(0, verbose=False)
    from aropd.paths import resolve

    student = resolve(a.student)
    T = a.max_new_tokens
    n_short = max(1, round(0.1 * T))  # completion length of a short row, EOS included
    long_len = 128
    short_len = long_len - n_short - 8  # long prompts are already past the stop position
    stop_position = short_len + n_short - 1  # position of a short row's EOS

    dm = PrivilegedDataModule(tokenizer=student, max_new_tokens=T)
    dm.setup("fit")
    module = PrivilegedDistillation(student=student, max_new_tokens=T, sampling=Sampling(temperature=1.0))
    module.configure_model()  # the EMA teacher is copied before the hook goes on
    opt = torch.optim.AdamW(module.student.parameters(), lr=1e-4)
    engines = {"generate": Timed(HFGenerate()), "lean": Timed(LeanDecode())}
    if "vllm" in a.engines:
        from aropd.vllm_engine import VLLMEngine

        engines["vllm"] = Timed(VLLMEngine(), stop_at_eos=False)  # equal lengths: see the docstring
    windows = {G: make_windows(dm.train_examples, G, a.micro_batch, short_len, long_len, module.tokenizer.pad_token_id)
               for G in a.batches}
    configs = [(e, prof, G) for prof in a.profiles for G in a.batches for e in a.engines if e != "vllm" or prof == "equal"]
    samples: dict[tuple, dict[str, list[float]]] = {
        c: {"tok_s": [], "rollout_s": [], "step_s": [], "tokens": [], "sync_s": []} for c in configs}
    batch_idx = 0
    for rep in range(a.repeats + 1):  # repeat 0 warms up and is not counted
        for engine, prof, G in configs:
            module.engine = engines[engine]
            handle = force_lengths(module.student, stop_position if prof == "varying" else None)
            syncs = len(getattr(engines[engine].engine, "sync_seconds", []))
            try:
                t0 = time.perf_counter()
                if a.no_step:
                    w = windows[G][0].window
                    module.rollout(w.prompt_ids, w.prompt_mask, module.sampling, batch_idx)
                    if engine == "vllm":  # no update to sync after: time one sync on its own, untimed above
                        engines[engine].engine.sync(module.student)
                else:
                    for j, batch in enumerate(windows[G]):
                        out = module.training_step(batch, batch_idx + j)
                        out["loss"].backward()
                        opt.step()
                        module.engine.weights_updated()
                        opt.zero_grad(set_to_none=True)
                        module.teacher.update(module.teacher_model, module.student)
                window_s = time.perf_counter() - t0
            finally:
                handle.remove()
            batch_idx += G // a.micro_batch
            roll_s, tokens = engines[engine].calls[-1]
            if rep == 0:
                continue
            s = samples[(engine, prof, G)]
            s["tok_s"].append(tokens / roll_s)
            s["rollout_s"].append(roll_s)
            s["tokens"].append(tokens)
            if not a.no_step:
                s["step_s"].append(window_s / (G // a.micro_batch))
            s["sync_s"].extend(getattr(engines[engine].engine, "sync_seconds", [])[syncs:])

    med = {c: {k: statistics.median(v) for k, v in s.items() if v} for c, s in samples.items()}

    def paired(num: tuple, den: tuple, key: str) -> float | None:
        """Median over repeats of num/den measured in the same repeat (adjacent in time)."""
        if num not in samples or den not in samples or not samples[num][key]:
            return None
        return statistics.median(x / y for x, y in zip(samples[num][key], samples[den][key]))

    rows = []
    print(f"{Path(a.student).name}, {T} new tokens, micro-batch {a.micro_batch}, {a.threads} thread(s), "
          f"medians of {a.repeats} repeats (ratios: median of per-repeat ratios)")
    print(f"{'engine':<9} {'profile':<8} {'G':>4} {'tokens':>7} {'rollout s':>10} {'tok/s':>8} {'step s':>8}"
          f" {'tok/s vs G' + str(a.batches[0]):>14} {'lean/generate tok/s':>20} {'generate/lean step':>19}"
          f" {'vllm/lean tok/s':>16} {'sync s':>7}")
    for engine, prof, G in configs:
        m = med[(engine, prof, G)]
        vs_small = paired((engine, prof, G), (engine, prof, a.batches[0]), "tok_s")
        lean_gen = paired(("lean", prof, G), ("generate", prof, G), "tok_s") if engine == "lean" else None
        step_gen = paired(("generate", prof, G), ("lean", prof, G), "step_s") if engine == "lean" else None
        vllm_lean = paired(("vllm", prof, G), ("lean", prof, G), "tok_s") if engine == "vllm" else None
        rows.append({"engine": engine, "profile": prof, "generation_batch": G, **m, "tok_s_vs_smallest_batch": vs_small,
                     "tok_s_lean_vs_generate": lean_gen, "step_s_generate_vs_lean": step_gen,
                     "tok_s_vllm_vs_lean": vllm_lean})
        cell = lambda x: f"{x:.2f}x" if x is not None else ""  # noqa: E731
        print(f"{engine:<9} {prof:<8} {G:>4} {m['tokens']:>7.0f} {m['rollout_s']:>10.3f} {m['tok_s']:>8.0f}"
              f" {m.get('step_s', float('nan')):>8.3f} {cell(vs_small):>14} {cell(lean_gen):>20} {cell(step_gen):>19}"
              f" {cell(vllm_lean):>16} {m['sync_s'] if 'sync_s' in m else float('nan'):>7.3f}")
    result = {"student": a.student, "max_new_tokens": T, "micro_batch": a.micro_batch, "repeats": a.repeats, "threads": a.threads, "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
