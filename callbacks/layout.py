"""``DiagnosticsLayout``: TensorBoard's Custom Scalars tab, laid out for reading the diagnostics.

TensorBoard's Scalars tab draws one chart per tag, so quantities that are read against each other
(the three views' support mismatch, the four reliability quartiles, a benchmark's accuracy and its
length buckets) land in separate charts, alphabetically scattered. A custom-scalars layout puts
them on one chart each. It is metadata only: one summary in the run's event file, no scalar data.
"""

from __future__ import annotations

import re
from typing import Any

import lightning as L

from .base import tensorboards

# Anchored regular expressions (TensorBoard matches a Multiline chart's tags as regexes): an
# unanchored tag would also pull in every tag it is a prefix of.
SUPPORT_MEANS = [f"^diag/support_mismatch/{view}/mean$" for view in ("full", "partial", "target")]
SUPPORT_GAP = [r"^diag/support_gap/pos_\d+_(\d+|inf)$"]
QUARTILES = [f"^diag/reliability/mismatch_ctx_q{q}$" for q in range(1, 5)]
SHORTCUTS = ["^diag/shortcut/events_per_1k$", "^diag/early_answer_rate$"]
# Logged by the module when they exist: the gap with an engine that keeps its log-probs (vLLM), the
# staleness with generation windows.
ROLLOUTS = ["^diag/rollout_logprob_gap$", "^train/rollout_staleness$"]
ALL_ACCURACIES = [r"^val/[^/]+/accuracy$"]  # every benchmark and val/average


def benchmark_chart(name: str) -> list[str]:
    """A benchmark's accuracy and its accuracy in each response-length bucket."""
    b = re.escape(name)
    return [f"^val/{b}/accuracy$", rf"^val/{b}/acc_len_\d+_(\d+|inf)$"]


def layout(benchmarks: list[str] = ()) -> dict[str, dict[str, list[Any]]]:
    """The layout: ``{category: {chart title: ["Multiline", [tag regexes]]}}``."""
    val = {"accuracy, all benchmarks": ["Multiline", ALL_ACCURACIES]}
    for name in benchmarks:
        val[f"{name}: accuracy and by response length"] = ["Multiline", benchmark_chart(name)]
    return {
        "support": {
            "support mismatch (mean): full, partial, target": ["Multiline", SUPPORT_MEANS],
            "support gap (full − partial) by position": ["Multiline", SUPPORT_GAP],
        },
        "reliability": {
            "full-view mismatch by privileged-length quartile": ["Multiline", QUARTILES],
        },
        "shortcuts": {
            "shortcut events per 1k tokens, early-answer rate": ["Multiline", SHORTCUTS],
        },
        "rollouts": {
            "trainer–sampler log-prob gap, rollout staleness": ["Multiline", ROLLOUTS],
        },
        "validation": val,
    }


def _benchmark_names(trainer: L.Trainer) -> list[str]:
    specs = getattr(getattr(trainer, "datamodule", None), "val_benchmarks", None) or []
    names = [getattr(s, "name", None) or (s.get("name") if isinstance(s, dict) else None) for s in specs]
    return list(dict.fromkeys(n for n in names if n))  # in order, once each


class DiagnosticsLayout(L.Callback):
    """Writes the custom-scalars layout (:func:`layout`) to each TensorBoard logger, once per run.

    Charts: the three views' mean support mismatch; the support gap per position bucket; the
    reliability quartiles q1–q4; shortcut events per 1k with the early-answer rate; every
    benchmark's accuracy; and per validation benchmark, its accuracy with its length buckets
    (the benchmarks are the datamodule's ``val_benchmarks``). Written from global rank zero at the
    start of ``fit`` (and of ``validate``); a chart whose tags a run never writes stays empty.
    """

    def __init__(self, enabled: bool = True) -> None:
        """
        Args:
            enabled: Off: no layout is written.
        """
        self.enabled = enabled
        # SummaryWriter accepts one layout per writer: remember whose logs already have it.
        self._written: set[str] = set()

    def _write(self, trainer: L.Trainer) -> None:
        if not self.enabled:
            return
        charts = None
        for writer in tensorboards(trainer):  # rank zero only
            key = str(writer.log_dir)
            if key in self._written:
                continue
            charts = charts or layout(_benchmark_names(trainer))
            writer.add_custom_scalars(charts)
            writer.flush()  # metadata a reader wants before the first scalar arrives
            self._written.add(key)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._write(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":  # `aropd validate`: its own run folder
            self._write(trainer)
