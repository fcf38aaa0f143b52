# Two entry points: `make demo` trains the bundled demo on CPU, `make test` runs the test suite.
# Each creates .venv/ on first use. torch is pinned here (not in the package metadata) so that
# pip takes the CPU wheel instead of a multi-GB CUDA build.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q -e ".[hf,dev]"
	touch $@

.PHONY: demo test lint bench
demo: $(VENV)/.installed
	$(VPY) -m internevo.demo

test: $(VENV)/.installed
	$(VPY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
