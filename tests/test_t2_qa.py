"""T2 QA of the system phantom: the synthetic plate with known T2, refusals, real scans."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from qmri_helpers import phantom, t2_qa

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def spin_echo_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t2_plate")
    return folder, phantom.write_spin_echo_phantom(folder)


def test_t2_qa_of_the_synthetic_plate(spin_echo_folder):
    folder, truth = spin_echo_folder
    result = t2_qa.run_t2_qa(folder)
    assert result.plate == 5 and result.plate_choice.detected
    table = result.table.set_index("sphere")
    # Spheres 1-2 (T2 > 3 x 256 ms) are flagged, never passed; 3-14 pass within 10%.
    assert (table.loc[[1, 2], "status"] == "unreliable").all()
    assert (table.loc[3:14, "status"] == "pass").all(), table
    assert "T2 beyond 3x the longest TE" in table.loc[1, "note"]
    assert list(table.columns[:2]) == ["T2 median (ms)", "T2 IQR (ms)"]
    # B1 was 0.8 at the centre with a 10% gradient: the fit finds it.
    b1 = result.b1.numpy()[0 < truth.labels[0]]
    assert abs(np.median(b1) - 0.8) < 0.02
    fig = t2_qa.plot_t2_agreement(result.table)
    assert fig.axes[0].get_ylabel() == "measured T2 (ms)"


def test_t2_qa_refuses_an_inversion_recovery_series(tmp_path):
    phantom.write_plate5_phantom(tmp_path)
    with pytest.raises(ValueError, match=rf"{tmp_path}.*InversionTime.*run_t1_qa"):
        t2_qa.run_t2_qa(tmp_path)


def test_t2_qa_refuses_echoes_that_are_not_one_cpmg_train(tmp_path):
    phantom.write_multi_echo_phantom(tmp_path)  # gradient echoes, TE 2.5 ms + 4.5 ms k
    with pytest.raises(ValueError, match=rf"{tmp_path}.*not a CPMG train"):
        t2_qa.run_t2_qa(tmp_path)


@pytest.mark.shared
@pytest.mark.parametrize(
    ("site", "b1_range"), [("site5_philips_3T", (0.65, 0.85)), ("site3_ge", (0.85, 1.0))]
)
def test_t2_qa_of_the_real_scans(hazen, site, b1_range):
    result = t2_qa.run_t2_qa(hazen / "T2" / site / "plate5")
    assert result.plate == 5 and result.plate_choice.detected
    table = result.table.set_index("sphere")
    assert np.median(np.abs(table.loc[4:11, "vs nominal (%)"])) < 4.0
    b1 = np.median(np.concatenate(t2_qa.roi_values(result.b1, result.spheres.centres[:14])))
    assert b1_range[0] < b1 < b1_range[1]


@pytest.mark.shared
def test_t2_qa_with_the_nominal_t1_of_each_sphere(hazen):
    # The stored states decay with T1: the plate's own T1 instead of 1 s for every sphere
    # brings the Philips 3 T spheres 4-11 from about 3% to about 1% of nominal.
    result = t2_qa.run_t2_qa(hazen / "T2" / "site5_philips_3T" / "plate5", t1="nominal")
    table = result.table.set_index("sphere")
    assert np.median(np.abs(table.loc[4:11, "vs nominal (%)"])) < 2.0
    assert "nominal T1 per sphere" in result.summary


def test_t2_qa_refuses_a_bad_t1(spin_echo_folder):
    with pytest.raises(ValueError, match="t1 must be"):
        t2_qa.run_t2_qa(spin_echo_folder[0], t1="measured")
