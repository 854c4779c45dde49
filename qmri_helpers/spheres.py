"""Where the spheres of the system phantom's plate are, and which sphere is which.

The plate's template of sphere centres (hazen's, on a 192x192 grid of 250 mm) is registered to
the circles that a Hough transform finds in the images, at every rotation and in both mirror
states (:func:`sphere_candidates`). The plate is nearly symmetric, so the geometry leaves
several labellings; :func:`label_by_values` keeps the one whose fitted T1 (or T2) falls with
the sphere number, as it does on plates 4 and 5, or refuses with
:class:`OrientationError`. :func:`roi_values` and :func:`roi_curves` read a map or the signal
at each sphere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.stats import spearmanr
from skimage.feature import canny
from skimage.transform import hough_circle, hough_circle_peaks

__all__ = [
    "TEMPLATE_CENTRES",
    "TEMPLATE_SPACING_MM",
    "SPHERE_RADIUS_MM",
    "Spheres",
    "OrientationError",
    "template_spheres",
    "sphere_candidates",
    "find_spheres",
    "label_by_values",
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
        translation (row, col). The rotation is applied after the mirroring.
    residual_mm
        RMS distance between the registered template and the matched circles.
    mirrored
        True when the template had to be mirrored (its columns reversed) to fit the image:
        the slice is seen from the other side, or the phantom lies the other way round.
    rank_correlation
        Spearman rank correlation of the fitted value (T1 or T2) of each ROI with its sphere
        number; -1 where the values fall strictly with the sphere number, as they must.
        NaN until :func:`label_by_values` has chosen the labelling.
    margin
        How much better than the second-best labelling this one is: the difference of
        their rank correlations (NaN where there was no other candidate, or not chosen yet).
    runner_up
        The second-best labelling in words (rotation and mirror), or "".
    """

    centres: np.ndarray
    detected: np.ndarray
    radius_px: float
    rotation_deg: float
    shift_px: tuple[float, float]
    residual_mm: float
    mirrored: bool = False
    rank_correlation: float = math.nan
    margin: float = math.nan
    runner_up: str = ""

    @property
    def orientation(self) -> str:
        """The orientation in words, e.g. ``"rotated 90 deg, mirrored"``."""
        angle = round((self.rotation_deg + 180) % 360 - 180)  # an int: never "-0"
        return f"rotated {angle:+d} deg, {'mirrored' if self.mirrored else 'not mirrored'}"


class OrientationError(ValueError):
    """The physics cannot tell which sphere is which: the labelling is refused."""


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


def _mirror(points: np.ndarray, mirrored: bool) -> np.ndarray:
    """Reverse the column axis of centred points when ``mirrored``."""
    return points * np.array([1.0, -1.0]) if mirrored else points


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


