"""The TensorBoard custom-scalars layout, the step-0 validation and the support-mismatch figure, read
back from the event file of one tiny quickstart `fit` (and the pieces on their own)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from aropd.callbacks import DiagnosticsLayout, SupportMismatch, ValidateBeforeTraining
from aropd.callbacks.layout import layout
from aropd.callbacks.support import fitted_ylim

ROOT = Path(__file__).resolve().parents[1]

# Tags the callbacks and the module write (docs/diagnostics.md), and a few they do not.
WRITTEN = (
    [f"diag/support_mismatch/{v}/{b}" for v in ("full", "partial", "target")
     for b in ("mean", "pos_0_256", "pos_1024_inf")]
    + ["diag/support_gap/pos_0_256", "diag/support_gap/pos_256_512", "diag/support_gap/pos_1024_inf"]
    + [f"diag/reliability/mismatch_ctx_q{q}" for q in range(1, 5)] + ["diag/reliability/spearman_ctx"]
    + ["diag/shortcut/events_per_1k", "diag/shortcut/rollout_rate", "diag/shortcut/cumulative_events_per_1k",
       "diag/early_answer_rate"]
    + ["val/toy/accuracy", "val/toy/acc_len_0_256", "val/toy/acc_len_1024_inf", "val/toy/count_len_0_256",
       "val/math500/accuracy", "val/math500/acc_len_256_512", "val/average/accuracy", "train/loss"]
    + ["diag/rollout_logprob_gap", "train/rollout_staleness", "train/completion_len"]
)

EXPECTED_CHARTS = {
    ("support", "support mismatch (mean): full, partial, target"):
        ["diag/support_mismatch/full/mean", "diag/support_mismatch/partial/mean", "diag/support_mismatch/target/mean"],
    ("support", "support gap (full − partial) by position"):
        ["diag/support_gap/pos_0_256", "diag/support_gap/pos_256_512", "diag/support_gap/pos_1024_inf"],
    ("reliability", "full-view mismatch by privileged-length quartile"):
        [f"diag/reliability/mismatch_ctx_q{q}" for q in range(1, 5)],
    ("shortcuts", "shortcut events per 1k tokens, early-answer rate"):
        ["diag/shortcut/events_per_1k", "diag/early_answer_rate"],
    ("rollouts", "trainer–sampler log-prob gap, rollout staleness"):
        ["diag/rollout_logprob_gap", "train/rollout_staleness"],
    ("validation", "accuracy, all benchmarks"): ["val/toy/accuracy", "val/math500/accuracy", "val/average/accuracy"],
    ("validation", "toy: accuracy and by response length"):
        ["val/toy/accuracy", "val/toy/acc_len_0_256", "val/toy/acc_len_1024_inf"],
}


def charts_of(lay: dict) -> dict[tuple[str, str], list[str]]:
    """``{(category, chart): [tag regexes]}`` of a layout dict."""
    return {(cat, title): spec[1] for cat, charts in lay.items() for title, spec in charts.items()}


def matching(regexes: list[str], tags=WRITTEN) -> list[str]:
    return [t for t in tags if any(re.match(r, t) for r in regexes)]


def read_layout(log_dir) -> dict[tuple[str, str], list[str]]:
    """The custom-scalars layout in a run's event file, as TensorBoard's plugin stores it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    assert metadata.CONFIG_SUMMARY_TAG in acc.PluginTagToContent(metadata.PLUGIN_NAME)
    events = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    assert len(events) == 1  # once per run
    proto = layout_pb2.Layout.FromString(tensor_util.make_ndarray(events[0].tensor_proto).item())
    out = {}
    for cat in proto.category:
        for chart in cat.chart:
            assert chart.WhichOneof("content") == "multiline"
            out[(cat.title, chart.title)] = list(chart.multiline.tag)
    return out


# ---- the layout on its own ----------------------------------------------------------------------
def test_layout_charts_hold_exactly_their_tags():
    charts = charts_of(layout(["toy"]))
    assert set(charts) == set(EXPECTED_CHARTS)
    for key, tags in EXPECTED_CHARTS.items():
        assert matching(charts[key]) == tags, key
    assert all(spec[0] == "Multiline" for c in layout(["toy"]).values() for spec in c.values())


