from dataclasses import replace

import numpy as np
import pytest
from sklearn.datasets import make_classification

from transfer_learning.models.heads import (
    TRUSTED_HEAD_TYPES,
    HeadError,
    HeadSettings,
    build_head,
    select_and_fit,
)


@pytest.fixture(scope="module")
def splits():
    x, y = make_classification(600, 20, n_informative=8, n_classes=3, random_state=0)
    return (x[:300], y[:300]), (x[300:450], y[300:450]), (x[450:], y[450:])


@pytest.mark.parametrize(
    "head_type",
    ["logistic_regression", "linear_svm", "knn", "sklearn.ensemble.RandomForestClassifier"],
)
def test_every_head_type_learns(splits, head_type):
    train, val, test = splits
    fitted = select_and_fit(train, val, HeadSettings(type=head_type), seed=0)
    assert fitted.model.score(*test) > 0.6
    assert fitted.model.predict_proba(test[0]).shape == (150, 3)


def test_regularisation_is_chosen_on_val(splits):
    train, val, _ = splits
    fitted = select_and_fit(
        train, val, HeadSettings(type="logistic_regression", grid={"C": [1e-4, 1.0]}), seed=0
    )
    assert [row["C"] for row in fitted.search] == [1e-4, 1.0]
    best = max(fitted.search, key=lambda row: row["val_accuracy"])
    assert fitted.best_params == {"C": best["C"]} and fitted.val_accuracy == best["val_accuracy"]


def test_scaler_is_inside_the_pipeline_and_fitted_on_training_data_only(splits):
    train, val, _ = splits
    fitted = select_and_fit(train, val, HeadSettings(refit_on_train_val=False), seed=0)
    # scikit-learn's float64 mean vs numpy's: a few roundings (numpy's default rtol 1e-7).
    np.testing.assert_allclose(fitted.model["scale"].mean_, train[0].mean(axis=0))


def test_balanced_class_weight_reaches_the_classifier():
    assert (
        build_head(HeadSettings(type="logistic_regression", class_weight="balanced"), seed=0)[
            "classifier"
        ].class_weight
        == "balanced"
    )


@pytest.mark.parametrize(
    "params,message",
    [
        ({"type": "sklearn.nothing.Here"}, "neither one of"),
        ({"class_weight": "auto"}, "head.class_weight='auto'"),
        ({"kind": "knn"}, "head.kind"),
    ],
)
def test_bad_head_settings(params, message):
    with pytest.raises(HeadError, match=message):
        build_head(HeadSettings.from_params(params), seed=0)


def test_estimators_without_probabilities_are_refused():
    with pytest.raises(HeadError, match="has no predict_proba"):
        build_head(HeadSettings(type="sklearn.svm.LinearSVC"), seed=0)


def test_an_ensemble_head_is_really_refitted_on_train_and_val(splits):
    train, val, _ = splits
    settings = HeadSettings(
        type="sklearn.ensemble.RandomForestClassifier", params={"n_estimators": 5}
    )
    fitted = select_and_fit(train, val, settings, seed=0)
    # A bootstrap draws as many rows as it is given: 450 from train+val, 300 from train alone.
    root_weight = fitted.model[-1].estimators_[0].tree_.weighted_n_node_samples[0]
    assert root_weight == len(train[1]) + len(val[1])


def separable(n_per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1, 2], n_per_class)
    features = rng.normal(size=(len(labels), 8)) + 6.0 * np.eye(3, 8)[labels]
    return features, labels


def test_ties_on_accuracy_go_to_the_lower_log_loss_not_to_grid_order():
    train, val = separable(40, 0), separable(60, 1)
    settings = HeadSettings(type="logistic_regression", grid={"C": [0.001, 1.0]}, selection="val")
    fitted = select_and_fit(train, val, settings, seed=0)
    first, second = fitted.search
    # Both are perfect on val; the stronger fit is the more confident one.
    assert first["val_accuracy"] == second["val_accuracy"] == 1.0
    assert second["val_log_loss"] < first["val_log_loss"]
    assert fitted.best_params == {"C": 1.0} and fitted.selection == "val"


