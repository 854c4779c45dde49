"""Sphinx configuration of the tutorials' site: ``make site`` (``make site TEACHER=1``).

The notebooks are not written twice: at each build this file copies every
``notebooks/NN_topic.ipynb`` (a new notebook shows up by itself) into ``docs/notebooks/``
(git-ignored), with three changes for a static page:

- a first cell, tagged ``remove-cell``, from ``docs/site_setup.py``: no tqdm bars (a static
  page cannot update one) and alt text for every matplotlib figure;
- in the teacher build (``-t teacher``), the exercise solutions (cells tagged ``solution``)
  lose their ``hide-input`` tag, so they are shown in full; the learners' site collapses them;
- nothing else: the cells tagged ``remove-cell`` (badges, install cell) are dropped by myst-nb.

myst-nb executes the notebooks through jupyter-cache (``build/jupyter_cache``), keyed on the
code cells (and, through the setup cell, on the sources of ``qmri_helpers``), so an unchanged
notebook does not run again, and a prose edit only re-renders.
MathJax 2 comes from the ``jupyter-server-mathjax`` package, copied into the site, so the
equations render with no network.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tomllib
from pathlib import Path

import jupyter_server_mathjax
import nbformat
from myst_nb.core.render import NbElementRenderer

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
TEACHER = tags.has("teacher")  # type: ignore[name-defined]  # noqa: F821 - given by Sphinx

project = "qmri-tutorials"
author = "the qmri-tutorials contributors"
copyright = "the qmri-tutorials contributors (MIT licence)"
release = version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
language = "en"

extensions = ["myst_nb"]
root_doc = "index"
exclude_patterns = ["notebooks/*.csv", "**/.ipynb_checkpoints"]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
# -W makes every warning an error (a broken link, a failed cell); these two are cosmetic: a
# heading that skips a level, and an output type that a static page cannot show.
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header"]

# --- execution: jupyter-cache, errors stop the build --------------------------------------
nb_execution_mode = "cache"
nb_execution_cache_path = str(ROOT / "build" / "jupyter_cache")
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
# Widgets need their JavaScript (a CDN) to render; the static PNG each widget carries
# (qmri_helpers.widgets) and the plain text are what a static page can show.
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None)]
nb_ipywidgets_js = {}  # so no widget script is loaded from a CDN either

# --- look: sphinx-book-theme, no network ----------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "qMRI tutorials" + (" (teacher edition)" if TEACHER else "")
html_static_path = ["_static"]
html_css_files = ["site.css"]
html_theme_options = {
    "repository_url": "https://github.com/qmri-tutorials/qmri-tutorials",
    "use_repository_button": True,
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "navigation_with_keys": True,
}
html_last_updated_fmt = None
html_copy_source = False

# MathJax 2 from jupyter-server-mathjax, copied to _static/mathjax (see _copy_mathjax), with
# the STIX-Web fonts it ships: no request leaves the page.
MATHJAX = Path(jupyter_server_mathjax.__file__).parent / "static"
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"
mathjax2_config = {
    "HTML-CSS": {
        "availableFonts": [],
        "preferredFont": None,
        "webFont": "STIX-Web",
        "imageFont": None,
    },
    # myst-nb marks each notebook's section tex2jax_ignore and its math nodes "math" (for
    # MathJax 3's processHtmlClass): the same rule, in MathJax 2's words.
    "tex2jax": {
        "inlineMath": [["\\(", "\\)"]],
        "displayMath": [["\\[", "\\]"]],
        "ignoreClass": "tex2jax_ignore|mathjax_ignore",
        "processClass": "tex2jax_process|mathjax_process|math|output_area",
    },
}


def _copy_mathjax(app, exception) -> None:
    if exception is None and app.builder.format == "html":
        shutil.copytree(MATHJAX, Path(app.outdir) / "_static" / "mathjax", dirs_exist_ok=True)


# --- the notebooks, copied with the site's changes ----------------------------------------
# jupyter-cache keys on the code cells only; the package's sources go into the setup cell as
# a digest, so that a change in qmri_helpers runs the notebooks again instead of showing
# outputs of the old code.
PACKAGE_DIGEST = hashlib.sha256(
    b"".join(p.read_bytes() for p in sorted((ROOT / "qmri_helpers").rglob("*.py")))
).hexdigest()
SETUP_CELL = (DOCS / "site_setup.py").read_text() + f"# qmri_helpers sources: {PACKAGE_DIGEST}\n"


def _site_notebook(source: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(source, as_version=4)
    setup = nbformat.v4.new_code_cell(SETUP_CELL, metadata={"tags": ["remove-cell"]})
    nb.cells.insert(0, setup)
    for cell in nb.cells:
        tags_ = cell.metadata.get("tags", [])
        if TEACHER and "solution" in tags_:
            cell.metadata["tags"] = [t for t in tags_ if t != "hide-input"]
            cell.metadata.get("jupyter", {}).pop("source_hidden", None)
    return nb


def _copy_notebooks() -> None:
    target = DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    sources = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    wanted = {s.name for s in sources}
    for stale in target.glob("*.ipynb"):
        if stale.name not in wanted:
            stale.unlink()
    for source in sources:
        text = json.dumps(_site_notebook(source), indent=1, sort_keys=True) + "\n"
        copy = target / source.name
        if not copy.exists() or copy.read_text() != text:  # unchanged: Sphinx skips the page
            copy.write_text(text)


_copy_notebooks()


# --- alt text: the description the setup cell stores with each figure ----------------------
def _render_image_with_alt(self, data):
    """myst-nb's image renderer, with the ``alt`` of the output's metadata (else a generic one)."""
    nodes = _render_image(self, data)
    alt = data.output_metadata.get(data.mime_type, {}).get("alt")
    # Figures carry theirs (site_setup.py); what else shows a PNG is a widget's static view.
    nodes[0]["alt"] = alt or (
        "Figure: a static view of the interactive widget that the code cell above makes; "
        "it is live in JupyterLab."
    )
    return nodes


_render_image = NbElementRenderer.render_image
NbElementRenderer.render_image = _render_image_with_alt


def setup(app):  # noqa: D103 - Sphinx's hook for conf.py
    app.connect("build-finished", _copy_mathjax)
