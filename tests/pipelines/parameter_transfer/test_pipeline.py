from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from transfer_learning.image_index import DataSettings, build_image_index
from transfer_learning.pipelines.evaluation import evaluation_for
from transfer_learning.pipelines.parameter_transfer import finetuning_pipeline

RECIPE = {
    "epochs": 2,
    "batch_size": 16,
    "image_size": 32,
    "hflip": False,
    "progress": False,
    "patience": None,
}


def run(strategy: str, tmp_path, overrides: dict, evaluate: bool = True):
    index, classes, _ = build_image_index(DataSettings(), seed=0)
    index = index.groupby("split", group_keys=False).head(60).reset_index(drop=True)
    catalog = DataCatalog(
        {
            "image_index": MemoryDataset(index),
            "class_names": MemoryDataset({"classes": classes}),
            "params:backbone": MemoryDataset({"name": "efficientnet_lite0", "image_size": 64}),
            "params:finetune": MemoryDataset({**RECIPE, "checkpoint_dir": str(tmp_path)}),
            f"params:{strategy}.finetune": MemoryDataset(overrides),
            "params:seed": MemoryDataset(3),
            "params:device": MemoryDataset("cpu"),
        }
    )
    pipeline = finetuning_pipeline(strategy)
    if evaluate:
        pipeline += evaluation_for(strategy)
    outputs = SequentialRunner().run(pipeline, catalog)
    return {
        name: dataset.load()
        for name, dataset in outputs.items()
        if not name.endswith("mlflow_model")
    }


def test_same_seed_same_metrics_on_cpu(tmp_path):
    first = run("parameter_transfer", tmp_path, {"init": "pretrained"})[
        "parameter_transfer.metrics"
    ]
    second = run("parameter_transfer", tmp_path, {"init": "pretrained"})[
        "parameter_transfer.metrics"
    ]
    first.pop("fit_seconds"), second.pop("fit_seconds")
    assert first == second
    assert first["n_test"] == 60 and first["strategy"] == "parameter_transfer"


def test_structure_transfer_uses_its_own_overrides(tmp_path):
    outputs = run("structure_transfer", tmp_path, {"init": "random", "epochs": 1}, evaluate=False)
    summary = outputs["structure_transfer.training_summary"]
    assert summary["init"] == "random" and summary["epochs_run"] == 1
    assert summary["image_size"] == 32
    history = outputs["structure_transfer.training_history"]
    assert [point["step"] for point in history["val_accuracy"]] == [1]
    assert outputs["structure_transfer.test_predictions"]["probabilities"].shape == (60, 10)
