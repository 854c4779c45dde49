"""Where the spheres of the system phantom's plate are: template, circle finding, ROIs.

The plate's template of sphere centres (hazen's, on a 192x192 grid of 250 mm) is registered to
the circles that a Hough transform finds in the images; :func:`roi_values` and
:func:`roi_curves` then read the map or the signal at each sphere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from skimage.feature import canny
from skimage.transform import hough_circle, hough_circle_peaks

__all__ = [
    "TEMPLATE_CENTRES",
    "TEMPLATE_SPACING_MM",
    "SPHERE_RADIUS_MM",
    "Spheres",
    "template_spheres",
    "find_spheres",
    "roi_values",
    "roi_curves",
]

#: Sphere centres (row, col) of spheres 1-15 on hazen's 192x192 plate-5 template.
TEMPLATE_CENTRES: tuple[tuple[int, int], ...] = (
    (56, 95), (62, 117), (81, 133), (104, 134), (124, 121), (133, 98), (127, 75), (109, 61),
    (84, 60), (64, 72), (80, 81), (78, 111), (109, 113), (110, 82), (97, 43),
)  # fmt: skip
#: Pixel size (mm) of the template: a 250 mm field of view on 192 pixels.
TEMPLATE_SPACING_MM = 250 / 192
#: Radius (mm) of the T1-plate spheres, as seen in the hazen scans.
SPHERE_RADIUS_MM = (8.0, 13.0)


@dataclass(frozen=True)
class Spheres:
    """Where the spheres of the plate are, in pixel coordinates of one image.

    Attributes
    ----------
    centres
        ``(15, 2)`` array of (row, col) for spheres 1-15 (15: a point in the water fill).
    detected
        ``(15,)`` booleans: True where a circle was detected at the sphere, False where the
        position comes from the registered template alone.
    radius_px
        Sphere radius in pixels (median of the detected circles).
    rotation_deg, shift_px
        The registration of the template, placed at the image centre: its rotation and
        translation (row, col).
    residual_mm
        RMS distance between the registered template and the matched circles.
    """

    centres: np.ndarray
    detected: np.ndarray
    radius_px: float
    rotation_deg: float
    shift_px: tuple[float, float]
    residual_mm: float


def _template_mm() -> np.ndarray:
    """Template centres in mm relative to the template's centre, ``(15, 2)``."""
    centre = (192 - 1) / 2
    return (np.asarray(TEMPLATE_CENTRES, float) - centre) * TEMPLATE_SPACING_MM


def template_spheres(shape: tuple[int, int], spacing_mm: float) -> np.ndarray:
    """The template centres (row, col) placed in an image of ``shape`` without registration."""
    return _template_mm() / spacing_mm + (np.asarray(shape, float) - 1) / 2


