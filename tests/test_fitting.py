"""Dictionary matching and the Adam fit, against the phantom's ground truth."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from qmri_helpers import dicom, fitting, metrics, models

T1_GRID = torch.logspace(-2, 1, 300)


@pytest.fixture(scope="module")
def phantom_fit(ir_phantom):
    """The tutorial's pipeline, step for step: load, model, dictionary, Adam."""
    folder, truth = ir_phantom
    images, header = dicom.load_series(folder)
    model = models.inversion_recovery(header.ti)
    start = fitting.dictionary_match(images, model, "t1", T1_GRID)
    result = fitting.fit_adam(model, images, start, n_iter=2000, lr=0.01, progress=False)
    return truth, images, start, result


def test_tutorial_t1_map_is_within_2_percent_of_the_truth(phantom_fit):
    truth, _, _, result = phantom_fit
    in_range = torch.as_tensor(truth.vial_mask((0.1, 2.5)))
    assert in_range.sum() > 500
    error = metrics.relative_error(result.params["t1"], truth.t1)[in_range]
    assert error.abs().median() < 0.02
    for row in metrics.vial_table(result.params["t1"], truth):
        if 0.1 <= row["true"] <= 2.5:
            assert abs(row["median_rel_error"]) < 0.01, row


def test_adam_improves_on_the_dictionary_start(phantom_fit):
    truth, images, start, result = phantom_fit
    in_range = torch.as_tensor(truth.vial_mask((0.1, 2.5)))
    before = metrics.relative_error(start["t1"], truth.t1)[in_range].abs().median()
    after = metrics.relative_error(result.params["t1"], truth.t1)[in_range].abs().median()
    assert after < before
    assert result.loss_history[-1] < result.loss_history[0]
    assert result.n_failed == 0 and bool(result.valid.all())
    m0_error = metrics.relative_error(result.params["m0"], truth.m0)[in_range]
    assert m0_error.abs().median() < 0.01


def test_dictionary_match_is_exact_on_grid_values_and_noiseless_data():
    ti = torch.tensor([0.05, 0.1, 0.3, 0.8, 2.0])
    model = models.inversion_recovery(ti)
    t1 = T1_GRID[[40, 120, 200, 260]]
    m0 = torch.tensor([10.0, 500.0, 1000.0, 3.0])
    start = fitting.dictionary_match(model(m0=m0, t1=t1), model, "t1", T1_GRID)
    assert torch.equal(start["t1"], t1)
    assert torch.allclose(start["m0"], m0, rtol=1e-5)


def test_dictionary_chunks_give_the_same_answer():
    ti = torch.tensor([0.05, 0.1, 0.3, 0.8, 2.0])
    model = models.inversion_recovery(ti)
    data = torch.rand(5, 7, 9, 11) * 100
    whole = fitting.dictionary_match(data, model, "t1", T1_GRID)
    chunked = fitting.dictionary_match(data, model, "t1", T1_GRID, max_bytes=20_000)
    assert torch.equal(whole["t1"], chunked["t1"])
    assert torch.allclose(whole["m0"], chunked["m0"])


