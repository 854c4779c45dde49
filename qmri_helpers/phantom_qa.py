"""Phantom QA for the T1 plate of the ISMRM/NIST (Caliber) system phantom.

Reference values, sphere finding, and a per-sphere report.

Reference values are those of hazen's ``relaxometry_params.py`` and hazen's own tests, as listed
in ``../shared/data/hazen-system-phantom-relaxometry/README.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy import ndimage
from skimage.feature import canny
from skimage.transform import hough_circle, hough_circle_peaks

from . import dicom, fitting, models
from .dicom import SeriesHeader

__all__ = [
    "NOMINAL_T1_MS",
    "HAZEN_FITTED_T1_MS",
    "TEMPLATE_CENTRES",
    "TEMPLATE_SPACING_MM",
    "Spheres",
    "nominal_t1",
    "find_spheres",
    "template_spheres",
    "roi_values",
    "roi_curves",
    "check_series",
    "sphere_table",
    "plot_rois",
    "plot_agreement",
    "QAResult",
    "t1_model_for",
    "run_t1_qa",
]

#: Manufacturer nominal T1 (ms) of plate 5, spheres 1-14 and 15 (the water fill), by field (T).
NOMINAL_T1_MS: dict[float, tuple[float, ...]] = {
    1.5: (2033, 1489, 1012, 730.8, 514.1, 367.9, 260.1, 184.6, 132.7, 92.7, 65.4, 46.32, 32.45,
          22.859, 2700),
    3.0: (1989, 1454, 984.1, 706, 496.7, 351.5, 247.13, 175.3, 125.9, 89.0, 62.7, 44.53, 30.84,
          21.719, 2700),
}  # fmt: skip
#: hazen's fitted T1 (ms) of plate 5 per site, spheres 1-15, from hazen's tests.
HAZEN_FITTED_T1_MS: dict[str, tuple[float, ...]] = {
    "site1": (1862.6, 1435.8, 999.9, 740.7, 498.2, 351.6, 255.2, 178.0, 131.7, 93.3, 66.6, 45.1,
              32.5, 22.4, 2632),
    "site2": (1880.5, 1432.3, 1012.0, 742.5, 504.0, 354.4, 256.3, 178.9, 131.9, 93.8, 67.9, 45.8,
              33.4, 23.6, 2700),
    "site4": (1856.54, 1414.10, 973.43, 706.07, 500.16, 354.23, 251.70, 175.92, 129.89, 91.89,
              65.44, 45.51, 32.39, 23.12, 2587),
}  # fmt: skip
#: Sphere centres (row, col) of spheres 1-15 on hazen's 192x192 plate-5 template.
TEMPLATE_CENTRES: tuple[tuple[int, int], ...] = (
    (56, 95), (62, 117), (81, 133), (104, 134), (124, 121), (133, 98), (127, 75), (109, 61),
    (84, 60), (64, 72), (80, 81), (78, 111), (109, 113), (110, 82), (97, 43),
)  # fmt: skip
#: Pixel size (mm) of the template: a 250 mm field of view on 192 pixels.
TEMPLATE_SPACING_MM = 250 / 192
#: Radius (mm) of the T1-plate spheres, as seen in the hazen scans.
SPHERE_RADIUS_MM = (8.0, 13.0)


def nominal_t1(field_strength: float | None) -> tuple[float, ...]:
    """Nominal T1 (s) of spheres 1-15 for the nearest tabulated field (1.5 or 3 T)."""
    if field_strength is None:
        raise ValueError("the field strength is unknown: pass 1.5 or 3.0 (T)")
    nearest = min(NOMINAL_T1_MS, key=lambda b: abs(b - field_strength))
    if abs(nearest - field_strength) > 0.3:
        raise ValueError(
            f"no nominal T1 values for {field_strength} T; tables exist for 1.5 and 3.0 T"
        )
    return tuple(v / 1000 for v in NOMINAL_T1_MS[nearest])


@dataclass(frozen=True)
class Spheres:
    """Where the spheres of the plate are, in pixel coordinates of one image.

    Attributes
    ----------
    centres
        ``(15, 2)`` array of (row, col) for spheres 1-15 (15: a point in the water fill).
    detected
        ``(15,)`` booleans: True where a circle was detected at the sphere, False where the
        position comes from the registered template alone.
    radius_px
        Sphere radius in pixels (median of the detected circles).
    rotation_deg, shift_px
        The registration of the template, placed at the image centre: its rotation and
        translation (row, col).
    residual_mm
        RMS distance between the registered template and the matched circles.
    """

    centres: np.ndarray
    detected: np.ndarray
    radius_px: float
    rotation_deg: float
    shift_px: tuple[float, float]
    residual_mm: float


def _template_mm() -> np.ndarray:
    """Template centres in mm relative to the template's centre, ``(15, 2)``."""
    centre = (192 - 1) / 2
    return (np.asarray(TEMPLATE_CENTRES, float) - centre) * TEMPLATE_SPACING_MM


