"""Phantom QA: spheres found, T1 against the truth, hazen's fits and the nominal values."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from qmri_helpers import models, phantom, phantom_qa, qa_report, reference

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]
SITES = {"site1_20200218": "site1", "site2_20180925": "site2", "site4_philips": "site4"}


@pytest.fixture(scope="module")
def plate5(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plate5")
    truth = phantom.write_plate5_phantom(folder)
    return folder, truth, phantom_qa.run_t1_qa(folder, tolerance=0.05)


def test_embedded_plate5_spheres_are_found_where_they_are(plate5):
    _, truth, qa = plate5
    expected = phantom_qa.template_spheres((192, 192), truth.pixel_spacing)[:14]
    assert qa.spheres.detected[:14].sum() >= 12
    assert np.abs(qa.spheres.centres[:14] - expected).max() < 1.5  # pixels
    for sphere, (row, col) in enumerate(qa.spheres.centres[:14], start=1):
        assert truth.labels[0, round(row), round(col)] == sphere


def test_embedded_plate5_t1_matches_the_truth_and_flags_short_spheres(plate5):
    _, truth, qa = plate5
    table = qa.table
    true_ms = np.array([truth.t1[truth.labels == s][0] for s in range(1, 15)]) * 1000
    measured = table["T1 median (ms)"].to_numpy()
    assert np.abs(measured[:11] / true_ms[:11] - 1).max() < 0.03
    assert list(table.status[:11]) == ["pass"] * 11
    # nominal T1 below the shortest TI (50 ms): never reported as a pass
    assert list(table.status[11:]) == ["unreliable"] * 3
    assert table.note[11].startswith("T1 below the shortest TI")
    assert "nominal 1.5 T (ms)" in table.columns
    assert qa.plate == 5 and qa.plate_choice.detected
    assert table.attrs["orientation"] == "rotated +0 deg, not mirrored"
    assert table.attrs["margin"] > 0.15 and table.attrs["rank_correlation"] < -0.95
    assert set(table.reference) == {"plate 5, version 1 (assumed), 20 °C (assumed), 1.5 T"}


def test_table_fails_a_sphere_outside_the_tolerance_and_exports_csv(plate5, tmp_path):
    _, _, qa = plate5
    strict = phantom_qa.sphere_table(
        qa.t1 * 1.04, qa.fit.sd["t1"][0], qa.spheres, qa.header, tolerance=0.02
    )
    assert set(strict.status[:11]) == {"fail"}
    strict.to_csv(tmp_path / "qa.csv", index=False)
    back = pd.read_csv(tmp_path / "qa.csv")
    assert back["vs nominal (%)"].iloc[5] == pytest.approx(strict["vs nominal (%)"].iloc[5])


@pytest.mark.parametrize("site", sorted(SITES))
def test_hazen_sites_against_hazens_fits(hazen, site, tmp_path):
    """Spheres 2-11 within 3% of hazen's values, fitted with hazen's model (like with like).

    One exception, for a physical reason: on site 1 hazen's template puts sphere 4's ROI 6 px
    (8 mm) from the sphere's centre, at its edge (radius 8 px), so hazen's value is biased.
    """
    reference = phantom_qa.HAZEN_FITTED_T1_MS[SITES[site]]
    qa = phantom_qa.run_t1_qa(
        hazen / "T1" / site / "plate5",
        reference_ms=reference,
        reference_name="hazen",
        model_for=lambda h: models.ir_hazen_model(h.ti, h.tr, magnitude=not h.signed),
    )
    assert qa.spheres.detected[:14].all()
    difference = qa.table["vs hazen (%)"].to_numpy()[1:11] / 100
    exceptions = {"site1_20200218": [4]}.get(site, [])
    for sphere, value in zip(range(2, 12), difference, strict=True):
        if sphere not in exceptions:
            assert abs(value) < 0.03, (sphere, value)
    if exceptions:
        offset = np.linalg.norm(qa.spheres.centres[3] - phantom_qa.TEMPLATE_CENTRES[3])
        assert offset > 0.6 * qa.spheres.radius_px
    # the default, self-consistent model: issue 4's targets against hazen's values
    default = phantom_qa.run_t1_qa(hazen / "T1" / site / "plate5", reference_ms=reference,
                                   reference_name="hazen")  # fmt: skip
    difference = default.table["vs hazen (%)"].to_numpy()[1:11] / 100
    assert np.median(np.abs(difference)) < 0.02
    assert np.abs(difference).max() < 0.08
    phantom_qa.plot_rois(default.images[-1], default.spheres, title=site).savefig(
        tmp_path / f"{site}.png"
    )


@pytest.mark.parametrize("site", ["site1_20200218", "site2_20180925"])
def test_siemens_spheres_sit_near_the_readme_centres(hazen, site):
    qa = phantom_qa.run_t1_qa(hazen / "T1" / site / "plate5")
    offsets = np.linalg.norm(qa.spheres.centres - np.asarray(phantom_qa.TEMPLATE_CENTRES), axis=1)
    assert offsets[:14].max() < 8


def test_ge_site3_256_matrix_against_nominal(hazen, tmp_path):
    """GE, 256x256 at 0.977 mm: found automatically; spheres 3-11 within 8% of nominal.

    Sphere 2 (nominal 1489 ms) reads 12% low: the data fit the 3-parameter model to 0.1%, so
    this is the scan (the longest T1 barely recover at TR = 1 s), not the sphere finder.
    """
    qa = phantom_qa.run_t1_qa(hazen / "T1/site3_ge/plate5")
    assert qa.images.shape[1:] == (256, 256)
    assert qa.spheres.detected[:14].all()
    assert 8 <= qa.spheres.radius_px * 0.977 <= 13  # mm
    difference = qa.table["vs nominal (%)"].to_numpy() / 100
    assert np.abs(difference[2:11]).max() < 0.08
    assert -0.15 < difference[1] < 0
    path = tmp_path / "site3_rois.png"
    phantom_qa.plot_rois(qa.images[-1], qa.spheres, title="site 3").savefig(path)
    assert path.stat().st_size > 10_000


def test_too_few_inversion_times_is_a_clear_error(tmp_path):
    phantom.write_ir_phantom(tmp_path, ti=(0.1, 0.4, 1.0), tr=1.0, shape=(64, 64))
    with pytest.raises(ValueError, match=r"3 inversion times cannot determine a 3-parameter"):
        phantom_qa.run_t1_qa(tmp_path)
    with pytest.raises(ValueError, match=str(tmp_path)):
        phantom_qa.run_t1_qa(tmp_path)


def test_a_series_without_inversion_time_is_refused(tmp_path):
    phantom.write_multi_echo_phantom(tmp_path, shape=(64, 64))
    with pytest.raises(ValueError, match=r"no InversionTime.*inversion-recovery"):
        phantom_qa.run_t1_qa(tmp_path)


def test_images_that_are_not_the_phantom_are_refused(tmp_path):
    yy, xx = np.mgrid[0:128, 0:128]
    disc = ((yy - 64) ** 2 + (xx - 64) ** 2 < 50**2) * 1000.0
    ti = np.array(phantom.PLATE5_TI)
    images = disc[None, None] * np.abs(1 - 2 * np.exp(-ti / 0.8))[:, None, None, None] + 20
    phantom.write_series(tmp_path, images, ti=ti, tr=1.0, field_strength=1.5)
    with pytest.raises(ValueError, match=rf"{tmp_path}.*(circles found|do not)"):
        phantom_qa.run_t1_qa(tmp_path)


def test_notebook_04_on_every_hazen_site(hazen):
    """The QA notebook on each vendor's scan, as a physicist would run it."""
    from test_notebooks import _run

    for site, key in [*SITES.items(), ("site3_ge", None)]:
        setup = (
            f"import os\nos.environ['QMRI_PHANTOM_DIR'] = {str(hazen / 'T1' / site / 'plate5')!r}"
        )
        if key:
            setup += f"\nos.environ['QMRI_PHANTOM_REFERENCE'] = {key!r}"
        text = _run("04_phantom_qa.py", setup)
        assert f"Data used: your scan: {hazen / 'T1' / site / 'plate5'}" in text
        assert "spheres detected as circles: 14 of 14" in text


