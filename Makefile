# Two commands for a new user: `make run` and `make test`. Both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Kedro telemetry never prompts and never sends (see also .telemetry).
export KEDRO_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: install run test test-fast lint clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes, so repeated calls are cheap (idempotent).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: install
	$(BIN)/kedro run

# Everything, as CI runs it (about 10 minutes on 2 cores).
test: install
	$(BIN)/python -m pytest

# The inner loop: everything but the tests marked slow (under a minute on 2 cores).
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV)
