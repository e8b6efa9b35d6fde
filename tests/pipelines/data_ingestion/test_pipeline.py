from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

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
