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

dev: $(STAMP)
	$(BIN)/gengui dev

test: $(STAMP)
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
