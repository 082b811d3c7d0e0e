# A newcomer's targets: install, demo, test, lint, bench, docs.
# Everything runs in .venv; torch goes in first so that the loose `torch>=2.3`
# requirement is already satisfied when the project is installed. From PyPI on
# Linux `torch` is the CUDA build (gigabytes); PyTorch's own CPU index has the
# small one: `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow test-all lint format bench samples docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
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

# The documentation site (mkdocs.yml, docs/): built strictly, every warning an error.
DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

samples: install
	$(BIN)/python scripts/make_samples.py

clean:
	rm -rf $(VENV) demo_out bench_out site .pytest_cache .hypothesis
