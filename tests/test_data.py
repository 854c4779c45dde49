"""The download path, exercised offline with a stand-in for zenodo_get.download."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import zenodo_get

from qmri_helpers import data, dicom, phantom


def _zip_of_series(folder: Path) -> bytes:
    """A zip laid out like the challenge's: one folder of DICOM files."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"T1 IR/{path.name}")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def zip_bytes(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("series")
    phantom.write_ir_phantom(folder, shape=(32, 32))
    return _zip_of_series(folder)


@pytest.fixture
def entry(zip_bytes) -> data.ZenodoFile:
    return data.ZenodoFile("123456", "T1 IR.zip", hashlib.md5(zip_bytes).hexdigest())


class StandIn:
    """Replaces zenodo_get.download: writes ``payload`` as the requested file, or fails."""

    def __init__(self, payload: bytes | None = None, error: Exception | None = None):
        self.payload, self.error, self.calls = payload, error, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error
        (Path(kwargs["output_dir"]) / kwargs["file_glob"]).write_bytes(self.payload)


@pytest.fixture
def stand_in(monkeypatch, zip_bytes):
    fake = StandIn(zip_bytes)
    monkeypatch.setattr(zenodo_get, "download", fake)
    return fake


def test_registry_has_the_challenge_records():
    assert data.REGISTRY["t1_ir"].record == "10868350"
    assert data.REGISTRY["t1_ir"].filename == "T1 IR.zip"
    assert data.REGISTRY["t1_ir"].md5 == "ccd5f719680c4b5396ec5fb0932f66e1"
    assert data.REGISTRY["t2star"].record == "10868361"
    assert data.REGISTRY["t2star"].md5 == "f387357a0b4024ca62e979203eff9def"


def test_cache_dir_follows_env_and_defaults_to_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("QMRI_DATA_DIR", str(tmp_path))
    assert data.cache_dir() == tmp_path
    monkeypatch.delenv("QMRI_DATA_DIR")
    default = data.cache_dir()
    assert "qmri-tutorials" in str(default)
    assert not str(default).startswith("/tmp")


def test_first_run_downloads_verifies_and_unzips(stand_in, entry, tmp_path, monkeypatch):
    monkeypatch.setenv("ZENODO_TOKEN", "secret-token")
    folder = data.fetch(entry, cache=tmp_path, retries=3)
    assert len(stand_in.calls) == 1
    call = stand_in.calls[0]
    assert call["record"] == "123456"
    assert call["file_glob"] == "T1 IR.zip"
    assert call["retry_attempts"] == 3
    assert call["access_token"] == "secret-token"
    assert folder == tmp_path / "zenodo-123456" / "T1 IR"
    assert (tmp_path / "zenodo-123456" / "T1 IR.zip").read_bytes() == stand_in.payload
    images, header = dicom.load_series(folder)
    assert images.shape == (10, 1, 32, 32)
    assert header.ti.tolist() == pytest.approx(phantom.DEFAULT_TI)


def test_second_run_uses_the_cache_without_calling_zenodo(stand_in, entry, tmp_path):
    first = data.fetch(entry, cache=tmp_path)
    second = data.fetch(entry, cache=tmp_path)
    assert first == second
    assert len(stand_in.calls) == 1


def test_corrupt_cached_zip_is_downloaded_again(stand_in, entry, tmp_path):
    data.fetch(entry, cache=tmp_path)
    cached = tmp_path / "zenodo-123456" / "T1 IR.zip"
    cached.write_bytes(b"truncated download")
    folder = data.fetch(entry, cache=tmp_path)
    assert len(stand_in.calls) == 2
    assert cached.read_bytes() == stand_in.payload
    assert dicom.load_series(folder)[0].shape[0] == 10


