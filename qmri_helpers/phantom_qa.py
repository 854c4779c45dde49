"""Phantom QA of the relaxation plates of the ISMRM/NIST (Caliber) system phantom: the pipeline.

:func:`run_t1_qa` loads an inversion-recovery series, checks it (:func:`check_series`), finds
every placement of the sphere template (:mod:`qmri_helpers.spheres`), fits the model that
matches the acquisition (:func:`t1_model_for`), keeps the labelling whose T1 falls with the
sphere number, detects plate 5 or 4 (:func:`choose_plate`), and tabulates each sphere against
the reference values for the plate, field, phantom version and temperature
(:mod:`qmri_helpers.reference`, :mod:`qmri_helpers.qa_report`). It refuses, with a message
that names the folder, whatever it cannot decide. The names of those modules that the
notebooks use are importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import dicom, fitting, models
from .dicom import SeriesHeader
from .qa_report import LONGEST_TI_FACTOR, plot_agreement, plot_rois, sphere_table
from .reference import (
    HAZEN_FITTED_T1_MS,
    NOMINAL_T1_MS,
    PLATES,
    Reference,
    nominal_t1,
    reference_t1,
)
from .spheres import (
    TEMPLATE_CENTRES,
    TEMPLATE_SPACING_MM,
    OrientationError,
    Spheres,
    find_spheres,
    label_by_values,
    roi_curves,
    roi_values,
    sphere_candidates,
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
    "PlateChoice",
    "choose_plate",
    "t1_model_for",
    "load_qa_slice",
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


#: Median |log(measured / nominal)| above which a plate's table is said not to fit (≈ 22%).
PLATE_MISMATCH = 0.2


@dataclass(frozen=True)
class PlateChoice:
    r"""Which plate the fitted values fit, and how well each plate's table fits them.

    Attributes
    ----------
    plate
        4 or 5: the plate that was used.
    mismatch
        Per plate, the median over the resolvable spheres of
        :math:`|\log(x_\mathrm{measured} / x_\mathrm{nominal})|` (0.1 is about 10%).
    spheres
        The sphere numbers (1-14) those medians were taken over.
    detected
        True where the plate was found from the values, False where the user named it.
    """

    plate: int
    mismatch: dict[int, float]
    spheres: tuple[int, ...]
    detected: bool

    @property
    def summary(self) -> str:
        """One line: the plate, how it was chosen, and how well each table fits."""
        fits = ", ".join(f"plate {p}: {100 * m:.0f}% off" for p, m in sorted(self.mismatch.items()))
        how = "detected from the fitted values" if self.detected else "as given"
        return f"plate {self.plate} ({how}; median |difference| {fits})"


def choose_plate(
    medians: Sequence[float],
    references: dict[int, Reference],
    usable: Callable[[float], bool],
    plate: int | None = None,
    where: str | Path = "",
) -> PlateChoice:
    r"""Find which plate's table the ROI medians fit, or check the plate the user named.

    For each plate, the median :math:`|\log(x/x_\mathrm{nominal})|` over the spheres whose
    nominal values (on both plates) the protocol resolves. The plates differ by a factor of
    about 2 (plate 4's T1 are much longer than plate 5's for the same sphere number; its T2
    much shorter), so the right table fits within a few %, the wrong one by far worse.

    Parameters
    ----------
    medians
        Measured value of spheres 1-14, in s.
    references
        Per plate, its nominal values (:func:`~qmri_helpers.reference.reference_t1`).
    usable
        Whether a nominal value (s) is resolved by the protocol.
    plate
        The plate the user named, or None to detect it.
    where
        The folder, for the messages.

    Returns
    -------
    PlateChoice

    Raises
    ------
    ValueError
        When no plate's table fits (both more than about 22% off), or when the named plate
        fits clearly worse than the other one: the message gives both mismatches.
    """
    if plate is not None and plate not in references:
        raise ValueError(f"{where}: plate must be None, 4 or 5, got {plate!r}")
    measured = np.asarray(medians, float)
    spheres = tuple(
        i + 1 for i in range(14) if all(usable(r[i]) for r in references.values())
        and measured[i] > 0
    )  # fmt: skip
    if len(spheres) < 4:
        raise ValueError(f"{where}: fewer than 4 spheres are resolved by these TIs")
    index = np.array(spheres) - 1
    mismatch = {
        p: float(np.median(np.abs(np.log(measured[index] / np.asarray(r)[index]))))
        for p, r in references.items()
    }
    best = min(mismatch, key=mismatch.get)
    choice = PlateChoice(best if plate is None else plate, mismatch, spheres, plate is None)
    quantity = next(iter(references.values())).quantity
    if plate is None and mismatch[best] > PLATE_MISMATCH:
        raise ValueError(
            f"{where}: the fitted {quantity} fit neither plate's table ({choice.summary}); "
            "check the field strength, the protocol and the ROIs (plot_rois), or name the "
            "plate with plate=4 or plate=5 to score it anyway"
        )
    if (
        plate is not None
        and plate != best
        and mismatch[plate] > max(PLATE_MISMATCH, 2 * mismatch[best])
    ):
        raise ValueError(
            f"{where}: plate={plate} was given, but the fitted {quantity} contradict its "
            f"table and fit plate {best}'s ({choice.summary}); check which plate was scanned, "
            "or pass plate=None to detect it"
        )
    return choice


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
        The spheres found in that slice, with the orientation (rotation, mirror) and the
        confidence of the labelling (``rank_correlation``, ``margin``).
    model
        The signal model that was fitted.
    fit
        Per-voxel maps of the slice (T1 in s) with goodness of fit and Cramér-Rao SD; only
        voxels with signal (:func:`~qmri_helpers.fitting.signal_mask`) are fitted.
    table
        Per-sphere results (see :func:`~qmri_helpers.qa_report.sphere_table`); its ``attrs``
        also hold the plate choice, the orientation and the labelling's confidence.
    plate
        The plate that was used, 4 or 5.
    reference
        The nominal values used: plate, version, temperature and what was assumed.
    plate_choice
        How the plate was chosen, and how well each plate's table fits.
    """

    images: torch.Tensor
    header: SeriesHeader
    spheres: Spheres
    model: models.SeparableModel
    fit: fitting.FitResult
    table: pd.DataFrame
    plate: int
    reference: Reference
    plate_choice: PlateChoice

    @property
    def t1(self) -> torch.Tensor:
        """The T1 map of the slice in s, ``(y, x)``."""
        return self.fit.params["t1"][0]

    @property
    def summary(self) -> str:
        """What was assumed and found, in a few lines."""
        s = self.spheres
        return (
            f"{self.plate_choice.summary}\n"
            f"reference: {self.reference.label}"
            + (f" ({self.reference.assumptions})" if self.reference.assumptions else "")
            + f"\norientation: {s.orientation}; T1 rank correlation with the sphere number "
            f"{s.rank_correlation:+.2f}, margin {s.margin:.2f} to the next labelling "
            f"({s.runner_up or 'none'})"
        )


