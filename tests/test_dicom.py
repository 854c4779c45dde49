"""load_series: sorting by tags, physical values, vendors, and a clear error for bad input."""

from __future__ import annotations

import shutil

import matplotlib
import numpy as np
import pydicom
import pytest
import torch

from qmri_helpers import dicom, phantom, plotting

matplotlib.use("Agg")


def _copy(folder, tmp_path, name="series"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def test_sorted_by_inversion_time_not_by_file_name(ir_phantom):
    folder, truth = ir_phantom
    images, header = dicom.load_series(folder)
    assert images.shape == (10, 1, 128, 128)
    assert images.dtype == torch.float32
    assert header.sorted_by == "InversionTime"
    assert header.ti.tolist() == pytest.approx(phantom.DEFAULT_TI)
    names = [f[0].name for f in header.files]
    assert names != sorted(names)  # the phantom's names are shuffled on purpose
    for ti, files in zip(header.ti, header.files, strict=True):
        assert float(pydicom.dcmread(files[0]).InversionTime) == pytest.approx(ti * 1000)
    assert header.tr.tolist() == pytest.approx([15.0] * 10)
    assert header.te.tolist() == pytest.approx([0.012] * 10)


def test_values_are_rescaled_to_the_simulated_signal(ir_phantom):
    folder, truth = ir_phantom
    images, header = dicom.load_series(folder)
    slope = float(pydicom.dcmread(header.files[0][0]).RescaleSlope)
    assert slope != 1.0
    # At TI = 3 s the fill (T1 = 2.7 s) has recovered to M0 (1 - 2 exp(-3/2.7)).
    fill = truth.labels == 15
    expected = truth.m0[fill] * (1 - 2 * np.exp(-3.0 / 2.7) + np.exp(-15 / 2.7))
    assert images[-1].numpy()[fill].mean() == pytest.approx(expected.mean(), rel=0.01)


def test_a_list_of_files_in_any_order(ir_phantom):
    folder, _ = ir_phantom
    files = sorted(folder.iterdir(), reverse=True)
    images, header = dicom.load_series(files)
    assert header.ti.tolist() == pytest.approx(phantom.DEFAULT_TI)
    assert torch.equal(images, dicom.load_series(folder)[0])


def test_multi_echo_series_is_sorted_by_echo_time(tmp_path):
    truth = phantom.write_multi_echo_phantom(tmp_path, shape=(32, 32))
    images, header = dicom.load_series(tmp_path)
    assert header.sorted_by == "EchoTime"
    assert header.ti is None
    assert header.te.tolist() == pytest.approx(phantom.DEFAULT_TE)
    curve = images[:, 0].numpy()[:, truth.labels[0] == 1].mean(1)
    assert (curve[:-1] > curve[1:]).all()


def test_philips_private_scale_slope_puts_images_on_one_scale(tmp_path, ir_phantom):
    """Philips stores each image with its own RescaleSlope; FP = (SV*RS + RI) / (RS*SS)."""
    folder = _copy(ir_phantom[0], tmp_path)
    reference, header = dicom.load_series(folder)
    for k, files in enumerate(header.files):
        ds = pydicom.dcmread(files[0])
        rs, ss = 0.5 + 0.25 * k, 2.0 + 3 * k
        true = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope)
        new = np.round(true * ss).astype(np.uint16)  # FP = SV / SS when RI = 0
        ds.PixelData = new.tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = rs, 0
        ds.Manufacturer = "Philips Medical Systems"
        ds.add_new((0x2005, 0x100E), "FL", ss)
        ds.save_as(files[0])
    images, _ = dicom.load_series(folder)
    assert torch.allclose(images, reference, atol=0.5)


@pytest.mark.shared
@pytest.mark.parametrize(
    ("folder", "n", "size", "signed"),
    [
        ("T1/site1_20200218/plate5", 6, 192, False),
        ("T1/site2_20180925/plate5", 6, 192, True),
        ("T1/site3_ge/plate4", 6, 256, False),
        ("T1/site3_ge/plate5", 6, 256, False),
        ("T1/site4_philips/plate4", 6, 192, False),
        ("T1/site4_philips/plate5", 6, 192, False),
        ("T2/site3_ge/plate5", 8, 256, False),
        ("T2/site5_philips_3T/plate5", 32, 192, False),
    ],
)
def test_every_hazen_folder_loads(hazen, folder, n, size, signed):
    images, header = dicom.load_series(hazen / folder)
    assert images.shape == (n, 1, size, size)
    assert torch.isfinite(images).all()
    assert header.signed == signed
    if folder.startswith("T1"):
        assert header.ti.tolist() == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.6, 0.8])
        assert header.te[0] in (pytest.approx(0.010), pytest.approx(0.012))
    else:
        assert (header.te.diff() > 0).all()
        assert header.te[0] == pytest.approx(0.00964 if "ge" in folder else 0.008, rel=1e-3)
    if folder.startswith("T1/site1") or folder.startswith("T1/site2"):
        assert header.tr.tolist() == pytest.approx([1.0, 1.0, 1.0, 1.26, 1.86, 2.46])
    if signed:
        assert images.min() < -1000  # real-valued IR: the short-TI images are negative


@pytest.mark.shared
def test_ge_folder_with_both_plates_gives_two_slices(hazen):
    images, header = dicom.load_series(hazen / "T1/site3_ge")
    assert images.shape == (6, 2, 256, 256)


@pytest.mark.shared
def test_philips_files_get_the_floating_point_value(hazen):
    """Each site-4 image has its own RescaleSlope (1.22, 1.33, 1.85, ...) and private scale
    slope; the loader returns FP = (SV * RS + RI) / (RS * SS) for every one of them."""
    images, header = dicom.load_series(hazen / "T1/site4_philips/plate5")
    slopes = set()
    for image, files in zip(images, header.files, strict=True):
        ds = pydicom.dcmread(files[0])
        rs, ri = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        ss = float(ds[0x2005, 0x100E].value)
        expected = (ds.pixel_array * rs + ri) / (rs * ss)
        np.testing.assert_allclose(image[0].numpy(), expected, rtol=1e-5)
        slopes.add(round(rs * ss, 4))
    assert len(slopes) == 6  # without SS the six images would be on six different scales


@pytest.mark.shared
@pytest.mark.parametrize("site", ["T1/site1_20200218/plate5", "T1/site4_philips/plate5"])
def test_hazen_images_in_the_notebook_grid(hazen, site, tmp_path):
    images, header = dicom.load_series(hazen / site)
    fig = plotting.show_series(images, header.ti, label="TI", title=site)
    path = tmp_path / (site.replace("/", "_") + ".png")
    fig.savefig(path, dpi=60)
    assert path.stat().st_size > 10_000
    assert [ax.get_title() for ax in fig.axes[:6]] == [
        f"TI = {t} ms" for t in (50, 100, 200, 400, 600, 800)
    ]


# --- bad input: each gets a clear error that names the file and the problem ------------


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        dicom.load_series(tmp_path / "nowhere")


def test_empty_folder(tmp_path):
    with pytest.raises(dicom.DicomSeriesError, match=f"{tmp_path}: the folder is empty"):
        dicom.load_series(tmp_path)


def test_non_dicom_files(ir_phantom, tmp_path):
    folder = _copy(ir_phantom[0], tmp_path)
    (folder / "notes.txt").write_text("TI list: 50 100 150")
    with pytest.raises(dicom.DicomSeriesError, match=r"1 of 11 files are not DICOM.*notes\.txt"):
        dicom.load_series(folder)


def test_hidden_files_and_macos_folders_are_ignored(ir_phantom, tmp_path):
    folder = _copy(ir_phantom[0], tmp_path)
    (folder / ".DS_Store").write_bytes(b"\0\0")
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._IM_0001.dcm").write_bytes(b"\0\0")
    assert dicom.load_series(folder)[0].shape[0] == 10


