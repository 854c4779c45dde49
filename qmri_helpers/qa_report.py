"""The phantom-QA report: the per-sphere table and its figures.

:func:`sphere_table` turns a fitted T1 map and the spheres found into one row per sphere
against the reference values; :func:`plot_rois` shows where the ROIs sit, and
:func:`plot_agreement` the identity and Bland-Altman plots.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from .dicom import SeriesHeader
from .reference import nominal_t1
from .spheres import Spheres, roi_values

__all__ = ["sphere_table", "plot_rois", "plot_agreement"]


def sphere_table(
    t1_map: torch.Tensor,
    sd_map: torch.Tensor,
    spheres: Spheres,
    header: SeriesHeader,
    tolerance: float = 0.10,
    reference_ms: Sequence[float] | None = None,
    reference_name: str = "reference",
    max_relative_sd: float = 0.10,
    half: int = 2,
) -> pd.DataFrame:
    """Per-sphere results: measured T1, nominal T1, differences, reliability, pass/fail.

    Parameters
    ----------
    t1_map, sd_map
        One slice of the fitted T1 and its Cramér-Rao SD, in s, ``(y, x)``.
    spheres
        From :func:`find_spheres`.
    header
        The series' header: field strength (for the nominal values) and TIs.
    tolerance
        Largest relative difference from nominal that passes.
    reference_ms
        Optional second reference per sphere 1-15 in ms, e.g. hazen's fitted values.
    reference_name
        Column label of that reference.
    max_relative_sd
        A sphere whose median SD/T1 exceeds this is flagged unreliable.
    half
        ROI half-width (2: a 5x5 ROI).

    Returns
    -------
    pandas.DataFrame
        One row per sphere 1-14, in ms and %. ``status`` is "pass", "fail" or "unreliable":
        a sphere whose nominal T1 is shorter than the shortest TI, or whose fit is too
        uncertain, is never reported as a pass.
    """
    nominal = np.asarray(nominal_t1(header.field_strength)) * 1000
    shortest_ti = float(header.ti.min()) * 1000
    t1_rois = roi_values(t1_map, spheres.centres, half)
    sd_rois = roi_values(sd_map, spheres.centres, half)
    rows = []
    for i in range(14):
        values = t1_rois[i] * 1000
        median = float(np.median(values))
        q1, q3 = np.percentile(values, [25, 75])
        relative_sd = float(np.median(sd_rois[i] * 1000 / np.maximum(values, 1e-9)))
        if nominal[i] < shortest_ti:
            reliable, note = False, f"T1 below the shortest TI ({shortest_ti:g} ms): not resolved"
        elif relative_sd > max_relative_sd or median <= 0:
            reliable, note = False, f"fit too uncertain (SD {relative_sd:.0%} of T1)"
        else:
            reliable, note = True, ""
        difference = median / nominal[i] - 1
        row = {
            "sphere": i + 1,
            "T1 median (ms)": round(median, 1),
            "T1 IQR (ms)": round(float(q3 - q1), 1),
            "SD/T1 (%)": round(100 * relative_sd, 2),
            f"nominal {header.field_strength:g} T (ms)": nominal[i],
            "vs nominal (%)": round(100 * difference, 2),
        }
        if reference_ms is not None:
            row[f"{reference_name} (ms)"] = reference_ms[i]
            row[f"vs {reference_name} (%)"] = round(100 * (median / reference_ms[i] - 1), 2)
        if not reliable:
            row["status"] = "unreliable"
        else:
            row["status"] = "pass" if abs(difference) <= tolerance else "fail"
        row["note"] = note
        rows.append(row)
    return pd.DataFrame(rows)


def plot_rois(
    image: torch.Tensor | np.ndarray, spheres: Spheres, half: int = 2, title: str = ""
) -> Figure:
    """The image with each ROI drawn and numbered, for the user to check the sphere finder."""
    image = np.asarray(torch.as_tensor(image).detach().cpu(), dtype=float)
    fig, ax = plt.subplots(figsize=(6, 6), layout="constrained")
    shown = ax.imshow(np.abs(image), cmap="gray")
    fig.colorbar(shown, ax=ax, label="|signal| (a.u.)", shrink=0.8)
    for i, (row, col) in enumerate(spheres.centres):
        colour = "tab:red" if spheres.detected[i] else "tab:orange"
        ax.add_patch(
            plt.Circle((col, row), spheres.radius_px, fill=False, color=colour, lw=0.8, ls=":")
        )
        ax.add_patch(
            plt.Rectangle(
                (col - half - 0.5, row - half - 0.5), 2 * half + 1, 2 * half + 1,
                fill=False, color=colour, lw=1.2,
            )
        )  # fmt: skip
        ax.annotate(
            str(i + 1), (col, row), xytext=(spheres.radius_px * 0.8, -spheres.radius_px * 0.8),
            textcoords="offset points", color="yellow", fontsize=9, weight="bold",
        )  # fmt: skip
    ax.set_title(title or "Spheres found\n(red: circle detected, orange: template only)")
    ax.set_xlabel("column (pixel)")
    ax.set_ylabel("row (pixel)")
    return fig


def plot_agreement(table: pd.DataFrame, title: str = "") -> Figure:
    """Identity plot on log axes and Bland-Altman plot of measured against nominal T1."""
    nominal_col = next(c for c in table.columns if c.startswith("nominal"))
    nominal = table[nominal_col].to_numpy(float)
    measured = table["T1 median (ms)"].to_numpy(float)
    reliable = (table["status"] != "unreliable").to_numpy()
    fig, (ax_id, ax_ba) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    for mask, style, label in ((reliable, "o", "reliable"), (~reliable, "x", "unreliable")):
        ax_id.loglog(nominal[mask], measured[mask], style, label=label)
        mean = (nominal[mask] + measured[mask]) / 2
        ax_ba.semilogx(mean, 100 * (measured[mask] - nominal[mask]) / mean, style, label=label)
    lims = [min(nominal.min(), measured.min()) * 0.8, max(nominal.max(), measured.max()) * 1.2]
    ax_id.plot(lims, lims, "k-", lw=0.8, label="identity")
    for sphere, x, y in zip(table["sphere"], nominal, measured, strict=True):
        ax_id.annotate(str(sphere), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7)
    ax_id.set(xlabel=f"{nominal_col}", ylabel="measured T1 (ms)", title="Identity plot")
    differences = 100 * (measured - nominal) / ((measured + nominal) / 2)
    bias, spread = differences[reliable].mean(), 1.96 * differences[reliable].std(ddof=1)
    for level, style in ((bias, "-"), (bias + spread, "--"), (bias - spread, "--")):
        ax_ba.axhline(level, color="gray", ls=style, lw=0.8)
    ax_ba.set(
        xlabel="mean of measured and nominal T1 (ms)",
        ylabel="difference / mean (%)",
        title=f"Bland-Altman: bias {bias:+.1f}%, limits ±{spread:.1f}%",
    )
    for ax in (ax_id, ax_ba):
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig
