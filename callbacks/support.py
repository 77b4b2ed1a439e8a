"""``SupportMismatch``: how much mass each view puts outside the student's top-p nucleus, by position."""

from __future__ import annotations

import math

import torch

from aropd.buckets import EDGES, bucket_index, bucket_names
from aropd.loss import Probes
from aropd.types import StepRecord

from .base import (
    DiagnosticCallback, accum_dtype, add_figure, has_tensorboard, log_scalars, sum_across_ranks,
)

VIEWS = ("full", "partial", "target")


def fitted_ylim(values: torch.Tensor, margin: float = 0.08, min_span: float = 0.01) -> tuple[float, float]:
    """y-limits around ``values`` with a ``margin`` of their range on each side.

    A fixed 0–1 axis flattens the curves: mismatch typically sits within a few hundredths of
    ``1 − top_p`` and the differences between views and positions are what the figure is for. The
    span is at least ``min_span`` so that flat curves do not magnify float noise into structure.
    """
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    pad = margin * (hi - lo)
    return lo - pad, hi + pad


class SupportMismatch(DiagnosticCallback):
    """Support mismatch of the full view, the partial view and the target (docs/diagnostics.md).

    Writes ``diag/support_mismatch/{full,partial,target}/pos_<lo>_<hi>`` (token mean within each
    completion-position bucket that had tokens) and ``.../mean`` (over all completion tokens),
    ``diag/support_gap/pos_<lo>_<hi>`` (full minus partial), and the figure
    ``fig/support_mismatch_vs_position`` (one line per view, positions binned by ``bin_width``, the
    y-axis fitted to the curves) over the training tokens since the previous figure, after every
    validation in ``fit`` and at the end of training (and every ``figure_every_n_steps`` steps if
    set). Drawing costs ~0.1 s of CPU whatever the model, as much as a whole step of the tiny
    quickstart model, hence the validation cadence rather than every step: the figure then sits
    next to the validation curves it explains, and each gets the tokens it needs.
    The module computes the mismatch in its loss pass, with this callback's ``top_p``, only while
    the callback is enabled.
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        enabled: bool = True,
        top_p: float = 0.9,
        figure: bool = True,
        figure_every_n_steps: int | None = None,
        bin_width: int = 16,
        max_position: int = 4096,
    ) -> None:
        """
        Args:
            every_n_steps: Write every this many optimizer steps, averaging the tokens in between.
            enabled: Off: the callback does nothing.
            top_p: Mass of the student's nucleus (the reachable support), in (0, 1].
            figure: Also write the figure (TensorBoard only).
            figure_every_n_steps: Also draw the figure every this many optimizer steps (None: only
                after each validation and at the end of training).
            bin_width: Positions per point of the figure.
            max_position: Positions from here on share the figure's last point.
        """
        super().__init__(every_n_steps, enabled)
        if bin_width < 1 or max_position < bin_width:
            raise ValueError(f"need 1 <= bin_width <= max_position, got {bin_width}, {max_position}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.top_p = top_p
        if figure_every_n_steps is not None and figure_every_n_steps < 1:
            raise ValueError(f"figure_every_n_steps must be >= 1, got {figure_every_n_steps}")
        self.figure, self.figure_every_n_steps, self.bin_width = figure, figure_every_n_steps, bin_width
        self.n_buckets = len(EDGES) - 1
        self.n_bins = math.ceil(max_position / bin_width) + 1
        self._acc: torch.Tensor | None = None  # [4, buckets + bins]: mismatch sums of 3 views, token counts
        self._columns: torch.Tensor | None = None  # [2, L]: bucket and bin of positions 0..L-1

    def _column_index(self, length: int, device: torch.device) -> torch.Tensor:
        """Accumulator columns ``[2·length]`` of positions 0..length-1: their bucket, then their figure bin."""
        if self._columns is None or self._columns.shape[1] < length or self._columns.device != device:
            pos = torch.arange(max(length, 1024))
            bins = self.n_buckets + (pos // self.bin_width).clamp(max=self.n_bins - 1)
            self._columns = torch.stack([bucket_index(pos), bins]).to(device)
        return self._columns[:, :length].reshape(-1)

    @property
    def probes(self) -> Probes:
        return Probes(support_top_p=self.top_p)

    def accumulate(self, trainer, pl_module, record: StepRecord) -> None:
        if record.mismatch is None:  # an SFT step has none
            return
        mask = record.mask
        per_pos = torch.cat([(record.mismatch * mask).sum(1), mask.sum(0, keepdim=True)])  # [4, T]
        if self._acc is None or self._acc.device != mask.device:
            self._acc = torch.zeros(4, self.n_buckets + self.n_bins, dtype=accum_dtype(mask.device), device=mask.device)
        cols = self._column_index(per_pos.shape[1], mask.device)
        self._acc.index_add_(1, cols, torch.cat([per_pos, per_pos], 1).to(self._acc.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if (self.enabled and self.figure and self.figure_every_n_steps is not None
                and self.is_write_step(trainer, self.figure_every_n_steps)):
            self._write_figure(trainer, self.log_step(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        # In fit only (`aropd validate` trains nothing); the step is the one the val/ scalars carry.
        if self.enabled and self.figure and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._write_figure(trainer, trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.enabled and self.figure:  # the last, partial interval
            self._write_figure(trainer, trainer.global_step)

    def write(self, trainer, pl_module, step: int) -> None:
        if self._acc is None:
            return
        buckets = sum_across_ranks(trainer, self._acc[:, : self.n_buckets]).cpu().clone()  # a copy: the
        self._acc[:, : self.n_buckets].zero_()  # accumulator restarts (the figure's bins run on)
        counts = buckets[3]
        metrics: dict[str, float] = {}
        names = bucket_names("pos")
        for v, view in enumerate(VIEWS):
            if counts.sum() > 0:
                metrics[f"diag/support_mismatch/{view}/mean"] = float(buckets[v].sum() / counts.sum())
            for k, name in enumerate(names):
                if counts[k] > 0:
                    metrics[f"diag/support_mismatch/{view}/{name}"] = float(buckets[v, k] / counts[k])
        for k, name in enumerate(names):
            if counts[k] > 0:
                metrics[f"diag/support_gap/{name}"] = float((buckets[0, k] - buckets[1, k]) / counts[k])
        log_scalars(trainer, metrics, step)

    def _write_figure(self, trainer, step: int) -> None:
        if self._acc is None or not has_tensorboard(trainer):  # the same answer on every rank
            return
        bins = sum_across_ranks(trainer, self._acc[:, self.n_buckets :]).cpu().clone()
        self._acc[:, self.n_buckets :].zero_()
        if bins[3].sum() > 0:
            add_figure(trainer, "fig/support_mismatch_vs_position", lambda fig: self._draw(fig, bins), step)

    def _draw(self, fig, bins: torch.Tensor) -> None:
        ax = fig.add_subplot()
        seen = bins[3] > 0
        x = (torch.arange(self.n_bins, dtype=torch.float64) * self.bin_width + self.bin_width / 2)[seen]
        curves = [bins[v][seen] / bins[3][seen] for v in range(len(VIEWS))]
        for view, y in zip(VIEWS, curves):
            ax.plot(x.numpy(), y.numpy(), marker=".", label=view)
        for edge in EDGES[1:-1]:
            if edge <= float(x.max()):
                ax.axvline(edge, color="0.85", lw=0.8, zorder=0)
        ax.set(xlabel="completion position (tokens)", ylabel="support mismatch", ylim=fitted_ylim(torch.cat(curves)),
               title="mass outside the student's top-p nucleus")
        ax.legend(loc="upper right")
