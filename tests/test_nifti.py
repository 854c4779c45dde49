"""Multi-echo NIfTI + BIDS sidecars: the kidney scan, and clear errors for bad echo times."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from qmri_helpers import nifti

ECHOES = "00024__*_e*.nii.gz"
KIDNEY_TE_MS = [4.61 * k for k in range(1, 13)]


def _copy_echoes(kidney, tmp_path, n=4):
    for k in range(1, n + 1):
        for suffix in (".nii.gz", ".json"):
            name = f"00024__bh3x_r2star_inphase_volume_e{k}{suffix}"
            shutil.copy(kidney / name, tmp_path / name)
    return tmp_path


def _edit_sidecar(path, **changes):
    content = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            content.pop(key, None)
        else:
            content[key] = value
    path.write_text(json.dumps(content))


def test_kidney_series_loads_with_echo_times_from_the_sidecars(kidney):
    images, header = nifti.load_nifti_series(kidney, pattern=ECHOES)
    assert images.shape == (12, 5, 128, 128)
    assert (header.te * 1000).tolist() == pytest.approx(KIDNEY_TE_MS, abs=0.01)
    assert [p.name for p in header.files][:3] == [
        f"00024__bh3x_r2star_inphase_volume_e{k}.nii.gz" for k in (1, 2, 3)
    ]  # e10, e11, e12 sort before e2 by name; by EchoTime they come last
    assert header.tr == pytest.approx(0.148)
    assert header.affine.shape == (4, 4)
    raw = nib.load(kidney / "00024__bh3x_r2star_inphase_volume_e1.nii.gz").get_fdata()
    assert torch.equal(images[0, 2], torch.from_numpy(raw[:, :, 2].T.astype(np.float32)))


def test_scanner_map_loads_as_zyx(kidney):
    r2star, affine = nifti.load_nifti(kidney / "00027__R2Star_Images.nii.gz")
    assert r2star.shape == (5, 128, 128)
    assert 15 < r2star[2, 55:75, 40:55].median() < 35  # s^-1 in the kidney


def test_echoes_mixed_with_a_derived_map_are_refused(kidney):
    with pytest.raises(nifti.NiftiSeriesError, match=r"different series \(SeriesNumber"):
        nifti.load_nifti_series(kidney, pattern="*.nii.gz")


def test_missing_echo_time(kidney, tmp_path):
    folder = _copy_echoes(kidney, tmp_path)
    _edit_sidecar(folder / "00024__bh3x_r2star_inphase_volume_e3.json", EchoTime=None)
    with pytest.raises(nifti.NiftiSeriesError, match=r"volume_e3\.json: missing EchoTime"):
        nifti.load_nifti_series(folder)


def test_missing_sidecar(kidney, tmp_path):
    folder = _copy_echoes(kidney, tmp_path)
    (folder / "00024__bh3x_r2star_inphase_volume_e2.json").unlink()
    with pytest.raises(nifti.NiftiSeriesError, match=r"volume_e2\.nii\.gz: no JSON sidecar"):
        nifti.load_nifti_series(folder)


def test_duplicate_echo_times(kidney, tmp_path):
    folder = _copy_echoes(kidney, tmp_path)
    # e2's sidecar now claims e1's echo time, and its NIfTI header is made to agree
    image = nib.load(folder / "00024__bh3x_r2star_inphase_volume_e2.nii.gz")
    image.header["descrip"] = b"TE=4.6"
    nib.save(image, folder / "00024__bh3x_r2star_inphase_volume_e2.nii.gz")
    _edit_sidecar(folder / "00024__bh3x_r2star_inphase_volume_e2.json", EchoTime=0.00461)
    with pytest.raises(
        nifti.NiftiSeriesError,
        match=r"duplicate echo times: .*e1\.nii\.gz, .*e2\.nii\.gz all have \[4\.61\] ms",
    ):
        nifti.load_nifti_series(folder)


def test_sidecar_that_disagrees_with_its_nifti(kidney, tmp_path):
    folder = _copy_echoes(kidney, tmp_path)
    _edit_sidecar(folder / "00024__bh3x_r2star_inphase_volume_e4.json", EchoTime=0.030)
    with pytest.raises(
        nifti.NiftiSeriesError,
        match=r"volume_e4\.json disagrees with its NIfTI: .* 30 ms .* TE=18 ms",
    ):
        nifti.load_nifti_series(folder)


def _write_4d(tmp_path, echo_times, n_volumes=3):
    data = np.stack([np.full((4, 5, 2), 100.0 * np.exp(-k)) for k in range(n_volumes)], -1)
    path = tmp_path / "me.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), path)
    (tmp_path / "me.json").write_text(json.dumps({"EchoTime": echo_times}))
    return path


def test_4d_series_with_a_list_of_echo_times(tmp_path):
    path = _write_4d(tmp_path, [0.005, 0.010, 0.015])
    images, header = nifti.load_nifti_series([path])
    assert images.shape == (3, 2, 5, 4)
    assert header.te.tolist() == pytest.approx([0.005, 0.010, 0.015])
    assert images[:, 0, 0, 0].tolist() == pytest.approx([100, 100 / np.e, 100 / np.e**2])


def test_4d_unsorted_echo_times(tmp_path):
    path = _write_4d(tmp_path, [0.010, 0.005, 0.015])
    with pytest.raises(nifti.NiftiSeriesError, match="EchoTime is not increasing"):
        nifti.load_nifti_series([path])


def test_4d_echo_count_disagrees_with_volumes(tmp_path):
    path = _write_4d(tmp_path, [0.005, 0.010])
    with pytest.raises(nifti.NiftiSeriesError, match="2 EchoTime values for 3 volumes"):
        nifti.load_nifti_series([path])


def test_no_matching_files(tmp_path):
    with pytest.raises(nifti.NiftiSeriesError, match="no NIfTI files match"):
        nifti.load_nifti_series(tmp_path)


# --- without a sidecar: echo times from the caller; a file path; times that look like ms --


def test_4d_file_without_sidecar_takes_echo_times(tmp_path):
    path = _write_4d(tmp_path, [0.005, 0.010, 0.015])
    (tmp_path / "me.json").unlink()
    images, header = nifti.load_nifti_series(path, echo_times=[0.005, 0.010, 0.015])
    assert images.shape == (3, 2, 5, 4)
    assert header.te.tolist() == pytest.approx([0.005, 0.010, 0.015])
    assert images[:, 0, 0, 0].tolist() == pytest.approx([100, 100 / np.e, 100 / np.e**2])
    assert header.tr is None and header.sidecar == {}
    assert header.files == [path]


def test_a_file_path_is_accepted_like_a_folder(tmp_path):
    path = _write_4d(tmp_path, [0.005, 0.010, 0.015])
    from_file = nifti.load_nifti_series(path)
    from_folder = nifti.load_nifti_series(tmp_path)
    assert torch.equal(from_file[0], from_folder[0])
    assert torch.equal(from_file[1].te, from_folder[1].te)


def test_missing_sidecar_says_what_to_pass(tmp_path):
    path = _write_4d(tmp_path, [0.005, 0.010, 0.015])
    (tmp_path / "me.json").unlink()
    with pytest.raises(
        nifti.NiftiSeriesError, match=r"me\.nii\.gz: no JSON sidecar.*echo_times=.*EchoTime"
    ):
        nifti.load_nifti_series(path)


@pytest.mark.parametrize("where", ["sidecar", "argument"])
def test_4d_echo_times_that_look_like_ms_are_refused(tmp_path, where):
    path = _write_4d(tmp_path, [5.0, 10.0, 15.0])
    kwargs = {}
    if where == "argument":
        (tmp_path / "me.json").unlink()
        kwargs["echo_times"] = [5.0, 10.0, 15.0]
    with pytest.raises(
        nifti.NiftiSeriesError, match=r"me\.nii\.gz volume 0: echo time 5 looks like ms, not s"
    ):
        nifti.load_nifti_series(path, **kwargs)


def test_echo_times_that_disagree_with_a_sidecar(tmp_path):
    path = _write_4d(tmp_path, [0.005, 0.010, 0.015])
    with pytest.raises(nifti.NiftiSeriesError, match=r"me\.json says EchoTime .* echo_times gives"):
        nifti.load_nifti_series(path, echo_times=[0.005, 0.010, 0.020])


def test_3d_files_without_sidecars_in_the_order_of_echo_times(tmp_path):
    volumes = [np.full((4, 5, 2), 100.0 * np.exp(-k), dtype=np.float32) for k in range(3)]
    paths = []
    for k, volume in zip((3, 1, 2), volumes, strict=True):  # names not in echo order
        paths.append(tmp_path / f"echo{k}.nii.gz")
        nib.save(nib.Nifti1Image(volume, np.eye(4)), paths[-1])
    images, header = nifti.load_nifti_series(paths, echo_times=[0.003, 0.009, 0.006])
    assert header.te.tolist() == pytest.approx([0.003, 0.006, 0.009])
    assert images[:, 0, 0, 0].tolist() == pytest.approx([100, 100 / np.e**2, 100 / np.e])
    with pytest.raises(nifti.NiftiSeriesError, match="pass the files as a list"):
        nifti.load_nifti_series(tmp_path, echo_times=[0.003, 0.009, 0.006])
    with pytest.raises(nifti.NiftiSeriesError, match="echo3.nii.gz: echo time 3 looks like ms"):
        nifti.load_nifti_series(paths, echo_times=[3, 9, 6])


def test_kidney_echoes_without_sidecars_match_the_sidecar_load(kidney, tmp_path):
    folder = _copy_echoes(kidney, tmp_path, n=12)
    reference, truth = nifti.load_nifti_series(folder)
    for sidecar in folder.glob("*.json"):
        sidecar.unlink()
    paths = [folder / f"00024__bh3x_r2star_inphase_volume_e{k}.nii.gz" for k in range(1, 13)]
    images, header = nifti.load_nifti_series(paths, echo_times=truth.te.tolist())
    assert torch.equal(images, reference)
    assert torch.equal(header.te, truth.te)
    assert (header.te * 1000).tolist() == pytest.approx(KIDNEY_TE_MS, abs=0.01)
