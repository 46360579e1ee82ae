# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgetrio demo --data-dir .demo

lint: $(STAMP)
	$(BIN)/ruff check daemon cloud tools tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m tools.bench_ingest
	$(BIN)/python -m tools.bench_relay

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
