"""Learning curves, few-shot heads and long-tail corrections, on real libraries and small data."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.datasets import load_digits, make_classification
from sklearn.metrics import balanced_accuracy_score

from transfer_learning.data.index import long_tailed
from transfer_learning.data.settings import DataSettings, DataSourceError
from transfer_learning.kedro_io.datasets import MlflowChildRunsDataset
from transfer_learning.models.heads import (
    HeadError,
    HeadSettings,
    PriorAdjusted,
    PrototypeClassifier,
    select_and_fit,
)
from transfer_learning.reporting.curves import (
    ALL,
    CurveError,
    CurveSettings,
    crossing_point,
    curve_points,
    draw_subsets,
    mean_and_interval,
    nested_subsets,
    report,
    summarise,
)
from transfer_learning.training.data import TrainingData
from transfer_learning.training.losses import batch_mixing, class_prior, training_loss
from transfer_learning.training.recipe import FinetuneSettings, TrainingError

# ---- nested subsets ----------------------------------------------------------------------------


def test_subsets_are_stratified_nested_and_seeded():
    labels = np.repeat([0, 1, 2], [30, 12, 4])
    subsets = nested_subsets(labels, [1, 5, 10, ALL], seed=3)
    for size, positions in subsets.items():
        counts = np.bincount(labels[positions], minlength=3)
        expected = [30, 12, 4] if size == ALL else [min(size, n) for n in (30, 12, 4)]
        assert counts.tolist() == expected  # a class with fewer images gives all it has
    assert set(subsets[1]) <= set(subsets[5]) <= set(subsets[10]) <= set(subsets[ALL])
    assert np.array_equal(nested_subsets(labels, [5], seed=3)[5], subsets[5])
    assert not np.array_equal(nested_subsets(labels, [5], seed=4)[5], subsets[5])


def test_curve_points_come_smallest_first_per_seed():
    train = pd.DataFrame({"location": [f"{i}.png" for i in range(40)], "label": np.arange(40) % 4})
    settings = CurveSettings(per_class=(ALL, 5, 1), repeats=2)
    points = curve_points(draw_subsets(train, settings, seed=7))
    assert [(seed, size) for seed, size, _ in points] == [
        (7, "1"),
        (7, "5"),
        (7, "all"),
        (8, "1"),
        (8, "5"),
        (8, "all"),
    ]
    assert [len(rows) for _, _, rows in points[:3]] == [4, 20, 40]


@pytest.mark.parametrize(
    "params,message",
    [
        ({"per_class": [0, 5]}, "curve.per_class"),
        ({"per_class": ["most"]}, "curve.per_class"),
        ({"repeats": 0}, "curve.repeats"),
        ({"strategies": ["fine_tuning"]}, "curve.strategies"),
        ({"seeds": 3}, "curve.seeds"),
    ],
)
def test_bad_curve_settings_name_the_parameter(params, message):
    with pytest.raises(CurveError, match=message):
        CurveSettings.from_params(params)


# ---- summary and report ------------------------------------------------------------------------


def test_interval_is_the_t_interval_and_zero_for_one_run():
    values = np.array([0.70, 0.74, 0.71])
    mean, half = mean_and_interval(values)
    low, high = stats.t.interval(0.95, 2, loc=values.mean(), scale=stats.sem(values))
    assert mean == pytest.approx(values.mean()) and half == pytest.approx((high - low) / 2)
    assert mean_and_interval(np.array([0.5])) == (0.5, 0.0)


def curve_rows(accuracies: dict[str, list[float]]) -> pd.DataFrame:
    sizes = ["1", "10", "100", "all"]
    rows = []
    for strategy, means in accuracies.items():
        for size, accuracy in zip(sizes, means, strict=True):
            for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
                rows.append(
                    {
                        "strategy": strategy,
                        "per_class": size,
                        "images_per_class": 1000.0 if size == ALL else float(size),
                        "seed": seed,
                        "accuracy": accuracy + jitter,
                        "balanced_accuracy": accuracy + jitter,
                        "fit_seconds": 1.0,
                        "head": "prototype" if strategy == "feature_transfer" else "",
                    }
                )
    return pd.DataFrame(rows)


def test_crossing_point_is_where_fine_tuning_stays_ahead():
    summary = summarise(
        curve_rows(
            {
                "feature_transfer": [0.60, 0.70, 0.80, 0.85],
                "parameter_transfer": [0.40, 0.72, 0.78, 0.90],  # ahead at 10, behind at 100
            }
        )
    )
    assert crossing_point(summary, "feature_transfer", "parameter_transfer") == ALL
    assert (
        summary.loc[0, "accuracy_low"]
        < summary.loc[0, "accuracy"]
        < summary.loc[0, "accuracy_high"]
    )
    text = report(summary, test_images=500)
    assert "from **all labelled images per class**" in text and "500 test images" in text
    never = summarise(curve_rows({"feature_transfer": [0.6] * 4, "parameter_transfer": [0.5] * 4}))
    assert crossing_point(never, "feature_transfer", "parameter_transfer") is None
    assert "does not overtake" in report(never, 500)


# ---- few-shot and long-tail heads --------------------------------------------------------------


def test_prototype_head_is_the_nearest_normalised_class_mean():
    features = np.array([[1.0, 0.0], [3.0, 0.2], [0.0, 2.0], [0.1, 5.0]])
    head = PrototypeClassifier(temperature=10.0).fit(features, np.array([7, 7, 9, 9]))
    probabilities = head.predict_proba(np.array([[100.0, 1.0], [0.0, 0.01]]))
    assert head.classes_.tolist() == [7, 9]
    assert probabilities.argmax(axis=1).tolist() == [0, 1]  # scale does not matter, direction does
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    sharper = PrototypeClassifier(temperature=50.0).fit(features, np.array([7, 7, 9, 9]))
    assert sharper.predict_proba(np.array([[100.0, 1.0]]))[0, 0] > probabilities[0, 0]


def test_auto_head_fits_one_image_a_class_without_val():
    digits = load_digits()
    one_each = np.array([np.flatnonzero(digits.target == d)[0] for d in range(10)])
    train = (digits.data[one_each], digits.target[one_each])
    empty = (digits.data[:0], digits.target[:0])
    fitted = select_and_fit(train, empty, HeadSettings(), seed=0)
    assert fitted.head_type == "prototype"
    assert fitted.model.score(digits.data, digits.target) > 0.5  # ten images, ten classes
    # Nothing to select on: a named type is fitted with its defaults, and the log says so.
    plain = select_and_fit(train, empty, HeadSettings(type="logistic_regression"), 0)
    assert plain.head_type == "logistic_regression" and plain.best_params == {}


def test_auto_head_selects_between_types_on_val():
    x, y = make_classification(600, 20, n_informative=8, n_classes=3, random_state=0)
    fitted = select_and_fit(
        (x[:300], y[:300]), (x[300:], y[300:]), HeadSettings(selection="val"), 0
    )
    types = {row["type"] for row in fitted.search}
    assert types == {"prototype", "logistic_regression"}
    best = max(fitted.search, key=lambda row: (row["val_accuracy"], -row["val_log_loss"]))
    assert fitted.head_type == best["type"] and fitted.chosen == best


def long_tailed_blobs(seed: int):
    """Three overlapping classes, 400 : 40 : 8 in train, balanced in test."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])

    def draw(counts):
        labels = np.repeat([0, 1, 2], counts)
        return centres[labels] + rng.normal(size=(len(labels), 2)), labels

    return draw([400, 40, 8]), draw([8, 8, 8]), draw([500, 500, 500])


