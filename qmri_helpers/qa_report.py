"""The phantom-QA report: the per-sphere table and its figures.

:func:`sphere_table` turns a fitted T1 (or T2) map and the spheres found into one row per
sphere against the reference values, with the spread and uncertainty of each ROI
(:func:`roi_statistics`); :func:`plot_rois` shows where the ROIs sit and how the plate is
oriented, and :func:`plot_agreement` gives the identity and Bland-Altman plots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .dicom import SeriesHeader
from .reference import Reference, reference_t1
from .spheres import Spheres, roi_values

__all__ = ["roi_statistics", "sphere_table", "plot_rois", "plot_agreement"]


#: SD of the median of n normal samples over their SD / sqrt(n), for large n.
MEDIAN_EFFICIENCY = math.sqrt(math.pi / 2)
#: MAD to SD for normal data.
MAD_TO_SD = 1.4826
#: A reference T1 beyond this multiple of the longest TI is not resolved by the protocol.
LONGEST_TI_FACTOR = 3.0


def roi_statistics(values: np.ndarray, sds: np.ndarray) -> dict[str, float]:
    r"""Median and uncertainty of a fitted quantity in one ROI.

    Parameters
    ----------
    values, sds
        The voxel values and their Cramér-Rao SDs (same unit), ``(n,)``.

    Returns
    -------
    dict
        ``median``; ``iqr`` (interquartile range); ``robust_sd``, the within-ROI spread
        :math:`1.4826\,\mathrm{MAD}` (the SD for normal data, blind to a few outliers);
        ``cr_sd_median``, the Cramér-Rao SD of the ROI median,
        :math:`\sqrt{\pi/2}\,\tilde\sigma_{CR}/\sqrt{n}`, what noise alone would
        give; ``spread_sd_median``, the same from the observed spread,
        :math:`\sqrt{\pi/2}\,\mathrm{SD_{robust}}/\sqrt{n}`, which also holds
        what the noise model misses (non-uniformity, partial volume, a misplaced ROI);
        ``sd_median``, the larger of the two. All in the unit of ``values``.
    """
    values, sds = np.asarray(values, float), np.asarray(sds, float)
    n = max(len(values), 1)
    median = float(np.median(values))
    q1, q3 = np.percentile(values, [25, 75])
    robust_sd = MAD_TO_SD * float(np.median(np.abs(values - median)))
    cr = MEDIAN_EFFICIENCY * float(np.median(sds)) / math.sqrt(n)
    spread = MEDIAN_EFFICIENCY * robust_sd / math.sqrt(n)
    return {
        "median": median, "iqr": float(q3 - q1), "robust_sd": robust_sd,
        "cr_sd_median": cr, "spread_sd_median": spread, "sd_median": max(cr, spread),
    }  # fmt: skip


def sphere_table(
    t1_map: torch.Tensor,
    sd_map: torch.Tensor,
    spheres: Spheres,
    header: SeriesHeader,
    tolerance: float = 0.10,
    reference_ms: Sequence[float] | None = None,
    reference_name: str = "reference",
    max_relative_sd: float = 0.05,
    half: int = 2,
    nominal: Reference | None = None,
    resolved_ms: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """Per-sphere results: measured T1 (or T2), spread, uncertainty, nominal value, verdict.

    Parameters
    ----------
    t1_map, sd_map
        One slice of the fitted T1 and its Cramér-Rao SD, in s, ``(y, x)``.
    spheres
        From :func:`~qmri_helpers.spheres.label_by_values` (or
        :func:`~qmri_helpers.spheres.find_spheres`).
    header
        The series' header: field strength and TIs.
    tolerance
        Largest relative difference from nominal that passes.
    reference_ms
        Optional second reference per sphere 1-15 in ms, e.g. hazen's fitted values.
    reference_name
        Column label of that reference.
    max_relative_sd
        A sphere whose ROI median is uncertain by more than this fraction (the larger of its
        Cramér-Rao SD and the SD from the spread inside the ROI, :func:`roi_statistics`) is
        flagged unreliable.
    half
        ROI half-width (2: a 5x5 ROI).
    nominal
        The nominal values (:func:`~qmri_helpers.reference.reference_t1`, or
        :func:`~qmri_helpers.reference.reference_t2` for a T2 map); None takes the T1 of
        plate 5, version 1, 20 °C at the header's field strength. Its ``quantity`` names
        the columns ("T1 median (ms)", "T2 median (ms)").
    resolved_ms
        The nominal values (ms) the protocol resolves; None takes the shortest TI to
        3 times the longest TI of the header.

    Returns
    -------
    pandas.DataFrame
        One row per sphere 1-14, in ms and %. ``status`` is "pass", "fail" or "unreliable":
        a sphere whose nominal T1 is outside what the TIs resolve (below the shortest TI, or
        beyond 3 times the longest), or whose median is too uncertain, is never reported as a
        pass. The ``reference`` column names the plate, version and temperature, with
        "(assumed)" where they were not given; ``table.attrs`` holds the same.
    """
    if nominal is None:
        nominal = reference_t1(5, header.field_strength)
    nominal_ms, q = nominal.ms, nominal.quantity
    if resolved_ms is None:
        shortest = f"the shortest TI ({float(header.ti.min()) * 1000:g} ms)"
        longest = f"{LONGEST_TI_FACTOR:g}x the longest TI ({float(header.ti.max()) * 1000:g} ms)"
        resolved_ms = (
            float(header.ti.min()) * 1000,
            LONGEST_TI_FACTOR * float(header.ti.max()) * 1000,
        )
    else:
        shortest, longest = (f"{v:g} ms" for v in resolved_ms)
    t1_rois = roi_values(t1_map, spheres.centres, half)
    sd_rois = roi_values(sd_map, spheres.centres, half)
    rows = []
    for i in range(14):
        stats = roi_statistics(t1_rois[i] * 1000, sd_rois[i] * 1000)
        median = stats["median"]
        relative = stats["sd_median"] / median if median > 0 else math.inf
        if nominal_ms[i] < resolved_ms[0]:
            reliable, note = False, f"{q} below {shortest}: not resolved"
        elif nominal_ms[i] > resolved_ms[1]:
            reliable, note = False, f"{q} beyond {longest}: not resolved"
        elif relative > max_relative_sd:
            reliable, note = False, (
                f"median uncertain by {relative:.0%} (noise alone: "
                f"{stats['cr_sd_median'] / median:.1%}, spread in the ROI: "
                f"{stats['spread_sd_median'] / median:.1%})"
            )  # fmt: skip
        else:
            reliable, note = True, ""
        difference = median / nominal_ms[i] - 1
        row = {
            "sphere": i + 1,
            f"{q} median (ms)": round(median, 1),
            f"{q} IQR (ms)": round(stats["iqr"], 1),
            "robust SD (%)": round(100 * stats["robust_sd"] / median, 2) if median > 0 else np.nan,
            "CR SD of median (%)": round(100 * stats["cr_sd_median"] / median, 2)
            if median > 0
            else np.nan,
            "SD of median (%)": round(100 * relative, 2),
            f"nominal {nominal.field_strength:g} T (ms)": round(float(nominal_ms[i]), 2),
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
        row["reference"] = nominal.label
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs.update(
        reference=nominal.label, assumptions=nominal.assumptions, plate=nominal.plate,
        version=nominal.version, temperature_c=nominal.temperature_c,
    )  # fmt: skip
    return table


def plot_rois(
    image: torch.Tensor | np.ndarray,
    spheres: Spheres,
    half: int = 2,
    title: str = "",
    plate: int | None = None,
) -> Figure:
    """The image with each ROI drawn and numbered, for the user to check the sphere finder.

    Red: a circle was detected at the sphere; orange: the position comes from the
    registered template alone; blue: point 15, an ROI in the water fill (no sphere). The
    numbers are white with a black outline, outside the spheres, so that they read on any
    background. The subtitle gives the plate (if known) and the orientation that was found.
    """
    image = np.asarray(torch.as_tensor(image).detach().cpu(), dtype=float)
    fig, ax = plt.subplots(figsize=(7, 7.2), layout="constrained")
    shown = ax.imshow(np.abs(image), cmap="gray")
    fig.colorbar(shown, ax=ax, label="|signal| (a.u.)", shrink=0.7, location="right")
    middle = spheres.centres[:14].mean(0)
    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    for i, (row, col) in enumerate(spheres.centres):
        colour = "tab:blue" if i == 14 else "tab:red" if spheres.detected[i] else "tab:orange"
        if i < 14:
            ax.add_patch(
                plt.Circle((col, row), spheres.radius_px, fill=False, color=colour, lw=0.8, ls=":")
            )
        ax.add_patch(
            plt.Rectangle(
                (col - half - 0.5, row - half - 0.5), 2 * half + 1, 2 * half + 1,
                fill=False, color=colour, lw=1.5,
            )
        )  # fmt: skip
        away = np.array([row, col]) - middle  # put the number outside the sphere
        away = away / (np.linalg.norm(away) or 1.0) * spheres.radius_px * 1.6
        ax.annotate(
            str(i + 1), (col + away[1], row + away[0]), ha="center", va="center",
            color="white", fontsize=10, weight="bold", path_effects=outline,
        )  # fmt: skip
    handles = [
        Line2D([], [], marker="s", ls="", mfc="none", mec=c, mew=1.5, ms=9, label=label)
        for c, label in (
            ("tab:red", "ROI, circle detected"),
            ("tab:orange", "ROI, template position only"),
            ("tab:blue", "15: water fill (no sphere)"),
        )
    ]
    ax.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, fontsize=8,
        frameon=False,
    )  # fmt: skip
    found = [f"plate {plate}"] if plate is not None else []
    found.append(spheres.orientation)
    if not math.isnan(spheres.rank_correlation):
        found.append(
            f"rank correlation {spheres.rank_correlation:+.2f}, margin {spheres.margin:.2f}"
        )
    ax.set_title(", ".join(found), fontsize=9)
    fig.suptitle(title or "Spheres found: check that every square sits inside its sphere")
    ax.set_xlabel("column (pixel)")
    ax.set_ylabel("row (pixel)")
    return fig


def plot_agreement(table: pd.DataFrame, title: str = "") -> Figure:
    """Identity plot on log axes and Bland-Altman plot of measured against nominal T1 (or T2).

    The title names the nominal values (plate, version, temperature, field) from
    ``table.attrs["reference"]``, as :func:`sphere_table` sets it.
    """
    nominal_col = next(c for c in table.columns if c.startswith("nominal"))
    measured_col = next(c for c in table.columns if c.endswith(" median (ms)"))
    quantity = measured_col.split()[0]
    nominal = table[nominal_col].to_numpy(float)
    measured = table[measured_col].to_numpy(float)
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
    ax_id.set(xlabel=f"{nominal_col}", ylabel=f"measured {quantity} (ms)", title="Identity plot")
    differences = 100 * (measured - nominal) / ((measured + nominal) / 2)
    bias, spread = differences[reliable].mean(), 1.96 * differences[reliable].std(ddof=1)
    for level, style in ((bias, "-"), (bias + spread, "--"), (bias - spread, "--")):
        ax_ba.axhline(level, color="gray", ls=style, lw=0.8)
    ax_ba.set(
        xlabel=f"mean of measured and nominal {quantity} (ms)",
        ylabel="difference / mean (%)",
        title=f"Bland-Altman: bias {bias:+.1f}%, limits ±{spread:.1f}%",
    )
    for ax in (ax_id, ax_ba):
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    against = table.attrs.get("reference")
    if title or against:
        fig.suptitle("\n".join(t for t in (title, against and f"nominal: {against}") if t))
    return fig
