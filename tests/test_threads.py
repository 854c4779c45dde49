"""Torch's thread count: fits that do not depend on it, and a policy that sees other processes.

The reference of the first test is the same fit on one thread: a map must not change with the
number of threads torch uses (the thread policy changes it from call to call with the load of
the machine).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch

from qmri_helpers import fitting, models, phantom

FITS = {
    "fit_varpro, grid only": lambda model, data: fitting.fit_varpro(model, data),
    "fit_lm": fitting.fit_lm,
}
MODELS = {"seed": models.ir_seed_model, "3-parameter": models.ir_three_parameter_model}


@pytest.fixture(scope="module")
def phantom_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Images (10, 64, 64) of the synthetic IR phantom (SNR 100, float32) and its vial mask."""
    truth = phantom.make_phantom((64, 64))
    ti = phantom.DEFAULT_TI
    images = phantom.simulate_inversion_recovery(truth, ti, 15.0, snr=100, seed=3)
    return torch.from_numpy(images)[:, 0].float(), torch.as_tensor(truth.vial_mask((0.1, 2.5))[0])


def _maps(result: fitting.FitResult) -> dict[str, torch.Tensor]:
    maps = {f"params[{k}]": v for k, v in result.params.items()}
    maps |= {f"sd[{k}]": v for k, v in result.sd.items()}
    return maps | {
        "valid": result.valid,
        "residual_norm": result.residual_norm,
        "r_squared": result.r_squared,
        "noise_sigma": torch.tensor(result.noise_sigma),
    }


@pytest.mark.parametrize("voxels", ["all", 5, 7, 10], ids=lambda v: f"voxels={v}")
@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
@pytest.mark.parametrize("fit", FITS.values(), ids=FITS.keys())
def test_fits_do_not_depend_on_the_thread_count(monkeypatch, phantom_images, fit, make, voxels):
    """Every map of a fit on 2 threads equals that on 1 thread (to 1e-12, relative).

    A handful of voxels is the case that failed: MKL splits the rows of the grid's float32
    matrix product between 2 threads when there are 5 to 11 of them, and rounds differently
    then; the grid's parabola and the fits of the grid alone followed.
    """
    monkeypatch.setattr(fitting, "THREAD_POLICY", False)  # the thread count set here is used
    images, vials = phantom_images
    data = images if voxels == "all" else images[:, vials][:, :voxels]
    model = make(torch.tensor(phantom.DEFAULT_TI))
    before = torch.get_num_threads()
    maps = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            maps[threads] = _maps(fit(model, data))
    finally:
        torch.set_num_threads(before)
    for name, value in maps[1].items():
        torch.testing.assert_close(
            maps[2][name],
            value,
            rtol=1e-12,
            atol=0,
            equal_nan=True,
            msg=lambda m, name=name: f"{name}: {m}",
        )


# --- idle_cores: the load of other processes only -------------------------------------------


def test_idle_cores_does_not_count_this_process(monkeypatch):
    """Runnable tasks that are this process's own threads leave their cores idle."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(fitting, "_read", lambda path: b"0.50 0.40 0.30 3/120 4567\n")
    monkeypatch.setattr(fitting, "_own_runnable_threads", lambda: 3)
    assert fitting.idle_cores() == 4  # all 3 runnable tasks are ours
    monkeypatch.setattr(fitting, "_own_runnable_threads", lambda: 1)
    assert fitting.idle_cores() == 2  # 2 runnable tasks of other processes
    monkeypatch.setattr(fitting, "_read", lambda path: b"9.0 9.0 9.0 9/120 4567\n")
    assert fitting.idle_cores() == 1  # never fewer than 1


def test_idle_cores_falls_back_to_the_load_average(monkeypatch):
    """Without /proc (macOS, Windows): the 1-minute load average less this thread."""

    def no_proc(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(fitting, "_read", no_proc)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 1.0, 1.0), raising=False)
    assert fitting.idle_cores() == 6  # 3 runnable, 1 of them this thread

    def no_load():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", no_load, raising=False)
    assert fitting.idle_cores() == 8


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_own_runnable_threads_sees_a_busy_torch_thread():
    """A thread of this process inside a long torch operation counts as runnable (state R)."""
    stop = threading.Event()
    values = torch.rand(2**20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def work():  # torch releases the GIL, so this thread stays runnable while it sorts
        while not stop.is_set():
            torch.sort(values)

    worker = threading.Thread(target=work)
    worker.start()
    try:
        time.sleep(0.05)
        counts = [fitting._own_runnable_threads() for _ in range(50)]
    finally:
        stop.set()
        worker.join()
    assert max(counts) >= 2, counts  # the caller and the sorting thread
    assert min(counts) >= 1
