"""The project's own promises: paired notebooks, matching environments, CI = README."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
import venv
from pathlib import Path

import jupytext
import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
CONDA_TO_PIP = {"pytorch": "torch", "playwright-python": "playwright"}  # conda-forge names
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REPOSITORY = PYPROJECT["project"]["urls"]["Repository"]
SLUG = REPOSITORY.removeprefix("https://github.com/")  # owner/name
SKELETON = ("## Overview", "## Prerequisites", "**Learning goals:**", "**Estimated time:**",
            "## Summary", "## What's next")  # fmt: skip


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


@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_the_cookbook_skeleton_in_order(script):
    markdown = "\n".join(c.source for c in jupytext.read(script).cells if c.cell_type == "markdown")
    found = [markdown.find(heading) for heading in SKELETON]
    missing = [heading for heading, at in zip(SKELETON, found, strict=True) if at < 0]
    assert not missing, f"{script.name} lacks {missing}"
    assert found == sorted(found), f"{script.name}: the skeleton is out of order"


@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_with_badges_and_an_install_cell_that_reports_drop(script):
    badges, install, title = jupytext.read(script).cells[:3]
    path = f"notebooks/{script.stem}.ipynb"
    assert badges.cell_type == "markdown"
    assert f"(https://colab.research.google.com/github/{SLUG}/blob/main/{path})" in badges.source
    assert f"(https://mybinder.org/v2/gh/{SLUG}/main?urlpath=lab/tree/{path})" in badges.source
    assert install.cell_type == "code"
    assert f'"qmri-tutorials @ git+{REPOSITORY}@main"' in install.source
    for cell in (badges, install):
        assert cell.metadata.get("tags") == ["remove-cell"], f"{script.name}: untagged header cell"
    assert title.source.startswith("# "), f"{script.name}: the title must follow the header"


def test_readme_binder_badge_opens_the_notebooks_folder():
    readme = (ROOT / "README.md").read_text()
    assert f"(https://mybinder.org/v2/gh/{SLUG}/main?urlpath=lab/tree/notebooks)" in readme


def test_install_cell_installs_the_package_only_where_it_is_missing(tmp_path):
    # A local git repository holding the package stands in for GitHub.
    source = tmp_path / "repository"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "qmri_helpers", source / "qmri_helpers", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for args in (["init", "-q", "-b", "main"], ["add", "."],
                 ["-c", "user.name=test", "-c", "user.email=test@example.org",
                  "commit", "-q", "-m", "snapshot"]):  # fmt: skip
        subprocess.run(["git", "-C", str(source), *args], check=True, capture_output=True)
    cell = jupytext.read(NOTEBOOKS[0]).cells[1].source
    assert cell.count(f"git+{REPOSITORY}@main") == 1
    # With a host, as in the real address: pip's PEP 508 check wants one in a git+file URL.
    cell = cell.replace(f"git+{REPOSITORY}", f"git+file://localhost{source}")

    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    # The package is under test, not its dependencies (those would be downloaded, torch too).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_NO_DEPS"] = "1"

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip

    where = "import importlib.util; print(importlib.util.find_spec('qmri_helpers'))"
    assert run(where).stdout.strip() == "None"
    installed = run(f"{cell}\n{where}")  # found in the same process, as in a running kernel
    assert installed.returncode == 0, installed.stderr
    assert str(tmp_path / "venv") in installed.stdout, installed.stdout
    # Run again with the repository gone: the package is there, so nothing is fetched.
    shutil.rmtree(source)
    again = run(cell)
    assert again.returncode == 0, again.stderr
