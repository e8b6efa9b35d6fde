import numpy as np
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from transfer_learning.image_index import DataSettings, build_image_index
from transfer_learning.pipelines.feature_extraction import create_pipeline


def test_extraction_pipeline_on_digits(tmp_path):
    index, _, _ = build_image_index(DataSettings(), seed=0)
    index = index.iloc[::20].reset_index(drop=True)
    catalog = DataCatalog(
        {
            "image_index": MemoryDataset(index),
            "params:backbone": MemoryDataset({"name": "efficientnet_lite0", "image_size": 32}),
            "params:extraction": MemoryDataset(
                {"batch_size": 16, "num_workers": 0, "cache_dir": str(tmp_path), "progress": False}
            ),
            "params:device": MemoryDataset("cpu"),
        }
    )
    outputs = SequentialRunner().run(create_pipeline(), catalog)
    arrays = outputs["image_features"].load()
    assert arrays["features"].shape == (len(index), 1280)
    assert np.isfinite(arrays["features"]).all()
    assert arrays["split"].tolist() == index["split"].tolist()
    assert str(arrays["backbone"]) == "efficientnet_lite0" and int(arrays["image_size"]) == 32
    assert outputs["extraction_metrics"].load()["n_images"]["value"] == len(index)
