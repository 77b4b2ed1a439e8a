"""TeacherReliability's window survives a checkpoint: a resumed run logs what an uninterrupted one does."""

import pytest
import torch

from aropd.callbacks import TeacherReliability
from test_callbacks import Recorder, fake_trainer, record, step


def _records(n_steps, B=4, T=3):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_steps):
        L = torch.randint(1, 200, (B,), generator=g).float()
        mm = torch.stack([torch.rand(B, T, generator=g), torch.zeros(B, T), torch.zeros(B, T)])
        out.append(record(B=B, T=T, mismatch=mm, privileged_len=L, shift=torch.rand(B, T, generator=g)))
    return out


def test_resumed_reliability_equals_the_uninterrupted_one():
    recs = _records(6)
    whole_log = Recorder()
    whole, trainer = TeacherReliability(window=16), fake_trainer([whole_log])
    for r in recs:
        step(whole, trainer, r)

    first_log, second_log = Recorder(), Recorder()
    before, t1 = TeacherReliability(window=16), fake_trainer([first_log])
    for r in recs[:3]:
        step(before, t1, r)
    state = before.state_dict()  # what the checkpoint holds
    after = TeacherReliability(window=16)
    after.load_state_dict(state)
    t2 = fake_trainer([second_log])
    t2.global_step = 3
    for r in recs[3:]:
        step(after, t2, r)

    assert len(state["window"]) == 12  # 3 steps x 4 rollouts, all with tokens
    resumed = first_log.rows + second_log.rows
    assert [s for s, _ in resumed] == [s for s, _ in whole_log.rows]
    for (_, a), (_, b) in zip(whole_log.rows, resumed):
        assert a.keys() == b.keys()
        assert all(a[k] == pytest.approx(b[k], abs=1e-12) for k in a)
    # Without the state the quartiles of step 4 would see 4 rollouts, not 16: they differ.
    fresh, t3 = TeacherReliability(window=16), fake_trainer([Recorder()])
    t3.global_step = 3
    step(fresh, t3, recs[3])
    assert t3.loggers[0].last()["diag/reliability/mismatch_ctx_q1"] != whole_log.rows[3][1]["diag/reliability/mismatch_ctx_q1"]
