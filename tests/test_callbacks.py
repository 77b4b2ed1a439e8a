"""Diagnostics callbacks: hand-made step records through a stand-in trainer, and one tiny real `fit`."""

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from aropd.callbacks import LongRolloutAccuracy, ShortcutEvents, SupportMismatch, TeacherReliability
from aropd.loss import Probes
from aropd.types import StepRecord
from aropd.metrics import BucketAccuracy

ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """A logger stand-in: keeps what ``log_metrics`` got."""

    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def last(self) -> dict:
        return self.rows[-1][1]


def fake_trainer(loggers=(), rank=0):
    return SimpleNamespace(
        world_size=1, is_global_zero=rank == 0, global_rank=rank, loggers=list(loggers), global_step=0,
        sanity_checking=False,
    )


class ToyTokenizer:
    """Token id 0 decodes to a space, id i to the digit i % 10: one character per token."""

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(str(int(i) % 10) if i else " " for i in row) for row in rows]


def record(B=2, T=4, mismatch=True, **fields) -> StepRecord:
    z = torch.zeros(B, T)
    base = dict(
        mask=torch.ones(B, T), completion_ids=torch.zeros(B, T, dtype=torch.long), student_lp=z, full_lp=z,
        partial_lp=z, target_lp=z, shift=z, clip_frac=z, residual=z,
        mismatch=torch.zeros(3, B, T) if mismatch is True else (None if mismatch is False else mismatch), privileged_len=torch.arange(B), answers=["0"] * B,
    )
    base.update(fields)
    return StepRecord(**base)


def step(cbs, trainer, rec, module=None):
    """One training batch that ends in an optimizer step through the callback(s), as Lightning runs it."""
    outputs = {"loss": torch.tensor(0.0), "record": rec} if rec is not None else {"loss": torch.tensor(0.0)}
    cbs = cbs if isinstance(cbs, list) else [cbs]
    for cb in cbs:
        cb.on_train_batch_start(trainer, module, None, 0)
    trainer.global_step += 1  # the optimizer step, before on_train_batch_end
    for cb in cbs:
        cb.on_train_batch_end(trainer, module or SimpleNamespace(tokenizer=ToyTokenizer()), outputs, None, 0)


# ---- unit: each callback on hand-made records ---------------------------------------------------


def test_support_mismatch_bucket_means_gap_and_mean():
    T = 300  # positions 0..255 in pos_0_256, 256..299 in pos_256_512
    mm = torch.zeros(3, 1, T)
    mm[0, :, :256], mm[0, :, 256:] = 0.2, 0.8  # full
    mm[1, :, :] = 0.1  # partial
    mm[2, :, :256] = 0.4  # target
    mask = torch.ones(1, T)
    mask[:, 290:] = 0  # masked positions count for nothing (their mismatch would be 0.8 / 0.1 / 0)
    log = Recorder()
    trainer = fake_trainer([log])
    cb = SupportMismatch()
    step(cb, trainer, record(B=1, T=T, mismatch=mm, mask=mask))
    m = log.last()
    assert m["diag/support_mismatch/full/pos_0_256"] == pytest.approx(0.2)
    assert m["diag/support_mismatch/full/pos_256_512"] == pytest.approx(0.8)
    assert m["diag/support_mismatch/full/mean"] == pytest.approx((256 * 0.2 + 34 * 0.8) / 290)
    assert m["diag/support_mismatch/partial/mean"] == pytest.approx(0.1)
    assert m["diag/support_mismatch/target/pos_256_512"] == pytest.approx(0.0)
    assert m["diag/support_gap/pos_0_256"] == pytest.approx(0.1)
    assert m["diag/support_gap/pos_256_512"] == pytest.approx(0.7)
    assert "diag/support_mismatch/full/pos_512_768" not in m  # no tokens there: no tag, not a 0


def test_every_n_steps_accumulates_between_writes():
    log = Recorder()
    trainer = fake_trainer([log])
    cb = SupportMismatch(every_n_steps=2)
    step(cb, trainer, record(mismatch=torch.full((3, 2, 4), 0.2)))
    assert log.rows == []
    step(cb, trainer, record(mismatch=torch.full((3, 2, 4), 0.6)))
    step(cb, trainer, None)  # an SFT step: nothing to read, nothing written
    assert [s for s, _ in log.rows] == [1]
    assert log.last()["diag/support_mismatch/full/mean"] == pytest.approx(0.4)


