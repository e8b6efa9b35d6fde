"""The generated Airflow DAGs, imported and run by a real Airflow in its own environment
(`make test` builds .venv-airflow and the project's wheel and configuration archive first)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from tests.kedro_project import (
    copy_project,
    kedro,
    mlflow_client,
    noisy_digit_folders,
    succeeded,
)

pytestmark = pytest.mark.slow

AIRFLOW_PYTHON = PROJECT_ROOT / ".venv-airflow" / "bin" / "python"
AIRFLOW_PIPELINES = [
    "__default__",
    "feature_transfer",
    "parameter_transfer",
    "structure_transfer",
    "predict",
]
CONF_ARCHIVE = PROJECT_ROOT / "dist" / "conf-transfer_learning.tar.gz"


@pytest.fixture(scope="module")
def airflow_dags(tmp_path_factory) -> Path:
    """The DAGs as `make airflow-dags` writes them, with a 2 s retry delay for the tests."""
    if not AIRFLOW_PYTHON.exists() or not CONF_ARCHIVE.exists():
        pytest.fail("No Airflow environment: run `make airflow` (make test does) first.")
    folder = tmp_path_factory.mktemp("dags")
    completed = subprocess.run(
        [sys.executable, "-m", "kedro", "airflow", "create", "--env", "airflow", "--group-by",
         "memory", "--jinja-file", "deploy/airflow_dag_template.j2", "--target-dir", str(folder),
         "--pipelines", ",".join(AIRFLOW_PIPELINES), "--params", "retry_delay_seconds=2"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    return folder


def airflow_env(dags: Path, project: Path, conf_source: Path = CONF_ARCHIVE) -> dict[str, str]:
    """Airflow's settings for a local instance on `dags`, with tasks working in `project`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AIRFLOW"))}
    env.update(
        AIRFLOW_HOME=str(project / "airflow_home"),
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        TRANSFER_LEARNING_PROJECT_PATH=str(project),
        TRANSFER_LEARNING_CONF_SOURCE=str(conf_source),
        KEDRO_DISABLE_TELEMETRY="true",
        PATH=os.pathsep.join([str(AIRFLOW_PYTHON.parent), env.get("PATH", "")]),
    )
    return env


