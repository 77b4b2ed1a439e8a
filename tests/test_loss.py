import functools
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from aropd.divergences import forward_kl, generalized_jsd, reverse_kl, sampled_token_kl
from aropd import diagnostics as D
from aropd.loss import Probes, _chunks, distillation_loss, sequence_weights, sft_loss
from aropd.targets import AnchoredResidual, FullView, PartialView
from aropd.types import TeacherScores
from loss_cases import loss_inputs

B, T, H, V = 3, 10, 8, 20
EVERY = Probes(sampled=True, shift=True, residual=True, support_top_p=0.9)


def _scores(teacher_h):
    return TeacherScores(full=teacher_h[:B], partial=teacher_h[B:])


def _setup(seed=0):
    _, student_h, teacher_h, s_head, t_head, ids = loss_inputs(B, T, H, V, seed)
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


# ---- the fused loss against the previous (autograd, checkpointed) implementation and a naive loop ----
#
# _reference_* is the loss as it was before the fused pass: each chunk under activation checkpointing,
# autograd through the output layer, the log-softmax and the divergence over the vocabulary.

_REF_DIVERGENCES = {
    "forward_kl": lambda t, s, y, beta: forward_kl(t, s),
    "reverse_kl": lambda t, s, y, beta: reverse_kl(t, s),
    "jsd": lambda t, s, y, beta: generalized_jsd(t, s, beta),
    "sampled_token": lambda t, s, y, beta: sampled_token_kl(t.gather(-1, y[..., None])[..., 0],
                                                            s.gather(-1, y[..., None])[..., 0]),
}


def _reference_chunked_token_loss(student_hidden, head, weights, per_position, chunk_size):
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for sl in _chunks(student_hidden.shape[1], chunk_size):

        def chunk_loss(h, sl=sl):
            lp = head(h).float().log_softmax(-1)
            per = per_position(lp, sl)
            w = weights[:, sl]
            return torch.where(w > 0, per * w, torch.zeros_like(per)).sum()

        h = student_hidden[:, sl]
        total = total + (checkpoint(chunk_loss, h, use_reentrant=False) if chunk_size else chunk_loss(h))
    return total


def _reference_distillation_loss(student_hidden, scores, student_head, teacher_head, completion_ids, completion_mask,
                                 target, divergence="forward_kl", jsd_beta=0.5, skip_tokens=0, chunk_size=256,
                                 probes=Probes()):
    loss_mask = completion_mask.clone()
    loss_mask[:, :skip_tokens] = 0
    div = functools.partial(_REF_DIVERGENCES[divergence], beta=jsd_beta)
    out, done = {}, set()

    def view_logprobs(hidden, sl):
        return None if hidden is None else teacher_head(hidden[:, sl]).float().log_softmax(-1)

    def per_position(s_lp, sl):
        y = completion_ids[:, sl]
        with torch.no_grad():
            f_lp, p_lp = view_logprobs(scores.full, sl), view_logprobs(scores.partial, sl)
            t = target(f_lp, p_lp, details=probes.residual)
        per = div(t.logprobs, s_lp, y)
        if probes.any and sl.start not in done:
            done.add(sl.start)
            with torch.no_grad():
                _reference_record_chunk(out, probes, s_lp.detach(), f_lp, p_lp, t, y)
        return per

    loss = _reference_chunked_token_loss(student_hidden, student_head, sequence_weights(loss_mask), per_position,
                                         chunk_size)
    return loss, {k: torch.cat(v, dim=-1) for k, v in out.items()}


def _reference_record_chunk(out, probes, s_lp, f_lp, p_lp, t, y):
    gather = lambda lp: lp.gather(-1, y[..., None])[..., 0]  # noqa: E731
    rows = {}
    if probes.sampled:
        rows.update(student_lp=gather(s_lp), full_lp=gather(f_lp), partial_lp=gather(p_lp), target_lp=gather(t.logprobs))
    if probes.shift:
        rows["shift"] = D.privileged_shift(f_lp, p_lp)
    if probes.residual and t.residual is not None:
        rows["residual"] = gather(t.residual).nan_to_num(0.0)
        rows["clip_frac"] = D.residual_clip_fraction(f_lp, t.clipped)
    if probes.support_top_p is not None:
        nucleus = D.nucleus_mask(s_lp, probes.support_top_p)
        rows["mismatch"] = torch.stack([D.mass_outside(lp, nucleus) for lp in (f_lp, p_lp, t.logprobs)])
    for k, v in rows.items():
        out.setdefault(k, []).append(v)


