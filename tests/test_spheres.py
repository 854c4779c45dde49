"""Sphere finding and labelling on the synthetic plate, whose labels are known."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from qmri_helpers import dicom, phantom, spheres


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    """(images of the slice, spacing, truth, T1 truth map) of the synthetic plate 5."""
    folder = tmp_path_factory.mktemp("plate5")
    truth = phantom.write_plate5_phantom(folder)
    images, header = dicom.load_series(folder)
    return images[:, 0].numpy(), header.pixel_spacing[0], truth


def _labels_right(found: spheres.Spheres, labels: np.ndarray) -> int:
    return sum(
        labels[round(row), round(col)] == sphere
        for sphere, (row, col) in enumerate(found.centres[:14], start=1)
    )


def test_geometry_alone_leaves_the_plate_turned_by_180_deg(plate):
    """Why the physics must decide: the wrong labelling fits the circles about as well."""
    images, spacing, truth = plate
    candidates = spheres.sphere_candidates(images, spacing)
    right = [c for c in candidates if _labels_right(c, truth.labels[0]) == 14]
    assert len(right) == 1 and not right[0].mirrored and abs(right[0].rotation_deg) < 1
    turned = [c for c in candidates if abs(abs(c.rotation_deg) - 180) < 10 and c.mirrored]
    assert turned, "the plate's near symmetry: mirrored and turned by 180 deg fits too"
    assert _labels_right(turned[0], truth.labels[0]) <= 2
    assert turned[0].detected.sum() >= 12 and turned[0].residual_mm < 3


def test_the_true_t1_map_picks_the_right_labelling_in_any_orientation(plate):
    images, spacing, truth = plate
    for k in range(4):
        for flip in (False, True):

            def change(a, k=k, flip=flip):
                return np.rot90(a[..., ::-1] if flip else a, k, (-2, -1))

            labels, t1 = change(truth.labels[0]), change(truth.t1[0])
            candidates = spheres.sphere_candidates(np.ascontiguousarray(change(images)), spacing)
            chosen = spheres.label_by_values(candidates, np.ascontiguousarray(t1))
            assert _labels_right(chosen, labels) == 14, (k, flip)
            assert chosen.mirrored == flip and chosen.rank_correlation == pytest.approx(-1)
            assert chosen.margin > 0.15 and chosen.runner_up


def test_two_labellings_too_close_to_choose_are_refused(plate):
    images, spacing, truth = plate
    best = spheres.sphere_candidates(images, spacing)[0]
    twin = replace(best, rotation_deg=best.rotation_deg + 36)
    with pytest.raises(spheres.OrientationError, match=r"almost equally well.*margin 0\.00"):
        spheres.label_by_values([best, twin], truth.t1[0])


def test_values_that_do_not_fall_with_the_sphere_number_are_refused(plate):
    images, spacing, truth = plate
    candidates = spheres.sphere_candidates(images, spacing)
    flat = np.where(truth.labels[0] > 0, 1.0, 0.0)  # every sphere the same
    rng = np.random.default_rng(3)
    shuffled = np.zeros_like(truth.t1[0])
    for sphere, value in zip(
        range(1, 15), rng.permutation(np.unique(truth.t1[0])[1:15]), strict=True
    ):
        shuffled[truth.labels[0] == sphere] = value
    for values in (flat, shuffled):
        with pytest.raises(spheres.OrientationError, match="no orientation of the sphere"):
            spheres.label_by_values(candidates, values, quantity="T2")


def test_find_spheres_keeps_its_old_meaning(plate):
    images, spacing, truth = plate
    found = spheres.find_spheres(images, spacing)
    assert _labels_right(found, truth.labels[0]) == 14 and not found.mirrored
    assert np.isnan(found.rank_correlation)
    with pytest.raises(ValueError, match="no phantom found"):
        spheres.find_spheres(np.zeros((6, 64, 64)), spacing)
