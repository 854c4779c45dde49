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
def test_t2_qa_of_the_philips_3t_scan(hazen):
    result = t2_qa.run_t2_qa(hazen / "T2" / "site5_philips_3T" / "plate5")
    assert result.plate == 5
    table = result.table.set_index("sphere")
    assert np.median(np.abs(table.loc[4:11, "vs nominal (%)"])) < 4.0
    assert 0.65 < np.median(result.b1.numpy()[result.fit.valid[0].numpy()]) < 0.85
