"""The comparison pipeline: every registered strategy's test metrics side by side."""

from collections.abc import Sequence

from kedro.pipeline import Node, Pipeline

from transfer_learning.pipelines import bind
from transfer_learning.reporting.comparison import Control
from transfer_learning.strategies import Strategy

from .nodes import choose_champion, compare_strategies


def create_pipeline(strategies: Sequence[Strategy] = (), **kwargs) -> Pipeline:
    compare = bind(
        compare_strategies,
        colours={s.name: s.colour for s in strategies},
        controls=tuple(
            Control(s.facts.control_for, s.name, s.facts.control_shows)
            for s in strategies
            if s.facts.control_for
        ),
    )
    return Pipeline(
        [
            Node(
                func=compare,
                inputs=[
                    *(f"{s.name}.metrics" for s in strategies),
                    *(f"{s.name}.test_predictions" for s in strategies),
                    *(f"{s.name}.seed_predictions" for s in strategies),
                ],
                outputs=[
                    "comparison_report",
                    "comparison_chart",
                    "comparison_record",
                    "comparison_tags",
                ],
                name="compare_strategies",
            ),
            Node(
                func=choose_champion,
                inputs="comparison_record",
                outputs="champion_model",
                name="choose_champion",
            ),
        ]
    )