def test_support_mismatch_writes_nothing_without_mismatch_or_when_disabled():
    log = Recorder()
    trainer = fake_trainer([log])
    step(SupportMismatch(), trainer, record(mismatch=False))
    step(SupportMismatch(enabled=False), trainer, record())
    assert log.rows == []


def test_each_diagnostic_asks_for_what_it_reads():
    assert SupportMismatch(top_p=0.8).probes == Probes(support_top_p=0.8)
    assert ShortcutEvents().probes == Probes(sampled=True)
    assert TeacherReliability(top_p=None).probes == Probes(shift=True, residual=True)


def test_shortcut_events_counts_rates_and_early_answers():
    lp = lambda *p: torch.tensor(p).log()  # noqa: E731
    # Rollout 0: tokens 0 and 2 are events (q_F 0.9 vs q_P 0.01; q_F 0.5 vs q_P 0.025 on the boundary).
    # Rollout 1: none (ratio too small, q_F too small, masked event, partial agrees).
    full = torch.stack([lp(0.9, 0.9, 0.5, 0.2), lp(0.9, 0.3, 0.99, 0.6)])
    partial = torch.stack([lp(0.01, 0.5, 0.025, 0.2), lp(0.5, 0.001, 0.001, 0.6)])
    target = torch.stack([lp(0.7, 0.5, 0.3, 0.1), lp(0.5, 0.5, 0.5, 0.5)])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    ids = torch.tensor([[3, 0, 1, 4], [5, 0, 9, 9]])  # decodes "3 14" and "5 " (+ masked "99")
    rec = record(full_lp=full, partial_lp=partial, target_lp=target, mask=mask, completion_ids=ids, answers=["3", "9"])
    log = Recorder()
    trainer = fake_trainer([log])
    cb = ShortcutEvents()
    step(cb, trainer, rec)
    m = log.last()
    assert m["diag/shortcut/events_per_1k"] == pytest.approx(1000 * 2 / 6)
    assert m["diag/shortcut/rollout_rate"] == pytest.approx(0.5)
    assert m["diag/shortcut/target_prob"] == pytest.approx((0.7 + 0.3) / 2)
    # "3 14": '3' at 0 < 4 / 2, early; "5 ": no '9' (the masked tokens are not decoded).
    assert m["diag/early_answer_rate"] == pytest.approx(0.5)
    assert m["diag/shortcut/cumulative_events"] == 2
    step(cb, trainer, rec)
    assert log.last()["diag/shortcut/cumulative_events"] == 4
    assert log.last()["diag/shortcut/events_per_1k"] == pytest.approx(1000 * 2 / 6)  # the interval's rate
    assert cb.totals == {"events": 4, "tokens": 12, "event_rollouts": 2, "rollouts": 4,
                         "target_prob_sum": pytest.approx(2.0), "early_answers": 2, "early_rollouts": 4}


def test_shortcut_events_no_tokens_writes_no_nan():
    log = Recorder()
    trainer = fake_trainer([log])
    step(ShortcutEvents(), trainer, record(mask=torch.zeros(2, 4)))
    m = log.last()
    assert all(math.isfinite(v) for v in m.values())
    assert "diag/shortcut/events_per_1k" not in m and "diag/shortcut/target_prob" not in m
    assert m["diag/shortcut/rollout_rate"] == 0.0


def test_shortcut_events_state_dict_round_trip(tmp_path):
    rec = record(full_lp=torch.full((2, 4), math.log(0.9)), partial_lp=torch.full((2, 4), math.log(0.01)))
    a = ShortcutEvents()
    for _ in range(3):
        step(a, fake_trainer([Recorder()]), rec)
    assert a.totals["events"] == 24
    torch.save({"cb": a.state_dict()}, tmp_path / "s.pt")
    b = ShortcutEvents()
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)["cb"])
    assert b.totals == a.totals
    log = Recorder()
    step(b, fake_trainer([log]), rec)  # resumed: totals keep growing from where they were
    assert b.totals["events"] == 32 and log.last()["diag/shortcut/cumulative_events"] == 32
    assert log.last()["diag/shortcut/cumulative_events_per_1k"] == pytest.approx(1000.0)


