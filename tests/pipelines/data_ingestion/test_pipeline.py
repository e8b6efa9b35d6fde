import logging
import shutil

import numpy as np
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from tests.conftest import write_image
from transfer_learning.data.settings import DataSourceError
from transfer_learning.pipelines.data_ingestion import create_pipeline


def test_ingestion_pipeline_on_an_image_folder(make_image_folder):
    root = make_image_folder({"ant": 5, "bee": 5, "fly": 5})
    (root / "bee" / "bad.png").write_bytes(b"nope")
    catalog = DataCatalog(
        {
            "params:data": MemoryDataset(
                {"source": "imagefolder", "path": str(root), "on_corrupt": "skip"}
            ),
            "params:seed": MemoryDataset(0),
            "stored_label_issues": MemoryDataset(None),  # no data_quality run saved yet
        }
    )
    outputs = SequentialRunner().run(create_pipeline(), catalog)
    index = outputs["image_index"].load()
    assert len(index) == 15 and list(index.columns) == ["location", "label", "class_name", "split"]
    assert outputs["class_names"].load() == {"classes": ["ant", "bee", "fly"]}
    assert outputs["skipped_images"].load()["location"].str.endswith("bad.png").all()
    profile = outputs["data_profile"].load()
    # write_image makes 24x20 images; 15 - 1 skipped, 20 % test, 20 % of the rest val.
    assert profile["typical_short_side"] == 20 and profile["typical_long_side"] == 24
    assert profile["mirror_symmetric"] is True
    assert profile["n_train"] == (index["split"] == "train").sum()
    metrics = outputs["ingestion_metrics"].load()
    assert metrics["n_skipped"]["value"] == 1 and metrics["n_classes"]["value"] == 3


def ingest(data: dict) -> dict:
    catalog = DataCatalog(
        {
            "params:data": MemoryDataset(data),
            "params:seed": MemoryDataset(0),
            "stored_label_issues": MemoryDataset(None),
        }
    )
    return SequentialRunner().run(create_pipeline(), catalog)


def test_an_unlabelled_folder_becomes_the_pool_less_test_copies_and_unreadable_files(
    make_image_folder, tmp_path
):
    root = make_image_folder({"ant": 5, "bee": 5}, splits=("train", "test"))
    rng = np.random.default_rng(1)
    pool = tmp_path / "unsorted"
    kept = [write_image(pool / "a" / "b" / f"{i}.jpg", rng) for i in range(3)]  # any depth
    shutil.copy(root / "test" / "bee" / "001.png", pool / "copy_of_a_test_image.png")
    (pool / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not an image")
    outputs = ingest({"source": "imagefolder", "path": str(root), "unlabelled_path": str(pool)})

    unlabelled = outputs["unlabelled_index"].load()
    assert sorted(unlabelled["location"]) == sorted(map(str, kept))
    assert (unlabelled["split"] == "unlabelled").all() and (unlabelled["label"] == -1).all()
    index = outputs["image_index"].load()
    assert len(index) == 20 and not index["location"].isin(unlabelled["location"]).any()
    assert outputs["skipped_images"].load()["location"].str.endswith("truncated.jpg").all()
    duplicates = outputs["duplicates"].load()
    left_out = duplicates[duplicates["match_split"] == "unlabelled"]
    assert left_out["match_location"].tolist() == [str(pool / "copy_of_a_test_image.png")]
    assert left_out["test_location"].tolist() == [str(root / "test" / "bee" / "001.png")]
    assert left_out["kind"].tolist() == ["exact"]
    metrics = outputs["ingestion_metrics"].load()
    assert metrics["n_unlabelled"]["value"] == 3
    assert metrics["n_unlabelled_test_duplicates"]["value"] == 1


@pytest.mark.parametrize("content", ["unreadable", "test_copies", "nothing"])
def test_a_pool_with_nothing_usable_is_empty_and_said_so(
    make_image_folder, tmp_path, caplog, content
):
    root = make_image_folder({"ant": 5, "bee": 5}, splits=("train", "test"))
    pool = tmp_path / "unsorted"
    pool.mkdir()
    if content == "unreadable":
        for i in range(2):
            (pool / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    if content == "test_copies":
        shutil.copytree(root / "test", pool / "test")
    with caplog.at_level(logging.WARNING):
        outputs = ingest({"source": "imagefolder", "path": str(root), "unlabelled_path": str(pool)})
    assert outputs["unlabelled_index"].load().empty
    assert len(outputs["image_index"].load()) == 20  # the rest of the run is unchanged
    expected = {
        "unreadable": "None of the 2 unlabelled pool image(s) can be read",
        "test_copies": "10 unlabelled pool image(s) duplicate test images and are left out",
        "nothing": "holds no images",
    }[content]
    assert expected in caplog.text


def test_an_unlabelled_path_that_is_not_a_folder_is_named(make_image_folder, tmp_path):
    root = make_image_folder({"ant": 5, "bee": 5})
    with pytest.raises(DataSourceError, match=r"data.unlabelled_path='.*missing' is not a folder"):
        ingest(
            {
                "source": "imagefolder",
                "path": str(root),
                "unlabelled_path": str(tmp_path / "missing"),
            }
        )
    with pytest.raises(
        DataSourceError, match=r"data.unlabelled_path is for data.source=imagefolder"
    ):
        ingest({"unlabelled_path": str(tmp_path)})  # the digits have no pool