def test_dictionary_memory_stays_under_1_gb_for_256x256x64():
    code = textwrap.dedent(
        """
        import resource, torch
        from qmri_helpers import fitting, models
        ti = torch.linspace(0.05, 3.0, 10)
        model = models.inversion_recovery(ti)
        data = torch.rand(10, 64, 256, 256)
        fitting.dictionary_match(data[:, :1, :8, :8], model, "t1", torch.logspace(-2, 1, 300))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fitting.dictionary_match(data, model, "t1", torch.logspace(-2, 1, 300))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert out["t1"].shape == (64, 256, 256)
        print((after - before) / 1024)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    extra_mb = float(run.stdout.strip().splitlines()[-1])
    assert extra_mb < 1024, f"dictionary matching used {extra_mb:.0f} MB extra"


def test_failed_voxels_are_masked_and_counted_never_nan():
    ti = torch.tensor([0.05, 0.1, 0.3, 0.8, 2.0])
    model = models.inversion_recovery(ti)
    truth_t1 = torch.full((4, 4), 0.5)
    data = model(m0=torch.full((4, 4), 100.0), t1=truth_t1)
    data[:, 0, 0] = float("nan")
    data[:, 1, 1] = float("inf")
    start = {"m0": torch.full((4, 4), 90.0), "t1": torch.full((4, 4), 0.4)}
    result = fitting.fit_adam(model, data, start, n_iter=300, lr=0.02, progress=False)
    assert result.n_failed == 2
    assert not result.valid[0, 0] and not result.valid[1, 1]
    for value in result.params.values():
        assert torch.isfinite(value).all()
    assert result.params["t1"][0, 0] == 0
    assert torch.allclose(result.params["t1"][result.valid], truth_t1[result.valid], rtol=0.01)


def test_mask_limits_the_fit():
    ti = torch.tensor([0.05, 0.1, 0.3, 0.8, 2.0])
    model = models.inversion_recovery(ti)
    data = model(m0=torch.full((3, 3), 100.0), t1=torch.full((3, 3), 0.5))
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[1] = True
    start = {"m0": torch.full((3, 3), 100.0), "t1": torch.full((3, 3), 0.45)}
    result = fitting.fit_adam(model, data, start, n_iter=200, mask=mask, progress=False)
    assert result.valid.tolist() == mask.tolist()
    assert (result.params["t1"][~mask] == 0).all()
    assert result.n_failed == 0


def test_loss_history_is_the_mse_of_the_fitted_voxels_in_data_units():
    """Step k's loss is the MSE at the parameters before step k, over the masked voxels only."""
    ti = torch.tensor([0.05, 0.1, 0.3, 0.8, 2.0])
    model = models.inversion_recovery(ti)
    m0 = torch.tensor([[100.0, 2000.0, 40.0], [700.0, 5.0, 300.0]])
    data = model(m0=m0, t1=torch.tensor([[0.5, 1.2, 0.2], [0.9, 0.3, 2.0]]))
    mask = torch.tensor([[True, True, False], [True, False, True]])
    start = {"m0": m0 * 0.9, "t1": torch.full((2, 3), 0.7)}
    seen = []
    result = fitting.fit_adam(
        model, data, start, n_iter=3, mask=mask, progress=False,
        callback=lambda step, params: seen.append({k: v.clone() for k, v in params.items()}),
    )  # fmt: skip
    # the start values, then the parameters after steps 0 and 1, evaluated in float64 by numpy
    states = [{k: v[mask] for k, v in start.items()}, *seen[:2]]
    measured = data[:, mask].double().numpy()
    tis = ti.double().numpy()[:, None]
    for loss, state in zip(result.loss_history, states, strict=True):
        p_m0, p_t1 = (state[k].double().numpy() for k in ("m0", "t1"))
        expected = np.mean((np.abs(p_m0 * (1 - 2 * np.exp(-tis / p_t1))) - measured) ** 2)
        assert loss == pytest.approx(expected, rel=1e-4)
    assert len(result.loss_history) == 3


def test_fit_runs_on_the_requested_device():
    ti = torch.tensor([0.1, 1.0])
    model = models.inversion_recovery(ti)
    data = model(m0=torch.ones(2), t1=torch.ones(2))
    result = fitting.fit_adam(
        model,
        data,
        {"m0": torch.ones(2), "t1": torch.ones(2)},
        n_iter=2,
        device="cpu",
        progress=False,
    )
    assert result.device == torch.device("cpu")
    assert fitting.default_device().type in ("cpu", "cuda")


def test_bad_fit_input_is_a_clear_error():
    model = models.inversion_recovery(torch.tensor([0.1, 1.0]))
    data = torch.ones(2, 4, 4)
    with pytest.raises(ValueError, match=r"start value 't1' has shape \(3, 3\)"):
        fitting.fit_adam(model, data, {"m0": torch.ones(4, 4), "t1": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="init needs a start value for 'm0'"):
        fitting.fit_adam(model, data, {"t1": torch.ones(4, 4)})
    with pytest.raises(TypeError, match="floating-point torch.Tensor"):
        fitting.fit_adam(model, np.ones((2, 4, 4)), {"m0": torch.ones(4, 4)})
    with pytest.raises(ValueError, match="the model gives 2 time points but the data has 3"):
        fitting.dictionary_match(torch.ones(3, 4), model, "t1", T1_GRID)


def test_signal_mask_finds_the_phantom(ir_phantom):
    folder, truth = ir_phantom
    images, _ = dicom.load_series(folder)
    mask = fitting.signal_mask(images).numpy()
    inside = truth.labels > 0
    assert (mask == inside).mean() > 0.99


def test_fits_flush_subnormals_inside_and_restore_the_default(ir_phantom):
    """Background voxels make exp(-TI/T1) subnormal; the fit flushes them, then stops doing so."""
    subnormal = 1e-40  # below float32's smallest normal number, 1.2e-38
    supported = torch.set_flush_denormal(False)  # True where the CPU can flush (x86)
    assert torch.tensor(subnormal, dtype=torch.float32).item() != 0
    seen = []
    images, header = dicom.load_series(ir_phantom[0])
    model = models.inversion_recovery(header.ti)
    start = fitting.dictionary_match(images, model, "t1", T1_GRID)

    def callback(step, params):
        seen.append(torch.tensor(subnormal, dtype=torch.float32).item())

    fitting.fit_adam(model, images, start, n_iter=2, progress=False, callback=callback)
    if supported:
        assert seen == [0.0, 0.0]
    assert torch.tensor(subnormal, dtype=torch.float32).item() != 0
