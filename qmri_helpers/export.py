"""Maps that leave the notebook: NIfTI and DICOM with the geometry of the source series.

Three outputs: :func:`to_nifti` (a NIfTI-1 file), :func:`to_parametric_map` (a DICOM
Parametric Map of float32 values, built with highdicom, the standard object for quantitative
maps) and :func:`to_dicom` (a uint16 MR image series, for viewers without parametric-map
support). :func:`to_bids` writes a BIDS qMRI derivative (see :mod:`qmri_helpers.bids`).

Maps have the shape ``(z, y, x)`` that :func:`qmri_helpers.dicom.load_series` gives per
contrast (slice, row, column). Times are in seconds inside the package; the files say their
unit (NIfTI ``xyzt_units`` and description, DICOM SeriesDescription and RescaleType).

The writers refuse what would give a wrong file: a map whose shape is not the series', NaN or
inf values, names that are not plain file names, and (unless ``overwrite=True``) a folder
that already holds a series of the same name. A uint16 DICOM series clips outliers at a robust
top, counts them and warns, so that one runaway voxel cannot flatten the rest of the map.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import torch
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from . import bids
from .dicom import SeriesHeader, _Image
from .nifti import NiftiHeader

__all__ = [
    "ExportWarning",
    "dicom_affine",
    "to_nifti",
    "to_dicom",
    "to_parametric_map",
    "to_bids",
]

#: DICOM's patient axes (LPS) to NIfTI's (RAS).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Written into every DICOM file the package makes; overwrite=True deletes only such files.
_MARK = "qmri_helpers"
#: A name that is a plain file name, on every system: no separators, no "..", no control bytes.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*")
_UINT16_TOP = 65535
#: UCUM codes of the units a parametric map may carry.
_UCUM = {
    "ms": codes.UCUM.Millisecond,
    "s": codes.UCUM.Second,
    "/s": codes.UCUM.PerSecond,
    "1/s": codes.UCUM.PerSecond,
    "1": codes.UCUM.NoUnits,
    "a.u.": codes.UCUM.NoUnits,
}
#: The quantity (DICOM CID 7180) of a map, by the package's parameter names.
_QUANTITY = {
    "t1": codes.DCM.T1,
    "t2": codes.DCM.T2,
    "t2star": codes.DCM.T2Star,
    "r1": codes.DCM.R1,
    "r2": codes.DCM.R2,
    "r2star": codes.DCM.R2Star,
    "m0": codes.DCM.ProtonDensity,
}
#: Type 2 attributes that highdicom copies from the source (empty where the source lacks them).
_PATIENT_STUDY = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


class ExportWarning(UserWarning):
    """An export that changed values to store them (clipped outliers), with the count."""


class _Plane:
    """Where one slice of the first contrast lies (position, orientation, spacing).

    From the file's attributes or, for a frame of a multi-frame file, from its functional
    groups (the frame's, then the shared ones).
    """

    def __init__(self, header: SeriesHeader, index: int, cache: dict[Path, pydicom.Dataset]):
        path = header.files[0][index]
        frame = header.frames[0][index] if header.frames else None
        if path not in cache:
            cache[path] = pydicom.dcmread(path, stop_before_pixels=True)
        self.ds = cache[path]
        self.frame = frame
        image = _Image(path, self.ds, None if frame is None else frame - 1)
        self.position = np.asarray(image.get("ImagePositionPatient") or [0, 0, 0], float)
        orientation = image.get("ImageOrientationPatient") or [1, 0, 0, 0, 1, 0]
        self.orientation = np.asarray(orientation, float)
        self.spacing = tuple(float(v) for v in (image.get("PixelSpacing") or [1.0, 1.0]))
        thickness = image.get("SliceThickness")
        self.thickness = float(thickness) if thickness not in (None, "") else None


def _planes(header: SeriesHeader) -> list[_Plane]:
    cache: dict[Path, pydicom.Dataset] = {}
    return [_Plane(header, k, cache) for k in range(len(header.files[0]))]


def dicom_affine(header: SeriesHeader) -> np.ndarray:
    """The NIfTI (RAS, mm) affine of the series' voxels, indexed ``(column, row, slice)``.

    Built from ImagePositionPatient, ImageOrientationPatient and PixelSpacing of the first
    contrast's slices (for a multi-frame file, from each frame's functional groups); the
    slice direction is the step between the first and last slice, or the normal times
    SliceThickness for a single slice.
    """
    planes = _planes(header)
    first, last = planes[0], planes[-1]
    row_cosine, column_cosine = first.orientation[:3], first.orientation[3:]
    row_spacing, column_spacing = first.spacing
    normal = np.cross(row_cosine, column_cosine)
    if len(planes) > 1:
        step = (last.position - first.position) / (len(planes) - 1)
    else:
        step = normal * (first.thickness or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = row_cosine * column_spacing  # along a row: the column index
    affine[:3, 1] = column_cosine * row_spacing  # down a column: the row index
    affine[:3, 2] = step
    affine[:3, 3] = first.position
    return _LPS_TO_RAS @ affine


def _numpy_map(values: torch.Tensor | np.ndarray, header: SeriesHeader | NiftiHeader) -> np.ndarray:
    """The map as float32 ``(z, y, x)``, checked against the series it is to be stored with."""
    array = np.asarray(torch.as_tensor(values).detach().cpu(), dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"a map must have shape (z, y, x) or (y, x), got {array.shape}")
    if isinstance(header, NiftiHeader):
        x, y, z = nib.load(header.files[0]).shape[:3]
        expected, source = (z, y, x), header.files[0]
    else:
        first = pydicom.dcmread(header.files[0][0], stop_before_pixels=True)
        expected = (len(header.files[0]), int(first.Rows), int(first.Columns))
        source = header.files[0][0].parent
    if array.shape != expected:
        raise ValueError(
            f"the map has shape {array.shape} (slices, rows, columns) but the series "
            f"{source} has {expected}"
        )
    if not np.isfinite(array).all():
        raise ValueError("the map holds NaN or inf: mask failed voxels (set them to 0) first")
    return array


def _dicom_only(header: SeriesHeader | NiftiHeader, what: str) -> None:
    if not isinstance(header, SeriesHeader):
        raise TypeError(
            f"{what} needs the header of a DICOM series (dicom.load_series), got "
            f"{type(header).__name__}: write NIfTI (to_nifti, to_bids) instead"
        )


def _check_name(name: str, folder: Path) -> None:
    """Refuse a series name that is not a plain file name (it would write outside folder)."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise ValueError(
            f"name {name!r} is not a plain name: it names the files in {folder}, so it must be "
            "letters, digits and '_' (no path separators, no '..'), e.g. 'T1' or 'T2star'"
        )


