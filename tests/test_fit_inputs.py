"""What the fitters and models refuse, and what they count as failed (issue 11, fitters).

Each test gives a mistake that real users make and checks the answer against an independent
reference: the known truth of noiseless synthetic curves, or the fit of the corrected input.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from qmri_helpers import dicom, fitting, models, validation

TI = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8, 1.2, 2.0, 3.0], dtype=torch.float64)
TI_HAZEN = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
TR_SIEMENS = torch.tensor([1.0, 1.0, 1.0, 1.26, 1.86, 2.46], dtype=torch.float64)
#: The echo times of the ukat kidney scan (s): 12 in-phase echoes, 4.61 to 55.32 ms.
TE = torch.linspace(0.00461, 0.05532, 12, dtype=torch.float64)
T1 = torch.tensor([0.05, 0.2, 0.35, 0.9, 2.5], dtype=torch.float64)
T1_GRID = torch.logspace(-2, 1, 300)
SHUFFLE = torch.tensor([3, 0, 9, 5, 1, 7, 2, 8, 4, 6])

LM_FITS = {
    "fit_lm": fitting.fit_lm,
    "fit_varpro": lambda model, data, **kw: fitting.fit_varpro(model, data, **kw),
}


def _three_parameter_data(t1: torch.Tensor = T1) -> torch.Tensor:
    """Noiseless |a + b exp(-TI/T1)| with a = 1000, b = -1900 (null between TIs), (10, V)."""
    model = models.ir_three_parameter_model(TI)
    c = torch.stack([torch.full_like(t1, 1000.0), torch.full_like(t1, -1900.0)])
    return model(c, t1).float()


def _adam(model, data, **kwargs):
    start = fitting.dictionary_match(data, model, "t1", T1_GRID)
    start = {k: torch.where(v > 0, v, 1.0) for k, v in start.items()}
    return fitting.fit_adam(model, data, start, n_iter=300, progress=False, **kwargs)


def _assert_counts_add_up(result: fitting.FitResult, n_fitted: int) -> None:
    """Every fitted voxel is valid or failed for one counted reason; failed ones hold 0."""
    assert result.n_fitted == n_fitted
    assert sum(result.failures.values()) == result.n_failed == n_fitted - int(result.valid.sum())
    for maps in (result.params, result.sd, {"r2": result.r_squared}):
        for value in maps.values():
            assert torch.isfinite(value).all()
            assert torch.all(value[~result.valid] == 0)


# --- TIs not in increasing order -----------------------------------------------------------


@pytest.mark.parametrize("fit", LM_FITS.values(), ids=LM_FITS.keys())
@pytest.mark.parametrize(
    ("make", "times", "truth"),
    [
        (models.ir_three_parameter_model, (TI,), T1),
        (models.ir_seed_model, (TI,), T1),
        (models.ir_tr_model, (TI_HAZEN, TR_SIEMENS), torch.tensor([0.1, 0.3, 0.6, 1.4]).double()),
    ],
    ids=["3-parameter", "seed", "TR-aware, TR per TI"],
)
def test_unsorted_times_give_the_sorted_fit(fit, make, times, truth):
    """The fit sorts the times with the data: the result equals the fit of the sorted series."""
    model = make(*times)
    if make is models.ir_tr_model:
        c = torch.stack([torch.full_like(truth, 1500.0), torch.full_like(truth, 1500.0 * 1.9)])
    elif make is models.ir_seed_model:
        c = torch.full_like(truth, 1000.0)[None]
    else:
        c = torch.stack([torch.full_like(truth, 1000.0), torch.full_like(truth, -1900.0)])
    data = model(c, truth).float()
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(1))
    shuffled = fit(make(*(t[order] for t in times)), data[order])
    reference = fit(model, data)
    for name, value in reference.params.items():
        torch.testing.assert_close(shuffled.params[name], value, rtol=1e-6, atol=0)
    assert torch.equal(shuffled.valid, reference.valid)
    assert shuffled.valid.all()
    if fit is fitting.fit_lm:  # and that fit is right: the truth of noiseless curves
        torch.testing.assert_close(shuffled.params["t1"].double(), truth, rtol=1e-4, atol=0)


def test_sort_model_times_leaves_sorted_models_alone():
    model = models.ir_three_parameter_model(TI)
    data = _three_parameter_data()
    same_model, same_data = validation.sort_model_times(model, data)
    assert same_model is model and same_data is data
    assert validation.time_order(TI) is None
    assert validation.time_order(TI[SHUFFLE]).tolist() == torch.argsort(TI[SHUFFLE]).tolist()


# --- times in ms -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: models.inversion_recovery(TI * 1000),
        lambda: models.ir_seed_model(TI * 1000),
        lambda: models.ir_three_parameter_model(TI * 1000),
        lambda: models.ir_tr_model(TI_HAZEN * 1000, TR_SIEMENS),
        lambda: models.ir_tr_model(TI_HAZEN, TR_SIEMENS * 1000),
        lambda: models.ir_tr_model(TI_HAZEN, 2500.0),
        lambda: models.ir_hazen_model(TI_HAZEN * 1000, TR_SIEMENS * 1000),
        lambda: models.mono_exponential(TE * 1000),
        lambda: models.mono_exp_model(TE * 1000),
        lambda: models.mono_exp_model(TE * 1000, name="t2"),
        lambda: models.epg_cpmg_model(torch.arange(1, 33) * 10.0),  # ESP 10 ms, in ms
    ],
    ids=[
        "inversion_recovery",
        "ir_seed_model",
        "ir_three_parameter_model",
        "ir_tr_model TI",
        "ir_tr_model TR",
        "ir_tr_model scalar TR",
        "ir_hazen_model",
        "mono_exponential",
        "mono_exp_model",
        "mono_exp_model t2",
        "epg_cpmg_model",
    ],
)
def test_times_in_ms_are_refused_by_every_model(build):
    """TI 50-3000 ms, TR 1000-2460 ms, TE 4.6-55 ms (the kidney scan's): all refused."""
    with pytest.raises(ValueError, match=r"looks like milliseconds.*works in seconds"):
        build()


@pytest.mark.parametrize("fit", LM_FITS.values(), ids=LM_FITS.keys())
def test_fits_refuse_a_hand_built_model_with_times_in_ms(fit):
    model = dataclasses.replace(models.ir_three_parameter_model(TI), times=TI * 1000)
    with pytest.raises(ValueError, match="TI looks like milliseconds: the largest is 3000"):
        fit(model, _three_parameter_data())
    echo = dataclasses.replace(models.mono_exp_model(TE), times=TE * 1000)
    with pytest.raises(ValueError, match="TE looks like milliseconds"):
        fit(echo, torch.ones(12, 3))


@pytest.mark.parametrize(
    ("times", "message"),
    [
        (torch.tensor([0.1, float("nan"), 1.0]), "unknown"),
        (torch.tensor([0.1, float("inf"), 1.0]), "unknown"),
        (torch.tensor([-0.1, 0.5, 1.0]), "negative"),
        (torch.tensor([]), "empty"),
        (None, "unknown"),  # a missing RepetitionTime
        (["a", "b"], "must be numbers in seconds"),
    ],
)
def test_unknown_or_negative_times_are_refused(times, message):
    with pytest.raises(ValueError, match=message):
        models.ir_seed_model(times)
    with pytest.raises(ValueError, match=f"TR.*{message}"):
        models.ir_tr_model(TI_HAZEN[:3], times)
    if message == "unknown":  # a missing RepetitionTime: the message says what to fit instead
        with pytest.raises(ValueError, match="TR is unknown.*fit ir_three_parameter_model"):
            models.ir_hazen_model(TI_HAZEN[:3], times)


def test_times_in_seconds_pass_unchanged():
    """The longest plausible times still pass: TI 10 s, TR 100 s, a 32-echo spin echo."""
    assert torch.equal(models.ir_tr_model(TI, 100.0).times, TI)
    assert models.mono_exp_model(torch.linspace(0.01, 0.32, 32)).times.shape == (32,)
    times = validation.check_times([0.0, 0.5, 10.0], "TI")
    assert times.tolist() == [0.0, 0.5, 10.0]


# --- all-zero data -------------------------------------------------------------------------


@pytest.mark.parametrize("fit", [*LM_FITS.values(), _adam], ids=[*LM_FITS, "fit_adam"])
def test_voxels_without_signal_fail_and_are_counted(fit):
    """Two zero voxels beside three real ones: the zeros fail, the others fit the truth."""
    data = torch.cat([_three_parameter_data(T1[1:4]), torch.zeros(10, 2)], 1)
    if fit is _adam:
        model = models.inversion_recovery(TI)
        data = torch.cat([model(m0=torch.ones(3) * 900, t1=T1[1:4]), torch.zeros(10, 2)], 1)
        result = fit(model, data.float())
    else:
        result = fit(models.ir_three_parameter_model(TI), data)
    assert result.valid.tolist() == [True, True, True, False, False]
    assert result.failures == {"no signal": 2}
    assert "2 without signal (all zero)" in result.summary()
    torch.testing.assert_close(result.params["t1"][:3].double(), T1[1:4], rtol=1e-2, atol=0)
    _assert_counts_add_up(result, 5)


@pytest.mark.parametrize("fit", [*LM_FITS.values(), _adam], ids=[*LM_FITS, "fit_adam"])
def test_all_zero_data_is_all_failed(fit):
    data = torch.zeros(10, 4, 4)
    model = models.inversion_recovery(TI) if fit is _adam else models.ir_seed_model(TI)
    result = fit(model, data)
    assert not result.valid.any()
    assert result.failures == {"no signal": 16}
    assert result.summary() == "16 voxels fitted: 0 valid, 16 failed (16 without signal (all zero))"
    _assert_counts_add_up(result, 16)


def test_dictionary_match_gives_no_value_without_signal():
    """Not the grid's edge (10 ms): 0, which a fit then counts as failed."""
    model = models.inversion_recovery(TI)
    data = torch.cat([model(m0=torch.full((2,), 800.0), t1=T1[1:3]), torch.zeros(10, 2)], 1)
    start = fitting.dictionary_match(data.float(), model, "t1", T1_GRID)
    assert start["t1"][2:].tolist() == [0.0, 0.0] and start["m0"][2:].tolist() == [0.0, 0.0]
    torch.testing.assert_close(start["t1"][:2].double(), T1[1:3], rtol=0.012, atol=0)


# --- NaN and inf voxels ----------------------------------------------------------------------


def _with_bad_voxels() -> torch.Tensor:
    """An 8x8 image: a 4x4 square of signal in zeros, one NaN and one inf voxel inside it."""
    model = models.inversion_recovery(TI)
    data = torch.zeros(10, 8, 8)
    data[:, 2:6, 2:6] = model(m0=torch.full((4, 4), 1000.0), t1=torch.full((4, 4), 0.6)).float()
    data[3, 2, 2] = float("nan")
    data[:, 5, 5] = float("inf")
    return data


def test_signal_mask_leaves_out_nan_and_inf_voxels_and_counts_them():
    data = _with_bad_voxels()
    with pytest.warns(RuntimeWarning, match="signal_mask: 2 of 64 voxels hold NaN or inf"):
        mask = fitting.signal_mask(data)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = True
    expected[2, 2] = expected[5, 5] = False
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("fit", [*LM_FITS.values(), _adam], ids=[*LM_FITS, "fit_adam"])
def test_the_rest_fits_around_nan_and_inf_voxels(fit):
    data = _with_bad_voxels()
    with pytest.warns(RuntimeWarning):
        mask = fitting.signal_mask(data)
    model = models.inversion_recovery(TI) if fit is _adam else models.ir_seed_model(TI)
    if fit is _adam:
        with pytest.warns(RuntimeWarning, match="dictionary_match: 2 of 64"):
            result = fit(model, data, mask=mask)
    else:
        result = fit(model, data, mask=mask)
    assert torch.equal(result.valid, mask) and result.n_failed == 0
    torch.testing.assert_close(result.params["t1"][mask], torch.full((14,), 0.6), rtol=1e-3, atol=0)
    if fit is _adam:
        with pytest.warns(RuntimeWarning):
            whole = fit(model, data)
    else:
        whole = fit(model, data)
    assert whole.failures == {"not finite": 2, "no signal": 48}
    assert "2 with NaN or inf in the data" in whole.summary()
    _assert_counts_add_up(whole, 64)


def test_dictionary_match_gives_no_value_for_nan_voxels():
    data = _with_bad_voxels()
    with pytest.warns(RuntimeWarning, match="2 of 64 voxels hold NaN or inf"):
        start = fitting.dictionary_match(data, models.inversion_recovery(TI), "t1", T1_GRID)
    assert start["t1"][2, 2] == 0 and start["m0"][5, 5] == 0
    assert torch.isfinite(start["m0"]).all()
    assert start["t1"][3, 3] == pytest.approx(0.6, rel=0.012)


# --- empty, single voxel, half precision ---------------------------------------------------


def _every_fitter():
    model = models.inversion_recovery(TI)
    return {
        "signal_mask": lambda d: fitting.signal_mask(d),
        "dictionary_match": lambda d: fitting.dictionary_match(d, model, "t1", T1_GRID),
        "fit_adam": lambda d: fitting.fit_adam(
            model, d, {"m0": torch.ones(d.shape[1:]), "t1": torch.ones(d.shape[1:])}, n_iter=2
        ),
        "fit_varpro": lambda d: fitting.fit_varpro(models.ir_seed_model(TI), d),
        "fit_lm": lambda d: fitting.fit_lm(models.ir_seed_model(TI), d),
    }


@pytest.mark.parametrize("name", _every_fitter())
def test_empty_input_is_a_clear_error(name):
    fitter = _every_fitter()[name]
    with pytest.raises(ValueError, match=r"data is empty: shape \(10, 0\) has no voxels"):
        fitter(torch.zeros(10, 0))
    with pytest.raises(ValueError, match=r"data is empty: shape \(0, 4\) has no time points"):
        fitter(torch.zeros(0, 4))
    with pytest.raises(ValueError, match=r"for one voxel use shape \(n_times, 1\)"):
        fitter(torch.ones(10))


@pytest.mark.parametrize("fit", [*LM_FITS.values(), _adam], ids=[*LM_FITS, "fit_adam"])
def test_a_mask_that_selects_nothing_is_a_clear_error(fit):
    model = models.inversion_recovery(TI) if fit is _adam else models.ir_seed_model(TI)
    data = _three_parameter_data()
    with pytest.raises(ValueError, match="the mask selects no voxel"):
        fit(model, data, mask=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a boolean"):
        fit(model, data, mask=torch.ones(5))


@pytest.mark.parametrize("fit", LM_FITS.values(), ids=LM_FITS)
@pytest.mark.parametrize(
    "make", [models.ir_seed_model, models.ir_three_parameter_model], ids=["seed", "3-parameter"]
)
def test_signed_images_are_refused_by_a_magnitude_model(fit, make):
    """Real-valued IR images are negative before the null; a magnitude model would fit them to
    a wrong map. The same data fit exactly with the model made for signed images."""
    signed = make(TI, magnitude=False)
    c = torch.stack([torch.full_like(T1, 1000.0), torch.full_like(T1, -1900.0)])
    data = signed(c[: len(signed.linear)], T1).float()  # seed: M0 (1 - 2 e), else a + b e
    assert float(data.min()) < -800
    with pytest.raises(ValueError) as refused:
        fit(make(TI), data)
    message = str(refused.value)
    assert f"negative values (down to {float(data.min()):.4g}, in 4 voxels)" in message
    assert "magnitude=False" in message and "data.abs()" in message
    result = fit(signed, data, **({} if fit is fitting.fit_lm else {"lm_iterations": 50}))
    assert result.valid.all()
    assert torch.allclose(result.params["t1"].double(), T1, rtol=1e-4)
    # negative values only in voxels the mask leaves out are no reason to refuse
    magnitudes = torch.cat([data[:, :1].abs(), data[:, 1:]], 1)
    mask = torch.tensor([True, False, False, False, False])
    assert fit(make(TI), magnitudes, mask=mask).valid[0]
    # nor are NaN and -inf: those voxels fail as "not finite", the others fit
    bad = data.abs()
    bad[2, 1], bad[3, 2] = -float("inf"), float("nan")
    assert fit(make(TI), bad).failures == {"not finite": 2}


@pytest.mark.shared
def test_a_real_signed_series_is_refused_by_a_magnitude_model(hazen):
    """Site 2's IR images are real-valued (negative before the null): the seed model fitted
    them to T1 maps with costs up to 4e5 times the least cost of any curve of that shape."""
    images, header = dicom.load_series(hazen / "T1/site2_20180925/plate5")
    assert header.signed
    with pytest.raises(ValueError, match=r"negative values \(down to -\d+.*magnitude=False"):
        fitting.fit_lm(models.ir_seed_model(header.ti), images)
    # the model for signed images fits them: R² of nearly 1 where there is signal
    result = fitting.fit_lm(models.ir_tr_model(header.ti, header.tr, magnitude=False), images)
    signal = images.abs().amax(0) > 0.2 * images.abs().max()
    assert float(result.valid[signal].float().mean()) > 0.99
    assert float(result.r_squared[signal & result.valid].median()) > 0.999


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["dictionary_match", "fit_adam", "fit_varpro", "fit_lm"])
def test_half_precision_is_computed_in_float32(name, dtype):
    """One voxel and a row of them, T1 on the grid: as exact as float32 data give."""
    model = models.inversion_recovery(TI)
    truth = T1_GRID[[60, 120, 180, 240]].double()  # 40 ms to 2.5 s, on the grid
    signal = model(m0=torch.full((4,), 1000.0), t1=truth.float())
    half = signal.to(dtype)
    for data in (half[:, 1:2], half):
        if name == "dictionary_match":
            got = fitting.dictionary_match(data, model, "t1", T1_GRID)["t1"]
            full = fitting.dictionary_match(data.float(), model, "t1", T1_GRID)["t1"]
            tolerance = 0.0
        elif name == "fit_adam":
            start = fitting.dictionary_match(data.float(), model, "t1", T1_GRID)
            got = fitting.fit_adam(model, data, start, n_iter=800, lr=0.02, progress=False)
            full = fitting.fit_adam(model, data.float(), start, n_iter=800, lr=0.02, progress=False)
            got, full, tolerance = got.params["t1"], full.params["t1"], 1e-5
        else:
            fit = getattr(fitting, name)
            got = fit(models.ir_seed_model(TI), data).params["t1"]
            full = fit(models.ir_seed_model(TI), data.float()).params["t1"]
            tolerance = 1e-6
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, full, rtol=tolerance, atol=0)
    # and against the truth: half-precision *data* cost at most their rounding (0.4% in bf16)
    torch.testing.assert_close(got.double(), truth, rtol=0.02, atol=0)


