import numpy as np
import pandas as pd
import pytest
from PIL import Image

from transfer_learning.data.index import build_image_index, profile_images
from transfer_learning.data.settings import DataSettings, DataSourceError


def index(**params):
    return build_image_index(DataSettings.from_params(params), seed=42)


def test_digits_default_is_split_three_ways_stratified():
    frame, classes, skipped = index()
    assert len(frame) == 1797 and classes == [str(d) for d in range(10)] and skipped.empty
    counts = frame["split"].value_counts()
    assert counts["test"] == 360 and counts["val"] == 288 and counts["train"] == 1149
    # Stratified: every class in every split, in about the same share.
    shares = pd.crosstab(frame["label"], frame["split"], normalize="index")
    assert shares["test"].between(0.17, 0.23).all()


def test_same_seed_same_split_other_seed_other_split():
    first, _, _ = build_image_index(DataSettings(), seed=1)
    again, _, _ = build_image_index(DataSettings(), seed=1)
    other, _, _ = build_image_index(DataSettings(), seed=2)
    assert first["split"].tolist() == again["split"].tolist()
    assert first["split"].tolist() != other["split"].tolist()


def test_class_folders_are_indexed_without_decoding(make_image_folder):
    root = make_image_folder({"cat": 10, "dog": 10})
    (root / "cat" / "notes.txt").write_text("not an image")
    frame, classes, _ = index(source="imagefolder", path=str(root))
    assert classes == ["cat", "dog"]
    assert len(frame) == 20
    assert set(frame["split"]) == {"train", "val", "test"}
    assert frame.loc[frame["class_name"] == "dog", "label"].eq(1).all()


def test_predefined_splits_are_kept(make_image_folder):
    root = make_image_folder({"cat": 6, "dog": 6}, splits=("train", "test"))
    frame, _, _ = index(source="imagefolder", path=str(root), val_fraction=0.5)
    from_test_folder = frame["location"].str.contains("/test/")
    assert (frame.loc[from_test_folder, "split"] == "test").all()
    assert set(frame.loc[~from_test_folder, "split"]) == {"train", "val"}
    assert (frame["split"] == "val").sum() == 6


@pytest.mark.parametrize(
    "params,message",
    [
        (
            {"source": "imagefolder", "path": "/no/such/folder"},
            "data.path='/no/such/folder' does not exist",
        ),
        ({"source": "imagefolder"}, "data.source=imagefolder needs data.path"),
        ({"source": "kaggle"}, "data.source='kaggle' is not a known source"),
        ({"val_fraction": 1.5}, "data.val_fraction=1.5 must be a number between 0 and 1"),
        ({"on_corrupt": "ignore"}, "data.on_corrupt='ignore' must be 'error' or 'skip'"),
        ({"on_label_issue": "fix"}, "data.on_label_issue='fix' must be one of keep, drop"),
        ({"sorce": "digits"}, "Unknown parameter(s) data.sorce"),
        ({"source": "torchvision"}, "data.source=torchvision needs data.name"),
    ],
)
def test_bad_settings_name_the_parameter(params, message):
    with pytest.raises(DataSourceError) as error:
        index(**params)
    assert message in str(error.value)


def test_empty_folder(tmp_path):
    with pytest.raises(DataSourceError, match="has no class folders"):
        index(source="imagefolder", path=str(tmp_path))


def test_class_folder_without_images(make_image_folder):
    root = make_image_folder({"cat": 4, "dog": 4})
    (root / "bird").mkdir()
    with pytest.raises(DataSourceError, match=r"Class folder .*bird holds no images"):
        index(source="imagefolder", path=str(root))


def test_single_class(make_image_folder):
    root = make_image_folder({"cat": 4})
    with pytest.raises(DataSourceError, match="single class \\('cat'\\)"):
        index(source="imagefolder", path=str(root))


