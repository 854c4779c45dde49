"""Shared fixtures: the synthetic phantom, written once per session, and the real scans."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qmri_helpers import phantom

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QMRI_SHARED_DATA", ROOT.parent / "shared" / "data"))
HAZEN = SHARED / "hazen-system-phantom-relaxometry"


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


@pytest.fixture(scope="session")
def hazen() -> Path:
    """The hazen phantom scans in ../shared/data; skipped where absent unless required.

    .ci/run sets QMRI_REQUIRE_SHARED=1, so that there a missing folder fails instead.
    """
    if not HAZEN.is_dir():
        if os.environ.get("QMRI_REQUIRE_SHARED") == "1":
            pytest.fail(f"{HAZEN} is missing, and QMRI_REQUIRE_SHARED=1")
        pytest.skip(f"{HAZEN} not found (real scans live in ../shared/data)")
    return HAZEN