@pytest.fixture(scope="module")
def plate4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plate4")
    truth = phantom.write_plate4_phantom(folder)
    return folder, truth, phantom_qa.run_t1_qa(folder)


def test_embedded_plate4_is_detected_and_scored_against_the_plate4_table(plate4):
    _, truth, qa = plate4
    assert qa.plate == 4 and qa.plate_choice.detected
    assert qa.plate_choice.mismatch[4] < 0.03 and qa.plate_choice.mismatch[5] > 0.5
    true_ms = np.array([truth.t1[truth.labels == s][0] for s in range(1, 15)]) * 1000
    np.testing.assert_allclose(qa.table["nominal 1.5 T (ms)"], true_ms)
    resolved = (qa.table.status != "unreliable").to_numpy()
    assert resolved[2:].all()
    measured = qa.table["T1 median (ms)"].to_numpy()
    assert np.abs(measured[resolved] / true_ms[resolved] - 1).max() < 0.03
    assert "plate 4" in qa.summary and "plate 4" in qa.table.reference[0]


def test_a_named_plate_that_the_values_contradict_is_refused(plate4, plate5):
    with pytest.raises(ValueError, match=r"plate=5 was given, but the fitted T1 contradict"):
        phantom_qa.run_t1_qa(plate4[0], plate=5)
    with pytest.raises(ValueError, match=r"plate=4 was given.*fit plate 5's"):
        phantom_qa.run_t1_qa(plate5[0], plate=4)