def test_missing_inversion_time(ir_phantom, tmp_path):
    folder = _copy(ir_phantom[0], tmp_path)
    victim = folder / "IM_0004.dcm"
    ds = pydicom.dcmread(victim)
    del ds.InversionTime
    ds.save_as(victim)
    with pytest.raises(dicom.DicomSeriesError, match=r"missing InversionTime.*IM_0004\.dcm"):
        dicom.load_series(folder)


def test_two_series_mixed_in_one_folder(ir_phantom, tmp_path):
    folder = _copy(ir_phantom[0], tmp_path)
    other = tmp_path / "other"
    phantom.write_multi_echo_phantom(other, shape=(128, 128))
    for path in other.iterdir():
        shutil.copy(path, folder / f"ME_{path.name}")
    with pytest.raises(dicom.DicomSeriesError, match="two series are mixed in one folder"):
        dicom.load_series(folder)


def test_same_tis_from_two_series_of_one_study(ir_phantom, tmp_path):
    folder = _copy(ir_phantom[0], tmp_path)
    copy = folder / "IM_0003.dcm"
    ds = pydicom.dcmread(copy)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "repeat.dcm")
    with pytest.raises(dicom.DicomSeriesError, match=r"duplicate InversionTime.*two series"):
        dicom.load_series(folder)


def test_unequal_matrix_sizes(ir_phantom, tmp_path):
    folder = _copy(ir_phantom[0], tmp_path)
    small = tmp_path / "small"
    phantom.write_ir_phantom(small, shape=(64, 64), ti=(4.0,))
    ds = pydicom.dcmread(next(small.iterdir()))
    first = pydicom.dcmread(folder / "IM_0001.dcm")
    for key in ("StudyInstanceUID", "FrameOfReferenceUID", "SeriesInstanceUID"):
        setattr(ds, key, getattr(first, key))
    ds.save_as(folder / "IM_0011.dcm")
    with pytest.raises(dicom.DicomSeriesError, match=r"unequal matrix sizes.*64x64 in .*IM_0011"):
        dicom.load_series(folder)


