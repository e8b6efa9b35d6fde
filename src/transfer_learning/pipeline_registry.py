"""Project pipelines.

Each strategy's pipeline runs everything it needs, from ingestion to evaluation, so that
`kedro run --pipelines=feature_transfer` works on a fresh clone. The pipelines are composed
from each folder's `create_pipeline` directly rather than through `find_pipelines`, which in
Kedro 1.7 loads only the pipelines named on the command line and so cannot compose them.
"""

from __future__ import annotations

from kedro.pipeline import Pipeline

from transfer_learning.pipelines import (
    data_ingestion,
    evaluation,
    feature_extraction,
    feature_transfer,
)


def register_pipelines() -> dict[str, Pipeline]:
    ingestion = data_ingestion.create_pipeline()
    extraction = ingestion + feature_extraction.create_pipeline()
    pipelines = {
        "data_ingestion": ingestion,
        "feature_extraction": extraction,
        "feature_transfer": extraction
        + feature_transfer.create_pipeline()
        + evaluation.evaluation_for("feature_transfer"),
        "evaluation": evaluation.create_pipeline(),
    }
    pipelines["__default__"] = pipelines["feature_transfer"]
    return pipelines
