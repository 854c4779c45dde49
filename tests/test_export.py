"""Export round trips: NIfTI and DICOM maps read back with the same values and geometry."""

from __future__ import annotations

import warnings

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from qmri_helpers import dicom, export, fitting, models, phantom


def _ras(ds: pydicom.Dataset, row: int, column: int) -> np.ndarray:
    """The RAS position (mm) of a pixel, straight from the DICOM definition."""
    orientation = np.asarray(ds.ImageOrientationPatient, float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    lps = (
        np.asarray(ds.ImagePositionPatient, float)
        + column * column_spacing * orientation[:3]
        + row * row_spacing * orientation[3:]
    )
    return lps * [-1, -1, 1]


@pytest.fixture(scope="module")
def multislice(tmp_path_factory):
    """A 3-slice IR series with an oblique orientation, and its fitted T1 map."""
    folder = tmp_path_factory.mktemp("multislice")
    truth = phantom.make_phantom((48, 40))
    ti = np.array([0.1, 0.3, 0.8, 2.0, 4.0])
    images = np.concatenate(
        [phantom.simulate_inversion_recovery(truth, ti, 15.0, seed=z) for z in range(3)], 1
    )
    paths = phantom.write_series(folder, images, ti=ti, tr=15.0, pixel_spacing=1.25)
    angle = np.deg2rad(20)
    row_cosine = [np.cos(angle), np.sin(angle), 0.0]
    column_cosine = [0.0, 0.0, -1.0]
    normal = np.cross(row_cosine, column_cosine)
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        z = index % 3
        ds.ImageOrientationPatient = row_cosine + column_cosine
        ds.ImagePositionPatient = list(np.array([-20.0, 10.0, 30.0]) + 5.0 * z * normal)
        ds.SliceLocation = 5.0 * z
        ds.save_as(path)
    series, header = dicom.load_series(folder)
    t1 = fitting.fit_lm(models.ir_seed_model(header.ti), series).params["t1"]
    return header, t1


def test_affine_agrees_with_the_dicom_geometry(multislice):
    header, _ = multislice
    affine = export.dicom_affine(header)
    for k, path in enumerate(header.files[0]):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for row, column in [(0, 0), (47, 0), (0, 39), (20, 13)]:
            voxel = affine @ [column, row, k, 1]
            np.testing.assert_allclose(voxel[:3], _ras(ds, row, column), atol=1e-4)


def test_nifti_round_trip(multislice, tmp_path):
    header, t1 = multislice
    path = export.to_nifti(t1, header, tmp_path / "t1.nii.gz", description="T1 (s)")
    image = nib.load(path)
    back = np.asarray(image.dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(back, t1.numpy())
    np.testing.assert_allclose(image.affine, export.dicom_affine(header), atol=1e-5)
    assert image.header["descrip"].item().decode() == "T1 (s)"
    assert image.header.get_xyzt_units() == ("mm", "sec")


def test_dicom_round_trip(multislice, tmp_path):
    header, t1 = multislice
    paths = export.to_dicom(t1, header, tmp_path / "t1_dicom")
    assert len(paths) == 3
    for k, (path, source) in enumerate(zip(paths, header.files[0], strict=True)):
        ds = pydicom.dcmread(path)
        values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(values, t1[k].numpy() * 1000, atol=float(ds.RescaleSlope))
        src = pydicom.dcmread(source, stop_before_pixels=True)
        assert ds.ImagePositionPatient == src.ImagePositionPatient
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "T1 MAP"]
        assert ds.RescaleType == "ms" and "InversionTime" not in ds


def test_hazen_coronal_geometry_round_trips(hazen, tmp_path):
    images, header = dicom.load_series(hazen / "T1/site4_philips/plate5")
    t1 = fitting.fit_lm(models.ir_three_parameter_model(header.ti), images).params["t1"]
    image = nib.load(export.to_nifti(t1, header, tmp_path / "site4_t1.nii"))
    ds = pydicom.dcmread(header.files[0][0], stop_before_pixels=True)
    np.testing.assert_allclose((image.affine @ [10, 20, 0, 1])[:3], _ras(ds, 20, 10), atol=1e-4)
    assert nib.aff2axcodes(image.affine)[2] in "AP"  # a coronal slice: the normal is A-P
    back = pydicom.dcmread(export.to_dicom(t1, header, tmp_path / "dcm")[0])
    assert back.Rows == 192 and "PatientName" in back
    _check_parametric_map(export.to_parametric_map(t1, header, tmp_path / "pm.dcm"), header, t1)


def test_bad_maps_are_refused(multislice, tmp_path):
    header, t1 = multislice
    with pytest.raises(ValueError, match="NaN"):
        export.to_nifti(torch.full_like(t1, float("nan")), header, tmp_path / "x.nii")
    with pytest.raises(ValueError, match=r"shape \(2, 48, 40\).*has \(3, 48, 40\)"):
        export.to_nifti(t1[:2], header, tmp_path / "x.nii")
    with pytest.raises(ValueError, match=r"shape \(3, 40, 48\)"):  # rows and columns swapped
        export.to_dicom(t1.transpose(1, 2), header, tmp_path / "swapped")
    with pytest.raises(ValueError, match="negative"):
        export.to_dicom(-t1, header, tmp_path / "neg")


def _read_back(paths) -> np.ndarray:
    """The stored map (in the file's unit) of a written series, ``(z, y, x)``."""
    slices = []
    for path in paths:
        ds = pydicom.dcmread(path)
        slices.append(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(slices)


def test_an_outlier_is_clipped_counted_and_the_rest_keeps_its_precision(multislice, tmp_path):
    header, t1 = multislice
    spoiled = t1.clone()
    spoiled[1, 10, 10] = 1e6  # a fit that ran away
    with pytest.warns(UserWarning, match=r"1 voxel .*clipped"):
        paths = export.to_dicom(spoiled, header, tmp_path / "dcm")
    back, truth = _read_back(paths), t1.numpy().astype(np.float64) * 1000
    kept = np.ones(truth.shape, bool)
    kept[1, 10, 10] = False
    slope = float(pydicom.dcmread(paths[0]).RescaleSlope)
    assert np.abs(back - truth)[kept].max() <= slope / 2 * (1 + 1e-6)
    big = kept & (truth >= 100.0)  # every vial from 0.1 s up: 0.1% of the value
    assert big.sum() > 1000
    assert (np.abs(back - truth)[big] <= 1e-3 * truth[big]).all()
    assert back[1, 10, 10] == pytest.approx(65535 * slope)  # clipped to the top, not wrapped
    assert back[1, 10, 10] >= truth[kept].max()
    comments = pydicom.dcmread(paths[1]).ImageComments
    assert "1 voxel" in comments and "clipped" in comments


def test_a_clean_map_is_stored_without_a_warning(multislice, tmp_path):
    header, t1 = multislice
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = export.to_dicom(t1, header, tmp_path / "dcm")
    back, truth = _read_back(paths), t1.numpy().astype(np.float64) * 1000
    slope = float(pydicom.dcmread(paths[0]).RescaleSlope)
    assert slope == pytest.approx(truth.max() / 65535, rel=1e-6)
    assert np.abs(back - truth).max() <= slope / 2 * (1 + 1e-6)


def test_vmax_sets_the_top_and_counts_what_it_clips(multislice, tmp_path):
    header, t1 = multislice
    n_above = int((t1 > 3.0).sum())
    assert n_above > 0
    with pytest.warns(UserWarning, match=rf"{n_above} voxels .*clipped"):
        paths = export.to_dicom(t1, header, tmp_path / "dcm", vmax=3.0)
    back = _read_back(paths)
    assert back.max() == pytest.approx(3000.0, rel=1e-6)
    below = t1.numpy() <= 3.0
    np.testing.assert_allclose(back[below], t1.numpy()[below] * 1000, atol=3000 / 65535)


@pytest.mark.parametrize("name", ["../../x", "sub/T1", "..\\x", "..", "", "T1\0"])
def test_names_that_are_not_plain_file_names_are_refused(multislice, tmp_path, name):
    header, t1 = multislice
    folder = tmp_path / "a" / "b"
    with pytest.raises(ValueError, match="name"):
        export.to_dicom(t1, header, folder, name=name)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_an_older_series_is_kept_unless_overwrite_and_then_removed(multislice, tmp_path):
    header, t1 = multislice
    folder = tmp_path / "dcm"
    first = export.to_dicom(t1, header, folder)
    for k in (4, 5):  # the older series was longer: 5 slices
        ds = pydicom.dcmread(first[0])
        ds.InstanceNumber = k
        ds.save_as(folder / f"T1_{k:04d}.dcm")
    (folder / "notes.txt").write_text("mine")
    others = export.to_dicom(t1, header, folder, name="M0", unit="a.u.", scale=1.0)
    with pytest.raises(FileExistsError, match=r"T1.*overwrite=True"):
        export.to_dicom(t1 * 2, header, folder)
    np.testing.assert_allclose(_read_back(first), t1.numpy() * 1000, atol=0.1)  # untouched
    paths = export.to_dicom(t1 * 2, header, folder, overwrite=True)
    assert sorted(folder.glob("T1_*")) == paths and len(paths) == 3
    np.testing.assert_allclose(_read_back(paths), t1.numpy() * 2000, atol=0.2)
    assert {p.name for p in folder.iterdir()} == {"notes.txt", *(p.name for p in paths + others)}
    series = {pydicom.dcmread(p).SeriesInstanceUID for p in paths}
    assert len(series) == 1


def test_overwrite_never_deletes_a_file_the_package_did_not_write(multislice, tmp_path):
    header, t1 = multislice
    folder = tmp_path / "dcm"
    export.to_dicom(t1, header, folder)
    foreign = folder / "T1_0009.dcm"
    foreign.write_bytes(header.files[0][0].read_bytes())  # the scanner's own file
    with pytest.raises(FileExistsError, match="T1_0009.dcm.*not written by qmri_helpers"):
        export.to_dicom(t1, header, folder, overwrite=True)
    assert foreign.read_bytes() == header.files[0][0].read_bytes()
    assert len(list(folder.glob("T1_*.dcm"))) == 4


def test_to_nifti_returns_the_file_it_wrote(multislice, tmp_path):
    header, t1 = multislice
    path = export.to_nifti(t1, header, tmp_path / "t1map")
    assert path == tmp_path / "t1map.nii" and path.is_file()
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj).transpose(2, 1, 0), t1)
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="folder.*a file name ending in .nii"):
        export.to_nifti(t1, header, tmp_path / "folder")


