"""The leakage check on real photos: copies found, different pictures left alone, policies."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from PIL import Image, ImageEnhance
from sklearn.datasets import load_sample_images

from transfer_learning.data.duplicates import LeakageError, apply_duplicate_policy, find_duplicates
from transfer_learning.data.index import build_image_index
from transfer_learning.data.settings import DataSettings, DataSourceError
from transfer_learning.pipelines.data_ingestion import create_pipeline


def crops(photo: np.ndarray, size: int = 100) -> list[Image.Image]:
    """Non-overlapping tiles of a real photo: different pictures with the same camera, light
    and colours (the hard negatives)."""
    rows, columns = photo.shape[0] // size, photo.shape[1] // size
    return [
        Image.fromarray(photo[r * size : (r + 1) * size, c * size : (c + 1) * size])
        for r in range(rows)
        for c in range(columns)
    ]


@pytest.fixture(scope="module")
def leaky_folder(tmp_path_factory) -> tuple[pd.DataFrame, dict[str, str]]:
    """Train: 24 tiles of the two bundled photos. Test: 6 edited copies of train tiles (the
    leaks) and 6 tiles no train image shows."""
    root = tmp_path_factory.mktemp("leaky")
    tiles = [tile for photo in load_sample_images().images for tile in crops(photo)]
    assert len(tiles) == 48
    rng = np.random.default_rng(0)
    order = rng.permutation(len(tiles))
    train, unseen = [tiles[i] for i in order[:24]], [tiles[i] for i in order[24:30]]
    rows = []
    for position, tile in enumerate(train):
        path = root / "train" / f"tile {position}.jpg"  # spaces in paths, as users have
        path.parent.mkdir(parents=True, exist_ok=True)
        tile.save(path, quality=95)
        rows.append((str(path), "photo", "train"))
    edits = {
        "identical": lambda p: shutil.copyfile(root / "train" / "tile 0.jpg", p),
        "reencoded": lambda p: train[1].save(p, quality=40),
        "resized": lambda p: train[2].resize((75, 75), Image.Resampling.LANCZOS).save(p),
        "shifted": lambda p: train[3].crop((2, 2, 100, 100)).resize((100, 100)).save(p),
        "brighter": lambda p: ImageEnhance.Brightness(train[4]).enhance(1.3).save(p),
        "png": lambda p: train[5].save(p.with_suffix(".png")),
    }
    leaks = {}
    (root / "test").mkdir()
    for name, edit in edits.items():
        path = root / "test" / f"{name}.jpg"
        edit(path)
        path = path if path.exists() else path.with_suffix(".png")
        leaks[name] = str(path)
        rows.append((str(path), "photo", "test"))
    for position, tile in enumerate(unseen):
        path = root / "test" / f"unseen {position}.jpg"
        tile.save(path, quality=95)
        rows.append((str(path), "photo", "test"))
    return pd.DataFrame(rows, columns=["location", "class_name", "split"]), leaks


def test_every_edited_copy_is_found_and_no_other_picture(leaky_folder):
    index, leaks = leaky_folder
    found = find_duplicates(index).set_index("test_location")
    assert sorted(found.index) == sorted(leaks.values())
    assert found.loc[leaks["identical"], "kind"] == "exact"
    assert found.loc[leaks["identical"], "match_location"].endswith("tile 0.jpg")
    assert (found.drop(leaks["identical"])["kind"] == "near").all()
    assert (found["match_split"] == "train").all()
    assert found.loc[leaks["brighter"], "match_location"].endswith("tile 4.jpg")


def test_images_too_small_to_compare_count_only_when_identical():
    """scikit-learn's 8 x 8 digits: the same digit written twice is not a leak."""
    frame, _, _ = build_image_index(DataSettings(source="digits"), seed=0)
    assert find_duplicates(frame).empty
    copy = frame[frame["split"] == "train"].head(1).assign(split="test")
    assert len(find_duplicates(pd.concat([frame, copy], ignore_index=True))) == 1


def test_the_policies(leaky_folder, caplog):
    index, leaks = leaky_folder
    found = find_duplicates(index)
    with caplog.at_level(logging.WARNING):
        kept = apply_duplicate_policy(index, found, "warn")
    assert kept.equals(index)
    assert "6 of 12 test images (50.0%)" in caplog.text and leaks["shifted"] in caplog.text
    dropped = apply_duplicate_policy(index, found, "drop_from_test")
    assert sorted(set(index["location"]) - set(dropped["location"])) == sorted(leaks.values())
    assert (dropped["split"] == "train").sum() == 24
    with pytest.raises(LeakageError, match="data.on_duplicate=drop_from_test") as refused:
        apply_duplicate_policy(index, found, "error")
    assert leaks["resized"] in str(refused.value)
    with pytest.raises(DataSourceError, match="data.on_duplicate='sometimes' must be one of"):
        DataSettings.from_params({"on_duplicate": "sometimes"})


def test_ingestion_reports_duplicates_and_drops_them_when_asked(tmp_path):
    """A folder with train/ and test/ splits where test holds a copy of a train image."""
    photo = load_sample_images().images[0]
    tiles = crops(photo, 100)
    for split, names in (("train", range(0, 8)), ("test", range(8, 11))):
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for number in names:
                tiles[number + (11 if label == "b" else 0)].save(folder / f"{number}.jpg")
    shutil.copyfile(tmp_path / "train" / "a" / "0.jpg", tmp_path / "test" / "a" / "copy.jpg")
    data = {"source": "imagefolder", "path": str(tmp_path)}
    for policy, n_test in (("warn", 7), ("drop_from_test", 6)):
        catalog = DataCatalog(
            {
                "params:data": MemoryDataset({**data, "on_duplicate": policy}),
                "params:seed": MemoryDataset(0),
                "stored_label_issues": MemoryDataset(None),
            }
        )
        outputs = SequentialRunner().run(create_pipeline(), catalog)
        duplicates = outputs["duplicates"].load()
        assert duplicates["test_location"].map(lambda p: Path(p).name).tolist() == ["copy.jpg"]
        index = outputs["image_index"].load()
        assert (index["split"] == "test").sum() == n_test
        assert outputs["ingestion_metrics"].load()["n_test_duplicates"]["value"] == 1
