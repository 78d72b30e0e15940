# `make demo` and `make test` create .venv from requirements.txt when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast reproduce robust-data automata bench lint format clean-venv

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

reproduce: $(VENV)/.installed
	$(PY) scripts/reproduce.py

robust-data: $(VENV)/.installed
	$(PY) scripts/robust_data_study.py

automata: $(VENV)/.installed
	$(PY) scripts/automata_study.py

bench: $(VENV)/.installed
	NTK_CONV_IMPL=$${NTK_CONV_IMPL:-matmul} $(PY) benchmarks/bench_train.py

# every core (pytest-xdist), each test file on one worker so that its module fixtures run once,
# the longest files first (tests/conftest.py: LONGEST_FIRST)
test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=25 tests

# the tests not marked slow (end-to-end runs and the costliest checks left out): under 3 minutes on 2 cores
test-fast: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder -m "not slow" tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean-venv:
	rm -rf $(VENV)
