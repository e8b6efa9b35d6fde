"""Which pretrained network? Rank candidate backbones by transferability scores, next to the
ground truth they try to predict, and show how well each score ranked.

For every candidate (a backbone name at an image size) the train+val images go through the
cached feature extraction; the scores of `transferability` are computed from the features (and
from the network's own ImageNet head for NCE and LEEP), and the ground truth is the
cross-validated accuracy of the head on frozen features (the selection feature extraction's strategy runs).
The same architectures with random weights are scored as negative controls: a score that ranks
one of them above a pretrained network is flagged. The test split never reaches this module.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy.stats import kendalltau, weightedtau

from transfer_learning.core.config import check_known_keys
from transfer_learning.core.tasks import MISSING
from transfer_learning.data.index import data_fingerprint
from transfer_learning.features import transferability
from transfer_learning.features.extraction import ExtractionSettings, extract_features
from transfer_learning.models.backbones import (
    AUTO,
    BackboneError,
    BackboneSettings,
    build_backbone,
    resolve_image_size,
)
from transfer_learning.models.heads import HeadSettings, select_and_fit, smallest_class

logger = logging.getLogger(__name__)

# The networks whose ImageNet weights ship with the project (work offline).
OFFLINE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Default candidates: each offline network at its `auto` size only. Lower resolutions are cheaper
# but were never the better choice on test (docs/benchmarks.md), and with few images the
# one-standard-error rule, whose standard error is then wide, nearly always took the cheapest
# one: on 25 flowers a class Lite1 at 176 px cost the frozen-feature head 5.5 points against
# Lite0 at 224 px. Among native sizes the cheapest is Lite0 at 224 px, the default before `auto`.
# backbone.name=auto ranks candidates for images whose typical shorter side is at least this.
RANKED_FROM_SIDE = 64
# Scores that need the network's own ImageNet classifier.
SOURCE_HEAD_SCORES = ("nce", "leep")
# What may rank the candidates: a transferability score, or the cross-validated probe itself.
# The probe is the default: on the benchmarks (docs/benchmarks.md) its pick was the best on test
# for both data sets, LogME's was 1.9 points behind on the flower photos; the scores cost ~5 %
# of extraction, the probe about a third.
RANKERS = (*transferability.SCORES, "probe_accuracy")


class SelectionError(ValueError):
    """The `selection` parameters or the data cannot give a ranking."""


@dataclass(frozen=True)
class Candidate:
    """A backbone at one image size; `pretrained=False` is a random-weight control."""

    name: str
    image_size: int | str = AUTO
    pretrained: bool = True

    @property
    def label(self) -> str:
        return f"{self.name}@{self.image_size}" + ("" if self.pretrained else " (random)")


@dataclass(frozen=True)
class SelectionSettings:
    """The `selection` block of parameters_backbone_selection.yml."""

    candidates: str | list[dict[str, Any]] = AUTO
    controls: bool = False
    score: str = "probe_accuracy"
    max_images: int | None = 1000
    finetune: bool = False
    finetune_steps: int = 100

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> SelectionSettings:
        check_known_keys(cls, params, "selection", SelectionError)
        settings = cls(**params)
        _parse_candidates(settings.candidates)
        if settings.score not in RANKERS:
            raise SelectionError(
                f"selection.score={settings.score!r} cannot rank candidates; choose one of "
                f"{', '.join(RANKERS)}."
            )
        if settings.max_images is not None and (
            not isinstance(settings.max_images, int) or settings.max_images < 10
        ):
            raise SelectionError(
                f"selection.max_images={settings.max_images!r} must be an integer ≥ 10 or null."
            )
        if not isinstance(settings.finetune_steps, int) or settings.finetune_steps < 1:
            raise SelectionError(
                f"selection.finetune_steps={settings.finetune_steps!r} must be an integer ≥ 1."
            )
        return settings


def _parse_candidates(candidates: str | list[dict[str, Any]]) -> tuple[Candidate, ...]:
    if candidates == AUTO:
        return ()
    if not isinstance(candidates, list) or not candidates:
        raise SelectionError(
            f"selection.candidates={candidates!r} must be 'auto' or a list of "
            "{name, image_size} entries, e.g. [{name: efficientnet_lite0, image_size: auto}]."
        )
    parsed = []
    for position, entry in enumerate(candidates):
        block = f"selection.candidates[{position}]"
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise SelectionError(
                f"{block}={entry!r} needs a name, e.g. {{name: efficientnet_lite0}}."
            )
        check_known_keys(Candidate, entry, block, SelectionError)
        if entry.get("pretrained") is False:
            raise SelectionError(f"{block}: controls come from selection.controls, not the list.")
        size = entry.get("image_size", AUTO)
        if size != AUTO and (not isinstance(size, int) or size < 16):
            raise SelectionError(f"{block}.image_size={size!r} must be 'auto' or an integer ≥ 16.")
        parsed.append(Candidate(entry["name"], size))
    return tuple(parsed)


def resolve_candidates(
    settings: SelectionSettings, typical_short_side: int | None
) -> list[Candidate]:
    """The candidates with their image sizes in pixels, followed by the random-weight controls
    (each architecture once, at its first candidate's size) when `settings.controls`."""
    listed = _parse_candidates(settings.candidates)
    if listed:
        chosen = [
            Candidate(c.name, _size(c.name, c.image_size, typical_short_side)) for c in listed
        ]
    else:
        chosen = [
            Candidate(name, _size(name, AUTO, typical_short_side)) for name in OFFLINE_BACKBONES
        ]
    chosen = list(dict.fromkeys(chosen))
    if settings.controls:
        first_size = {}
        for candidate in chosen:
            first_size.setdefault(candidate.name, candidate.image_size)
        chosen += [Candidate(name, size, pretrained=False) for name, size in first_size.items()]
    return chosen


def _size(name: str, image_size: int | str, typical_short_side: int | None) -> int:
    return resolve_image_size(BackboneSettings(name, image_size), typical_short_side).image_size


def selection_images(
    image_index: pd.DataFrame, max_images: int | None, seed: int
) -> tuple[pd.DataFrame, str]:
    """The train+val rows the ranking uses (a stratified sample of at most `max_images`), and
    a fingerprint of them that says whether a saved ranking belongs to these images.

    With several label columns the ranking follows the first task: its labelled images.
    """
    rows = image_index[
        image_index["split"].isin(["train", "val"]) & (image_index["label"] != MISSING)
    ]
    if rows.empty:
        raise SelectionError("The image index has no train or val images to rank backbones on.")
    if max_images is not None and len(rows) > max_images:
        share = max_images / len(rows)
        rows = rows.groupby("label", group_keys=False).sample(frac=share, random_state=seed)
    rows = rows.sort_values("location").reset_index(drop=True)
    return rows, data_fingerprint(rows)


def rank_backbones(
    image_index: pd.DataFrame,
    data_profile: Mapping[str, Any],
    settings: SelectionSettings,
    extraction: ExtractionSettings,
    device: torch.device,
    seed: int,
) -> pd.DataFrame:
    """One row per candidate: every score, the probe accuracy (and with `settings.finetune` a
    short fine-tune's val accuracy), timings; best `settings.score` first among the pretrained
    candidates, controls last."""
    rows, fingerprint = selection_images(image_index, settings.max_images, seed)
    labels = rows["label"].to_numpy(np.int64)
    candidates = resolve_candidates(settings, data_profile["typical_short_side"])
    logger.info("Ranking %d backbone candidates on %d train+val images", len(candidates), len(rows))
    table = pd.DataFrame(
        [
            score_candidate(candidate, rows, labels, extraction, device, seed)
            for candidate in candidates
        ]
    )
    if settings.finetune:
        profile = {**data_profile, "n_train": int((rows["split"] == "train").sum())}
        table["finetune_val_accuracy"] = [
            short_finetune_accuracy(c, rows, profile, settings.finetune_steps, device, seed)
            if c.pretrained
            else math.nan
            for c in candidates
        ]
    table["data_fingerprint"] = fingerprint
    table["score_used"] = settings.score
    table = table.sort_values(
        ["pretrained", settings.score], ascending=[False, False], na_position="last"
    )
    return table.reset_index(drop=True)


def score_candidate(
    candidate: Candidate,
    rows: pd.DataFrame,
    labels: np.ndarray,
    extraction: ExtractionSettings,
    device: torch.device,
    seed: int,
) -> dict[str, Any]:
    """Features (cached), the transferability scores and the probe accuracy of one candidate."""
    backbone = build_backbone(
        BackboneSettings(candidate.name, candidate.image_size, candidate.pretrained), seed
    )
    extracted = extract_features(backbone, rows["location"].tolist(), extraction, device)
    features = np.array(extracted.features, dtype=np.float32)  # a writable copy of the cache

    start = time.perf_counter()
    scores = {
        "logme": transferability.logme(features, labels),
        "h_score": transferability.h_score(features, labels),
        "knn": transferability.knn_accuracy(features, labels, seed=seed),
        **source_head_scores(backbone.classifier, features, labels),
    }
    scoring_seconds = time.perf_counter() - start

    start = time.perf_counter()
    train, val = (rows["split"] == "train").to_numpy(), (rows["split"] == "val").to_numpy()
    settings = HeadSettings(selection="cv", refit_on_train_val=False)
    probe = select_and_fit(
        (features[train], labels[train]),
        (features[val], labels[val]),
        settings,
        seed,
    )
    folds = min(settings.cv_folds, smallest_class(labels))  # as the probe's cross-validation has
    row = {
        "candidate": candidate.label,
        "name": candidate.name,
        "image_size": candidate.image_size,
        "pretrained": candidate.pretrained,
        **scores,
        "probe_accuracy": probe.val_accuracy,
        "probe_accuracy_std": probe.chosen["val_accuracy_std"],
        # The standard error of the mean over the folds: what the one-standard-error pick uses.
        "probe_accuracy_se": probe.chosen["val_accuracy_std"] / math.sqrt(max(folds, 1)),
        "gflops": forward_gflops(backbone.features, candidate.image_size),
        "extraction_seconds": extracted.seconds,
        "features_cached": extracted.cached,
        "scoring_seconds": scoring_seconds,
        "probe_seconds": time.perf_counter() - start,
    }
    logger.info("%s", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return row


def forward_gflops(network: torch.nn.Module, image_size: int) -> float:
    """Billions of floating-point operations of one image's forward pass: the candidate's cost
    in every strategy (extraction, fine-tuning and serving all scale with it)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = network.training
    network.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        network(torch.zeros(1, 3, image_size, image_size))
    network.train(was_training)
    return counter.get_total_flops() / 1e9


def short_finetune_accuracy(
    candidate: Candidate,
    rows: pd.DataFrame,
    data_profile: Mapping[str, Any],
    steps: int,
    device: torch.device,
    seed: int,
) -> float:
    """Best val accuracy of the project's fine-tuning recipe (every `auto` resolved from the data)
    cut to `steps` optimiser steps: a costlier, closer look at what fine-tuning would get."""
    from transfer_learning.training.recipe import Recipe, TrainingRunSettings, TrainValImages
    from transfer_learning.training.trainer import train_classifier

    backbone = {"name": candidate.name, "image_size": candidate.image_size}
    recipe = Recipe.from_params(backbone, {"steps": steps}, None, "selection").resolve(data_profile)
    images = TrainValImages.from_index(rows[rows["split"] == "train"], rows[rows["split"] == "val"])
    with tempfile.TemporaryDirectory() as checkpoints:  # nothing to resume: thrown away
        run = TrainingRunSettings(checkpoint_dir=checkpoints, progress=False)
        result = train_classifier(
            images, int(rows["label"].max()) + 1, recipe, run, seed, device, candidate.label
        )
    logger.info("%s: short fine-tune val accuracy %.4f", candidate.label, result.best_val_accuracy)
    return float(result.best_val_accuracy)


def source_head_scores(
    classifier: torch.nn.Module, features: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """NCE and LEEP from the network's own (ImageNet) classifier; NaN when it has none."""
    if isinstance(classifier, torch.nn.Identity):
        return dict.fromkeys(SOURCE_HEAD_SCORES, math.nan)
    with torch.inference_mode():
        logits = torch.cat(
            [classifier(torch.from_numpy(chunk)) for chunk in np.array_split(features, 16)]
        ).numpy()
    return {
        "nce": transferability.nce(logits.argmax(axis=1), labels),
        "leep": transferability.leep(logits, labels),
    }


# ---- how well each score ranked ------------------------------------------------------------


def score_quality(ranking: pd.DataFrame) -> pd.DataFrame:
    """Per score: Kendall τ and weighted τ against the probe ranking of the pretrained
    candidates, the pick's regret in probe accuracy, and whether a control outranks a
    pretrained candidate."""
    pretrained = ranking[ranking["pretrained"]]
    controls = ranking[~ranking["pretrained"]]
    truth = pretrained["probe_accuracy"].to_numpy()
    quality = []
    for score in transferability.SCORES:
        values = pretrained[score].to_numpy(dtype=float)
        if np.isnan(values).any():
            continue
        pick = int(np.argmax(values))
        enough = len(values) > 1 and np.ptp(values) > 0 and np.ptp(truth) > 0
        quality.append(
            {
                "score": score,
                "kendall_tau": float(kendalltau(values, truth).statistic) if enough else math.nan,
                "weighted_tau": float(weightedtau(values, truth).statistic) if enough else math.nan,
                "pick": pretrained["candidate"].iloc[pick],
                "regret": float(truth.max() - truth[pick]),
                "control_above_pretrained": bool(
                    len(controls) and np.nanmax(controls[score]) >= values.min()
                ),
            }
        )
    return pd.DataFrame(quality)


def recommendation(ranking: pd.DataFrame) -> dict[str, Any]:
    """The pretrained candidate with the best value of the ranking's score — by probe accuracy,
    the cheapest one within one standard error of the best (the one-standard-error rule, Hastie
    et al. 2009, §7.10): a costlier network must beat the cheaper one by more than the
    cross-validation's noise, since every strategy pays its cost in every image it trains on
    and serves."""
    score = ranking["score_used"].iloc[0]
    pretrained = ranking[ranking["pretrained"]]
    best = pretrained.loc[pretrained[score].idxmax()]
    if score == "probe_accuracy" and {"probe_accuracy_se", "gflops"} <= set(pretrained):
        close = pretrained[
            pretrained[score] >= best[score] - np.nan_to_num(best["probe_accuracy_se"])
        ]
        best = close.loc[close["gflops"].idxmin()]
    return {
        "name": best["name"],
        "image_size": int(best["image_size"]),
        "score": score,
        "value": float(best[score]),
        "probe_accuracy": float(best["probe_accuracy"]),
        "data_fingerprint": best["data_fingerprint"],
    }


def pick_reason(pick: Mapping[str, Any]) -> str:
    if pick["score"] == "probe_accuracy":
        return "the fewest GFLOPs within one standard error of the best probe accuracy"
    return f"best {pick['score']} among the pretrained candidates"


def ranking_markdown(ranking: pd.DataFrame, quality: pd.DataFrame) -> str:
    pick = recommendation(ranking)
    shown = ranking.drop(columns=["name", "data_fingerprint", "score_used"])
    lines = [
        "# Backbone ranking",
        "",
        f"Recommended: **{pick['name']} at {pick['image_size']} px** ({pick_reason(pick)}; its "
        f"cross-validated probe accuracy {pick['probe_accuracy']:.1%}). Use it with "
        f'`--params="backbone.name={pick["name"]},backbone.image_size={pick["image_size"]}"`, '
        "or set `backbone.name: auto`.",
        "",
        "Scores are computed from frozen train+val features; `probe_accuracy` is the "
        "cross-validated accuracy of the frozen-features head on the same features: the ground "
        "truth the scores try to predict. Candidates marked (random) are the same networks with "
        "random weights (negative controls).",
        "",
        markdown_table(shown),
        "",
        "## How well each score ranked the pretrained candidates",
        "",
        "τ: rank correlation of the score with the probe accuracy (1 = same order). Regret: "
        "the best probe accuracy minus the probe accuracy of the score's pick.",
        "",
        markdown_table(quality),
    ]
    flagged = quality.loc[quality["control_above_pretrained"], "score"].tolist()
    controls = ranking[~ranking["pretrained"]]
    if len(controls) and controls["probe_accuracy"].max() >= pick["probe_accuracy"]:
        lines += [
            "",
            "**Note:** a random-weight network's features are at least as good for the probe as "
            "the recommended pretrained one's: on these images ImageNet weights may not help "
            "(compare fine-tuning from random weights with fine-tuning from pretrained ones).",
        ]
    if flagged:
        lines += [
            "",
            f"**Warning:** {', '.join(flagged)} ranked a random-weight control at or above a "
            "pretrained network on these images; do not trust those scores here.",
        ]
    return "\n".join(lines) + "\n"


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float | np.floating):
            return "n/a" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def ranking_figure(ranking: pd.DataFrame) -> Figure:
    """One panel per score: score (x) against probe accuracy (y); controls as crosses."""
    scores = [s for s in transferability.SCORES if ranking[s].notna().any()]
    figure = Figure(figsize=(3.2 * len(scores), 3.2), layout="constrained")
    axes = figure.subplots(1, len(scores), squeeze=False)[0]
    for axis, score in zip(axes, scores, strict=True):
        for pretrained, marker in ((True, "o"), (False, "x")):
            part = ranking[ranking["pretrained"] == pretrained]
            axis.scatter(part[score], part["probe_accuracy"], marker=marker, color="tab:blue")
        for row in ranking[ranking["pretrained"]].itertuples():
            axis.annotate(row.candidate, (getattr(row, score), row.probe_accuracy), fontsize=6)
        axis.set_xlabel(score)
        axis.set_ylabel("probe accuracy (CV)")
    figure.suptitle("Transferability score vs. cross-validated probe accuracy (x: random weights)")
    return figure


def chosen_backbone(
    ranking: pd.DataFrame | None, fingerprint: str
) -> tuple[dict[str, Any] | None, str]:
    """The recommendation of a saved ranking if it was made on these images, and why (not)."""
    if ranking is None or ranking.empty:
        return None, "no backbone_ranking has been saved yet"
    pick = recommendation(ranking)
    if pick["data_fingerprint"] != fingerprint:
        return None, "the latest backbone_ranking was made on other images"
    return pick, f"the latest backbone_ranking's pick: {pick_reason(pick)} ({pick['value']:.4g})"


def choose_backbone(  # noqa: PLR0913 (what a ranking made on the spot needs)
    settings: BackboneSettings,
    image_index: pd.DataFrame,
    data_profile: Mapping[str, Any],
    saved_ranking: pd.DataFrame | None,
    selection: SelectionSettings,
    extraction: ExtractionSettings,
    device: torch.device,
    seed: int,
) -> tuple[BackboneSettings, str]:
    """`backbone.name: auto` → the pick of the saved ranking when it was made on these train+val
    images, else of a ranking made now; the user's own image size wins over the pick's.

    Images smaller than RANKED_FROM_SIDE (digits, CIFAR-style thumbnails) skip the ranking and
    take the cheapest candidate: enlarged at most 4x they reach 128 px at best, where the larger
    networks' extra resolution has nothing to see, and a ranking would cost more than the run.
    """
    if settings.weights_path is not None:
        raise BackboneError(
            "backbone.name=auto cannot use backbone.weights_path (a file is for one "
            "architecture): name the architecture, or drop the file."
        )
    short_side = data_profile.get("typical_short_side")
    if short_side is not None and short_side < RANKED_FROM_SIDE:
        reason = f"auto: images of {short_side} px, below {RANKED_FROM_SIDE} px: not ranked"
        return replace(settings, name=OFFLINE_BACKBONES[0]), reason
    _, fingerprint = selection_images(image_index, selection.max_images, seed)
    pick, reason = chosen_backbone(saved_ranking, fingerprint)
    if pick is None:
        logger.warning(
            "backbone.name=auto: %s; ranking the candidates now (`kedro run "
            "--pipelines=backbone_selection` saves a ranking that later runs reuse).",
            reason,
        )
        ranking = rank_backbones(image_index, data_profile, selection, extraction, device, seed)
        pick = recommendation(ranking)
        reason = f"ranked now: {pick_reason(pick)} ({pick['value']:.4g})"
    image_size = pick["image_size"] if settings.image_size == AUTO else settings.image_size
    return replace(settings, name=pick["name"], image_size=image_size), reason
