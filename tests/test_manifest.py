"""data.source=manifest: labels from a CSV or parquet table instead of folder names."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import pytest

from transfer_learning.data.index import build_image_index, build_indexes
from transfer_learning.data.settings import DataSettings, DataSourceError


@pytest.fixture
def folder(make_image_folder) -> Path:
    return make_image_folder({"ant": 6, "bee": 6, "fly": 6})


def manifest_of(folder: Path, where: Path, **extra_columns) -> pd.DataFrame:
    """A manifest of an image folder: relative paths, the class as `species`, extra columns."""
    paths = sorted(folder.rglob("*.png"))
    table = pd.DataFrame(
        {
            "file": [os.path.relpath(p, where.parent) for p in paths],
            "species": [p.parent.name for p in paths],
            "photographer": "someone",
            **extra_columns,
        }
    )
    table.to_csv(where, index=False)
    return table


def index_of(**data) -> tuple[pd.DataFrame, list[str], pd.DataFrame]:
    return build_image_index(DataSettings.from_params(data), seed=3)


def manifest_params(where: Path, **more) -> dict:
    return {
        "source": "manifest",
        "manifest": str(where),
        "path_column": "file",
        "label_columns": ["species"],
        **more,
    }


def test_a_manifest_indexes_exactly_as_the_folder_it_describes(folder, tmp_path):
    manifest_of(folder, tmp_path / "labels.csv")
    by_table, classes, skipped = index_of(**manifest_params(tmp_path / "labels.csv"))
    by_folder, folder_classes, _ = index_of(source="imagefolder", path=str(folder))
    assert classes == folder_classes == ["ant", "bee", "fly"] and skipped.empty
    key = ["location", "label", "class_name", "split"]
    pd.testing.assert_frame_equal(
        by_table[key].sort_values("location", ignore_index=True),
        by_folder[key].sort_values("location", ignore_index=True),
    )


def test_a_given_split_is_kept_and_parquet_and_absolute_paths_work(folder, tmp_path):
    table = manifest_of(folder, tmp_path / "labels.csv")
    table["file"] = [str((tmp_path / p).resolve()) for p in table["file"]]
    table["fold"] = (["Train ", "train", "test"] * 6)[: len(table)]
    table.to_parquet(tmp_path / "labels.parquet")
    index, _, _ = index_of(**manifest_params(tmp_path / "labels.parquet", split_column="fold"))
    test = index[index["split"] == "test"]
    assert len(test) == 6 and set(index["split"]) == {"train", "val", "test"}  # val from train
    assert sorted(test["location"]) == sorted(table.loc[table["fold"] == "test", "file"])


def test_rows_without_a_label_form_the_unlabelled_pool(folder, tmp_path, caplog):
    table = manifest_of(folder, tmp_path / "labels.csv")
    table.loc[[2, 5], "species"] = None
    table.to_csv(tmp_path / "labels.csv", index=False)
    with caplog.at_level(logging.INFO):
        indexed = build_indexes(
            DataSettings.from_params(manifest_params(tmp_path / "labels.csv")), 3
        )
    assert (
        len(indexed.index) == 16
        and not indexed.index["location"].isin(indexed.pool["location"]).any()
    )
    assert indexed.pool["path"].tolist() == table.loc[[2, 5], "file"].tolist()  # as given
    assert (indexed.pool["split"] == "unlabelled").all() and (indexed.pool["label"] == -1).all()
    assert "2 row(s) without a label form the unlabelled pool (rows 4, 7)" in caplog.text


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_val_or_test_row_without_a_label_is_refused_by_row(folder, tmp_path, split):
    table = manifest_of(folder, tmp_path / "labels.csv", fold="train")
    table.loc[[0, 1], "fold"] = "test"
    table.loc[[2, 3], "fold"] = "val"
    table.loc[[0, 2, 5], "species"] = None  # row 5 is train: it joins the pool
    table.to_csv(tmp_path / "labels.csv", index=False)
    rows = "2" if split == "test" else "4"
    table.loc[[0 if split == "val" else 2], "species"] = "ant"  # only one of the two is wrong
    table.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(DataSourceError, match=rf"rows {rows} are in val or test \('fold'\)"):
        index_of(**manifest_params(tmp_path / "labels.csv", split_column="fold"))


@pytest.mark.parametrize(
    ("change", "params", "message"),
    [
        (
            lambda t: t.drop(columns="species"),
            {},
            r"has no column 'species' \(data.label_columns\); its columns are 'file', "
            "'photographer'",
        ),
        (
            lambda t: t.assign(fold=["train"] * 17 + ["validation"]),
            {"split_column": "fold"},
            r"rows 19 have a 'fold' \(data.split_column\) other than train, val, test: "
            r"\['validation'\]",
        ),
        (
            lambda t: t.assign(species="ant"),
            {},
            "column 'species' \\(data.label_columns\\) has one class, 'ant'",
        ),
        (
            lambda t: pd.concat([t, t.iloc[[0]].assign(file="./" + t["file"][0])]),
            {},
            r"rows 2, 20 name the same image \('file'\) more than once",
        ),
        (
            lambda t: t.assign(fold="test"),
            {"split_column": "fold"},
            "no row has 'fold' = train",
        ),
    ],
    ids=["missing column", "unknown split", "one class", "duplicate path", "no train rows"],
)
def test_bad_manifests_are_refused_naming_the_rows(folder, tmp_path, change, params, message):
    where = tmp_path / "labels.csv"
    change(manifest_of(folder, where)).to_csv(where, index=False)
    with pytest.raises(DataSourceError, match=message) as refused:
        index_of(**manifest_params(where, **params))
    assert str(where) in str(refused.value)


def test_paths_that_do_not_exist_follow_on_corrupt(folder, tmp_path):
    table = manifest_of(folder, tmp_path / "labels.csv")
    table.loc[len(table)] = ["gone/missing.png", "bee", "someone"]
    table.to_csv(tmp_path / "labels.csv", index=False)
    missing = str(tmp_path / "gone" / "missing.png")
    with pytest.raises(DataSourceError, match="data.on_corrupt=skip") as refused:
        index_of(**manifest_params(tmp_path / "labels.csv"))
    assert missing in str(refused.value)
    index, _, skipped = index_of(**manifest_params(tmp_path / "labels.csv", on_corrupt="skip"))
    assert skipped["location"].tolist() == [missing] and len(index) == 18


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"source": "manifest"}, "data.source=manifest needs data.manifest"),
        ({"source": "manifest", "manifest": "labels.txt"}, "must be a .csv or .parquet file"),
        ({"source": "manifest", "manifest": "absent.csv"}, "'absent.csv' does not exist"),
    ],
)
def test_manifest_settings_are_checked(params, message):
    with pytest.raises(DataSourceError, match=message):
        index_of(**params)


def test_a_second_label_column_with_one_class_is_refused_naming_it(folder, tmp_path):
    manifest_of(folder, tmp_path / "labels.csv")
    params = manifest_params(tmp_path / "labels.csv", label_columns=["species", "photographer"])
    message = r"column 'photographer' \(data.label_columns\) has one class, 'someone'"
    with pytest.raises(DataSourceError, match=message):
        index_of(**params)
