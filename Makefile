# Two commands for a new user: `make run` and `make test`. Both set up .venv first, from the lock.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCKED := $(VENV)/.locked
# The pip that writes and reads the PEP 751 locks (pylock*.toml): pinned, as the locks are.
PIP_PIN := pip==26.3

# Kedro telemetry never prompts and never sends (see also .telemetry).
export KEDRO_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: install lock run test test-fast test-latest lint clean airflow airflow-env airflow-dags \
	airflow-standalone

install: $(STAMP)

# Exactly the tested set: a new .venv holding pylock.toml's versions, each file checked against
# its hash. Rebuilt whenever the lock changes, so nothing outside it lingers.
$(LOCKED): pylock.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(PIP_PIN)"
	$(BIN)/python -m pip install --quiet -r pylock.toml
	touch $@

# The project itself, editable; its requirements are the lock's, so nothing is resolved here.
$(STAMP): $(LOCKED) pyproject.toml
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The only way the locks change: re-resolve pylock.toml and pylock.airflow.toml within
# pyproject.toml's ranges (newest versions that fit), with pip's own configuration. The next
# `make install` rebuilds .venv from it. Run `make test-latest` first to see what would break.
LOCK_VENV := .venv-lock
lock:
	test -x $(LOCK_VENV)/bin/python || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet "$(PIP_PIN)"
	$(LOCK_VENV)/bin/python scripts/lock.py write

run: install
	$(BIN)/kedro run

# Everything, as CI runs it, Airflow's DAG tests included (their environment is built first);
# --durations shows the slowest tests in every run.
test: install airflow-env
	$(BIN)/python -m pytest --durations=25

# The inner loop: everything but the tests marked slow.
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

# The fast tests on the newest versions pyproject.toml allows, in a throw-away environment: what
# a `make lock` would bring, and what it would break. Not part of CI.
LATEST_VENV := .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet -e ".[dev]"
	$(LATEST_VENV)/bin/python scripts/lock.py compare
	$(LATEST_VENV)/bin/python -m pytest -m "not slow" -p no:cacheprovider

# Style, the locks (they match pyproject.toml, .venv holds pylock.toml), then the licences: no
# GPL/AGPL-only runtime dependency (the project is Apache-2.0).
lint: install
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python scripts/lock.py check
	$(BIN)/python scripts/check_licences.py

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) $(LOCK_VENV) $(LATEST_VENV) airflow_dags airflow_home dist

# ---- Airflow (see README, "Schedule it") ------------------------------------------------------
# Build outputs are rebuilt only when what they are made from changes: the wheel and the
# configuration archive from src/ and conf/, the DAG files also from the template, and Airflow's
# environment when its lock changes.
AIRFLOW_PIPELINES := __default__,feature_transfer,parameter_transfer,structure_transfer,predict
AIRFLOW_VENV ?= .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed
PROJECT_IN_AIRFLOW := $(AIRFLOW_VENV)/.project-installed
PROJECT_SOURCES := pyproject.toml $(shell find src conf -type f ! -path '*/__pycache__/*' \
	! -path 'conf/local/*' ! -path '*.egg-info/*' 2>/dev/null)
WHEEL_STAMP := dist/.built
DAGS_STAMP := airflow_dags/.built
# Airflow's settings for the local instance: its home (SQLite metadata DB), the generated DAGs,
# the project folder the tasks work in (data/, mlflow.db) and the packaged configuration.
# `airflow standalone` starts its components as `airflow ...` processes found on PATH.
AIRFLOW_ENV := AIRFLOW_HOME=$(CURDIR)/airflow_home AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/airflow_dags \
	AIRFLOW__CORE__LOAD_EXAMPLES=False TRANSFER_LEARNING_PROJECT_PATH=$(CURDIR) \
	TRANSFER_LEARNING_CONF_SOURCE=$(CURDIR)/dist/conf-transfer_learning.tar.gz \
	PATH=$(CURDIR)/$(AIRFLOW_VENV)/bin:$$PATH

airflow-dags: $(DAGS_STAMP)

$(DAGS_STAMP): $(STAMP) $(PROJECT_SOURCES) deploy/airflow_dag_template.j2
	rm -rf airflow_dags
	$(BIN)/kedro airflow create --env airflow --group-by memory \
		--jinja-file deploy/airflow_dag_template.j2 --target-dir airflow_dags \
		--pipelines $(AIRFLOW_PIPELINES) --conf-source dist/conf-transfer_learning.tar.gz
	touch $@

# The project's wheel and configuration archive (`kedro package`).
$(WHEEL_STAMP): $(STAMP) $(PROJECT_SOURCES)
	rm -rf dist
	$(BIN)/kedro package
	touch $@

# What the tests need: Airflow in its own virtual environment (its pinned dependencies are not
# the project's) with the project's wheel installed into it.
airflow-env: $(PROJECT_IN_AIRFLOW)

# Airflow, plus the DAG files and its metadata DB, for `make airflow-standalone` and by hand.
airflow: airflow-env $(DAGS_STAMP)
	$(AIRFLOW_ENV) $(AIRFLOW_VENV)/bin/airflow db migrate > /dev/null

$(PROJECT_IN_AIRFLOW): $(AIRFLOW_STAMP) $(WHEEL_STAMP)
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --no-deps --force-reinstall dist/*.whl
	touch $@

# Airflow (pyproject's `airflow` extra) and the project's runtime dependencies, exactly as
# pylock.airflow.toml has them; rebuilt whenever that lock changes.
$(AIRFLOW_STAMP): pylock.airflow.toml
	rm -rf $(AIRFLOW_VENV)
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet "$(PIP_PIN)"
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet -r pylock.airflow.toml
	touch $(AIRFLOW_STAMP)

airflow-standalone: airflow
	$(AIRFLOW_ENV) $(AIRFLOW_VENV)/bin/airflow standalone
