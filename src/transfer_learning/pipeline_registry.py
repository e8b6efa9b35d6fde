"""Project pipelines, assembled from the strategy registry (`strategies.STRATEGIES`).

Each strategy's pipeline runs everything it needs, from ingestion to its evaluation, so that
`kedro run --pipelines=<strategy>` works on a fresh clone: the shared stages a strategy
needs are found from its inputs, not listed by hand. The pipelines are composed here directly
rather than through `find_pipelines`, which in Kedro 1.7 loads only the pipelines named on the
command line and so cannot compose them.
"""

from __future__ import annotations

from collections.abc import Sequence

from kedro.pipeline import Pipeline

from transfer_learning.adaptation.registry import METHODS, adapted_model_names
from transfer_learning.pipelines import (
    backbone_selection,
    comparison,
    data_ingestion,
    data_quality,
    domain_adaptation,
    evaluation,
    feature_extraction,
    label_next,
    learning_curve,
    predict,
)
from transfer_learning.strategies import STRATEGIES, Strategy


def register_pipelines() -> dict[str, Pipeline]:
    return build_pipelines(STRATEGIES)


def build_pipelines(strategies: Sequence[Strategy]) -> dict[str, Pipeline]:
    """The named pipelines for `strategies`: the shared stages, one per strategy, the rest."""
    ingestion = data_ingestion.create_pipeline()
    shared = ingestion + feature_extraction.create_pipeline()
    names = [strategy.name for strategy in strategies]
    # Created once: a combined strategy adds its members' very nodes, which Kedro then merges.
    trained = {strategy.name: strategy.create_pipeline() for strategy in strategies}
    per_strategy = {}
    for strategy in strategies:
        members = sum((trained[name] for name in strategy.members), Pipeline([]))
        own = trained[strategy.name] + members + evaluation.evaluation_for(strategy.name)
        # Only the shared stages that produce this strategy's inputs (features or not).
        per_strategy[strategy.name] = (
            shared.to_outputs(*(own.inputs() & shared.all_outputs())) + own
        )
    compare = comparison.create_pipeline(strategies)
    adaptation = _domain_adaptation(shared, strategies)
    curve = learning_curve.create_pipeline()
    quality = data_quality.create_pipeline()
    ranking = label_next.create_pipeline()
    return {
        "data_ingestion": ingestion,
        "backbone_selection": ingestion + backbone_selection.create_pipeline(),
        "feature_extraction": shared,
        "data_quality": shared.to_outputs(*(quality.inputs() & shared.all_outputs())) + quality,
        **per_strategy,
        "evaluation": evaluation.create_pipeline(names),
        "comparison": compare,
        **({"domain_adaptation": adaptation} if adaptation is not None else {}),
        "learning_curve": shared.to_outputs(*(curve.inputs() & shared.all_outputs())) + curve,
        "label_next": shared.to_outputs(*(ranking.inputs() & shared.all_outputs())) + ranking,
        "predict": predict.create_pipeline([*names, *adapted_model_names(METHODS)]),
        "__default__": sum(per_strategy.values(), Pipeline([])) + compare,
    }


def _domain_adaptation(shared: Pipeline, strategies: Sequence[Strategy]) -> Pipeline | None:
    """Source training of the strategies it adapts (the pretrained one of each kind), then the
    adaptation; the shared stages only as far as they are needed."""
    by_name = {strategy.name: strategy for strategy in strategies}
    sources = domain_adaptation.source_strategies()
    if not set(sources) <= set(by_name):
        return None
    own = sum(
        (by_name[name].create_pipeline() for name in sources), domain_adaptation.create_pipeline()
    )
    return shared.to_outputs(*(own.inputs() & shared.all_outputs())) + own
