"""The plain facts of each transfer strategy: its name, kind, colour and what it is a control of.

No Kedro here: reports, learning curves and domain adaptation read these facts, and
`transfer_learning.strategies` pairs each with its pipeline. Code that treats strategies alike
asks for strategies of a *kind*, never for names:

- `FEATURES`: a head fitted on the frozen backbone's features (one fit, seconds);
- `NETWORK`: a whole network trained with torch (one training run per model);
- `COMBINED`: the calibrated probabilities of other strategies' models (its `members`),
  weighted on val; it trains nothing itself.

`pretrained` says whether a strategy starts from the pretrained weights; the one that does not is
the control that measures what those weights are worth.
"""

from __future__ import annotations

from dataclasses import dataclass

FEATURES = "features"
NETWORK = "network"
COMBINED = "combined"
KINDS = (FEATURES, NETWORK)  # the kinds that train a model of their own


@dataclass(frozen=True)
class StrategyFacts:
    name: str  # the namespace of its datasets and parameters, and its name in every report
    kind: str  # FEATURES or NETWORK
    description: str
    colour: str  # its bars and lines in every chart
    pretrained: bool = True  # starts from the pretrained weights
    control_for: str | None = None  # a strategy this one is the control of
    control_shows: str = ""  # what the accuracy gap to `control_for` measures
    members: tuple[str, ...] = ()  # COMBINED: the strategies whose models it combines


STRATEGY_FACTS: tuple[StrategyFacts, ...] = (
    StrategyFacts(
        "feature_transfer",
        FEATURES,
        "frozen pretrained backbone → features → a scikit-learn head",
        "#4C72B0",
    ),
    StrategyFacts(
        "parameter_transfer",
        NETWORK,
        "start from the pretrained weights and fine-tune with torch",
        "#DD8452",
    ),
    StrategyFacts(
        "structure_transfer",
        NETWORK,
        "the same architecture, randomly initialised, trained on the target data",
        "#55A868",
        pretrained=False,
        control_for="parameter_transfer",
        control_shows="what the pretrained weights are worth here",
    ),
    StrategyFacts(
        "ensemble",
        COMBINED,
        "feature_transfer's and parameter_transfer's calibrated probabilities, weighted on val",
        "#8172B3",
        members=("feature_transfer", "parameter_transfer"),
    ),
)

BY_NAME = {facts.name: facts for facts in STRATEGY_FACTS}
COLOURS = {facts.name: facts.colour for facts in STRATEGY_FACTS}


def names_of_kind(kind: str) -> tuple[str, ...]:
    """Every strategy of `kind`, in registry order."""
    return tuple(facts.name for facts in STRATEGY_FACTS if facts.kind == kind)


def pretrained_of_kind(kind: str) -> str:
    """The strategy of `kind` that starts from the pretrained weights: the one a learning curve
    compares by default and domain adaptation starts from."""
    return next(f.name for f in STRATEGY_FACTS if f.kind == kind and f.pretrained)


def pretrained_strategies() -> tuple[str, ...]:
    """One pretrained strategy of each kind, frozen features first."""
    return tuple(pretrained_of_kind(kind) for kind in KINDS)
