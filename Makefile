# `make demo` and `make test` create .venv and install everything on first use (CPU torch 2.13.0).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
FIXTURES ?= fixtures

.PHONY: install fixtures demo app test test-interop lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

fixtures: $(FIXTURES)/fixtures.json

$(FIXTURES)/fixtures.json: $(STAMP) qscope_train/tiny.py
	$(PY) scripts/make_tiny_model.py --out $(FIXTURES) --force

DEMO_PROMPTS = 'browse.prompts=["the cat sat on the mat . 12 + 7 = 19","def add(x, y): return x + y * 3"]'

# the demo trains SAEs on the tiny base model, then adapts them to its chat-tuned variant
demo: fixtures
	QSCOPE_FIXTURES=$(abspath $(FIXTURES)) $(VENV)/bin/qscope-train experiment=demo \
		'stages=[cache,fit,evaluate,export,browse,compare]' $(DEMO_PROMPTS)
	QSCOPE_FIXTURES=$(abspath $(FIXTURES)) $(VENV)/bin/qscope-train experiment=demo_adapt \
		'stages=[cache,fit,evaluate,export,adapt,browse]' $(DEMO_PROMPTS)

# the analyze / compare / steer app on the demo's exports (make demo first); PORT=0 picks a free port
PORT ?= 7860
app: $(STAMP)
	$(VENV)/bin/qscope-train-app saes=outputs/demo/export browse=outputs/demo/browse port=$(PORT)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# the optional cross-library tests, against peers installed apart (../shared/anchors/setup.sh)
ANCHORS ?= $(HOME)/.cache/qscope-anchors
test-interop: $(STAMP)
	QSCOPE_SAELENS_PYTHON=$(ANCHORS)/saelens/bin/python QSCOPE_SPARSIFY_PYTHON=$(ANCHORS)/sparsify/bin/python \
		$(PY) -m pytest -q tests/test_interop_saelens.py tests/test_convert.py

lint: $(STAMP)
	$(VENV)/bin/ruff check qscope_train tests scripts train.py
	$(VENV)/bin/ruff format --check qscope_train tests scripts train.py

format: $(STAMP)
	$(VENV)/bin/ruff format qscope_train tests scripts train.py
	$(VENV)/bin/ruff check --fix qscope_train tests scripts train.py

clean:
	rm -rf outputs $(FIXTURES) .pytest_cache
