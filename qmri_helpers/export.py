"""Maps that leave the notebook: NIfTI and DICOM with the geometry of the source series.

Maps have the shape ``(z, y, x)`` that :func:`qmri_helpers.dicom.load_series` gives per
contrast (slice, row, column). Times are in seconds inside the package; the files say their
unit (NIfTI ``xyzt_units`` and description, DICOM SeriesDescription and RescaleType).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from pydicom.uid import generate_uid

from .dicom import SeriesHeader

__all__ = ["dicom_affine", "to_nifti", "to_dicom"]

#: DICOM's patient axes (LPS) to NIfTI's (RAS).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def dicom_affine(header: SeriesHeader) -> np.ndarray:
    """The NIfTI (RAS, mm) affine of the series' voxels, indexed ``(column, row, slice)``.

    Built from ImagePositionPatient, ImageOrientationPatient and PixelSpacing of the first
    contrast's files; the slice direction is the step between the first and last slice, or
    the normal times SliceThickness for a single slice.
    """
    first = pydicom.dcmread(header.files[0][0], stop_before_pixels=True)
    orientation = np.asarray(first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    row_spacing, column_spacing = (float(v) for v in first.get("PixelSpacing", [1.0, 1.0]))
    origin = np.asarray(first.get("ImagePositionPatient", [0, 0, 0]), float)
    normal = np.cross(row_cosine, column_cosine)
    n_slices = len(header.files[0])
    if n_slices > 1:
        last = pydicom.dcmread(header.files[0][-1], stop_before_pixels=True)
        step = (np.asarray(last.ImagePositionPatient, float) - origin) / (n_slices - 1)
    else:
        step = normal * float(first.get("SliceThickness", 1.0) or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = row_cosine * column_spacing  # along a row: the column index
    affine[:3, 1] = column_cosine * row_spacing  # down a column: the row index
    affine[:3, 2] = step
    affine[:3, 3] = origin
    return _LPS_TO_RAS @ affine


def _numpy_map(values: torch.Tensor | np.ndarray, header: SeriesHeader) -> np.ndarray:
    """The map as float32 ``(z, y, x)``, checked against the series it is to be stored with."""
    array = np.asarray(torch.as_tensor(values).detach().cpu(), dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"a map must have shape (z, y, x) or (y, x), got {array.shape}")
    first = pydicom.dcmread(header.files[0][0], stop_before_pixels=True)
    expected = (len(header.files[0]), int(first.Rows), int(first.Columns))
    if array.shape != expected:
        raise ValueError(
            f"the map has shape {array.shape} (slices, rows, columns) but the series "
            f"{header.files[0][0].parent} has {expected}"
        )
    if not np.isfinite(array).all():
        raise ValueError("the map holds NaN or inf: mask failed voxels (set them to 0) first")
    return array


def to_nifti(
    values: torch.Tensor | np.ndarray,
    header: SeriesHeader,
    path: str | Path,
    description: str = "",
) -> Path:
    """Write a map ``(z, y, x)`` to NIfTI-1 with the source series' geometry.

    Parameters
    ----------
    values
        The map, in the units you want stored (e.g. T1 in s).
    header
        The header of the series the map was fitted from (:func:`~qmri_helpers.dicom.load_series`).
    path
        Output file, ``.nii`` or ``.nii.gz``.
    description
        Stored in the header's ``descrip`` field (80 characters), e.g. ``"T1 (s)"``.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    array = _numpy_map(values, header)
    image = nib.Nifti1Image(np.transpose(array, (2, 1, 0)), dicom_affine(header))
    image.header.set_xyzt_units(xyz="mm", t="sec")
    image.header["descrip"] = description[:79].encode()
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def to_dicom(
    values: torch.Tensor | np.ndarray,
    header: SeriesHeader,
    folder: str | Path,
    name: str = "T1",
    unit: str = "ms",
    scale: float = 1000.0,
) -> list[Path]:
    """Write a map as a derived DICOM MR series, one file per slice, in the source's frame.

    Each file copies the patient, study and geometry of the source slice, gets new series and
    instance UIDs and the ImageType DERIVED, SECONDARY, "<name> MAP". Pixel values are uint16
    with a RescaleSlope, so that ``pixel_array * RescaleSlope + RescaleIntercept`` gives the
    map in ``unit`` to within half a slope step.

    Parameters
    ----------
    values
        The map in s (or any unit), shape ``(z, y, x)``; negative values are refused.
    header
        The header of the source series.
    folder
        Output folder (created).
    name
        Parameter name for SeriesDescription and ImageType, e.g. ``"T1"``.
    unit
        Unit of the stored values, written to RescaleType and SeriesDescription.
    scale
        Factor from ``values`` to ``unit`` (1000: s to ms).

    Returns
    -------
    list of pathlib.Path
        The files written, in slice order.
    """
    array = _numpy_map(values, header).astype(np.float64) * scale
    if (array < 0).any():
        raise ValueError(f"the {name} map has negative values: DICOM export stores uint16")
    peak = float(array.max()) or 1.0
    slope = peak / 65000.0
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
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
        ds.SeriesDescription = f"{name} map ({unit}), qmri_helpers"
        ds.ImageType = ["DERIVED", "SECONDARY", f"{name.upper()} MAP"]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = array.shape[1:]
        ds.RescaleSlope = f"{slope:.10g}"
        ds.RescaleIntercept = 0
        ds.RescaleType = unit
        ds.PixelData = np.round(array[z] / float(ds.RescaleSlope)).astype(np.uint16).tobytes()
        path = folder / f"{name}_{z + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
