"""Callbacks that the distributed and resume tests add to `aropd fit` subprocesses (PYTHONPATH=tests)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L


class LossRecorder(L.Callback):
    """Appends each rank's per-step loss (full precision) to ``<out>/losses-rank<r>.jsonl``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rec = outputs.get("record") if isinstance(outputs, dict) else None
        rows = int((rec.mask.sum(-1) > 0).sum()) if rec is not None else len(batch.answers)
        row = {"step": trainer.global_step, "batch_idx": batch_idx, "epoch": trainer.current_epoch,
               "rank": trainer.global_rank, "loss": float(outputs["loss"]), "rows": rows}
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"losses-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


class StallAfterStep(L.Callback):
    """At the start of the batch after ``step`` optimizer steps (so after that step's checkpoint was
    written), touch ``marker`` and sleep: the test then kills the process with SIGKILL."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(str(os.getpid()))
            time.sleep(600)
