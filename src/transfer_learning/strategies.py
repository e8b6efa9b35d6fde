"""The strategy registry: each transfer strategy declared once.

Everything that concerns "all strategies" — the pipeline registry, evaluation, the comparison,
predict's choice of model, the notebook — iterates over `STRATEGIES`. A strategy is one module
under `pipelines/` whose `create_pipeline()` ends in two datasets of its namespace:
`<name>.image_model` (the deployable `serving.ImageClassifier`) and `<name>.training_summary`
(with `fit_seconds` and `trainable_parameters`). Adding one is that module plus one line below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kedro.pipeline import Pipeline

from transfer_learning.pipelines import (
    feature_transfer,
    parameter_transfer,
    structure_transfer,
)


@dataclass(frozen=True)
class Strategy:
    name: str  # the namespace of its datasets and parameters, and its name in every report
    description: str
    colour: str  # its bars in comparison.png
    create_pipeline: Callable[[], Pipeline]  # training → <name>.image_model, .training_summary
    control_for: str | None = None  # a strategy this one is the control of
    control_shows: str = ""  # what the accuracy gap to `control_for` measures


STRATEGIES: tuple[Strategy, ...] = (
    Strategy(
        "feature_transfer",
        "frozen pretrained backbone → features → a scikit-learn head",
        "#4C72B0",
        feature_transfer.create_pipeline,
    ),
    Strategy(
        "parameter_transfer",
        "start from the pretrained weights and fine-tune with torch",
        "#DD8452",
        parameter_transfer.create_pipeline,
    ),
    Strategy(
        "structure_transfer",
        "the same architecture, randomly initialised, trained on the target data",
        "#55A868",
        structure_transfer.create_pipeline,
        control_for="parameter_transfer",
        control_shows="what the pretrained weights are worth here",
    ),
)

STRATEGY_NAMES: tuple[str, ...] = tuple(strategy.name for strategy in STRATEGIES)
