"""Phantom QA for the T1 plate of the ISMRM/NIST (Caliber) system phantom: the pipeline.

:func:`run_t1_qa` loads an inversion-recovery series, checks it (:func:`check_series`), finds the
spheres (:mod:`qmri_helpers.spheres`), fits the model that matches the acquisition
(:func:`t1_model_for`) and tabulates each sphere against the reference values
(:mod:`qmri_helpers.reference`, :mod:`qmri_helpers.qa_report`). The names of those modules
are importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from . import dicom, fitting, models
from .dicom import SeriesHeader
from .qa_report import plot_agreement, plot_rois, sphere_table
from .reference import HAZEN_FITTED_T1_MS, NOMINAL_T1_MS, nominal_t1
from .spheres import (
    TEMPLATE_CENTRES,
    TEMPLATE_SPACING_MM,
    Spheres,
    find_spheres,
    roi_curves,
    roi_values,
    template_spheres,
)

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
