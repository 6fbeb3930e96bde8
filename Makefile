# flowprobe developer entry points. `make test` is what CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export FLOWPROBE_CACHE ?= $(HOME)/.cache/flowprobe
PYTEST_ARGS ?=

.PHONY: help deps venv native clean-native tools lint typecheck test test-fast demo bench bench-live clean

help:
	@echo "make demo       capture real traffic between namespace 'pods' and print the summary"
	@echo "make test       install what is missing, lint, typecheck and run every test suite"
	@echo "make test-fast  unit tests only (no root, no network namespaces, no builds)"
	@echo "make bench      offline and live throughput against raw tshark, the cost of OTLP export and of the WAF/DDR"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# The agent's per-packet modules compiled with mypyc (tools/build_native.py
# says why); the script compiles only when a source changed since the last
# build, and flowprobe.agent refuses compiled modules whose source changed.
native: venv
	$(PY) tools/build_native.py

clean-native:
	$(PYTHON) tools/build_native.py --clean

deps: venv
	bash tools/install-system-deps.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

# Components built from Go modules, cached by version under $(FLOWPROBE_CACHE):
# a no-op when the cache is warm, the cold path when it is not.
tools: backends-tools cluster-tools

test: deps lint typecheck crds-check tools native
	$(PY) -c "import operator, collections; operator.itemgetter"
	FLOWPROBE_EXPECT_NATIVE=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: native
	FLOWPROBE_EXPECT_NATIVE=1 $(PY) -m pytest -m "not capture and not netns and not cluster and not backends" $(PYTEST_ARGS)

demo: deps native
	$(PY) -m flowprobe.devenv.demo

bench: deps backends-tools cluster-tools native
	$(PY) -m flowprobe.devenv.bench
	$(PY) -m flowprobe.devenv.livebench
	$(PY) -m flowprobe.devenv.secbench
	$(PY) -m flowprobe.devenv.isolationbench
	$(PY) -m flowprobe.devenv.anomalybench
	$(MAKE) bench-operator
	$(MAKE) bench-enrich

bench-live: deps native
	$(PY) -m flowprobe.devenv.livebench

clean: clean-native
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

-include tools/mk/*.mk
