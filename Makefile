# llmctl developer entry points. `make demo` and `make test` install what they need themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.llmctl-bootstrap.stamp
PYTEST_ARGS ?=

# Re-run the bootstrap when any of its inputs changes: the script, the requirements, the packaging
# files and the Cython/C sources (the C files Cython generates from a .pyx are not inputs).
PYX          := $(shell find runtime registry manager -name '*.pyx' 2>/dev/null)
BUILD_INPUTS := $(filter-out $(PYX:.pyx=.c),\
                  $(shell find runtime registry manager \( -name '*.pyx' -o -name '*.pxd' \
                    -o -name '*.pxi' -o -name '*.c' -o -name '*.h' \) 2>/dev/null))
BOOTSTRAP_INPUTS := scripts/bootstrap.sh requirements-dev.txt \
                    $(wildcard pyproject.toml setup.py setup.cfg) $(BUILD_INPUTS)

.PHONY: help bootstrap test demo lint bench clean distclean

help:
	@echo "make demo       generate, build, sign, verify, install, query, upgrade, roll back a demo model"
	@echo "make test       run the whole test suite"
	@echo "make lint       ruff + mypy"
	@echo "make bench      runtime speed benchmark"
	@echo "make bootstrap  install everything (done by the targets above)"
	@echo "make clean      remove build products;  make distclean  also removes .venv"

bootstrap: $(STAMP)

$(STAMP): $(BOOTSTRAP_INPUTS)
	bash scripts/bootstrap.sh
	@touch $@

test: bootstrap
	$(PYTHON) -m pytest -ra $(PYTEST_ARGS) tests/

demo: bootstrap
	bash scripts/demo.sh

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy runtime manager registry benchmarks

bench: bootstrap
	$(PYTHON) -m benchmarks.runtime_speed --threads 1,2 --out docs/benchmarks.md

clean:
	rm -rf build/ *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	rm -f runtime/kernels/_kernels.c
	find runtime registry manager benchmarks tests -name '*.so' -delete 2>/dev/null || true
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
	rm -f $(STAMP) $(VENV)/.llmctl-build

distclean: clean
	rm -rf $(VENV)
