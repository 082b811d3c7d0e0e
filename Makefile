# A newcomer's targets: install, demo, test, lint, bench.
# Everything runs in .venv; torch's small CPU build goes in first so that the
# loose `torch>=2.3` requirement is already satisfied and pip pulls no CUDA.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow test-all lint format bench samples clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,keras,onnx,map]"
	touch $(STAMP)

demo: install
	bash scripts/demo.sh

# Tests run in one process per CPU (at most 4), each torch on one thread (tests/conftest.py).
PYTEST := $(BIN)/python -m pytest -q -n auto --maxprocesses=4

test: install
	$(PYTEST) -m "not slow"

# Tests that take more than a few seconds each (regenerating the trained samples, ...).
test-slow: install
	$(PYTEST) -m slow

test-all: test test-slow

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python benchmarks/run.py

samples: install
	$(BIN)/python scripts/make_samples.py

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache .hypothesis