def to_nifti(
    values: torch.Tensor | np.ndarray,
    header: SeriesHeader | NiftiHeader,
    path: str | Path,
    description: str = "",
) -> Path:
    """Write a map ``(z, y, x)`` to NIfTI-1 with the source series' geometry.

    Parameters
    ----------
    values
        The map, in the units you want stored (e.g. T1 in s).
    header
        The header of the series the map was fitted from: DICOM
        (:func:`~qmri_helpers.dicom.load_series`; the affine is :func:`dicom_affine`) or NIfTI
        (:func:`~qmri_helpers.nifti.load_nifti_series`; its affine is kept).
    path
        Output file, ``.nii`` or ``.nii.gz``; a name without either gets ``.nii`` (as nibabel
        does). An existing folder is refused.
    description
        Stored in the header's ``descrip`` field (80 characters), e.g. ``"T1 (s)"``.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a folder: give a file name ending in .nii or .nii.gz, "
            f"e.g. {path / 't1map.nii.gz'}"
        )
    if not path.name.endswith((".nii", ".nii.gz")):
        path = path.with_name(path.name + ".nii")
    array = _numpy_map(values, header)
    affine = header.affine if isinstance(header, NiftiHeader) else dicom_affine(header)
    image = nib.Nifti1Image(np.transpose(array, (2, 1, 0)), affine)
    image.header.set_xyzt_units(xyz="mm", t="sec")
    image.header["descrip"] = description[:79].encode()
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def _robust_top(array: np.ndarray, vmax: float | None) -> float:
    """The largest value a uint16 series stores: ``vmax``, else a robust top of the map.

    The robust top is the largest value at most twice the 99th percentile of the positive
    values, so that a few runaway voxels (a failed fit at 1e6 s) do not set the step.
    """
    if vmax is not None:
        if not np.isfinite(vmax) or vmax <= 0:
            raise ValueError(f"vmax must be a positive number, got {vmax}")
        return float(vmax)
    positive = array[array > 0]
    if positive.size == 0:
        return 1.0
    fence = 2.0 * float(np.percentile(positive, 99, method="lower"))  # a value of the map
    return float(positive[positive <= fence].max())


def _old_series(folder: Path, name: str) -> list[Path]:
    """The files in ``folder`` that a series called ``name`` would have written."""
    pattern = re.compile(rf"{re.escape(name)}_\d{{4,}}\.dcm")
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))


def _written_by_us(path: Path) -> bool:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # not DICOM, or unreadable: certainly not one of ours
        return False
    return str(ds.get("DerivationDescription", "")).startswith(_MARK) or (
        str(ds.get("SeriesDescription", "")).endswith(f"), {_MARK}")
        and "DERIVED" in list(ds.get("ImageType", []))
    )


def _make_room(folder: Path, name: str, overwrite: bool) -> list[Path]:
    """Check that an older series of ``name`` may go; return its files (deleted later)."""
    old = _old_series(folder, name)
    if not old:
        return []
    if not overwrite:
        raise FileExistsError(
            f"{folder} already holds a {name} series ({len(old)} files: {old[0].name} ...): "
            "pass overwrite=True to replace it, or choose another folder or name"
        )
    foreign = [p for p in old if not _written_by_us(p)]
    if foreign:
        raise FileExistsError(
            f"{foreign[0]} is in the way and was not written by {_MARK}: not deleting it "
            f"({len(foreign)} such files); move it, or choose another folder or name"
        )
    return old


def to_dicom(
    values: torch.Tensor | np.ndarray,
    header: SeriesHeader,
    folder: str | Path,
    name: str = "T1",
    unit: str = "ms",
    scale: float = 1000.0,
    vmax: float | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write a map as a derived DICOM MR series, one file per slice, in the source's frame.

    Each file copies the patient, study and geometry of the source slice, gets new series and
    instance UIDs and the ImageType DERIVED, SECONDARY, "<name> MAP". Pixel values are uint16
    with a RescaleSlope, ``top / 65535``: ``pixel_array * RescaleSlope + RescaleIntercept``
    gives the map in ``unit`` to within half a step, ``top / 131070``. That is within 0.1%
    of every value above ``top / 131``; smaller values keep the absolute half step. For
    float32 values use :func:`to_parametric_map`; this series is for viewers without
    parametric-map support.

    The top is ``vmax``, or else the largest value at most twice the 99th percentile of the
    positive values. Values above it are stored as the top: they are counted, an
    :class:`ExportWarning` says how many, and each file's ImageComments records it.

    Parameters
    ----------
    values
        The map in s (or any unit), shape ``(z, y, x)``; negative values are refused.
    header
        The header of the source series.
    folder
        Output folder (created).
    name
        Parameter name for the file names, SeriesDescription and ImageType, e.g. ``"T1"``;
        letters, digits and ``_`` only (it names files).
    unit
        Unit of the stored values, written to RescaleType and SeriesDescription.
    scale
        Factor from ``values`` to ``unit`` (1000: s to ms).
    vmax
        The largest value to store, in the unit of ``values`` (e.g. 5.0 for T1 in s);
        None for the robust top.
    overwrite
        If the folder already holds files ``<name>_NNNN.dcm``, replace that series (its files
        are deleted, all of them) instead of refusing. Files that the package did not write
        are never deleted: they make the export fail.

    Returns
    -------
    list of pathlib.Path
        The files written, in slice order.
    """
    folder = Path(folder)
    _dicom_only(header, "to_dicom")
    if any(header.frames[0] if header.frames else []):
        raise ValueError(
            f"{header.files[0][0]} is a multi-frame (enhanced) file: to_dicom copies one "
            "single-frame file per slice; write to_parametric_map or to_nifti instead"
        )
    _check_name(name, folder)
    array = _numpy_map(values, header).astype(np.float64) * scale
    if (array < 0).any():
        raise ValueError(f"the {name} map has negative values: DICOM export stores uint16")
    top = _robust_top(array, None if vmax is None else vmax * scale)
    slope_text = f"{top / _UINT16_TOP * (1 + 1e-9):.10g}"  # rounded up: 65535 steps reach top
    slope = float(slope_text)
    clipped = array > top
    n_clipped = int(clipped.sum())
    comments = f"{_MARK}: {name} in {unit}, stored to +-{slope / 2:.3g} {unit}"
    if n_clipped:
        what = f"{n_clipped} voxel{'s' if n_clipped > 1 else ''}"
        note = f"{what} above {top:.6g} {unit} clipped to it (largest {array.max():.6g} {unit})"
        comments += f"; {note}"
        warnings.warn(
            f"{name} map: {note}; set vmax to choose the top, or mask failed fits",
            ExportWarning,
            stacklevel=2,
        )
    stored = np.clip(np.round(array / slope), 0, _UINT16_TOP).astype(np.uint16)
    old = _make_room(folder, name, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder))
    try:
        staged = _write_slices(stored, header, staging, name, unit, slope_text, comments)
        for path in old:
            path.unlink()
        paths = [Path(shutil.move(path, folder / path.name)) for path in staged]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def _write_slices(
    stored: np.ndarray,
    header: SeriesHeader,
    folder: Path,
    name: str,
    unit: str,
    slope: str,
    comments: str,
) -> list[Path]:
    series_uid = generate_uid()
    source_uid = pydicom.dcmread(header.files[0][0], stop_before_pixels=True).SeriesInstanceUID
    paths = []
    for z, source in enumerate(header.files[0]):
        ds = pydicom.dcmread(source)
        ds.remove_private_tags()
        for keyword in ("InversionTime", "EchoTime", "WindowCenter", "WindowWidth"):
            if keyword in ds:
                delattr(ds, keyword)
        uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.SOPInstanceUID = uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = int(ds.get("SeriesNumber", 0) or 0) + 1000
        ds.InstanceNumber = z + 1
        ds.SeriesDescription = f"{name} map ({unit}), {_MARK}"
        ds.DerivationDescription = f"{_MARK}: {name} map fitted from series {source_uid}"
        ds.ImageComments = comments
        ds.ImageType = ["DERIVED", "SECONDARY", f"{name.upper()[:12]} MAP"]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.RescaleSlope = slope
        ds.RescaleIntercept = 0
        ds.RescaleType = unit
        ds.PixelData = stored[z].tobytes()
        path = folder / f"{name}_{z + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _package_version() -> str:
    """The installed version of qmri-tutorials ("unknown" when run from a bare checkout)."""
    try:
        return metadata.version("qmri-tutorials")
    except metadata.PackageNotFoundError:
        return "unknown"


