# Two commands for a new user: `make run` and `make test`. Both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Kedro telemetry never prompts and never sends (see also .telemetry).
export KEDRO_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: install run test test-fast lint clean airflow airflow-dags airflow-standalone

install: $(STAMP)

# Re-installs only when pyproject.toml changes, so repeated calls are cheap (idempotent).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: install
	$(BIN)/kedro run

# Everything, as CI runs it (about 20 minutes on 2 cores), Airflow's DAG tests included.
test: install airflow
	$(BIN)/python -m pytest

# The inner loop: everything but the tests marked slow (under a minute on 2 cores).
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) airflow_dags airflow_home dist

# ---- Airflow (see README, "Schedule it") ------------------------------------------------------
# The DAG files are build outputs of deploy/airflow_dag_template.j2 and conf/airflow/.
AIRFLOW_PIPELINES := __default__,feature_transfer,parameter_transfer,structure_transfer,predict
AIRFLOW_VENV ?= .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed
# Airflow's settings for the local instance: its home (SQLite metadata DB), the generated DAGs,
# the project folder the tasks work in (data/, mlflow.db) and the packaged configuration.
AIRFLOW_ENV := AIRFLOW_HOME=$(CURDIR)/airflow_home AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/airflow_dags \
	AIRFLOW__CORE__LOAD_EXAMPLES=False TRANSFER_LEARNING_PROJECT_PATH=$(CURDIR) \
	TRANSFER_LEARNING_CONF_SOURCE=$(CURDIR)/dist/conf-transfer_learning.tar.gz

airflow-dags: install
	rm -rf airflow_dags
	$(BIN)/kedro airflow create --env airflow --group-by memory \
		--jinja-file deploy/airflow_dag_template.j2 --target-dir airflow_dags \
		--pipelines $(AIRFLOW_PIPELINES) --conf-source dist/conf-transfer_learning.tar.gz

# Airflow in its own virtual environment (its pinned dependencies are not the project's), with
# the project's wheel installed into it, and the metadata DB initialised.
airflow: airflow-dags $(AIRFLOW_STAMP)
	rm -rf dist
	$(BIN)/kedro package
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --no-deps --force-reinstall dist/*.whl
	$(AIRFLOW_ENV) $(AIRFLOW_VENV)/bin/airflow db migrate > /dev/null

$(AIRFLOW_STAMP): pyproject.toml
	test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet "apache-airflow==3.3.2" -e .
	touch $(AIRFLOW_STAMP)

airflow-standalone: airflow
	$(AIRFLOW_ENV) $(AIRFLOW_VENV)/bin/airflow standalone
