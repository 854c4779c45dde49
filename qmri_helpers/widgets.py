"""Interactive exploration in JupyterLab: a voxel inspector and a slider over the images.

``ipywidgets`` is an optional extra (``pip install qmri-tutorials[notebooks]``), imported only
when a widget is built. Every widget also carries a static PNG of its current view, so a
notebook rendered without a widget frontend (nbconvert, nbmake, GitHub) shows a figure.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from .fitting import FitResult, signal_mask
from .models import SignalModel

if TYPE_CHECKING:  # pragma: no cover
    import ipywidgets

__all__ = ["inspector_figure", "voxel_inspector", "image_slider"]

#: How a parameter is written in titles and labels.
_DISPLAY = {"t1": "T1", "t2": "T2", "t2star": "T2*"}


def _import_widgets():
    try:
        import ipywidgets
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the interactive widgets need ipywidgets: pip install 'qmri-tutorials[notebooks]'"
        ) from error
    return ipywidgets


def inspector_figure(
    images: torch.Tensor,
    times: torch.Tensor | Sequence[float],
    result: FitResult,
    model_factory: Callable[[torch.Tensor], SignalModel],
    voxel: tuple[int, int, int],
    start: dict[str, torch.Tensor] | None = None,
    name: str = "t1",
    label: str = "TI",
) -> Figure:
    """The inspector's view of one voxel: the map with a cross, and the signal curves.

    Parameters
    ----------
    images
        Measured signal, ``(n_times, z, y, x)``.
    times
        TI or TE per image in s, ``(n_times,)``.
    result
        The fit (e.g. from :func:`~qmri_helpers.fitting.fit_adam`), maps ``(z, y, x)``.
    model_factory
        Builds the signal model for a set of times, e.g. ``qh.models.inversion_recovery``;
        called with a fine time axis to draw smooth curves from the fitted parameters.
    voxel
        ``(slice, row, column)``.
    start
        Start values (e.g. from dictionary matching), drawn as a dashed curve.
    name
        The map shown and reported with its Cramér-Rao SD, in s (shown in ms).
    label
        "TI" or "TE", for the time axis.

    Returns
    -------
    matplotlib.figure.Figure
    """
    z, y, x = voxel
    shown_name = _DISPLAY.get(name, name.upper())
    times = torch.as_tensor(times, dtype=torch.float64).cpu()
    fine = torch.linspace(0, float(times.max()) * 1.05, 200, dtype=torch.float64)
    model = model_factory(fine)
    measured = images[:, z, y, x].detach().cpu().double()

    def curve(params: dict[str, torch.Tensor]) -> np.ndarray:
        values = {k: torch.as_tensor(v[z, y, x], dtype=torch.float64) for k, v in params.items()}
        return model(**values).numpy()

    fig, (ax_map, ax_curve) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    shown_mask = (result.valid & signal_mask(images).cpu()).numpy()  # no background noise
    values = result.params[name].cpu().numpy() * 1000
    vmax = float(np.percentile(values[shown_mask], 99)) if shown_mask.any() else 1.0
    shown = ax_map.imshow(np.ma.masked_where(~shown_mask[z], values[z]), vmin=0, vmax=vmax)
    ax_map.plot([x], [y], "r+", markersize=14, markeredgewidth=2)
    fig.colorbar(shown, ax=ax_map, label=f"{shown_name} (ms)", shrink=0.85)
    ax_map.set(title=f"{shown_name} map, slice {z}", xlabel="column (pixel)",
               ylabel="row (pixel)")  # fmt: skip
    ax_curve.plot(times.numpy() * 1000, measured.numpy(), "ko", label="measured")
    ax_curve.plot(fine.numpy() * 1000, curve(result.params), "-", label="fit")
    if start is not None:
        ax_curve.plot(fine.numpy() * 1000, curve(start), "--", label="dictionary start")
    value = float(result.params[name][z, y, x]) * 1000
    sd = float(result.sd[name][z, y, x]) * 1000 if name in result.sd else float("nan")
    status = "" if bool(result.valid[z, y, x]) else " (fit failed: masked)"
    ax_curve.set(xlabel=f"{label} (ms)", ylabel="signal (a.u.)",
                 title=f"voxel ({z}, {y}, {x}): {shown_name} = {value:.1f} ± {sd:.1f} ms"
                 f"{status}")  # fmt: skip
    ax_curve.legend()
    ax_curve.grid(True, alpha=0.3)
    return fig


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return base64.b64encode(buffer.getvalue()).decode()


def _with_static_view(box: ipywidgets.Widget, draw: Callable[[], Figure]) -> ipywidgets.Widget:
    """Add a PNG of the current view to the widget's display data, for static renderers."""
    widget_bundle = box._repr_mimebundle_

    def bundle(**kwargs):
        data = widget_bundle(**kwargs) or {}
        fig = draw()
        data["image/png"] = _png(fig)
        plt.close(fig)
        return data

    box._repr_mimebundle_ = bundle
    return box


