"""Every figure has a title and states its units."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from qmri_helpers import plotting
from qmri_helpers.plotting import MapSpec

matplotlib.use("Agg")


def _colorbar_labels(fig):
    return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_series_grid_titles_each_image_with_its_time_in_ms():
    fig = plotting.show_series(torch.rand(3, 1, 8, 8), torch.tensor([0.05, 0.1, 2.0]), ncols=2)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["TI = 50 ms", "TI = 100 ms", "TI = 2000 ms"]
    assert fig.get_suptitle() == "Images sorted by TI"
    assert _colorbar_labels(fig) == ["signal (a.u.)"]


def test_series_grid_rejects_mismatched_times():
    with pytest.raises(ValueError, match="2 times for 3 images"):
        plotting.show_series(torch.rand(3, 1, 8, 8), [0.1, 0.2])


def test_maps_have_titles_and_units_and_scale(tmp_path):
    t1 = torch.full((1, 8, 8), 0.5)
    fig = plotting.show_maps(
        [MapSpec(torch.ones(1, 8, 8), "M0", "M0 (a.u.)"), MapSpec(t1, "T1", "T1 (ms)", scale=1000)],
        mask=torch.ones(1, 8, 8, dtype=torch.bool),
        title="Fitted maps",
    )
    assert fig.get_suptitle() == "Fitted maps"
    assert _colorbar_labels(fig) == ["M0 (a.u.)", "T1 (ms)"]
    shown = fig.axes[1].images[0].get_array()
    assert float(shown.max()) == pytest.approx(500.0)
    fig.savefig(tmp_path / "maps.png")


def test_loss_plot_is_labelled():
    fig = plotting.show_loss([3.0, 2.0, 1.0])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "iteration" and "a.u." in ax.get_ylabel() and ax.get_title()


def test_maps_reject_non_images():
    with pytest.raises(ValueError, match="expected an image"):
        plotting.show_maps([MapSpec(torch.ones(2, 2, 2, 2), "x", "x (s)")])
