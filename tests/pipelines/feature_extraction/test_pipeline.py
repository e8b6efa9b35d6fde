import numpy as np
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from tests.conftest import backbone_choice_inputs
from transfer_learning.data.index import build_image_index
from transfer_learning.data.settings import DataSettings
from transfer_learning.data.sources import pool_frame
from transfer_learning.pipelines.feature_extraction import create_pipeline


def test_extraction_pipeline_on_digits(tmp_path):
    index, _, _ = build_image_index(DataSettings(), seed=0)
    index = index.iloc[::20].reset_index(drop=True)
    catalog = DataCatalog(
        {
            "image_index": MemoryDataset(index),
            "unlabelled_index": MemoryDataset(pool_frame([])),  # no unlabelled images
            "data_profile": MemoryDataset({"typical_short_side": 8}),
            "params:backbone": MemoryDataset({"name": "efficientnet_lite0", "image_size": 32}),
            "params:extraction": MemoryDataset(
                {"batch_size": 16, "num_workers": 0, "cache_dir": str(tmp_path), "progress": False}
            ),
            "params:device": MemoryDataset("cpu"),
            "params:distributed": MemoryDataset({}),
            **backbone_choice_inputs(),
        }
    )
    outputs = SequentialRunner().run(create_pipeline(), catalog)
    arrays = outputs["image_features"].load()
    assert arrays["features"].shape == (len(index), 1280)
    assert np.isfinite(arrays["features"]).all()
    assert arrays["split"].tolist() == index["split"].tolist()
    assert str(arrays["backbone"]) == "efficientnet_lite0" and int(arrays["image_size"]) == 32
    assert outputs["extraction_metrics"].load()["n_images"]["value"] == len(index)
    assert outputs["unlabelled_features"].load()["features"].shape == (0, 1280)


def test_auto_image_size_follows_the_data_profile(tmp_path):
    index, _, _ = build_image_index(DataSettings(), seed=0)
    catalog = DataCatalog(
        {
            "image_index": MemoryDataset(index.iloc[:4]),
            "unlabelled_index": MemoryDataset(pool_frame([])),
            # 8 px digits: enlarged at most 4x, to at least 48 px.
            "data_profile": MemoryDataset({"typical_short_side": 8}),
            "params:backbone": MemoryDataset({"image_size": "auto"}),
            "params:extraction": MemoryDataset({"cache_dir": None, "progress": False}),
            "params:device": MemoryDataset("cpu"),
            "params:distributed": MemoryDataset({}),
            **backbone_choice_inputs(),
        }
    )
    outputs = SequentialRunner().run(create_pipeline(), catalog)
    assert int(outputs["image_features"].load()["image_size"]) == 48
    assert outputs["extraction_metrics"].load()["image_size"]["value"] == 48
