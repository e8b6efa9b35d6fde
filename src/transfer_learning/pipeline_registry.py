"""Project pipelines.

Each strategy's pipeline runs everything it needs, from ingestion to evaluation, so that
`kedro run --pipelines=feature_transfer` works on a fresh clone.
"""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

from transfer_learning.pipelines.evaluation import evaluation_for


def register_pipelines() -> dict[str, Pipeline]:
    found = find_pipelines(raise_errors=True)
    ingestion = found["data_ingestion"]
    extraction = ingestion + found["feature_extraction"]
    pipelines = {
        "data_ingestion": ingestion,
        "feature_extraction": extraction,
        "feature_transfer": extraction + found["feature_transfer"] + evaluation_for("feature_transfer"),
        "evaluation": found["evaluation"],
    }
    pipelines["__default__"] = pipelines["feature_transfer"]
    return pipelines