def test_small_val_is_replaced_by_cross_validation_on_train_and_val(splits):
    train, _, _ = splits
    small_val = (train[0][:30], train[1][:30])  # about 10 per class
    fitted = select_and_fit(
        (train[0][30:], train[1][30:]),
        small_val,
        HeadSettings(type="logistic_regression", grid={"C": [0.01, 1.0]}),
        seed=0,
    )
    assert fitted.selection == "cv"
    for row in fitted.search:
        assert 0 < row["val_accuracy_std"] < 0.2 and row["val_log_loss"] > 0
    _, val, test = splits
    about_100_per_class = (np.concatenate([val[0], test[0]]), np.concatenate([val[1], test[1]]))
    large_val = select_and_fit(
        train,
        about_100_per_class,
        HeadSettings(type="logistic_regression", grid={"C": [0.01, 1.0]}),
        seed=0,
    )
    assert large_val.selection == "val" and large_val.search[0]["val_accuracy_std"] == 0


def test_cross_validation_is_seeded_and_refits_on_everything(splits):
    train, val, _ = splits
    settings = HeadSettings(
        type="logistic_regression", grid={"C": [0.01, 0.1, 1.0]}, selection="cv", cv_folds=3
    )
    first = select_and_fit(train, val, settings, seed=4)
    again = select_and_fit(train, val, settings, seed=4)
    assert first.search == again.search and first.best_params == again.best_params
    assert first.model["scale"].n_samples_seen_ == len(train[1]) + len(val[1])


@pytest.mark.slow  # over 7 s alone: `make test` runs it, `make test-fast` does not
def test_every_project_head_is_stored_by_mlflow_with_the_types_the_catalog_trusts(tmp_path):
    """The MLflow copy of the head (skops format) refuses types it is not told to trust."""
    import mlflow.sklearn
    import yaml

    from tests.conftest import PROJECT_ROOT

    catalog = yaml.safe_load((PROJECT_ROOT / "conf" / "base" / "catalog.yml").read_text())
    trusted = catalog["feature_transfer.mlflow_model"]["save_args"]["skops_trusted_types"]
    assert sorted(trusted) == sorted(TRUSTED_HEAD_TYPES)  # one list: the catalog repeats it
    x, y = make_classification(120, 6, n_informative=4, n_classes=3, random_state=0)
    for settings in (
        HeadSettings(type="prototype", logit_adjustment=1.0),
        HeadSettings(type="logistic_regression", logit_adjustment=0.5),
    ):
        model = select_and_fit((x, y), (x[:0], y[:0]), settings, seed=0).model
        where = tmp_path / settings.type
        mlflow.sklearn.save_model(model, str(where), skops_trusted_types=trusted)
        np.testing.assert_array_equal(
            mlflow.sklearn.load_model(str(where)).predict_proba(x), model.predict_proba(x)
        )


def test_held_out_predictions_are_out_of_fold_when_refitted_and_val_otherwise():
    """What calibration is fitted on: no image is predicted by a head that was fitted on it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    features, labels = make_classification(300, 20, n_informative=8, n_classes=3, random_state=0)
    train, val = (features[:200], labels[:200]), (features[200:], labels[200:])
    settings = HeadSettings(type="logistic_regression", grid={"C": [0.5]})
    refitted = select_and_fit(train, val, settings, seed=3)
    held_out = refitted.held_out
    assert held_out.how == "out-of-fold on train+val (5 folds)"
    np.testing.assert_array_equal(held_out.rows, np.arange(300))
    # Each fold's own fit, done here with scikit-learn alone, predicts its held-out images.
    expected = np.zeros((300, 3))
    for fit, held in StratifiedKFold(5, shuffle=True, random_state=3).split(features, labels):
        scaler = StandardScaler().fit(features[fit])
        model = LogisticRegression(C=0.5, max_iter=1000).fit(
            scaler.transform(features[fit]), labels[fit]
        )
        expected[held] = model.predict_proba(scaler.transform(features[held]))
    np.testing.assert_allclose(held_out.probabilities, expected, atol=1e-3)

    on_train = select_and_fit(train, val, replace(settings, refit_on_train_val=False), seed=3)
    assert on_train.held_out.how == "val"
    np.testing.assert_array_equal(on_train.held_out.rows, np.arange(200, 300))
    # The same fitted head on the same rows, in one call each: bit for bit.
    np.testing.assert_array_equal(
        on_train.held_out.probabilities, on_train.model.predict_proba(val[0])
    )