def test_logit_adjustment_raises_balanced_accuracy_on_long_tailed_train():
    train, val, test = long_tailed_blobs(0)
    settings = HeadSettings(type="logistic_regression", selection="val")
    plain = select_and_fit(train, val, settings, 0).model
    adjusted = select_and_fit(
        train, val, HeadSettings(**{**settings.__dict__, "logit_adjustment": 1.0}), 0
    ).model
    assert isinstance(adjusted["classifier"], PriorAdjusted)
    gain = balanced_accuracy_score(test[1], adjusted.predict(test[0])) - balanced_accuracy_score(
        test[1], plain.predict(test[0])
    )
    assert gain > 0.05
    np.testing.assert_allclose(adjusted.predict_proba(test[0]).sum(axis=1), 1.0)


def test_logit_adjustment_changes_nothing_when_train_is_balanced():
    x, y = make_classification(300, 10, n_informative=5, n_classes=3, random_state=1)
    exactly_balanced = np.concatenate([np.flatnonzero(y == k)[:90] for k in range(3)])
    x, y = x[exactly_balanced], y[exactly_balanced]
    plain = select_and_fit((x, y), (x[:0], y[:0]), HeadSettings(type="logistic_regression"), 0)
    adjusted = select_and_fit(
        (x, y), (x[:0], y[:0]), HeadSettings(type="logistic_regression", logit_adjustment=1.0), 0
    )
    np.testing.assert_array_equal(plain.model.predict(x), adjusted.model.predict(x))


def test_bad_logit_adjustment_is_refused():
    with pytest.raises(HeadError, match="head.logit_adjustment"):
        HeadSettings.from_params({"logit_adjustment": -1})


# ---- long-tailed data --------------------------------------------------------------------------


