"""The extended phase graph of a CPMG train, the EPG fit of T2 and B1, and their acceptance.

The model is tested against closed forms (a perfect 180° train is mono-exponential; the first
two echoes of any train and the stimulated echo of three 90° pulses have known amplitudes),
the fit against the phantom's known T2 and B1, and against the nominal T2 of the system
phantom on real Philips 3 T and GE 1.5 T scans.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qmri_helpers import dicom, epg, fitting, models, phantom, reference, spheres
from qmri_helpers.t2_fitting import fit_epg

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


def test_cpmg_signal_is_the_loop_of_the_three_operators():
    t2 = torch.tensor([[0.02, 0.1], [0.3, 1.5]], dtype=F64)
    b1 = torch.tensor([[0.55, 0.8], [0.95, 1.0]], dtype=F64)
    esp, n, t1 = 0.009, 12, 0.4
    e1, e2 = torch.tensor(math.exp(-esp / 2 / t1), dtype=F64), torch.exp(-esp / 2 / t2)
    state = epg.initial_state(2 * n + 2, (2, 2), dtype=F64)
    echoes = []
    for _ in range(n):
        state = epg.shift(epg.relax(state, e1, e2))
        state = epg.shift(epg.relax(epg.rotate(state, b1 * math.pi), e1, e2))
        echoes.append(state[0, 0])
    expected = torch.stack(echoes)
    got = epg.cpmg_signal(t2, b1, esp, n, t1=t1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


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
    for step in (epg.relax, epg.rotate):
        feedback = epg.check_epg_step(step)
        assert feedback.correct and str(feedback).startswith("Correct.")


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
    feedback = epg.check_epg_step(step, which)
    assert not feedback.correct and reason in feedback.message, feedback.message


# --- The fit -------------------------------------------------------------------------------


def _train(t2, b1, n=16, esp=0.01, m0=1000.0, t1=1.0):
    t2, b1 = torch.as_tensor(t2, dtype=F64), torch.as_tensor(b1, dtype=F64)
    te = esp * torch.arange(1, n + 1, dtype=F64)
    return (m0 * epg.cpmg_signal(t2, b1, esp, n, t1=t1)).float(), te.float()


def test_fit_recovers_noise_free_trains_between_grid_points():
    t2 = torch.tensor([[0.0234, 0.0617, 0.1333], [0.2718, 0.4444, 0.0411]])
    b1 = torch.tensor([[0.63, 0.71, 0.777], [0.85, 0.918, 0.555]])
    data, te = _train(t2, b1, n=32, esp=0.008)
    fit = fit_epg(data, te)
    assert fit.valid.all() and fit.params["t2"].shape == (2, 3)
    assert fit.device == data.device and set(fit.sd) == {"m0", "t2", "b1"}
    torch.testing.assert_close(fit.params["t2"], t2, rtol=6e-3, atol=0)
    torch.testing.assert_close(fit.params["b1"], b1, rtol=1e-2, atol=0)
    torch.testing.assert_close(fit.params["m0"], torch.full((2, 3), 1000.0), rtol=6e-3, atol=0)
    assert (fit.r_squared > 0.9999).all()
    assert fit.loss_history[-1] <= fit.loss_history[0]


def test_fit_uses_the_t1_it_is_given():
    # Short T1 (100 ms) changes the stimulated echoes: assuming 1 s biases T2, the map cures it.
    t2, b1 = torch.full((4,), 0.09), torch.full((4,), 0.7)
    data, te = _train(t2, b1, n=32, esp=0.008, t1=0.1)
    assumed = fit_epg(data, te, t1=1.0).params["t2"]
    known = fit_epg(data, te, t1=torch.full((4,), 0.1)).params["t2"]
    torch.testing.assert_close(known, t2, rtol=6e-3, atol=0)
    assert (assumed / t2 - 1).abs().min() > 0.01


def test_fit_flags_voxels_it_cannot_fit_and_keeps_the_rest():
    data, te = _train(torch.full((5,), 0.1), torch.full((5,), 0.8))
    data[:, 1] = float("nan")  # a corrupt voxel
    data[:, 2] = 0.0  # no signal
    data[:, 3] = 1000.0 * torch.exp(-te / 100.0)  # T2 far above the dictionary (10 s)
    fit = fit_epg(data, te, mask=torch.tensor([True, True, True, True, False]))
    assert fit.valid.tolist() == [True, False, False, False, False]
    assert fit.n_failed == 3
    assert torch.isfinite(fit.params["t2"]).all() and fit.params["t2"][1:].eq(0).all()


def test_fit_refuses_what_it_cannot_fit():
    data, te = _train(torch.full((3,), 0.1), torch.full((3,), 0.8), n=8)
    with pytest.raises(ValueError, match="not a CPMG train"):
        fit_epg(data, te * torch.linspace(1, 1.5, 8))
    with pytest.raises(ValueError, match="8 echoes but te has 7"):
        fit_epg(data, te[:7])
    with pytest.raises(ValueError, match="at least 4"):
        fit_epg(data[:3], te[:3])
    with pytest.raises(ValueError, match="mask has shape"):
        fit_epg(data, te, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="t1 map has shape"):
        fit_epg(data, te, t1=torch.ones(4))
    with pytest.raises(ValueError, match="positive"):
        fit_epg(data, te, t1=-1.0)
    with pytest.raises(TypeError, match="floating-point"):
        fit_epg(data.long(), te)


def test_fit_chunks_give_the_same_answer():
    t2 = torch.linspace(0.02, 0.4, 60)
    data, te = _train(t2, torch.linspace(0.6, 0.95, 60), n=12)
    whole = fit_epg(data, te)
    chunked = fit_epg(data, te, max_bytes=20_000)  # a few voxels per chunk
    # float32 sums in another order can move a near-tie by a fraction of the 2% grid step
    torch.testing.assert_close(chunked.params["t2"], whole.params["t2"], rtol=3e-3, atol=0)
    assert chunked.valid.equal(whole.valid)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_fit_runs_on_the_data_device_and_agrees_with_the_cpu():
    data, te = _train(torch.linspace(0.02, 0.4, 50), torch.linspace(0.6, 0.95, 50), n=16)
    on_gpu = fit_epg(data.cuda(), te)
    assert on_gpu.device.type == "cuda" and on_gpu.params["t2"].device.type == "cpu"
    torch.testing.assert_close(
        on_gpu.params["t2"], fit_epg(data, te).params["t2"], rtol=3e-3, atol=0
    )


def test_fit_is_reexported_from_fitting():
    assert fitting.fit_epg is fit_epg


# --- Acceptance: the synthetic plate, with known T2 and B1 ----------------------------------


@pytest.fixture(scope="module")
def spin_echo_phantom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spin_echo_phantom")
    truth = phantom.write_spin_echo_phantom(folder)
    images, header = dicom.load_series(folder)
    return images, header, truth


def _vial_errors(maps: torch.Tensor, truth_map: np.ndarray, truth) -> dict[int, float]:
    """Median relative error per vial with T2 in 20-500 ms, keyed by sphere number."""
    errors = {}
    for sphere in range(1, 15):
        inside = truth.labels == sphere
        if 0.020 <= truth.t2[inside][0] <= 0.500:
            values = maps.numpy()[inside] / truth_map[inside]
            errors[sphere] = float(np.median(values) - 1)
    return errors


def test_phantom_epg_fit_recovers_t2_and_b1(spin_echo_phantom):
    images, header, truth = spin_echo_phantom
    inside = torch.as_tensor(truth.labels > 0)
    t1 = torch.as_tensor(np.where(truth.t1 > 0, truth.t1, 1.0))
    fit = fit_epg(images, header.te, t1=t1, mask=inside)
    t2_errors = _vial_errors(fit.params["t2"], truth.t2, truth)
    b1_errors = _vial_errors(fit.params["b1"], truth.b1, truth)
    assert len(t2_errors) == 9  # spheres 5-13 (T2 360 down to 22 ms at 3 T)
    assert max(map(abs, t2_errors.values())) < 0.02, t2_errors
    assert max(map(abs, b1_errors.values())) < 0.02, b1_errors


def test_phantom_mono_exponential_is_biased_and_epg_is_not(spin_echo_phantom):
    images, header, truth = spin_echo_phantom
    inside = torch.as_tensor(truth.labels > 0)
    mono = fitting.fit_lm(models.mono_exp_model(header.te, "t2"), images, mask=inside)
    mono_errors = _vial_errors(mono.params["t2"], truth.t2, truth)
    # With B1 = 0.8 the stimulated echoes lengthen the apparent T2 of every vial: by 2-5%.
    assert all(0.015 < e < 0.06 for e in mono_errors.values()), mono_errors
    # Even with T1 unknown (assumed 1 s), the EPG fit is closer in the median.
    epg_fit = fit_epg(images, header.te, mask=inside)
    epg_errors = _vial_errors(epg_fit.params["t2"], truth.t2, truth)
    assert np.median(np.abs(list(epg_errors.values()))) < np.median(list(mono_errors.values()))


# --- Acceptance: real scans of the system phantom (plate 5), spheres 4-11 -------------------


def _sphere_medians(t2_map: torch.Tensor, images: torch.Tensor, spacing: float) -> np.ndarray:
    found = spheres.find_spheres(images, spacing)
    return np.array([np.median(v) for v in spheres.roi_values(t2_map, found.centres[:14])])


@pytest.mark.shared
@pytest.mark.parametrize(
    ("site", "nominal"),
    [
        ("site5_philips_3T", reference.reference_t2(5, 3.0)),
        ("site3_ge", reference.reference_t2(5, 1.5)),
    ],
)
def test_real_scans_epg_is_within_4_percent_and_beats_mono_exponential(hazen, site, nominal):
    images, header = dicom.load_series(hazen / "T2" / site / "plate5")
    data = images[:, :1]
    mask = fitting.signal_mask(data)
    epg_fit = fit_epg(data, header.te, mask=mask)
    mono = fitting.fit_lm(models.mono_exp_model(header.te, "t2"), data, mask=mask)
    spacing = header.pixel_spacing[0]
    spheres = slice(3, 11)  # spheres 4-11
    nominal = np.asarray(nominal)[spheres]
    epg_error = np.abs(
        _sphere_medians(epg_fit.params["t2"][0], data[:, 0], spacing)[spheres] / nominal - 1
    )
    mono_error = np.abs(
        _sphere_medians(mono.params["t2"][0], data[:, 0], spacing)[spheres] / nominal - 1
    )
    print(f"{site}: median |EPG - nominal| {np.median(epg_error):.1%}, "
          f"mono-exponential {np.median(mono_error):.1%}")  # fmt: skip
    assert np.median(epg_error) < 0.04
    assert np.median(epg_error) < np.median(mono_error)