def template_spheres(shape: tuple[int, int], spacing_mm: float) -> np.ndarray:
    """The template centres (row, col) placed in an image of ``shape`` without registration."""
    return _template_mm() / spacing_mm + (np.asarray(shape, float) - 1) / 2


def _rotate(points: np.ndarray, angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return points @ np.array([[c, s], [-s, c]])


def _detect_circles(
    images: np.ndarray, inside: np.ndarray, spacing_mm: float, n_peaks: int = 24
) -> tuple[np.ndarray, np.ndarray]:
    """Detect circles: centres (row, col) and radii (px), by a Hough transform.

    The edges are the union of the Canny edges of every contrast image, inside the phantom.
    """
    edges = np.zeros(images.shape[1:], dtype=bool)
    for image in images:
        scale = np.percentile(np.abs(image), 99) or 1.0
        edges |= canny(
            np.abs(image) / scale, sigma=1.5, low_threshold=0.05, high_threshold=0.15, mask=inside
        )
    lo, hi = SPHERE_RADIUS_MM
    radii = np.arange(max(2, int(lo / spacing_mm)), int(math.ceil(hi / spacing_mm)) + 1)
    accumulator = hough_circle(edges, radii)
    separation = int(12 / spacing_mm)
    _, cols, rows, found_radii = hough_circle_peaks(
        accumulator, radii, total_num_peaks=n_peaks,
        min_xdistance=separation, min_ydistance=separation,
    )  # fmt: skip
    return np.stack([rows, cols], 1).astype(float), found_radii.astype(float)


def find_spheres(
    images: torch.Tensor | np.ndarray,
    spacing_mm: float,
    max_rotation_deg: float = 20.0,
    match_mm: float = 5.0,
) -> Spheres:
    """Find spheres 1-15 of the T1 plate in one slice of an IR series.

    Circles are detected with a Hough transform on the edges of every TI image, inside the
    phantom. The README's template of the 15 sphere centres (converted to mm) is then
    registered to them by an exhaustive search over rotations and translations, refined by a
    least-squares (Procrustes) fit of the matched pairs. A sphere takes the centre of its
    matched circle, or the registered template position when no circle matched. This works
    across matrices (192 or 256), pixel sizes, positions and vendors.

    Parameters
    ----------
    images
        Shape ``(n_times, y, x)``: the contrast images of one slice.
    spacing_mm
        Pixel size in mm (square pixels).
    max_rotation_deg
        Largest rotation of the phantom searched.
    match_mm
        Largest distance between a template point and a circle for them to match.

    Returns
    -------
    Spheres

    Raises
    ------
    ValueError
        When fewer than 8 of the 14 spheres match: the images are probably not of the plate.
    """
    images = np.asarray(torch.as_tensor(images).detach().cpu(), dtype=np.float64)
    if images.ndim != 3:
        raise ValueError(f"images must have shape (n_times, y, x), got {images.shape}")
    peak = np.abs(images).max(0)
    body = peak > 0.1 * np.percentile(peak, 99)
    body = ndimage.binary_fill_holes(ndimage.binary_opening(body, iterations=2))
    inside = ndimage.binary_erosion(body, iterations=max(1, int(4 / spacing_mm)))
    if inside.sum() < 100:
        raise ValueError("no phantom found: the images hold (almost) no signal")
    found, radii = _detect_circles(images, inside, spacing_mm)
    if len(found) < 8:
        raise ValueError(f"only {len(found)} circles found: these images do not show the plate")
    centre = (np.asarray(images.shape[1:], float) - 1) / 2
    template = _template_mm()[:14] / spacing_mm + centre  # spheres 1-14, unregistered
    cap = match_mm / spacing_mm

    def score(points: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        distance = np.linalg.norm(points[:, None] - found[None], axis=-1)  # (14, F)
        nearest = distance.argmin(1)
        best = distance[np.arange(len(points)), nearest]
        return float(np.minimum(best, cap).sum()), nearest, best

    best = (math.inf, 0.0, np.zeros(2))
    for angle in np.deg2rad(np.arange(-max_rotation_deg, max_rotation_deg + 0.5, 1.0)):
        rotated = _rotate(template, angle)
        for f in found:  # each circle might be each sphere: hypothesise the translation
            for shift in f - rotated:
                total, _, _ = score(rotated + shift)
                if total < best[0]:
                    best = (total, angle, shift)
    _, angle, shift = best
    # Refine rotation and translation on the matched pairs (2-D Procrustes, no scaling).
    _, nearest, distance = score(_rotate(template, angle) + shift)
    matched = distance < cap
    if matched.sum() < 8:
        raise ValueError(
            f"only {int(matched.sum())} of 14 spheres match the template: these images do not "
            "look like plate 5 of the system phantom"
        )
    src, dst = template[matched], found[nearest[matched]]
    src_c, dst_c = src - src.mean(0), dst - dst.mean(0)
    u, _, vt = np.linalg.svd(src_c.T @ dst_c)
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        u[:, -1] *= -1
        rotation = u @ vt
    full = np.vstack([template, _template_mm()[14:] / spacing_mm + centre])
    registered = (full - src.mean(0)) @ rotation + dst.mean(0)
    _, nearest, distance = score(registered[:14])
    detected = np.append(distance < cap, False)
    centres = registered.copy()
    centres[:14][detected[:14]] = found[nearest[detected[:14]]]
    residual = np.sqrt(np.mean(distance[detected[:14]] ** 2)) * spacing_mm
    return Spheres(
        centres=centres,
        detected=detected,
        radius_px=float(np.median(radii[nearest[detected[:14]]])),
        rotation_deg=float(np.degrees(math.atan2(rotation[0, 1], rotation[0, 0]))),
        shift_px=tuple(float(v) for v in dst.mean(0) - src.mean(0) @ rotation),
        residual_mm=float(residual),
    )


def roi_values(
    values: torch.Tensor | np.ndarray, centres: Sequence[Sequence[float]], half: int = 2
) -> list[np.ndarray]:
    """The values of a map in a ``(2 half + 1)`` square ROI around each centre (row, col)."""
    values = np.asarray(torch.as_tensor(values).detach().cpu())
    out = []
    for row, col in centres:
        r, c = int(round(row)), int(round(col))
        out.append(values[r - half : r + half + 1, c - half : c + half + 1].ravel())
    return out


def roi_curves(images: torch.Tensor, spheres: Spheres, half: int = 2) -> torch.Tensor:
    """Mean signal in the square ROI of each sphere, for every contrast: ``(n_times, 15)``.

    Parameters
    ----------
    images
        One slice of the series, ``(n_times, y, x)``.
    spheres
        From :func:`find_spheres`.
    half
        ROI half-width: ``half=2`` gives hazen's 5x5 boxcar.
    """
    means = [[v.mean() for v in roi_values(image, spheres.centres, half)] for image in images]
    return torch.tensor(np.array(means), dtype=torch.float32)


def check_series(header: SeriesHeader, model_parameters: int = 3) -> None:
    """Refuse a series that cannot give T1: not inversion recovery, or too few TIs."""
    if header.ti is None:
        raise ValueError(
            f"{header.files[0][0].parent}: the images have no InversionTime; phantom T1 QA "
            "needs an inversion-recovery series"
        )
    n = int(header.ti.numel())
    if n <= model_parameters:
        raise ValueError(
            f"{header.files[0][0].parent}: {n} inversion times cannot determine a "
            f"{model_parameters}-parameter T1 model; acquire at least {model_parameters + 1} "
            "(e.g. 50, 100, 200, 400, 600, 800 ms)"
        )


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


def t1_model_for(header: SeriesHeader) -> models.SeparableModel:
    """The T1 model that matches the acquisition in ``header``.

    A TR that changes with TI (as on the Siemens sites) needs the TR-aware model
    :func:`~qmri_helpers.models.ir_tr_model`; with one TR the 3-parameter model is exact and
    equivalent; it is also the model for a TR the files do not state (NaN), as it needs none.
    Magnitude images are fitted with polarity restoration, signed images without.
    """
    check_series(header)
    magnitude = not header.signed
    known = header.tr[torch.isfinite(header.tr)] if header.tr is not None else None
    if known is not None and known.numel() and float(known.max() - known.min()) > 1e-6:
        # TR varies with TI: the TR-aware model, which refuses a TR that is partly unknown
        return models.ir_tr_model(header.ti, header.tr, magnitude=magnitude)
    return models.ir_three_parameter_model(header.ti, magnitude=magnitude)


@dataclass
class QAResult:
    """Everything :func:`run_t1_qa` measured, for tables and figures.

    Attributes
    ----------
    images
        The slice that was analysed, ``(n_ti, y, x)``.
    header
        The series' header.
    spheres
        The spheres found in that slice.
    model
        The signal model that was fitted.
    fit
        Per-voxel maps of the slice (T1 in s) with goodness of fit and Cramér-Rao SD; only
        voxels with signal (:func:`~qmri_helpers.fitting.signal_mask`) are fitted.
    table
        Per-sphere results (see :func:`sphere_table`).
    """

    images: torch.Tensor
    header: SeriesHeader
    spheres: Spheres
    model: models.SeparableModel
    fit: fitting.FitResult
    table: pd.DataFrame

    @property
    def t1(self) -> torch.Tensor:
        """The T1 map of the slice in s, ``(y, x)``."""
        return self.fit.params["t1"][0]


def run_t1_qa(
    folder: str | Path,
    tolerance: float = 0.10,
    reference_ms: Sequence[float] | None = None,
    reference_name: str = "reference",
    slice_index: int | None = None,
    max_relative_sd: float = 0.10,
    model_for: Callable[[SeriesHeader], models.SeparableModel] = t1_model_for,
) -> QAResult:
    """T1 QA of plate 5 of the system phantom, from a folder of inversion-recovery DICOMs.

    Loads the series (sorted by InversionTime), checks that it can give T1, finds the spheres,
    fits the model that matches the acquisition (:func:`t1_model_for`) to every voxel with
    variable projection and Levenberg-Marquardt, and tabulates the median T1 of a 5x5 ROI per
    sphere against the nominal values for the scanner's field strength.

    Parameters
    ----------
    folder
        Folder of the IR series: one DICOM file per TI (and slice).
    tolerance
        Largest relative difference from nominal that passes, e.g. 0.10 for 10%.
    reference_ms
        Optional second reference for spheres 1-15 in ms (e.g. hazen's fitted values).
    reference_name
        Column label of that reference.
    slice_index
        The slice to analyse; None takes the middle one.
    max_relative_sd
        Spheres whose Cramér-Rao SD exceeds this fraction of T1 are flagged unreliable.
    model_for
        Picks the signal model from the header; e.g.
        ``lambda h: models.ir_hazen_model(h.ti, h.tr, not h.signed)`` to compare with hazen.

    Returns
    -------
    QAResult

    Raises
    ------
    ValueError
        When the series has no InversionTime or too few TIs for the model, has no field
        strength to choose the nominal values, or does not show the plate's spheres.
    """
    images, header = dicom.load_series(folder)
    where = Path(folder)
    check_series(header)
    model = model_for(header)
    try:
        if header.field_strength is None:
            raise ValueError(
                "the files have no MagneticFieldStrength, so the nominal values (1.5 or 3 T) "
                "cannot be chosen"
            )
        z = images.shape[1] // 2 if slice_index is None else slice_index
        slice_images = images[:, z]
        spheres = find_spheres(slice_images, header.pixel_spacing[0])
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    data = slice_images[:, None]
    fit = fitting.fit_lm(model, data, mask=fitting.signal_mask(data))
    table = sphere_table(
        fit.params["t1"][0], fit.sd["t1"][0], spheres, header, tolerance=tolerance,
        reference_ms=reference_ms, reference_name=reference_name,
        max_relative_sd=max_relative_sd,
    )  # fmt: skip
    return QAResult(slice_images, header, spheres, model, fit, table)
