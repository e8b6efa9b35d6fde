"""The ensemble's node: members' held-out predictions matched image by image, weights on them."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from transfer_learning.models.calibration import fit_temperature
from transfer_learning.pipelines.ensemble.nodes import combine_models, combine_other_seeds
from transfer_learning.serving.classifier import CombinedClassifier, ImageClassifier

CLASSES = ["a", "b", "c"]


def member(strategy: str, temperature: float) -> ImageClassifier:
    """A model as combine_models sees it: its calibration (it never predicts here)."""
    model = ImageClassifier(strategy, CLASSES, "efficientnet_lite0", 48, {})
    return model.calibrated({"class": temperature})


def held_out_predictions():
    """feature_transfer out-of-fold on train+val, right on the first half of val;
    parameter_transfer on val only, in another order, right on the second half."""
    rng = np.random.default_rng(0)
    train_val = np.array([f"img{i}.jpg" for i in range(100)])
    labels = rng.integers(0, 3, 100)
    val = np.arange(60, 100)  # the network's held-out images: val alone
    head = np.full((100, 3), 0.1)
    head[np.arange(100), labels] = 0.8
    head[80:] = np.roll(head[80:], 1, axis=1)
    network = np.full((40, 3), 0.05)
    network[np.arange(40), labels[val]] = 0.9
    network[:20] = np.roll(network[:20], 1, axis=1)
    order = rng.permutation(40)
    return (
        {"label": labels, "probabilities": head, "location": train_val},
        {
            "label": labels[val][order],
            "probabilities": network[order],
            "location": train_val[val][order],
        },
        head[val][order],
    )


def test_members_are_matched_by_image_and_weighted_on_the_images_both_held_out():
    held_out_head, held_out_network, head_on_network_order = held_out_predictions()
    models = [member("feature_transfer", 2.0), member("parameter_transfer", 0.5)]
    summaries = [
        {"fit_seconds": 3.0, "trainable_parameters": 10},
        {"fit_seconds": 40.0, "trainable_parameters": 1000},
    ]
    combined, held_out, summary = combine_models(
        {"classes": CLASSES},
        *models,
        held_out_head,
        held_out_network,
        *summaries,
        members=("feature_transfer", "parameter_transfer"),
        strategy="ensemble",
    )
    assert isinstance(combined, CombinedClassifier) and combined.strategy == "ensemble"
    assert summary["held_out_images"] == 40
    assert summary["fit_seconds"] >= 43.0 and summary["trainable_parameters"] == 1010
    weights = summary["weights"]
    assert combined.weights == [weights["feature_transfer"], weights["parameter_transfer"]]
    assert 0 < weights["feature_transfer"] < 1 and sum(weights.values()) == pytest.approx(1)
    # Each held-out image's mixture, computed here from the members' calibrated probabilities.
    np.testing.assert_array_equal(held_out["location"], held_out_network["location"])
    np.testing.assert_array_equal(held_out["label"], held_out_network["label"])
    calibrated_head = softmax(np.log(head_on_network_order) / 2.0, axis=1)
    calibrated_network = softmax(np.log(held_out_network["probabilities"]) / 0.5, axis=1)
    expected = (
        weights["feature_transfer"] * calibrated_head
        + weights["parameter_transfer"] * calibrated_network
    )
    # float64 both (the node's exp of log_softmax, scipy's softmax here): a few roundings.
    np.testing.assert_allclose(held_out["probabilities"], expected, atol=1e-12)

    # The chosen weights are the grid's log-loss minimum, checked against every other weight.
    def loss(w):
        mixed = w * calibrated_head + (1 - w) * calibrated_network
        return -np.log(mixed[np.arange(40), held_out["label"]]).mean()

    chosen = loss(weights["feature_transfer"])
    # The node's grid points and linspace's may differ by an ulp, and so may their losses.
    assert all(chosen <= loss(w) + 1e-12 for w in np.linspace(0, 1, 21))


def test_members_of_different_classes_cannot_be_combined():
    other = ImageClassifier("parameter_transfer", ["a", "b"], "efficientnet_lite0", 48, {})
    with pytest.raises(ValueError, match="must predict the same classes"):
        CombinedClassifier("ensemble", [member("feature_transfer", 1.0), other], [0.5, 0.5])


def test_each_other_seeds_members_are_combined_and_calibrated_like_the_deployed_ones():
    held_out_head, held_out_network, _ = held_out_predictions()
    members = ("feature_transfer", "parameter_transfer")

    def trained(strategy, temperature, held_out, seed, seconds):
        return {
            "seed": seed,
            "image_model": member(strategy, temperature),
            "held_out_predictions": held_out,
            "fit_seconds": seconds,
        }

    head_seeds = [
        trained("feature_transfer", t, held_out_head, s, 3.0) for t, s in ((2, 8), (1, 9))
    ]
    network_seeds = [
        trained("parameter_transfer", t, held_out_network, s, 40.0) for t, s in ((0.5, 8), (3, 9))
    ]
    others = combine_other_seeds(
        {"classes": CLASSES}, head_seeds, network_seeds, members=members, strategy="ensemble"
    )
    assert [other["seed"] for other in others] == [8, 9]
    for other, head, network in zip(others, head_seeds, network_seeds, strict=True):
        expected, held_out, summary = combine_models(
            {"classes": CLASSES},
            head["image_model"],
            network["image_model"],
            head["held_out_predictions"],
            network["held_out_predictions"],
            {"fit_seconds": 3.0},
            {"fit_seconds": 40.0},
            members=members,
            strategy="ensemble",
        )
        model = other["image_model"]
        assert isinstance(model, CombinedClassifier) and model.weights == expected.weights
        assert model.temperatures["class"] == fit_temperature(
            held_out["probabilities"], held_out["label"]
        )
        assert other["fit_seconds"] >= 43.0
    assert others[0]["image_model"].weights != others[1]["image_model"].weights
    with pytest.raises(ValueError):  # a member with fewer seeds than the other
        combine_other_seeds(
            {"classes": CLASSES}, head_seeds, network_seeds[:1], members=members, strategy="e"
        )
