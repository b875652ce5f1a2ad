# make dev   — run gengui on this machine (embedded Postgres + Valkey unless GENGUI_*_URL are set)
# make test  — the whole test suite (same rule for servers)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint typecheck check bench clean

# torch for the `gpu` extra (the diffusers engine, tested on CPU by `make test`). On Linux,
# PyPI's torch is the multi-GB CUDA build; where a CPU-only wheel for the venv's Python lies
# in TORCH_WHEELS (CI machines carry one in /opt/wheels), that wheel is installed instead.
# TORCH overrides the choice with any pip arguments, e.g. TORCH=/path/to/torch-cpu.whl.
TORCH_WHEELS ?= /opt/wheels
TORCH ?=

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	torch='$(TORCH)'; \
	if [ -z "$$torch" ]; then \
	  tag=$$($(BIN)/python -c 'import sys; print("cp%d%d" % sys.version_info[:2])'); \
	  torch=$$(ls $(TORCH_WHEELS)/torch-*+cpu-$$tag-$$tag-*.whl 2>/dev/null | sort -V | tail -n 1); \
	fi; \
	echo "installing torch from: $${torch:-PyPI}"; \
	$(BIN)/python -m pip install --quiet -e '.[dev,gpu]' $$torch
	touch $(STAMP)

# Debian's chromium for the web client's browser tests (tests/browser, Playwright with
# executable_path): installed with apt-get when missing, where we are root and apt-get
# exists (about 40 s); elsewhere the browser tests fail and say how to install it.
# Playwright's own browser downloads (`playwright install`) are never used.
CHROMIUM ?= /usr/bin/chromium

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else \
	  echo "$(CHROMIUM) is missing (installing it needs root and apt-get):" \
	    "the browser tests will fail"; \
	fi

dev: $(STAMP)
	$(BIN)/gengui dev

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

bench: $(STAMP)
	$(BIN)/python bench/e2e.py

clean:
	rm -rf $(VENV) .gengui .pytest_cache .mypy_cache .ruff_cache
