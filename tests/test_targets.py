import math

import pytest
import torch

from aropd.targets import anchored_residual_target


def _views(shape=(3, 5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(*shape, generator=g) * 3).log_softmax(-1)
    partial = (torch.randn(*shape, generator=g) * 3).log_softmax(-1)
    return full, partial


def test_lambda_zero_is_partial_view_exactly():
    full, partial = _views()
    assert torch.equal(anchored_residual_target(full, partial, 0.0, 5.0), partial)


def test_lambda_one_without_clip_is_full_view_exactly():
    full, partial = _views()
    assert torch.equal(anchored_residual_target(full, partial, 1.0, None), full)
    assert torch.equal(anchored_residual_target(full, partial, 1.0, math.inf), full)


def test_matches_naive_per_entry_formula_and_is_normalized():
    full, partial = _views((2, 4))
    lam, clip = 0.8, 0.7
    out = anchored_residual_target(full, partial, lam, clip)
    for i in range(2):
        logits = []
        for v in range(4):
            r = max(-clip, min(clip, float(full[i, v] - partial[i, v])))
            logits.append(float(partial[i, v]) + lam * r)
        z = math.log(sum(math.exp(x) for x in logits))
        assert out[i].tolist() == pytest.approx([x - z for x in logits], abs=1e-6)
    assert torch.allclose(out.exp().sum(-1), torch.ones(2))


def test_clip_binds_exactly_where_residual_exceeds_c():
    # Hand-built: residuals (F - P) per entry = [+3, -0.5, 0]; with c = 1 only the first is clipped.
    partial = torch.tensor([[-2.0, -1.0, -1.5]]).log_softmax(-1)
    full = partial + torch.tensor([[3.0, -0.5, 0.0]])
    clipped = anchored_residual_target(full, partial, 1.0, 1.0)
    expected = (partial + torch.tensor([[1.0, -0.5, 0.0]])).log_softmax(-1)
    assert torch.allclose(clipped, expected, atol=1e-6)
    # With a clip that never binds, λ = 1 is the full view (normalized).
    assert torch.allclose(anchored_residual_target(full, partial, 1.0, 10.0), full.log_softmax(-1), atol=1e-6)


def test_extrapolation_beyond_full_view_and_fp32_output():
    full, partial = _views((4, 6))
    out = anchored_residual_target(full.to(torch.bfloat16), partial.to(torch.bfloat16), 1.2, None)
    assert out.dtype == torch.float32
    f, p = full.to(torch.bfloat16).float(), partial.to(torch.bfloat16).float()
    assert torch.allclose(out, (p + 1.2 * (f - p)).log_softmax(-1), atol=1e-5)


def test_zero_mass_in_both_views_stays_zero_without_nan():
    full = torch.tensor([[0.0, -math.inf]])
    partial = torch.tensor([[0.0, -math.inf]])
    out = anchored_residual_target(full, partial, 0.8, 5.0)
    assert not out.isnan().any() and out[0, 1] == -math.inf and out[0, 0] == 0


@pytest.mark.parametrize("lam,clip,option", [(-0.1, 5.0, "lam"), (0.5, 0.0, "clip"), (0.5, -1.0, "clip")])
def test_bad_lam_or_clip_raises_naming_the_option(lam, clip, option):
    full, partial = _views()
    with pytest.raises(ValueError, match=option):
        anchored_residual_target(full, partial, lam, clip)


def test_single_view_targets_equal_the_anchored_endpoints_bit_for_bit():
    from aropd.targets import FullView, PartialView

    g = torch.Generator().manual_seed(3)
    full, partial = (torch.randn(2, 5, 11, generator=g).log_softmax(-1) for _ in range(2))
    assert torch.equal(FullView()(full, None).logprobs, anchored_residual_target(full, partial, 1.0, None))
    assert torch.equal(PartialView()(None, partial).logprobs, anchored_residual_target(full, partial, 0.0, 5.0))


def test_anchored_residual_reports_its_clipped_residual_and_clip_mask():
    """The residual and clip mask the diagnostics read are the ones the target applied, worked by hand."""
    from aropd.targets import AnchoredResidual

    full = torch.tensor([[0.0, -1.0, -7.0, float("-inf")]])
    partial = torch.tensor([[-3.0, -1.5, -0.5, float("-inf")]])
    out = AnchoredResidual(lam=0.5, clip=2.0)(full, partial, details=True)
    # ℓ_F − ℓ_P = [3, 0.5, -6.5, nan]: clipped to [2, 0.5, -2, ·]; only the first and third were clipped.
    assert out.residual[0, :3].tolist() == [2.0, 0.5, -2.0]
    assert out.clipped.tolist() == [[True, False, True, False]]
    logits = torch.tensor([-3.0 + 0.5 * 2.0, -1.5 + 0.5 * 0.5, -0.5 + 0.5 * -2.0, float("-inf")])
    assert torch.allclose(out.logprobs[0], logits.log_softmax(-1))
    assert AnchoredResidual(lam=1.0, clip=None)(full, partial, details=True).clipped is None
