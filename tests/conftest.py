"""Shared fixtures: the synthetic phantom, written once per session, and the real scans."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qmri_helpers import data, phantom


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's data cache from a test."""
    monkeypatch.setenv("QMRI_DATA_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("QMRI_DATA", raising=False)


@pytest.fixture(scope="session")
def ir_phantom(tmp_path_factory):
    """(folder, truth) of the default inversion-recovery phantom."""
    folder = tmp_path_factory.mktemp("ir_phantom")
    return folder, phantom.write_ir_phantom(folder)


def _shared(name: str) -> Path:
    """A folder of real scans in ../shared/data; skipped where absent unless required.

    .ci/run sets QMRI_REQUIRE_SHARED=1, so that there a missing folder fails instead.
    """
    root = data.shared_data_dir()
    folder = root / name if root is not None else Path("../shared/data") / name
    if not folder.is_dir():
        if os.environ.get("QMRI_REQUIRE_SHARED") == "1":
            pytest.fail(f"{folder} is missing, and QMRI_REQUIRE_SHARED=1")
        pytest.skip(f"{folder} not found (real scans live in ../shared/data)")
    return folder


@pytest.fixture(scope="session")
def hazen() -> Path:
    """The hazen system-phantom scans (T1 IR and T2 spin echo DICOMs)."""
    return _shared("hazen-system-phantom-relaxometry")


@pytest.fixture(scope="session")
def kidney() -> Path:
    """The ukat kidney multi-echo GRE NIfTIs with the scanner's R2* map."""
    return _shared("ukat-kidney-r2star-siemens")