def _lps(ds: pydicom.Dataset, row: int, column: int) -> np.ndarray:
    return _ras(ds, row, column) * [-1, -1, 1]


def _check_parametric_map(path, header, t1):
    """Read a T1 parametric map (ms) back with pydicom and highdicom; check values and geometry."""
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in header.files[0]]
    truth = t1.numpy().astype(np.float64) * 1000
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert "FloatPixelData" in ds and ds.pixel_array.dtype == np.float32
    assert ds.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
    shared = ds.SharedFunctionalGroupsSequence[0]
    mapping = shared.RealWorldValueMappingSequence[0]
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("ms", "UCUM")
    assert (mapping.RealWorldValueSlope, mapping.RealWorldValueIntercept) == (1.0, 0.0)
    np.testing.assert_allclose(
        shared.PlaneOrientationSequence[0].ImageOrientationPatient,
        sources[0].ImageOrientationPatient,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        shared.PixelMeasuresSequence[0].PixelSpacing, sources[0].PixelSpacing, atol=1e-6
    )
    by_position = {tuple(np.round(np.asarray(s.ImagePositionPatient, float), 3)): k
                   for k, s in enumerate(sources)}  # fmt: skip
    frames = ds.PerFrameFunctionalGroupsSequence
    assert len(frames) == len(sources)
    seen = set()
    for index, frame in enumerate(frames):
        position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        k = by_position[tuple(np.round(position, 3))]
        seen.add(k)
        np.testing.assert_allclose(ds.pixel_array.reshape(len(frames), *truth.shape[1:])[index],
                                   truth[k], rtol=2**-23, atol=0)  # fmt: skip
    assert seen == set(range(len(sources)))
    # highdicom: the volume, with the real-world mapping applied, and its affine (LPS)
    volume = hd.pm.ParametricMap.from_dataset(ds).get_volume(apply_real_world_transform=True)
    inverse = np.linalg.inv(volume.affine)
    for k, source in enumerate(sources):
        s, r, c = (inverse @ [*np.asarray(source.ImagePositionPatient, float), 1])[:3]
        np.testing.assert_allclose([r, c], [0, 0], atol=1e-4)
        s = round(s)
        np.testing.assert_allclose(volume.array[s], truth[k], rtol=2**-23, atol=0)
        for row, column in [(0, 0), (truth.shape[1] - 1, 3), (5, truth.shape[2] - 1)]:
            np.testing.assert_allclose(
                (volume.affine @ [s, row, column, 1])[:3], _lps(source, row, column), atol=1e-4
            )


