"""Load a relaxometry series (single-frame files, or enhanced multi-frame MR) into a tensor.

The images are sorted by their DICOM tags (InversionTime or EchoTime, then slice position),
never by file name, and the stored values are turned into physical values with
RescaleSlope/RescaleIntercept and, for Philips, the private scale slope. An enhanced
multi-frame file (Siemens XA, Philips, or a legacy-converted series) is read frame by frame:
each frame's TI, TE, TR, position and rescale come from its per-frame functional groups,
else from the shared ones.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator
from pydicom.multival import MultiValue

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
#: Where an enhanced multi-frame file keeps each value (in a functional group's item), besides
#: the single-frame name that a legacy-converted file keeps in its "Unassigned" groups.
_ENHANCED_NAMES = {
    "InversionTime": ("InversionTime", "InversionTimes"),  # MR Modifier
    "EchoTime": ("EchoTime", "EffectiveEchoTime"),  # MR Echo
}
#: Index files and desktop litter that sit beside DICOM files; compared in lower case.
_NOT_IMAGES = {"dicomdir", "thumbs.db", "ehthumbs.db", "desktop.ini", ".ds_store"}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class DicomSeriesError(ValueError):
    """A folder or list of files that is not one usable relaxometry series."""


@dataclass
class SeriesHeader:
    """What a fit needs to know about a loaded series; all times in seconds.

    Attributes
    ----------
    ti, te, tr
        Inversion, echo and repetition time per contrast, shape ``(n_contrasts,)``;
        ``ti`` is None for a series without InversionTime. A TE or TR that the files do not
        state is NaN (unknown, never 0), and ``notes`` says so; models that need TR refuse it.
    sorted_by
        The DICOM attribute the contrasts are sorted by: "InversionTime" or "EchoTime".
    files
        The files used, ordered as the tensor: ``files[contrast][slice]`` (the same file
        repeats for the frames of a multi-frame file).
    manufacturer, field_strength
        Manufacturer and MagneticFieldStrength (T; None if absent) of the first file.
    signed
        True for real-valued (phase-corrected, signed) images, False for magnitude images.
    pixel_spacing
        Row and column spacing in mm.
    frames
        ``frames[contrast][slice]``: the frame number (from 1) in a multi-frame file, None for
        a single-frame file.
    notes
        What the loader could not know and how it filled it in (e.g. an unknown TR).
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
    frames: list[list[int | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def contrast(self) -> torch.Tensor:
        """The sorted contrast times (s): TI for an IR series, else TE."""
        return self.ti if self.sorted_by == "InversionTime" else self.te


def _is_litter(path: Path) -> bool:
    name = path.name.lower()
    return name in _NOT_IMAGES or name.startswith("._")


def list_files(folder: str | Path) -> list[Path]:
    """List the candidate DICOM files below ``folder``, recursively.

    Hidden files, macOS ``__MACOSX`` folders, ``DICOMDIR`` index files (in any case) and
    desktop litter (``Thumbs.db``, ``desktop.ini``, ``.DS_Store``) are left out.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise DicomSeriesError(f"{folder}: is a file; pass a folder or a list of files")
    files = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if any(p.startswith(".") or p == "__MACOSX" for p in parts) or _is_litter(path):
            continue
        if path.is_file():
            files.append(path)
    if not files:
        raise DicomSeriesError(f"{folder}: the folder is empty, no DICOM files found")
    return files


def _truncated(path: Path) -> str | None:
    """Where a DICOM file ends early (a data element cut short), or None if it looks whole.

    pydicom stops quietly at the end of a file, so a file cut before its pixel data reads as
    a file without pixel data; walking its elements tells the two apart.
    """
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        start = 132 + 12 + int(meta.FileMetaInformationGroupLength)
        syntax = meta.TransferSyntaxUID
        if syntax.is_deflated:
            return None
        size = path.stat().st_size
        with open(path, "rb") as fp:
            fp.seek(start)
            end = start
            for raw in data_element_generator(fp, syntax.is_implicit_VR, syntax.is_little_endian):
                value = raw.value
                if (
                    raw.length != 0xFFFFFFFF
                    and isinstance(value, bytes)
                    and len(value) < raw.length
                ):
                    name = pydicom.datadict.keyword_for_tag(raw.tag) or str(raw.tag)
                    return f"it ends inside {name} ({len(value)} of {raw.length} bytes)"
                end = fp.tell()
        if end < size:
            return f"it ends inside a data element header ({size - end} stray bytes)"
    except Exception as err:  # a file cut inside its meta header or inside a sequence
        return f"it cannot be parsed to its end ({type(err).__name__}: {err})"
    return None


def _read(paths: list[Path]) -> list[pydicom.Dataset]:
    datasets, not_dicom, no_pixels = [], [], []
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, EOFError, OSError, ValueError, struct.error):
            with open(path, "rb") as fp:
                magic = fp.read(132)[128:]
            if magic == b"DICM":
                raise DicomSeriesError(
                    f"{path}: a DICOM file that pydicom cannot read: truncated or corrupt "
                    f"({_truncated(path) or 'its elements are malformed'})"
                ) from None
            not_dicom.append(path)
            continue
        if not any(k in ds for k in _PIXEL_KEYWORDS):
            no_pixels.append(path)
        datasets.append(ds)
    if not_dicom:
        names = ", ".join(str(p) for p in not_dicom[:5])
        more = f" and {len(not_dicom) - 5} more" if len(not_dicom) > 5 else ""
        raise DicomSeriesError(
            f"{len(not_dicom)} of {len(paths)} files are not DICOM (pydicom cannot read them): "
            f"{names}{more}. Point load_series at a folder that holds only the series."
        )
    for path in no_pixels:
        why = _truncated(path)
        if why is not None:
            raise DicomSeriesError(f"{path}: the file is truncated: {why}; copy it again")
    if no_pixels:
        raise DicomSeriesError(f"{no_pixels[0]}: DICOM file without image data (no PixelData)")
    return datasets


def _text(dataset: pydicom.Dataset, key: str | int | tuple[int, int]) -> object:
    """The value of ``key``; for a value pydicom cannot convert, its raw text."""
    try:
        return dataset[key].value
    except (ValueError, TypeError, OverflowError):  # e.g. a DS "abc" fails on access
        raw = dataset.get_item(key)
        value = raw.value if isinstance(raw, RawDataElement) else raw
        return value.decode(errors="replace").strip(" \0") if isinstance(value, bytes) else value


@dataclass
class _Image:
    """One 2-D image: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    ds: pydicom.Dataset
    frame: int | None = None  # 0-based index in a multi-frame file

    @property
    def where(self) -> str:
        if self.frame is None:
            return str(self.path)
        return f"{self.path} frame {self.frame + 1} of {int(self.ds.NumberOfFrames)}"

    def _groups(self) -> list[pydicom.Dataset]:
        """The functional-group items to search: this frame's, then the shared ones."""
        if self.frame is None:
            return []
        groups = []
        for name, index in (
            ("PerFrameFunctionalGroupsSequence", self.frame),
            ("SharedFunctionalGroupsSequence", 0),
        ):
            sequence = self.ds.get(name)
            if sequence is not None and len(sequence) > index:
                groups.append(sequence[index])
        return groups

    def get(self, name: str | tuple[int, int]) -> object:
        """A value of this image: for a frame, from its functional groups, else the file's."""
        keys = _ENHANCED_NAMES.get(name, (name,)) if isinstance(name, str) else (name,)
        for group in self._groups():
            for element in group:
                if element.VR != "SQ" or not element.value:
                    continue
                item = element.value[0]
                for key in keys:
                    if key in item:
                        return _text(item, key)
        for key in keys:
            if key in self.ds:
                return _text(self.ds, key)
        return None


def _images(datasets: list[pydicom.Dataset], paths: list[Path]) -> list[_Image]:
    images = []
    for path, ds in zip(paths, datasets, strict=True):
        n_frames = _number(_Image(path, ds), "NumberOfFrames") if "NumberOfFrames" in ds else None
        if n_frames is None or ("PerFrameFunctionalGroupsSequence" not in ds and n_frames == 1):
            images.append(_Image(path, ds))
        else:
            images.extend(_Image(path, ds, k) for k in range(int(n_frames)))
    return images


def _present(raw: object) -> bool:
    """Whether a value is there: not absent, not empty text, not an empty list."""
    if isinstance(raw, MultiValue | list | tuple):
        return len(raw) > 0
    return raw is not None and raw != ""


def _number(image: _Image, name: str, *, unit: str = "") -> float | None:
    """A numeric attribute of one image, or None if absent; a clear error if not a number."""
    raw = image.get(name)
    if not _present(raw):
        return None
    if isinstance(raw, MultiValue | list | tuple):
        if len(raw) != 1:
            raise DicomSeriesError(
                f"{image.where}: {name} has {len(raw)} values ({list(raw)}); expected one"
            )
        raw = raw[0]
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise DicomSeriesError(f"{image.where}: {name} is {str(raw)!r}, not a number") from None
    if not np.isfinite(value):
        raise DicomSeriesError(f"{image.where}: {name} is {raw}{unit}, not a finite number")
    return value


def _time_ms(image: _Image, name: str) -> float | None:
    """A time attribute in ms: absent is None; NaN, inf, negative or text is an error."""
    value = _number(image, name, unit=" ms")
    if value is not None and value < 0:
        raise DicomSeriesError(f"{image.where}: {name} is {value:g} ms, a negative time")
    return value


def _philips_scale_slope(image: _Image) -> float | None:
    raw = image.get(PHILIPS_SCALE_SLOPE)
    if raw is None:
        return None
    if isinstance(raw, bytes):  # implicit VR: the FL value arrives as raw bytes
        raw = struct.unpack("<f", raw[:4])[0]
    value = float(raw[0] if isinstance(raw, list | tuple | MultiValue) else raw)
    return value if value not in (0.0,) and np.isfinite(value) else None


def _rescale(image: _Image) -> tuple[float, float]:
    slope = _number(image, "RescaleSlope")
    intercept = _number(image, "RescaleIntercept")
    if slope == 0:
        raise DicomSeriesError(
            f"{image.where}: RescaleSlope is 0, which would turn every pixel into "
            f"{intercept or 0:g}; the file's scaling is broken"
        )
    return (1.0 if slope is None else slope), (intercept or 0.0)


def _stored(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """All stored frames of one file, shape ``(frames, rows, columns)``."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if "PixelData" in ds and syntax is not None and not syntax.is_compressed:
        frames = int(_number(_Image(path, ds), "NumberOfFrames") or 1)
        expected = int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("SamplesPerPixel", 1))
        expected = expected * int(ds.BitsAllocated) // 8
        if len(ds.PixelData) < expected:
            raise DicomSeriesError(
                f"{path}: the file is truncated: its PixelData holds {len(ds.PixelData)} of "
                f"the {expected} bytes that {int(ds.Rows)}x{int(ds.Columns)} pixels x "
                f"{frames} frame(s) need; copy it again"
            )
    try:
        stored = ds.pixel_array.astype(np.float64)
    except Exception as err:  # pydicom raises many kinds for broken pixel data
        raise DicomSeriesError(f"{path}: cannot decode the pixel data ({err})") from err
    return stored.reshape(-1, int(ds.Rows), int(ds.Columns))


def _pixels(image: _Image, stored: np.ndarray) -> np.ndarray:
    """Stored values to physical values: rescale, and for Philips the private scale slope."""
    slope, intercept = _rescale(image)
    values = stored[image.frame or 0] * slope + intercept
    if "PHILIPS" in str(image.get("Manufacturer") or "").upper():
        scale_slope = _philips_scale_slope(image)
        if scale_slope is not None:
            # Philips floating-point value: FP = (SV * RS + RI) / (RS * SS).
            values = values / (slope * scale_slope)
    return values


def _slice_position(image: _Image) -> float:
    position = image.get("ImagePositionPatient")
    orientation = image.get("ImageOrientationPatient")
    if position is not None and orientation is not None:
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        return round(float(np.dot(normal, np.asarray(position, float))), 3)
    return round(_number(image, "SliceLocation") or 0.0, 3)


def _check_same_series(images: list[_Image]) -> None:
    for key in _SAME_SERIES_KEYS:
        values = [str(image.get(key) or "") for image in images]
        if len(set(values)) > 1:
            first = values[0]
            other = next(i for i, v in enumerate(values) if v != first)
            raise DicomSeriesError(
                f"two series are mixed in one folder: {key} is {first!r} in {images[0].where} "
                f"but {values[other]!r} in {images[other].where}. Put each series in its own "
                "folder."
            )


def _choose_contrast(images: list[_Image], sort_by: str | None) -> str:
    if sort_by is not None:
        if sort_by not in _CONTRAST_TAGS:
            raise ValueError(f"sort_by must be one of {_CONTRAST_TAGS} or None, got {sort_by!r}")
        return sort_by
    if any(_present(image.get("InversionTime")) for image in images):
        return "InversionTime"
    return "EchoTime"


def _missing(tag: str, images: list[_Image]) -> str:
    """Why ``tag`` is missing, naming the images (and for frames, where it was looked for)."""
    names = ", ".join(image.where for image in images[:3])
    more = ", ..." if len(images) > 3 else ""
    where = ""
    if images[0].frame is not None:
        macro = (
            "MRModifierSequence > InversionTimes"
            if tag == "InversionTime"
            else ("MREchoSequence > EffectiveEchoTime")
        )
        where = f" (looked in the per-frame and shared functional groups: {macro}, or {tag})"
    return f"{names}{more}{where}"


def _unknown(name: str, values: list[float | None], images: list[_Image]) -> str | None:
    missing = [image for value, image in zip(values, images, strict=True) if value is None]
    if not missing:
        return None
    return (
        f"{name} unknown (NaN) for {len(missing)} of {len(values)} contrasts: no {name} in "
        f"{_missing(name, missing)}. Models that need it refuse this series."
    )


def load_series(
    folder_or_paths: str | Path | list[str | Path],
    sort_by: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, SeriesHeader]:
    """Load one relaxometry series into a tensor.

    Parameters
    ----------
    folder_or_paths
        A folder (searched recursively) or a list of DICOM files. Each file holds one 2-D image
        (one contrast, TI or TE, at one slice position), or is an enhanced multi-frame file
        whose frames are such images, with TI/TE in their functional groups.
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
        For an empty folder, files that are not DICOM or are truncated, two series in one
        folder, a missing InversionTime/EchoTime (naming the file, and the frame), a time that
        is not a finite, non-negative number, a RescaleSlope of 0, NaN or inf, unequal matrix
        sizes, or a duplicated TI/TE at one slice.
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
        paths = [p for p in paths if not _is_litter(p)]
        if not paths:
            raise DicomSeriesError("no files given: the list holds only DICOMDIR or desktop files")
    datasets = _read(paths)
    images = _images(datasets, paths)
    _check_same_series(images)
    tag = _choose_contrast(images, sort_by)
    contrast = [_time_ms(image, tag) for image in images]
    missing = [image for image, value in zip(images, contrast, strict=True) if value is None]
    if missing:
        unit = "frames" if images[0].frame is not None else "files"
        raise DicomSeriesError(
            f"missing {tag}: {len(missing)} of {len(images)} {unit} have no {tag} value "
            f"({_missing(tag, missing)}); cannot sort the series by it"
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
    for index, image in enumerate(images):
        time_ms = round(contrast[index], 4)
        position = _slice_position(image)
        if position in grid[time_ms]:
            other = images[grid[time_ms][position]]
            series = (
                " (the two files come from different series: two series seem mixed)"
                if other.get("SeriesInstanceUID") != image.get("SeriesInstanceUID")
                else ""
            )
            raise DicomSeriesError(
                f"duplicate {tag} {time_ms:g} ms at slice position {position:g} mm: "
                f"{other.where} and {image.where}{series}"
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
    stored = {}
    for path, ds in zip(paths, datasets, strict=True):
        stored[path] = _stored(ds, path)
    pixels = np.stack(
        [np.stack([_pixels(images[i], stored[images[i].path]) for i in row]) for row in order]
    )
    first = [images[row[0]] for row in order]
    notes = []

    def seconds(name: str) -> torch.Tensor:
        values = [_time_ms(image, name) for image in first]
        note = _unknown(name, values, first)
        if note is not None:
            notes.append(note)
        return torch.tensor([np.nan if v is None else v / 1000 for v in values], dtype=dtype)

    image0 = images[order[0][0]]
    image_type = [str(v).upper() for v in (image0.get("ImageType") or [])]
    component = str(image0.get("ComplexImageComponent") or "").upper()
    spacing = image0.get("PixelSpacing") or [1.0, 1.0]
    header = SeriesHeader(
        ti=seconds("InversionTime") if tag == "InversionTime" else None,
        te=seconds("EchoTime"),
        tr=seconds("RepetitionTime"),
        sorted_by=tag,
        files=[[images[i].path for i in row] for row in order],
        manufacturer=str(image0.get("Manufacturer") or ""),
        field_strength=_number(image0, "MagneticFieldStrength"),
        signed=bool({"R", "REAL"} & set(image_type[2:]) or component == "REAL" or pixels.min() < 0),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        frames=[
            [None if images[i].frame is None else images[i].frame + 1 for i in row] for row in order
        ],
        notes=notes,
    )
    return torch.as_tensor(pixels, dtype=dtype), header
