"""Training-step benchmark: time per phase, tokens per second and peak memory, per method.

    python scripts/bench_step.py [--steps 12] [--warmup 2] [--methods ar_opd full_opd partial_opd sft]
    python scripts/bench_step.py --diagnostics [--repeats 3]    # diagnostics overhead (ar_opd)

Each method runs in its own process (so peak RSS is its own) on the quickstart's tiny model.
Figures are medians over the measured steps; the machine is shared, so compare ratios in one run.

``--diagnostics`` compares, on ``ar_opd`` with a TensorBoard logger and logging every step, "off"
(no diagnostics callbacks, ``support_top_p: null``) with "on" (the four callbacks as
``configs/diagnostics.yaml`` sets them: every scalar every step, the support-mismatch figure every
50 steps — ``--figure-every 1`` to draw it every step too — and ``support_top_p: 0.9``): the runs
alternate off/on ``--repeats`` times and the step times are pooled per mode. A step is timed from
the batch's start to the end of the last ``on_train_batch_end`` callback, so the diagnostics' own
work is inside it. Wall and process CPU time are both shown: on a busy machine the CPU time is the
steadier of the two.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("aropd/rollout", "aropd/teacher_scoring", "aropd/student_forward_and_loss")


def diagnostics_callbacks(figure_every: int | None = None) -> list:
    """The aropd.callbacks entries of configs/diagnostics.yaml, as configured there."""
    import importlib

    import yaml

    cfg = yaml.safe_load((ROOT / "configs/diagnostics.yaml").read_text())
    out = []
    for entry in cfg["trainer"]["callbacks"]:
        module, _, name = entry["class_path"].rpartition(".")
        if module != "aropd.callbacks":
            continue
        kwargs = dict(entry.get("init_args") or {})
        if figure_every is not None and "figure_every_n_steps" in kwargs:
            kwargs["figure_every_n_steps"] = figure_every
        out.append(getattr(importlib.import_module(module), name)(**kwargs))
    return out


def run_one(method: str, steps: int, warmup: int, extra: list[str], diagnostics: str | None = None,
            threads: int = 2, figure_every: int | None = None) -> dict:
    import tempfile

    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.profilers import SimpleProfiler

    from aropd.data import PrivilegedDataModule
    from aropd.module import PrivilegedDistillation
    from aropd.rollout import SamplingConfig

    torch.set_num_threads(threads)
    L.seed_everything(0)
    step_times, tokens = [], []

    cpu_times: list[float] = []  # process CPU time (all threads): less sensitive to a busy machine

    class Clock(L.Callback):
        def on_train_batch_start(self, *a):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step_times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.c0)
            rec = outputs.get("record") if isinstance(outputs, dict) else None
            tokens.append(float(rec.mask.sum()) if rec is not None else float(batch.reference_mask.sum()))

    args = dict(method=method, sampling=SamplingConfig(max_new_tokens=64))
    callbacks: list = [Clock()]
    logger = False
    if diagnostics is not None:  # the diagnostics overhead: on vs. off, both with a TensorBoard logger
        args["support_top_p"] = 0.9 if diagnostics == "on" else None
        if diagnostics == "on":  # before the clock, whose on_train_batch_end then ends the step
            callbacks = [*diagnostics_callbacks(figure_every), *callbacks]
        logger = TensorBoardLogger(tempfile.mkdtemp(prefix="aropd_bench_"), name="", version="")
    args.update(json.loads(extra[0]) if extra else {})
    model = PrivilegedDistillation(student=str(ROOT / "aropd/assets/tiny-llama"), **args)
    data = PrivilegedDataModule(tokenizer=str(ROOT / "aropd/assets/tiny-llama"), batch_size=8, max_new_tokens=64)
    profiler = SimpleProfiler()
    trainer = L.Trainer(
        max_steps=steps + warmup, accelerator="cpu", logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, profiler=profiler, callbacks=callbacks,
        log_every_n_steps=1,
    )
    trainer.fit(model, data)
    m = slice(warmup, None)
    phases = {k.split("/")[-1]: statistics.median(v[warmup:]) for k, v in profiler.recorded_durations.items()
              if k in PHASES and len(v) > warmup}
    back = [k for k in profiler.recorded_durations if k.endswith(".backward")]
    if back:
        phases["backward"] = statistics.median(profiler.recorded_durations[back[0]][warmup:])
    step = statistics.median(step_times[m])
    return {
        "method": method,
        "diagnostics": diagnostics,
        "step_s": step,
        "step_times_s": step_times[m],
        "cpu_times_s": cpu_times[m],
        "phases_s": phases,
        "tokens_per_s": statistics.median(t / s for t, s in zip(tokens[m], step_times[m])),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["ar_opd", "full_opd", "partial_opd", "sft"])
    p.add_argument("--model-args", default="", help="JSON of extra PrivilegedDistillation args")
    p.add_argument("--diagnostics", action="store_true", help="diagnostics on vs. off (ar_opd); see the docstring")
    p.add_argument("--repeats", type=int, default=3, help="off/on run pairs with --diagnostics")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is steadier on a busy machine)")
    p.add_argument("--figure-every", type=int, default=None,
                   help="with --diagnostics: the support-mismatch figure's interval (default: the YAML's)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_diag", default=None, choices=["on", "off"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        extra = [a.model_args] if a.model_args else []
        print("RESULT " + json.dumps(run_one(a._child, a.steps, a.warmup, extra, a._diag, a.threads, a.figure_every)))
        return []

    def child(method: str, diag: str | None = None) -> dict:
        cmd = [sys.executable, __file__, "--steps", str(a.steps), "--warmup", str(a.warmup), "--_child", method,
               "--threads", str(a.threads)]
        if a.figure_every is not None:
            cmd += ["--figure-every", str(a.figure_every)]
        if a.model_args:
            cmd += ["--model-args", a.model_args]
        if diag:
            cmd += ["--_diag", diag]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
        return json.loads(line[-1][7:])

    if a.diagnostics:
        return diagnostics_overhead([child("ar_opd", mode) for _ in range(a.repeats) for mode in ("off", "on")])
    results = [child(method) for method in a.methods]
    print(f"{'method':<12} {'step s':>8} {'rollout':>8} {'teacher':>8} {'fwd+loss':>8} {'backward':>8} {'tok/s':>8} {'peak MB':>8}")
    for r in results:
        ph = r["phases_s"]
        cells = [ph.get(k, float("nan")) for k in ("rollout", "teacher_scoring", "student_forward_and_loss", "backward")]
        print(f"{r['method']:<12} {r['step_s']:>8.3f} " + " ".join(f"{c:>8.3f}" for c in cells)
              + f" {r['tokens_per_s']:>8.0f} {r['peak_rss_mb']:>8.0f}")
    return results


def diagnostics_overhead(runs: list[dict]) -> list[dict]:
    """Pool the step times of the off and on runs; print medians and the on/off ratios."""
    modes = ("off", "on")
    pool = lambda key, mode: [t for r in runs if r["diagnostics"] == mode for t in r[key]]  # noqa: E731
    wall = {mode: statistics.median(pool("step_times_s", mode)) for mode in modes}
    cpu = {mode: statistics.median(pool("cpu_times_s", mode)) for mode in modes}
    per_run = {mode: [round(r["step_s"], 3) for r in runs if r["diagnostics"] == mode] for mode in modes}
    print(f"{'diagnostics':<12} {'step s':>8} {'cpu s':>8} {'steps':>6}  per-run median step s")
    for mode in modes:
        print(f"{mode:<12} {wall[mode]:>8.3f} {cpu[mode]:>8.3f} {len(pool('step_times_s', mode)):>6}  {per_run[mode]}")
    ratio, cpu_ratio = wall["on"] / wall["off"], cpu["on"] / cpu["off"]
    print(f"overhead: step time on/off = {ratio:.3f} ({100 * (ratio - 1):+.1f} %), "
          f"CPU time on/off = {cpu_ratio:.3f} ({100 * (cpu_ratio - 1):+.1f} %)  [budget: +10 %]")
    return [{"off_s": wall["off"], "on_s": wall["on"], "ratio": ratio, "cpu_ratio": cpu_ratio, "runs": runs}]


if __name__ == "__main__":
    main()
