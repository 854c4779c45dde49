"""Load a relaxometry series (one DICOM file per inversion or echo time) into a tensor.

The files are sorted by their DICOM tags (InversionTime or EchoTime, then slice position),
never by file name, and the stored values are turned into physical values with
RescaleSlope/RescaleIntercept and, for Philips, the private scale slope.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.errors import InvalidDicomError

__all__ = ["DicomSeriesError", "SeriesHeader", "load_series", "list_files"]

#: Philips private "MR scale slope" (2005,100E), used to get floating-point values.
PHILIPS_SCALE_SLOPE = (0x2005, 0x100E)
#: Attributes that must agree across all files of one series (else: two series are mixed).
_SAME_SERIES_KEYS = (
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "ImageType",
    "ScanningSequence",
)
_CONTRAST_TAGS = ("InversionTime", "EchoTime")


class DicomSeriesError(ValueError):
    """A folder or list of files that is not one usable relaxometry series."""


@dataclass
class SeriesHeader:
    """What a fit needs to know about a loaded series; all times in seconds.

    Attributes
    ----------
    ti, te, tr
        Inversion, echo and repetition time per contrast, shape ``(n_contrasts,)``;
        ``ti`` is None for a series without InversionTime.
    sorted_by
        The DICOM attribute the contrasts are sorted by: "InversionTime" or "EchoTime".
    files
        The files used, ordered as the tensor: ``files[contrast][slice]``.
    manufacturer, field_strength
        Manufacturer and MagneticFieldStrength (T; None if absent) of the first file.
    signed
        True for real-valued (phase-corrected, signed) images, False for magnitude images.
    pixel_spacing
        Row and column spacing in mm.
    """

    ti: torch.Tensor | None
    te: torch.Tensor
    tr: torch.Tensor
    sorted_by: str
    files: list[list[Path]]
    manufacturer: str = ""
    field_strength: float | None = None
    signed: bool = False
    pixel_spacing: tuple[float, float] = (1.0, 1.0)

    @property
    def contrast(self) -> torch.Tensor:
        """The sorted contrast times (s): TI for an IR series, else TE."""
        return self.ti if self.sorted_by == "InversionTime" else self.te


def list_files(folder: str | Path) -> list[Path]:
    """List the candidate DICOM files below ``folder``, recursively.

    Hidden files, macOS ``__MACOSX`` folders and ``DICOMDIR`` index files are left out.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise DicomSeriesError(f"{folder}: is a file; pass a folder or a list of files")
    files = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if any(p.startswith(".") or p == "__MACOSX" for p in parts) or path.name == "DICOMDIR":
            continue
        if path.is_file():
            files.append(path)
    if not files:
        raise DicomSeriesError(f"{folder}: the folder is empty, no DICOM files found")
    return files


def _read(paths: list[Path]) -> list[pydicom.Dataset]:
    datasets, not_dicom, no_pixels = [], [], []
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, EOFError, OSError, ValueError, struct.error):
            not_dicom.append(path)
            continue
        if "PixelData" not in ds:
            no_pixels.append(path)
        datasets.append(ds)
    if not_dicom:
        names = ", ".join(str(p) for p in not_dicom[:5])
        more = f" and {len(not_dicom) - 5} more" if len(not_dicom) > 5 else ""
        raise DicomSeriesError(
            f"{len(not_dicom)} of {len(paths)} files are not DICOM (pydicom cannot read them): "
            f"{names}{more}. Point load_series at a folder that holds only the series."
        )
    if no_pixels:
        raise DicomSeriesError(f"{no_pixels[0]}: DICOM file without image data (no PixelData)")
    return datasets


def _value(ds: pydicom.Dataset, name: str) -> float | None:
    value = ds.get(name)
    if value is None or value == "":
        return None
    return float(value)


def _philips_scale_slope(ds: pydicom.Dataset) -> float | None:
    if PHILIPS_SCALE_SLOPE not in ds:
        return None
    raw = ds[PHILIPS_SCALE_SLOPE].value
    if isinstance(raw, bytes):  # implicit VR: the FL value arrives as raw bytes
        raw = struct.unpack("<f", raw[:4])[0]
    value = float(raw[0] if isinstance(raw, list | tuple) else raw)
    return value if value not in (0.0,) and np.isfinite(value) else None


def _pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """Stored values to physical values: rescale, and for Philips the private scale slope."""
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise DicomSeriesError(f"{path}: multi-frame (enhanced) DICOM is not supported")
    try:
        stored = ds.pixel_array.astype(np.float64)
    except Exception as err:  # pydicom raises many kinds for broken pixel data
        raise DicomSeriesError(f"{path}: cannot decode the pixel data ({err})") from err
    slope = _value(ds, "RescaleSlope") or 1.0
    intercept = _value(ds, "RescaleIntercept") or 0.0
    values = stored * slope + intercept
    if "PHILIPS" in str(ds.get("Manufacturer", "")).upper():
        scale_slope = _philips_scale_slope(ds)
        if scale_slope is not None:
            # Philips floating-point value: FP = (SV * RS + RI) / (RS * SS).
            values = values / (slope * scale_slope)
    return values


def _slice_position(ds: pydicom.Dataset) -> float:
    position = ds.get("ImagePositionPatient")
    orientation = ds.get("ImageOrientationPatient")
    if position is not None and orientation is not None:
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        return round(float(np.dot(normal, np.asarray(position, float))), 3)
    return round(_value(ds, "SliceLocation") or 0.0, 3)


