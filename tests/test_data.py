"""The download path, exercised offline with a stand-in for zenodo_get.download."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
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
    assert data.cache_dir() == tmp_path / "qmri-tutorials"  # a subfolder of its own
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


# --- the cache keeps no broken state ------------------------------------------------------


def _entry_for(payload: bytes, name: str = "T1 IR.zip", **kwargs) -> data.ZenodoFile:
    return data.ZenodoFile("123456", name, hashlib.md5(payload).hexdigest(), **kwargs)


def _bad_crc_in_last_member(zip_bytes: bytes) -> bytes:
    """The zip with one byte of its last member's data changed: its CRC no longer matches."""
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as archive:
        last = archive.infolist()[-1]
    start = last.header_offset + 30 + len(last.filename.encode()) + len(last.extra)
    broken = bytearray(zip_bytes)
    broken[start + last.compress_size // 2] ^= 0xFF
    return bytes(broken)


def _encrypted(zip_bytes: bytes) -> bytes:
    """The zip with the 'encrypted' flag set in every header (zipfile cannot write one)."""
    flagged = bytearray(zip_bytes)
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = flagged.find(signature)
        while start != -1:
            flagged[start + offset] |= 0x01
            start = flagged.find(signature, start + 4)
    return bytes(flagged)


def _left_in(folder: Path) -> list[str]:
    return (
        sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
        if folder.exists()
        else []
    )


def test_a_bad_crc_half_way_leaves_no_folder_and_fails_again(monkeypatch, zip_bytes, tmp_path):
    broken = _bad_crc_in_last_member(zip_bytes)
    monkeypatch.setattr(zenodo_get, "download", StandIn(broken))
    entry = _entry_for(broken)
    for _ in range(2):  # the md5 matches, so the second run uses the cached zip
        with pytest.raises(data.DataIntegrityError, match=r"T1 IR\.zip: corrupt zip.*CRC"):
            data.fetch(entry, cache=tmp_path)
        assert not (tmp_path / "zenodo-123456" / "T1 IR").exists()
        assert _left_in(tmp_path) == []  # no half-unzipped folder, no bad zip


def test_an_interrupted_unzip_is_never_used(stand_in, entry, monkeypatch, tmp_path):
    real_extract = zipfile.ZipFile.extract
    calls = []

    def disk_full_on_the_fifth(self, member, path=None, pwd=None):
        calls.append(member)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real_extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", disk_full_on_the_fifth)
    with pytest.raises(OSError, match=r"could not unzip.*No space left.*QMRI_DATA_DIR"):
        data.fetch(entry, cache=tmp_path)
    assert _left_in(tmp_path / "zenodo-123456") == ["T1 IR.zip"]  # the verified zip only
    monkeypatch.setattr(zipfile.ZipFile, "extract", real_extract)
    folder = data.fetch(entry, cache=tmp_path)
    assert len(stand_in.calls) == 1
    assert dicom.load_series(folder)[0].shape == (10, 1, 32, 32)


def test_a_folder_that_does_not_match_its_members_is_unzipped_again(stand_in, entry, tmp_path):
    folder = data.fetch(entry, cache=tmp_path)
    victim = sorted(folder.rglob("*.dcm"))[-1]
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])  # as an older version left a killed unzip
    assert data.fetch(entry, cache=tmp_path) == folder
    assert victim.read_bytes() == whole
    assert len(stand_in.calls) == 1
    (folder / ".qmri-unzipped.json").unlink()  # a folder an older version unzipped
    victim.unlink()
    data.fetch(entry, cache=tmp_path)
    assert victim.read_bytes() == whole


def test_encrypted_zip_is_an_integrity_error_and_leaves_nothing(monkeypatch, zip_bytes, tmp_path):
    locked = _encrypted(zip_bytes)
    with zipfile.ZipFile(io.BytesIO(locked)) as archive, pytest.raises(RuntimeError):
        archive.read(archive.infolist()[0])  # what zipfile says: a raw RuntimeError
    monkeypatch.setattr(zenodo_get, "download", StandIn(locked))
    with pytest.raises(data.DataIntegrityError, match=r"T1 IR\.zip: the zip is encrypted"):
        data.fetch(_entry_for(locked), cache=tmp_path)
    assert _left_in(tmp_path) == []


def test_no_member_larger_than_the_registry_says(monkeypatch, zip_bytes, tmp_path):
    monkeypatch.setattr(zenodo_get, "download", StandIn(zip_bytes))
    member = max(i.file_size for i in zipfile.ZipFile(io.BytesIO(zip_bytes)).infolist())
    small = _entry_for(zip_bytes, unzipped_kb=member / 1000 - 0.1)
    with pytest.raises(data.DataIntegrityError, match=r"more than the registry says"):
        data.fetch(small, cache=tmp_path)
    assert _left_in(tmp_path) == []
    total = sum(i.file_size for i in zipfile.ZipFile(io.BytesIO(zip_bytes)).infolist())
    exact = _entry_for(zip_bytes, unzipped_kb=total / 1000)
    assert dicom.load_series(data.fetch(exact, cache=tmp_path))[0].shape[0] == 10