def test_long_tail_profile_thins_train_and_val_only():
    labels = np.repeat(np.arange(5), 200)
    splits = np.where(
        np.arange(1000) % 10 == 0, "test", np.where(np.arange(1000) % 10 == 1, "val", "train")
    )
    frame = pd.DataFrame(
        {"location": [f"{i}.png" for i in range(1000)], "label": labels, "split": splits}
    )
    thinned = long_tailed(frame, ratio=10, seed=0)
    kept = thinned[thinned["split"] != "test"]["label"].value_counts().sort_index()
    assert kept.iloc[0] == 180 and kept.iloc[-1] == 18  # 180 · 10^(-k/4)
    assert kept.is_monotonic_decreasing
    assert (thinned["split"] == "test").sum() == 100  # the test split stays balanced and whole
    assert set(thinned["location"]) <= set(frame["location"])
    assert long_tailed(frame, 10, seed=0).equals(thinned)


def test_bad_imbalance_ratio_names_the_parameter():
    with pytest.raises(DataSourceError, match="data.imbalance_ratio"):
        DataSettings.from_params({"imbalance_ratio": 0.5})


# ---- fine-tuning corrections -------------------------------------------------------------------


def test_balanced_softmax_is_cross_entropy_on_logits_plus_log_prior():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2])
    logits, targets = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    loss = training_loss(labels, 3, FinetuneSettings(loss="balanced_softmax", label_smoothing=0.0))
    expected = torch.nn.functional.cross_entropy(logits + class_prior(labels, 3).log(), targets)
    # float32 both, the same formula written apart: allclose's rtol 1e-5 (here and below).
    assert torch.allclose(loss(logits, targets), expected)
    half = training_loss(
        labels,
        3,
        FinetuneSettings(loss="logit_adjusted", logit_adjustment_tau=0.5, label_smoothing=0.0),
    )
    expected = torch.nn.functional.cross_entropy(
        logits + 0.5 * class_prior(labels, 3).log(), targets
    )
    assert torch.allclose(half(logits, targets), expected)
    plain = training_loss(labels, 3, FinetuneSettings(label_smoothing=0.0))
    assert torch.allclose(
        plain(logits, targets), torch.nn.functional.cross_entropy(logits, targets)
    )


class DrawnLabels(torch.utils.data.Dataset):
    """The label of each (position, augmentation seed) draw."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, draw: tuple[int, int]) -> torch.Tensor:
        return self.labels[draw[0]]


def test_class_balanced_sampling_draws_every_class_about_equally():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    data = TrainingData(
        train=DrawnLabels(labels),
        val_loader=None,
        val_labels=labels[:0],
        train_labels=labels,
        batch_size=100,
        workers=0,
        device=torch.device("cpu"),
        sampling="class_balanced",
    )
    drawn = torch.cat(list(data.train_loader(epoch_seed=1)))
    shares = torch.bincount(drawn, minlength=3).float() / len(drawn)
    assert torch.all((shares - 1 / 3).abs() < 0.05), shares
    again = torch.cat(list(data.train_loader(epoch_seed=1)))
    assert torch.equal(drawn, again)  # seeded by the epoch: a resume draws the same


def test_mixup_and_cutmix_give_soft_targets():
    assert batch_mixing(FinetuneSettings(), 3) is None
    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for settings in (
        FinetuneSettings(mixup=0.4),
        FinetuneSettings(cutmix=1.0),
        FinetuneSettings(mixup=0.2, cutmix=1.0),
    ):
        mixed, targets = batch_mixing(settings, 3)(images, labels)
        assert mixed.shape == images.shape and targets.shape == (8, 3)
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
        assert (targets.max(dim=1).values < 1).any()


@pytest.mark.parametrize(
    "key,value", [("loss", "focal"), ("sampling", "oversample"), ("mixup", -0.1), ("cutmix", "on")]
)
def test_bad_long_tail_and_mixing_settings_name_the_parameter(key, value):
    with pytest.raises(TrainingError, match=f"finetune.{key}"):
        FinetuneSettings.from_params({key: value})


def test_batch_never_exceeds_a_tiny_training_set():
    assert FinetuneSettings().resolve(5, mirror_symmetric=True, pretrained=True).batch_size == 5
    assert (
        FinetuneSettings(batch_size=32)
        .resolve(10, mirror_symmetric=True, pretrained=True)
        .batch_size
        == 10
    )


# ---- MLflow child runs -------------------------------------------------------------------------


def test_each_curve_row_becomes_a_child_run_of_the_active_run(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment(
            "curve", artifact_location=str(tmp_path / "artifacts")
        )
        rows = curve_rows({"feature_transfer": [0.6, 0.7, 0.8, 0.9]}).head(3)
        dataset = MlflowChildRunsDataset(
            params=["strategy", "per_class", "seed"], metrics=["accuracy"]
        )
        with mlflow.start_run(experiment_id=experiment) as parent:
            dataset.save(rows)
        children = mlflow.search_runs(
            [experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        assert len(children) == 3
        assert sorted(children["metrics.accuracy"]) == pytest.approx(sorted(rows["accuracy"]))
        assert set(children["params.per_class"]) == {"1"}
        dataset.save(rows)  # no active run: tracking is off, nothing is logged
        assert len(mlflow.search_runs([experiment])) == 4
    finally:
        mlflow.set_tracking_uri(None)