def test_corrupt_image_is_an_error_naming_the_file(make_image_folder):
    root = make_image_folder({"cat": 6, "dog": 6})
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataSourceError) as error:
        index(source="imagefolder", path=str(root))
    assert "broken.jpg" in str(error.value) and "data.on_corrupt=skip" in str(error.value)


def test_corrupt_image_skipped_and_listed(make_image_folder):
    root = make_image_folder({"cat": 6, "dog": 6})
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    frame, _, skipped = index(source="imagefolder", path=str(root), on_corrupt="skip")
    assert len(frame) == 12
    assert skipped["location"].str.endswith("broken.jpg").tolist() == [True]
    assert skipped["reason"].iloc[0]


def test_too_few_images_for_a_stratified_split(make_image_folder):
    root = make_image_folder({"cat": 1, "dog": 6})
    with pytest.raises(DataSourceError, match="'cat' has 1 image"):
        index(source="imagefolder", path=str(root))


def test_unknown_torchvision_dataset():
    with pytest.raises(DataSourceError, match="data.name='NoSuchSet'"):
        index(source="torchvision", name="NoSuchSet")


def test_offline_torchvision_download_names_the_alternatives(tmp_path, monkeypatch):
    # No network here: the real download fails, and the error must say what works offline.
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    with pytest.raises(DataSourceError) as error:
        index(source="torchvision", name="CIFAR10", download_dir=str(tmp_path))
    assert "data.source=imagefolder" in str(error.value) and "data.source=digits" in str(
        error.value
    )


@pytest.mark.slow
def test_the_cifar10_jpeg_tree_indexes_with_its_splits(cifar10_tree):
    frame, classes, skipped = index(source="imagefolder", path=str(cifar10_tree))
    counts = frame["split"].value_counts()
    assert counts["train"] + counts["val"] == 50_000 and counts["test"] == 10_000
    assert counts["val"] == 10_000  # data.val_fraction=0.2 of train/
    assert classes == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    assert skipped.empty
    assert (frame.groupby("class_name").size() == 6_000).all()


def test_the_data_profile_of_the_digits():
    frame, _, _ = index()
    profile = profile_images(frame, DataSettings(), seed=0)
    assert profile["typical_short_side"] == profile["typical_long_side"] == 8
    assert profile["mirror_symmetric"] is False  # mirrored digits are other digits
    assert profile["n_train"] == 1149 and profile["n_val"] == 288
    assert profile["min_val_per_class"] == 28


def test_the_data_profile_reads_sizes_from_headers(tmp_path):
    from tests.conftest import write_image

    rng = np.random.default_rng(0)
    for i, size in enumerate([(300, 200), (640, 480), (500, 375), (100, 90)] * 3):
        write_image(tmp_path / "photos" / ("a" if i % 2 else "b") / f"{i}.jpg", rng, size=size)
    settings = DataSettings(source="imagefolder", path=str(tmp_path / "photos"))
    frame, _, _ = build_image_index(settings, seed=0)
    profile = profile_images(frame, settings, seed=0)
    train_sizes = [
        min(Image.open(p).size) for p in frame.loc[frame["split"] == "train", "location"]
    ]
    assert profile["typical_short_side"] == int(np.median(train_sizes))
    assert profile["mirror_symmetric"] is True


def test_the_data_profile_never_looks_at_test_images(tmp_path):
    from tests.conftest import write_image

    rng = np.random.default_rng(0)
    for split, size, count in (("train", (40, 30), 10), ("test", (900, 700), 4)):
        for label in ("a", "b"):
            for i in range(count):
                write_image(tmp_path / "data" / split / label / f"{i}.png", rng, size=size)
    settings = DataSettings(source="imagefolder", path=str(tmp_path / "data"))
    frame, _, _ = build_image_index(settings, seed=0)
    profile = profile_images(frame, settings, seed=0)
    assert profile["typical_short_side"] == 30 and profile["n_train"] == 16
