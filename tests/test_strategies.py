"""The strategy registry: a new strategy is one module plus one registry entry."""

from __future__ import annotations

import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner

from tests import toy_strategy
from tests.conftest import backbone_choice_inputs
from transfer_learning.core.strategies import FEATURES, StrategyFacts
from transfer_learning.pipeline_registry import build_pipelines, register_pipelines
from transfer_learning.reporting.statistics import SEEDS_BOOTSTRAP
from transfer_learning.strategies import STRATEGIES, STRATEGY_NAMES, Strategy

TOY = Strategy(
    StrategyFacts(toy_strategy.NAME, FEATURES, "features → k nearest neighbours", "#C44E52"),
    toy_strategy.create_pipeline,
)


def node_names(pipeline) -> set[str]:
    return {node.name for node in pipeline.nodes}


def test_registry_names_the_strategies_once():
    assert STRATEGY_NAMES == (
        "feature_transfer",
        "parameter_transfer",
        "structure_transfer",
        "ensemble",
    )
    pipelines = register_pipelines()
    assert set(STRATEGY_NAMES) <= set(pipelines)
    # Each strategy's pipeline pulls in only the shared stages its inputs need.
    assert "extract_image_features" in node_names(pipelines["feature_transfer"])
    assert "extract_image_features" not in node_names(pipelines["parameter_transfer"])
    assert "index_images" in node_names(pipelines["parameter_transfer"])
    assert {f"{name}.score_test_split" for name in STRATEGY_NAMES} <= node_names(
        pipelines["__default__"]
    )
    # The ensemble runs its members' pipelines (not their evaluation) and is calibrated itself.
    ensemble = node_names(pipelines["ensemble"])
    assert {"feature_transfer.fit_head", "parameter_transfer.train_model"} <= ensemble
    assert "structure_transfer.train_model" not in ensemble
    assert "feature_transfer.score_test_split" not in ensemble
    assert {"ensemble.combine_models", "ensemble.calibrate_image_model"} <= ensemble
    for name in STRATEGY_NAMES:
        assert f"{name}.calibrate_image_model" in node_names(pipelines["__default__"])


@pytest.mark.slow  # over 7 s alone: `make test` runs it, `make test-fast` does not
def test_a_toy_strategy_runs_through_evaluation_and_comparison():
    pipelines = build_pipelines((STRATEGIES[0], TOY))
    assert {"extract_image_features", f"{TOY.name}.evaluate_test_predictions"} <= node_names(
        pipelines[TOY.name]
    )
    catalog = DataCatalog(
        {
            "params:data": MemoryDataset({"source": "digits"}),
            "params:seed": MemoryDataset(0),
            "stored_label_issues": MemoryDataset(None),
            # Two seeds: the new strategy's other seed goes through evaluation and comparison.
            "params:evaluation": MemoryDataset({"seeds": 2}),
            "params:backbone": MemoryDataset({"name": "efficientnet_lite0", "image_size": 32}),
            "params:extraction": MemoryDataset({"cache_dir": None, "progress": False}),
            "params:device": MemoryDataset("cpu"),
            "params:distributed": MemoryDataset({}),
            **backbone_choice_inputs(),
            "params:head": MemoryDataset({"type": "logistic_regression", "grid": {"C": [0.1]}}),
        }
    )
    # Without the registry step, so that the comparison's record is an output to read here.
    champion = Pipeline([n for n in pipelines["__default__"].nodes if n.name == "choose_champion"])
    outputs = SequentialRunner().run(pipelines["__default__"] - champion, catalog)
    report = outputs["comparison_report"].load()
    assert f"| {TOY.name} |" in report and "| feature_transfer |" in report
    assert f"Trained with several seeds (feature_transfer 2, {TOY.name} 2;" in report
    record = outputs["comparison_record"].load()
    assert [pair["test"] for pair in record["pairwise"]] == [SEEDS_BOOTSTRAP]
    chart = outputs["comparison_chart"].load()
    toy_bars = [
        bar
        for bar in chart.axes[0].patches
        if bar.get_facecolor()[:3] == (196 / 255, 78 / 255, 82 / 255)
    ]
    assert len(toy_bars) == 1
    toy_metrics = outputs[f"{TOY.name}.mlflow_metrics"].load()
    assert toy_metrics["accuracy"]["value"] > 0.5 and toy_metrics["n_test"]["value"] == 360
