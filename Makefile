# Two commands do all the set-up: `make demo` (the main job) and `make test` (the test suite).
# Both create or refresh the virtual environment .venv; a second run installs nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all venv clean data notebooks

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,faiss]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m utils_cv.similarity demo

test: $(STAMP)
	$(PY) -m pytest

# everything, the slow tests too
test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow"

# rebuild data/similarity from Debian packages (needs apt; using the data needs nothing)
data: $(STAMP)
	apt-get install -y --no-install-recommends tuxpaint-stamps-default gcompris-qt-data
	$(PY) data/tools/build_default_dataset.py

# re-run every notebook with its own parameters and store the outputs (long: trains models)
NOTEBOOKS ?= $(sort $(wildcard notebooks/[0-9]*.ipynb))
notebooks: $(STAMP)
	$(PY) -m utils_cv.common.notebook $(NOTEBOOKS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
