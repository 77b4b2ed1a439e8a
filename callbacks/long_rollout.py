"""``LongRolloutAccuracy``: validation accuracy by response length, as a figure next to the scalars."""

from __future__ import annotations

import math

import lightning as L
import torch

from aropd.buckets import EDGES

from .base import add_figure, has_tensorboard


def _label(lo: float, hi: float) -> str:
    return f"{int(lo)}–{'∞' if math.isinf(hi) else int(hi)}"


class LongRolloutAccuracy(L.Callback):
    """Writes ``fig/long_rollout_accuracy``: per benchmark, accuracy in each response-length bucket
    (edges 0, 256, 512, 768, 1024, ∞), each point labelled with its count, after every
    ``every_n_val_epochs``-th validation (in ``fit`` and in ``aropd validate``; not the sanity check).

    The numbers are the module's ``val_metrics`` (``aropd.metrics.BucketAccuracy``, summed across
    ranks), the same ones behind the scalar tags ``val/<benchmark>/acc_len_<lo>_<hi>`` and
    ``val/<benchmark>/count_len_<lo>_<hi>`` that the module logs itself. TensorBoard only: with other
    loggers this callback computes nothing.
    """

    def __init__(self, enabled: bool = True, every_n_val_epochs: int = 1) -> None:
        """
        Args:
            enabled: Off: the callback does nothing.
            every_n_val_epochs: Draw after every this many validation runs.
        """
        if every_n_val_epochs < 1:
            raise ValueError(f"every_n_val_epochs must be >= 1, got {every_n_val_epochs}")
        self.enabled, self.every_n_val_epochs = enabled, every_n_val_epochs
        self._runs = 0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        self._runs += 1
        if self._runs % self.every_n_val_epochs or not has_tensorboard(trainer):
            return
        rows = {}
        for name, metric in pl_module.val_metrics.items():
            if metric.update_count == 0:
                continue
            _, bucket_acc, counts = metric.compute()  # a collective under DDP: every rank computes
            rows[name] = (bucket_acc.detach().cpu(), counts.detach().cpu())
        if rows:
            add_figure(trainer, "fig/long_rollout_accuracy", lambda fig: self._draw(fig, rows), trainer.global_step)

    @staticmethod
    def _draw(fig, rows: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        ax = fig.add_subplot()
        x = list(range(len(EDGES) - 1))
        for name, (acc, counts) in rows.items():
            y = [float(a) if n > 0 else float("nan") for a, n in zip(acc, counts)]
            (line,) = ax.plot(x, y, marker="o", label=name)
            for xi, yi, n in zip(x, y, counts.tolist()):
                if n > 0:
                    ax.annotate(f"n={int(n)}", (xi, yi), textcoords="offset points", xytext=(0, 6),
                                ha="center", fontsize=7, color=line.get_color())
        ax.set_xticks(x, [_label(lo, hi) for lo, hi in zip(EDGES[:-1], EDGES[1:])])
        ax.set(xlabel="response length (tokens)", ylabel="accuracy", ylim=(-0.05, 1.1), xlim=(-0.4, len(x) - 0.6),
               title="validation accuracy by response length")
        ax.legend(loc="upper right", fontsize=8)