def test_parametric_map_round_trip(multislice, tmp_path):
    header, t1 = multislice
    path = export.to_parametric_map(t1, header, tmp_path / "pm" / "t1.dcm")
    assert path == tmp_path / "pm" / "t1.dcm"
    _check_parametric_map(path, header, t1)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    quantity = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    concept = quantity.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (concept.CodeValue, concept.CodeMeaning) == ("113063", "T1")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.to_parametric_map(t1, header, path)
    export.to_parametric_map(t1 * 2, header, path, overwrite=True)
    assert pydicom.dcmread(path).pixel_array.max() == pytest.approx(2000 * float(t1.max()))


def test_parametric_map_refusals(multislice, tmp_path):
    header, t1 = multislice
    with pytest.raises(ValueError, match="unit 'msec'"):
        export.to_parametric_map(t1, header, tmp_path / "x.dcm", unit="msec")
    with pytest.raises(ValueError, match="name"):
        export.to_parametric_map(t1, header, tmp_path / "x.dcm", name="../T1")
    with pytest.raises(IsADirectoryError):
        export.to_parametric_map(t1, header, tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        export.to_parametric_map(t1 * float("nan"), header, tmp_path / "x.dcm")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def multi_frame(multislice, tmp_path_factory):
    """The oblique 3-slice series as one enhanced multi-frame MR file (highdicom's legacy
    converter), loaded: its header, and the single-frame header it must agree with."""
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    header, _ = multislice
    files = [p for contrast in header.files for p in contrast]
    converted = LegacyConvertedEnhancedMRImage(
        [pydicom.dcmread(p) for p in files],
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    path = tmp_path_factory.mktemp("multi_frame") / "enhanced.dcm"
    converted.save_as(path)
    _, mf_header = dicom.load_series([path])
    assert mf_header.frames[0][0] is not None and len(mf_header.files[0]) == 3
    return mf_header


def test_multi_frame_geometry_comes_from_the_functional_groups(multislice, multi_frame, tmp_path):
    header, t1 = multislice
    np.testing.assert_allclose(export.dicom_affine(multi_frame), export.dicom_affine(header),
                               atol=1e-5)  # fmt: skip
    image = nib.load(export.to_nifti(t1, multi_frame, tmp_path / "t1.nii.gz"))
    for k, path in enumerate(header.files[0]):  # against the single-frame files' positions
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        np.testing.assert_allclose((image.affine @ [7, 11, k, 1])[:3], _ras(ds, 11, 7), atol=1e-4)
    pm = export.to_parametric_map(t1, multi_frame, tmp_path / "pm.dcm")
    _check_parametric_map(pm, header, t1)  # the geometry of the single-frame series
    source = pydicom.dcmread(multi_frame.files[0][0], stop_before_pixels=True)
    referenced = pydicom.dcmread(pm, stop_before_pixels=True).ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    with pytest.raises(ValueError, match="multi-frame.*to_parametric_map"):
        export.to_dicom(t1, multi_frame, tmp_path / "dcm")


def test_the_robust_top_holds_for_a_map_of_few_voxels(multislice, tmp_path):
    header, t1 = multislice
    sparse = torch.zeros_like(t1)
    sparse[0, 5, 5:25] = torch.linspace(0.1, 2.0, 20)  # 20 fitted voxels, s
    sparse[2, 40, 30] = 1e6
    with pytest.warns(export.ExportWarning, match=r"1 voxel .*clipped"):
        back = _read_back(export.to_dicom(sparse, header, tmp_path / "dcm"))
    kept = sparse[0, 5, 5:25].double().numpy() * 1000
    np.testing.assert_allclose(back[0, 5, 5:25], kept, rtol=1e-3)
    assert (back[sparse.numpy() == 0] == 0).all()