def test_mirrored_embedded_plate_keeps_its_labels(plate5, tmp_path):
    from test_phantom_orientation import _copy

    folder, truth, _ = plate5
    qa = phantom_qa.run_t1_qa(_copy(folder, tmp_path / "mirrored", np.fliplr))
    labels = np.fliplr(truth.labels[0])
    assert qa.spheres.mirrored and qa.spheres.margin > 0.15
    for sphere, (row, col) in enumerate(qa.spheres.centres[:14], start=1):
        assert labels[round(row), round(col)] == sphere
    assert "mirrored" in qa.summary


def test_scrambled_embedded_plate_is_refused(plate5, tmp_path):
    from test_phantom_orientation import _copy, _scrambler

    folder, _, qa = plate5
    _, change = _scrambler(qa, seed=1)
    scrambled = _copy(folder, tmp_path / "scrambled", change)
    with pytest.raises(ValueError, match=rf"{scrambled}: no orientation .* makes T1 fall"):
        phantom_qa.run_t1_qa(scrambled)


def test_roi_statistics_against_closed_forms():
    rng = np.random.default_rng(0)
    values = rng.normal(100.0, 5.0, 100_000)
    stats = qa_report.roi_statistics(values, np.full_like(values, 2.0))
    assert stats["median"] == pytest.approx(100, abs=0.1)
    assert stats["robust_sd"] == pytest.approx(5.0, rel=0.02)
    assert stats["iqr"] == pytest.approx(2 * 0.6745 * 5.0, rel=0.02)
    # SD of the median: sqrt(pi/2) sigma / sqrt(n), from the CR SD and from the spread
    assert stats["cr_sd_median"] == pytest.approx(np.sqrt(np.pi / 2) * 2.0 / np.sqrt(1e5))
    assert stats["sd_median"] == pytest.approx(np.sqrt(np.pi / 2) * 5.0 / np.sqrt(1e5), rel=0.02)
    # and the SD of the median of 25 samples, checked by simulation
    medians = np.median(rng.normal(0, 1, (20_000, 25)), axis=1)
    assert medians.std() == pytest.approx(np.sqrt(np.pi / 2) / 5, rel=0.05)


