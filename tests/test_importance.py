"""The trainer–sampler gap and truncated importance weights of the distillation loss (no vLLM needed)."""

import pytest
import torch

from aropd.divergences import forward_kl
from aropd.loss import distillation_loss
from aropd.targets import AnchoredResidual
from aropd.types import TeacherScores
from loss_cases import loss_inputs

B, T, H, V = 3, 9, 8, 20
CAP = 1.5


def _case():
    g, student_h, teacher_h, s_head, t_head, ids = loss_inputs(B, T, H, V, seed=3)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        s_y = s_head(student_h).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    # The sampler's log-probs: the student's, off by up to ±1 nat, so some ratios exceed the cap.
    rollout_lp = (s_y + 2 * torch.rand(B, T, generator=g) - 1) * mask
    return student_h, teacher_h, s_head, t_head, ids, mask, rollout_lp


def _naive(student_h, teacher_h, s_head, t_head, ids, mask, rollout_lp, cap):
    """Position by position: the forward KL to the AR target, times min(π_θ/π_rollout, cap) held constant."""
    seq = []
    for b in range(B):
        tok = []
        for t in range(T):
            if not mask[b, t]:
                continue
            s_lp = s_head(student_h[b, t]).log_softmax(-1)
            f_lp = t_head(teacher_h[b, t]).log_softmax(-1)
            p_lp = t_head(teacher_h[B + b, t]).log_softmax(-1)
            tgt = (p_lp + 0.8 * (f_lp - p_lp).clamp(-0.5, 0.5)).log_softmax(-1)
            w = 1.0 if cap is None else min(float(torch.exp(s_lp[ids[b, t]].detach() - rollout_lp[b, t])), cap)
            tok.append(w * forward_kl(tgt, s_lp))
        seq.append(torch.stack(tok).mean())
    return torch.stack(seq).mean()


def _grads(fn, case):
    student_h, teacher_h, s_head, t_head, ids, mask, rollout_lp = case
    h = student_h.clone().requires_grad_(True)
    s_head.weight.grad = None
    out = fn(h, teacher_h, s_head, t_head, ids, mask, rollout_lp)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach(), h.grad, s_head.weight.grad.clone(), out


@pytest.mark.parametrize("chunk", [None, 4])
def test_truncated_importance_weights_equal_a_naive_loop(chunk):
    case = _case()
    fused = lambda h, th, sh, tt, ids, m, lp: distillation_loss(  # noqa: E731
        h, TeacherScores(full=th[:B], partial=th[B:]), sh, tt, ids, m, AnchoredResidual(lam=0.8, clip=0.5),
        chunk_size=chunk, rollout_logprobs=lp, importance_cap=CAP)
    naive = lambda *a: _naive(*a, cap=CAP)  # noqa: E731
    l0, gh0, gw0, (_, rec) = _grads(fused, case)
    l1, gh1, gw1, _ = _grads(naive, case)
    assert torch.allclose(l0, l1, atol=1e-6) and torch.allclose(gh0, gh1, atol=1e-6) and torch.allclose(gw0, gw1, atol=1e-6)
    # The cap binds somewhere and not everywhere, so the test covers both branches of the min.
    s_y = case[2](case[0]).log_softmax(-1).gather(-1, case[4][..., None]).squeeze(-1).detach()
    ratio = (s_y - case[6]).exp()[case[5].bool()]
    assert (ratio > CAP).any() and (ratio < CAP).any()
    # The gap is |log π_θ − log π_rollout| at every position (masking is the caller's).
    assert torch.allclose(rec["rollout_gap"], (s_y - case[6]).abs(), atol=1e-6)
    # Uncorrected, the same loss is a different number: the weights did something.
    l2, *_ = _grads(lambda *a: _naive(*a, cap=None), case)
    assert not torch.allclose(l0, l2, atol=1e-4)


def test_the_gap_alone_leaves_the_loss_as_it_was():
    student_h, teacher_h, s_head, t_head, ids, mask, rollout_lp = _case()
    args = (student_h, TeacherScores(full=teacher_h[:B], partial=teacher_h[B:]), s_head, t_head, ids, mask,
            AnchoredResidual(lam=0.8, clip=0.5))
    with torch.no_grad():
        plain, rec0 = distillation_loss(*args, chunk_size=4)
        with_gap, rec1 = distillation_loss(*args, chunk_size=4, rollout_logprobs=rollout_lp)
    assert torch.equal(plain, with_gap) and "rollout_gap" not in rec0 and rec1["rollout_gap"].shape == (B, T)


def test_importance_cap_without_rollout_logprobs_is_an_error():
    student_h, teacher_h, s_head, t_head, ids, mask, _ = _case()
    with pytest.raises(ValueError, match="importance_cap"):
        distillation_loss(student_h, TeacherScores(full=teacher_h[:B], partial=teacher_h[B:]), s_head, t_head, ids,
                          mask, AnchoredResidual(), importance_cap=2.0)


def test_importance_cap_option_is_checked_before_any_model_loads(tiny_path):
    from aropd.module import PrivilegedDistillation

    with pytest.raises(ValueError, match="importance_cap must be a finite number > 0"):
        PrivilegedDistillation(student=tiny_path, importance_cap=0.0)
    with pytest.raises(ValueError, match="importance_cap: the engine LeanDecode does not keep"):
        PrivilegedDistillation(student=tiny_path, importance_cap=2.0)