# --- time constants on a bound ---------------------------------------------------------------


@pytest.mark.parametrize("fit", LM_FITS.values(), ids=LM_FITS.keys())
def test_voxels_on_a_bound_fail_and_are_counted(fit):
    """T1 = 50 s is beyond the models' 10 s bound and the grid's 5 s: it is not a value."""
    data = _three_parameter_data(torch.tensor([0.6, 50.0, 80.0, 1.2], dtype=torch.float64))
    result = fit(models.ir_three_parameter_model(TI), data)
    assert result.valid.tolist() == [True, False, False, True]
    assert result.failures == {"at a bound": 2}
    assert result.summary() == (
        "4 voxels fitted: 2 valid, 2 failed (2 with the time constant on a bound of the fit)"
    )
    _assert_counts_add_up(result, 4)


def test_failure_reasons_are_counted_once_each():
    ok = torch.tensor([True, False, False, False, False])
    reasons = {
        "not finite": torch.tensor([False, True, False, False, False]),
        "no signal": torch.tensor([False, True, True, False, False]),
        "at a bound": torch.tensor([True, False, False, True, False]),
    }
    counts = validation.count_failures(ok, reasons)
    assert counts == {"not finite": 1, "no signal": 1, "at a bound": 1, "fit failed": 1}


def test_grid_search_alone_fails_voxels_at_the_ends_of_its_grid():
    data = _three_parameter_data(torch.tensor([0.6, 7.0, 1.2], dtype=torch.float64))
    model = models.ir_three_parameter_model(TI)
    grid = torch.logspace(-2, math.log10(5.0), 120)  # 10 ms to 5 s: 7 s is pinned at 5 s
    grid_only = fitting.fit_varpro(model, data, grid=grid)
    assert grid_only.valid.tolist() == [True, False, True]
    assert grid_only.failures == {"at a bound": 1}
    refined = fitting.fit_lm(model, data)  # LM leaves the grid: 7 s is within the 10 s bound
    assert refined.valid.all()
    assert refined.params["t1"][1].item() == pytest.approx(7.0, rel=1e-3)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (torch.tensor([10.0, 100.0, 1000.0, 5000.0]), "grid of t1 looks like milliseconds"),
        (torch.tensor([0.0, 0.1, 1.0]), "all > 0 s"),
        (torch.tensor([0.1, 1.0]), "at least 3 values"),
    ],
)
def test_a_bad_grid_is_a_clear_error(grid, message):
    with pytest.raises(ValueError, match=message):
        fitting.fit_varpro(models.ir_seed_model(TI), _three_parameter_data(), grid=grid)


