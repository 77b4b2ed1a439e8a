import pytest
import torch

from aropd.divergences import forward_kl, generalized_jsd, reverse_kl, sampled_token_kl
from aropd.loss import Probes, distillation_loss, sequence_weights, sft_loss
from aropd.targets import AnchoredResidual
from aropd.types import TeacherScores

B, T, H, V = 3, 10, 8, 20
EVERY = Probes(sampled=True, shift=True, residual=True, support_top_p=0.9)


def _scores(teacher_h):
    return TeacherScores(full=teacher_h[:B], partial=teacher_h[B:])


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student_h = torch.randn(B, T, H, generator=g)
    teacher_h = torch.randn(2 * B, T, H, generator=g)
    s_head, t_head = torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False)
    t_head.requires_grad_(False)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # short completion
    mask[2, :] = 0  # an all-padding row carries no loss
    return student_h, teacher_h, s_head, t_head, ids, mask


def _run(chunk, divergence="forward_kl", skip=0, seed=0):
    student_h, teacher_h, s_head, t_head, ids, mask = _setup(seed)
    student_h.requires_grad_(True)
    loss, rec = distillation_loss(
        student_h, _scores(teacher_h), s_head, t_head, ids, mask, AnchoredResidual(lam=0.8, clip=0.5),
        divergence=divergence, skip_tokens=skip, chunk_size=chunk, probes=EVERY,
    )
    loss.backward()
    return loss.detach(), student_h.grad, s_head.weight.grad, rec


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "sampled_token"])
def test_chunked_loss_and_gradient_equal_unchunked(divergence):
    l0, gh0, gw0, r0 = _run(None, divergence)
    l1, gh1, gw1, r1 = _run(3, divergence)
    assert torch.allclose(l0, l1, atol=1e-6)
    assert torch.allclose(gh0, gh1, atol=1e-6) and torch.allclose(gw0, gw1, atol=1e-6)
    assert gh0.abs().sum() > 0
    for k in r0:
        assert torch.allclose(r0[k], r1[k], atol=1e-6), k
        assert r1[k].shape[-2:] == (B, T)


def _naive_loss(divergence, skip=0):
    student_h, teacher_h, s_head, t_head, ids, mask = _setup()
    fns = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": lambda t, s: generalized_jsd(t, s, 0.5)}
    seq_losses = []
    for b in range(B):
        tok = []
        for t in range(skip, T):
            if not mask[b, t]:
                continue
            s_lp = s_head(student_h[b, t]).log_softmax(-1)
            f_lp = t_head(teacher_h[b, t]).log_softmax(-1)
            p_lp = t_head(teacher_h[B + b, t]).log_softmax(-1)
            r = (f_lp - p_lp).clamp(-0.5, 0.5)
            tgt = (p_lp + 0.8 * r).log_softmax(-1)
            if divergence == "sampled_token":
                tok.append(sampled_token_kl(tgt[ids[b, t]], s_lp[ids[b, t]]))
            else:
                tok.append(fns[divergence](tgt, s_lp))
        if tok:
            seq_losses.append(torch.stack(tok).mean())
    return torch.stack(seq_losses).mean()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "sampled_token"])
@pytest.mark.parametrize("skip", [0, 2])
def test_loss_is_token_mean_per_sequence_then_mean_over_sequences(divergence, skip):
    loss, *_ = _run(4, divergence, skip)
    assert loss.item() == pytest.approx(_naive_loss(divergence, skip).item(), abs=1e-5)


def test_record_holds_sampled_token_logprobs_and_kl():
    _, _, _, rec = _run(4)
    student_h, teacher_h, s_head, t_head, ids, mask = _setup()
    b, t = 1, 2
    f_lp = t_head(teacher_h[b, t]).log_softmax(-1)
    p_lp = t_head(teacher_h[B + b, t]).log_softmax(-1)
    s_lp = s_head(student_h[b, t]).log_softmax(-1).detach()
    y = ids[b, t]
    assert rec["full_lp"][b, t].item() == pytest.approx(f_lp[y].item(), abs=1e-6)
    assert rec["partial_lp"][b, t].item() == pytest.approx(p_lp[y].item(), abs=1e-6)
    assert rec["student_lp"][b, t].item() == pytest.approx(s_lp[y].item(), abs=1e-6)
    assert rec["shift"][b, t].item() == pytest.approx(forward_kl(f_lp, p_lp).item(), abs=1e-6)
    assert rec["residual"][b, t].item() == pytest.approx((f_lp - p_lp).clamp(-0.5, 0.5)[y].item(), abs=1e-6)
    r = f_lp - p_lp
    assert rec["clip_frac"][b, t].item() == pytest.approx((f_lp.exp() * (r.abs() > 0.5)).sum().item(), abs=1e-6)
    assert rec["mismatch"].shape == (3, B, T) and ((rec["mismatch"] >= 0) & (rec["mismatch"] <= 1)).all()


def test_no_probes_record_nothing_and_leave_the_loss_unchanged():
    loss_all, *_, rec_all = _run(4)
    student_h, teacher_h, s_head, t_head, ids, mask = _setup()
    loss, rec = distillation_loss(student_h, _scores(teacher_h), s_head, t_head, ids, mask,
                                  AnchoredResidual(lam=0.8, clip=0.5), chunk_size=4)
    assert rec == {} and len(rec_all) == 8
    assert loss.item() == loss_all.item()


def test_missing_view_is_an_error_naming_it():
    student_h, teacher_h, s_head, t_head, ids, mask = _setup()
    with pytest.raises(ValueError, match=r"\['partial'\]"):
        distillation_loss(student_h, TeacherScores(full=teacher_h[:B]), s_head, t_head, ids, mask, AnchoredResidual())


def test_no_loss_tokens_gives_zero_loss_without_nan():
    student_h, teacher_h, s_head, t_head, ids, _ = _setup()
    student_h.requires_grad_(True)
    mask = torch.zeros(B, T, dtype=torch.long)
    loss, _ = distillation_loss(student_h, _scores(teacher_h), s_head, t_head, ids, mask, AnchoredResidual(), chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0 and not student_h.grad.isnan().any() and student_h.grad.abs().sum() == 0


def test_sequence_weights_average_per_sequence_then_over_valid_sequences():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    w = sequence_weights(mask)
    assert w.tolist() == [[0.25, 0.25, 0, 0], [0.125] * 4, [0, 0, 0, 0]]


def test_sft_loss_is_cross_entropy_on_reference_tokens():
    student_h, _, s_head, _, ids, mask = _setup()
    loss = sft_loss(student_h, s_head, ids, mask, chunk_size=3)
    naive = []
    for b in range(2):  # row 2 is empty
        n = int(mask[b].sum())
        naive.append(torch.nn.functional.cross_entropy(s_head(student_h[b, :n]), ids[b, :n]))
    assert loss.item() == pytest.approx(torch.stack(naive).mean().item(), abs=1e-5)
