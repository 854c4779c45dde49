# Everything a user or CI needs, in a local virtual environment (.venv).
#   make tutorial   install, then execute notebook 01 into reports/ (.ipynb and .html)
#   make test       install (Chromium too, where apt-get can), lint, build the HTML reports,
#                   then run every test: the package, the notebooks, the browser
# Other targets: setup, run or reports (every notebook, executed, into reports/*.ipynb and
# *.html), lint, sync (re-pair .py/.ipynb), clean.
PYTHON ?= python3
VENV ?= .venv
# Pinned: an unpinned torch pulls several GB of CUDA wheels on Linux. Where pip's index has
# only those, name PyTorch's CPU wheel index: make setup TORCH_INDEX_URL=<its URL>.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.py))

.PHONY: setup tutorial run reports browser test lint sync clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The HTML reports load MathJax from reports/mathjax, so their equations render offline too:
# MathJax 2 as the jupyter-server-mathjax package ships it, with the STIX-Web fonts it has.
MATHJAX_URL := mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe,local/stix

reports/mathjax/MathJax.js: $(VENV)/.installed
	rm -rf reports/mathjax && mkdir -p reports
	cp -r "$$($(BIN)/python -c 'import jupyter_server_mathjax as m, pathlib; \
		print(pathlib.Path(m.__file__).parent / "static")')" reports/mathjax
	mkdir -p reports/mathjax/config/local
	printf '%s\n' \
		'MathJax.Hub.Config({"HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null}});' \
		'MathJax.Ajax.loadComplete("[MathJax]/config/local/stix.js");' \
		> reports/mathjax/config/local/stix.js
	touch $@

reports/%.ipynb: notebooks/%.ipynb $(VENV)/.installed reports/mathjax/MathJax.js
	$(BIN)/jupyter nbconvert --to notebook --execute $< --output-dir reports \
		--ExecutePreprocessor.timeout=900 --TagRemovePreprocessor.enabled=True \
		--TagRemovePreprocessor.remove_cell_tags=remove-cell
	$(BIN)/jupyter nbconvert --to html $@ --ClearMetadataPreprocessor.enabled=True \
		'--HTMLExporter.mathjax_url=$(MATHJAX_URL)'

tutorial: reports/01_t1_inversion_recovery.ipynb
	@echo "Executed notebook and HTML report: reports/01_t1_inversion_recovery.{ipynb,html}"

run: $(NOTEBOOKS:notebooks/%.py=reports/%.ipynb)

reports: run
	@echo "HTML reports of every notebook: reports/*.html"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
browser:
	@if [ -x "$${QMRI_CHROMIUM:-/usr/bin/chromium}" ]; then echo "Browser: $${QMRI_CHROMIUM:-/usr/bin/chromium}"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "No /usr/bin/chromium: the browser tests will skip (sudo apt-get install chromium)"; fi

test: lint browser reports
	$(BIN)/pytest --nbmake

sync: setup
	$(BIN)/ruff format notebooks
	$(BIN)/jupytext --sync $(NOTEBOOKS)

clean:
	rm -rf reports .pytest_cache