def _rotate(points: np.ndarray, angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return points @ np.array([[c, s], [-s, c]])


def _detect_circles(
    images: np.ndarray, inside: np.ndarray, spacing_mm: float, n_peaks: int = 24
) -> tuple[np.ndarray, np.ndarray]:
    """Detect circles: centres (row, col) and radii (px), by a Hough transform.

    The edges are the union of the Canny edges of every contrast image, inside the phantom.
    """
    edges = np.zeros(images.shape[1:], dtype=bool)
    for image in images:
        scale = np.percentile(np.abs(image), 99) or 1.0
        edges |= canny(
            np.abs(image) / scale, sigma=1.5, low_threshold=0.05, high_threshold=0.15, mask=inside
        )
    lo, hi = SPHERE_RADIUS_MM
    radii = np.arange(max(2, int(lo / spacing_mm)), int(math.ceil(hi / spacing_mm)) + 1)
    accumulator = hough_circle(edges, radii)
    separation = int(12 / spacing_mm)
    _, cols, rows, found_radii = hough_circle_peaks(
        accumulator, radii, total_num_peaks=n_peaks,
        min_xdistance=separation, min_ydistance=separation,
    )  # fmt: skip
    return np.stack([rows, cols], 1).astype(float), found_radii.astype(float)


def find_spheres(
    images: torch.Tensor | np.ndarray,
    spacing_mm: float,
    max_rotation_deg: float = 20.0,
    match_mm: float = 5.0,
) -> Spheres:
    """Find spheres 1-15 of the T1 plate in one slice of an IR series.

    Circles are detected with a Hough transform on the edges of every TI image, inside the
    phantom. The README's template of the 15 sphere centres (converted to mm) is then
    registered to them by an exhaustive search over rotations and translations, refined by a
    least-squares (Procrustes) fit of the matched pairs. A sphere takes the centre of its
    matched circle, or the registered template position when no circle matched. This works
    across matrices (192 or 256), pixel sizes, positions and vendors.

    Parameters
    ----------
    images
        Shape ``(n_times, y, x)``: the contrast images of one slice.
    spacing_mm
        Pixel size in mm (square pixels).
    max_rotation_deg
        Largest rotation of the phantom searched.
    match_mm
        Largest distance between a template point and a circle for them to match.

    Returns
    -------
    Spheres

    Raises
    ------
    ValueError
        When fewer than 8 of the 14 spheres match: the images are probably not of the plate.
    """
    images = np.asarray(torch.as_tensor(images).detach().cpu(), dtype=np.float64)
    if images.ndim != 3:
        raise ValueError(f"images must have shape (n_times, y, x), got {images.shape}")
    peak = np.abs(images).max(0)
    body = peak > 0.1 * np.percentile(peak, 99)
    body = ndimage.binary_fill_holes(ndimage.binary_opening(body, iterations=2))
    inside = ndimage.binary_erosion(body, iterations=max(1, int(4 / spacing_mm)))
    if inside.sum() < 100:
        raise ValueError("no phantom found: the images hold (almost) no signal")
    found, radii = _detect_circles(images, inside, spacing_mm)
    if len(found) < 8:
        raise ValueError(f"only {len(found)} circles found: these images do not show the plate")
    centre = (np.asarray(images.shape[1:], float) - 1) / 2
    template = _template_mm()[:14] / spacing_mm + centre  # spheres 1-14, unregistered
    cap = match_mm / spacing_mm

    def score(points: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        distance = np.linalg.norm(points[:, None] - found[None], axis=-1)  # (14, F)
        nearest = distance.argmin(1)
        best = distance[np.arange(len(points)), nearest]
        return float(np.minimum(best, cap).sum()), nearest, best

    best = (math.inf, 0.0, np.zeros(2))
    for angle in np.deg2rad(np.arange(-max_rotation_deg, max_rotation_deg + 0.5, 1.0)):
        rotated = _rotate(template, angle)
        for f in found:  # each circle might be each sphere: hypothesise the translation
            for shift in f - rotated:
                total, _, _ = score(rotated + shift)
                if total < best[0]:
                    best = (total, angle, shift)
    _, angle, shift = best
    # Refine rotation and translation on the matched pairs (2-D Procrustes, no scaling).
    _, nearest, distance = score(_rotate(template, angle) + shift)
    matched = distance < cap
    if matched.sum() < 8:
        raise ValueError(
            f"only {int(matched.sum())} of 14 spheres match the template: these images do not "
            "look like plate 5 of the system phantom"
        )
    src, dst = template[matched], found[nearest[matched]]
    src_c, dst_c = src - src.mean(0), dst - dst.mean(0)
    u, _, vt = np.linalg.svd(src_c.T @ dst_c)
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        u[:, -1] *= -1
        rotation = u @ vt
    full = np.vstack([template, _template_mm()[14:] / spacing_mm + centre])
    registered = (full - src.mean(0)) @ rotation + dst.mean(0)
    _, nearest, distance = score(registered[:14])
    detected = np.append(distance < cap, False)
    centres = registered.copy()
    centres[:14][detected[:14]] = found[nearest[detected[:14]]]
    residual = np.sqrt(np.mean(distance[detected[:14]] ** 2)) * spacing_mm
    return Spheres(
        centres=centres,
        detected=detected,
        radius_px=float(np.median(radii[nearest[detected[:14]]])),
        rotation_deg=float(np.degrees(math.atan2(rotation[0, 1], rotation[0, 0]))),
        shift_px=tuple(float(v) for v in dst.mean(0) - src.mean(0) @ rotation),
        residual_mm=float(residual),
    )


def roi_values(
    values: torch.Tensor | np.ndarray, centres: Sequence[Sequence[float]], half: int = 2
) -> list[np.ndarray]:
    """The values of a map in a ``(2 half + 1)`` square ROI around each centre (row, col)."""
    values = np.asarray(torch.as_tensor(values).detach().cpu())
    out = []
    for row, col in centres:
        r, c = int(round(row)), int(round(col))
        out.append(values[r - half : r + half + 1, c - half : c + half + 1].ravel())
    return out


def roi_curves(images: torch.Tensor, spheres: Spheres, half: int = 2) -> torch.Tensor:
    """Mean signal in the square ROI of each sphere, for every contrast: ``(n_times, 15)``.

    Parameters
    ----------
    images
        One slice of the series, ``(n_times, y, x)``.
    spheres
        From :func:`find_spheres`.
    half
        ROI half-width: ``half=2`` gives hazen's 5x5 boxcar.
    """
    means = [[v.mean() for v in roi_values(image, spheres.centres, half)] for image in images]
    return torch.tensor(np.array(means), dtype=torch.float32)