def to_parametric_map(
    values: torch.Tensor | np.ndarray,
    header: SeriesHeader,
    path: str | Path,
    name: str = "T1",
    unit: str = "ms",
    scale: float = 1000.0,
    overwrite: bool = False,
) -> Path:
    """Write a map as one DICOM Parametric Map of float32 values, built with highdicom.

    The object keeps the study, the frame of reference and the geometry (position of each
    slice, orientation, pixel spacing) of the source series, references each source slice,
    and carries a Real World Value Mapping (identity: the stored floats are the values) with
    the UCUM unit and the quantity (DICOM CID 7180: T1, T2*, R1, ...). The values are stored
    exactly as float32: no clipping, no quantisation. highdicom orders the frames by position
    along the slice normal, which may be the reverse of the tensor's slice order.

    Not every viewer shows parametric maps (PACS viewers often lack them); for those, write the
    uint16 MR image series of :func:`to_dicom` as well.

    Parameters
    ----------
    values
        The map, shape ``(z, y, x)``, in s for times (or any unit, with ``scale``).
    header
        The header of the source DICOM series (:func:`~qmri_helpers.dicom.load_series`).
    path
        Output file (``.dcm``); its folder is created.
    name
        The parameter, e.g. ``"T1"``, ``"T2star"``, ``"R2star"``, ``"M0"``: the label, and
        the quantity where the package knows it.
    unit
        Unit of the stored values: ``"ms"``, ``"s"``, ``"1/s"`` or ``"1"`` (no unit, e.g. M0).
    scale
        Factor from ``values`` to ``unit`` (1000: s to ms).
    overwrite
        Replace an existing file instead of refusing.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    path = Path(path)
    _dicom_only(header, "to_parametric_map")
    _check_name(name, path.parent)
    if unit not in _UCUM:
        raise ValueError(f"unit {unit!r} is not one of {sorted(_UCUM)} (UCUM units)")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give a file name, e.g. {path / 't1map.dcm'}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass overwrite=True to replace it")
    array = (_numpy_map(values, header).astype(np.float64) * scale).astype(np.float32)
    planes = _planes(header)
    sources = list({id(plane.ds): plane.ds for plane in planes}.values())
    for ds in sources:
        for keyword in _PATIENT_STUDY:
            if keyword not in ds:
                setattr(ds, keyword, "")
    between = (
        float(np.linalg.norm(planes[-1].position - planes[0].position)) / (len(planes) - 1)
        if len(planes) > 1
        else None
    )
    geometry = {  # explicit, so that a multi-frame source (contrasts x slices) works too
        "plane_positions": [
            hd.PlanePositionSequence("PATIENT", plane.position.tolist()) for plane in planes
        ],
        "plane_orientation": hd.PlaneOrientationSequence("PATIENT", planes[0].orientation.tolist()),
        "pixel_measures": hd.PixelMeasuresSequence(
            pixel_spacing=list(planes[0].spacing),
            slice_thickness=planes[0].thickness or between or 1.0,
            spacing_between_slices=between,
        ),
    }
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=name[:16],
        lut_explanation=f"{name} ({unit})",
        unit=_UCUM[unit],
        value_range=(float(array.min()), float(array.max())),
        slope=1.0,
        intercept=0.0,
        quantity_definition=_QUANTITY.get(name.lower()),
    )
    positive = array[array > 0]
    low, high = np.percentile(positive, [1, 99]) if positive.size else (0.0, 1.0)
    window = hd.VOILUTTransformation(
        window_center=float(low + high) / 2, window_width=max(float(high - low), 1e-6)
    )
    recognizable = str(sources[0].get("RecognizableVisualFeatures", "YES")).upper() != "NO"
    with warnings.catch_warnings():  # the source's PatientName is copied as it is
        warnings.filterwarnings("ignore", "The string .* intended person name", UserWarning)
        pmap = hd.pm.ParametricMap(
            source_images=sources,
            pixel_array=array,
            series_instance_uid=hd.UID(),
            series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 2000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="qmri-tutorials",
            manufacturer_model_name="qmri_helpers",
            software_versions=_package_version(),
            device_serial_number="none",
            contains_recognizable_visual_features=recognizable,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[window],
            **geometry,
            content_label=f"{name.upper()[:12]}MAP",
            content_description=f"{name} map ({unit}), {_MARK}",
            series_description=f"{name} map ({unit}), {_MARK} parametric map",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pmap.save_as(path)
    return path


def _code_url() -> str | None:
    try:
        urls = metadata.metadata("qmri-tutorials").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return None
    return next((u.split(",", 1)[1].strip() for u in urls if u.startswith("Repository")), None)


def to_bids(
    maps: dict[str, torch.Tensor | np.ndarray],
    header: SeriesHeader | NiftiHeader,
    root: str | Path,
    subject: str,
    session: str | None = None,
    *,
    algorithm: str,
    reference: str | None = None,
    rates: tuple[str, ...] = (),
    source_datasets: tuple[dict, ...] = (),
    overwrite: bool = False,
) -> dict[str, Path]:
    r"""Write maps as a BIDS qMRI derivative under ``root/derivatives/qmri-tutorials``.

    Each map becomes ``sub-<subject>[_ses-<session>]_<suffix>.nii.gz`` in ``anat/`` with the
    source's geometry (:func:`to_nifti`) and a JSON sidecar (:func:`qmri_helpers.bids.sidecar`:
    ``Units``, ``EstimationAlgorithm``, ``EstimationReference``, ``Sources`` as BIDS URIs, the
    constant acquisition parameters and, as arrays in s, those that vary). The derivative
    folder gets ``dataset_description.json`` (``"DatasetType": "derivative"``, ``GeneratedBy``,
    ``DatasetLinks`` for the sources) and a README. The result passes the BIDS validator
    (``bids-validator-deno``), with :data:`qmri_helpers.bids.VALIDATOR_CONFIG` for the one
    conflict inside the specification (``InversionTime`` as an array).

    Parameters
    ----------
    maps
        Maps ``(z, y, x)`` by the fit's parameter names, ``"t1"``, ``"t2star"``, ``"m0"``,
        ``"r1"``, ``"r2star"`` (e.g. ``result.params``), or by BIDS suffix (``"T1map"`` ...).
        Times in s, rates in 1/s, M0 in the data's arbitrary unit; other keys are refused.
    header
        The header of the series the maps were fitted from (DICOM or NIfTI).
    root
        The BIDS dataset's root folder; the derivative goes in ``derivatives/qmri-tutorials``.
    subject, session
        BIDS labels (letters and digits, without ``sub-``/``ses-``); no session by default.
    algorithm
        How the maps were estimated, e.g. ``"fit_lm: VarPro + Levenberg-Marquardt, |a + b
        exp(-TI/T1)|"``: the package cannot know which fit you ran.
    reference
        The method's reference (a paper, a DOI); by default the package and its version.
    rates
        Rate maps to add as the inverse of a time map: ``"R1map"`` (1/T1), ``"R2starmap"``
        (1/T2*), in 1/s; 0 where the time is 0 (a failed fit).
    source_datasets
        ``SourceDatasets`` entries for the description, e.g. ``{"DOI": "doi:10.5281/..."}``.
    overwrite
        Replace maps of the same subject, session and suffix instead of refusing.

    Returns
    -------
    dict of str to pathlib.Path
        The NIfTI file of each map, by BIDS suffix.
    """
    by_suffix: dict[str, np.ndarray] = {}
    parameters = {name: suffix for suffix, (_, name) in bids.SUFFIXES.items()}
    for key, value in maps.items():
        suffix = parameters.get(key, key)
        if suffix not in bids.SUFFIXES:
            raise ValueError(
                f"map {key!r} has no BIDS name: use one of {sorted(parameters)} "
                f"or {sorted(bids.SUFFIXES)}"
            )
        by_suffix[suffix] = _numpy_map(value, header)
    for rate in rates:
        if rate not in bids.RATES:
            raise ValueError(f"rates: {rate!r} is not one of {sorted(bids.RATES)}")
        time = by_suffix.get(bids.RATES[rate])
        if time is None:
            raise ValueError(f"{rate} is 1/{bids.RATES[rate]}, but maps has no {bids.RATES[rate]}")
        by_suffix[rate] = np.where(time > 0, 1 / np.where(time > 0, time, 1), 0).astype(np.float32)
    if not by_suffix:
        raise ValueError("maps is empty: nothing to write")
    paths = {s: bids.map_path(root, subject, session, s) for s in by_suffix}
    existing = [p for p in paths.values() if p.exists() or _sidecar_path(p).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists: pass overwrite=True to replace the maps")
    derivative = bids.derivative_root(root)
    version = _package_version()
    links = dict(bids.read_description(derivative).get("DatasetLinks", {}))
    files = (
        header.files if isinstance(header, NiftiHeader) else [f for c in header.files for f in c]
    )
    files = list(dict.fromkeys(files))  # one multi-frame file holds every slice and contrast
    sources = bids.source_uris(files, derivative, links)
    bids.write_dataset_description(derivative, version, links, source_datasets, _code_url())
    reference = reference or f"{bids.PIPELINE} {version} (qmri_helpers), {_code_url() or ''}"
    for suffix, path in paths.items():
        units = bids.SUFFIXES[suffix][0]
        to_nifti(by_suffix[suffix], header, path, description=f"{suffix} ({units})")
        content = bids.sidecar(suffix, header, sources, algorithm, reference.rstrip(", "))
        _sidecar_path(path).write_text(json.dumps(content, indent=2) + "\n")
    return paths


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".nii.gz") + ".json")
