"""A synthetic relaxometry phantom, written as real DICOM files.

The phantom mimics the T1 plate of the ISMRM/NIST system phantom: 14 round vials with the
nominal T1 values of its NiCl2 spheres, sitting in a water-filled disc. Each vial also has a
T2* value (synthetic, chosen to span 5 to 150 ms). Images are simulated from the known maps,
corrupted with Rician noise and stored as uint16 DICOM files, one file per inversion or echo
time, so that every step of a tutorial runs on exactly the kind of input a scanner gives.

All times are in seconds inside this module; the DICOM tags are written in ms, as the standard
asks.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = [
    "NIST_T1_3T",
    "NIST_T1_1P5T",
    "VIAL_T2STAR",
    "DEFAULT_TI",
    "DEFAULT_TE",
    "PLATE5_TI",
    "Phantom",
    "make_phantom",
    "simulate_inversion_recovery",
    "simulate_multi_echo",
    "write_series",
    "write_ir_phantom",
    "write_multi_echo_phantom",
    "write_plate5_phantom",
    "write_plate4_phantom",
    "write_transformed_copy",
    "SPIN_ECHO_TE",
    "SpinEchoPhantom",
    "make_spin_echo_phantom",
    "simulate_spin_echo",
    "write_spin_echo_phantom",
]

#: Nominal T1 (s) of spheres 1-14 of the NIST/Caliber T1 plate at 3 T (hazen's table).
NIST_T1_3T = (
    1.989, 1.454, 0.9841, 0.706, 0.4967, 0.3515, 0.24713,
    0.1753, 0.1259, 0.0890, 0.0627, 0.04453, 0.03084, 0.021719,
)  # fmt: skip
#: Nominal T1 (s) of spheres 1-14 of the NIST/Caliber T1 plate at 1.5 T (hazen's table).
NIST_T1_1P5T = (
    2.033, 1.489, 1.012, 0.7308, 0.5141, 0.3679, 0.2601,
    0.1846, 0.1327, 0.0927, 0.0654, 0.04632, 0.03245, 0.022859,
)  # fmt: skip
#: Synthetic T2* (s) of the 14 vials: not NIST values, chosen to span 5 to 150 ms.
VIAL_T2STAR = (
    0.150, 0.120, 0.095, 0.075, 0.060, 0.048, 0.038,
    0.030, 0.024, 0.018, 0.013, 0.010, 0.0075, 0.005,
)  # fmt: skip
#: T1 and T2* (s) of the water-filled disc that holds the vials.
FILL_T1, FILL_T2STAR = 2.7, 0.2

#: Inversion times (s) of the synthetic IR series: 10 TIs, like the challenge data.
DEFAULT_TI = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8, 1.2, 2.0, 3.0)
#: Inversion times (s) of the hazen phantom-QA protocol (IR spin echo, TR 1 s).
PLATE5_TI = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8)
#: Echo times (s) of the synthetic multi-echo series: 11 echoes, like the challenge data.
DEFAULT_TE = tuple(round(0.0025 + 0.0045 * k, 4) for k in range(11))


@dataclass(frozen=True)
class Phantom:
    """Ground truth of the synthetic phantom.

    Every map has shape ``(z, y, x)`` with ``z = 1``, the shape that
    :func:`qmri_helpers.dicom.load_series` gives per contrast.

    Attributes
    ----------
    m0
        Equilibrium magnetisation (a.u.); 0 outside the phantom.
    t1, t2star
        Relaxation times in s; 0 outside the phantom.
    labels
        0 for air, 1-14 for the vials (sphere numbers), 15 for the water-filled disc.
    pixel_spacing
        In-plane pixel size in mm.
    """

    m0: np.ndarray
    t1: np.ndarray
    t2star: np.ndarray
    labels: np.ndarray
    pixel_spacing: float

    def vial_mask(self, t1_range: tuple[float, float] = (0.0, np.inf)) -> np.ndarray:
        """Boolean mask of the vials whose true T1 (s) lies in ``t1_range``."""
        in_vial = (self.labels >= 1) & (self.labels <= 14)
        return in_vial & (self.t1 >= t1_range[0]) & (self.t1 <= t1_range[1])


def make_phantom(
    shape: tuple[int, int] = (128, 128),
    field_strength: float = 3.0,
    fov_mm: float = 200.0,
    layout: str = "rings",
) -> Phantom:
    """Build the ground-truth maps of the phantom.

    Parameters
    ----------
    shape
        Matrix ``(y, x)``.
    field_strength
        1.5 or 3.0 (T): selects the NIST nominal T1 table.
    fov_mm
        Field of view in mm (square pixels).
    layout
        ``"rings"``: 10 vials on an outer and 4 on an inner ring, scaled to the matrix (the
        tutorials' default). ``"plate5"``: the spheres at the positions of the system
        phantom's T1 plate (hazen's template, in mm), 10 mm in radius, for phantom QA;
        ``"plate4"``: the same positions with the T1 of plate 4 (the T2 array).

    Returns
    -------
    Phantom
        Maps of shape ``(1, y, x)``.
    """
    if field_strength not in (1.5, 3.0):
        raise ValueError(f"field_strength must be 1.5 or 3.0 T, got {field_strength!r}")
    vial_t1 = NIST_T1_3T if field_strength == 3.0 else NIST_T1_1P5T
    if layout == "plate4":  # the T2 array: MnCl2 spheres with their own (longer) T1
        from .reference import T1_V1_MS

        vial_t1 = tuple(v / 1000 for v in T1_V1_MS[4, field_strength])
    ny, nx = shape
    size = min(ny, nx)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    labels = np.zeros(shape, dtype=np.int16)
    labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= (0.46 * size) ** 2] = 15
    spacing = fov_mm / size
    if layout == "rings":
        # 10 vials on an outer ring, 4 on an inner one, clockwise from 12 o'clock.
        rings = [(10, 0.31 * size, 0.0), (4, 0.12 * size, np.pi / 4)]
        centres = [
            (
                cy - r * np.cos(offset + 2 * np.pi * k / n),
                cx + r * np.sin(offset + 2 * np.pi * k / n),
            )
            for n, r, offset in rings
            for k in range(n)
        ]
        radius = 0.055 * size
    elif layout in ("plate5", "plate4"):
        from .spheres import template_spheres

        labels[(yy - cy) ** 2 + (xx - cx) ** 2 > (85 / spacing) ** 2] = 0
        centres = template_spheres(shape, spacing)[:14]
        radius = 10 / spacing
    else:
        raise ValueError(f"layout must be 'rings', 'plate5' or 'plate4', got {layout!r}")
    for number, (vy, vx) in enumerate(centres, start=1):
        labels[(yy - vy) ** 2 + (xx - vx) ** 2 <= radius**2] = number
    t1 = np.zeros(shape)
    t2star = np.zeros(shape)
    t1[labels == 15], t2star[labels == 15] = FILL_T1, FILL_T2STAR
    for sphere in range(1, 15):
        t1[labels == sphere] = vial_t1[sphere - 1]
        t2star[labels == sphere] = VIAL_T2STAR[sphere - 1]
    # Proton density a little lower in the vials, times a smooth receive-coil shading.
    shading = 1.0 + 0.1 * (xx - cx) / size - 0.05 * (yy - cy) / size
    m0 = np.where(labels == 15, 1000.0, np.where(labels > 0, 900.0, 0.0)) * shading
    return Phantom(
        m0=m0[None].astype(np.float32),
        t1=t1[None].astype(np.float32),
        t2star=t2star[None].astype(np.float32),
        labels=labels[None],
        pixel_spacing=spacing,
    )


def _add_rician_noise(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a (real) signal plus complex Gaussian noise of std ``sigma`` per channel."""
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imag = rng.normal(0.0, sigma, signal.shape)
    return np.hypot(real, imag)


