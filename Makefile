# fvq: `make demo` and `make test` work from a fresh clone; both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fvq-installed
TORCH_VERSION ?= 2.13.0

.PHONY: demo test test-all lint bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so nothing below can pull an unpinned (CUDA) build
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fvq toy --out runs/toy

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check fvq tests scripts
	$(VENV)/bin/ruff format --check fvq tests scripts

bench: $(STAMP)
	$(PY) scripts/bench_search.py

clean-venv:
	rm -rf $(VENV)
