"""The backbone ranking on real digits: candidates, controls, score quality, `backbone.name: auto`."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import backbone_choice_inputs
from transfer_learning.data.index import build_image_index
from transfer_learning.data.settings import DataSettings
from transfer_learning.features.extraction import ExtractionSettings
from transfer_learning.features.selection import (
    SelectionError,
    SelectionSettings,
    chosen_backbone,
    rank_backbones,
    ranking_markdown,
    recommendation,
    resolve_candidates,
    score_quality,
    selection_images,
)
from transfer_learning.models.backbones import BackboneError
from transfer_learning.pipelines.feature_extraction.nodes import resolve_backbone

NO_CACHE = ExtractionSettings(cache_dir=None, progress=False)
PROFILE = {"typical_short_side": 8, "n_train": 160, "mirror_symmetric": False}
# What `backbone.name: auto` ranks for: photos (the digits stand in, with a photo's profile).
PHOTO_PROFILE = {**PROFILE, "typical_short_side": 96}
ONE_CANDIDATE = {"candidates": [{"name": "efficientnet_lite0", "image_size": 48}]}


@pytest.fixture(scope="module")
def digits_index() -> pd.DataFrame:
    """200 train+val digits and test rows whose files do not exist: reading one would fail."""
    index, _, _ = build_image_index(DataSettings(), seed=0)
    seen = index[index["split"] != "test"].groupby("label").head(20)
    test = index[index["split"] == "test"].head(50).assign(location="/nowhere/test.png")
    return pd.concat([seen, test]).reset_index(drop=True)


@pytest.fixture(scope="module")
def ranking(digits_index) -> pd.DataFrame:
    settings = SelectionSettings.from_params({**ONE_CANDIDATE, "controls": True})
    return rank_backbones(digits_index, PROFILE, settings, NO_CACHE, torch.device("cpu"), seed=0)


def labels(candidates) -> list[str]:
    return [candidate.label for candidate in candidates]


def test_default_candidates_follow_the_images():
    # 8 px digits: every network at the 48 px floor; photos: each at its native size.
    assert labels(resolve_candidates(SelectionSettings(controls=False), 8)) == [
        "efficientnet_lite0@48",
        "efficientnet_lite1@48",
        "efficientnet_lite2@48",
    ]
    photos = labels(resolve_candidates(SelectionSettings(controls=True), 500))
    assert photos == [
        "efficientnet_lite0@224",
        "efficientnet_lite1@240",
        "efficientnet_lite2@260",
        "efficientnet_lite0@224 (random)",
        "efficientnet_lite1@240 (random)",
        "efficientnet_lite2@260 (random)",
    ]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"score": "accuracy"}, "selection.score='accuracy'"),
        ({"candidates": [{"image_size": 64}]}, "selection.candidates[0]"),
        ({"candidates": [{"name": "x", "image_size": 8}]}, "selection.candidates[0].image_size"),
        ({"candidates": [{"name": "x", "size": 64}]}, "selection.candidates[0].size"),
        ({"candidates": "all"}, "selection.candidates='all'"),
        ({"max_images": 5}, "selection.max_images=5"),
        ({"scores": "logme"}, "selection.scores"),
        ({"finetune_steps": 0}, "selection.finetune_steps=0"),
    ],
)
def test_bad_selection_parameters_are_named(params, named):
    with pytest.raises(SelectionError, match=named.replace("[", r"\[").replace("]", r"\]")):
        SelectionSettings.from_params(params)


@pytest.mark.slow
def test_ranking_scores_pretrained_and_control_without_reading_test(ranking):
    assert ranking["candidate"].tolist() == [
        "efficientnet_lite0@48",
        "efficientnet_lite0@48 (random)",
    ]
    pretrained, control = ranking.iloc[0], ranking.iloc[1]
    assert ranking[["logme", "h_score", "nce", "leep", "knn", "probe_accuracy"]].notna().all().all()
    # The default score puts ImageNet weights first; a random ImageNet head predicts nothing
    # about digits, so its NCE and LEEP sit at the chance level log(1/10).
    assert pretrained["logme"] > control["logme"]
    assert control["leep"] == pytest.approx(math.log(0.1), abs=0.01)
    assert control["nce"] == pytest.approx(math.log(0.1), abs=0.05)
    assert pretrained["leep"] > control["leep"] and pretrained["nce"] > control["nce"]
    # Random convolutions are good features for 8 px digits (they beat ImageNet weights on the
    # probe and kNN here); whichever score puts the control on top is flagged in the report.
    flagged = score_quality(ranking).set_index("score")["control_above_pretrained"]
    for score in ("logme", "h_score", "nce", "leep", "knn"):
        assert flagged[score] == (control[score] >= pretrained[score]), score
    report = ranking_markdown(ranking, score_quality(ranking))
    weights_may_not_help = control["probe_accuracy"] >= pretrained["probe_accuracy"]
    assert ("ImageNet weights may not help" in report) == weights_may_not_help


def test_fingerprint_is_of_the_train_val_images_only(digits_index):
    _, fingerprint = selection_images(digits_index, None, seed=0)
    other_test = digits_index.assign(
        location=np.where(
            digits_index["split"] == "test", "/elsewhere.png", digits_index["location"]
        )
    )
    assert selection_images(other_test, None, seed=0)[1] == fingerprint
    fewer = digits_index.drop(index=0)
    assert selection_images(fewer, None, seed=0)[1] != fingerprint


def test_score_quality_reports_tau_regret_and_flags_controls():
    ranking = pd.DataFrame(
        {
            "candidate": ["a", "b", "c", "a (random)"],
            "pretrained": [True, True, True, False],
            "probe_accuracy": [0.90, 0.80, 0.70, 0.3],
            "logme": [3.0, 2.0, 1.0, 0.0],  # perfect order, control last
            "h_score": [1.0, 2.0, 3.0, 0.0],  # reversed: picks the worst
            "nce": [3.0, 2.0, 1.0, 5.0],  # a control above every pretrained network
            "leep": [math.nan] * 4,  # no source head: left out
            "knn": [0.9, 0.8, 0.7, 0.1],
        }
    )
    quality = score_quality(ranking).set_index("score")
    assert "leep" not in quality.index
    assert quality.loc["logme", "kendall_tau"] == pytest.approx(1.0)
    assert quality.loc["h_score", "kendall_tau"] == pytest.approx(-1.0)
    assert quality.loc["h_score", "regret"] == pytest.approx(0.2)
    assert quality.loc["logme", "regret"] == 0
    assert quality.loc["nce", "control_above_pretrained"]
    assert not quality.loc["logme", "control_above_pretrained"]


def saved_ranking(fingerprint: str) -> pd.DataFrame:
    """A ranking as the CSV round trip gives it back: Lite2 at 64 px has the best LogME."""
    return pd.DataFrame(
        {
            "candidate": ["efficientnet_lite0@48", "efficientnet_lite2@64"],
            "name": ["efficientnet_lite0", "efficientnet_lite2"],
            "image_size": [48, 64],
            "pretrained": [True, True],
            "logme": [0.3, 0.5],
            "probe_accuracy": [0.9, 0.92],
            "data_fingerprint": fingerprint,
            "score_used": "logme",
        }
    )


def test_auto_backbone_reuses_a_ranking_of_the_same_images(digits_index):
    _, fingerprint = selection_images(digits_index, 3000, seed=0)
    saved = saved_ranking(fingerprint)
    assert chosen_backbone(saved, fingerprint)[0] == recommendation(saved)
    assert recommendation(saved)["name"] == "efficientnet_lite2"
    assert chosen_backbone(saved, "other images")[0] is None
    assert chosen_backbone(None, fingerprint)[0] is None

    resolved, choice = resolve_backbone(
        {"name": "auto", "image_size": 64},
        PHOTO_PROFILE,
        digits_index,
        saved,
        {"max_images": 3000},
        {},
        0,
        "cpu",
    )
    assert (resolved["name"], resolved["image_size"]) == ("efficientnet_lite2", 64)
    assert "backbone_ranking" in choice["reason"]


@pytest.mark.slow
def test_auto_backbone_ranks_now_when_no_ranking_fits(digits_index):
    inputs = backbone_choice_inputs()
    resolved, choice = resolve_backbone(
        {"name": "auto", "image_size": 48},
        PHOTO_PROFILE,
        digits_index,
        inputs["backbone_ranking"].load(),
        {**ONE_CANDIDATE, "controls": False},
        {"cache_dir": None, "progress": False},
        0,
        "cpu",
    )
    # The ranking's pick, at the user's own image size.
    assert (resolved["name"], resolved["image_size"]) == ("efficientnet_lite0", 48)
    assert choice["reason"].startswith("ranked now")


def test_auto_backbone_takes_the_cheapest_network_for_small_images_without_ranking(digits_index):
    # A ranking would read the test rows' missing files and the candidates would fail: none runs.
    resolved, choice = resolve_backbone(
        {"name": "auto"},
        PROFILE,
        digits_index,
        None,
        {"candidates": [{"name": "no/such_network", "image_size": 48}]},
        {},
        0,
        "cpu",
    )
    assert (resolved["name"], resolved["image_size"]) == ("efficientnet_lite0", 48)
    assert choice["reason"] == "auto: images of 8 px, below 64 px: not ranked"


def test_by_probe_accuracy_the_pick_is_the_cheapest_within_one_standard_error():
    ranking = pd.DataFrame(
        {
            "candidate": ["lite2@260", "lite0@224", "lite0@176", "lite0@224 (random)"],
            "name": ["efficientnet_lite2", "efficientnet_lite0", "efficientnet_lite0", "x"],
            "image_size": [260, 224, 176, 224],
            "pretrained": [True, True, True, False],
            "probe_accuracy": [0.930, 0.921, 0.905, 0.99],
            "probe_accuracy_se": [0.010, 0.012, 0.011, 0.01],
            "gflops": [1.72, 0.77, 0.50, 0.0],
            "data_fingerprint": "f",
            "score_used": "probe_accuracy",
        }
    )
    # 0.921 ≥ 0.930 - 0.010; 0.905 is not; the control is never a pick, however it scores.
    assert (recommendation(ranking)["name"], recommendation(ranking)["image_size"]) == (
        "efficientnet_lite0",
        224,
    )
    beaten = ranking.assign(probe_accuracy=[0.930, 0.915, 0.905, 0.99])
    assert recommendation(beaten)["image_size"] == 260
    # Other scores have no standard error: their best value is the pick.
    by_logme = ranking.assign(logme=[0.5, 0.4, 0.3, 0.9], score_used="logme")
    assert recommendation(by_logme)["image_size"] == 260


def test_auto_backbone_refuses_a_weights_file(digits_index):
    with pytest.raises(BackboneError, match="backbone.name=auto cannot use backbone.weights_path"):
        resolve_backbone(
            {"name": "auto", "weights_path": "net.pt"},
            PROFILE,
            digits_index,
            None,
            {},
            {},
            0,
            "cpu",
        )


@pytest.mark.slow
def test_short_finetune_adds_a_val_accuracy_for_pretrained_candidates(digits_index):
    settings = SelectionSettings.from_params(
        {**ONE_CANDIDATE, "controls": True, "finetune": True, "finetune_steps": 6}
    )
    ranking = rank_backbones(digits_index, PROFILE, settings, NO_CACHE, torch.device("cpu"), 0)
    pretrained, control = ranking.iloc[0], ranking.iloc[1]
    assert 0.1 < pretrained["finetune_val_accuracy"] <= 1 and math.isnan(
        control["finetune_val_accuracy"]
    )