def test_md5_mismatch_after_download_is_an_error_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(zenodo_get, "download", StandIn(b"not the published file"))
    entry = data.ZenodoFile("123456", "T1 IR.zip", "0" * 32)
    with pytest.raises(data.DataIntegrityError, match="checksum mismatch.*T1 IR.zip.*123456"):
        data.fetch(entry, cache=tmp_path)
    left = [p for p in (tmp_path / "zenodo-123456").rglob("*")]
    assert left == []


def test_no_network_is_a_clear_error(monkeypatch, entry, tmp_path):
    offline = StandIn(error=ConnectionError("Name or service not known"))
    monkeypatch.setattr(zenodo_get, "download", offline)
    with pytest.raises(data.DataUnavailableError, match="no network.*QMRI_DATA=sample"):
        data.fetch(entry, cache=tmp_path)
    assert list((tmp_path / "zenodo-123456").iterdir()) == []


def test_corrupt_zip_is_a_clear_error(monkeypatch, tmp_path):
    garbage = b"PK\x03\x04 this is not really a zip"
    monkeypatch.setattr(zenodo_get, "download", StandIn(garbage))
    entry = data.ZenodoFile("42", "broken.zip", hashlib.md5(garbage).hexdigest())
    with pytest.raises(data.DataIntegrityError, match=r"broken\.zip: corrupt zip"):
        data.fetch(entry, cache=tmp_path)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown data set 't3'"):
        data.fetch("t3")


def test_real_zenodo_get_fails_fast_and_clearly_offline(tmp_path):
    """The real zenodo_get, with no network here: a DataUnavailableError, not a traceback."""
    entry = data.ZenodoFile("10868350", "T1 IR.zip", data.REGISTRY["t1_ir"].md5)
    try:
        data.fetch(entry, cache=tmp_path, retries=0)
    except data.DataUnavailableError as err:
        assert "10868350" in str(err)
    else:  # pragma: no cover - only with a network
        assert (tmp_path / "zenodo-10868350" / "T1 IR").is_dir()


def test_auto_mode_falls_back_to_the_phantom_with_a_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(zenodo_get, "download", StandIn(error=ConnectionError("offline")))
    result = data.load_tutorial_data("t1_ir", cache=tmp_path)
    assert result.source == "phantom"
    assert result.truth is not None
    assert "Falling back to the embedded phantom" in capsys.readouterr().out
    images, header = dicom.load_series(result.folder)
    assert images.shape[1:] == result.truth.t1.shape


def test_auto_mode_uses_zenodo_when_it_answers(stand_in, entry, monkeypatch, tmp_path):
    monkeypatch.setitem(data.REGISTRY, "t1_ir", entry)
    result = data.load_tutorial_data("t1_ir", cache=tmp_path)
    assert result.source == "zenodo"
    assert result.truth is None
    assert "Zenodo record 123456" in result.description


def test_forced_modes(monkeypatch, tmp_path):
    offline = StandIn(error=ConnectionError("offline"))
    monkeypatch.setattr(zenodo_get, "download", offline)
    monkeypatch.setenv("QMRI_DATA", "zenodo")
    with pytest.raises(data.DataUnavailableError):
        data.load_tutorial_data("t1_ir", cache=tmp_path)
    monkeypatch.setenv("QMRI_DATA", "sample")
    calls = len(offline.calls)
    assert data.load_tutorial_data("t2star", cache=tmp_path).source == "phantom"
    assert len(offline.calls) == calls  # sample never calls the network
    monkeypatch.setenv("QMRI_DATA", "internet")
    with pytest.raises(ValueError, match="'auto', 'zenodo' or 'sample'"):
        data.load_tutorial_data("t1_ir", cache=tmp_path)


def test_import_of_zenodo_get_keeps_the_interrupt_handler():
    code = (
        "import signal\n"
        "before = signal.getsignal(signal.SIGINT)\n"
        "from qmri_helpers.data import _import_zenodo_get\n"
        "_import_zenodo_get()\n"
        "assert signal.getsignal(signal.SIGINT) is before, signal.getsignal(signal.SIGINT)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
