"""``ShortcutEvents``: sampled tokens the full view endorses and the reachable (partial) view does not."""

from __future__ import annotations

import math

import torch

from aropd import diagnostics as D
from aropd.loss import Probes
from aropd.types import StepRecord

from .base import DiagnosticCallback, accum_dtype, log_scalars, sum_across_ranks

FIELDS = ("events", "tokens", "event_rollouts", "rollouts", "target_prob_sum", "early_answers", "early_rollouts")


class ShortcutEvents(DiagnosticCallback):
    """Shortcut events (docs/diagnostics.md) and the early-answer rate, over each interval and cumulatively.

    An event is a completion token ``y_t`` with ``log q_F(y_t) − log q_P(y_t) ≥ delta`` and
    ``q_F(y_t) ≥ min_prob``. Writes, over the steps since the last write:
    ``diag/shortcut/events_per_1k`` (per 1,000 completion tokens), ``diag/shortcut/rollout_rate``
    (rollouts with at least one event), ``diag/shortcut/target_prob`` (mean target probability
    ``π*(y_t)`` on event tokens; only when there were events) and ``diag/early_answer_rate``; and
    since the start of training: ``diag/shortcut/cumulative_events`` and
    ``diag/shortcut/cumulative_events_per_1k``.

    Each step's counts are summed across ranks right away (one all-reduce of 7 numbers, only with
    more than one rank), so the cumulative totals are global and equal on every rank; they are the
    callback's ``state_dict`` and survive a resume.
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        enabled: bool = True,
        delta: float = math.log(20),
        min_prob: float = 0.5,
        early_answer: bool = True,
    ) -> None:
        """
        Args:
            every_n_steps: Write every this many optimizer steps, counting the events in between.
            enabled: Off: the callback does nothing (and its totals do not grow).
            delta: Log-ratio threshold ``log q_F(y) − log q_P(y)`` in nats (default ln 20).
            min_prob: Minimum full-view probability of the sampled token.
            early_answer: Also decode the completions for ``diag/early_answer_rate`` (a host sync).
        """
        super().__init__(every_n_steps, enabled)
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {min_prob}")
        self.delta, self.min_prob, self.early_answer = delta, min_prob, early_answer
        self._interval: torch.Tensor | None = None
        self._total = torch.zeros(len(FIELDS), dtype=torch.float64)

    @property
    def totals(self) -> dict[str, float]:
        """The cumulative (all ranks, all steps) counts."""
        return dict(zip(FIELDS, self._total.tolist()))

    def _early_answers(self, pl_module, record: StepRecord) -> tuple[int, int]:
        tokenizer = pl_module.tokenizer
        if not self.early_answer or not record.answers:
            return 0, 0
        lengths = record.mask.sum(-1).long().tolist()
        ids = record.completion_ids.tolist()  # lists: tensor rows cost the tokenizer a conversion per id
        texts = tokenizer.batch_decode([row[:n] for row, n in zip(ids, lengths)], skip_special_tokens=True)
        return D.early_answer_rate(texts, list(record.answers))

    @property
    def probes(self) -> Probes:
        return Probes(sampled=True)

    def accumulate(self, trainer, pl_module, record: StepRecord) -> None:
        if record.full_lp is None:  # an SFT step has none
            return
        mask = record.mask > 0
        events = D.shortcut_events(record.full_lp, record.partial_lp, self.delta, self.min_prob) & mask
        device = mask.device
        early, early_n = self._early_answers(pl_module, record)
        step = torch.stack([
            events.sum(), mask.sum(), events.any(-1).sum(),
            torch.tensor(mask.shape[0], device=device),
            (record.target_lp.float().exp() * events).sum(),
            torch.tensor(early, device=device), torch.tensor(early_n, device=device),
        ]).to(accum_dtype(device))
        step = sum_across_ranks(trainer, step)
        if self._interval is None or self._interval.device != device:
            self._interval = torch.zeros_like(step)
        if self._total.device != device or self._total.dtype != step.dtype:
            self._total = self._total.to(device=device, dtype=step.dtype)
        self._interval += step
        self._total += step

    def write(self, trainer, pl_module, step: int) -> None:
        if self._interval is None:
            return
        cur = dict(zip(FIELDS, self._interval.tolist()))
        tot = self.totals
        self._interval.zero_()
        metrics: dict[str, float] = {}
        if cur["tokens"] > 0:
            metrics["diag/shortcut/events_per_1k"] = 1000.0 * cur["events"] / cur["tokens"]
        if cur["rollouts"] > 0:
            metrics["diag/shortcut/rollout_rate"] = cur["event_rollouts"] / cur["rollouts"]
        if cur["events"] > 0:
            metrics["diag/shortcut/target_prob"] = cur["target_prob_sum"] / cur["events"]
        if cur["early_rollouts"] > 0:
            metrics["diag/early_answer_rate"] = cur["early_answers"] / cur["early_rollouts"]
        metrics["diag/shortcut/cumulative_events"] = tot["events"]
        if tot["tokens"] > 0:
            metrics["diag/shortcut/cumulative_events_per_1k"] = 1000.0 * tot["events"] / tot["tokens"]
        log_scalars(trainer, metrics, step)

    def state_dict(self) -> dict:
        return {"totals": self.totals}

    def load_state_dict(self, state_dict: dict) -> None:
        totals = state_dict.get("totals", {})
        self._total = torch.tensor([float(totals.get(f, 0.0)) for f in FIELDS], dtype=torch.float64)
