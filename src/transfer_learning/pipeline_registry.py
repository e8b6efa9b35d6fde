"""Project pipelines.

Each strategy's pipeline runs everything it needs, from ingestion to evaluation, so that
`kedro run --pipelines=feature_transfer` works on a fresh clone. The pipelines are composed
from each folder's `create_pipeline` directly rather than through `find_pipelines`, which in
Kedro 1.7 loads only the pipelines named on the command line and so cannot compose them.
"""

from __future__ import annotations

from kedro.pipeline import Pipeline

from transfer_learning.pipelines import (
    comparison,
    data_ingestion,
    evaluation,
    feature_extraction,
    feature_transfer,
    parameter_transfer,
    predict,
    structure_transfer,
)


def register_pipelines() -> dict[str, Pipeline]:
    ingestion = data_ingestion.create_pipeline()
    extraction = ingestion + feature_extraction.create_pipeline()
    strategies = {
        "feature_transfer": extraction + feature_transfer.create_pipeline(),
        "parameter_transfer": ingestion + parameter_transfer.create_pipeline(),
        "structure_transfer": ingestion + structure_transfer.create_pipeline(),
    }
    pipelines = {
        "data_ingestion": ingestion,
        "feature_extraction": extraction,
        **{name: p + evaluation.evaluation_for(name) for name, p in strategies.items()},
        "evaluation": evaluation.create_pipeline(),
        "comparison": comparison.create_pipeline(),
        "predict": predict.create_pipeline(),
    }
    pipelines["__default__"] = (
        sum((pipelines[name] for name in strategies), Pipeline([])) + pipelines["comparison"]
    )
    return pipelines
