"""The data_quality pipeline: label issues (confident learning), outliers, train/val duplicates."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from cleanlab.count import compute_confident_joint
from cleanlab.filter import find_label_issues as cleanlab_label_issues
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from transfer_learning.data.label_issues import (
    DROPPED,
    LabelIssuePolicyError,
    confident_joint,
    find_label_issues,
)
from transfer_learning.pipeline_registry import register_pipelines
from transfer_learning.pipelines.data_ingestion.nodes import index_images
from transfer_learning.pipelines.data_quality.nodes import (
    find_label_issues_in_features,
    find_outliers,
    find_train_val_duplicates,
    report_data_quality,
)

CLASSES = {"classes": [str(d) for d in range(10)]}
HEAD = {"type": "logistic_regression", "grid": {"C": [0.1]}}
IMAGES = 1200  # of the 1,797 digits: every class in every fold, and quick to fit


def digits_features(flip_share: float = 0.0, seed: int = 0):
    """The digits' pixels as features, a third each train/val/test, with a share of the
    train+val labels flipped to another class (seeded); returns the features and the flips."""
    digits = load_digits()
    n = IMAGES
    rng = np.random.default_rng(seed)
    labels = digits.target[:n].astype(np.int64)
    split = np.array(["train", "val", "test"])[np.arange(n) % 3]
    flipped = (rng.random(n) < flip_share) & (split != "test")
    labels[flipped] = (labels[flipped] + rng.integers(1, 10, flipped.sum())) % 10
    features = {
        "features": digits.data[:n].astype(np.float32),
        "label": labels,
        "split": split,
        "location": np.array([f"sklearn-digits:{i}" for i in range(n)]),
        "image_size": np.array(8),
    }
    return features, flipped


@pytest.fixture(scope="module")
def noisy():
    """5 % of the train+val labels flipped: the features before and after, and what was found."""
    features, flipped = digits_features(0.05)
    original = {name: value.copy() for name, value in features.items()}
    return features, flipped, original, find_label_issues_in_features(features, CLASSES, HEAD, 0)


def test_flipped_training_labels_are_found_and_test_rows_reported_apart(noisy):
    features, flipped, original, (issues, test_issues, noise) = noisy
    assert set(issues["split"]) == {"train", "val"} and set(test_issues["split"]) == {"test"}
    assert len(issues) == (features["split"] != "test").sum()
    flagged = set(issues.loc[issues["is_label_issue"], "path"])
    truth = set(features["location"][flipped])
    found = len(flagged & truth)
    assert found / len(truth) >= 0.75 and found / len(flagged) >= 0.6
    # Most suspect first; the suggestion of a found flip is mostly the original digit.
    assert issues["label_quality"].is_monotonic_increasing
    digits = load_digits().target
    suggested = issues[issues["path"].isin(truth) & issues["is_label_issue"]]
    rows = suggested["path"].str.removeprefix("sklearn-digits:").astype(int)
    assert (suggested["suggested_label"].astype(int) == digits[rows]).mean() > 0.9
    # The noise estimate is about the flip rate, per class.
    assert noise["noise_rate"].mean() == pytest.approx(0.05, abs=0.03)
    assert noise["images"].sum() == len(issues)
    # Nothing is changed: the features (and their labels, test's included) are as they were.
    for name, value in original.items():
        np.testing.assert_array_equal(features[name], value)


def test_clean_labels_raise_few_issues():
    features, _ = digits_features(0.0)
    issues, test_issues, _ = find_label_issues_in_features(features, CLASSES, HEAD, 0)
    assert issues["is_label_issue"].mean() < 0.02
    assert test_issues["is_label_issue"].mean() < 0.03


@pytest.mark.parametrize("flip_share", [0.05, 0.2])
def test_the_method_agrees_with_cleanlab_on_the_same_probabilities(flip_share):
    """cleanlab (the reference implementation) is a test-only oracle: never a dependency."""
    features, _ = digits_features(flip_share, seed=1)
    labels = features["label"]
    probabilities = cross_val_predict(
        make_pipeline(StandardScaler(), LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.1)),
        features["features"],
        labels,
        cv=5,
        method="predict_proba",
    )
    np.testing.assert_array_equal(
        confident_joint(labels, probabilities),
        compute_confident_joint(labels, probabilities, calibrate=False),
    )
    ours = find_label_issues(labels, probabilities).is_label_issue
    theirs = cleanlab_label_issues(labels, probabilities, filter_by="both")
    assert abs(int(ours.sum()) - int(theirs.sum())) <= 0.05 * theirs.sum() + 2
    assert (ours & theirs).sum() / (ours | theirs).sum() >= 0.85


def test_images_unlike_every_class_are_outliers():
    features, _ = digits_features()
    rng = np.random.default_rng(0)
    strangers = rng.normal(0, 1, (5, 64)).astype(np.float32) * 30  # no digit looks like these
    features["features"][: 5 * 3 : 3] = strangers  # five train images
    outliers = find_outliers(features, CLASSES)
    assert set(outliers.head(5)["path"]) == {f"sklearn-digits:{i}" for i in range(0, 15, 3)}
    assert outliers.head(5)["is_outlier"].all()
    assert outliers["is_outlier"].sum() <= 5 + 0.05 * len(outliers)  # the oddest digits too
    assert outliers["outlier_score"].is_monotonic_decreasing
    assert set(outliers["split"]) == {"train", "val", "test"}


def test_the_same_picture_twice_in_train_val_is_found_and_a_label_conflict_named(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        picture = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        path = tmp_path / f"{i}.png"
        Image.fromarray(picture).save(path)
        rows.append((str(path), "cat", "train"))
        if i == 0:  # the same picture re-encoded, labelled otherwise
            Image.fromarray(picture).save(tmp_path / "0_again.jpg", quality=95)
            rows.append((str(tmp_path / "0_again.jpg"), "dog", "val"))
        if i == 1:  # an exact copy with the same label
            (tmp_path / "1_copy.png").write_bytes(path.read_bytes())
            rows.append((str(tmp_path / "1_copy.png"), "cat", "train"))
    index = pd.DataFrame(rows, columns=["location", "class_name", "split"])
    found = find_train_val_duplicates(index, {"source": "digits"})
    assert len(found) == 2
    conflict = found[~found["same_class"]].iloc[0]
    assert {conflict["location"], conflict["match_location"]} == {
        str(tmp_path / "0.png"),
        str(tmp_path / "0_again.jpg"),
    }
    assert conflict["kind"] == "near"
    assert found[found["same_class"]].iloc[0]["kind"] == "exact"


def test_the_report_counts_what_was_found_and_shows_the_worst(noisy):
    features, _, _, (issues, test_issues, noise) = noisy
    outliers = find_outliers(features, CLASSES)
    duplicates = pd.DataFrame({"same_class": [True, False]})
    markdown, montage, metrics = report_data_quality(
        issues, test_issues, noise, outliers, duplicates
    )
    flagged = int(issues["is_label_issue"].sum())
    assert f"**{flagged} of {len(issues)} train+val labels look wrong**" in markdown
    assert "2 pairs of train/val images are the same picture**, 1 of them" in markdown
    assert "move the file to the right class folder" in markdown
    assert metrics["label_issues"]["value"] == flagged
    assert len([axis for axis in montage.axes if axis.images]) == min(flagged, 24)


def test_the_pipeline_is_named_and_reuses_ingestion_and_extraction():
    pipeline = register_pipelines()["data_quality"]
    names = {node.name for node in pipeline.nodes}
    assert {"index_images", "extract_image_features", "find_label_issues"} <= names
    assert not any("feature_transfer" in name for name in names)


def test_with_several_label_columns_each_task_is_checked_on_its_own_labelled_rows():
    features, _ = digits_features()
    digits = features["label"]
    parity = np.where(np.arange(len(digits)) % 5 == 0, -1, digits % 2)  # a fifth unlabelled
    features["task_labels"] = np.stack([digits, parity], axis=1)
    class_names = {
        "classes": CLASSES["classes"],
        "tasks": {"digit": CLASSES["classes"], "parity": ["even", "odd"]},
    }
    issues, test_issues, noise = find_label_issues_in_features(features, class_names, HEAD, 0)
    seen = features["split"] != "test"
    counts = issues["task"].value_counts()
    assert counts["digit"] == seen.sum() and counts["parity"] == (seen & (parity >= 0)).sum()
    assert set(issues.loc[issues["task"] == "parity", "given_label"]) == {"even", "odd"}
    assert set(test_issues["task"]) == {"digit", "parity"}
    assert list(noise["class_name"][-2:]) == ["parity: even", "parity: odd"]


def test_a_class_with_one_image_leaves_nothing_to_estimate_and_the_report_still_says_so():
    features, _ = digits_features()
    nines = np.flatnonzero((features["label"] == 9) & (features["split"] != "test"))
    keep = np.ones(len(features["label"]), dtype=bool)
    keep[nines[1:]] = False  # one train/val nine left: no out-of-fold probabilities
    features = {k: v[keep] if np.ndim(v) else v for k, v in features.items()}
    issues, test_issues, noise = find_label_issues_in_features(features, CLASSES, HEAD, 0)
    assert issues.empty and test_issues.empty and noise.empty
    markdown, _, metrics = report_data_quality(
        issues,
        test_issues,
        noise,
        find_outliers(features, CLASSES),
        pd.DataFrame({"same_class": []}),
    )
    assert "**0 of 0 train+val labels look wrong**" in markdown
    assert metrics["label_issues"]["value"] == 0


def saved_label_issues(index: pd.DataFrame, rows: list[int]) -> pd.DataFrame:
    """A label_issues.csv as data_quality saves it: `rows` of the index flagged, with their own
    class names, then the last row, not flagged."""
    table = index.loc[[*rows, index.index[-1]]]
    saved = pd.DataFrame(
        {
            "path": table["location"].to_numpy(),
            "split": table["split"].to_numpy(),
            "given_label": table["class_name"].to_numpy(),
            "suggested_label": "0",
            "label_quality": 0.01,
            "is_label_issue": [True] * len(rows) + [False],
        }
    )
    # Read back as the catalog reads the CSV: the digits' class names "0"…"9" become numbers.
    return pd.read_csv(io.StringIO(saved.to_csv(index=False)))


def test_drop_leaves_flagged_training_images_out_and_test_rows_untouched():
    data = {"source": "digits", "cache_dir": None}
    kept, *_, kept_metrics = index_images(data, 0)
    train, val, test = (kept.index[kept["split"] == name] for name in ("train", "val", "test"))
    relabelled = train[3]  # flagged, but its label has been changed since: trains again
    stored = saved_label_issues(kept, [*train[:3], val[0], test[0], relabelled])
    stored.loc[5, "given_label"] = (stored.loc[5, "given_label"] + 1) % 10  # now another class
    unchanged, *_ = index_images(data, 0, stored)
    assert unchanged.equals(kept)  # data.on_label_issue=keep, the default

    dropped, _, _, _, profile, _, metrics = index_images(
        {**data, "on_label_issue": "drop"}, 0, stored
    )
    moved = dropped.index[dropped["split"] == DROPPED]
    assert sorted(moved) == sorted([*train[:3], val[0]])
    assert dropped.drop(moved).equals(kept.drop(moved))  # every other row as it was
    assert dropped.loc[test].equals(kept.loc[test])  # a flagged test image stays in test
    assert metrics["n_dropped_label_issues"]["value"] == 4
    assert metrics["n_train"]["value"] == kept_metrics["n_train"]["value"] - 3
    assert profile["n_train"] == len(train) - 3


def test_drop_needs_a_saved_data_quality_run_and_never_empties_a_class():
    data = {"source": "digits", "cache_dir": None, "on_label_issue": "drop"}
    with pytest.raises(LabelIssuePolicyError, match="run `kedro run --pipelines=data_quality`"):
        index_images(data, 0, None)
    kept, *_ = index_images({**data, "on_label_issue": "keep"}, 0)
    sevens = kept.index[(kept["label"] == 7) & kept["split"].isin(["train", "val"])]
    with pytest.raises(LabelIssuePolicyError, match="leave class '7' without training images"):
        index_images(data, 0, saved_label_issues(kept, list(sevens)))


def test_dropped_images_are_still_judged_by_the_next_data_quality_run(noisy):
    features, flipped, *_ = noisy
    features = {**features, "split": features["split"].astype(object)}
    features["split"][np.flatnonzero(flipped)[:10]] = DROPPED
    issues, *_ = find_label_issues_in_features(features, CLASSES, HEAD, 0)
    assert len(issues) == (features["split"] != "test").sum()
    again = issues[issues["split"] == DROPPED]
    assert len(again) == 10 and again["is_label_issue"].mean() > 0.7
