"""Which unlabelled images to label next: the ranking against independent computations."""

from __future__ import annotations

import numpy as np
import pytest

from transfer_learning.features.acquisition import (
    COLD_START_PER_CLASS,
    AcquisitionError,
    LabelNextSettings,
    close_in_features,
    rank_pool,
)

NO_LABELS = (np.empty((0, 2)), np.empty(0, dtype=np.int64))


def blobs(rng: np.random.Generator, per_blob: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Three tight groups of points on the unit circle, and two lone outliers between them."""
    angles = np.array([0.0, 2.1, 4.2])
    centres = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    points = np.concatenate([c + rng.normal(0, 0.05, size=(per_blob, 2)) for c in centres])
    outliers = np.array([[np.cos(1.05), np.sin(1.05)], [np.cos(3.15), np.sin(3.15)]])
    return np.concatenate([points, outliers]), np.append(
        np.repeat(np.arange(3), per_blob), [-1, -1]
    )


def test_margin_ranks_as_the_gap_between_the_two_most_probable_classes():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(4), size=200)
    ranked = rank_pool(rng.normal(size=(200, 8)), *NO_LABELS, probabilities, "margin", 15, 0)
    top_two = np.sort(probabilities, axis=1)[:, -2:]
    expected = np.argsort(top_two[:, 1] - top_two[:, 0], kind="stable")[:15]
    np.testing.assert_array_equal(ranked.positions, expected)
    assert ranked.method == "margin" and ranked.passed_over == 0
    assert ranked.reasons[0].startswith("uncertain: the two most probable classes")


def test_typicality_from_a_cold_start_takes_one_typical_image_of_each_group():
    features, group = blobs(np.random.default_rng(1))
    ranked = rank_pool(features, *NO_LABELS, None, "typicality", 3, seed=0)
    assert sorted(group[ranked.positions]) == [0, 1, 2]  # never an outlier (group -1)
    # Each is among the densest of its group on the unit circle (where typicality is measured):
    # its mean distance to its 5 nearest neighbours is in the lower half of its group's.
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    distances = np.linalg.norm(unit[:, None] - unit[None], axis=2)
    mean_knn = np.sort(distances, axis=1)[:, 1:6].mean(axis=1)
    for position in ranked.positions:
        assert mean_knn[position] <= np.median(mean_knn[group == group[position]])


def test_typicality_covers_the_groups_without_labels_first():
    features, group = blobs(np.random.default_rng(2))
    labelled = (features[group == 0][:5], np.zeros(5, dtype=np.int64))
    ranked = rank_pool(features, *labelled, None, "typicality", 2, seed=0)
    assert sorted(group[ranked.positions]) == [1, 2]


@pytest.mark.parametrize("method", ["margin", "typicality", "random"])
def test_a_batch_never_holds_two_near_duplicates(method):
    rng = np.random.default_rng(3)
    features, _ = blobs(rng)
    pool = np.concatenate([features, features])  # every image twice: at i and i + len(features)
    probabilities = np.tile(rng.dirichlet(np.ones(3), size=len(features)), (2, 1))
    twins = len(features)

    def same_picture(positions):
        return [(a, b) for a in positions for b in positions if a < b and b - a == twins]

    ranked = rank_pool(pool, *NO_LABELS, probabilities, method, 30, 0, same_picture)
    assert len(ranked.positions) == 30 and len(set(ranked.positions % twins)) == 30
    if method == "margin":  # each of its top candidates comes twice: every twin passed over
        assert ranked.passed_over >= 1


def test_close_in_features_follows_the_pool():
    rng = np.random.default_rng(4)
    pool = rng.normal(size=(500, 16))
    pool[1] = pool[0] + 1e-3  # a burst: the same frame, barely moved
    close = close_in_features(pool, seed=0)
    assert close(np.array([0, 1, 2])) == [(0, 1)]
    # Scaled, the same pool has the same neighbours: cosine similarity has no unit.
    assert close_in_features(pool * 100, seed=0)(np.array([0, 1, 2])) == [(0, 1)]


def test_auto_starts_with_typicality_and_moves_to_margin():
    settings = LabelNextSettings()
    assert settings.resolved_method(COLD_START_PER_CLASS * 5 - 1, 5) == "typicality"
    assert settings.resolved_method(COLD_START_PER_CLASS * 5, 5) == "margin"
    assert LabelNextSettings(method="random").resolved_method(0, 5) == "random"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"count": 0}, r"label_next.count=0 must be ≥ 1"),
        ({"count": "ten"}, r"label_next.count='ten' must be a whole number"),
        ({"method": "entropy"}, r"label_next.method='entropy' must be one of auto, typicality"),
        ({"cont": 5}, r"cont"),
    ],
)
def test_bad_settings_are_named(params, message):
    with pytest.raises(AcquisitionError, match=message):
        LabelNextSettings.from_params(params)


def test_an_empty_pool_says_what_to_add():
    with pytest.raises(AcquisitionError, match=r"pool is empty.*data.unlabelled_path"):
        rank_pool(np.empty((0, 2)), *NO_LABELS, None, "typicality", 5, 0)
