"""``TeacherReliability``: full-view support mismatch vs. privileged-context length; belief shift; clipping."""

from __future__ import annotations

import math

import torch

from aropd import diagnostics as D
from aropd.loss import Probes
from aropd.types import StepRecord

from .base import DiagnosticCallback, accum_dtype, add_histogram, gather_across_ranks, log_scalars, sum_across_ranks


class TeacherReliability(DiagnosticCallback):
    """How reliable the full view is as the privileged context grows (docs/diagnostics.md).

    Per rollout: privileged length ``L`` (full-view prompt tokens minus student prompt tokens) and the
    full view's support mismatch averaged over the rollout's completion tokens. Over the most recent
    ``window`` rollouts (all ranks): ``diag/reliability/mismatch_ctx_q1`` … ``_q4`` (mean mismatch in
    each quartile of ``L``, by rank, q1 the shortest contexts) and ``diag/reliability/spearman_ctx``
    (Spearman ρ between ``L`` and the mismatch). Both are left out while every ``L`` in the window is
    equal (the no-trace control), where they would mean nothing.
    Over the steps since the last write (token means, all ranks): ``diag/privileged_shift``
    (``KL(q_F ‖ q_P)``) and ``diag/residual_clip_frac`` (``q_F`` mass on clipped entries); and the
    histogram ``hist/residual`` of the clipped residual ``clamp(ℓ_F − ℓ_P, ±c)`` at the sampled
    tokens (rank zero's tokens, TensorBoard only). The clip fraction and the histogram need a target
    with a residual (``AnchoredResidual``); the quartile tags need ``top_p`` set. The window is part of
    the callback's state, so a resumed run logs what an uninterrupted one does.
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        enabled: bool = True,
        top_p: float | None = 0.9,
        window: int = 1024,
        histogram: bool = True,
        max_histogram_values: int = 65536,
    ) -> None:
        """
        Args:
            every_n_steps: Write every this many optimizer steps.
            enabled: Off: the callback does nothing.
            top_p: Nucleus mass of the full view's support mismatch behind the quartiles; null: no quartiles.
            window: Rollouts (most recent, all ranks) behind the quartiles and the correlation.
            histogram: Also write ``hist/residual`` (TensorBoard only).
            max_histogram_values: Cap on the residual values per histogram (the first ones of the interval).
        """
        super().__init__(every_n_steps, enabled)
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or null, got {top_p}")
        self.top_p = top_p
        if window < 4:
            raise ValueError(f"window must be >= 4 rollouts, got {window}")
        self.window, self.histogram, self.max_histogram_values = window, histogram, max_histogram_values
        self._sums: torch.Tensor | None = None  # [3]: shift sum, clip-fraction sum, tokens
        self._samples: list[torch.Tensor] = []  # [B, 3] per step: L, mean mismatch, has tokens
        self._residuals: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._window = torch.zeros(0, 2, dtype=torch.float64)  # rank zero: (L, mismatch) of recent rollouts

    @property
    def probes(self) -> Probes:
        return Probes(shift=True, residual=True, support_top_p=self.top_p)

    def accumulate(self, trainer, pl_module, record: StepRecord) -> None:
        if record.shift is None:  # an SFT step has none
            return
        mask = record.mask
        clipped = (record.clip_frac * mask).sum() if record.clip_frac is not None else mask.new_tensor(math.nan)
        sums = torch.stack([(record.shift * mask).sum(), clipped, mask.sum()])
        sums = sums.to(accum_dtype(mask.device))
        self._sums = sums if self._sums is None else self._sums + sums
        if record.mismatch is not None:
            tokens = mask.sum(-1)
            mean_full = (record.mismatch[0] * mask).sum(-1) / tokens.clamp(min=1)
            length = record.privileged_len.to(device=mask.device, dtype=mean_full.dtype)
            self._samples.append(torch.stack([length, mean_full, (tokens > 0).to(mean_full.dtype)], -1))
        if self.histogram and record.residual is not None:
            self._residuals.append((record.residual, mask))

    def write(self, trainer, pl_module, step: int) -> None:
        metrics: dict[str, float] = {}
        if self._sums is not None:
            shift, clipped, tokens = sum_across_ranks(trainer, self._sums).tolist()
            if tokens > 0:
                metrics["diag/privileged_shift"] = shift / tokens
                if math.isfinite(clipped):  # a target without a residual clips nothing
                    metrics["diag/residual_clip_frac"] = clipped / tokens
            self._sums = None
        if self._samples:
            samples = gather_across_ranks(trainer, torch.cat(self._samples)).cpu().double()
            self._samples = []
            if trainer.is_global_zero:
                samples = samples[samples[:, 2] > 0, :2]
                self._window = torch.cat([self._window, samples])[-self.window :]
        # With every L equal (a teacher that sees no trace) the quartiles would split ties by arrival
        # order: numbers with no meaning, so they are left out, as the undefined correlation is.
        if trainer.is_global_zero and len(self._window) >= 4 and self._window[:, 0].unique().numel() > 1:
            length, mismatch = self._window[:, 0], self._window[:, 1]
            for q, value in enumerate(D.quartile_means(length, mismatch).tolist(), start=1):
                metrics[f"diag/reliability/mismatch_ctx_q{q}"] = value
            rho = D.spearman(length, mismatch)
            if math.isfinite(rho):
                metrics["diag/reliability/spearman_ctx"] = rho
        log_scalars(trainer, metrics, step)
        if self._residuals:
            if trainer.is_global_zero:
                values = torch.cat([r.flatten() for r, _ in self._residuals])
                keep = torch.cat([m.flatten() for _, m in self._residuals]) > 0
                add_histogram(trainer, "hist/residual", values[keep][: self.max_histogram_values], step)
            self._residuals = []

    def state_dict(self) -> dict:
        return {"window": self._window.tolist()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._window = torch.tensor(state_dict.get("window", []), dtype=torch.float64).reshape(-1, 2)
