"""label_next through Kedro's runner: rank the pool, fill in the manifest, train on it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from tests.conftest import backbone_choice_inputs, write_image
from transfer_learning.features.acquisition import AcquisitionError
from transfer_learning.pipeline_registry import register_pipelines
from transfer_learning.pipelines import data_ingestion

COUNT = 6


def run(pipeline_name: str, data: dict, label_next: dict | None = None) -> dict:
    catalog = DataCatalog(
        {
            "params:data": MemoryDataset(data),
            "stored_label_issues": MemoryDataset(None),
            "params:backbone": MemoryDataset({"name": "efficientnet_lite0", "image_size": 32}),
            "params:extraction": MemoryDataset({"cache_dir": None, "progress": False}),
            "params:device": MemoryDataset("cpu"),
            "params:distributed": MemoryDataset({}),
            **backbone_choice_inputs(),
            "params:head": MemoryDataset({}),
            "params:label_next": MemoryDataset(label_next or {"count": COUNT}),
        }
    )
    return SequentialRunner().run(register_pipelines()[pipeline_name], catalog)


def test_label_next_round_trip_from_a_folder_to_a_filled_manifest(make_image_folder, tmp_path):
    root = make_image_folder({"ant": 6, "bee": 6}, splits=("train", "test"))
    rng = np.random.default_rng(7)
    pool = tmp_path / "unsorted" / "deeper"  # any depth, no class folders
    truth = {
        str(write_image(pool / f"{kind}_{i}.png", rng)): kind
        for kind in ("ant", "bee")
        for i in range(8)
    }
    shutil.copy(root / "test" / "ant" / "000.png", pool / "same_as_a_test_image.png")
    data = {
        "source": "imagefolder",
        "path": str(root),
        "unlabelled_path": str(tmp_path / "unsorted"),
    }

    outputs = run("label_next", data)
    ranked = outputs["label_next"].load()
    assert list(ranked.columns) == [
        "path",
        "rank",
        "suggested_label",
        "confidence",
        "score",
        "reason",
    ]
    assert ranked["rank"].tolist() == list(range(1, COUNT + 1))
    assert set(ranked["path"]) <= set(truth)  # the copy of a test image is never proposed
    assert set(ranked["suggested_label"]) <= {"ant", "bee"}
    assert ranked["confidence"].between(0.5, 1).all()  # the most probable of two classes
    choice = outputs["label_next_choice"].load()
    assert choice["method"] == "typicality"  # 2 classes, fewer than 8 labels a class

    # The labeller fills in the batch's labels; the manifest goes back in as the data.
    manifest = outputs["label_next_manifest"].load()
    batch = manifest.head(COUNT)
    assert batch["path"].tolist() == ranked["path"].tolist() and (batch["label"] == "").all()
    manifest.loc[batch.index, "label"] = [truth[path] for path in batch["path"]]
    manifest.to_csv(tmp_path / "labels.csv", index=False)
    again = SequentialRunner().run(
        data_ingestion.create_pipeline(),
        DataCatalog(
            {
                "params:data": MemoryDataset(
                    {
                        "source": "manifest",
                        "manifest": str(tmp_path / "labels.csv"),
                        "split_column": "split",
                    }
                ),
                "params:seed": MemoryDataset(0),
                "stored_label_issues": MemoryDataset(None),
            }
        ),
    )
    index, left = again["image_index"].load(), again["unlabelled_index"].load()
    trained = index[index["location"].isin(ranked["path"])]
    assert len(trained) == COUNT and (trained["split"] == "train").all()
    assert trained.set_index("location")["class_name"].to_dict() == {
        p: truth[p] for p in ranked["path"]
    }
    test = index[index["split"] == "test"]["location"]
    assert sorted(test) == sorted(str(p) for p in (root / "test").rglob("*.png"))  # unchanged
    assert sorted(left["location"]) == sorted(set(truth) - set(ranked["path"]))


def test_label_next_says_when_the_pool_is_empty(make_image_folder, tmp_path):
    root = make_image_folder({"ant": 6, "bee": 6}, splits=("train", "test"))
    (tmp_path / "nothing").mkdir()
    data = {
        "source": "imagefolder",
        "path": str(root),
        "unlabelled_path": str(tmp_path / "nothing"),
    }
    with pytest.raises(AcquisitionError, match="pool is empty"):
        run("label_next", data)
    # The rest of a run works: ingestion gives an empty pool and the index as before.
    outputs = run("data_ingestion", data)
    assert outputs["unlabelled_index"].load().empty and len(outputs["image_index"].load()) == 24