def _reference_sft_loss(student_hidden, head, target_ids, mask, chunk_size):
    return _reference_chunked_token_loss(
        student_hidden, head, sequence_weights(mask),
        lambda lp, sl: -lp.gather(-1, target_ids[:, sl, None])[..., 0], chunk_size)


ZERO = [1, 7, 13]  # vocabulary entries given zero mass; the sampled ids avoid them
DIVS = ["forward_kl", "reverse_kl", "jsd", "jsd0", "sampled_token"]


def _case(zero_mass: str, dtype: torch.dtype, bias: bool = False, seed: int = 1):
    """Student and teacher states and heads in ``dtype``; ``zero_mass``: none, view (the full view has
    zero mass on ZERO, the clipped target not) or target (both views, so the target too).

    Zero mass comes from the head: column 0 of the teacher's weight is -1e30 on ZERO (0 elsewhere), and
    a view whose states carry 1e10 there gets logits -1e40, i.e. -inf, on ZERO alone."""
    g = torch.Generator().manual_seed(seed)
    student_h = torch.randn(B, T, H, generator=g)
    teacher_h = torch.randn(2 * B, T, H, generator=g)
    teacher_h[..., 0] = 0.0
    s_head = torch.nn.Linear(H, V, bias=bias)
    t_head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    with torch.no_grad():
        for p in (s_head.weight, t_head.weight):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))  # logits of std ~1.4, as a trained model's
        if bias:
            s_head.bias.copy_(torch.randn(V, generator=g))
        t_head.weight[:, 0] = 0.0
        t_head.weight[ZERO, 0] = -1e30
    if zero_mass in ("view", "target"):
        teacher_h[:B, 2:6, 0] = 1e10  # the full view
    if zero_mass == "target":
        teacher_h[B:, 2:6, 0] = 1e10  # and the partial view
    ids = torch.randint(0, V, (B, T), generator=g)
    ids = torch.where(torch.isin(ids, torch.tensor(ZERO)), ids + 1, ids)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, :] = 0
    return student_h.to(dtype), teacher_h.to(dtype), s_head.to(dtype), t_head.to(dtype), ids, mask


def _loss_and_grads(fn, student_h, teacher_h, s_head, t_head, ids, mask, divergence, skip, chunk, target, probes):
    student_h = student_h.detach().clone().requires_grad_(True)
    s_head = _clone_head(s_head)
    beta = 0.0 if divergence == "jsd0" else 0.5
    loss, rec = fn(student_h, _scores(teacher_h), s_head, t_head, ids, mask, target,
                   divergence="jsd" if divergence == "jsd0" else divergence, jsd_beta=beta, skip_tokens=skip,
                   chunk_size=chunk, probes=probes)
    loss.backward()
    grads = {"hidden": student_h.grad, "weight": s_head.weight.grad}
    if s_head.bias is not None:
        grads["bias"] = s_head.bias.grad
    return loss.detach(), grads, rec


def _clone_head(head):
    new = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None).to(head.weight.dtype)
    new.load_state_dict(head.state_dict())
    return new


def _naive(student_h, teacher_h, s_head, t_head, ids, mask, divergence, skip, target):
    """Position by position, autograd, no chunks, no weights: the mean over tokens, then over sequences."""
    student_h = student_h.detach().clone().requires_grad_(True)
    s_head = _clone_head(s_head)
    beta = 0.0 if divergence == "jsd0" else 0.5
    fns = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": lambda t, s: generalized_jsd(t, s, beta)}
    fns["jsd0"] = fns["jsd"]
    seqs = []
    for b in range(B):
        tok = []
        for t in range(skip, T):
            if not mask[b, t]:
                continue
            s_lp = s_head(student_h[b, t]).float().log_softmax(-1)
            f_lp = t_head(teacher_h[b, t]).float().log_softmax(-1)
            p_lp = t_head(teacher_h[B + b, t]).float().log_softmax(-1)
            tgt = target(f_lp, p_lp).logprobs
            y = ids[b, t]
            if divergence == "sampled_token":
                tok.append(sampled_token_kl(tgt[y], s_lp[y]))
            elif divergence == "sft":
                tok.append(-s_lp[y])
            else:
                tok.append(fns[divergence](tgt, s_lp))
        if tok:
            seqs.append(torch.stack(tok).mean())
    loss = torch.stack(seqs).mean()
    loss.backward()
    grads = {"hidden": student_h.grad, "weight": s_head.weight.grad}
    if s_head.bias is not None:
        grads["bias"] = s_head.bias.grad
    return loss.detach(), grads


