"""In a real browser: the widgets of notebook 01 in JupyterLab, and the site of all tutorials.

Headless Chromium is Debian's (``/usr/bin/chromium``; ``make test`` installs it where it can),
driven by Playwright with ``executable_path`` set, so Playwright never downloads a browser.
The tests skip where Chromium or Playwright is missing, and fail instead under
``QMRI_REQUIRE_BROWSER=1``, which ``.ci/run`` sets. Screenshots go to the test's temporary
folder, or to ``$QMRI_SCREENSHOT_DIR`` when set, for a person to look at.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("QMRI_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _require(condition: bool, why: str) -> None:
    if not condition:
        if os.environ.get("QMRI_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{why}, and QMRI_REQUIRE_BROWSER=1")
        pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    _require(CHROMIUM.exists(), f"{CHROMIUM} not found (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require(False, "playwright is not installed")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("QMRI_SCREENSHOT_DIR", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def jupyter_lab(tmp_path_factory):
    """A JupyterLab server on loopback with a token, serving a copy of notebook 01."""
    work = tmp_path_factory.mktemp("lab")
    shutil.copy(ROOT / "notebooks" / "01_t1_inversion_recovery.ipynb", work)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token = secrets.token_hex(16)
    # Render every cell (no windowing), so that all outputs are in the page to be checked.
    settings = work / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    env = {
        **os.environ,
        "JUPYTERLAB_SETTINGS_DIR": str(work / "settings"),
        "QMRI_DATA": "sample",
        "QMRI_DATA_DIR": str(work / "cache"),
        "JUPYTER_CONFIG_DIR": str(work / "config"),
        "JUPYTER_RUNTIME_DIR": str(work / "runtime"),
    }
    log = open(work / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
            "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={work}",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2
                )
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(
                        "JupyterLab did not start:\n" + (work / "server.log").read_text()
                    ) from None
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", token
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_notebook_01_widgets_in_jupyterlab(browser, jupyter_lab, shots):
    url, token = jupyter_lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{url}/lab/tree/01_t1_inversion_recovery.ipynb?token={token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    # JupyterLab may ask which kernel to start: accept its choice (the Python 3 kernel)
    select_kernel = page.locator(".jp-Dialog button:has-text('Select')")
    idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if select_kernel.count():
            select_kernel.first.click()
        elif idle.count():
            page.wait_for_timeout(1000)  # a dialog can still follow the first idle state
            if not select_kernel.count():
                break
        page.wait_for_timeout(250)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
    page.wait_for_selector(".widget-slider", timeout=300_000)
    page.wait_for_function(
        "() => ![...document.querySelectorAll('.jp-InputPrompt')]"
        ".some(p => p.textContent.includes('*'))",
        timeout=300_000,
    )
    inspector = page.locator(".jupyter-widgets.widget-vbox").first
    inspector.scroll_into_view_if_needed()
    image = inspector.locator(".widget-output img").first
    image.wait_for(timeout=60_000)
    before = image.get_attribute("src")
    inspector.screenshot(path=str(shots / "jupyterlab_inspector_before.png"))

    readout = inspector.locator(".widget-readout").first  # the row slider
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("20")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "([el, old]) => { const img = el.querySelector('.widget-output img');"
        " return img && img.getAttribute('src') !== old; }",
        arg=[inspector.element_handle(), before],
        timeout=60_000,
    )
    inspector.screenshot(path=str(shots / "jupyterlab_inspector_after.png"))
    assert inspector.locator(".widget-readout").first.inner_text().strip() == "20"
    page.screenshot(path=str(shots / "jupyterlab.png"), full_page=True)

    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    assert outputs, "no outputs: the notebook did not run"
    errors = [text for text in outputs if "Traceback" in text or "Error:" in text]
    assert not errors, errors[0][:2000]
    assert any("Data used: phantom" in text for text in outputs)
    page.close()


SITE = ROOT / "build" / "site"
TEACHER_SITE = ROOT / "build" / "site-teacher"
SCRIPTS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
# Emoji and pictographs: no font in a plain Linux install draws them (empty boxes).
EMOJI = re.compile("[\u2600-\u27bf\U0001f000-\U0001faff\ufe0f]")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output for failures
        pass


@contextlib.contextmanager
def _serve(folder: Path):
    """Serve a built site on loopback, as any static host would (search needs http)."""
    make = "make site TEACHER=1" if folder == TEACHER_SITE else "make site"
    _require((folder / "index.html").exists(), f"no site in {folder}: run `{make}` first")
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def site():
    with _serve(SITE) as url:
        yield url


def _offline_page(browser, local: str, viewport=(1300, 900)):
    """A page that may load only from ``local``: every other request is refused and recorded."""
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    page.refused, page.errors = [], []

    def route(request_route):
        if request_route.request.url.startswith((local, "data:", "blob:", "about:")):
            request_route.continue_()
        else:
            page.refused.append(request_route.request.url)
            request_route.abort()

    page.route("**/*", route)
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    return page


def _figures_executed(stem: str) -> int:
    """The figures the kernel produced, from jupyter-cache's record of the site's build."""
    import nbformat
    from jupyter_cache import get_cache

    source = ROOT / "docs" / "notebooks" / f"{stem}.ipynb"
    _, nb = get_cache(ROOT / "build" / "jupyter_cache").merge_match_into_notebook(
        nbformat.read(source, as_version=4)
    )
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{stem}: {errors[0].ename}: {errors[0].evalue}"
    return sum(
        "image/png" in output.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code" and "remove-cell" not in cell.metadata.get("tags", [])
        for output in cell.get("outputs", [])
    )


def _check_page(page, name: str) -> str:
    """Every image loaded with alt text, no script error, nothing from the network."""
    images = page.evaluate(
        "() => [...document.querySelectorAll('main img')].map(img => ({src: img.src,"
        " ok: img.complete && img.naturalWidth > 0, alt: img.getAttribute('alt') || ''}))"
    )
    broken = [i["src"] for i in images if not i["ok"]]
    assert not broken, f"{name}: images that do not load: {broken}"
    no_alt = [i["src"] for i in images if len(i["alt"]) < 10 or i["alt"].endswith(".png")]
    assert not no_alt, f"{name}: images without alt text: {no_alt}"
    text = page.locator("body").inner_text()
    for bad in ("Traceback (most recent call last)", "Math Processing Error", "Not yet.",
                "0%|", "Error executing", "WARNING"):  # fmt: skip
        assert bad not in text, f"{name} shows {bad!r}"
    assert not page.errors, f"{name}: script errors {page.errors}"
    assert not page.refused, f"{name} asked the network for {page.refused}"
    return text


def test_site_has_a_page_per_notebook_in_teaching_order(browser, site, shots):
    page = _offline_page(browser, site)
    page.goto(f"{site}/index.html")
    text = _check_page(page, "index.html")
    assert "Data sources and citations" in text
    page.screenshot(path=str(shots / "site_index.png"))
    # The sidebar lists every notebook, in the order of their file names
    links = page.locator("nav.bd-docs-nav a.reference.internal")
    hrefs = [h.split("/")[-1] for h in links.evaluate_all("els => els.map(e => e.href)")]
    pages = [h.removesuffix(".html") for h in hrefs if re.match(r"\d\d_", h)]
    assert pages == [s.stem for s in SCRIPTS], pages
    # Navigation: "next" leads from the landing page through the notebooks to the data page
    visited = []
    for _ in range(len(pages) + 1):
        page.click("main a.right-next")
        page.wait_for_load_state("load")
        visited.append(page.url.split("/")[-1].removesuffix(".html"))
    assert visited == [*pages, "data"]
    _check_page(page, "data.html")
    page.close()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_site_notebook_page_shows_figures_equations_and_no_error(browser, site, shots, script):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page = _offline_page(browser, site)
    page.goto(f"{site}/notebooks/{script.stem}.html")
    page.wait_for_load_state("load")
    # Equations: MathJax (from _static/mathjax) typesets every one, with no network
    equations = page.locator("main .math.notranslate").count()
    assert equations > 0, f"{script.stem}: no equation on the page"
    try:
        page.wait_for_function(
            "() => [...document.querySelectorAll('main .math.notranslate')]"
            ".every(e => e.querySelector('.MathJax, .MathJax_Display'))",
            timeout=60_000,
        )
    except PlaywrightTimeout:
        pytest.fail(f"{script.stem}: the {equations} equations did not render")
    assert not page.locator(".MathJax_Error, merror").count(), f"{script.stem}: TeX errors"
    figures = _figures_executed(script.stem)
    shown = page.locator("main .cell_output img")
    assert shown.count() == figures, f"{script.stem}: {shown.count()} of {figures} figures"
    text = _check_page(page, script.stem)
    assert "Data used:" in text, script.stem
    assert "Correct." in text, f"{script.stem}: no exercise check passed"
    # The cells tagged remove-cell (badges, install cell, the site's setup) are not shown
    assert "QMRI_TUTORIALS" not in text and not page.locator("a[href*=colab]").count()
    assert not EMOJI.search(text), f"{script.stem}: emoji {EMOJI.findall(text)}"
    page.screenshot(path=str(shots / f"site_{script.stem}.png"), full_page=False)
    page.close()


def test_site_search_finds_the_tutorials(browser, site, shots):
    page = _offline_page(browser, site)
    page.goto(f"{site}/index.html")
    page.keyboard.press("Control+k")  # the theme's search dialog
    field = page.locator("#pst-search-dialog input[type=search]")
    field.wait_for(state="visible", timeout=10_000)
    field.fill("inversion recovery")
    field.press("Enter")
    page.wait_for_url("**/search.html?q=*")
    results = page.locator("#search-results ul.search li a")
    results.first.wait_for(timeout=30_000)
    found = results.evaluate_all("els => els.map(e => e.getAttribute('href'))")
    assert any("01_t1_inversion_recovery" in href for href in found), found
    page.screenshot(path=str(shots / "site_search.png"))
    _check_page(page, "search.html")
    page.close()


@pytest.mark.parametrize(
    ("folder", "shown"), [(SITE, False), (TEACHER_SITE, True)], ids=["learners", "teacher"]
)
def test_exercise_solutions_are_folded_for_learners_and_shown_to_teachers(browser, folder, shown):
    with _serve(folder) as url:
        for script in SCRIPTS:
            page = _offline_page(browser, url)
            page.goto(f"{url}/notebooks/{script.stem}.html")
            solutions = page.locator("main .cell.tag_solution .cell_input")
            assert solutions.count() >= 1, f"{script.stem}: no solution cell"
            for i in range(solutions.count()):
                assert solutions.nth(i).is_visible() == shown, f"{script.stem}: solution {i + 1}"
            if not shown:  # one click on the toggle shows it
                page.locator("main .cell.tag_solution details summary").first.click()
                assert solutions.first.is_visible()
            page.close()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_notebook_headings_have_no_emoji(script):
    import jupytext

    for cell in jupytext.read(script).cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    assert not EMOJI.search(line), f"{script.name}: {line!r}"


def test_make_installs_chromium_only_where_missing_and_upgrades_nothing():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\nbrowser:") : makefile.index("\ntest:")]
    install = re.search(r"^APT_CHROMIUM := (.*)$", makefile, flags=re.MULTILINE).group(1)
    assert install.split()[:2] == ["apt-get", "install"] and install.split()[-1] == "chromium"
    assert {"--no-upgrade", "--no-install-recommends"} <= set(install.split())
    assert "upgrade " not in recipe.replace("--no-upgrade", "").replace("would also upgrade", "")
    # Only where Chromium is missing, and only after apt-get's own dry run shows no upgrade
    assert recipe.index('if [ -x "$${QMRI_CHROMIUM') < recipe.index("apt-get update")
    assert "$(APT_CHROMIUM) --simulate" in recipe and "grep '^Inst [^ ]* \\['" in recipe