def test_teacher_reliability_quartiles_spearman_shift_and_clip():
    B, T = 8, 3
    L = torch.tensor([40.0, 10, 80, 20, 70, 30, 60, 50])
    full_mm = (L / 100).view(B, 1).expand(B, T)  # mismatch grows with L: quartile means 0.15 … 0.75
    mm = torch.stack([full_mm, torch.zeros(B, T), torch.zeros(B, T)])
    mask = torch.ones(B, T)
    mask[:, 2] = 0
    shift = torch.full((B, T), 0.3)
    shift[:, 2] = 99.0  # masked: must not count
    rec = record(B=B, T=T, mismatch=mm, mask=mask, privileged_len=L, shift=shift,
                 clip_frac=torch.full((B, T), 0.25), residual=torch.full((B, T), 1.5))
    log = Recorder()
    trainer = fake_trainer([log])
    step(TeacherReliability(), trainer, rec)
    m = log.last()
    assert [m[f"diag/reliability/mismatch_ctx_q{q}"] for q in range(1, 5)] == pytest.approx([0.15, 0.35, 0.55, 0.75])
    assert m["diag/reliability/spearman_ctx"] == pytest.approx(1.0)
    assert m["diag/privileged_shift"] == pytest.approx(0.3)
    assert m["diag/residual_clip_frac"] == pytest.approx(0.25)


def test_teacher_reliability_leaves_out_quartiles_when_no_view_has_privilege():
    # The no-trace control: both views are the student prompt, so every L is 0; the shift still counts.
    B, T = 8, 3
    mm = torch.stack([torch.rand(B, T, generator=torch.Generator().manual_seed(0)), torch.zeros(B, T), torch.zeros(B, T)])
    rec = record(B=B, T=T, mismatch=mm, privileged_len=torch.zeros(B), shift=torch.full((B, T), 0.2))
    log = Recorder()
    step(TeacherReliability(), fake_trainer([log]), rec)
    m = log.last()
    assert not [k for k in m if k.startswith("diag/reliability/")]
    assert m["diag/privileged_shift"] == pytest.approx(0.2)