def _close(got, ref, rel):
    """``|got − ref| ≤ rel · max |ref|`` elementwise: relative to the tensor's scale."""
    got, ref = got.float(), ref.float()
    scale = ref.abs().max().clamp(min=1e-30)
    err = (got - ref).abs().max()
    assert err <= rel * scale, f"max |Δ| {err:.3g} > {rel:g} · {scale:.3g}"


def _fused_vs_reference_and_naive(divergence, zero_mass, chunk, skip=0, bias=False):
    case = _case(zero_mass, torch.float32, bias)
    target = AnchoredResidual(lam=0.8, clip=0.5)
    loss, grads, rec = _loss_and_grads(distillation_loss, *case, divergence, skip, chunk, target, EVERY)
    ref_loss, ref_grads, ref_rec = _loss_and_grads(_reference_distillation_loss, *case, divergence, skip, chunk,
                                                   target, EVERY)
    naive_loss, naive_grads = _naive(*case, divergence, skip, target)
    for other, other_grads in ((ref_loss, ref_grads), (naive_loss, naive_grads)):
        assert loss.item() == pytest.approx(other.item(), rel=1e-6)
        for k in grads:
            _close(grads[k], other_grads[k], 1e-5)
    assert grads["hidden"].abs().sum() > 0 and torch.isfinite(grads["weight"]).all()
    assert rec.keys() == ref_rec.keys() and len(rec) == 8
    for k in rec:
        assert torch.equal(rec[k].isnan(), ref_rec[k].isnan()), k
        torch.testing.assert_close(rec[k], ref_rec[k], rtol=0, atol=1e-6, equal_nan=True)


# Reverse KL toward a target with zero mass where the student has some is infinite (tested below).
@pytest.mark.parametrize("chunk", [1, 7, None])
@pytest.mark.parametrize("divergence, zero_mass", [(d, z) for d in DIVS for z in ("none", "view", "target")
                                                   if (d, z) != ("reverse_kl", "target")])
def test_fused_loss_and_gradients_equal_the_previous_implementation_and_a_naive_loop(divergence, zero_mass, chunk):
    _fused_vs_reference_and_naive(divergence, zero_mass, chunk)


@pytest.mark.parametrize("divergence", DIVS)
def test_fused_loss_with_skipped_tokens_and_a_biased_head(divergence):
    _fused_vs_reference_and_naive(divergence, "view", 7, skip=2, bias=True)


@pytest.mark.parametrize("chunk", [1, 7, None])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_sft_loss_equals_the_previous_implementation_and_a_naive_loop(chunk, bias):
    student_h, _, s_head, _, ids, mask = _case("none", torch.float32, bias)
    runs = []
    for fn in (sft_loss, _reference_sft_loss):
        h, head = student_h.clone().requires_grad_(True), _clone_head(s_head)
        loss = fn(h, head, ids, mask, chunk)
        loss.backward()
        runs.append((loss.detach(), {"hidden": h.grad, "weight": head.weight.grad,
                                     "bias": None if head.bias is None else head.bias.grad}))
    naive_loss, naive_grads = _naive(*_case("none", torch.float32, bias), "sft", 0, FullView())
    (loss, grads), (ref_loss, ref_grads) = runs
    for other, other_grads in ((ref_loss, ref_grads), (naive_loss, naive_grads)):
        assert loss.item() == pytest.approx(other.item(), rel=1e-6)
        for k in naive_grads:
            _close(grads[k], other_grads[k], 1e-5)


