"""Licence and citation: LICENSE, CITATION.cff and pyproject.toml say the same things."""

from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CITATION = yaml.safe_load((ROOT / "CITATION.cff").read_text())


def test_the_licence_is_an_spdx_string_and_the_license_file_matches():
    assert PROJECT["license"] == "MIT"  # a string (SPDX), not the deprecated table
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in text


def test_setuptools_reads_the_project_without_a_warning():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "`project.license` as a TOML table is deprecated"
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "MIT"


def test_citation_cff_is_complete_and_agrees_with_pyproject():
    assert CITATION["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors", "type", "abstract"):
        assert CITATION.get(key), f"CITATION.cff lacks {key}"
    assert all(a.get("name") or a.get("family-names") for a in CITATION["authors"])
    assert CITATION["license"] == PROJECT["license"]
    assert str(CITATION["version"]) == PROJECT["version"]
    assert CITATION["repository-code"] == PROJECT["urls"]["Repository"]


def test_citation_cff_cites_every_data_record_the_readme_names():
    readme = (ROOT / "README.md").read_text()
    records = set(re.findall(r"10\.5281/zenodo\.\d+", readme))
    assert records, "the README names no Zenodo record"
    references = CITATION["references"]
    assert {r["doi"] for r in references} == records
    for reference in references:
        assert reference["type"] == "data" and reference["title"] and reference["authors"]
        assert reference["url"] == f"https://doi.org/{reference['doi']}"