def test_a_spread_the_cramer_rao_sd_misses_makes_a_sphere_unreliable(plate5):
    _, _, qa = plate5
    t1 = qa.t1.clone()
    row, col = (int(round(v)) for v in qa.spheres.centres[4])
    noise = torch.from_numpy(np.random.default_rng(0).normal(1, 0.3, (5, 5))).to(t1.dtype)
    t1[row - 2 : row + 3, col - 2 : col + 3] *= noise  # 30% spread, CR SD unchanged
    table = phantom_qa.sphere_table(t1, qa.fit.sd["t1"][0], qa.spheres, qa.header)
    assert table.status[4] == "unreliable"
    assert table.note[4].startswith("median uncertain by")
    assert table["CR SD of median (%)"][4] < 1 < 5 < table["SD of median (%)"][4]
    assert (qa.table.status[:11] == "pass").all()  # the untouched table


def test_roi_figure_says_what_each_marker_means(plate5):
    _, _, qa = plate5
    fig = phantom_qa.plot_rois(qa.images[-1], qa.spheres, title="synthetic", plate=qa.plate)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        "ROI, circle detected",
        "ROI, template position only",
        "15: water fill (no sphere)",
    ]
    assert ax.get_title().startswith("plate 5, rotated")
    numbers = [t for t in ax.texts if t.get_text().isdigit()]
    assert len(numbers) == 15 and {t.get_color() for t in numbers} == {"white"}
    assert all(t.get_path_effects() for t in numbers)  # the black outline
    fig.canvas.draw()
    title = fig._suptitle.get_window_extent()
    assert not title.overlaps(fig.axes[1].get_window_extent())  # the colorbar


def test_serial_and_temperature_choose_the_nominal_values(plate5):
    folder, _, _ = plate5
    qa = phantom_qa.run_t1_qa(folder, serial=60, temperature_c=22)
    expected = reference.reference_t1(5, 1.5, serial=60, temperature_c=22)
    np.testing.assert_allclose(qa.table["nominal 1.5 T (ms)"], expected.ms, atol=0.01)
    assert qa.reference.version == 2 and qa.reference.temperature_c == 22
    assert set(qa.table.reference) == {"plate 5, version 2, 22 °C, 1.5 T"}
    assert "scaled by the change at 3 T" in qa.summary
    # version 2 at 22 °C differs from version 1 at 20 °C: sphere 2 by about 7%
    assert qa.table["nominal 1.5 T (ms)"][1] / 1489 - 1 == pytest.approx(-0.0679, abs=0.002)
    with pytest.raises(ValueError, match=rf"{folder}: no reference values at 30 °C"):
        phantom_qa.run_t1_qa(folder, temperature_c=30)


def test_choose_plate_from_values_alone():
    refs = {p: reference.reference_t1(p, 1.5) for p in (4, 5)}
    usable = lambda t1: 0.05 <= t1 <= 2.4  # noqa: E731
    plate5 = np.asarray(refs[5]) * 1.02
    choice = phantom_qa.choose_plate(plate5, refs, usable)
    assert choice.plate == 5 and choice.detected
    assert choice.mismatch[5] == pytest.approx(np.log(1.02))
    assert choice.spheres == tuple(range(1, 12))  # 12-14 are below 50 ms on plate 5
    assert phantom_qa.choose_plate(np.asarray(refs[4]), refs, usable).plate == 4
    # 40% short on every sphere fits neither table: refused, not scored
    with pytest.raises(ValueError, match=r"scan/x: the fitted T1 fit neither plate's table"):
        phantom_qa.choose_plate(plate5 * 0.6, refs, usable, where="scan/x")
    # halfway between the tables: not detected, but nothing contradicts a plate named
    halfway = np.sqrt(np.asarray(refs[4]) * np.asarray(refs[5]))
    with pytest.raises(ValueError, match="fit neither plate's table"):
        phantom_qa.choose_plate(halfway, refs, usable)
    named = phantom_qa.choose_plate(halfway, refs, usable, plate=5)
    assert named.plate == 5 and not named.detected and "as given" in named.summary
    with pytest.raises(ValueError, match="plate must be None, 4 or 5"):
        phantom_qa.choose_plate(plate5, refs, usable, plate=3)