def test_reverse_kl_toward_a_target_with_zero_mass_is_infinite_in_both_implementations():
    case = _case("target", torch.float32)
    target = AnchoredResidual(lam=0.8, clip=0.5)
    for fn in (distillation_loss, _reference_distillation_loss):
        h = case[0].clone().requires_grad_(True)
        loss, _ = fn(h, _scores(case[1]), case[2], case[3], case[4], case[5], target, divergence="reverse_kl")
        assert loss.item() == math.inf


def test_non_finite_terms_at_masked_positions_leave_no_trace():
    """Reverse KL toward a target with zero mass only where the mask is 0: the loss and gradients are
    those of the unmasked positions, finite (the previous implementation's gradients were NaN here)."""
    student_h, teacher_h, s_head, t_head, ids, mask = _case("none", torch.float32)
    teacher_h[:, :, 0] = torch.where(mask.repeat(2, 1) > 0, 0.0, 1e10)  # both views, masked positions only
    target = AnchoredResidual(lam=0.8, clip=0.5)
    loss, grads, _ = _loss_and_grads(distillation_loss, student_h, teacher_h, s_head, t_head, ids, mask,
                                     "reverse_kl", 0, 7, target, Probes())
    naive_loss, naive_grads = _naive(student_h, teacher_h, s_head, t_head, ids, mask, "reverse_kl", 0, target)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(naive_loss.item(), rel=1e-6)
    for k in grads:
        assert torch.isfinite(grads[k]).all()
        _close(grads[k], naive_grads[k], 1e-5)


# bf16: the rounding of states and weights to bf16 is common to both sides (the fp32 reference runs on
# the bf16 values themselves), so what differs is bf16 arithmetic. The logits come out of the matrix
# product rounded to bf16 (8 significant bits: ≤ 2^-9 relative, ~0.01 nats at |z| ≈ 5); the loss, a sum
# over many such rounded entries, moves by a fraction of that (≤ 1.4e-3 relative seen), so 5e-3. The
# logit gradient is rounded to bf16 before the two products and their outputs again (2^-9 each) on top
# of log-probs off by ~0.01 nats, so each gradient is off by ~1 % of its largest entry (≤ 2.1e-2 seen),
# so 5e-2. Against the previous implementation in bf16, the value and the hidden states' gradient are
# the same computation; the weight's and bias's gradients differ in where they round (the previous one
# summed them over chunks in bf16, the fused pass sums in fp32: ≤ 7.4e-3 seen), so 2e-2.
@pytest.mark.parametrize("chunk", [1, 7, None])
@pytest.mark.parametrize("divergence", DIVS)
def test_bf16_fused_loss_is_close_to_the_fp32_one(divergence, chunk):
    case16 = _case("view", torch.bfloat16, bias=True)
    case32 = [x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in case16]
    case32[2], case32[3] = _clone_head(case16[2]).float(), _clone_head(case16[3]).float()
    target = AnchoredResidual(lam=0.8, clip=0.5)
    loss, grads, _ = _loss_and_grads(distillation_loss, *case16, divergence, 2, chunk, target, Probes())
    ref_loss, ref_grads, _ = _loss_and_grads(distillation_loss, *case32, divergence, 2, chunk, target, Probes())
    old_loss, old_grads, _ = _loss_and_grads(_reference_distillation_loss, *case16, divergence, 2, chunk, target,
                                             Probes())
    assert all(g.dtype == torch.bfloat16 for g in grads.values())
    assert loss.item() == pytest.approx(ref_loss.item(), rel=5e-3)
    assert loss.item() == pytest.approx(old_loss.item(), rel=1e-6)
    for k in grads:
        _close(grads[k], ref_grads[k], 5e-2)
        _close(grads[k], old_grads[k], 2e-2)


