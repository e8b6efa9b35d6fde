"""The strategy registry: each transfer strategy declared once, with its pipeline.

Everything that concerns "all strategies" — the pipeline registry, evaluation, the comparison,
predict's choice of model — iterates over `STRATEGIES`. A strategy is one module under
`pipelines/` whose `create_pipeline()` ends in three datasets of its namespace:
`<name>.image_model` (the deployable, calibrated `serving.classifier.ImageModel`),
`<name>.training_summary` (with `fit_seconds` and `trainable_parameters`) and
`<name>.other_seeds` (the same trained with each other seed of `evaluation.seeds`); a strategy of the
combined kind reads its `members`' outputs, and their pipelines run with it. Adding one is that
module, its facts in `core/strategies.py` (name, kind, colour) and one line below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kedro.pipeline import Pipeline

from transfer_learning.core.strategies import BY_NAME, StrategyFacts
from transfer_learning.pipelines import (
    ensemble,
    feature_transfer,
    parameter_transfer,
    structure_transfer,
)


@dataclass(frozen=True)
class Strategy:
    facts: StrategyFacts
    create_pipeline: Callable[[], Pipeline]  # training → <name>.image_model, .training_summary

    @property
    def name(self) -> str:
        return self.facts.name

    @property
    def colour(self) -> str:
        return self.facts.colour

    @property
    def kind(self) -> str:
        return self.facts.kind

    @property
    def members(self) -> tuple[str, ...]:
        return self.facts.members


def _strategy(name: str, create_pipeline: Callable[[], Pipeline]) -> Strategy:
    return Strategy(BY_NAME[name], create_pipeline)


STRATEGIES: tuple[Strategy, ...] = (
    _strategy("feature_transfer", feature_transfer.create_pipeline),
    _strategy("parameter_transfer", parameter_transfer.create_pipeline),
    _strategy("structure_transfer", structure_transfer.create_pipeline),
    _strategy("ensemble", ensemble.create_pipeline),
)

STRATEGY_NAMES: tuple[str, ...] = tuple(strategy.name for strategy in STRATEGIES)