def _noise_sigma(phantom: Phantom, snr: float) -> float:
    """Noise std that gives ``snr`` = mean M0 of the phantom / sigma."""
    if snr <= 0:
        raise ValueError(f"snr must be positive, got {snr!r}")
    return float(phantom.m0[phantom.labels > 0].mean() / snr)


def simulate_inversion_recovery(
    phantom: Phantom,
    ti: tuple[float, ...] | np.ndarray,
    tr: float | tuple[float, ...] | np.ndarray,
    snr: float = 100.0,
    seed: int = 0,
    magnitude: bool = True,
) -> np.ndarray:
    r"""Simulate inversion-recovery images.

    Uses the spin-echo IR signal with finite repetition time,
    :math:`M_0 (1 - 2 e^{-TI/T_1} + e^{-TR/T_1})`, which tends to the ideal
    :math:`M_0 (1 - 2 e^{-TI/T_1})` for :math:`TR \gg T_1`.

    Parameters
    ----------
    phantom
        Ground truth, maps of shape ``(z, y, x)``.
    ti
        Inversion times in s, shape ``(n,)``.
    tr
        Repetition time(s) in s: one value, or one per TI.
    snr
        Mean M0 over the phantom divided by the noise standard deviation.
    seed
        Seed of the noise.
    magnitude
        Return magnitude images with Rician noise (True) or signed images with Gaussian noise.

    Returns
    -------
    numpy.ndarray
        Images of shape ``(n, z, y, x)``.
    """
    ti = np.asarray(ti, dtype=np.float64).reshape(-1, 1, 1, 1)
    tr = np.broadcast_to(np.asarray(tr, dtype=np.float64).reshape(-1, 1, 1, 1), ti.shape)
    t1 = np.where(phantom.t1 > 0, phantom.t1, 1.0)[None]
    signal = phantom.m0[None] * (1 - 2 * np.exp(-ti / t1) + np.exp(-tr / t1))
    rng = np.random.default_rng(seed)
    sigma = _noise_sigma(phantom, snr)
    if magnitude:
        return _add_rician_noise(signal, sigma, rng)
    return signal + rng.normal(0.0, sigma, signal.shape)


