"""The extended phase graph of a CPMG train, the EPG fit of T2 and B1, and their acceptance.

The model is tested against closed forms (a perfect 180° train is mono-exponential; the first
two echoes of any train and the stimulated echo of three 90° pulses have known amplitudes),
the fit against the phantom's known T2 and B1, and against the nominal T2 of the system
phantom on real Philips 3 T and GE 1.5 T scans.
"""

from __future__ import annotations

import math

import pytest
import torch

from qmri_helpers import epg, models

F64 = torch.float64


def test_perfect_refocusing_is_mono_exponential():
    t2 = torch.tensor([0.01, 0.05, 0.3, 2.0], dtype=F64)
    echoes = epg.cpmg_signal(t2, 1.0, esp=0.008, n_echoes=32, t1=0.5)
    te = 0.008 * torch.arange(1, 33, dtype=F64)[:, None]
    torch.testing.assert_close(echoes, torch.exp(-te / t2), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("alpha_deg", [90.0, 120.0, 150.0])
def test_first_two_echoes_follow_their_coherence_pathways(alpha_deg):
    # Echo 1: the spin echo, sin^2(a/2) E2(ESP). Echo 2: the spin echo of the spin echo,
    # sin^4(a/2) E2(2 ESP), plus the stimulated echo, sin^2(a)/2 E2(ESP) E1(ESP).
    alpha, t2, t1, esp = math.radians(alpha_deg), 0.08, 0.5, 0.01
    echoes = epg.cpmg_signal(torch.tensor(t2, dtype=F64), alpha_deg / 180, esp, 2, t1=t1)
    s2 = math.sin(alpha / 2) ** 2
    e2, e1 = math.exp(-esp / t2), math.exp(-esp / t1)
    expected = [s2 * e2, s2**2 * e2**2 + 0.5 * math.sin(alpha) ** 2 * e2 * e1]
    assert echoes.tolist() == pytest.approx(expected, rel=1e-12)


def test_three_90_degree_pulses_give_the_stimulated_echo():
    # 90 - tau - 90 - TM - 90 - tau - STE: amplitude 1/2 exp(-2 tau/T2) exp(-TM/T1). The
    # operators work in units of the dephasing of one tau; TM is long enough (TM > 2 tau) that
    # no other echo falls on the stimulated echo, which is F+_0 at the end.
    t1, t2, tau, tm = 0.6, 0.05, 0.005, 0.03
    e = {
        "tau": torch.tensor([math.exp(-tau / t1), math.exp(-tau / t2)], dtype=F64),
        "tm": torch.tensor([math.exp(-tm / t1), 0.0], dtype=F64),
    }
    right_angle = torch.tensor(math.pi / 2, dtype=F64)
    state = epg.initial_state(8, dtype=F64)
    state = epg.shift(epg.relax(state, *e["tau"]))
    state = epg.rotate(state, right_angle)
    # During TM the transverse states are crushed (E2 = 0 here): only Z carries the memory.
    state = epg.relax(state, *e["tm"])
    state = epg.rotate(state, right_angle)
    state = epg.shift(epg.relax(state, *e["tau"]))
    expected = 0.5 * math.exp(-2 * tau / t2) * math.exp(-tm / t1)
    assert state[0, 0].item() == pytest.approx(expected, rel=1e-12)
    assert abs(state[0, 0].item()) > 0.1  # far from 0: the test can tell right from wrong


def test_truncated_states_are_exact():
    t2 = torch.tensor([0.02, 0.1, 1.0], dtype=F64)
    full = epg.cpmg_signal(t2, 0.7, 0.008, 32, t1=0.3, n_states=80)
    torch.testing.assert_close(
        epg.cpmg_signal(t2, 0.7, 0.008, 32, t1=0.3), full, rtol=0, atol=1e-15
    )


def test_stimulated_echoes_slow_the_apparent_decay():
    t2 = 0.1
    echoes = epg.cpmg_signal(torch.tensor(t2, dtype=F64), 0.7, 0.01, 32)
    assert echoes[1] > echoes[0]  # the stimulated echo joins at echo 2
    apparent = 0.01 * 30 / math.log(echoes[1] / echoes[31])  # from echoes 2 and 32
    assert apparent > 1.03 * t2


def test_model_broadcasts_maps_and_scales_with_m0():
    te = 0.01 * torch.arange(1, 9)
    model = models.epg_cpmg_model(te, t1=1.0)
    m0, t2, b1 = torch.full((2, 3), 500.0), torch.full((2, 3), 0.1), torch.full((2, 3), 0.8)
    out = model(m0=m0, t2=t2, b1=b1)
    assert out.shape == (8, 2, 3)
    single = 500.0 * epg.cpmg_signal(torch.tensor(0.1), 0.8, 0.01, 8)
    torch.testing.assert_close(out[:, 1, 2], single)


def test_model_refuses_echo_times_that_are_not_a_cpmg_train():
    with pytest.raises(ValueError, match="not a CPMG train"):
        models.epg_cpmg_model(torch.tensor([0.01, 0.02, 0.04]))
    with pytest.raises(ValueError, match="positive"):
        models.epg_cpmg_model(torch.tensor([0.0, 0.01]))


def test_check_accepts_the_reference_steps():
    assert "right" in epg.check_epg_step(epg.relax)
    assert "right" in epg.check_epg_step(epg.rotate)


def _rotate_degrees(state, alpha):
    return epg.rotate(state, alpha * 180 / math.pi)


def _rotate_swapped(state, alpha):
    return epg.rotate(state, math.pi - alpha)


@pytest.mark.parametrize(
    ("step", "which", "reason"),
    [
        (lambda s, e1, e2: epg.relax(s, e2, e1), "relax", "swapped"),
        (lambda s, e1, e2: torch.stack([s[0] * e2, s[1] * e2, s[2] * e2]), "relax", "E1"),
        (lambda s, e1, e2: s, "relax", "unchanged"),
        (lambda s, e1, e2: s[0] * e2, "relax", "shape"),
        (lambda s, e1, e2: 1 / 0, "relax", "ZeroDivisionError"),
        (_rotate_degrees, "rotate", "radians"),
        (_rotate_swapped, "rotate", "swapped"),
        (lambda s, a: epg.rotate(s, -a), "rotate", "signs"),
        (lambda s, a: s, "rotate", "180"),
    ],
)
def test_check_says_why_a_wrong_step_is_wrong(step, which, reason):
    with pytest.raises(AssertionError, match=reason):
        epg.check_epg_step(step, which)
