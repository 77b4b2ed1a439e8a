import math

import pytest
import torch

from aropd.divergences import forward_kl, generalized_jsd, reverse_kl, sampled_token_kl

P = [0.5, 0.5]  # target
Q = [0.25, 0.75]  # student


def lp(x):
    return torch.tensor([x]).log()


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def test_forward_kl_hand_value():
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.143841
    assert forward_kl(lp(P), lp(Q)).item() == pytest.approx(0.1438410362, abs=1e-6)


def test_reverse_kl_hand_value():
    # 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5) = 0.130812
    assert reverse_kl(lp(P), lp(Q)).item() == pytest.approx(0.1308120184, abs=1e-6)


def test_generalized_jsd_hand_value_and_endpoints():
    m = [0.5 * a + 0.5 * b for a, b in zip(P, Q)]  # [0.375, 0.625]
    expected = 0.5 * kl(P, m) + 0.5 * kl(Q, m)  # 0.033822
    assert expected == pytest.approx(0.033822, abs=1e-5)
    assert generalized_jsd(lp(P), lp(Q), 0.5).item() == pytest.approx(expected, abs=1e-6)
    m2 = [0.2 * a + 0.8 * b for a, b in zip(P, Q)]
    assert generalized_jsd(lp(P), lp(Q), 0.2).item() == pytest.approx(0.2 * kl(P, m2) + 0.8 * kl(Q, m2), abs=1e-6)
    assert generalized_jsd(lp(P), lp(Q), 0.0).item() == pytest.approx(kl(P, Q), abs=1e-6)
    assert generalized_jsd(lp(P), lp(Q), 1.0).item() == pytest.approx(kl(Q, P), abs=1e-6)
    with pytest.raises(ValueError, match="jsd_beta"):
        generalized_jsd(lp(P), lp(Q), 1.5)


def test_sampled_token_estimator_hand_value():
    # d = ln 0.5 - ln 0.25 = ln 2; exp(d) - d - 1 = 1 - ln 2
    out = sampled_token_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))
    assert out.item() == pytest.approx(1 - math.log(2), abs=1e-6)
    assert sampled_token_kl(torch.tensor(-1.0), torch.tensor(-1.0)).item() == 0.0


def test_shapes_any_leading_dims_and_zero_mass_entries():
    t = torch.tensor([[[0.0, -math.inf, -math.inf]]]).expand(2, 3, 3)  # one-hot target
    s = torch.tensor([0.7, 0.2, 0.1]).log().expand(2, 3, 3)
    out = forward_kl(t, s)
    assert out.shape == (2, 3)
    assert torch.allclose(out, torch.full((2, 3), -math.log(0.7)))
    assert not reverse_kl(s, t).isnan().any()
