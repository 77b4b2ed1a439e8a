"""Pure diagnostic functions (docs/diagnostics.md) against values worked out by hand on small tensors."""

import math

import pytest
import torch

from aropd import diagnostics as D


def lp(*probs) -> torch.Tensor:
    """Log-probs of a distribution given by its probabilities (zeros become -inf)."""
    return torch.tensor(probs, dtype=torch.float32).log()


# ---- nucleus / support mismatch -------------------------------------------------------------------


def test_nucleus_keeps_the_token_that_crosses_p():
    # Sorted 0.5, 0.3, 0.15, 0.05: mass before each is 0, 0.5, 0.8, 0.95 -> the first three are in.
    student = lp(0.15, 0.5, 0.05, 0.3)
    assert D.nucleus_mask(student, 0.9).tolist() == [True, True, False, True]
    # p = 0.5: mass before the second is 0.5, not below 0.5 -> only the top token.
    assert D.nucleus_mask(student, 0.5).tolist() == [False, True, False, False]
    # The most likely token is always in, however small p is.
    assert D.nucleus_mask(student, 1e-6).tolist() == [False, True, False, False]


def test_nucleus_boundary_mass_before_equal_to_p_is_out():
    # 0.5, 0.4, 0.1: mass before the last is 0.9 = p, so it is out (top-p keeps 0.5 + 0.4).
    assert D.nucleus_mask(lp(0.5, 0.4, 0.1), 0.9).tolist() == [True, True, False]


def test_support_mismatch_hand_worked():
    student = lp(0.15, 0.5, 0.05, 0.3)  # nucleus {0, 1, 3}
    view = lp(0.1, 0.2, 0.6, 0.1)  # mass outside = q(2) = 0.6
    assert D.support_mismatch(view, student).item() == pytest.approx(0.6)


def test_support_mismatch_all_mass_inside_is_zero():
    student = lp(0.15, 0.5, 0.05, 0.3)
    view = lp(0.25, 0.25, 0.0, 0.5)
    assert D.support_mismatch(view, student).item() == pytest.approx(0.0, abs=1e-7)
    # The student against itself with p = 1: its nucleus is everything it puts mass on.
    assert D.support_mismatch(student, student, top_p=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_support_mismatch_one_hot_view_outside_is_one():
    student = lp(0.15, 0.5, 0.05, 0.3)
    assert D.support_mismatch(lp(0.0, 0.0, 1.0, 0.0), student).item() == pytest.approx(1.0)
    # ... and a one-hot view on the top token is fully inside.
    assert D.support_mismatch(lp(0.0, 1.0, 0.0, 0.0), student).item() == pytest.approx(0.0)


def test_support_mismatch_batched_shapes_and_broadcast_views():
    student = torch.randn(2, 5, 11).log_softmax(-1)
    views = torch.randn(3, 2, 5, 11).log_softmax(-1)
    m = D.support_mismatch(views, student)
    assert m.shape == (3, 2, 5) and ((m >= 0) & (m <= 1)).all()
    for i in range(3):  # broadcasting one nucleus over the views = each view on its own
        torch.testing.assert_close(m[i], D.support_mismatch(views[i], student))
    # No positions at all: an empty result, not NaN.
    assert D.support_mismatch(views[:, :, :0], student[:, :0]).shape == (3, 2, 0)


# ---- shortcut events --------------------------------------------------------------------------------


def test_shortcut_events_thresholds_are_inclusive_at_the_boundary():
    # q_F = 0.5 and q_F / q_P = 20 exactly: on both boundaries -> an event.
    f, p = lp(0.5), lp(0.025)
    assert D.shortcut_events(f, p).tolist() == [True]
    # Just below either threshold -> not.
    assert D.shortcut_events(lp(0.499), lp(0.499 / 20)).tolist() == [False]  # q_F < 0.5
    assert D.shortcut_events(lp(0.5), lp(0.5 / 19.9)).tolist() == [False]  # ratio < 20
    # Well inside -> an event; a token the partial view also likes -> not.
    assert D.shortcut_events(lp(0.9), lp(0.001)).tolist() == [True]
    assert D.shortcut_events(lp(0.9), lp(0.8)).tolist() == [False]


def test_shortcut_events_custom_thresholds_elementwise():
    f = lp(0.9, 0.3, 0.6, 1.0)
    p = lp(0.3, 0.01, 0.6, 0.0)  # ratios 3, 30, 1, inf
    assert D.shortcut_events(f, p, delta=math.log(3), min_prob=0.3).tolist() == [True, True, False, True]
    assert D.shortcut_events(f, p).tolist() == [False, False, False, True]
    # min_prob 0: any token whose ratio is high enough; q_F = q_P = 0 is NaN - NaN, not an event.
    assert D.shortcut_events(lp(0.0, 0.01, 0.0), lp(0.0, 0.0001, 0.5), delta=0.0, min_prob=0.0).tolist() == [False, True, False]
    # float64 input is compared in float64.
    assert D.shortcut_events(f.double(), p.double(), delta=math.log(30), min_prob=0.3).tolist() == [False, True, False, True]


# ---- privileged shift, clip fraction ----------------------------------------------------------------


def test_privileged_shift_is_kl_full_to_partial():
    f, p = lp(0.5, 0.5, 0.0), lp(0.25, 0.25, 0.5)
    # KL = 0.5 ln 2 + 0.5 ln 2 + 0 (zero mass contributes nothing) = ln 2.
    assert D.privileged_shift(f, p).item() == pytest.approx(math.log(2))
    assert D.privileged_shift(f, f).item() == pytest.approx(0.0, abs=1e-7)


def test_residual_clip_fraction_hand_worked():
    from aropd.targets import AnchoredResidual

    def clip_fraction(f, p, clip):
        return D.residual_clip_fraction(f, AnchoredResidual(lam=0.8, clip=clip)(f, p, details=True).clipped)

    f = lp(0.7, 0.2, 0.1)
    p = lp(0.7 * math.exp(-3), 0.2, 1 - 0.2 - 0.7 * math.exp(-3))  # residuals 3, 0, ln(0.1/0.765) = -2.03
    assert clip_fraction(f, p, clip=2.5).item() == pytest.approx(0.7, rel=1e-5)
    assert clip_fraction(f, p, clip=2.0).item() == pytest.approx(0.8, rel=1e-5)  # |-2.03| > 2 too
    assert clip_fraction(f, p, clip=3.5).item() == pytest.approx(0.0)
    assert clip_fraction(f, p, clip=None).item() == 0.0
    assert clip_fraction(f, p, clip=math.inf).item() == 0.0
    # Entries where both views have zero mass (NaN residual) are not clipped and carry no mass.
    assert clip_fraction(lp(1.0, 0.0), lp(1.0, 0.0), clip=1.0).item() == 0.0


# ---- early answer ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("42 because 6*7 and so on for a while", "42", True),  # first thing said
        ("six times seven is, after all the work, 42", "42", False),  # at the end
        ("we get 142 then 4.2 then 42x; finally 42", "42", False),  # not as a whole token early
        ("x = 7. Then we keep computing a long chain of steps", "7", True),  # '7.' ends a sentence
        ("x = 7.5 and then a long chain of steps ... 7", "7", False),
        ("anything", "", False),
        ("", "3", False),
    ],
)
def test_early_answer(completion, answer, expected):
    assert D.early_answer(completion, answer) is expected


