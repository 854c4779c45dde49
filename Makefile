# Everything a user or CI needs, in a local virtual environment (.venv).
#   make tutorial   install, then execute notebook 01 into reports/ (.ipynb and .html)
#   make test       install, then lint and run every test, notebooks included
# Other targets: setup, run (all notebooks), lint, sync (re-pair .py/.ipynb), clean.
PYTHON ?= python3
VENV ?= .venv
# Pinned: an unpinned torch pulls several GB of CUDA wheels on Linux.
TORCH_VERSION ?= 2.13.0
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.py))

.PHONY: setup tutorial run test lint sync clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

reports/%.ipynb: notebooks/%.ipynb setup
	mkdir -p reports
	$(BIN)/jupyter nbconvert --to notebook --execute $< --output-dir reports \
		--ExecutePreprocessor.timeout=900
	$(BIN)/jupyter nbconvert --to html $@

tutorial: reports/01_t1_inversion_recovery.ipynb
	@echo "Executed notebook and HTML report: reports/01_t1_inversion_recovery.{ipynb,html}"

run: $(NOTEBOOKS:notebooks/%.py=reports/%.ipynb)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest --nbmake

sync: setup
	$(BIN)/ruff format notebooks
	$(BIN)/jupytext --sync $(NOTEBOOKS)

clean:
	rm -rf reports .pytest_cache
