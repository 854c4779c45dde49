"""The project's own promises: paired notebooks, matching environments, CI = README."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import jupytext
import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
CONDA_TO_PIP = {"pytorch": "torch"}


def _name(requirement: str) -> str:
    name = re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:1] == ["01_t1_inversion_recovery.py"]


@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_pair_is_in_sync_and_has_no_outputs(script):
    paired = script.with_suffix(".ipynb")
    assert paired.exists(), f"{script.name} has no paired {paired.name}: run `make sync`"
    from_py = jupytext.read(script)
    from_ipynb = nbformat.read(paired, as_version=4)
    cells = [(c.cell_type, c.source) for c in from_py.cells]
    assert cells == [(c.cell_type, c.source) for c in from_ipynb.cells], (
        f"{script.name} and {paired.name} differ: run `make sync`"
    )
    for cell in from_ipynb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{paired.name} is committed with outputs: strip them"
            )


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        wanted |= {_name(r) for r in extra if not r.startswith(project["name"])}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    named = set()
    for item in env["dependencies"]:
        if isinstance(item, dict):
            named |= {_name(r) for r in item["pip"] if not r.startswith("-e")}
        else:
            named.add(CONDA_TO_PIP.get(_name(item), _name(item)))
    assert named - {"python", "pip"} == wanted


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^\s*(make \w+)\s*$", readme, flags=re.MULTILINE)
    assert "make tutorial" in commands and "make test" in commands
    for command in ("make tutorial", "make test"):
        assert re.search(rf"^{command}\b", ci, flags=re.MULTILINE), f".ci/run lacks {command}"


def test_torch_is_pinned_where_ci_installs():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"TORCH_VERSION \?= \d+\.\d+\.\d+", makefile)
    assert '"torch==$(TORCH_VERSION)"' in makefile