def test_duplicate_inversion_times(ir_phantom, tmp_path):
    folder = _copy(ir_phantom[0], tmp_path)
    ds = pydicom.dcmread(folder / "IM_0002.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "IM_0002_again.dcm")
    with pytest.raises(dicom.DicomSeriesError, match=r"duplicate InversionTime \d+ ms.*IM_0002"):
        dicom.load_series(folder)


def test_incomplete_multi_slice_series(tmp_path):
    images = np.ones((3, 2, 8, 8))
    paths = phantom.write_series(tmp_path, images, ti=(0.1, 0.2, 0.3))
    paths[-1].unlink()
    with pytest.raises(dicom.DicomSeriesError, match="incomplete"):
        dicom.load_series(tmp_path)


def test_empty_file_list():
    with pytest.raises(dicom.DicomSeriesError, match="list of DICOM files is empty"):
        dicom.load_series([])


def test_bad_sort_by(ir_phantom):
    with pytest.raises(ValueError, match="sort_by must be one of"):
        dicom.load_series(ir_phantom[0], sort_by="FlipAngle")


# --- enhanced multi-frame MR: TI/TE/TR per frame from the functional groups --------------


def _legacy_multi_frame(files, path):
    """highdicom's legacy converter: the single-frame files as one multi-frame MR object."""
    highdicom = pytest.importorskip("highdicom")
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    datasets = [pydicom.dcmread(p) for p in files]
    for ds in datasets:
        if ds.get("PatientSex") not in ("M", "F", "O", None):
            ds.PatientSex = "O"  # anonymised GE files say "0", which highdicom refuses
    converted = LegacyConvertedEnhancedMRImage(
        datasets,
        series_instance_uid=highdicom.UID(),
        series_number=99,
        sop_instance_uid=highdicom.UID(),
        instance_number=1,
        include_dimension_index=False,
    )
    converted.save_as(path)
    return path


def _with_mr_timing_sequences(legacy, path):
    """The legacy object rewritten as scanners write it: TR, TE and TI in each frame's MR
    Timing, MR Echo and MR Modifier sequences, none in the "Unassigned" groups."""
    ds = pydicom.dcmread(legacy)
    shared = ds.SharedFunctionalGroupsSequence[0].UnassignedSharedConvertedAttributesSequence[0]
    for frame in ds.PerFrameFunctionalGroupsSequence:
        unassigned = frame.UnassignedPerFrameConvertedAttributesSequence[0]

        def take(name, unassigned=unassigned):
            for source in (unassigned, shared):
                if name in source:
                    value = float(source[name].value)
                    return value
            return None

        timing, echo = pydicom.Dataset(), pydicom.Dataset()
        timing.RepetitionTime = take("RepetitionTime")
        echo.EffectiveEchoTime = take("EchoTime")
        frame.MRTimingAndRelatedParametersSequence = [timing]
        frame.MREchoSequence = [echo]
        ti = take("InversionTime")
        if ti is not None:
            modifier = pydicom.Dataset()
            modifier.InversionRecovery = "YES"
            modifier.InversionTimes = [ti]
            frame.MRModifierSequence = [modifier]
    for frame in ds.PerFrameFunctionalGroupsSequence:
        unassigned = frame.UnassignedPerFrameConvertedAttributesSequence[0]
        for name in ("RepetitionTime", "EchoTime", "InversionTime"):
            if name in unassigned:
                delattr(unassigned, name)
    for name in ("RepetitionTime", "EchoTime", "InversionTime"):
        if name in shared:
            delattr(shared, name)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.EnhancedMRImageStorage
    ds.save_as(path)
    return path


def _assert_same_series(got, expected):
    (images, header), (reference, truth) = got, expected
    assert torch.equal(images, reference)
    for name in ("ti", "te", "tr"):
        value, true = getattr(header, name), getattr(truth, name)
        assert (value is None) == (true is None)
        if true is not None:
            assert torch.equal(value, true), name
    for name in ("sorted_by", "manufacturer", "field_strength", "signed", "pixel_spacing"):
        assert getattr(header, name) == getattr(truth, name), name
    assert header.notes == truth.notes


def test_multi_frame_phantom_with_two_slices_equals_the_single_frame_files(tmp_path):
    rng = np.random.default_rng(1)
    phantom.write_series(
        tmp_path / "single",
        rng.uniform(0, 1000, (4, 2, 16, 16)),
        ti=(0.05, 0.4, 1.2, 3.0),
        tr=(1.0, 1.4, 2.2, 4.0),
    )
    reference = dicom.load_series(tmp_path / "single")
    legacy = _legacy_multi_frame(dicom.list_files(tmp_path / "single"), tmp_path / "mf.dcm")
    got = dicom.load_series([legacy])
    _assert_same_series(got, reference)
    assert got[0].shape == (4, 2, 16, 16)
    assert sorted(f for row in got[1].frames for f in row) == list(range(1, 9))
    timed = _with_mr_timing_sequences(legacy, tmp_path / "enhanced.dcm")
    assert "MRModifierSequence" in pydicom.dcmread(timed).PerFrameFunctionalGroupsSequence[0]
    _assert_same_series(dicom.load_series([timed]), reference)


@pytest.mark.shared
@pytest.mark.parametrize(
    "site",
    [
        "T1/site1_20200218/plate5",  # Siemens, TR changes with TI
        "T1/site2_20180925/plate5",  # signed real-valued images
        "T1/site3_ge/plate5",
        "T1/site4_philips/plate5",  # RescaleSlope and private scale slope per image
        "T2/site5_philips_3T/plate5",  # 32 echoes
    ],
)
def test_hazen_series_as_multi_frame_gives_the_same_tensor_and_header(hazen, site, tmp_path):
    reference = dicom.load_series(hazen / site)
    legacy = _legacy_multi_frame(dicom.list_files(hazen / site), tmp_path / "legacy.dcm")
    assert int(pydicom.dcmread(legacy).NumberOfFrames) == reference[0].shape[0]
    _assert_same_series(dicom.load_series(tmp_path), reference)
    timed = _with_mr_timing_sequences(legacy, tmp_path / "enhanced.dcm")
    _assert_same_series(dicom.load_series([timed]), reference)


def test_multi_echo_multi_frame_with_an_empty_mr_modifier(tmp_path):
    """Scanners write an MR Modifier sequence (InversionRecovery NO) in every frame of a
    gradient echo; its empty InversionTimes must not make the series an IR series."""
    phantom.write_multi_echo_phantom(tmp_path / "single", shape=(16, 16))
    reference = dicom.load_series(tmp_path / "single")
    legacy = _legacy_multi_frame(dicom.list_files(tmp_path / "single"), tmp_path / "mf.dcm")
    timed = _with_mr_timing_sequences(legacy, tmp_path / "enhanced.dcm")
    ds = pydicom.dcmread(timed)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        modifier = pydicom.Dataset()
        modifier.InversionRecovery = "NO"
        modifier.InversionTimes = []
        frame.MRModifierSequence = [modifier]
    ds.save_as(timed)
    images, header = dicom.load_series([timed])
    assert header.sorted_by == "EchoTime" and header.ti is None
    _assert_same_series((images, header), reference)


def test_a_frame_without_inversion_time_is_named(ir_phantom, tmp_path):
    legacy = _legacy_multi_frame(dicom.list_files(ir_phantom[0]), tmp_path / "legacy.dcm")
    timed = _with_mr_timing_sequences(legacy, tmp_path / "enhanced.dcm")
    ds = pydicom.dcmread(timed)
    del ds.PerFrameFunctionalGroupsSequence[2].MRModifierSequence
    ds.save_as(timed)
    with pytest.raises(
        dicom.DicomSeriesError,
        match=r"missing InversionTime: 1 of 10 frames .*enhanced\.dcm frame 3 of 10 "
        r"\(looked in .*MRModifierSequence > InversionTimes",
    ):
        dicom.load_series([timed])


# --- values that are not usable: a clear error naming the file and the value -------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("NaN", "InversionTime is NaN ms, not a finite number"),
        ("inf", "InversionTime is inf ms, not a finite number"),
        ("-50", "InversionTime is -50 ms, a negative time"),
        ("about 50", "InversionTime is 'about 50', not a number"),
    ],
)
def test_bad_inversion_time_names_file_and_value(ir_phantom, tmp_path, value, message):
    folder = _copy(ir_phantom[0], tmp_path)
    victim = folder / "IM_0004.dcm"
    ds = pydicom.dcmread(victim)
    ds.InversionTime = "12345678"  # replaced byte for byte: pydicom refuses to write text
    ds.save_as(victim)
    victim.write_bytes(victim.read_bytes().replace(b"12345678", value.ljust(8).encode()))
    with pytest.raises(dicom.DicomSeriesError, match=rf"IM_0004\.dcm: {message}"):
        dicom.load_series(folder)


