"""Tutorial data: the ISMRM 2024 QMRI challenge records on Zenodo, cached and verified.

``fetch`` downloads a record's zip with ``zenodo_get`` into a per-user cache through
``pooch.retrieve``, which checks the md5 of a cached zip before it calls the network,
downloads to a temporary file that is renamed only once its md5 matches, and unzips.
``load_tutorial_data`` picks the data a notebook runs on: the challenge data, or, with no
network, the synthetic phantom of :mod:`qmri_helpers.phantom`, written as DICOM files.

Environment variables
---------------------
QMRI_DATA_DIR
    Cache folder (default: the per-user cache, e.g. ``~/.cache/qmri-tutorials``).
QMRI_DATA
    ``auto`` (default: Zenodo, else the phantom), ``zenodo`` or ``sample`` (the phantom).
ZENODO_TOKEN
    Access token passed to zenodo_get, for restricted records or higher rate limits.
QMRI_SHARED_DATA
    Folder of the real scans the optional sections read (default: ``../shared/data`` beside
    this checkout).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pooch

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
]


@dataclass(frozen=True)
class ZenodoFile:
    """One file of a Zenodo record, with the md5 Zenodo publishes for it."""

    record: str
    filename: str
    md5: str
    description: str = ""
    size_kb: float | None = None

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


def cache_dir() -> Path:
    """The data cache: ``$QMRI_DATA_DIR``, else the per-user cache folder."""
    env = os.environ.get("QMRI_DATA_DIR")
    return Path(env).expanduser() if env else Path(pooch.os_cache("qmri-tutorials"))


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
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".zenodo-") as tmp:
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
        The downloaded file has the wrong md5 (nothing is kept), or the zip is corrupt.
    """
    if isinstance(entry, str):
        if entry not in REGISTRY:
            raise ValueError(f"unknown data set {entry!r}; choose one of {sorted(REGISTRY)}")
        entry = REGISTRY[entry]
    folder = Path(cache) if cache is not None else cache_dir()
    folder = folder / f"zenodo-{entry.record}"
    extract_dir = Path(entry.filename).stem
    try:
        pooch.retrieve(
            url=entry.url,
            known_hash=f"md5:{entry.md5}",
            fname=entry.filename,
            path=folder,
            downloader=zenodo_downloader(entry, retries),
            processor=pooch.Unzip(extract_dir=extract_dir),
        )
    except zipfile.BadZipFile as err:
        raise DataIntegrityError(
            f"{folder / entry.filename}: corrupt zip, cannot unzip it ({err})"
        ) from err
    except ValueError as err:  # pooch: the md5 of the download does not match
        raise DataIntegrityError(
            f"checksum mismatch for {entry.filename!r} from Zenodo record {entry.record}: "
            f"expected md5 {entry.md5}; the download was discarded. ({err})"
        ) from err
    return folder / extract_dir


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
    shutil.rmtree(folder, ignore_errors=True)  # our own folder: written afresh, seeded
    truth = _PHANTOM_WRITERS[name](folder)
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


def shared_data_dir() -> Path | None:
    """Locate the real scans: ``$QMRI_SHARED_DATA``, else ``../shared/data`` beside the checkout.

    Returns None where the folder does not exist; notebooks then skip their real-data sections.
    """
    env = os.environ.get("QMRI_SHARED_DATA")
    folder = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return folder if folder.is_dir() else None