def _check_same_series(datasets: list[pydicom.Dataset], paths: list[Path]) -> None:
    for key in _SAME_SERIES_KEYS:
        values = [str(ds.get(key, "")) for ds in datasets]
        if len(set(values)) > 1:
            first = values[0]
            other = next(i for i, v in enumerate(values) if v != first)
            raise DicomSeriesError(
                f"two series are mixed in one folder: {key} is {first!r} in {paths[0]} "
                f"but {values[other]!r} in {paths[other]}. Put each series in its own folder."
            )


def _choose_contrast(datasets: list[pydicom.Dataset], sort_by: str | None) -> str:
    if sort_by is not None:
        if sort_by not in _CONTRAST_TAGS:
            raise ValueError(f"sort_by must be one of {_CONTRAST_TAGS} or None, got {sort_by!r}")
        return sort_by
    if any(_value(ds, "InversionTime") is not None for ds in datasets):
        return "InversionTime"
    return "EchoTime"


def load_series(
    folder_or_paths: str | Path | list[str | Path],
    sort_by: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, SeriesHeader]:
    """Load one relaxometry series into a tensor.

    Parameters
    ----------
    folder_or_paths
        A folder (searched recursively) or a list of DICOM files. Each file holds one 2-D image:
        one contrast (TI or TE) at one slice position.
    sort_by
        "InversionTime" or "EchoTime". None: InversionTime if the files have it, else EchoTime.
    dtype
        Floating-point dtype of the returned tensor.

    Returns
    -------
    images
        Physical pixel values, shape ``(n_contrasts, z, y, x)``, sorted by increasing TI or TE
        and by slice position along the slice normal.
    header
        :class:`SeriesHeader` with TI/TE/TR in seconds and the files in tensor order.

    Raises
    ------
    DicomSeriesError
        For an empty folder, files that are not DICOM, two series in one folder, a missing
        InversionTime/EchoTime, unequal matrix sizes, or a duplicated TI/TE at one slice.
    """
    if isinstance(folder_or_paths, str | Path):
        paths = list_files(folder_or_paths)
    else:
        paths = [Path(p) for p in folder_or_paths]
        if not paths:
            raise DicomSeriesError("no files given: the list of DICOM files is empty")
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file")
    datasets = _read(paths)
    _check_same_series(datasets, paths)
    tag = _choose_contrast(datasets, sort_by)
    missing = [p for p, ds in zip(paths, datasets, strict=True) if _value(ds, tag) is None]
    if missing:
        names = ", ".join(str(p) for p in missing[:3])
        raise DicomSeriesError(
            f"missing {tag}: {len(missing)} of {len(paths)} files have no {tag} value "
            f"({names}{', ...' if len(missing) > 3 else ''}); cannot sort the series by it"
        )
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        by_size = {}
        for path, ds in zip(paths, datasets, strict=True):
            by_size.setdefault((int(ds.Rows), int(ds.Columns)), path)
        listing = "; ".join(f"{r}x{c} in {p}" for (r, c), p in by_size.items())
        raise DicomSeriesError(f"unequal matrix sizes in one series: {listing}")

    # Group by (contrast time, slice position), reject duplicates.
    grid: dict[float, dict[float, int]] = defaultdict(dict)
    for index, ds in enumerate(datasets):
        time_ms = round(_value(ds, tag), 4)
        position = _slice_position(ds)
        if position in grid[time_ms]:
            other = grid[time_ms][position]
            series = (
                " (the two files come from different series: two series seem mixed)"
                if datasets[other].get("SeriesInstanceUID") != ds.get("SeriesInstanceUID")
                else ""
            )
            raise DicomSeriesError(
                f"duplicate {tag} {time_ms:g} ms at slice position {position:g} mm: "
                f"{paths[other]} and {paths[index]}{series}"
            )
        grid[time_ms][position] = index
    times = sorted(grid)
    positions = sorted(grid[times[0]])
    for time_ms in times:
        if sorted(grid[time_ms]) != positions:
            raise DicomSeriesError(
                f"{tag} {time_ms:g} ms has {len(grid[time_ms])} slice(s) but {tag} "
                f"{times[0]:g} ms has {len(positions)}: the series is incomplete"
            )

    order = [[grid[t][z] for z in positions] for t in times]
    images = np.stack([np.stack([_pixels(datasets[i], paths[i]) for i in row]) for row in order])
    first = [datasets[row[0]] for row in order]

    def seconds(name: str) -> torch.Tensor:
        return torch.tensor([(_value(ds, name) or 0.0) / 1000 for ds in first], dtype=dtype)

    ds0 = datasets[order[0][0]]
    image_type = [str(v).upper() for v in (ds0.get("ImageType") or [])]
    spacing = ds0.get("PixelSpacing") or [1.0, 1.0]
    header = SeriesHeader(
        ti=seconds("InversionTime") if tag == "InversionTime" else None,
        te=seconds("EchoTime"),
        tr=seconds("RepetitionTime"),
        sorted_by=tag,
        files=[[paths[i] for i in row] for row in order],
        manufacturer=str(ds0.get("Manufacturer", "")),
        field_strength=_value(ds0, "MagneticFieldStrength"),
        signed=bool({"R", "REAL"} & set(image_type[2:]) or images.min() < 0),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
    )
    return torch.as_tensor(images, dtype=dtype), header