@pytest.mark.parametrize("slope", ["0", "NaN", "inf"])
def test_bad_rescale_slope_names_the_file(ir_phantom, tmp_path, slope):
    folder = _copy(ir_phantom[0], tmp_path)
    victim = folder / "IM_0007.dcm"
    ds = pydicom.dcmread(victim)
    with pydicom.config.disable_value_validation():
        ds["RescaleSlope"] = pydicom.DataElement(0x00281053, "DS", slope)
        ds.save_as(victim)
    with pytest.raises(dicom.DicomSeriesError, match=r"IM_0007\.dcm: RescaleSlope is"):
        dicom.load_series(folder)


def test_missing_repetition_time_is_unknown_and_tr_models_refuse(ir_phantom, tmp_path):
    from qmri_helpers import models, phantom_qa

    folder = _copy(ir_phantom[0], tmp_path)
    for path in list(folder.iterdir())[:3]:
        ds = pydicom.dcmread(path)
        del ds.RepetitionTime
        ds.save_as(path)
    images, header = dicom.load_series(folder)
    assert int(torch.isnan(header.tr).sum()) == 3  # unknown, never 0 s
    assert header.tr[torch.isfinite(header.tr)].tolist() == pytest.approx([15.0] * 7)
    assert len(header.notes) == 1
    assert "RepetitionTime unknown (NaN) for 3 of 10 contrasts" in header.notes[0]
    with pytest.raises(ValueError, match="TR is unknown.*ir_three_parameter_model"):
        models.ir_tr_model(header.ti, header.tr)
    with pytest.raises(ValueError, match="TR is unknown"):
        models.ir_hazen_model(header.ti, header.tr)
    # The QA pipeline's choice: one known TR and the rest unknown gives the 3-parameter model,
    # which needs no TR; known TRs that differ need TR, which is refused.
    assert "TR" not in phantom_qa.t1_model_for(header).name
    header.tr[0] = 2.0
    with pytest.raises(ValueError, match="TR is unknown"):
        phantom_qa.t1_model_for(header)


