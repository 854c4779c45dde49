"""In a real browser: the widgets of notebook 01 in JupyterLab, and the HTML reports.

Headless Chromium is Debian's (``/usr/bin/chromium``; ``make test`` installs it where it can),
driven by Playwright with ``executable_path`` set, so Playwright never downloads a browser.
The tests skip where Chromium or Playwright is missing, and fail instead under
``QMRI_REQUIRE_BROWSER=1``, which ``.ci/run`` sets. Screenshots go to the test's temporary
folder, or to ``$QMRI_SCREENSHOT_DIR`` when set, for a person to look at.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
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


def _reports() -> list[Path]:
    reports = sorted((ROOT / "reports").glob("[0-9][0-9]_*.html"))
    _require(bool(reports), "no HTML reports in reports/: run `make reports` first")
    return reports


def test_html_reports_show_every_figure_and_no_error(browser, shots):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for report in _reports():
        executed = json.loads(report.with_suffix(".ipynb").read_text())
        figures = sum(
            "image/png" in output.get("data", {})
            for cell in executed["cells"]
            if cell["cell_type"] == "code"
            for output in cell.get("outputs", [])
        )
        errors = [
            output
            for cell in executed["cells"]
            for output in cell.get("outputs", [])
            if output.get("output_type") == "error"
        ]
        assert not errors, f"{report.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        shown = page.locator(".jp-OutputArea-output img")
        assert shown.count() == figures, f"{report.name}: {shown.count()} of {figures} figures"
        loaded = page.evaluate(
            "() => [...document.querySelectorAll('.jp-OutputArea-output img')]"
            ".filter(img => img.complete && img.naturalWidth > 0).length"
        )
        assert loaded == figures, f"{report.name}: only {loaded} of {figures} figures load"
        # Every notebook has equations; MathJax comes from reports/mathjax, so this holds offline.
        try:
            page.wait_for_function("() => document.querySelectorAll('.MathJax').length > 0")
        except PlaywrightTimeout:
            pytest.fail(f"{report.name}: no equation rendered (is reports/mathjax there?)")
        text = page.locator("body").inner_text()
        assert "Math Processing Error" not in text, report.name
        assert "Traceback (most recent call last)" not in text, report.name
        assert "Data used:" in text, report.name
        # The cells tagged remove-cell (badges, install) are for notebooks, not for reports.
        assert "QMRI_TUTORIALS" not in text and not page.locator("a[href*=colab]").count()
        page.screenshot(path=str(shots / f"{report.stem}.png"), full_page=False)
        page.close()