def simulate_multi_echo(
    phantom: Phantom,
    te: tuple[float, ...] | np.ndarray,
    snr: float = 100.0,
    seed: int = 0,
) -> np.ndarray:
    """Simulate multi-echo gradient-echo magnitude images, :math:`M_0 e^{-TE/T_2^*}`.

    Parameters
    ----------
    phantom
        Ground truth, maps of shape ``(z, y, x)``.
    te
        Echo times in s, shape ``(n,)``.
    snr
        Mean M0 over the phantom divided by the noise standard deviation.
    seed
        Seed of the noise.

    Returns
    -------
    numpy.ndarray
        Rician-noise magnitude images of shape ``(n, z, y, x)``.
    """
    te = np.asarray(te, dtype=np.float64).reshape(-1, 1, 1, 1)
    t2star = np.where(phantom.t2star > 0, phantom.t2star, 1.0)[None]
    signal = phantom.m0[None] * np.exp(-te / t2star)
    return _add_rician_noise(signal, _noise_sigma(phantom, snr), np.random.default_rng(seed))


def write_series(
    folder: str | Path,
    images: np.ndarray,
    *,
    ti: np.ndarray | tuple[float, ...] | None = None,
    te: np.ndarray | tuple[float, ...] | float = 0.012,
    tr: np.ndarray | tuple[float, ...] | float = 10.0,
    pixel_spacing: float = 1.5625,
    field_strength: float = 3.0,
    series_description: str = "qmri_helpers synthetic phantom",
    signed: bool = False,
    seed: int = 0,
) -> list[Path]:
    """Write images as a DICOM MR series, one file per contrast (and slice).

    The files are named ``IM_0001.dcm`` ... in a shuffled order, so that a reader that
    sorts by file name instead of by the DICOM tags gets the wrong curve.

    Parameters
    ----------
    folder
        Output folder (created).
    images
        Shape ``(n, z, y, x)``; float values in a.u.
    ti, te, tr
        Times in s: one value or one per contrast. ``ti=None`` writes no InversionTime.
    pixel_spacing
        In-plane pixel size in mm; slices are 5 mm apart.
    field_strength
        MagneticFieldStrength in T.
    series_description
        SeriesDescription of every file.
    signed
        Store int16 values (for signed, real-valued images) instead of uint16 magnitudes.
    seed
        Seed of the file-name shuffle.

    Returns
    -------
    list of pathlib.Path
        The files written, in contrast order.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (n, z, y, x), got {images.shape}")
    n, nz, ny, nx = images.shape
    te_s = np.broadcast_to(np.asarray(te, dtype=np.float64), (n,))
    tr_s = np.broadcast_to(np.asarray(tr, dtype=np.float64), (n,))
    ti_s = None if ti is None else np.broadcast_to(np.asarray(ti, dtype=np.float64), (n,))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    # One rescale slope for the series, mapping the largest value to 4000 (12-bit range).
    peak = float(np.abs(images).max()) or 1.0
    slope = peak / 4000.0
    stored = np.round(images / slope)
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    stored = np.clip(stored, info.min, info.max).astype(dtype)

    study_uid, frame_uid, series_uid = generate_uid(), generate_uid(), generate_uid()
    now = datetime.datetime.now()
    order = np.random.default_rng(seed).permutation(n * nz)
    paths = []
    for index in range(n * nz):
        contrast, z = divmod(index, nz)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.Manufacturer = "qmri_helpers"
        ds.ManufacturerModelName = "synthetic phantom"
        ds.PatientName = "Phantom^Synthetic"
        ds.PatientID = "PHANTOM"
        ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        ds.SeriesDescription = series_description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "R" if signed else "M"]
        ds.ScanningSequence = ["SE", "IR"] if ti_s is not None else ["GR"]
        ds.MagneticFieldStrength = field_strength
        ds.RepetitionTime = f"{tr_s[contrast] * 1000:.6g}"
        ds.EchoTime = f"{te_s[contrast] * 1000:.6g}"
        if ti_s is not None:
            ds.InversionTime = f"{ti_s[contrast] * 1000:.6g}"
        ds.EchoNumbers = contrast + 1 if ti_s is None else 1
        ds.SliceThickness = 5
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        x0, y0 = -pixel_spacing * nx / 2, -pixel_spacing * ny / 2
        ds.ImagePositionPatient = [x0, y0, 5.0 * z]
        ds.SliceLocation = 5.0 * z
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleSlope = f"{slope:.8g}"
        ds.RescaleIntercept = 0
        ds.RescaleType = "US"
        ds.PixelData = stored[contrast, z].tobytes()
        path = folder / f"IM_{order[index] + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_ir_phantom(
    folder: str | Path,
    ti: tuple[float, ...] | np.ndarray = DEFAULT_TI,
    tr: float | tuple[float, ...] = 15.0,
    te: float = 0.012,
    snr: float = 100.0,
    shape: tuple[int, int] = (128, 128),
    field_strength: float = 3.0,
    seed: int = 0,
    fov_mm: float = 200.0,
    layout: str = "rings",
) -> Phantom:
    """Write the phantom as an inversion-recovery magnitude series, one DICOM file per TI.

    With the default TR of 15 s the recovery between inversions is complete to within 0.2%
    for every vial, so the ideal model :math:`|M_0 (1 - 2 e^{-TI/T_1})|` applies. Pass a short
    ``tr`` (e.g. 1 s) to see why real scans need a model with TR. ``fov_mm`` and ``layout``
    are passed to :func:`make_phantom`.

    Returns
    -------
    Phantom
        The ground truth, maps of shape ``(1, y, x)``.
    """
    phantom = make_phantom(shape, field_strength, fov_mm, layout)
    images = simulate_inversion_recovery(phantom, ti, tr, snr=snr, seed=seed)
    write_series(
        folder, images, ti=ti, te=te, tr=tr, pixel_spacing=phantom.pixel_spacing,
        field_strength=field_strength, series_description="T1 IR synthetic phantom", seed=seed,
    )  # fmt: skip
    return phantom


def write_multi_echo_phantom(
    folder: str | Path,
    te: tuple[float, ...] | np.ndarray = DEFAULT_TE,
    tr: float = 0.1,
    snr: float = 100.0,
    shape: tuple[int, int] = (128, 128),
    field_strength: float = 3.0,
    seed: int = 0,
) -> Phantom:
    """Write the phantom as a multi-echo gradient-echo series, one DICOM file per TE.

    Returns
    -------
    Phantom
        The ground truth, maps of shape ``(1, y, x)``.
    """
    phantom = make_phantom(shape, field_strength)
    images = simulate_multi_echo(phantom, te, snr=snr, seed=seed)
    write_series(
        folder, images, te=te, tr=tr, pixel_spacing=phantom.pixel_spacing,
        field_strength=field_strength, series_description="T2star synthetic phantom", seed=seed,
    )  # fmt: skip
    return phantom


def write_plate5_phantom(
    folder: str | Path, field_strength: float = 1.5, snr: float = 800.0, seed: int = 0
) -> Phantom:
    """Write the T1 plate as a phantom-QA scan would see it: hazen's IR protocol.

    192x192 pixels over 250 mm, the spheres at the plate's positions with their nominal T1,
    TI = 50-800 ms (:data:`PLATE5_TI`) and TR = 1 s, as magnitude images. The default SNR
    gives Cramér-Rao SDs of T1 like those of hazen's Philips scan (about 4% for sphere 1).

    Returns
    -------
    Phantom
        The ground truth, maps of shape ``(1, 192, 192)``.
    """
    return write_ir_phantom(
        folder, ti=PLATE5_TI, tr=1.0, te=0.01, snr=snr, shape=(192, 192),
        field_strength=field_strength, seed=seed, fov_mm=250.0, layout="plate5",
    )  # fmt: skip


def write_plate4_phantom(
    folder: str | Path, field_strength: float = 1.5, snr: float = 800.0, seed: int = 0
) -> Phantom:
    """Write plate 4 (the T2 array) as the same IR protocol sees it, for plate detection.

    As :func:`write_plate5_phantom`, but the spheres have the plate-4 T1 values (version 1,
    20 °C, :data:`qmri_helpers.reference.T1_V1_MS`), which are much longer than plate 5's
    for the same sphere number. The T2* of the vials is not that of plate 4.

    Returns
    -------
    Phantom
        The ground truth, maps of shape ``(1, 192, 192)``.
    """
    return write_ir_phantom(
        folder, ti=PLATE5_TI, tr=1.0, te=0.01, snr=snr, shape=(192, 192),
        field_strength=field_strength, seed=seed, fov_mm=250.0, layout="plate4",
    )  # fmt: skip


def write_transformed_copy(
    source: str | Path, target: str | Path, transform: Callable[[np.ndarray], np.ndarray]
) -> Path:
    """Copy a folder of single-frame DICOM files, changing only their pixel data.

    Every file is read with pydicom, its image replaced by ``transform(image)`` (e.g.
    ``np.fliplr`` for a mirrored copy, ``np.rot90`` for one turned by 90 deg) and written
    under the same name in ``target``; all other tags stay as the scanner wrote them. For
    teaching and testing what orientation does to an analysis.

    Raises
    ------
    ValueError
        When ``transform`` changes the image's shape (Rows and Columns would then lie), a
        file is compressed or multi-frame, or ``target`` holds other files.
    """
    source, target = Path(source), Path(target)
    files = sorted(p for p in source.iterdir() if p.is_file())
    target.mkdir(parents=True, exist_ok=True)
    others = {p.name for p in target.iterdir()} - {p.name for p in files}
    if others:
        raise ValueError(
            f"{target} holds other files ({sorted(others)[:3]}...): write the copy to an "
            "empty folder, so that it holds one series"
        )
    for path in files:
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed or int(ds.get("NumberOfFrames", 1)) > 1:
            raise ValueError(f"{path}: only uncompressed single-frame files are supported")
        pixels = ds.pixel_array
        changed = np.ascontiguousarray(transform(pixels), dtype=pixels.dtype)
        if changed.shape != pixels.shape:
            raise ValueError(
                f"{path}: the transform changed the image from {pixels.shape} to "
                f"{changed.shape}; only shape-preserving transforms are supported"
            )
        ds.PixelData = changed.tobytes()
        ds.save_as(target / path.name)
    return target


# --- Multi-echo spin echo (CPMG): T2 with imperfect refocusing, simulated by EPG -----------

#: Echo times (s) of the synthetic spin-echo series: 32 echoes every 8 ms, as hazen's
#: Philips 3 T scan.
SPIN_ECHO_TE = tuple(round(0.008 * k, 4) for k in range(1, 33))


@dataclass(frozen=True)
class SpinEchoPhantom:
    """Ground truth of the spin-echo phantom; maps of shape ``(1, y, x)``.

    Attributes
    ----------
    m0
        Equilibrium magnetisation (a.u.); 0 outside.
    t1, t2
        Relaxation times in s; 0 outside.
    b1
        Scale of the refocusing flip angle (1: the nominal 180°); 0 outside.
    labels
        0 for air, 1-14 for the spheres, 15 for the water fill.
    pixel_spacing
        In-plane pixel size in mm.
    """

    m0: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    b1: np.ndarray
    labels: np.ndarray
    pixel_spacing: float

    def vial_mask(self, t2_range: tuple[float, float] = (0.0, np.inf)) -> np.ndarray:
        """Boolean mask of the spheres whose true T2 (s) lies in ``t2_range``."""
        in_vial = (self.labels >= 1) & (self.labels <= 14)
        return in_vial & (self.t2 >= t2_range[0]) & (self.t2 <= t2_range[1])


def make_spin_echo_phantom(
    field_strength: float = 3.0, b1: float = 0.8, b1_gradient: float = 0.1
) -> SpinEchoPhantom:
    """The T1 plate (192x192 pixels over 250 mm) with the plate's T1 and T2, and a B1 field.

    Parameters
    ----------
    field_strength
        1.5 or 3.0 (T): selects the nominal T1 and T2 tables of plate 5.
    b1
        Refocusing scale at the centre of the image (below 1: stimulated echoes).
    b1_gradient
        Total relative change of B1 from the left to the right edge (a smooth, known field).

    Returns
    -------
    SpinEchoPhantom
    """
    from .reference import reference_t2

    plate = make_phantom((192, 192), field_strength, fov_mm=250.0, layout="plate5")
    nominal = reference_t2(5, field_strength)
    vial_t2 = nominal.values
    labels = plate.labels
    t2 = np.zeros(labels.shape, dtype=np.float32)
    t2[labels == 15] = nominal.fill
    for sphere in range(1, 15):
        t2[labels == sphere] = vial_t2[sphere - 1]
    nx = labels.shape[-1]
    ramp = (np.arange(nx) - (nx - 1) / 2) / nx  # -0.5 .. 0.5 across the image
    field = b1 * (1 + b1_gradient * ramp)[None, None, :] * np.ones(labels.shape)
    return SpinEchoPhantom(
        m0=plate.m0, t1=plate.t1, t2=t2,
        b1=np.where(labels > 0, field, 0.0).astype(np.float32),
        labels=labels, pixel_spacing=plate.pixel_spacing,
    )  # fmt: skip


def simulate_spin_echo(
    truth: SpinEchoPhantom,
    te: tuple[float, ...] | np.ndarray = SPIN_ECHO_TE,
    snr: float = 200.0,
    seed: int = 0,
) -> np.ndarray:
    r"""Simulate a CPMG multi-echo spin-echo series by the extended phase graph.

    :math:`S_n = M_0\, \mathrm{EPG}_n(T_2, B_1; T_1, ESP)` with each voxel's own T1, T2 and
    B1 (:func:`qmri_helpers.epg.cpmg_signal`), plus Rician noise.

    Parameters
    ----------
    truth
        Ground truth, maps of shape ``(z, y, x)``.
    te
        Echo times in s, ``TE_n = n * ESP``, shape ``(n,)``.
    snr
        Mean M0 over the phantom divided by the noise standard deviation.
    seed
        Seed of the noise.

    Returns
    -------
    numpy.ndarray
        Magnitude images of shape ``(n, z, y, x)``.
    """
    import torch

    from .epg import cpmg_echo_spacing, cpmg_signal

    te = np.asarray(te, dtype=np.float64)
    esp = cpmg_echo_spacing(torch.as_tensor(te))
    inside = truth.labels > 0

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.where(inside, values, 1.0), dtype=torch.float64)

    echoes = cpmg_signal(
        tensor(truth.t2), tensor(truth.b1), esp, len(te), t1=tensor(truth.t1)
    ).numpy()
    signal = truth.m0[None] * echoes
    if snr <= 0:
        raise ValueError(f"snr must be positive, got {snr!r}")
    sigma = float(truth.m0[inside].mean() / snr)
    return _add_rician_noise(signal, sigma, np.random.default_rng(seed))


def write_spin_echo_phantom(
    folder: str | Path,
    te: tuple[float, ...] | np.ndarray = SPIN_ECHO_TE,
    field_strength: float = 3.0,
    b1: float = 0.8,
    snr: float = 200.0,
    seed: int = 0,
) -> SpinEchoPhantom:
    """Write the T1 plate as a multi-echo spin-echo (CPMG) series, one DICOM file per TE.

    The spheres have the plate's nominal T1 and T2
    (:func:`qmri_helpers.reference.reference_t2`, version 1, 20 °C); the refocusing pulses
    are ``b1`` times 180° at the centre, with a 10% gradient from left to right, so the echo
    train carries stimulated echoes. TR is written as 10 s (full recovery).

    Returns
    -------
    SpinEchoPhantom
        The ground truth, maps of shape ``(1, 192, 192)``.
    """
    import pydicom

    truth = make_spin_echo_phantom(field_strength, b1)
    images = simulate_spin_echo(truth, te, snr=snr, seed=seed)
    paths = write_series(
        folder, images, te=te, tr=10.0, pixel_spacing=truth.pixel_spacing,
        field_strength=field_strength, series_description="T2 multi-echo SE synthetic phantom",
        seed=seed,
    )  # fmt: skip
    for path in paths:  # a spin-echo train, not the gradient echoes write_series assumes
        ds = pydicom.dcmread(path)
        ds.ScanningSequence = "SE"
        ds.save_as(path, enforce_file_format=True)
    return truth