def _redraw(output: ipywidgets.Output, draw: Callable[[], Figure]) -> None:
    from IPython.display import display

    with output:
        output.clear_output(wait=True)
        fig = draw()
        display(fig)
        plt.close(fig)


def voxel_inspector(
    images: torch.Tensor,
    times: torch.Tensor | Sequence[float],
    result: FitResult,
    model_factory: Callable[[torch.Tensor], SignalModel],
    start: dict[str, torch.Tensor] | None = None,
    name: str = "t1",
    label: str = "TI",
    voxel: tuple[int, int, int] | None = None,
) -> ipywidgets.VBox:
    """Slide to a voxel and see its measured curve, the fit, the start and the fitted values.

    Parameters are those of :func:`inspector_figure`; ``voxel`` is where it starts (default:
    the valid voxel nearest the image centre). The returned box holds a slice slider (for 3-D
    data), row and column sliders, and the figure.
    """
    widgets = _import_widgets()
    nz, ny, nx = images.shape[1:]
    if voxel is None:
        valid = result.valid.nonzero()
        centre = torch.tensor([nz // 2, ny // 2, nx // 2])
        voxel = tuple(int(v) for v in valid[(valid - centre).abs().sum(1).argmin()]) if len(
            valid
        ) else (0, ny // 2, nx // 2)  # fmt: skip
    sliders = {
        "slice": widgets.IntSlider(voxel[0], 0, nz - 1, description="slice"),
        "row": widgets.IntSlider(voxel[1], 0, ny - 1, description="row"),
        "column": widgets.IntSlider(voxel[2], 0, nx - 1, description="column"),
    }
    output = widgets.Output()

    def draw() -> Figure:
        where = (sliders["slice"].value, sliders["row"].value, sliders["column"].value)
        return inspector_figure(images, times, result, model_factory, where, start, name, label)

    for slider in sliders.values():
        slider.observe(lambda _: _redraw(output, draw), names="value")
    shown = [s for k, s in sliders.items() if k != "slice" or nz > 1]
    box = widgets.VBox([widgets.HBox(shown), output])
    _redraw(output, draw)
    return _with_static_view(box, draw)


def image_slider(
    images: torch.Tensor,
    times: torch.Tensor | Sequence[float],
    label: str = "TI",
    unit: str = "signal (a.u.)",
) -> ipywidgets.VBox:
    """Step through the TI/TE images (and the slices of 3-D data) with sliders.

    Parameters
    ----------
    images
        ``(n_times, z, y, x)``.
    times
        TI or TE per image in s.
    label, unit
        Time label for the title and the colorbar's unit.
    """
    widgets = _import_widgets()
    times = np.asarray(torch.as_tensor(times).cpu(), dtype=float)
    n, nz = images.shape[:2]
    vmax = float(torch.quantile(images.abs().flatten()[::7].float(), 0.995))
    vmin = min(0.0, float(images.min()))
    index = widgets.IntSlider(0, 0, n - 1, description=label)
    slice_index = widgets.IntSlider(nz // 2, 0, nz - 1, description="slice")
    output = widgets.Output()

    def draw() -> Figure:
        fig, ax = plt.subplots(figsize=(5, 4.2), layout="constrained")
        shown = ax.imshow(images[index.value, slice_index.value].cpu().numpy(), cmap="gray",
                          vmin=vmin, vmax=vmax)  # fmt: skip
        fig.colorbar(shown, ax=ax, label=unit, shrink=0.85)
        ax.set(title=f"{label} = {times[index.value] * 1000:.4g} ms, slice {slice_index.value}",
               xlabel="column (pixel)", ylabel="row (pixel)")  # fmt: skip
        return fig

    for slider in (index, slice_index):
        slider.observe(lambda _: _redraw(output, draw), names="value")
    box = widgets.VBox([widgets.HBox([index] + ([slice_index] if nz > 1 else [])), output])
    _redraw(output, draw)
    return _with_static_view(box, draw)