# --- the EPG fit of T2 and B1 (fit_epg): the same checks ---------------------------------


def _cpmg(t2: torch.Tensor, b1: torch.Tensor, n: int = 16, esp: float = 0.01):
    """Noiseless CPMG trains (M0 = 1000) from the EPG model, and their echo times (s)."""
    te = torch.arange(1, n + 1, dtype=torch.float64) * esp
    model = models.epg_cpmg_model(te)
    return model(m0=torch.full_like(t2, 1000.0), t2=t2, b1=b1).float(), te.float()


def test_fit_epg_refuses_echo_times_in_ms_and_empty_data():
    data, te = _cpmg(torch.full((3,), 0.1), torch.full((3,), 0.8))
    with pytest.raises(ValueError, match="TE looks like milliseconds: the largest is 160"):
        fitting.fit_epg(data, te * 1000)
    with pytest.raises(ValueError, match=r"data is empty: shape \(16, 0\) has no voxels"):
        fitting.fit_epg(data[:, :0], te)
    with pytest.raises(ValueError, match="the mask selects no voxel"):
        fitting.fit_epg(data, te, mask=torch.zeros(3, dtype=torch.bool))


def test_fit_epg_counts_its_failures_by_reason():
    data, te = _cpmg(torch.full((5,), 0.1), torch.full((5,), 0.8))
    data[:, 1] = float("nan")
    data[:, 2] = 0.0
    data[:, 3] = 1000.0 * torch.exp(-te / 50.0)  # T2 = 50 s, beyond the dictionary's 10 s
    fit = fitting.fit_epg(data, te)
    assert fit.valid.tolist() == [True, False, False, False, True]
    assert fit.failures == {"not finite": 1, "no signal": 1, "at a bound": 1}
    assert all(math.isfinite(loss) for loss in fit.loss_history)  # NaN stays out
    torch.testing.assert_close(fit.params["t2"][[0, 4]], torch.full((2,), 0.1), rtol=6e-3, atol=0)
    _assert_counts_add_up(fit, 5)


