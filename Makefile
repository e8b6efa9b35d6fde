# Two commands for a new user: `make run` and `make test`. Both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Kedro telemetry never prompts and never sends (see also .telemetry).
export KEDRO_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: install run test test-fast lint clean airflow airflow-env airflow-dags airflow-standalone

install: $(STAMP)

# Re-installs only when pyproject.toml changes, so repeated calls are cheap (idempotent).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: install
	$(BIN)/kedro run

# Everything, as CI runs it, Airflow's DAG tests included (their environment is built first);
# --durations shows the slowest tests in every run.
test: install airflow-env
	$(BIN)/python -m pytest --durations=25

# The inner loop: everything but the tests marked slow.
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

# Style, then the licences: no GPL/AGPL-only runtime dependency (the project is Apache-2.0).
lint: install
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python scripts/check_licences.py

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) airflow_dags airflow_home dist

# ---- Airflow (see README, "Schedule it") ------------------------------------------------------
# Build outputs are rebuilt only when what they are made from changes: the wheel and the
# configuration archive from src/ and conf/, the DAG files also from the template, and Airflow's
# environment when the Airflow pin or the project's runtime dependencies change.
AIRFLOW_PIPELINES := __default__,feature_transfer,parameter_transfer,structure_transfer,predict
AIRFLOW_PIN := apache-airflow==3.3.2
AIRFLOW_VENV ?= .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed
AIRFLOW_REQUIREMENTS := $(AIRFLOW_VENV)/requirements.in
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

# The Airflow pin and the project's runtime dependencies; rewritten only when they change, so
# that an edit elsewhere in pyproject.toml does not reinstall Airflow.
$(AIRFLOW_REQUIREMENTS): pyproject.toml
	mkdir -p $(AIRFLOW_VENV)
	{ echo "$(AIRFLOW_PIN)"; sed -n '/^dependencies = \[/,/^\]/p' pyproject.toml; } > $@.new
	if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

$(AIRFLOW_STAMP): $(AIRFLOW_REQUIREMENTS)
	test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet "$(AIRFLOW_PIN)" -e .
	touch $(AIRFLOW_STAMP)

airflow-standalone: airflow
	$(AIRFLOW_ENV) $(AIRFLOW_VENV)/bin/airflow standalone