def test_early_answer_rate_counts():
    assert D.early_answer_rate(["1 and then more text", "nothing here", "xx 2"], ["1", "5", "2"]) == (1, 3)
    assert D.early_answer_rate([], []) == (0, 0)
    with pytest.raises(ValueError):
        D.early_answer_rate(["a"], [])


# ---- reductions ----------------------------------------------------------------------------------


def test_masked_mean_with_no_tokens_is_zero_not_nan():
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert D.masked_mean(v, torch.tensor([[1, 0], [0, 1]])).item() == pytest.approx(2.5)
    assert D.masked_mean(v, torch.zeros(2, 2)).item() == 0.0
    assert D.masked_mean(torch.zeros(0), torch.zeros(0)).item() == 0.0


def test_spearman_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for n in (2, 5, 17, 64):
        x = torch.randint(0, 6, (n,), generator=g).float()  # many ties
        y = x + torch.randn(n, generator=g)
        if x.unique().numel() < 2:
            continue
        assert D.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)
    x, y = torch.tensor([1.0, 2, 2, 3]), torch.tensor([4.0, 3, 3, 1])
    assert D.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    assert D.spearman(x, y) == pytest.approx(-1.0)


def test_spearman_undefined_is_nan():
    assert math.isnan(D.spearman(torch.tensor([1.0]), torch.tensor([2.0])))
    assert math.isnan(D.spearman(torch.ones(5), torch.arange(5.0)))  # constant sample


def test_average_ranks():
    assert D.average_ranks(torch.tensor([10.0, 30, 20, 20])).tolist() == [1.0, 4.0, 2.5, 2.5]


def test_quartile_means_by_rank():
    key = torch.tensor([8.0, 1, 7, 2, 6, 3, 5, 4])
    vals = key * 10
    assert D.quartile_means(key, vals).tolist() == [15.0, 35.0, 55.0, 75.0]
    # 6 samples: groups of 2, 2, 1, 1 (sizes differ by at most one).
    assert D.quartile_means(torch.arange(6.0), torch.arange(6.0)).tolist() == [0.5, 2.5, 4.0, 5.0]
    assert D.quartile_means(torch.arange(3.0), torch.arange(3.0)).isnan().all()
