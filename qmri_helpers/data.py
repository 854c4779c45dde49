"""Tutorial data: the ISMRM 2024 QMRI challenge records on Zenodo, cached and verified.

``fetch`` downloads a record's zip with ``zenodo_get`` into a per-user cache through
``pooch.retrieve``, which checks the md5 of a cached zip before it calls the network and
downloads to a temporary file that is renamed only once its md5 matches. The zip is then
unpacked into a temporary folder, renamed into place only when every member is complete
(each member's CRC checked, none larger than the record), with a marker of the members'
sizes and CRCs; a folder that does not match its marker is unpacked again. Temporary files
that a killed download or unzip left behind are removed on the next run.
``load_tutorial_data`` picks the data a notebook runs on: the challenge data, or, with no
network, the synthetic phantom of :mod:`qmri_helpers.phantom`, written as DICOM files into a
fresh folder that is swapped in; a folder holding files the package did not write is moved
aside, never deleted.

Environment variables
---------------------
QMRI_DATA_DIR
    Folder that holds the cache, ``$QMRI_DATA_DIR/qmri-tutorials`` (``~`` expanded); default:
    the per-user cache, e.g. ``~/.cache/qmri-tutorials``.
QMRI_DATA
    ``auto`` (default: Zenodo, else the phantom), ``zenodo`` or ``sample`` (the phantom).
ZENODO_TOKEN
    Access token passed to zenodo_get, for restricted records or higher rate limits.
QMRI_SHARED_DATA
    Folder of the real scans the optional sections read (default: ``../shared/data`` beside
    this checkout).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pooch
import pydicom

from . import phantom as _phantom

__all__ = [
    "REGISTRY",
    "ZenodoFile",
    "DataUnavailableError",
    "DataIntegrityError",
    "TutorialData",
    "cache_dir",
    "fetch",
    "load_tutorial_data",
    "shared_data_dir",
    "write_phantom",
]


@dataclass(frozen=True)
class ZenodoFile:
    """One file of a Zenodo record, with the md5 Zenodo publishes for it."""

    record: str
    filename: str
    md5: str
    description: str = ""
    size_kb: float | None = None
    unzipped_kb: float | None = None

    def unzip_limit(self, zip_bytes: int) -> int:
        """Most bytes the record may unzip to, one member or all together.

        ``unzipped_kb`` where the registry knows it, else 20 times the zip's size (DICOM files
        rarely compress by more than 3), which stops a zip bomb.
        """
        if self.unzipped_kb is not None:
            return int(self.unzipped_kb * 1000)
        return _MAX_UNZIP_RATIO * int(self.size_kb * 1000 if self.size_kb else zip_bytes)

    @property
    def url(self) -> str:
        """Where Zenodo serves the file (for messages; zenodo_get resolves it itself)."""
        return f"https://zenodo.org/records/{self.record}/files/{self.filename.replace(' ', '%20')}"


#: The ISMRM 2024 QMRI study-group challenge records (licence: see each Zenodo record page).
REGISTRY: dict[str, ZenodoFile] = {
    "t1_ir": ZenodoFile(
        record="10868350",
        filename="T1 IR.zip",
        md5="ccd5f719680c4b5396ec5fb0932f66e1",
        description="10 TSE inversion-recovery magnitude DICOMs, one per TI, one slice",
        size_kb=412.6,
    ),
    "t2star": ZenodoFile(
        record="10868361",
        filename="T2star.zip",
        md5="f387357a0b4024ca62e979203eff9def",
        description="11 gradient-echo magnitude DICOMs, one per TE, one slice",
        size_kb=445.8,
    ),
}
_PHANTOM_WRITERS = {
    "t1_ir": _phantom.write_ir_phantom,
    "t2star": _phantom.write_multi_echo_phantom,
}


class DataUnavailableError(ConnectionError):
    """The data could not be downloaded (no network, Zenodo down, record not found)."""


class DataIntegrityError(ValueError):
    """A downloaded or cached file is not what the registry says (checksum, corrupt zip)."""


#: The package's own subfolder of ``$QMRI_DATA_DIR``, so that ``QMRI_DATA_DIR=~`` is safe.
CACHE_SUBFOLDER = "qmri-tutorials"
#: Marker files: the members of an unzipped record, the files of a written phantom.
_UNZIPPED_MARKER = ".qmri-unzipped.json"
_PHANTOM_MARKER = ".qmri-phantom.json"
#: Temporary entries this module creates: ``.<kind>-<pid>-<random>``.
_TEMPORARY = re.compile(r"^\.(zenodo|extract|new|old)-(?:(\d+)-)?")
#: A temporary entry without a process id (older versions) is stale after this many seconds.
_STALE_AFTER_S = 3600.0
#: Unzipped members may hold at most this many times the record's size, in total.
_MAX_UNZIP_RATIO = 20


def cache_dir() -> Path:
    """The data cache: ``$QMRI_DATA_DIR/qmri-tutorials``, else the per-user cache folder.

    ``~`` and environment variables in ``$QMRI_DATA_DIR`` are expanded, and the package keeps
    its files in a subfolder of its own, so that even ``QMRI_DATA_DIR=~`` writes only there.
    """
    env = os.environ.get("QMRI_DATA_DIR")
    if env:
        return Path(os.path.expandvars(env)).expanduser() / CACHE_SUBFOLDER
    return Path(pooch.os_cache("qmri-tutorials"))


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs; POSIX only (on Windows, os.kill would end it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _clean_stale(folder: Path) -> list[Path]:
    """Remove what a killed download, unzip or phantom write left in ``folder``.

    Temporary folders of this module whose process is gone (without a process id, or on
    Windows: older than an hour), and pooch's empty ``tmp*`` download files. Returns what went.
    """
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match is not None and path.is_dir():
            pid, age = match.group(2), time.time() - path.stat().st_mtime
            if pid and os.name != "nt":  # after a day, the process id may have been reused
                stale = not _alive(int(pid)) or age > 24 * _STALE_AFTER_S
            else:
                stale = age > _STALE_AFTER_S
            if stale:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        elif path.name.startswith("tmp") and path.is_file() and path.stat().st_size == 0:
            path.unlink(missing_ok=True)  # pooch's download file, left empty by a kill
            removed.append(path)
    return removed


def _temporary_folder(parent: Path, kind: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=f".{kind}-{os.getpid()}-"))


def _swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; a previous ``target`` (the package's own) is removed."""
    if target.exists():
        old = _temporary_folder(target.parent, "old")
        target.rename(old / target.name)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


