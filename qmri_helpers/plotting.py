"""Figures for the tutorials: image grids titled by TI/TE, and maps with units on colorbars."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["MapSpec", "show_series", "show_maps", "show_loss"]


def _image(x: torch.Tensor | np.ndarray, slice_index: int = 0) -> np.ndarray:
    """A 2-D numpy image from ``(y, x)`` or ``(z, y, x)`` data (slice ``slice_index``)."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.ndim == 3:
        x = x[slice_index]
    if x.ndim != 2:
        raise ValueError(f"expected an image (y, x) or volume (z, y, x), got shape {x.shape}")
    return x


def show_series(
    images: torch.Tensor,
    times: torch.Tensor | Sequence[float],
    label: str = "TI",
    unit: str = "signal (a.u.)",
    slice_index: int = 0,
    ncols: int = 5,
    title: str | None = None,
    cmap: str = "gray",
) -> Figure:
    """Show one image per contrast, titled with its TI or TE in ms.

    Parameters
    ----------
    images
        Shape ``(n, z, y, x)`` or ``(n, y, x)``.
    times
        TI or TE per image, in s, shape ``(n,)``.
    label
        "TI" or "TE", used in the panel titles.
    unit
        Colorbar label.
    slice_index
        Slice shown for 3-D data.
    ncols
        Panels per row.
    title
        Figure title.
    cmap
        Colormap (gray for magnitude; a diverging map suits signed data).

    Returns
    -------
    matplotlib.figure.Figure
    """
    times = np.asarray(torch.as_tensor(times).cpu(), dtype=float)
    if len(times) != images.shape[0]:
        raise ValueError(f"{len(times)} times for {images.shape[0]} images")
    frames = [_image(images[i], slice_index) for i in range(images.shape[0])]
    vmin = min(0.0, min(float(f.min()) for f in frames))
    vmax = max(float(np.percentile(f, 99.5)) for f in frames)
    nrows = int(np.ceil(len(frames) / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(2.4 * ncols + 1, 2.5 * nrows + 0.6), squeeze=False,
        layout="constrained",
    )  # fmt: skip
    for ax in axes.flat:
        ax.axis("off")
    for ax, frame, t in zip(axes.flat, frames, times, strict=False):
        shown = ax.imshow(frame, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(f"{label} = {t * 1000:.4g} ms")
    fig.colorbar(shown, ax=axes, label=unit, shrink=0.8)
    fig.suptitle(title or f"Images sorted by {label}")
    return fig


@dataclass
class MapSpec:
    """One panel of :func:`show_maps`: an image, its title and the unit of its colorbar."""

    image: torch.Tensor | np.ndarray
    title: str
    unit: str
    vmin: float | None = None
    vmax: float | None = None
    cmap: str = "viridis"
    scale: float = 1.0


def show_maps(
    panels: Sequence[MapSpec],
    mask: torch.Tensor | np.ndarray | None = None,
    slice_index: int = 0,
    title: str | None = None,
    ncols: int | None = None,
) -> Figure:
    """Show parameter maps side by side, each with a colorbar that states its unit.

    Parameters
    ----------
    panels
        The maps; ``scale`` multiplies the values (e.g. 1000 to show T1 in ms).
    mask
        Voxels to show; the others are blank. Shape ``(z, y, x)`` or ``(y, x)``.
    slice_index
        Slice shown for 3-D data.
    title
        Figure title.
    ncols
        Panels per row (default: all in one row).

    Returns
    -------
    matplotlib.figure.Figure
    """
    ncols = ncols or len(panels)
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows + 0.4), squeeze=False,
        layout="constrained",
    )  # fmt: skip
    shown_mask = None if mask is None else _image(mask, slice_index).astype(bool)
    for ax in axes.flat:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels, strict=False):
        values = _image(panel.image, slice_index).astype(float) * panel.scale
        if shown_mask is not None:
            values = np.ma.masked_where(~shown_mask, values)
        artist = ax.imshow(values, cmap=panel.cmap, vmin=panel.vmin, vmax=panel.vmax)
        ax.set_title(panel.title)
        fig.colorbar(artist, ax=ax, label=panel.unit, shrink=0.85)
    if title:
        fig.suptitle(title)
    return fig


def show_loss(history: Sequence[float], title: str = "Adam fit: loss per iteration") -> Figure:
    """Plot a loss history on a log axis."""
    fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
    ax.semilogy(np.arange(1, len(history) + 1), history)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean squared error (a.u.²)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return fig
