"""The voxel inspector and image slider: real figures, and a static view for static renderers."""

from __future__ import annotations

import base64

import matplotlib
import pytest
import torch

from qmri_helpers import dicom, fitting, models, widgets

matplotlib.use("Agg")
pytest.importorskip("ipywidgets")


@pytest.fixture(scope="module")
def fitted(ir_phantom):
    folder, truth = ir_phantom
    images, header = dicom.load_series(folder)
    model = models.inversion_recovery(header.ti)
    start = fitting.dictionary_match(images, model, "t1", torch.logspace(-2, 1, 100))
    result = fitting.fit_adam(model, images, start, n_iter=300, progress=False)
    return images, header, result, start, truth


def test_inspector_figure_reports_the_fitted_voxel(fitted):
    images, header, result, start, truth = fitted
    row, col = (truth.labels[0] == 5).nonzero()
    voxel = (0, int(row[0]), int(col[0]))
    fig = widgets.inspector_figure(
        images, header.ti, result, models.inversion_recovery, voxel, start
    )
    ax_map, ax_curve = fig.axes[0], fig.axes[1]
    t1_ms = float(result.params["t1"][voxel]) * 1000
    assert f"T1 = {t1_ms:.1f} ± " in ax_curve.get_title()
    assert abs(t1_ms / (truth.t1[voxel] * 1000) - 1) < 0.05
    assert ax_curve.get_xlabel() == "TI (ms)" and ax_map.get_title().startswith("T1 map")
    assert [t.get_text() for t in ax_curve.get_legend().get_texts()] == [
        "measured", "fit", "dictionary start",
    ]  # fmt: skip
    measured = ax_curve.lines[0].get_ydata()
    assert measured == pytest.approx(images[:, 0, voxel[1], voxel[2]].numpy())


def test_voxel_inspector_moves_and_has_a_static_view(fitted):
    images, header, result, start, _ = fitted
    box = widgets.voxel_inspector(images, header.ti, result, models.inversion_recovery, start)
    bundle = box._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    before = base64.b64decode(bundle["image/png"])
    assert before[:4] == b"\x89PNG"
    sliders = box.children[0].children
    assert [s.description for s in sliders] == ["row", "column"]  # one slice: no slice slider
    sliders[0].value = 10  # a background voxel
    after = base64.b64decode(box._repr_mimebundle_()["image/png"])
    assert after != before


def test_image_slider_steps_through_the_images(fitted):
    images, header, *_ = fitted
    box = widgets.image_slider(images, header.ti)
    first = box._repr_mimebundle_()["image/png"]
    box.children[0].children[0].value = 5
    assert box._repr_mimebundle_()["image/png"] != first