def test_callbacks_write_nothing_on_a_nonzero_rank(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    log, tb = Recorder(), TensorBoardLogger(str(tmp_path / "tb"))
    trainer = fake_trainer([log, tb], rank=1)
    cbs = [SupportMismatch(), ShortcutEvents(), TeacherReliability()]
    for _ in range(2):
        step(cbs, trainer, record())
    metric = BucketAccuracy()
    metric.update(torch.tensor([True, False]), torch.tensor([10, 300]))
    LongRolloutAccuracy().on_validation_epoch_end(trainer, SimpleNamespace(val_metrics={"toy": metric}))
    assert log.rows == []
    assert not list(tmp_path.rglob("events.out.tfevents*"))
    # ... while the same callbacks on rank zero do write.
    trainer0 = fake_trainer([log])
    step(ShortcutEvents(), trainer0, record())
    assert log.rows


# ---- end to end: a tiny `fit` with configs/diagnostics.yaml, read back from the event files ---------

SCALARS = (
    [f"diag/support_mismatch/{v}/{b}" for v in ("full", "partial", "target") for b in ("pos_0_256", "mean")]
    + ["diag/support_gap/pos_0_256"]
    + ["diag/shortcut/events_per_1k", "diag/shortcut/rollout_rate", "diag/shortcut/target_prob",
       "diag/early_answer_rate", "diag/shortcut/cumulative_events", "diag/shortcut/cumulative_events_per_1k"]
    + [f"diag/reliability/mismatch_ctx_q{q}" for q in range(1, 5)]
    + ["diag/reliability/spearman_ctx", "diag/privileged_shift", "diag/residual_clip_frac"]
    + ["val/toy/acc_len_0_256", "val/toy/count_len_0_256"]
)
IMAGES = ["fig/support_mismatch_vs_position", "fig/long_rollout_accuracy"]
HISTOGRAMS = ["hist/residual"]


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    from aropd.cli import main

    tmp = tmp_path_factory.mktemp("diag_fit")
    # The tiny model is close to uniform, so no sampled token meets the default shortcut thresholds
    # (q_F ≥ 0.5, ratio ≥ 20) in 4 steps; the run uses configs/diagnostics.yaml as it is except for
    # those two numbers (a later list replaces the whole list, so the override is the file, edited).
    cfg = yaml.safe_load((ROOT / "configs/diagnostics.yaml").read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ShortcutEvents"):
            cb["init_args"].update(delta=0.0, min_prob=0.0)
    loose = tmp / "diagnostics_loose.yaml"
    loose.write_text(yaml.safe_dump(cfg))
    old = Path.cwd()
    import os

    os.chdir(ROOT)
    try:
        cli = main([
            "fit", "--config", "configs/quickstart.yaml", "--config", "tests/conf/tiny.yaml",
            "--config", "configs/diagnostics.yaml",
            "--config", str(loose), "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
            "--trainer.default_root_dir", str(tmp), "--data.init_args.val_benchmarks", "[{name: toy, limit: 8}]",
        ])
    finally:
        os.chdir(old)
    return cli


def test_fit_writes_every_diagnostic_tag(fit_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(fit_run.trainer.log_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    missing = [t for t in SCALARS if t not in tags["scalars"]]
    assert not missing, missing
    for tag in tags["scalars"]:
        values = [e.value for e in acc.Scalars(tag)]
        assert all(math.isfinite(v) for v in values), tag
        if tag.startswith("diag/support_mismatch/"):
            assert all(0.0 <= v <= 1.0 for v in values), tag
        if tag.startswith("diag/"):  # written at every step, on Lightning's step numbers
            assert [e.step for e in acc.Scalars(tag)] == [e.step for e in acc.Scalars("train/loss")], tag
    assert set(IMAGES) <= set(tags["images"]), tags["images"]
    for tag in IMAGES:
        img = acc.Images(tag)[-1]
        assert img.width > 100 and img.height > 100
    assert set(HISTOGRAMS) <= set(tags["histograms"])
    hist = acc.Histograms("hist/residual")[-1].histogram_value
    assert hist.num > 0 and -5.0 - 1e-6 <= hist.min <= hist.max <= 5.0 + 1e-6  # clipped at c = 5
    if "matplotlib.pyplot" in sys.modules:  # no figure left open
        assert not sys.modules["matplotlib.pyplot"].get_fignums()


def test_fit_checkpoint_holds_the_cumulative_shortcut_counts(fit_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = fit_run.trainer.checkpoint_callback
    path = cb.best_model_path or cb.last_model_path
    if not path:  # wherever the configured checkpoint callback put it
        path = str(max(Path(fit_run.trainer.default_root_dir).rglob("*.ckpt"), key=lambda p: p.stat().st_mtime))
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    totals = ckpt["callbacks"]["ShortcutEvents"]["totals"]
    assert totals["rollouts"] == 4 * 8
    acc = EventAccumulator(fit_run.trainer.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    lengths = [e.value for e in acc.Scalars("train/completion_len")]
    assert totals["tokens"] == pytest.approx(8 * sum(lengths))
    assert totals["events"] == acc.Scalars("diag/shortcut/cumulative_events")[-1].value
    resumed = ShortcutEvents()
    resumed.load_state_dict(ckpt["callbacks"]["ShortcutEvents"])
    assert resumed.totals == totals


def test_fit_with_diagnostics_yaml_lays_out_tensorboard_and_validates_at_step_zero(fit_run):
    from test_layout import EXPECTED_CHARTS, matching, read_layout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    charts = read_layout(fit_run.trainer.log_dir)  # DiagnosticsLayout from configs/diagnostics.yaml
    for key, tags in EXPECTED_CHARTS.items():
        assert matching(charts[key]) == tags, key
    acc = EventAccumulator(fit_run.trainer.log_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/toy/accuracy")][0] == 0
    assert (Path(fit_run.trainer.log_dir) / "val" / "step_0" / "results.json").exists()
    # figure_every_n_steps: null: the figure comes with the validation after step 4 (the end adds
    # nothing: no tokens since)
    assert [e.step for e in acc.Images("fig/support_mismatch_vs_position")] == [4]
    assert [e.step for e in acc.Images("fig/long_rollout_accuracy")] == [0, 4]
