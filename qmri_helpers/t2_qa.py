"""Phantom QA of T2 from a multi-echo spin-echo (CPMG) series of the system phantom.

:func:`run_t2_qa` is :func:`~qmri_helpers.phantom_qa.run_t1_qa` for T2: the same sphere
finding and labelling (:mod:`qmri_helpers.spheres`), the same plate detection
(:func:`~qmri_helpers.phantom_qa.choose_plate`), the T2 tables of both plates
(:func:`~qmri_helpers.reference.reference_t2`) and the same table and figures
(:mod:`qmri_helpers.qa_report`), with the EPG fit of T2 and B1
(:func:`~qmri_helpers.t2_fitting.fit_epg`) in place of the IR fit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from . import fitting, qa_report
from .dicom import SeriesHeader
from .epg import cpmg_echo_spacing
from .phantom_qa import PlateChoice, choose_plate, load_qa_slice
from .reference import Reference, reference_t1, reference_t2
from .spheres import OrientationError, Spheres, label_by_values, roi_values
from .t2_fitting import fit_epg

__all__ = [
    "T2QAResult",
    "check_t2_series",
    "nominal_t1_map",
    "t2_sphere_table",
    "plot_t2_agreement",
    "run_t2_qa",
]


def check_t2_series(header: SeriesHeader) -> None:
    """Refuse a series that cannot give T2 by EPG: inversion recovery, too few echoes, not CPMG."""
    where = header.files[0][0].parent
    if header.ti is not None:
        raise ValueError(
            f"{where}: the images have an InversionTime: this is an inversion-recovery series; "
            "T2 QA needs a multi-echo spin-echo series (use run_t1_qa for T1)"
        )
    n = int(header.te.numel())
    if n < 4:
        raise ValueError(
            f"{where}: {n} echo time(s) cannot determine M0, T2 and B1; acquire at least 4 "
            "echoes of one CPMG train"
        )
    try:
        cpmg_echo_spacing(header.te)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def t2_sphere_table(
    t2_map: torch.Tensor,
    sd_map: torch.Tensor,
    spheres: Spheres,
    header: SeriesHeader,
    nominal: Reference,
    tolerance: float = 0.10,
    max_relative_sd: float = 0.05,
    half: int = 2,
) -> pd.DataFrame:
    """Per-sphere T2 against nominal: :func:`qmri_helpers.qa_report.sphere_table` for T2.

    The echo times take the place of the inversion times: a sphere whose nominal T2 is below
    the first TE or beyond 3 times the last is unreliable, never a pass. Columns and notes
    say T2 and TE.
    """
    as_te = dataclasses.replace(header, ti=header.te)  # the resolvable range comes from TE
    table = qa_report.sphere_table(
        t2_map, sd_map, spheres, as_te, tolerance=tolerance, max_relative_sd=max_relative_sd,
        half=half, nominal=nominal,
    )  # fmt: skip
    table = table.rename(columns=lambda c: c.replace("T1", "T2"))
    table["note"] = table["note"].str.replace("T1", "T2").str.replace("TI", "TE")
    return table


def plot_t2_agreement(table: pd.DataFrame, title: str = "") -> Figure:
    """Identity and Bland-Altman plots of measured against nominal T2 (as for T1)."""
    fig = qa_report.plot_agreement(table.rename(columns=lambda c: c.replace("T2", "T1")), title)
    for ax in fig.axes:
        ax.set_xlabel(ax.get_xlabel().replace("T1", "T2"))
        ax.set_ylabel(ax.get_ylabel().replace("T1", "T2"))
    return fig


def nominal_t1_map(
    shape: tuple[int, int], spheres: Spheres, reference: Reference, fill_t1: float
) -> torch.Tensor:
    """A T1 map (s) of the plate: each sphere's nominal T1 inside its radius, else ``fill_t1``.

    Parameters
    ----------
    shape
        ``(y, x)`` of the slice.
    spheres
        The labelled spheres (centres in pixels, radius).
    reference
        The plate's nominal T1 (:func:`~qmri_helpers.reference.reference_t1`).
    fill_t1
        T1 (s) everywhere outside the spheres (the water fill, the background).
    """
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    t1 = np.full(shape, fill_t1)
    for (row, col), value in zip(spheres.centres[:14], reference.values, strict=True):
        t1[(rows - row) ** 2 + (cols - col) ** 2 <= spheres.radius_px**2] = value
    return torch.as_tensor(t1)


@dataclass
class T2QAResult:
    """Everything :func:`run_t2_qa` measured.

    Attributes
    ----------
    images
        The slice that was analysed, ``(n_echoes, y, x)``.
    header
        The series' header.
    spheres
        The spheres found and labelled in that slice.
    fit
        The EPG fit of the slice: maps ``m0``, ``t2`` (s) and ``b1``, shape ``(1, y, x)``.
    table
        Per-sphere results (:func:`t2_sphere_table`).
    plate
        The plate that was used, 4 or 5.
    reference
        The nominal T2 used, with what was assumed.
    plate_choice
        How the plate was chosen, and how well each plate's table fits.
    t1
        The T1 the EPG fit assumed: a number (s), or "nominal" (each sphere's nominal T1).
    """

    images: torch.Tensor
    header: SeriesHeader
    spheres: Spheres
    fit: fitting.FitResult
    table: pd.DataFrame
    plate: int
    reference: Reference
    plate_choice: PlateChoice
    t1: float | str

    @property
    def t2(self) -> torch.Tensor:
        """The T2 map of the slice in s, ``(y, x)``."""
        return self.fit.params["t2"][0]

    @property
    def b1(self) -> torch.Tensor:
        """The refocusing scale map of the slice, ``(y, x)``."""
        return self.fit.params["b1"][0]

    @property
    def summary(self) -> str:
        """What was assumed and found, in a few lines."""
        s = self.spheres
        return (
            f"{self.plate_choice.summary}\n"
            f"reference: {self.reference.label}"
            + (f" ({self.reference.assumptions})" if self.reference.assumptions else "")
            + f"\nEPG fit with T1 = {_t1_words(self.t1)}; median B1 in the spheres "
            f"{np.median(np.concatenate(roi_values(self.b1, s.centres[:14]))):.2f}"
            f"\norientation: {s.orientation}; T2 rank correlation with the sphere number "
            f"{s.rank_correlation:+.2f}, margin {s.margin:.2f}"
        )


def _t1_words(t1: float | str) -> str:
    return "the plate's nominal T1 per sphere" if t1 == "nominal" else f"{t1:g} s assumed"


def run_t2_qa(
    folder: str | Path,
    tolerance: float = 0.10,
    t1: float | str = 1.0,
    slice_index: int | None = None,
    max_relative_sd: float = 0.05,
    plate: int | None = None,
    serial: int | None = None,
    temperature_c: float | None = None,
) -> T2QAResult:
    """T2 QA of plate 5 (or 4) of the system phantom, from a multi-echo spin-echo folder.

    1. Load the series (sorted by EchoTime, on one scale across echoes) and check that it is
       one CPMG train (:func:`check_t2_series`).
    2. Find every way the plate's template fits the circles of the first echo.
    3. Fit M0, T2 and B1 of the EPG model to every voxel with signal (:func:`fit_epg`).
    4. Keep the labelling whose T2 falls with the sphere number.
    5. Detect the plate from the fitted T2, or check the one named.
    6. Tabulate the median T2 of a 5x5 ROI per sphere against the plate's nominal T2.

    Parameters
    ----------
    folder
        Folder of the series: one DICOM file per echo (and slice).
    tolerance
        Largest relative difference from nominal that passes.
    t1
        T1 (s) the EPG fit assumes for the decay of the stored states; or "nominal": fit
        with 1 s to find and label the spheres and the plate, then fit again with each
        sphere's nominal T1 (:func:`nominal_t1_map`, 1 s outside the spheres). That costs
        one dictionary per sphere.
    slice_index
        The slice to analyse; None takes the middle one.
    max_relative_sd
        Spheres whose ROI median is uncertain by more than this fraction are unreliable.
    plate, serial, temperature_c
        As for :func:`~qmri_helpers.phantom_qa.run_t1_qa`.

    Returns
    -------
    T2QAResult

    Raises
    ------
    ValueError
        When the series is not a multi-echo spin-echo train, has no field strength, does not
        show the plate, gives T2 that no labelling orders as the plate does, fits neither
        plate or contradicts the plate named. Every message names the folder.
    """
    if t1 != "nominal" and not (isinstance(t1, int | float) and t1 > 0):
        raise ValueError(f"t1 must be a positive time in s or 'nominal', got {t1!r}")
    where = Path(folder)
    slice_images, header, references, candidates = load_qa_slice(
        folder, check_t2_series, reference_t2, slice_index, serial, temperature_c
    )
    data = slice_images[:, None]
    mask = fitting.signal_mask(data)
    fit = fit_epg(data, header.te, t1=1.0 if t1 == "nominal" else float(t1), mask=mask)
    t2_map, sd_map = fit.params["t2"][0], fit.sd["t2"][0]
    try:
        spheres = label_by_values(candidates, t2_map, "T2")
    except OrientationError as error:
        raise OrientationError(f"{where}: {error}") from None
    medians = [float(np.median(v)) for v in roi_values(t2_map, spheres.centres[:14])]
    shortest, longest = float(header.te.min()), float(header.te.max())
    choice = choose_plate(
        medians, references,
        lambda t2: shortest <= t2 <= qa_report.LONGEST_TI_FACTOR * longest, plate, where,
    )  # fmt: skip
    reference = references[choice.plate]
    if t1 == "nominal":
        nominal = reference_t1(choice.plate, header.field_strength, serial, temperature_c)
        t1_map = nominal_t1_map(tuple(t2_map.shape), spheres, nominal, 1.0)
        fit = fit_epg(data, header.te, t1=t1_map[None], mask=mask)
        t2_map, sd_map = fit.params["t2"][0], fit.sd["t2"][0]
    table = t2_sphere_table(
        t2_map, sd_map, spheres, header, reference, tolerance=tolerance,
        max_relative_sd=max_relative_sd,
    )  # fmt: skip
    return T2QAResult(
        slice_images, header, spheres, fit, table, choice.plate, reference, choice,
        t1 if t1 == "nominal" else float(t1),
    )  # fmt: skip
