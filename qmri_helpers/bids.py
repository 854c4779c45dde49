"""BIDS qMRI derivatives: where the maps go and what their JSON files say.

Follows the quantitative MRI appendix of the BIDS specification and its ``qmri_irt1``
example: maps are derivatives, stored as
``<root>/derivatives/qmri-tutorials/sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>]_<suffix>.nii.gz``
with a JSON sidecar each (``Units``, ``EstimationAlgorithm``, ``EstimationReference``,
``Sources``, the acquisition parameters that are constant as numbers and those that vary, such
as ``InversionTime``, as arrays, in s). The derivative folder has a ``dataset_description.json``
with ``"DatasetType": "derivative"`` and ``GeneratedBy``.

``Sources`` are BIDS URIs, ``bids:<link>:<path>``; ``DatasetLinks`` in the description says
where each link points: a path relative to the derivative folder when the source files lie
under the BIDS root, else a ``file://`` URI of the folder that holds them.

Writing the images is :func:`qmri_helpers.export.to_bids`; this module names things and
writes the JSON files and the derivative's README.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import pydicom

from .dicom import SeriesHeader
from .nifti import NiftiHeader

__all__ = [
    "BIDS_VERSION",
    "PIPELINE",
    "SUFFIXES",
    "VALIDATOR_CONFIG",
    "acquisition_metadata",
    "derivative_root",
    "map_path",
    "read_description",
    "sidecar",
    "source_uris",
    "write_dataset_description",
]

#: The pipeline's folder under ``derivatives/`` and its name in ``GeneratedBy``.
PIPELINE = "qmri-tutorials"
#: The version of the BIDS specification the files follow.
BIDS_VERSION = "1.10.0"
#: The maps this package writes: BIDS suffix -> (Units, the package's parameter name).
SUFFIXES = {
    "T1map": ("s", "t1"),
    "T2starmap": ("s", "t2star"),
    "R1map": ("1/s", "r1"),
    "R2starmap": ("1/s", "r2star"),
    "M0map": ("arbitrary", "m0"),
}
DESCRIPTIONS = {
    "T1map": "Longitudinal relaxation time (s)",
    "T2starmap": "Observed transverse relaxation time (s)",
    "R1map": "Longitudinal relaxation rate (1/s)",
    "R2starmap": "Observed transverse relaxation rate (1/s)",
    "M0map": "Equilibrium magnetization (the data's arbitrary unit)",
}
#: Rate maps and the time map each is the inverse of.
RATES = {"R1map": "T1map", "R2starmap": "T2starmap"}
#: A config for ``bids-validator-deno --config``: the one conflict inside the specification.
#: Its qMRI appendix asks for the parameters that vary (``InversionTime``) as arrays in the
#: map's sidecar; its schema types ``InversionTime`` as one number. This turns that error into
#: a warning (it stays listed); every other check keeps its level.
VALIDATOR_CONFIG = {
    "warning": [{"code": "JSON_SCHEMA_VALIDATION_ERROR", "subCode": "InversionTime"}]
}
_LABEL = re.compile(r"[A-Za-z0-9]+")
#: Acquisition parameters copied (when constant) from the first DICOM file or NIfTI sidecar.
_CONSTANT_KEYS = {
    "Manufacturer": "Manufacturer",
    "ManufacturerModelName": "ManufacturersModelName",
    "MagneticFieldStrength": "MagneticFieldStrength",
    "FlipAngle": "FlipAngle",
    "MRAcquisitionType": "MRAcquisitionType",
}


def check_label(entity: str, label: str) -> str:
    """A BIDS label (``sub``, ``ses``) must be letters and digits only; return it."""
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise ValueError(
            f"{entity} label {label!r} is not a BIDS label: letters and digits only "
            f"(no '{entity}-' prefix, no '_', '-' or '/'), e.g. '01'"
        )
    return label


def derivative_root(root: str | Path) -> Path:
    """The derivative dataset's folder, ``<root>/derivatives/qmri-tutorials``."""
    return Path(root) / "derivatives" / PIPELINE


def map_path(root: str | Path, subject: str, session: str | None, suffix: str) -> Path:
    """The NIfTI file of one map in the derivative dataset under the BIDS ``root``."""
    if suffix not in SUFFIXES:
        raise ValueError(f"map {suffix!r} is not one of {sorted(SUFFIXES)}")
    entities = [f"sub-{check_label('sub', subject)}"]
    folder = derivative_root(root) / entities[0]
    if session is not None:
        entities.append(f"ses-{check_label('ses', session)}")
        folder = folder / entities[1]
    return folder / "anat" / f"{'_'.join(entities)}_{suffix}.nii.gz"


def _number(value: float) -> float | int:
    value = round(float(value), 6)  # times in s to the microsecond: float32 noise dropped
    return int(value) if value.is_integer() else value