def test_layout_has_a_chart_per_benchmark_and_escapes_names():
    charts = charts_of(layout(["toy", "math500", "a.b"]))
    assert matching(charts[("validation", "math500: accuracy and by response length")]) == [
        "val/math500/accuracy", "val/math500/acc_len_256_512"]
    (acc, by_len) = charts[("validation", "a.b: accuracy and by response length")]
    assert re.match(acc, "val/a.b/accuracy") and not re.match(acc, "val/axb/accuracy")
    assert not any(re.match(r, "val/toy/count_len_0_256") for c in charts.values() for r in c)  # counts stay out


def test_layout_is_written_on_rank_zero_only_and_once_per_writer(tmp_path):
    class Writer:
        def __init__(self, log_dir):
            self.log_dir, self.layouts = log_dir, []

        def add_custom_scalars(self, lay):
            self.layouts.append(lay)

        def flush(self):
            pass

    from lightning.pytorch.loggers import TensorBoardLogger

    def trainer(rank, writer):
        lg = TensorBoardLogger.__new__(TensorBoardLogger)
        lg._experiment = writer
        return SimpleNamespace(is_global_zero=rank == 0, loggers=[lg], datamodule=SimpleNamespace(
            val_benchmarks=[SimpleNamespace(name="toy"), {"name": "gsm8k"}, SimpleNamespace(name="toy")]),
            state=SimpleNamespace(fn="fit"))

    w0, w1 = Writer("a"), Writer("a")
    cb = DiagnosticsLayout()
    cb.on_fit_start(trainer(1, w1), None)
    assert w1.layouts == []
    cb.on_fit_start(trainer(0, w0), None)
    cb.on_validation_start(trainer(0, w0), None)  # in fit: the layout is there already
    cb.on_fit_start(trainer(0, w0), None)
    assert len(w0.layouts) == 1
    assert [t for _, t in charts_of(w0.layouts[0]) if t.endswith("by response length")] == [
        "toy: accuracy and by response length", "gsm8k: accuracy and by response length"]
    off = Writer("b")
    DiagnosticsLayout(enabled=False).on_fit_start(trainer(0, off), None)
    assert off.layouts == []


# ---- the figure's axis --------------------------------------------------------------------------
def test_support_figure_y_axis_is_fitted_to_the_curves():
    from matplotlib.figure import Figure

    cb = SupportMismatch(bin_width=16, max_position=64)
    bins = torch.zeros(4, cb.n_bins, dtype=torch.float64)
    bins[3, :3] = 10.0  # tokens in the first three bins
    bins[0, :3] = torch.tensor([1.0, 1.2, 1.4])  # full view 0.10, 0.12, 0.14
    bins[1, :3] = torch.tensor([0.9, 0.9, 0.9])  # partial 0.09
    bins[2, :3] = torch.tensor([0.95, 1.0, 1.05])
    fig = Figure()
    cb._draw(fig, bins)
    lo, hi = fig.axes[0].get_ylim()
    assert 0.08 < lo < 0.09 and 0.14 < hi < 0.15, (lo, hi)  # not 0-1: the 0.05 spread fills the plot
    fig.clear()
    assert fitted_ylim(torch.tensor([0.1, 0.1])) == pytest.approx((0.1 - 0.0058, 0.1 + 0.0058), abs=1e-6)  # min span 0.01, 8 % margin


def test_support_figure_is_drawn_after_each_validation_in_fit_only():
    cb = SupportMismatch()
    drawn = []
    cb._write_figure = lambda trainer, step: drawn.append(step)
    fit = SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn="fit"), global_step=8)
    cb.on_validation_end(fit, None)
    cb.on_validation_end(SimpleNamespace(sanity_checking=True, state=SimpleNamespace(fn="fit"), global_step=0), None)
    cb.on_validation_end(SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn="validate"), global_step=8),
                         None)
    SupportMismatch(figure=False).on_validation_end(fit, None)
    assert drawn == [8]
    with pytest.raises(ValueError, match="figure_every_n_steps"):
        SupportMismatch(figure_every_n_steps=0)