def test_the_sharded_path_equals_the_fused_one():
    """A head that is not a plain nn.Linear (as FSDP2 makes it) goes through its own forward, each chunk
    checkpointed, with the same closed-form logit gradient."""

    class Wrapped(torch.nn.Linear):
        pass

    case = _case("view", torch.float32, bias=True)
    target = AnchoredResidual(lam=0.8, clip=0.5)
    fused = _loss_and_grads(distillation_loss, *case, "jsd", 1, 3, target, EVERY)
    head = Wrapped(H, V).requires_grad_(True)
    head.load_state_dict(case[2].state_dict())
    h = case[0].clone().requires_grad_(True)
    calls = []
    head.register_forward_hook(lambda *a: calls.append(1))
    loss, rec = distillation_loss(h, _scores(case[1]), head, case[3], case[4], case[5], target, divergence="jsd",
                                  skip_tokens=1, chunk_size=3, probes=EVERY)
    loss.backward()
    assert len(calls) == 2 * 4  # 4 chunks, each recomputed in backward
    assert loss.item() == pytest.approx(fused[0].item(), rel=1e-6)
    for k, g in (("hidden", h.grad), ("weight", head.weight.grad), ("bias", head.bias.grad)):
        _close(g, fused[1][k], 1e-5)
    for k in rec:
        torch.testing.assert_close(rec[k], fused[2][k], rtol=0, atol=1e-6, equal_nan=True)


def test_without_grad_the_fused_loss_is_the_same_and_builds_no_graph():
    case = _case("view", torch.float32)
    target = AnchoredResidual(lam=0.8, clip=0.5)
    loss, *_ = _loss_and_grads(distillation_loss, *case, "forward_kl", 0, 7, target, Probes())
    with torch.no_grad():
        again, _ = distillation_loss(case[0], _scores(case[1]), case[2], case[3], case[4], case[5], target,
                                     chunk_size=7)
    assert again.item() == loss.item() and again.grad_fn is None


def test_fused_loss_scales_with_the_incoming_gradient_and_has_one_backward():
    case = _case("none", torch.float32)
    runs = []
    for scale in (1.0, 0.25):
        h = case[0].clone().requires_grad_(True)
        loss, _ = distillation_loss(h, _scores(case[1]), case[2], case[3], case[4], case[5], PartialView())
        (scale * loss).backward(retain_graph=True)
        runs.append(h.grad)
        with pytest.raises(RuntimeError, match="first backward"):
            loss.backward()
    torch.testing.assert_close(runs[1], 0.25 * runs[0])


def test_fp16_gradients_wait_for_the_loss_scale_in_fp32():
    """Under fp16 mixed precision the loss is multiplied by a scale so that small gradients survive fp16;
    the fused pass makes its gradients before it sees the scale, so it holds them in fp32 until then."""
    from aropd.divergences import cross_entropy_with_grad
    from aropd.loss import token_loss

    student_h, _, s_head, _, ids, mask = _case("none", torch.float32, bias=True)
    weights = 1e-9 * mask.float()  # gradients of ~1e-9: below fp16's smallest subnormal (6e-8)
    scale = 2.0**24
    grads = {}
    for dtype in (torch.float32, torch.float16):
        h, head = student_h.to(dtype).detach().requires_grad_(True), _clone_head(s_head).to(dtype)
        loss = token_loss(h, head, weights, lambda lp, sl, grad: cross_entropy_with_grad(lp, ids[:, sl], grad), 7)
        (scale * loss).backward()
        grads[dtype] = {"hidden": h.grad, "weight": head.weight.grad, "bias": head.bias.grad}
        assert all(g.dtype == dtype for g in grads[dtype].values())
    for k, g in grads[torch.float16].items():
        assert g.abs().max() > 0, k
        _close(g, grads[torch.float32][k], 2e-2)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_under_bf16_autocast_the_fused_loss_is_the_previous_one(divergence):
    """fp32 states and weights under autocast: the logits and the gradient products in bf16, as autograd
    runs the previous path's output layer; the gradients come back fp32. Tolerances as for bf16 above."""
    case = _case("view", torch.float32, bias=True)
    target = AnchoredResidual(lam=0.8, clip=0.5)
    runs = []
    for fn in (distillation_loss, _reference_distillation_loss):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs.append(_loss_and_grads(fn, *case, divergence, 0, 7, target, Probes()))
    (loss, grads, _), (old_loss, old_grads, _) = runs
    assert loss.item() == pytest.approx(old_loss.item(), rel=1e-6)
    for k in grads:
        assert grads[k].dtype == torch.float32
        _close(grads[k], old_grads[k], 2e-2)