def airflow(env: dict[str, str], project: Path, *args: str) -> subprocess.CompletedProcess:
    """Airflow's Python in its own environment, with `env` (see `airflow_env`), in `project`."""
    return subprocess.run(
        [str(AIRFLOW_PYTHON), *args], cwd=project, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip


def kedro_task_graph(pipeline_name: str) -> set[tuple[str, str]]:
    """The edges the DAG must have: Kedro's node groups (`--group-by memory` in the airflow
    environment) and their dependencies, plus the MLflow run that comes first."""
    from kedro.framework.project import pipelines
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from kedro_airflow.grouping import group_memory_nodes
    from slugify import slugify

    bootstrap_project(PROJECT_ROOT)
    with KedroSession.create(project_path=PROJECT_ROOT, env="airflow") as session:
        catalog = session.load_context().catalog
    groups = group_memory_nodes(catalog, pipelines[pipeline_name])

    def task_id(name: str) -> str:  # as deploy/airflow_dag_template.j2 names the group's task
        return slugify(name, max_length=200)

    edges = {("start_mlflow_run", task_id(group.name)) for group in groups}
    edges |= {(task_id(dep), task_id(group.name)) for group in groups for dep in group.dependencies}
    return edges


def test_every_generated_dag_imports_and_has_kedros_graph(airflow_dags, tmp_path):
    script = """
import json, os
from airflow.models import DagBag
bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
print(json.dumps({
    "errors": {str(k): str(v) for k, v in bag.import_errors.items()},
    "dags": {dag_id: sorted([up, task.task_id] for task in dag.tasks for up in task.upstream_task_ids)
             for dag_id, dag in bag.dags.items()},
}))
"""
    completed = airflow(airflow_env(airflow_dags, tmp_path), tmp_path, "-c", script)
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert found["errors"] == {}
    expected_ids = {
        f"transfer-learning-{name.strip('_').replace('_', '-')}" for name in AIRFLOW_PIPELINES
    }
    assert set(found["dags"]) == expected_ids
    for name in AIRFLOW_PIPELINES:
        dag_id = f"transfer-learning-{name.strip('_').replace('_', '-')}"
        assert {tuple(edge) for edge in found["dags"][dag_id]} == kedro_task_graph(name), name
    # The resolved backbone is persisted: extraction and each training are tasks of their own.
    assert [
        "extract-image-features",
        "feature-transfer-split-features-feature-transfer-fit-head-feature-transfer-fit-other-seeds",
    ] in (found["dags"]["transfer-learning-feature-transfer"])


TRY_NUMBERS = """
from airflow.models.taskinstance import TaskInstance
from airflow.utils.session import create_session
with create_session() as session:
    for ti in session.query(TaskInstance).all():
        print(ti.task_id, ti.try_number, ti.state)
"""


def configuration_archive(project: Path, target: Path) -> Path:
    """The project's conf/ as `kedro package` archives it (local/*.yml left out)."""
    with tarfile.open(target, "w:gz") as archive:
        archive.add(
            project / "conf",
            arcname="conf",
            filter=lambda member: None if "/local/" in member.name + "/" else member,
        )
    return target


def dags_test_with_late_images(env: dict[str, str], workdir: Path, images: Path, log: Path) -> str:
    """`airflow dags test` of the feature_transfer DAG while the images are not there yet: they
    are written once a task has failed and waits for its retry. Returns the log."""
    with open(log, "w") as stream:
        run = subprocess.Popen(
            [str(AIRFLOW_PYTHON), "-m", "airflow", "dags", "test", "transfer-learning-feature-transfer"],
            cwd=workdir, env=env, stdout=stream, stderr=subprocess.STDOUT,
        )  # fmt: skip

        def deliver_images_after_the_first_failure() -> None:
            while "up_for_retry" not in log.read_text() and run.poll() is None:
                time.sleep(0.2)
            noisy_digit_folders(images, per_class=8)

        threading.Thread(target=deliver_images_after_the_first_failure, daemon=True).start()
        assert run.wait(timeout=900) == 0, log.read_text()[-3000:]
    return log.read_text()


def task_tries(env: dict[str, str], workdir: Path) -> dict[str, list[str]]:
    """Each task of the DAG run: [how many tries, final state]."""
    tries = airflow(env, workdir, "-c", TRY_NUMBERS)
    assert tries.returncode == 0, tries.stderr[-3000:]
    return {line.split()[0]: line.split()[1:] for line in tries.stdout.strip().splitlines()}


def test_a_dag_run_retries_a_failed_task_alone_and_equals_kedro_run(airflow_dags, tmp_path):
    """One `airflow dags test` of the feature_transfer DAG, on a packaged configuration archive:
    the images are not there yet, so index-images fails and is retried once they arrive, the
    task that had finished (the MLflow run) is not run again, every task logs into one MLflow
    run, and the metrics equal those of a plain `kedro run` of the same pipeline on the same
    images (features recomputed, not read from the DAG run's cache)."""
    workdir = copy_project(tmp_path / "airflow_project")
    images = tmp_path / "landing"
    (workdir / "conf" / "airflow" / "parameters.yml").write_text(
        f"data:\n  source: imagefolder\n  path: {images}\n"
    )
    archive = configuration_archive(workdir, tmp_path / "conf-transfer_learning.tar.gz")
    env = airflow_env(airflow_dags, workdir, conf_source=archive)
    env["PYTHONUNBUFFERED"] = "1"  # the log is watched while it is written
    migrated = airflow(env, workdir, "-m", "airflow", "db", "migrate")
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    log = dags_test_with_late_images(env, workdir, images, tmp_path / "dags_test.log")
    assert re.search(r"DagRun Finished: .* state=success", log)
    by_task = task_tries(env, workdir)
    assert by_task["start_mlflow_run"] == ["1", "success"]  # not recomputed
    assert by_task["index-images"] == ["2", "success"]  # failed once, retried
    assert by_task["feature-transfer-evaluate-test-predictions"] == ["1", "success"]

    reports = workdir / "data" / "08_reporting"
    by_airflow = json.loads((reports / "feature_transfer_metrics.json").read_text())
    assert by_airflow["n_test"] == 16  # 80 images, a fifth of them the test split
    client = mlflow_client(workdir)
    experiment = client.get_experiment_by_name("transfer_learning")
    (run,) = client.search_runs([experiment.experiment_id])  # every task logged into one run
    assert run.data.tags["airflow.dag_id"] == "transfer-learning-feature-transfer"
    assert run.data.tags["airflow.run_id"].startswith("manual__")
    assert run.data.metrics["feature_transfer.accuracy"] == by_airflow["accuracy"]
    assert "extraction.images_per_second" in run.data.metrics  # from an earlier task

    succeeded(
        kedro(
            workdir,
            "--pipelines=feature_transfer",
            f"--params=data.source=imagefolder,data.path={images},extraction.cache_dir=null",
        )
    )
    by_kedro = json.loads((reports / "feature_transfer_metrics.json").read_text())
    for metric in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece", "n_test"):
        assert by_airflow[metric] == pytest.approx(by_kedro[metric], abs=1e-9), metric


def api(url: str, token: str | None = None, body: dict | None = None) -> dict:
    """A JSON request to Airflow's API server; the JSON it answers."""
    import urllib.request

    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def until(deadline: float, check, what: str):
    """`check()`'s first truthy answer, tried every 3 s until `deadline` (time.monotonic)."""
    last = None
    while time.monotonic() < deadline:
        try:
            answer = check()
            if answer:
                return answer
            last = answer
        except OSError as error:  # the server is not listening yet, or answers an error
            last = error
        time.sleep(3)
    pytest.fail(f"{what} not reached in time; last answer: {last!r}")


def test_make_airflow_standalone_comes_up_healthy_and_lists_the_dags(tmp_path):
    """README's `make airflow-standalone` as a user runs it: every component healthy (its
    processes are `airflow ...` commands found on PATH), and the API lists the five DAGs."""
    from tests.test_served_endpoint import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_"))}
    env.update(AIRFLOW__API__PORT=str(port), KEDRO_DISABLE_TELEMETRY="true")
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "standalone.log").open("w")
    process = subprocess.Popen(
        ["make", "airflow-standalone"], cwd=PROJECT_ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        health = until(
            deadline,
            lambda: (
                (h := api(f"{base}/api/v2/monitor/health"))
                and all(part.get("status") == "healthy" for part in h.values())
                and h
            ),
            "every component healthy",
        )
        assert {"metadatabase", "scheduler", "triggerer", "dag_processor"} <= set(health)
        passwords = PROJECT_ROOT / "airflow_home" / "simple_auth_manager_passwords.json.generated"
        password = json.loads(passwords.read_text())["admin"]
        token = api(f"{base}/auth/token", body={"username": "admin", "password": password})
        expected = {
            f"transfer-learning-{name.strip('_').replace('_', '-')}" for name in AIRFLOW_PIPELINES
        }
        listed = until(
            deadline,
            lambda: (
                expected
                <= (
                    ids := {
                        d["dag_id"]
                        for d in api(f"{base}/api/v2/dags", token["access_token"])["dags"]
                    }
                )
                and ids
            ),
            "the five DAGs listed",
        )
        assert expected <= listed
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