def _circles(images: np.ndarray, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The circles inside the phantom, or a clear error when there is no phantom."""
    peak = np.abs(images).max(0)
    body = peak > 0.1 * np.percentile(peak, 99)
    body = ndimage.binary_fill_holes(ndimage.binary_opening(body, iterations=2))
    inside = ndimage.binary_erosion(body, iterations=max(1, int(4 / spacing_mm)))
    if inside.sum() < 100:
        raise ValueError("no phantom found: the images hold (almost) no signal")
    found, radii = _detect_circles(images, inside, spacing_mm)
    if len(found) < 8:
        raise ValueError(f"only {len(found)} circles found: these images do not show the plate")
    return found, radii


def _nearest(points: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest circle to each point, and its distance (px)."""
    distance = np.linalg.norm(points[:, None] - found[None], axis=-1)
    nearest = distance.argmin(1)
    return nearest, distance[np.arange(len(points)), nearest]


def _refine(
    found: np.ndarray, radii: np.ndarray, template: np.ndarray, cap: float,
    spacing_mm: float, mirrored: bool, angle: float, shift: np.ndarray,
) -> Spheres | None:  # fmt: skip
    """Procrustes refinement (rotation and shift, no scaling) of one coarse registration.

    ``template`` holds the 15 template points in px, centred on the template's centre.
    Returns None where fewer than 8 of the 14 spheres match a circle.
    """
    source = _mirror(template, mirrored)
    nearest, distance = _nearest(_rotate(source[:14], angle) + shift, found)
    matched = distance < cap
    if matched.sum() < 8:
        return None
    src, dst = source[:14][matched], found[nearest[matched]]
    src_c, dst_c = src - src.mean(0), dst - dst.mean(0)
    u, _, vt = np.linalg.svd(src_c.T @ dst_c)
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:  # a proper rotation: the mirroring is explicit
        u[:, -1] *= -1
        rotation = u @ vt
    registered = (source - src.mean(0)) @ rotation + dst.mean(0)
    nearest, distance = _nearest(registered[:14], found)
    detected = np.append(distance < cap, False)
    if detected.sum() < 8:
        return None
    centres = registered.copy()
    centres[:14][detected[:14]] = found[nearest[detected[:14]]]
    return Spheres(
        centres=centres,
        detected=detected,
        radius_px=float(np.median(radii[nearest[detected[:14]]])),
        rotation_deg=float(np.degrees(math.atan2(rotation[0, 1], rotation[0, 0]))),
        shift_px=tuple(float(v) for v in dst.mean(0) - src.mean(0) @ rotation),
        residual_mm=float(np.sqrt(np.mean(distance[detected[:14]] ** 2)) * spacing_mm),
        mirrored=mirrored,
    )


def sphere_candidates(
    images: torch.Tensor | np.ndarray,
    spacing_mm: float,
    max_rotation_deg: float = 180.0,
    mirror: bool = True,
    match_mm: float = 5.0,
) -> list[Spheres]:
    """Every way the plate's template fits the circles in the images, best fit first.

    Circles are detected with a Hough transform on the edges of every contrast image, inside
    the phantom. The template of the 14 sphere centres (converted to mm), mirrored or not, is
    then registered to them by an exhaustive search over rotations (2 deg steps) and
    translations (each circle hypothesised as each sphere), and each registration is refined
    by a least-squares (Procrustes) fit of the matched pairs. A sphere takes the centre of its
    matched circle, or the registered template position when no circle matched.

    The plate is nearly symmetric (10 spheres on a ring, 4 on a square), so several
    labellings fit the geometry about equally well, e.g. the true one and the one turned by
    180 deg. All of them are returned, one per distinct assignment of spheres to circles;
    :func:`label_by_values` decides between them from the fitted values.

    Parameters
    ----------
    images
        Shape ``(n_times, y, x)``: the contrast images of one slice.
    spacing_mm
        Pixel size in mm (square pixels).
    max_rotation_deg
        Largest rotation searched, either way; 180 searches every rotation.
    mirror
        Also search the mirrored template.
    match_mm
        Largest distance between a template point and a circle for them to match.

    Returns
    -------
    list of Spheres
        With at least 8 of the 14 spheres matched, sorted by the summed distance (capped at
        ``match_mm``) between template and circles.

    Raises
    ------
    ValueError
        When the images hold no phantom, too few circles, or no registration matches 8 of
        the 14 spheres: the images are probably not of a relaxation plate.
    """
    images = np.asarray(torch.as_tensor(images).detach().cpu(), dtype=np.float64)
    if images.ndim != 3:
        raise ValueError(f"images must have shape (n_times, y, x), got {images.shape}")
    found, radii = _circles(images, spacing_mm)
    template = _template_mm() / spacing_mm
    cap = match_mm / spacing_mm
    # 2 deg steps: the Procrustes fit then finds the exact angle (1 deg is 0.9 mm at sphere 1)
    if max_rotation_deg >= 180:
        step = np.arange(0.0, 360.0, 2.0)
    else:
        step = np.arange(-max_rotation_deg, max_rotation_deg + 0.5, 2.0)
    tree = cKDTree(found)
    coarse = []
    for mirrored in (False, True) if mirror else (False,):
        source = _mirror(template[:14], mirrored)
        for angle in np.deg2rad(step):
            rotated = _rotate(source, angle)  # (14, 2)
            shifts = (found[:, None] - rotated[None]).reshape(-1, 2)  # each circle as each sphere
            placed = rotated[None] + shifts[:, None]  # (H, 14, 2)
            distance, _ = tree.query(placed.reshape(-1, 2), distance_upper_bound=cap)
            cost = np.minimum(distance, cap).reshape(len(shifts), -1).sum(-1)
            best = int(cost.argmin())
            coarse.append((float(cost[best]), mirrored, float(angle), shifts[best]))
    coarse.sort(key=lambda item: item[0])
    candidates: dict[tuple, tuple[float, Spheres]] = {}
    for _, mirrored, angle, shift in coarse:
        spheres = _refine(found, radii, template, cap, spacing_mm, mirrored, angle, shift)
        if spheres is None:
            continue
        nearest, distance = _nearest(spheres.centres[:14], found)
        key = tuple(np.where(distance < cap, nearest, -1))
        cost = float(np.minimum(distance, cap).sum())
        if key not in candidates or cost < candidates[key][0]:
            candidates[key] = (cost, spheres)
    if not candidates:
        raise ValueError(
            "fewer than 8 of the 14 spheres match the template in any orientation: these "
            "images do not look like plate 4 or 5 of the system phantom"
        )
    return [spheres for _, spheres in sorted(candidates.values(), key=lambda c: c[0])]


def find_spheres(
    images: torch.Tensor | np.ndarray,
    spacing_mm: float,
    max_rotation_deg: float = 20.0,
    match_mm: float = 5.0,
) -> Spheres:
    """Find spheres 1-15 of the plate from the geometry alone, near the template's orientation.

    The best registration of :func:`sphere_candidates` within ``max_rotation_deg`` and not
    mirrored. The geometry alone cannot tell the plate from its copy turned by 180 deg, so
    this is right only for scans in the template's orientation (hazen's); for any other scan
    use :func:`sphere_candidates` and :func:`label_by_values`, as
    :func:`~qmri_helpers.phantom_qa.run_t1_qa` does.

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
    return sphere_candidates(images, spacing_mm, max_rotation_deg, False, match_mm)[0]


def _describe(spheres: Spheres) -> str:
    return f"{spheres.orientation} (rank correlation {spheres.rank_correlation:+.2f})"


def label_by_values(
    candidates: Sequence[Spheres],
    values: torch.Tensor | np.ndarray,
    quantity: str = "T1",
    half: int = 2,
    min_correlation: float = 0.9,
    min_margin: float = 0.1,
) -> Spheres:
    r"""Choose the labelling of the spheres whose fitted values fall with the sphere number.

    On both relaxation plates, T1 and T2 fall monotonically with the sphere number. Each
    candidate labelling (from :func:`sphere_candidates`) reads the median of ``values`` in
    each of its 14 ROIs; its Spearman rank correlation :math:`\rho` with the sphere number
    is -1 for the right labelling. The best candidate is kept if :math:`\rho` is at most
    ``-min_correlation`` and beats the second best by at least ``min_margin``.

    Parameters
    ----------
    candidates
        The geometric candidates.
    values
        A map of the fitted quantity (any unit), ``(y, x)``.
    quantity
        Its name, for the messages.
    half
        ROI half-width in pixels.
    min_correlation
        The best labelling must reach a rank correlation of ``-min_correlation`` or lower.
    min_margin
        Smallest difference of rank correlation between best and second best.

    Returns
    -------
    Spheres
        The chosen candidate, with ``rank_correlation``, ``margin`` and ``runner_up`` set.

    Raises
    ------
    OrientationError
        When no labelling makes the values fall with the sphere number, or two labellings are
        too close to choose: the message says what was found and what to check.
    """
    values = np.asarray(torch.as_tensor(values).detach().cpu(), dtype=np.float64)
    scored = []
    for spheres in candidates:
        rois = roi_values(values, spheres.centres[:14], half)
        medians = [np.median(v) if v.size else np.nan for v in rois]  # empty: off the image
        # constant values (no signal, one fill everywhere) carry no order: rank correlation 0
        rho = 0.0
        if np.all(np.isfinite(medians)) and np.ptp(medians) > 0:
            rho = float(spearmanr(np.arange(1, 15), medians).statistic)
        scored.append(replace(spheres, rank_correlation=rho))
    scored.sort(key=lambda s: s.rank_correlation)
    best = scored[0]
    if best.rank_correlation > -min_correlation:
        raise OrientationError(
            f"no orientation of the sphere template makes {quantity} fall with the sphere "
            f"number, as it does on plates 4 and 5: the best, {_describe(best)}, is short of "
            f"{-min_correlation:+.2f}. Check that the slice shows plate 4 or 5 of the system "
            "phantom, that the spheres are filled and free of air bubbles, and that the "
            "contrast images are of one slice (plot_rois shows where the ROIs fell)"
        )
    if len(scored) == 1:
        return best
    second = scored[1]
    margin = second.rank_correlation - best.rank_correlation
    if margin < min_margin:
        raise OrientationError(
            f"two labellings of the spheres explain the fitted {quantity} almost equally well: "
            f"{_describe(best)} and {_describe(second)}; margin {margin:.2f} < {min_margin}. "
            "Check the orientation of the phantom in the images (plot_rois) and that the "
            "spheres with the longest and the shortest values are resolved by the protocol"
        )
    return replace(best, margin=margin, runner_up=_describe(second))


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
