import math

import pytest
import torch

from aropd.divergences import (
    cross_entropy_with_grad,
    forward_kl,
    forward_kl_with_grad,
    generalized_jsd,
    generalized_jsd_with_grad,
    reverse_kl,
    reverse_kl_with_grad,
    sampled_token_kl,
    sampled_token_kl_with_grad,
)

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


# ---- closed-form gradients w.r.t. the student's logits, against autograd ----



def _logits_and_target(zero_mass: bool):
    g = torch.Generator().manual_seed(0)
    z = (2 * torch.randn(4, 3, 50, generator=g, dtype=torch.float64)).float()
    t = (2 * torch.randn(4, 3, 50, generator=g)).log_softmax(-1)
    if zero_mass:  # the target puts no mass on a few entries (and all on one at one position)
        t[..., :5] = -math.inf
        t[0, 0] = -math.inf
        t[0, 0, 7] = 0.0
        t = t.log_softmax(-1)
    ids = torch.randint(5, 50, (4, 3), generator=g)
    return z, t, ids


CLOSED_FORMS = {  # name: (the plain function, its closed form taking grad=...)
    "forward_kl": (lambda t, s, y: forward_kl(t, s), lambda t, s, y, **k: forward_kl_with_grad(t, s, **k)),
    "reverse_kl": (lambda t, s, y: reverse_kl(t, s), lambda t, s, y, **k: reverse_kl_with_grad(t, s, **k)),
    **{f"jsd{b}": (lambda t, s, y, b=b: generalized_jsd(t, s, b),
                   lambda t, s, y, b=b, **k: generalized_jsd_with_grad(t, s, b, **k)) for b in (0.0, 0.1, 0.5, 0.9, 1.0)},
    "sampled_token": (
        lambda t, s, y: sampled_token_kl(t.gather(-1, y[..., None])[..., 0], s.gather(-1, y[..., None])[..., 0]),
        lambda t, s, y, **k: sampled_token_kl_with_grad(t, s, y, **k),
    ),
    "cross_entropy": (lambda t, s, y: -s.gather(-1, y[..., None])[..., 0],
                      lambda t, s, y, **k: cross_entropy_with_grad(s, y, **k)),
}


# Zero target mass under reverse KL (β = 1) is an infinite divergence: not a gradient to compare.
@pytest.mark.parametrize("name, zero_mass", [(n, False) for n in CLOSED_FORMS]
                         + [(n, True) for n in CLOSED_FORMS if n not in ("reverse_kl", "jsd1.0")])
def test_closed_form_logit_gradient_equals_autograd(name, zero_mass):
    plain, closed = CLOSED_FORMS[name]
    z, t, ids = _logits_and_target(zero_mass)
    w = torch.rand(z.shape[:-1], generator=torch.Generator().manual_seed(1))
    z64 = z.double().requires_grad_(True)  # the reference in fp64
    (plain(t.double(), z64.log_softmax(-1), ids) * w.double()).sum().backward()
    s = z.log_softmax(-1)
    s_before = s.clone()
    value, grad = closed(t, s, ids)
    assert torch.equal(s, s_before)  # the student's log-probs are read, not written
    assert torch.equal(value, plain(t, s, ids))  # the value is the plain function's, to the bit
    assert torch.isfinite(grad).all()
    torch.testing.assert_close((grad * w[..., None]).double(), z64.grad, rtol=1e-5, atol=1e-6)


def test_closed_forms_without_grad_return_the_value_alone():
    z, t, ids = _logits_and_target(False)
    s = z.log_softmax(-1)
    for name, (_, closed) in CLOSED_FORMS.items():
        value, _ = closed(t, s, ids)
        alone, none = closed(t, s, ids, grad=False)
        assert none is None and torch.equal(alone, value), name
    with pytest.raises(ValueError, match="jsd_beta"):
        generalized_jsd_with_grad(t, s, -0.1)