def test_fit_epg_gives_a_voxel_the_same_answer_whatever_its_neighbours():
    # The fine match compares residuals energy - projection**2, which cancel in float32: the
    # summation order (set by the chunk's other voxels) used to pick the atom.
    t2 = torch.tensor([0.1, 0.3, 0.05, 1.0, 2.0])
    data, te = _cpmg(t2, torch.tensor([0.8, 0.9, 0.7, 0.95, 0.85]))
    together = fitting.fit_epg(data, te)
    for i in range(len(t2)):
        alone = fitting.fit_epg(data[:, i : i + 1], te)
        torch.testing.assert_close(together.params["t2"][i : i + 1], alone.params["t2"])
    torch.testing.assert_close(together.params["t2"], t2, rtol=0.01, atol=0)


def test_fit_epg_fails_a_t2_beyond_its_dictionary_alone_and_beside_others():
    data, te = _cpmg(torch.full((2,), 0.1), torch.full((2,), 0.8))
    data[:, 1] = 1000.0 * torch.exp(-te / 30.0)  # T2 = 30 s, beyond the dictionary's 10 s
    for fit in (fitting.fit_epg(data[:, 1:], te), fitting.fit_epg(data, te)):
        assert not fit.valid[-1]
        assert fit.failures == {"at a bound": 1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fit_epg_computes_half_precision_in_float32(dtype):
    data, te = _cpmg(torch.tensor([0.05, 0.1, 0.2]), torch.tensor([0.7, 0.8, 0.9]))
    half = fitting.fit_epg(data.to(dtype), te)
    full = fitting.fit_epg(data.to(dtype).float(), te)
    assert half.params["t2"].dtype == torch.float32
    torch.testing.assert_close(half.params["t2"], full.params["t2"], rtol=0, atol=0)
    torch.testing.assert_close(half.params["t2"], torch.tensor([0.05, 0.1, 0.2]), rtol=0.02, atol=0)


def test_voxel_status_finds_one_bad_time_point():
    nan, inf = float("nan"), float("inf")
    voxels = torch.tensor([[1.0, 0.0, nan, 0.0, -inf, 0.0], [-2.0, 0.0, 1.0, nan, 1.0, -3.0]])
    finite, signal = validation.voxel_status(voxels)
    assert finite.tolist() == [True, True, False, False, False, True]
    assert signal.tolist() == [True, False, False, False, False, True]


def test_dictionary_match_refuses_a_grid_in_ms():
    model = models.inversion_recovery(TI)
    data = model(m0=torch.full((3,), 1000.0), t1=T1[:3]).float()
    with pytest.raises(ValueError, match="grid of t1 looks like milliseconds"):
        fitting.dictionary_match(data, model, "t1", T1_GRID * 1000)
    with pytest.raises(ValueError, match="grid of t1 must be > 0 s"):
        fitting.dictionary_match(data, model, "t1", torch.linspace(0, 1, 50))


def test_signal_mask_of_a_volume_above_torch_quantiles_limit():
    """More than 2**24 voxels (e.g. 512x512x64): the same threshold as numpy's percentile."""
    generator = torch.Generator().manual_seed(0)
    data = torch.rand(1, 2**24 + 3, generator=generator) * 1000
    mask = fitting.signal_mask(data, fraction=0.5)
    threshold = 0.5 * np.percentile(data[0].double().numpy(), 99)
    differ = mask != (data[0] > threshold)  # at most the voxels within float32 rounding
    assert int(differ.sum()) <= 3
    assert torch.all((data[0][differ].double() - threshold).abs() < 1e-3)
    assert 0.49 < mask.double().mean() < 0.51  # half the uniform values exceed half of p99


def test_device_copy_is_made_once_and_again_after_a_change():
    """The model's times follow the data once; a change in place makes a fresh copy."""
    device_copy = validation.device_copy
    t = torch.tensor([0.1, 0.5, 1.0])
    a = device_copy(t, torch.device("cpu"), torch.float64)
    assert a.dtype == torch.float64 and torch.equal(a, t.double())
    assert device_copy(t, torch.device("cpu"), torch.float64) is a  # kept
    assert device_copy(t, torch.device("cpu")) is t  # no copy where none is needed
    t[0] = 0.2  # changed in place: the copy must not be stale
    b = device_copy(t, torch.device("cpu"), torch.float64)
    assert b is not a and float(b[0]) == pytest.approx(0.2)
