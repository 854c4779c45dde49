"""Load multi-echo NIfTI series with BIDS JSON sidecars (as dcm2niix writes them) via nibabel.

Echo times come from the sidecars' ``EchoTime`` (s), or, for files without a sidecar, from the
caller (``echo_times=``, s), never from file names. Times above :data:`MAX_ECHO_TIME_S` look
like ms and are refused. The arrays are returned as ``(n_echoes, z, y, x)`` like
:func:`qmri_helpers.dicom.load_series`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import einops
import nibabel as nib
import numpy as np
import torch

__all__ = ["NiftiSeriesError", "NiftiHeader", "load_nifti_series", "load_nifti", "sidecar_of"]

_DESCRIP_TE = re.compile(r"TE=([0-9.]+)")
#: The largest echo time (s) taken as seconds; a larger one is almost surely in ms.
MAX_ECHO_TIME_S = 1.0


class NiftiSeriesError(ValueError):
    """Files that are not one usable multi-echo NIfTI series."""


@dataclass
class NiftiHeader:
    """Echo times and geometry of a loaded series.

    Attributes
    ----------
    te
        Echo time per volume in s, shape ``(n_echoes,)``, increasing.
    tr
        Repetition time in s (None if the sidecars lack it).
    affine
        The NIfTI voxel-to-world (RAS, mm) affine of the first file, for indices ``(x, y, z)``.
    files
        The NIfTI files, in echo order (one per echo; one file for a 4-D series).
    sidecar
        The first sidecar's content (empty without a sidecar).
    """

    te: torch.Tensor
    tr: float | None
    affine: np.ndarray
    files: list[Path]
    sidecar: dict


def sidecar_of(path: Path) -> Path:
    """The JSON sidecar of a ``.nii`` or ``.nii.gz`` file."""
    name = path.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name.removesuffix(".nii")
    return path.with_name(stem + ".json")


def _read_sidecar(path: Path, required: bool = True) -> dict:
    sidecar = sidecar_of(path)
    if not sidecar.is_file():
        if not required:
            return {}
        raise NiftiSeriesError(
            f"{path}: no JSON sidecar ({sidecar.name}) with the echo time. Pass the echo times "
            'in s, load_nifti_series(..., echo_times=[...]), or write a sidecar {"EchoTime": '
            "<s>} (a list of one per volume for a 4-D file)"
        )
    try:
        return json.loads(sidecar.read_text())
    except json.JSONDecodeError as err:
        raise NiftiSeriesError(f"{sidecar}: not valid JSON ({err})") from err


def _to_zyx(array: np.ndarray) -> np.ndarray:
    return einops.rearrange(array, "x y z ... -> ... z y x")


def load_nifti(path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """Load one 3-D NIfTI image (e.g. a scanner's R2* map) as ``(z, y, x)`` plus its affine."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    image = nib.load(path)
    data = np.asarray(image.get_fdata(), dtype=np.float32)
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise NiftiSeriesError(f"{path}: expected a 3-D image, got shape {data.shape}")
    return torch.from_numpy(_to_zyx(data).copy()), image.affine


def _check_descrip(path: Path, image: nib.Nifti1Image, te_s: float) -> None:
    """dcm2niix writes ``TE=<ms>`` (rounded) into descrip; it must agree with the sidecar."""
    descrip = image.header.get("descrip")
    text = descrip.item().decode(errors="ignore") if descrip is not None else ""
    match = _DESCRIP_TE.search(text)
    if match and abs(float(match.group(1)) - te_s * 1000) > max(0.6, 0.02 * te_s * 1000):
        raise NiftiSeriesError(
            f"{sidecar_of(path)} disagrees with its NIfTI: the sidecar says EchoTime "
            f"{te_s * 1000:g} ms but the NIfTI header says TE={match.group(1)} ms"
        )


def _check_times(te: list[float], names: list[str]) -> None:
    """Refuse echo times that are not seconds or are duplicated, naming the files (volumes)."""
    for t, name in zip(te, names, strict=True):
        if not np.isfinite(t) or t <= 0:
            raise NiftiSeriesError(f"{name}: echo time {t} s is not a positive number")
        if t > MAX_ECHO_TIME_S:
            raise NiftiSeriesError(
                f"{name}: echo time {t:g} looks like ms, not s (echo times above "
                f"{MAX_ECHO_TIME_S:g} s are refused); give echo times in s, e.g. {t / 1000:g}"
            )
    for t in sorted(set(te)):
        if te.count(t) > 1:
            clash = [n for n, u in zip(names, te, strict=True) if u == t]
            raise NiftiSeriesError(
                f"duplicate echo times: {', '.join(clash)} all have [{round(t * 1000, 4)}] ms"
            )


def _paths(files: str | Path | list[str | Path], pattern: str) -> list[Path]:
    if isinstance(files, str | Path):
        path = Path(files)
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such file or folder")
        paths = sorted(p for p in path.glob(pattern) if p.name.endswith((".nii", ".nii.gz")))
        if not paths:
            raise NiftiSeriesError(f"{path}: no NIfTI files match {pattern!r}")
        return paths
    paths = [Path(p) for p in files]
    if not paths:
        raise NiftiSeriesError("no files given: the list of NIfTI files is empty")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
    return paths


def _given_times(
    echo_times: Sequence[float] | np.ndarray | torch.Tensor, paths: list[Path], files: object
) -> list[float]:
    """The caller's echo times (s), one per file, or one per volume of a single file."""
    te = [float(t) for t in np.atleast_1d(np.asarray(echo_times, dtype=np.float64))]
    if len(paths) > 1:
        if not isinstance(files, list | tuple):
            raise NiftiSeriesError(
                f"{len(paths)} files in {files} but echo_times gives no order for them: pass "
                "the files as a list, in the order of echo_times"
            )
        if len(te) != len(paths):
            raise NiftiSeriesError(f"{len(te)} echo_times for {len(paths)} NIfTI files")
    return te


def load_nifti_series(
    files: str | Path | list[str | Path],
    pattern: str = "*.nii*",
    echo_times: Sequence[float] | np.ndarray | torch.Tensor | None = None,
) -> tuple[torch.Tensor, NiftiHeader]:
    """Load a multi-echo series: one 3-D NIfTI per echo, or one 4-D NIfTI.

    Parameters
    ----------
    files
        A folder (files matching ``pattern``), one NIfTI file, or a list of NIfTI files. One
        3-D file per echo, sorted by echo time; or one 4-D file with one volume per echo, in
        increasing echo time. Without ``echo_times``, each file needs a JSON sidecar beside it
        whose ``EchoTime`` (s) is one value (3-D) or one per volume (4-D).
    pattern
        Glob pattern of the files in a folder, e.g. ``"*_e*.nii.gz"``.
    echo_times
        Echo times in s, for files without a sidecar: one per volume of a 4-D file, or one per
        file of a list (in the list's order). A sidecar that is present must agree with them.

    Returns
    -------
    images
        Float32 tensor ``(n_echoes, z, y, x)``.
    header
        :class:`NiftiHeader` with the echo times in s and the affine.

    Raises
    ------
    NiftiSeriesError
        No files, a missing sidecar or EchoTime (without ``echo_times``), echo times that look
        like ms (above :data:`MAX_ECHO_TIME_S`), duplicate or (4-D) unsorted echo times, files
        from different series or of different shapes, or a sidecar that disagrees with its
        NIfTI or with ``echo_times``.
    """
    paths = _paths(files, pattern)
    sidecars = [_read_sidecar(p, required=echo_times is None) for p in paths]

    def echo_time(path: Path, sidecar: dict) -> float | list[float] | None:
        if sidecar.get("EchoTime") in (None, "", []):
            if echo_times is None:
                raise NiftiSeriesError(f"{sidecar_of(path)}: missing EchoTime")
            return None
        return sidecar["EchoTime"]

    times = [echo_time(p, s) for p, s in zip(paths, sidecars, strict=True)]
    if echo_times is not None:
        given = _given_times(echo_times, paths, files)
        for k, (path, value) in enumerate(zip(paths, times, strict=True)):
            mine = given if len(paths) == 1 else [given[k]]
            if value is not None and not np.allclose(np.atleast_1d(value), mine, rtol=0.01):
                raise NiftiSeriesError(
                    f"{sidecar_of(path)} says EchoTime {value} s but echo_times gives {mine} s"
                )
        times = [given] if len(paths) == 1 else given
    images = [nib.load(p) for p in paths]

    if len(paths) == 1 and len(images[0].shape) == 4:  # one 4-D file, one volume per echo
        source = sidecar_of(paths[0]) if echo_times is None else "echo_times"
        te = [float(t) for t in np.atleast_1d(times[0])]
        n_volumes = images[0].shape[3]
        if len(te) != n_volumes:
            raise NiftiSeriesError(
                f"{source} disagrees with the NIfTI {paths[0]}: {len(te)} EchoTime values "
                f"for {n_volumes} volumes"
            )
        _check_times(te, [f"{paths[0].name} volume {k}" for k in range(len(te))])
        if te != sorted(te):
            raise NiftiSeriesError(
                f"{source}: EchoTime is not increasing "
                f"({[round(t * 1000, 4) for t in te]} ms); the volume order is ambiguous"
            )
        data = np.asarray(images[0].get_fdata(), dtype=np.float32)
        stacked = einops.rearrange(data, "x y z e -> e z y x")
        order = list(range(len(te)))
    else:
        te = []
        for path, image, value in zip(paths, images, times, strict=True):
            value = value[0] if isinstance(value, list) and len(value) == 1 else value
            if isinstance(value, list) or len(image.shape) != 3:
                raise NiftiSeriesError(f"{path}: expected one 3-D image with one EchoTime")
            _check_times([float(value)], [path.name])
            te.append(float(value))
            _check_descrip(path, image, float(value))
        series = {str(s.get("SeriesNumber")) for s in sidecars}
        if len(series) > 1:
            raise NiftiSeriesError(
                f"files from different series (SeriesNumber {', '.join(sorted(series))}): "
                "pass only the echoes of one series, e.g. with a pattern"
            )
        _check_times(te, [p.name for p in paths])
        shapes = {image.shape for image in images}
        if len(shapes) > 1:
            raise NiftiSeriesError(f"echo images of different shapes: {sorted(shapes)}")
        order = sorted(range(len(te)), key=te.__getitem__)
        stacked = np.stack(
            [_to_zyx(np.asarray(images[i].get_fdata(), dtype=np.float32)) for i in order]
        )
    tr = sidecars[0].get("RepetitionTime")
    header = NiftiHeader(
        te=torch.tensor([te[i] for i in order], dtype=torch.float32),
        tr=float(tr) if tr is not None else None,
        affine=images[0].affine,
        files=[paths[i] for i in order] if len(paths) > 1 else paths,
        sidecar=sidecars[0],
    )
    return torch.from_numpy(np.ascontiguousarray(stacked)), header
