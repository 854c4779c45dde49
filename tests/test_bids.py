"""BIDS qMRI derivatives: the files, their sidecars, and the BIDS validator (offline) on them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from qmri_helpers import bids, dicom, export, fitting, models, nifti, phantom

ALGORITHM = "fit_lm: VarPro grid start + Levenberg-Marquardt"


def _validator() -> str:
    found = shutil.which("bids-validator-deno") or Path(sys.executable).with_name(
        "bids-validator-deno"
    )
    assert Path(found).exists(), "bids-validator-deno is missing: pip install -e '.[test]'"
    return str(found)


def _validate(folder: Path, config: dict | None, tmp_path: Path) -> list[dict]:
    """The validator's issues of error severity (it runs offline: Deno and the schema ship)."""
    command = [_validator(), str(folder), "--format", "json"]
    if config is not None:
        (tmp_path / "validator.json").write_text(json.dumps(config))
        command += ["--config", str(tmp_path / "validator.json")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip(), run.stderr
    issues = json.loads(run.stdout)["issues"]["issues"]
    return [i for i in issues if i["severity"] == "error"]


def _check_validates(derivative: Path, tmp_path: Path) -> None:
    """No errors, with the one documented schema conflict turned into a warning."""
    errors = _validate(derivative, bids.VALIDATOR_CONFIG, tmp_path)
    assert errors == [], errors
    plain = _validate(derivative, None, tmp_path)  # what that config changes, and nothing else
    assert {(e["code"], e.get("subCode")) for e in plain} <= {
        ("JSON_SCHEMA_VALIDATION_ERROR", "InversionTime")
    }


def _source_files(derivative: Path, sidecar: dict) -> list[Path]:
    """Resolve the sidecar's BIDS URIs through the description's DatasetLinks."""
    links = json.loads((derivative / "dataset_description.json").read_text())["DatasetLinks"]
    files = []
    for uri in sidecar["Sources"]:
        scheme, link, relative = uri.split(":", 2)
        assert scheme == "bids"
        target = links[link]
        base = Path(unquote(urlparse(target).path)) if target.startswith("file:") else (
            derivative / target
        )  # fmt: skip
        files.append((base / relative).resolve())
    return files


@pytest.fixture(scope="module")
def ir_root(tmp_path_factory):
    """A BIDS root whose sourcedata/ holds the IR phantom's DICOMs, and the fit."""
    root = tmp_path_factory.mktemp("bids")
    source = root / "sourcedata" / "ir"
    truth = phantom.write_ir_phantom(source, shape=(64, 64))
    images, header = dicom.load_series(source)
    result = fitting.fit_lm(models.ir_seed_model(header.ti), images)
    return root, header, result, truth


def test_phantom_derivative_has_the_bids_layout_and_values(ir_root, tmp_path):
    root, header, result, truth = ir_root
    written = export.to_bids(
        result.params, header, root, subject="phantom", algorithm=ALGORITHM, rates=("R1map",)
    )
    anat = root / "derivatives" / "qmri-tutorials" / "sub-phantom" / "anat"
    assert written == {
        "M0map": anat / "sub-phantom_M0map.nii.gz",
        "T1map": anat / "sub-phantom_T1map.nii.gz",
        "R1map": anat / "sub-phantom_R1map.nii.gz",
    }
    t1 = result.params["t1"].numpy()
    t1_back = np.asarray(nib.load(written["T1map"]).dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(t1_back, t1)
    r1_back = np.asarray(nib.load(written["R1map"]).dataobj).transpose(2, 1, 0)
    fitted = t1 > 0
    np.testing.assert_allclose(r1_back[fitted], 1 / t1[fitted], rtol=1e-6)
    assert (r1_back[~fitted] == 0).all()
    vials = (truth.labels >= 1) & (truth.labels <= 14)  # R1 against the phantom's truth
    r1_truth = 1 / truth.t1[vials]
    assert np.median(np.abs(r1_back[vials] / r1_truth - 1)) < 0.02
    # the geometry: voxel (0, 0, 0) is the first pixel of the first slice (RAS = -LPS x, y)
    first = pydicom.dcmread(header.files[0][0], stop_before_pixels=True)
    origin = nib.load(written["T1map"]).affine @ [0, 0, 0, 1]
    np.testing.assert_allclose(origin[:3], np.asarray(first.ImagePositionPatient) * [-1, -1, 1])

    derivative = root / "derivatives" / "qmri-tutorials"
    description = json.loads((derivative / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "qmri-tutorials"
    sidecar = json.loads((anat / "sub-phantom_T1map.json").read_text())
    assert sidecar["Units"] == "s" and sidecar["EstimationAlgorithm"] == ALGORITHM
    assert sidecar["EstimationReference"]
    assert sidecar["InversionTime"] == pytest.approx(list(phantom.DEFAULT_TI), abs=1e-6)
    assert sidecar["RepetitionTime"] == 15 and sidecar["EchoTime"] == pytest.approx(0.012)
    assert sidecar["MagneticFieldStrength"] == 3
    sources = _source_files(derivative, sidecar)
    assert sorted(sources) == sorted((root / "sourcedata" / "ir").iterdir())
    times = [float(pydicom.dcmread(p, stop_before_pixels=True).InversionTime) for p in sources]
    assert times == pytest.approx([t * 1000 for t in sidecar["InversionTime"]])  # same order
    units = {s: json.loads((anat / f"sub-phantom_{s}.json").read_text())["Units"] for s in written}
    assert units == {"T1map": "s", "R1map": "1/s", "M0map": "arbitrary"}
    _check_validates(derivative, tmp_path)


def test_maps_are_not_overwritten_unless_asked(ir_root, tmp_path):
    root, header, result, _ = ir_root
    maps = {"T1map": result.params["t1"]}
    path = export.to_bids(maps, header, root, "again", "1", algorithm=ALGORITHM)["T1map"]
    assert path.name == "sub-again_ses-1_T1map.nii.gz" and path.parent.parent.name == "ses-1"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.to_bids(maps, header, root, "again", "1", algorithm=ALGORITHM)
    export.to_bids({"t1": result.params["t1"] * 2}, header, root, "again", "1",
                   algorithm=ALGORITHM, overwrite=True)  # fmt: skip
    back = np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(back, result.params["t1"].numpy() * 2)
    _check_validates(root / "derivatives" / "qmri-tutorials", tmp_path)


def test_bad_requests_are_refused(ir_root, tmp_path):
    root, header, result, _ = ir_root
    t1 = result.params["t1"]
    with pytest.raises(ValueError, match="sub label 'sub-01'"):
        export.to_bids({"t1": t1}, header, tmp_path, "sub-01", algorithm=ALGORITHM)
    with pytest.raises(ValueError, match="ses label '../x'"):
        export.to_bids({"t1": t1}, header, tmp_path, "01", "../x", algorithm=ALGORITHM)
    with pytest.raises(ValueError, match="'t2' has no BIDS name"):
        export.to_bids({"t2": t1}, header, tmp_path, "01", algorithm=ALGORITHM)
    with pytest.raises(ValueError, match="R2starmap is 1/T2starmap"):
        export.to_bids({"t1": t1}, header, tmp_path, "01", algorithm=ALGORITHM,
                       rates=("R2starmap",))  # fmt: skip
    with pytest.raises(ValueError, match="NaN"):
        export.to_bids({"t1": t1 * torch.nan}, header, tmp_path, "01", algorithm=ALGORITHM)
    assert list(tmp_path.iterdir()) == []
    foreign = tmp_path / "derivatives" / "qmri-tutorials"
    foreign.mkdir(parents=True)
    (foreign / "dataset_description.json").write_text(
        json.dumps({"Name": "x", "BIDSVersion": "1.10.0", "GeneratedBy": [{"Name": "other"}]})
    )
    with pytest.raises(FileExistsError, match="not written by qmri-tutorials"):
        export.to_bids({"t1": t1}, header, tmp_path, "01", algorithm=ALGORITHM)
    (foreign / "dataset_description.json").write_text("{")
    with pytest.raises(ValueError, match="dataset_description.json is not valid JSON"):
        export.to_bids({"t1": t1}, header, tmp_path, "01", algorithm=ALGORITHM)
    assert [p.name for p in foreign.iterdir()] == ["dataset_description.json"]


def test_hazen_philips_t1_derivative_validates(hazen, tmp_path):
    images, header = dicom.load_series(hazen / "T1/site4_philips/plate5")
    result = fitting.fit_lm(models.ir_three_parameter_model(header.ti), images)
    root = tmp_path / "bids"
    assert set(result.params) > {"t1"}  # a and b of |a + b exp(-TI/T1)| have no BIDS name
    written = export.to_bids(
        {"t1": result.params["t1"]}, header, root, subject="site4", session="philips",
        algorithm="fit_lm: |a + b exp(-TI/T1)|", rates=("R1map",),
    )  # fmt: skip
    derivative = root / "derivatives" / "qmri-tutorials"
    sidecar = json.loads(written["T1map"].with_name("sub-site4_ses-philips_T1map.json").read_text())
    assert sidecar["InversionTime"] == pytest.approx(header.ti.tolist(), abs=1e-6)
    assert sidecar["Manufacturer"].upper().startswith("PHILIPS")
    assert sorted(_source_files(derivative, sidecar)) == sorted(
        p.resolve() for contrast in header.files for p in contrast
    )
    _check_validates(derivative, tmp_path)


def test_kidney_nifti_r2star_derivative_validates_and_matches_the_scanner(kidney, tmp_path):
    images, header = nifti.load_nifti_series(kidney, pattern="00024__*_e*.nii.gz")
    result = fitting.fit_lm(models.mono_exp_model(header.te), images)
    root = tmp_path / "bids"
    written = export.to_bids(
        result.params, header, root, subject="kidney", algorithm="fit_lm: M0 exp(-TE/T2*)",
        rates=("R2starmap",),
    )  # fmt: skip
    image = nib.load(written["R2starmap"])
    np.testing.assert_allclose(image.affine, header.affine, atol=1e-5)
    r2star = np.asarray(image.dataobj).transpose(2, 1, 0)
    scanner, _ = nifti.load_nifti(kidney / "00027__R2Star_Images.nii.gz")
    roi = (2, slice(55, 75), slice(40, 55))  # the left kidney (the data's README)
    ratio = np.median(r2star[roi]) / float(scanner[roi].median())
    assert abs(ratio - 1) < 0.10, ratio
    sidecar = json.loads(written["T2starmap"].with_name("sub-kidney_T2starmap.json").read_text())
    assert sidecar["EchoTime"] == pytest.approx(header.te.tolist(), abs=1e-6)
    assert sidecar["Units"] == "s" and sidecar["MagneticFieldStrength"] == 3
    derivative = root / "derivatives" / "qmri-tutorials"
    assert _source_files(derivative, sidecar) == [p.resolve() for p in header.files]
    assert _validate(derivative, None, tmp_path) == []  # no TI here: the plain validator passes


def test_a_multi_frame_source_is_named_once(ir_root, tmp_path):
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    root, header, result, _ = ir_root
    files = [p for contrast in header.files for p in contrast]
    converted = LegacyConvertedEnhancedMRImage(
        [pydicom.dcmread(p) for p in files], series_instance_uid=hd.UID(), series_number=99,
        sop_instance_uid=hd.UID(), instance_number=1,
    )  # fmt: skip
    converted.save_as(tmp_path / "enhanced.dcm")
    _, mf_header = dicom.load_series([tmp_path / "enhanced.dcm"])
    bids_root = tmp_path / "bids"
    written = export.to_bids({"t1": result.params["t1"]}, mf_header, bids_root, "mf",
                             algorithm=ALGORITHM)  # fmt: skip
    sidecar = json.loads(written["T1map"].with_name("sub-mf_T1map.json").read_text())
    derivative = bids_root / "derivatives" / "qmri-tutorials"
    assert _source_files(derivative, sidecar) == [(tmp_path / "enhanced.dcm").resolve()]
    assert sidecar["InversionTime"] == pytest.approx(list(phantom.DEFAULT_TI), abs=1e-6)
    image = nib.load(written["T1map"])
    np.testing.assert_allclose(image.affine, export.dicom_affine(header), atol=1e-5)
    _check_validates(derivative, tmp_path)