# ---- the step-0 validation on its own -----------------------------------------------------------
class Loop:
    def __init__(self, trainer):
        self.trainer, self.runs = trainer, []

    def run(self):
        self.runs.append(self.trainer.stage)


class Stage(SimpleNamespace):
    """Stands in for the trainer's stage switches: ``validating = True`` / ``training = True``."""

    def __setattr__(self, name, value):
        if name in ("validating", "training") and value:
            object.__setattr__(self, "stage", name)
        else:
            object.__setattr__(self, name, value)


def _stage_trainer(step: int) -> Stage:
    t = Stage(global_step=step, stage="training")
    t.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(val_loop=Loop(t)))
    return t


def test_validate_before_training_runs_once_at_step_zero_in_the_validating_stage():
    t = _stage_trainer(0)
    cb = ValidateBeforeTraining()
    cb.on_train_start(t, None)
    assert t.fit_loop.epoch_loop.val_loop.runs == ["validating"] and t.stage == "training"
    cb.on_train_start(t, None)  # a second fit call with the same callback: not again
    assert len(t.fit_loop.epoch_loop.val_loop.runs) == 1
    assert cb.state_dict() == {"validated": True}


def test_validate_before_training_skips_resumed_runs_and_when_off():
    resumed = _stage_trainer(12)
    ValidateBeforeTraining().on_train_start(resumed, None)
    fresh = _stage_trainer(0)
    ValidateBeforeTraining(enabled=False).on_train_start(fresh, None)
    restored = ValidateBeforeTraining()
    restored.load_state_dict({"validated": True})
    restored.on_train_start(fresh, None)
    assert resumed.fit_loop.epoch_loop.val_loop.runs == [] and fresh.fit_loop.epoch_loop.val_loop.runs == []


# ---- end to end: the quickstart (on the tiny model), read back from its event file ---------------
@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    from aropd.cli import main

    tmp = tmp_path_factory.mktemp("layout_fit")
    old = Path.cwd()
    os.chdir(ROOT)
    try:
        cli = main([
            "fit", "--config", "configs/quickstart.yaml", "--config", "tests/conf/tiny.yaml",
            "--trainer.max_steps", "3", "--trainer.val_check_interval", "2",
            "--trainer.default_root_dir", str(tmp), "--data.init_args.val_benchmarks", "[{name: toy, limit: 8}]",
        ])
    finally:
        os.chdir(old)
    return cli


def test_quickstart_writes_the_layout_into_its_event_file(quickstart_run):
    charts = read_layout(quickstart_run.trainer.log_dir)
    assert charts == charts_of(layout(["toy"]))
    for key, tags in EXPECTED_CHARTS.items():
        assert matching(charts[key]) == tags, key


def test_quickstart_validates_at_step_zero(quickstart_run):
    from test_cli import scalars

    log_dir = Path(quickstart_run.trainer.log_dir)
    acc = scalars(log_dir)["val/toy/accuracy"]
    assert acc[0][0] == 0 and len(acc) == 2, acc  # step 0 (the base model), then the validation after step 2
    assert "val/toy/count_len_0_256" in scalars(log_dir)
    res = json.loads((log_dir / "val" / "step_0" / "results.json").read_text())
    assert res["meta"]["global_step"] == 0 and res["benchmarks"]["toy"]["n"] == 8
    assert (log_dir / "val" / "step_2" / "results.json").exists()
    # No checkpoint at step 0's validation; the one after step 2's is kept (fit's end saves only
    # when nothing was saved).
    ckpt = torch.load(Path(quickstart_run.trainer.default_root_dir) / "checkpoints" / "last.ckpt",
                      map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["callbacks"]["ValidateBeforeTraining"] == {"validated": True}


def test_quickstart_draws_the_support_figure_at_validation_and_at_the_end(quickstart_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(quickstart_run.trainer.log_dir, size_guidance={"images": 0})
    acc.Reload()
    # Step 0's validation has no training tokens yet; then after step 2's validation and at the end.
    assert [e.step for e in acc.Images("fig/support_mismatch_vs_position")] == [2, 3]
