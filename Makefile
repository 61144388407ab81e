# `make demo` and `make test` create .venv and install everything on first use (CPU torch 2.13.0).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
FIXTURES ?= fixtures

.PHONY: install fixtures demo test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

fixtures: $(FIXTURES)/fixtures.json

$(FIXTURES)/fixtures.json: $(STAMP) qscope_train/tiny.py
	$(PY) scripts/make_tiny_model.py --out $(FIXTURES) --force

demo: fixtures
	QSCOPE_FIXTURES=$(abspath $(FIXTURES)) $(VENV)/bin/qscope-train experiment=demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check qscope_train tests scripts train.py
	$(VENV)/bin/ruff format --check qscope_train tests scripts train.py

format: $(STAMP)
	$(VENV)/bin/ruff format qscope_train tests scripts train.py
	$(VENV)/bin/ruff check --fix qscope_train tests scripts train.py

clean:
	rm -rf outputs $(FIXTURES) .pytest_cache