def _import_zenodo_get() -> ModuleType:
    """Import zenodo_get, undoing the Ctrl-C handler it installs at import time.

    zenodo_get registers its own SIGINT handler when imported; left in place, Jupyter's
    "Interrupt kernel" would no longer stop a cell.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT)
    import zenodo_get
    from loguru import logger

    if main_thread and handler is not None:
        signal.signal(signal.SIGINT, handler)
    logger.disable("zenodo_get")  # we report errors ourselves, in one clear message
    return zenodo_get


def zenodo_downloader(entry: ZenodoFile, retries: int = 2) -> Callable[[str, str, object], None]:
    """A pooch downloader that fetches ``entry`` with ``zenodo_get.download``.

    pooch calls it with a temporary ``output_file`` and renames that file only after the
    md5 matched, so a failed or wrong download never lands in the cache.
    """

    def download(url: str, output_file: str, pooch_instance: object) -> None:
        zenodo_get = _import_zenodo_get()
        target = Path(output_file)
        prefix = f".zenodo-{os.getpid()}-"
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=prefix) as tmp:
            try:
                zenodo_get.download(
                    record=entry.record,
                    output_dir=tmp,
                    file_glob=entry.filename,
                    retry_attempts=retries,
                    max_http_retries=retries,
                    access_token=os.environ.get("ZENODO_TOKEN") or None,
                    verbosity=0,
                )
            except Exception as err:
                why = "no network connection to Zenodo" if isinstance(err, OSError) else "failed"
                raise DataUnavailableError(
                    f"could not download {entry.filename!r} from Zenodo record {entry.record}: "
                    f"{why} ({type(err).__name__}: {err}). Check the network, or set "
                    "QMRI_DATA=sample to use the embedded synthetic phantom."
                ) from err
            got = Path(tmp) / entry.filename
            if not got.is_file():
                raise DataUnavailableError(
                    f"zenodo_get finished but wrote no {entry.filename!r} for record "
                    f"{entry.record}: is the file name right?"
                )
            shutil.move(got, target)

    return download


def _members(archive: zipfile.ZipFile, zip_path: Path, limit: int) -> dict[str, list[int]]:
    """The files of a zip with their sizes and CRCs, refusing what cannot be unzipped safely."""
    members = {}
    for info in archive.infolist():
        if info.is_dir():
            continue
        name = info.filename
        if info.flag_bits & 0x1:
            raise DataIntegrityError(
                f"{zip_path}: the zip is encrypted ({name} needs a password); the published "
                "records are not, so this is not the file the registry names"
            )
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DataIntegrityError(f"{zip_path}: member {name!r} would unzip outside its folder")
        if info.file_size > limit:
            raise DataIntegrityError(
                f"{zip_path}: member {name!r} would unzip to {info.file_size} bytes, more than "
                f"the registry says the record holds ({limit} bytes); refusing to unzip it"
            )
        members[name] = [info.file_size, info.CRC]
    total = sum(size for size, _ in members.values())
    if total > limit:
        raise DataIntegrityError(
            f"{zip_path}: its members would unzip to {total} bytes, more than the registry "
            f"says the record holds ({limit} bytes); refusing to unzip it"
        )
    return members


def _is_complete(folder: Path, members: dict[str, list[int]]) -> bool:
    """Whether ``folder`` holds the marker of these members and every member at its size."""
    try:
        marker = json.loads((folder / _UNZIPPED_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("members") != members:
        return False
    return all(
        (folder / name).is_file() and (folder / name).stat().st_size == size
        for name, (size, _) in members.items()
    )


def _unzip(zip_path: Path, target: Path, limit: int) -> Path:
    """Unzip into a temporary folder and rename it to ``target`` once every member is whole."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = _members(archive, zip_path, limit)
            if _is_complete(target, members):
                return target
            tmp = _temporary_folder(target.parent, "extract")
            try:
                for name in members:
                    archive.extract(name, tmp)  # zipfile checks each member's CRC as it reads
                marker = {"zip": zip_path.name, "members": members}
                (tmp / _UNZIPPED_MARKER).write_text(json.dumps(marker, indent=1))
                _swap_in(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as err:
        raise DataIntegrityError(f"{zip_path}: corrupt zip, cannot unzip it ({err})") from err
    except RuntimeError as err:  # zipfile's "encrypted, password required"
        raise DataIntegrityError(f"{zip_path}: cannot unzip it ({err})") from err
    except OSError as err:
        raise OSError(
            f"{zip_path}: could not unzip into {target.parent} ({err}); nothing was kept. "
            "Free some disk space, or set QMRI_DATA_DIR to another folder."
        ) from err
    return target


def fetch(
    entry: str | ZenodoFile = "t1_ir", retries: int = 2, cache: str | Path | None = None
) -> Path:
    """Download (once), verify and unzip a challenge record; return the unzipped folder.

    Parameters
    ----------
    entry
        A key of :data:`REGISTRY` ("t1_ir", "t2star") or a :class:`ZenodoFile`.
    retries
        Retries of zenodo_get, per request and per file.
    cache
        Cache folder; default :func:`cache_dir`.

    Returns
    -------
    pathlib.Path
        Folder with the unzipped files, ``<cache>/zenodo-<record>/<zip name without .zip>``.

    Raises
    ------
    DataUnavailableError
        The zip is not cached and cannot be downloaded.
    DataIntegrityError
        The downloaded file has the wrong md5, or the zip is corrupt, encrypted, or holds a
        member larger than the record; nothing of it is kept.
    """
    if isinstance(entry, str):
        if entry not in REGISTRY:
            raise ValueError(f"unknown data set {entry!r}; choose one of {sorted(REGISTRY)}")
        entry = REGISTRY[entry]
    folder = Path(cache) if cache is not None else cache_dir()
    folder = folder / f"zenodo-{entry.record}"
    _clean_stale(folder)
    target = folder / Path(entry.filename).stem

    def unzip(fname: str, action: str, pooch_instance: object) -> Path:
        zip_path = Path(fname)
        return _unzip(zip_path, target, entry.unzip_limit(zip_path.stat().st_size))

    try:
        pooch.retrieve(
            url=entry.url,
            known_hash=f"md5:{entry.md5}",
            fname=entry.filename,
            path=folder,
            downloader=zenodo_downloader(entry, retries),
            processor=unzip,
        )
    except DataIntegrityError:
        (folder / entry.filename).unlink(missing_ok=True)  # leave nothing of a bad record
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    except zipfile.BadZipFile as err:
        raise DataIntegrityError(
            f"{folder / entry.filename}: corrupt zip, cannot unzip it ({err})"
        ) from err
    except ValueError as err:  # pooch: the md5 of the download does not match
        raise DataIntegrityError(
            f"checksum mismatch for {entry.filename!r} from Zenodo record {entry.record}: "
            f"expected md5 {entry.md5}; the download was discarded. ({err})"
        ) from err
    return target


@dataclass(frozen=True)
class TutorialData:
    """The data a notebook runs on.

    Attributes
    ----------
    folder
        Folder of DICOM files, for :func:`qmri_helpers.dicom.load_series`.
    source
        "zenodo" (the challenge data) or "phantom" (the embedded synthetic phantom).
    description
        One line that says what the data are and where they came from.
    truth
        Ground truth of the phantom; None for the challenge data.
    """

    folder: Path
    source: str
    description: str
    truth: _phantom.Phantom | None = None


def load_tutorial_data(
    name: str = "t1_ir", mode: str | None = None, cache: str | Path | None = None
) -> TutorialData:
    """Get the data of a tutorial, from Zenodo or the embedded phantom, and say which.

    Parameters
    ----------
    name
        "t1_ir" or "t2star".
    mode
        "auto" (Zenodo, else the phantom with a message), "zenodo" (fail without network)
        or "sample" (the phantom). Default: ``$QMRI_DATA``, else "auto".
    cache
        Cache folder; default :func:`cache_dir`.

    Returns
    -------
    TutorialData
        Folder, source, description and (for the phantom) the ground truth.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(REGISTRY)}")
    mode = (mode or os.environ.get("QMRI_DATA") or "auto").lower()
    if mode not in ("auto", "zenodo", "sample"):
        raise ValueError(f"QMRI_DATA / mode must be 'auto', 'zenodo' or 'sample', got {mode!r}")
    entry = REGISTRY[name]
    if mode in ("auto", "zenodo"):
        try:
            folder = fetch(entry, cache=cache)
        except DataUnavailableError as err:
            if mode == "zenodo":
                raise
            print(f"Zenodo is not reachable: {err}\nFalling back to the embedded phantom.")
        else:
            return TutorialData(
                folder=folder,
                source="zenodo",
                description=(
                    f"ISMRM 2024 QMRI challenge, Zenodo record {entry.record}, "
                    f"'{entry.filename}' ({entry.description}), md5 verified, cached in {folder}"
                ),
            )
    folder = (Path(cache) if cache is not None else cache_dir()) / "phantom" / name
    truth = write_phantom(name, folder)
    kind = "inversion-recovery" if name == "t1_ir" else "multi-echo gradient-echo"
    return TutorialData(
        folder=folder,
        source="phantom",
        description=(
            f"embedded synthetic phantom (qmri_helpers.phantom): {kind} DICOMs with known "
            f"ground truth, written to {folder}"
        ),
        truth=truth,
    )


def _written_by_us(folder: Path) -> bool:
    """Whether every file in ``folder`` is one the package wrote there (its marker says so)."""
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}
    try:
        ours = set(json.loads((folder / _PHANTOM_MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        # No marker: a phantom that an older version wrote is IM_0001.dcm ... by qmri_helpers.
        return all(_old_phantom_file(folder / name) for name in found)
    return found - {_PHANTOM_MARKER} <= ours


def _old_phantom_file(path: Path) -> bool:
    if re.fullmatch(r"IM_\d{4}\.dcm", path.name) is None:
        return False
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Manufacturer"])
    except Exception:  # not DICOM at all: not ours
        return False
    return ds.get("Manufacturer") == "qmri_helpers"


def write_phantom(name: str, folder: str | Path) -> _phantom.Phantom:
    """Write the phantom of data set ``name`` into ``folder``, never deleting others' files.

    The phantom is written into a fresh folder beside ``folder``, with a marker that lists its
    files, and swapped in. A previous ``folder`` is removed only if the package wrote all of
    it; one that holds other files is moved aside to ``<folder>.moved-<time>``, and a message
    says so.

    Returns
    -------
    qmri_helpers.phantom.Phantom
        The ground truth of the written phantom.
    """
    folder = Path(folder)
    _clean_stale(folder.parent)
    new = _temporary_folder(folder.parent, "new")
    try:
        truth = _PHANTOM_WRITERS[name](new)
        files = sorted(p.relative_to(new).as_posix() for p in new.rglob("*") if p.is_file())
        (new / _PHANTOM_MARKER).write_text(json.dumps({"data": name, "files": files}, indent=1))
        if folder.exists() and not (folder.is_dir() and _written_by_us(folder)):
            aside = folder.with_name(f"{folder.name}.moved-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
            print(
                f"{folder} held files that qmri_helpers did not write; moved them to {aside} "
                "(nothing deleted) and wrote the phantom afresh."
            )
        _swap_in(new, folder)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    return truth


def shared_data_dir() -> Path | None:
    """Locate the real scans: ``$QMRI_SHARED_DATA``, else ``../shared/data`` beside the checkout.

    Returns None where the folder does not exist; notebooks then skip their real-data sections.
    """
    env = os.environ.get("QMRI_SHARED_DATA")
    folder = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return folder if folder.is_dir() else None