def test_float_pixel_data_is_read(tmp_path):
    paths = phantom.write_series(tmp_path, np.ones((2, 1, 4, 4)), ti=(0.1, 0.2))
    truth = np.arange(16, dtype=np.float32).reshape(4, 4) - 3.5
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        del ds.PixelData, ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
        ds.FloatPixelData = (truth * (k + 1)).tobytes()
        ds.save_as(path)
    images, header = dicom.load_series(tmp_path)
    np.testing.assert_array_equal(images[:, 0].numpy(), np.stack([truth, 2 * truth]))
    assert header.signed


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_file_says_truncated(tmp_path, keep):
    folder = tmp_path / "series"
    images = np.random.default_rng(0).uniform(0, 100, (3, 1, 64, 64))
    paths = phantom.write_series(folder, images, ti=(0.1, 0.2, 0.3))
    whole = paths[1].read_bytes()
    paths[1].write_bytes(whole[: int(len(whole) * keep)])
    with pytest.raises(dicom.DicomSeriesError, match=rf"{paths[1].name}: the file is truncated"):
        dicom.load_series(folder)


def test_truncated_before_the_pixel_data_says_truncated(tmp_path):
    paths = phantom.write_series(tmp_path, np.ones((3, 1, 8, 8)), ti=(0.1, 0.2, 0.3))
    ds = pydicom.dcmread(paths[0])
    ds.SeriesDescription = "x" * 4000  # a long element, cut in its middle
    ds.save_as(paths[0])
    whole = paths[0].read_bytes()
    paths[0].write_bytes(whole[: whole.index(b"x" * 100) + 2000])
    with pytest.raises(
        dicom.DicomSeriesError, match=r"IM_\d+\.dcm: the file is truncated: it ends inside"
    ):
        dicom.load_series(tmp_path)


def test_dicomdir_in_any_case_and_desktop_litter_are_skipped(ir_phantom, tmp_path):
    folder = _copy(ir_phantom[0], tmp_path)
    index = pydicom.dcmread(folder / "IM_0001.dcm")
    del index.PixelData  # a DICOM file without images, as a DICOMDIR is
    index.save_as(folder / "dicomdir")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 thumbnails")
    (folder / "desktop.ini").write_text("[.ShellClassInfo]\n")
    images, header = dicom.load_series(folder)
    assert images.shape[0] == 10
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    listed = [*folder.iterdir()]  # a list of files, as from glob("*") with hidden files
    assert {p.name for p in listed} >= {".DS_Store", "Thumbs.db", "desktop.ini", "dicomdir"}
    assert torch.equal(dicom.load_series(listed)[0], images)
