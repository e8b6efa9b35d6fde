import numpy as np
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from transfer_learning.data.index import build_image_index
from transfer_learning.data.settings import DataSettings
from transfer_learning.models.backbones import BackboneSettings, build_backbone
from transfer_learning.pipelines.evaluation import evaluation_for
from transfer_learning.pipelines.templates.network_training import network_training_pipeline

RECIPE = {"epochs": 2, "batch_size": 16, "hflip": False, "patience": None}


def run(strategy: str, tmp_path, overrides: dict, evaluate: bool = True, seeds: int = 1):
    index, classes, _ = build_image_index(DataSettings(), seed=0)
    index = index.groupby("split", group_keys=False).head(60).reset_index(drop=True)
    catalog = DataCatalog(
        {
            "image_index": MemoryDataset(index),
            "class_names": MemoryDataset({"classes": classes}),
            "data_profile": MemoryDataset(
                {"typical_short_side": 8, "n_train": 60, "mirror_symmetric": False}
            ),
            "backbone": MemoryDataset({"name": "efficientnet_lite0", "image_size": 64}),
            "params:finetune": MemoryDataset(RECIPE),
            "params:training": MemoryDataset({"checkpoint_dir": str(tmp_path), "progress": False}),
            f"params:{strategy}": MemoryDataset(overrides),
            "params:seed": MemoryDataset(3),
            "params:evaluation": MemoryDataset({"seeds": seeds}),
            "params:device": MemoryDataset("cpu"),
            "params:distributed": MemoryDataset({}),
        }
    )
    pipeline = network_training_pipeline(strategy)
    if evaluate:
        pipeline += evaluation_for(strategy, register=False)
    outputs = SequentialRunner().run(pipeline, catalog)
    return {name: dataset.load() for name, dataset in outputs.items()}


def test_same_seed_same_metrics_on_cpu(tmp_path):
    overrides = {"backbone": {"image_size": 32}}
    first = run("parameter_transfer", tmp_path, overrides)["parameter_transfer.metrics"]
    second = run("parameter_transfer", tmp_path, overrides)["parameter_transfer.metrics"]
    for timing in ("fit_seconds", "predict_seconds"):  # wall times differ between runs
        first.pop(timing), second.pop(timing)
    assert first == second
    assert first["n_test"] == 60 and first["strategy"] == "parameter_transfer"


@pytest.mark.slow  # over 7 s alone: `make test` runs it, `make test-fast` does not
def test_with_two_seeds_the_network_is_trained_twice_and_evaluated_over_both(tmp_path):
    overrides = {"backbone": {"image_size": 32}}
    once = run("parameter_transfer", tmp_path / "once", overrides)
    twice = run("parameter_transfer", tmp_path / "twice", overrides, seeds=2)
    # The other seed (3 + 1) trained in its own checkpoint folder: resuming one seed never continues another.
    assert (tmp_path / "twice" / "parameter_transfer" / "seed_4" / "last.pt").exists()
    assert (tmp_path / "twice" / "parameter_transfer" / "last.pt").exists()
    metrics, alone = twice["parameter_transfer.metrics"], once["parameter_transfer.metrics"]
    # The deployed model is the first seed's, the same whether or not others are trained.
    assert metrics["seeds"]["accuracy"][0] == alone["accuracy"] and metrics["ece"] == alone["ece"]
    assert metrics["seeds"]["count"] == 2 and metrics["seeds"]["other_seeds"] == [4]
    assert metrics["accuracy"] == pytest.approx(np.mean(metrics["seeds"]["accuracy"]))
    assert alone["seeds"] == {"count": 1}


def test_structure_transfer_trains_from_random_weights_with_its_own_overrides(tmp_path):
    overrides = {"backbone": {"pretrained": False, "image_size": 32}, "finetune": {"epochs": 1}}
    outputs = run("structure_transfer", tmp_path, overrides, evaluate=False)
    summary = outputs["structure_transfer.training_summary"]
    assert summary["recipe"]["backbone"]["pretrained"] is False and summary["epochs_run"] == 1
    assert summary["image_size"] == 32 and summary["recipe"]["finetune"]["batch_size"] == 16
    history = outputs["structure_transfer.training_history"]
    assert [point["step"] for point in history["val_accuracy"]] == [1]
    # The trained network is far from the pretrained one: it did not start there.
    pretrained = build_backbone(BackboneSettings(image_size=32)).features.state_dict()
    trained = outputs["structure_transfer.image_model"].network_state
    kernels = [key for key, tensor in pretrained.items() if tensor.ndim == 4]
    correlations = [
        float(
            torch.corrcoef(
                torch.stack([pretrained[k].flatten(), trained[f"features.{k}"].flatten()])
            )[0, 1]
        )
        for k in kernels
    ]
    assert np.median(np.abs(correlations)) < 0.2
    assert outputs["structure_transfer.image_model"].classes == [str(d) for d in range(10)]