def _times(values) -> list[float] | None:
    if values is None:
        return None
    times = [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    return [_number(t) for t in times] if all(math.isfinite(t) for t in times) else None


def acquisition_metadata(header: SeriesHeader | NiftiHeader) -> dict:
    """The acquisition parameters of a series, as a qMRI sidecar holds them (times in s).

    Timing that varies across the contrasts (``InversionTime``, ``EchoTime``,
    ``RepetitionTime``) is an array, one value per contrast in the fit's order; timing that
    is constant is a number. Unknown timing (missing, NaN) is left out. Manufacturer, model,
    field strength, flip angle and acquisition type come from the first file (DICOM) or
    sidecar (NIfTI) where present.
    """
    if isinstance(header, NiftiHeader):
        tr = None if header.tr is None else [header.tr]
        timing = {"EchoTime": _times(header.te), "RepetitionTime": _times(tr)}
        source = header.sidecar
        constants = {bids: source[bids] for bids in _CONSTANT_KEYS.values() if bids in source}
    elif isinstance(header, SeriesHeader):
        timing = {
            "InversionTime": _times(header.ti),
            "EchoTime": _times(header.te),
            "RepetitionTime": _times(header.tr),
        }
        first = pydicom.dcmread(header.files[0][0], stop_before_pixels=True)
        constants = {}
        for keyword, bids in _CONSTANT_KEYS.items():
            value = first.get(keyword)
            if value in (None, ""):
                continue
            numeric = bids in ("MagneticFieldStrength", "FlipAngle")
            constants[bids] = _number(value) if numeric else str(value)
    else:
        raise TypeError(f"header must be a SeriesHeader or NiftiHeader, got {type(header)}")
    metadata = dict(constants)
    for key, values in timing.items():
        if values:
            metadata[key] = values[0] if len(set(values)) == 1 else values
    return metadata


def source_uris(files: Sequence[Path], derivative: Path, links: dict[str, str]) -> list[str]:
    """BIDS URIs of the source files; adds the link they need to ``links`` (in place).

    A link to the folder that holds all of them: relative to the derivative folder when that
    folder lies beside it under the same BIDS root, else an absolute ``file://`` URI.
    """
    paths = [Path(f).resolve() for f in files]
    common = Path(os.path.commonpath([p.parent for p in paths]))
    bids_root = derivative.resolve().parent.parent
    if common.is_relative_to(bids_root):
        target = Path(os.path.relpath(common, derivative.resolve())).as_posix()
    else:
        target = common.as_uri()
    name = next((k for k, v in links.items() if v == target), None)
    if name is None:
        candidates = ["source"] + [f"source{k}" for k in range(2, len(links) + 2)]
        name = next(n for n in candidates if n not in links)
        links[name] = target
    return [f"bids:{name}:{p.relative_to(common).as_posix()}" for p in paths]


def sidecar(
    suffix: str,
    header: SeriesHeader | NiftiHeader,
    sources: list[str],
    algorithm: str,
    reference: str,
) -> dict:
    """The JSON sidecar of one map: what it is, how it was estimated, from what."""
    units, _ = SUFFIXES[suffix]
    what = DESCRIPTIONS[suffix]
    if suffix in RATES:
        what += f", 1 / {RATES[suffix].removesuffix('map')} (0 where that fit failed)"
    content = {
        "Description": f"{what}, fitted voxel by voxel by qmri_helpers",
        "Units": units,
        "EstimationAlgorithm": algorithm,
        "EstimationReference": reference,
        "Sources": sources,
        "SkullStripped": False,
    }
    content.update(acquisition_metadata(header))
    return content


def read_description(derivative: Path) -> dict:
    """The derivative's ``dataset_description.json`` ({} if there is none yet)."""
    path = Path(derivative) / "dataset_description.json"
    if not path.exists():
        return {}
    try:
        description = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): fix or move it") from err
    if not isinstance(description, dict):
        raise ValueError(f"{path} is not a JSON object: fix or move it")
    return description


def write_dataset_description(
    derivative: Path,
    version: str,
    links: dict[str, str],
    source_datasets: Sequence[dict] = (),
    code_url: str | None = None,
) -> Path:
    """Write (or extend) the derivative's ``dataset_description.json`` and a README.

    An existing description written by this pipeline keeps its links and source datasets and
    gets the new ones; one written by another pipeline is refused.
    """
    path = derivative / "dataset_description.json"
    description = read_description(derivative)
    if description:
        names = [g.get("Name") for g in description.get("GeneratedBy", [])]
        if PIPELINE not in names:
            raise FileExistsError(
                f"{path} was not written by {PIPELINE} (GeneratedBy: {names}): "
                "choose another root, or move that derivative"
            )
    generated = {
        "Name": PIPELINE,
        "Version": version,
        "Description": "qmri_helpers: relaxometry maps fitted voxel by voxel",
    }
    if code_url:
        generated["CodeURL"] = code_url
    all_links = {**description.get("DatasetLinks", {}), **links}
    datasets = list(description.get("SourceDatasets", []))
    datasets += [d for d in source_datasets if d not in datasets]
    description.update(
        {
            "Name": description.get("Name", f"{PIPELINE} relaxometry maps"),
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [generated],
        }
    )
    if all_links:
        description["DatasetLinks"] = all_links
    if datasets:
        description["SourceDatasets"] = datasets
    derivative.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(description, indent=2) + "\n")
    readme = derivative / "README.md"
    if not readme.exists():
        readme.write_text(
            f"# {PIPELINE} relaxometry maps\n\nQuantitative maps (T1, T2*, R1, R2*, M0) fitted "
            f"voxel by voxel with qmri_helpers {version}. Each map's JSON sidecar says how it "
            "was estimated and from which source files (`Sources`, resolved through "
            "`DatasetLinks` in `dataset_description.json`).\n"
        )
    return path
