"""Signal models and the loss: known values, shapes and errors."""

from __future__ import annotations

import math

import pytest
import torch

from qmri_helpers import models


def test_ir_signal_known_values():
    ti = torch.tensor([0.0, 0.8 * math.log(2), 100.0])
    signal = models.ir_signal(torch.tensor(1000.0), torch.tensor(0.8), ti)
    assert signal.tolist() == pytest.approx([1000.0, 0.0, 1000.0], abs=1e-3)
    signed = models.ir_signal(torch.tensor(1000.0), torch.tensor(0.8), ti[:1], magnitude=False)
    assert signed.item() == pytest.approx(-1000.0)


def test_models_broadcast_maps_to_time_first():
    ti = torch.tensor([0.1, 0.5, 1.0])
    m0, t1 = torch.full((2, 4, 5), 2.0), torch.full((2, 4, 5), 0.5)
    out = models.inversion_recovery(ti)(m0=m0, t1=t1)
    assert out.shape == (3, 2, 4, 5)
    assert out[1, 1, 2, 3].item() == pytest.approx(abs(2 * (1 - 2 * math.exp(-1.0))))


def test_mono_exponential_known_values():
    te = torch.tensor([0.0, 0.02, 0.04])
    out = models.mono_exponential(te)(m0=torch.tensor([100.0]), t2star=torch.tensor([0.02]))
    assert out[:, 0].tolist() == pytest.approx([100.0, 100 / math.e, 100 / math.e**2], rel=1e-5)


def test_mse_and_its_gradient_compose_with_the_model():
    ti = torch.tensor([0.1, 0.4, 1.6])
    data = models.ir_signal(torch.tensor([500.0]), torch.tensor([0.3]), ti)
    t1 = torch.tensor([0.3], requires_grad=True)
    loss = models.mse(models.inversion_recovery(ti)(m0=torch.tensor([500.0]), t1=t1), data)
    assert loss.item() == pytest.approx(0.0, abs=1e-8)
    t1_off = torch.tensor([0.35], requires_grad=True)
    loss = models.mse(models.inversion_recovery(ti)(m0=torch.tensor([500.0]), t1=t1_off), data)
    loss.backward()
    assert loss.item() > 0 and t1_off.grad.item() != 0
    assert models.mse(torch.ones(3, 2), torch.zeros(3, 2), dim=0).tolist() == [1.0, 1.0]


def test_mse_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"prediction \(3, 2\) and data \(2, 3\) differ"):
        models.mse(torch.ones(3, 2), torch.ones(2, 3))


def test_mse_value_and_gradient_match_the_closed_form():
    prediction = torch.tensor([[1.0, 2.0], [3.0, -4.0]], requires_grad=True)
    data = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    loss = models.mse(prediction, data)
    loss.backward()
    assert loss.item() == pytest.approx((1 + 1 + 4 + 16) / 4)
    # d/dp mean((p - d)^2) = 2 (p - d) / N
    assert prediction.grad.flatten().tolist() == pytest.approx([0.5, 0.5, 1.0, -2.0])


@pytest.mark.parametrize("magnitude", [True, False])
def test_ir_signal_gradient_matches_the_closed_form(magnitude):
    ti = torch.tensor([0.05, 0.3, 0.9, 2.5], dtype=torch.float64)
    m0 = torch.tensor([800.0, 20.0], dtype=torch.float64, requires_grad=True)
    t1 = torch.tensor([0.25, 1.7], dtype=torch.float64, requires_grad=True)
    models.ir_signal(m0, t1, ti, magnitude).sum().backward()
    decay = torch.exp(-ti[:, None] / t1.detach())
    signed = m0.detach() * (1 - 2 * decay)
    sign = torch.sign(signed) if magnitude else torch.ones_like(signed)
    # dS/dM0 = 1 - 2 e^(-TI/T1); dS/dT1 = -2 M0 e^(-TI/T1) TI / T1^2
    assert torch.allclose(m0.grad, (sign * (1 - 2 * decay)).sum(0), rtol=1e-12)
    expected = (sign * -2 * m0.detach() * decay * ti[:, None] / t1.detach() ** 2).sum(0)
    assert torch.allclose(t1.grad, expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exponential_decay_matches_exp_in_float64(dtype):
    """The models' exp(-t/T) (via exp2) against float64 exp, T from 1 ms to 10 s."""
    t = torch.linspace(0, 5, 101, dtype=dtype)
    time_constant = torch.logspace(-3, 1, 301, dtype=dtype)
    got = models.mono_exp_signal(torch.ones_like(time_constant), time_constant, t).double()
    expected = torch.exp(-t.double()[:, None] / time_constant.double())
    normal = expected > torch.finfo(dtype).tiny  # results that are not flushed or subnormal
    rtol = 4e-7 if dtype == torch.float32 else 1e-15
    # the exponent t/T carries a rounding error of a few units in its last place, so the
    # relative error grows with t/T (1.5e-7 t/T in float32 here, 9e-8 t/T for exp(-t/T) itself)
    scale = torch.where(normal, (t.double()[:, None] / time_constant.double()).clamp_min(1), 1)
    assert ((got - expected).abs() <= rtol * scale * expected)[normal].all()
    assert (got[~normal] <= 2 * torch.finfo(dtype).tiny).all()