def test_a_zip_bomb_is_refused_without_unzipping(monkeypatch, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("T1 IR/IM_0001.dcm", b"\0" * 50_000_000)
    bomb = buffer.getvalue()
    assert len(bomb) < 100_000
    monkeypatch.setattr(zenodo_get, "download", StandIn(bomb))
    with pytest.raises(data.DataIntegrityError, match=r"would unzip to 50000000 bytes"):
        data.fetch(_entry_for(bomb), cache=tmp_path)
    assert _left_in(tmp_path) == []


def test_a_killed_download_leaves_nothing_after_the_next_run(zip_bytes, entry, tmp_path):
    """A real SIGKILL during the download; the next run removes what it left and succeeds."""
    started = tmp_path / "started"
    child = (
        "import sys, time, pathlib, zenodo_get\n"
        "from qmri_helpers import data\n"
        "def slow(**kw):\n"
        "    out = pathlib.Path(kw['output_dir']) / kw['file_glob']\n"
        "    out.write_bytes(b'PK half a zip')\n"
        f"    pathlib.Path({str(started)!r}).touch()\n"
        "    time.sleep(60)\n"
        "zenodo_get.download = slow\n"
        f"entry = data.ZenodoFile('123456', 'T1 IR.zip', {entry.md5!r})\n"
        f"data.fetch(entry, cache={str(tmp_path)!r})\n"
    )
    process = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the child never started its download"
    finally:
        process.kill()
        process.wait()
    record = tmp_path / "zenodo-123456"
    left = _left_in(record)
    assert any(name.startswith(".zenodo-") for name in left)  # what the kill left behind
    assert any(name.startswith("tmp") for name in left)  # pooch's empty download file
    old = record / ".zenodo-abc123"  # an older version's folder, without a process id
    old.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    fake = StandIn(zip_bytes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zenodo_get, "download", fake)
        folder = data.fetch(entry, cache=tmp_path)
    assert sorted(p.name for p in record.iterdir()) == ["T1 IR", "T1 IR.zip"]
    assert dicom.load_series(folder)[0].shape == (10, 1, 32, 32)


def test_stale_entries_of_a_live_process_are_kept(tmp_path):
    mine = tmp_path / f".zenodo-{os.getpid()}-x"
    mine.mkdir()
    fresh = tmp_path / ".zenodo-abc"  # no process id, but recent: maybe another download
    fresh.mkdir()
    user = tmp_path / "tmp_notes.txt"
    user.write_text("not empty")
    assert data._clean_stale(tmp_path) == []
    assert mine.exists() and fresh.exists() and user.exists()


# --- the phantom is swapped in; what the package did not write is never deleted ----------


def test_sample_mode_never_deletes_files_it_did_not_write(tmp_path, capsys):
    folder = tmp_path / "phantom" / "t1_ir"
    folder.mkdir(parents=True)
    (folder / "my_scan.dcm").write_text("the user's own file")
    result = data.load_tutorial_data("t1_ir", mode="sample", cache=tmp_path)
    assert result.folder == folder
    moved = [p for p in (tmp_path / "phantom").iterdir() if p.name.startswith("t1_ir.moved-")]
    assert len(moved) == 1
    assert (moved[0] / "my_scan.dcm").read_text() == "the user's own file"
    assert "moved them to" in capsys.readouterr().out
    images, header = dicom.load_series(result.folder)
    assert images.shape[0] == 10


def test_sample_mode_replaces_its_own_phantom_in_place(tmp_path):
    first = data.load_tutorial_data("t1_ir", mode="sample", cache=tmp_path)
    files = _left_in(first.folder)
    second = data.load_tutorial_data("t1_ir", mode="sample", cache=tmp_path)
    assert second.folder == first.folder
    assert _left_in(second.folder) == files
    assert sorted(p.name for p in (tmp_path / "phantom").iterdir()) == ["t1_ir"]


def test_sample_mode_recognises_a_phantom_an_older_version_wrote(tmp_path):
    folder = tmp_path / "phantom" / "t2star"
    phantom.write_multi_echo_phantom(folder)  # as the old code wrote it: no marker
    data.load_tutorial_data("t2star", mode="sample", cache=tmp_path)
    assert sorted(p.name for p in (tmp_path / "phantom").iterdir()) == ["t2star"]


def test_data_dir_tilde_is_expanded_and_the_package_keeps_to_its_subfolder(monkeypatch, tmp_path):
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("QMRI_DATA_DIR", "~")
    assert data.cache_dir() == home / "qmri-tutorials"
    result = data.load_tutorial_data("t1_ir", mode="sample")
    assert result.folder == home / "qmri-tutorials" / "phantom" / "t1_ir"
    assert sorted(p.name for p in home.iterdir()) == ["Documents", "qmri-tutorials"]
