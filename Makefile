# Everything a user or CI needs, in a local virtual environment (.venv).
#   make tutorial   install, then execute the notebooks into the site, build/site/index.html
#   make test       install (Chromium too, where missing and apt-get can), lint, build the
#                   site, then run every test: the package, the notebooks, the browser
# Other targets: setup, site (TEACHER=1: the teacher edition), lint, sync (re-pair
# .py/.ipynb), clean.
PYTHON ?= python3
VENV ?= .venv
# Pinned: an unpinned torch pulls several GB of CUDA wheels on Linux. Where pip's index has
# only those, name PyTorch's CPU wheel index: make setup TORCH_INDEX_URL=<its URL>.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.py))

.PHONY: setup site tutorial browser test lint sync clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The site: every notebooks/NN_topic notebook, executed (through jupyter-cache, so an
# unchanged notebook does not run again), with a landing page, navigation, search and the
# data sources; MathJax and everything else are local, so it reads offline. docs/ holds its
# sources, build/ the result. TEACHER=1 builds the teacher edition, with the exercises'
# solutions shown in full, into build/site-teacher.
SITE := build/site$(if $(TEACHER),-teacher)

site: $(VENV)/.installed
	$(BIN)/sphinx-build -b html -W --keep-going -q $(if $(TEACHER),-t teacher) \
		-d $(SITE)-doctrees docs $(SITE)
	@echo "Site: $(SITE)/index.html"

tutorial: site
	@echo "The T1 tutorial: $(SITE)/notebooks/01_t1_inversion_recovery.html"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
# Only where it is missing, as root, and only Chromium and the libraries it needs: no
# recommended packages, and nothing upgraded: where apt-get would upgrade a package to
# install it, this says so and installs nothing.
APT_CHROMIUM := apt-get install -y -qq --no-install-recommends --no-upgrade chromium
browser:
	@if [ -x "$${QMRI_CHROMIUM:-/usr/bin/chromium}" ]; then echo "Browser: $${QMRI_CHROMIUM:-/usr/bin/chromium}"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && \
		upgrades="$$($(APT_CHROMIUM) --simulate | grep '^Inst [^ ]* \[' || true)" && \
		if [ -n "$$upgrades" ]; then \
			echo "Not installing chromium: apt-get would also upgrade:"; echo "$$upgrades"; \
			echo "Install it yourself (apt-get install chromium); the browser tests skip without it"; \
		else DEBIAN_FRONTEND=noninteractive $(APT_CHROMIUM); fi; \
	else echo "No /usr/bin/chromium: the browser tests will skip (sudo apt-get install chromium)"; fi

test: lint browser site
	$(MAKE) site TEACHER=1
	$(BIN)/pytest --nbmake

sync: setup
	$(BIN)/ruff format notebooks
	$(BIN)/jupytext --sync $(NOTEBOOKS)

clean:
	rm -rf build docs/notebooks .pytest_cache
