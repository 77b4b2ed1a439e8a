"""Shared plumbing of the diagnostics callbacks: when to write, cross-rank reduction, writing.

Every diagnostic says which per-position quantities it reads (``probes``: the module computes only
those, in its loss pass), reads the ``StepRecord`` that ``training_step`` returns
(``outputs["record"]``; SFT steps return none and are skipped), accumulates what it needs on the step's device, detached, and
every ``every_n_steps`` optimizer steps reduces it across ranks and writes from global rank zero:
scalars to every Lightning logger (``log_metrics``), figures and histograms only to TensorBoard.
Figures are ``matplotlib.figure.Figure`` objects rendered with the Agg canvas: they never enter
pyplot's registry (no backend is selected, nothing is left open) and are cleared after rendering.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from aropd.loss import Probes
from aropd.types import StepRecord


def step_record(outputs: Any) -> StepRecord | None:
    """The step's ``StepRecord``, or None (an SFT step, or a module that returns a bare loss)."""
    record = outputs.get("record") if isinstance(outputs, Mapping) else None
    return record if isinstance(record, StepRecord) else None


def accum_dtype(device: torch.device) -> torch.dtype:
    """float64 for counts that must stay exact over long intervals (MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def sum_across_ranks(trainer: L.Trainer, t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a collective: call it on every rank)."""
    if trainer.world_size <= 1:
        return t
    return trainer.strategy.reduce(t.clone(), reduce_op="sum")


def gather_across_ranks(trainer: L.Trainer, t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all ranks, which may differ in length (a collective)."""
    if trainer.world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    from torchmetrics.utilities.distributed import gather_all_tensors

    return torch.cat(gather_all_tensors(t.contiguous()))


def log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Scalars to every logger, from global rank zero only."""
    if not metrics or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def has_tensorboard(trainer: L.Trainer) -> bool:
    """Is a TensorBoard logger configured? The same answer on every rank (non-zero ranks hold one too)."""
    return any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)


def tensorboards(trainer: L.Trainer) -> list:
    """The ``SummaryWriter``s of the TensorBoard loggers on global rank zero; empty elsewhere."""
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def add_figure(trainer: L.Trainer, tag: str, draw: Callable[[Any], None], step: int, size=(6.0, 4.0)) -> bool:
    """Draw a figure with ``draw(fig)`` and write it as an image to each TensorBoard logger.

    Nothing is drawn when no TensorBoard logger is there (or off rank zero). Returns whether it wrote.
    """
    writers = tensorboards(trainer)
    if not writers:
        return False
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    try:
        canvas = FigureCanvasAgg(fig)
        fig.subplots_adjust(left=0.11, right=0.97, bottom=0.13, top=0.91)  # fixed: tight_layout costs ~25 %
        draw(fig)
        canvas.draw()
        image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    finally:
        fig.clear()
    for w in writers:
        w.add_image(tag, image, global_step=step, dataformats="HWC")
    return True


def add_histogram(trainer: L.Trainer, tag: str, values: torch.Tensor, step: int) -> bool:
    """A histogram to each TensorBoard logger (rank zero); nothing for an empty sample."""
    writers = tensorboards(trainer)
    if not writers or values.numel() == 0:
        return False
    values = values.detach().float().cpu()
    for w in writers:
        w.add_histogram(tag, values, global_step=step)
    return True


class DiagnosticCallback(L.Callback):
    """Base of the training-step diagnostics: accumulate every step, write every ``every_n_steps``.

    Subclasses set ``probes`` (what they read from the step record) and implement
    ``accumulate(trainer, pl_module, record)`` (cheap, on device, no host sync unless unavoidable)
    and ``write(trainer, pl_module, step)`` (reduce across ranks — on every rank — then write from
    rank zero and reset the interval).
    """

    def __init__(self, every_n_steps: int = 1, enabled: bool = True) -> None:
        """
        Args:
            every_n_steps: Write every this many optimizer steps (accumulating in between).
            enabled: Off: the callback does nothing at all, and the module computes nothing for it.
        """
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.enabled = enabled
        self._seen = 0  # records accumulated since the last write
        self._steps_before = 0  # trainer.global_step when the current batch started

    @property
    def probes(self) -> Probes:
        """The per-position quantities this diagnostic reads."""
        return Probes()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._steps_before = trainer.global_step

    def stepped(self, trainer: L.Trainer) -> bool:
        """Did the batch that just ended complete an optimizer step? (The same answer on every rank.)"""
        return trainer.global_step > self._steps_before

    @staticmethod
    def log_step(trainer: L.Trainer) -> int:
        """The step Lightning's own ``self.log`` used for the batch that just ended (``train/loss`` lines up):
        the number of optimizer steps before it."""
        return trainer.global_step - 1 if trainer.global_step > 0 else 0

    def is_write_step(self, trainer: L.Trainer, every_n_steps: int) -> bool:
        """After a batch that completed an optimizer step whose 1-based number is a multiple of ``every_n_steps``."""
        return self.stepped(trainer) and trainer.global_step % every_n_steps == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled:
            return
        record = step_record(outputs)
        if record is not None:
            with torch.no_grad():
                self.accumulate(trainer, pl_module, record)
            self._seen += 1
        if self._seen and self.is_write_step(trainer, self.every_n_steps):
            with torch.no_grad():
                self.write(trainer, pl_module, self.log_step(trainer))
            self._seen = 0

    def accumulate(self, trainer, pl_module, record: StepRecord) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def write(self, trainer, pl_module, step: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