def load_qa_slice(
    folder: str | Path,
    check: Callable[[SeriesHeader], None],
    reference: Callable[..., Reference],
    slice_index: int | None = None,
    serial: int | None = None,
    temperature_c: float | None = None,
) -> tuple[torch.Tensor, SeriesHeader, dict[int, Reference], list[Spheres]]:
    """Load a QA series, check it, take one slice and find where its spheres may be.

    The first steps of every QA pipeline (T1 here, T2 in :mod:`~qmri_helpers.t2_qa`).

    Parameters
    ----------
    folder
        Folder of the series.
    check
        Refuses a series that cannot give the quantity (e.g. :func:`check_series`).
    reference
        ``reference(plate, field_strength, serial, temperature_c)``, e.g.
        :func:`~qmri_helpers.reference.reference_t1`.
    slice_index, serial, temperature_c
        As in :func:`run_t1_qa`.

    Returns
    -------
    tuple
        The slice ``(n_times, y, x)``, the header, the reference of each plate, and the
        candidate sphere positions (:func:`~qmri_helpers.spheres.sphere_candidates`).

    Raises
    ------
    ValueError
        From ``check``, or when the files have no field strength or show no plate; the
        message names the folder.
    """
    images, header = dicom.load_series(folder)
    check(header)
    slice_images = images[:, images.shape[1] // 2 if slice_index is None else slice_index]
    try:
        if header.field_strength is None:
            raise ValueError(
                "the files have no MagneticFieldStrength, so the nominal values (1.5 or 3 T) "
                "cannot be chosen"
            )
        references = {p: reference(p, header.field_strength, serial, temperature_c) for p in PLATES}
        candidates = sphere_candidates(slice_images, header.pixel_spacing[0])
    except ValueError as error:
        raise ValueError(f"{Path(folder)}: {error}") from None
    return slice_images, header, references, candidates


def run_t1_qa(
    folder: str | Path,
    tolerance: float = 0.10,
    reference_ms: Sequence[float] | None = None,
    reference_name: str = "reference",
    slice_index: int | None = None,
    max_relative_sd: float = 0.05,
    model_for: Callable[[SeriesHeader], models.SeparableModel] = t1_model_for,
    plate: int | None = None,
    serial: int | None = None,
    temperature_c: float | None = None,
) -> QAResult:
    """T1 QA of plate 5 (or 4) of the system phantom, from a folder of inversion-recovery DICOMs.

    1. Load the series (sorted by InversionTime) and check that it can give T1.
    2. Find every way the plate's sphere template fits the circles in the slice, at any
       rotation and either mirror state (:func:`~qmri_helpers.spheres.sphere_candidates`).
    3. Fit the model that matches the acquisition (:func:`t1_model_for`) to every voxel with
       variable projection and Levenberg-Marquardt.
    4. Keep the labelling whose T1 falls with the sphere number, as it does on both plates,
       and refuse when no labelling does or two are too close
       (:func:`~qmri_helpers.spheres.label_by_values`).
    5. Detect the plate from the fitted T1, or check the one named (:func:`choose_plate`).
    6. Tabulate the median T1 of a 5x5 ROI per sphere against the nominal values for the
       plate, field strength, phantom version and temperature
       (:func:`~qmri_helpers.qa_report.sphere_table`).

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
        Spheres whose ROI median is uncertain by more than this fraction are unreliable.
    model_for
        Picks the signal model from the header; e.g.
        ``lambda h: models.ir_hazen_model(h.ti, h.tr, not h.signed)`` to compare with hazen.
    plate
        4 or 5, or None to detect it from the fitted T1.
    serial
        The phantom's serial number (version 2 from 0043); None assumes version 1.
    temperature_c
        The phantom's temperature in °C; None assumes 20 °C.

    Returns
    -------
    QAResult

    Raises
    ------
    ValueError
        When the series has no InversionTime or too few TIs for the model, has no field
        strength, does not show the plate's spheres, gives T1 that no labelling of the
        spheres orders as the plate does (:class:`~qmri_helpers.spheres.OrientationError`),
        fits neither plate, or contradicts the plate named. Every message names the folder.
    """
    if plate not in (None, *PLATES):
        raise ValueError(f"{folder}: plate must be None, 4 or 5, got {plate!r}")
    where = Path(folder)
    slice_images, header, references, candidates = load_qa_slice(
        folder, check_series, reference_t1, slice_index, serial, temperature_c
    )
    model = model_for(header)
    data = slice_images[:, None]
    fit = fitting.fit_lm(model, data, mask=fitting.signal_mask(data))
    t1_map, sd_map = fit.params["t1"][0], fit.sd["t1"][0]
    try:
        spheres = label_by_values(candidates, t1_map, "T1")
    except OrientationError as error:
        raise OrientationError(f"{where}: {error}") from None
    medians = [float(np.median(v)) for v in roi_values(t1_map, spheres.centres[:14])]
    shortest, longest = float(header.ti.min()), float(header.ti.max())
    choice = choose_plate(
        medians, references, lambda t1: shortest <= t1 <= LONGEST_TI_FACTOR * longest,
        plate, where,
    )  # fmt: skip
    reference = references[choice.plate]
    table = sphere_table(
        t1_map, sd_map, spheres, header, tolerance=tolerance, reference_ms=reference_ms,
        reference_name=reference_name, max_relative_sd=max_relative_sd, nominal=reference,
    )  # fmt: skip
    table.attrs.update(
        plate_choice=choice.summary, orientation=spheres.orientation,
        rank_correlation=spheres.rank_correlation, margin=spheres.margin,
    )  # fmt: skip
    return QAResult(
        slice_images, header, spheres, model, fit, table, choice.plate, reference, choice
    )
