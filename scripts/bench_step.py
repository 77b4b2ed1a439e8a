"""Training-step benchmark: time per phase, tokens per second and peak memory, per method.

    python scripts/bench_step.py [--steps 12] [--warmup 2] [--methods ar_opd full_opd partial_opd sft]

Each method runs in its own process (so peak RSS is its own) on the quickstart's tiny model.
Figures are medians over the measured steps; the machine is shared, so compare ratios in one run.
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


def run_one(method: str, steps: int, warmup: int, extra: list[str]) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.profilers import SimpleProfiler

    from aropd.data import PrivilegedDataModule
    from aropd.module import PrivilegedDistillation
    from aropd.rollout import SamplingConfig

    torch.set_num_threads(2)
    L.seed_everything(0)
    step_times, tokens = [], []

    class Clock(L.Callback):
        def on_train_batch_start(self, *a):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step_times.append(time.perf_counter() - self.t0)
            rec = outputs.get("record") if isinstance(outputs, dict) else None
            tokens.append(float(rec.mask.sum()) if rec is not None else float(batch.reference_mask.sum()))

    args = dict(method=method, sampling=SamplingConfig(max_new_tokens=64))
    args.update(json.loads(extra[0]) if extra else {})
    model = PrivilegedDistillation(student=str(ROOT / "aropd/assets/tiny-llama"), **args)
    data = PrivilegedDataModule(tokenizer=str(ROOT / "aropd/assets/tiny-llama"), batch_size=8, max_new_tokens=64)
    profiler = SimpleProfiler()
    trainer = L.Trainer(
        max_steps=steps + warmup, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, profiler=profiler, callbacks=[Clock()],
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
        "step_s": step,
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
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        print("RESULT " + json.dumps(run_one(a._child, a.steps, a.warmup, [a.model_args] if a.model_args else [])))
        return []
    results = []
    for method in a.methods:
        cmd = [sys.executable, __file__, "--steps", str(a.steps), "--warmup", str(a.warmup), "--_child", method]
        if a.model_args:
            cmd += ["--model-args", a.model_args]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(line[-1][7:]))
    print(f"{'method':<12} {'step s':>8} {'rollout':>8} {'teacher':>8} {'fwd+loss':>8} {'backward':>8} {'tok/s':>8} {'peak MB':>8}")
    for r in results:
        ph = r["phases_s"]
        cells = [ph.get(k, float("nan")) for k in ("rollout", "teacher_scoring", "student_forward_and_loss", "backward")]
        print(f"{r['method']:<12} {r['step_s']:>8.3f} " + " ".join(f"{c:>8.3f}" for c in cells)
              + f" {r['tokens_per_s']:>8.0f} {r['peak_rss_mb']:>8.0f}")
    return results


if __name__ == "__main__":
    main()
