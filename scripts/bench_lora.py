"""LoRA vs. full fine-tuning: step time, peak memory, trainable parameters and checkpoint size.

    python scripts/bench_lora.py                         # the tiny model and SmolLM2-135M, EMA teacher
    python scripts/bench_lora.py --models tiny --steps 8
    python scripts/bench_lora.py --teacher aropd.teachers.FrozenTeacher

Each (model, mode) runs ``aropd fit`` in its own process (so the peak RSS is its own) with greedy
rollouts (the same first rollout for both modes), no validation, and the run's own ``last.ckpt``
(written when fit ends) for the size. ``full`` trains every weight with an EMA copy of the student
as teacher; ``lora`` composes configs/peft/lora.yaml (rank 16 on every decoder projection; the EMA
teacher is an EMA adapter over the shared base). Step time is the median over the steps after
``--warmup``, from the batch's start to its end (rollout, teacher scoring, loss, backward, optimizer
step, EMA update). The machine may be shared: compare the two modes within one run.
SmolLM2-135M needs ``python scripts/fetch_smollm2.py`` first (checkpoints/smollm2-135m-instruct).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    # name: (configs, per-run options)
    "tiny": (["configs/quickstart.yaml", "tests/conf/tiny.yaml"],
             ["--model.init_args.max_new_tokens", "48", "--data.init_args.batch_size", "8"]),
    "smollm2-135m": (["configs/smollm2.yaml"],
                     ["--model.init_args.max_new_tokens", "32", "--data.init_args.batch_size", "2"]),
}


class StepTimer(L.Callback):
    """Wall time of every training batch; the trainable parameter count at the start."""

    def __init__(self, out: str) -> None:
        self.out, self.times, self.t0, self.trainable = Path(out), [], 0.0, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.trainable = sum(p.numel() for p in pl_module.student.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in pl_module.student.parameters())

    def on_train_batch_start(self, *args) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.t0)

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.write_text(json.dumps({"times": self.times, "trainable": self.trainable, "total": self.total}))


def child(model: str, mode: str, steps: int, teacher: str, out: str) -> None:
    """One fit in this process; writes its figures to ``out``."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from aropd.cli import main

    configs, options = MODELS[model]
    root = Path(tempfile.mkdtemp(prefix=f"bench_lora_{model}_{mode}_"))
    args = ["fit", *[a for c in configs for a in ("--config", c)]]
    if mode == "lora":
        args += ["--config", "configs/peft/lora.yaml"]
    args += [*options, "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
             "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
             "--model.init_args.sampling.temperature", "0", "--model.init_args.teacher", teacher,
             "--trainer.callbacks", "[]", "--trainer.callbacks+=bench_lora.StepTimer",
             "--trainer.callbacks.out", str(root / "times.json")]
    try:
        main(args)
        figures = json.loads((root / "times.json").read_text())
        ckpt = root / "checkpoints" / "last.ckpt"
        figures.update(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                       ckpt_mb=ckpt.stat().st_size / 2**20)
        Path(out).write_text(json.dumps(figures))
    finally:  # a full fine-tune's last.ckpt is GBs; only its size is a figure
        shutil.rmtree(root, ignore_errors=True)


def run(model: str, mode: str, steps: int, warmup: int, teacher: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--child", model, mode, str(steps), teacher, f.name]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{model}/{mode} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        r = json.loads(Path(f.name).read_text())
    return {"model": model, "mode": mode, "step_s": statistics.median(r["times"][warmup:]),
            "trainable": r["trainable"], "total": r["total"], "peak_rss_mb": r["peak_rss_mb"], "ckpt_mb": r["ckpt_mb"]}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--teacher", default="aropd.teachers.EMATeacher")
    a = p.parse_args(argv)
    rows = [run(m, mode, a.steps, a.warmup, a.teacher) for m in a.models for mode in ("full", "lora")]
    print(f"teacher: {a.teacher}; {a.steps - a.warmup} measured steps after {a.warmup} warm-up, greedy rollouts")
    print(f"{'model':<14} {'mode':<5} {'trainable':>12} {'step s':>8} {'peak RSS MB':>12} {'last.ckpt MB':>13}")
    for r in rows:
        print(f"{r['model']:<14} {r['mode']:<5} {r['trainable']:>12,} {r['step_s']:>8.3f} {r['peak_rss_mb']:>12.0f}"
              f" {r['ckpt_mb']:>13.2f}")
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])
    else:
        main()
