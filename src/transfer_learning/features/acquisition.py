"""Which unlabelled images to label next (active learning), ranked on frozen features.

The strategies are scikit-activeml's (BSD-3): TypiClust (Hacohen et al. 2022: k-means over
labelled and unlabelled images, the most typical image of each cluster no label covers yet),
uncertainty sampling by the margin between the head's two most probable classes, and random
sampling. What is written here is what no library decides for the user:

- `auto`: TypiClust while the labelled images are fewer than `COLD_START_PER_CLASS` a class,
  the margin after. Uncertainty alone is weak from a cold start (a head fitted on one image a
  class is unsure of everything) and typicality stops paying once the clusters are covered:
  measured on the flowers (docs/benchmarks.md, "Label budget"), TypiClust leads margin by 19
  points at 15 labels and margin leads it once every class has several.
- one batch never holds two near-duplicates: the same picture re-encoded, resized or shifted
  (`data.duplicates`' perceptual check), or two frames of one burst, which that check does not
  call the same picture. Those are caught in feature space: two images closer than all but
  `SIMILAR_SHARE` of the pool's images are to their nearest neighbour (a threshold that follows
  each pool, not one number for every data set). The second of a pair is passed over and the
  strategy asked again, so a labeller never labels one picture twice.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from skactiveml.pool import RandomSampling, TypiClust, uncertainty_scores
from skactiveml.utils import MISSING_LABEL

from transfer_learning.core.config import check_known_keys
from transfer_learning.models.heads import HeadSettings, select_and_fit, unit_rows

logger = logging.getLogger(__name__)

METHODS = ("auto", "typicality", "margin", "random")
# auto: typicality below this many labelled images a class (on average), margin from there on.
COLD_START_PER_CLASS = 8
# Two pool images are near-duplicates in feature space when their cosine similarity reaches the
# nearest-neighbour similarity that only this share of pool images exceed (estimated on a sample).
SIMILAR_SHARE = 0.05
SIMILARITY_SAMPLE = 2000


TABLE_COLUMNS = ["path", "rank", "suggested_label", "confidence", "score", "reason"]


class AcquisitionError(ValueError):
    """The pool cannot be ranked as configured."""


@dataclass(frozen=True)
class LabelNextSettings:
    """The `label_next` block: how many pool images to propose, and by which method."""

    count: int = 50
    method: str = "auto"

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> LabelNextSettings:
        check_known_keys(cls, params, "label_next", AcquisitionError)
        settings = cls(**params)
        if isinstance(settings.count, bool) or not isinstance(settings.count, int):
            raise AcquisitionError(f"label_next.count={settings.count!r} must be a whole number.")
        if settings.count < 1:
            raise AcquisitionError(f"label_next.count={settings.count} must be ≥ 1.")
        if settings.method not in METHODS:
            raise AcquisitionError(
                f"label_next.method={settings.method!r} must be one of {', '.join(METHODS)}."
            )
        return settings

    def resolved_method(self, n_labelled: int, n_classes: int) -> str:
        """The method `auto` stands for with this many labelled images."""
        if self.method != "auto":
            return self.method
        cold = n_labelled < COLD_START_PER_CLASS * max(n_classes, 1)
        return "typicality" if cold else "margin"


@dataclass(frozen=True)
class Acquisition:
    """The pool images to label next, most useful first: `positions` into the pool, each with
    the method's `scores` (higher: more useful) and a `reason` a person reads."""

    positions: np.ndarray
    scores: np.ndarray
    reasons: list[str]
    method: str
    passed_over: int  # near-duplicates of an image already in the batch


# What a batch must not hold twice: (positions) → pairs (i, j) of positions that are the same
# picture. Supplied by the caller (it reads the files); None checks nothing.
NearDuplicates = Callable[[np.ndarray], list[tuple[int, int]]]


def rank_pool(  # noqa: PLR0913 (the pool, what is labelled, the head's view, the settings)
    pool_features: np.ndarray,
    labelled_features: np.ndarray,
    labelled: np.ndarray,
    pool_probabilities: np.ndarray | None,
    method: str,
    count: int,
    seed: int,
    near_duplicates: NearDuplicates | None = None,
) -> Acquisition:
    """The `count` pool images to label next by `method` (resolved: not `auto`).

    `labelled` are the labels of `labelled_features`; `pool_probabilities` the current head's
    class probabilities for the pool (margin needs them).
    """
    if len(pool_features) == 0:
        raise AcquisitionError(
            "The unlabelled pool is empty: nothing to rank. Add images without labels "
            "(data.unlabelled_path, or manifest rows with an empty label) and run again."
        )
    if method == "margin" and pool_probabilities is None:
        raise AcquisitionError("label_next.method=margin needs a head fitted on labelled images.")
    chosen: list[int] = []
    scores: dict[int, float] = {}
    excluded: set[int] = set()
    count = min(count, len(pool_features))
    while len(chosen) < count and len(chosen) + len(excluded) < len(pool_features):
        candidates = np.array(
            [i for i in range(len(pool_features)) if i not in excluded and i not in chosen]
        )
        batch, utilities = _query(
            method,
            pool_features,
            labelled_features,
            labelled,
            pool_probabilities,
            np.array(chosen, dtype=int),
            candidates,
            count - len(chosen),
            seed,
        )
        for position, utility in zip(batch, utilities, strict=True):
            pairs = near_duplicates(np.array([*chosen, position])) if near_duplicates else []
            if any(position in pair for pair in pairs):
                excluded.add(int(position))
            else:
                chosen.append(int(position))
                scores[int(position)] = float(utility)
    order = np.array(chosen, dtype=int)
    values = np.array([scores[i] for i in chosen])
    reasons = [_reason(method, i, pool_probabilities) for i in chosen]
    return Acquisition(order, values, reasons, method, len(excluded))


def _query(  # noqa: PLR0913
    method: str,
    pool_features: np.ndarray,
    labelled_features: np.ndarray,
    labelled: np.ndarray,
    pool_probabilities: np.ndarray | None,
    chosen: np.ndarray,
    candidates: np.ndarray,
    size: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(positions into the pool, their utilities) of the next `size` images by `method`."""
    if method == "margin":
        utility = uncertainty_scores(pool_probabilities[candidates], method="margin_sampling")
        best = np.argsort(-utility, kind="stable")[:size]
        return candidates[best], utility[best]
    if method == "random":
        y = np.full(len(pool_features), MISSING_LABEL)
        query = RandomSampling(random_state=seed).query(
            pool_features, y, candidates=candidates, batch_size=min(size, len(candidates))
        )
        return np.asarray(query), np.zeros(len(query))
    # Typicality: the labelled images, and those already chosen, count as covering their
    # clusters; features on the unit sphere, where k-means and k-NN distances compare angles.
    features = unit_rows(np.concatenate([labelled_features, pool_features]))
    offset = len(labelled_features)
    y = np.full(len(features), MISSING_LABEL)
    y[:offset] = labelled
    y[offset + chosen] = 0  # covered: the label does not matter, only that there is one
    query, utilities = TypiClust(random_state=seed).query(
        features,
        y,
        candidates=offset + candidates,
        batch_size=min(size, len(candidates)),
        return_utilities=True,
    )
    query = np.asarray(query)
    typicality = np.array([np.nanmax(u) for u in utilities]) if len(query) else np.empty(0)
    return query - offset, typicality


def _reason(method: str, position: int, probabilities: np.ndarray | None) -> str:
    if method == "typicality":
        return "typical of a group of unlabelled images that no label covers yet"
    if method == "random":
        return "drawn at random"
    top = np.sort(probabilities[position])[::-1]
    return f"uncertain: the two most probable classes {top[0]:.2f} and {top[1]:.2f}"


@dataclass(frozen=True)
class Proposal:
    """The images to label next: `table` (TABLE_COLUMNS, most useful first, plus `location`),
    how they were chosen, the head whose guesses `suggested_label` gives, and the effort."""

    table: pd.DataFrame
    method: str
    head_type: str
    passed_over: int  # near-duplicates of an image already in the batch
    n_pool: int
    n_labelled: int
    seconds: float

    def figures(self) -> dict[str, float]:
        """What MLflow records of the run (metrics)."""
        return {
            "n_unlabelled": self.n_pool,
            "n_proposed": len(self.table),
            "n_labelled": self.n_labelled,
            "near_duplicates_passed_over": self.passed_over,
            "seconds": self.seconds,
        }

    def choice(self) -> dict[str, str]:
        """What `auto` resolved to (MLflow parameters)."""
        return {"method": self.method, "head_type": self.head_type}


def labelled_rows(image_features: Mapping[str, np.ndarray]) -> np.ndarray:
    """Which rows of the extracted features count as labelled: train and val, never test."""
    return np.isin(image_features["split"], ["train", "val"]) & (image_features["label"] >= 0)


def propose_labels(
    image_features: Mapping[str, np.ndarray],
    pool: pd.DataFrame,
    pool_features: np.ndarray,
    classes: list[str],
    settings: LabelNextSettings,
    head_settings: HeadSettings,
    seed: int,
    near_duplicates: NearDuplicates | None = None,
) -> Proposal:
    """Rank the pool (rows of `sources.pool_frame`) for labelling from the train and val images
    of `image_features`: the head is fitted on them as the feature-based strategy fits it (type
    and hyper-parameters chosen by cross-validation), and its most probable class for each
    chosen image is the `suggested_label`, a pre-label for the labelling tool."""
    started = time.perf_counter()
    labelled = labelled_rows(image_features)
    features, labels = image_features["features"][labelled], image_features["label"][labelled]
    head = select_and_fit((features, labels), (features[:0], labels[:0]), head_settings, seed)
    probabilities = head.model.predict_proba(pool_features) if len(pool_features) else None
    method = settings.resolved_method(len(labels), len(classes))
    close = close_in_features(pool_features, seed)
    ranked = rank_pool(
        pool_features,
        features,
        labels,
        probabilities,
        method,
        settings.count,
        seed,
        lambda positions: (
            close(positions) + (near_duplicates(positions) if near_duplicates else [])
        ),
    )
    chosen = pool.iloc[ranked.positions]
    guesses = probabilities[ranked.positions]
    names = np.asarray(classes, dtype=object)[np.asarray(head.model.classes_)]
    table = pd.DataFrame(
        {
            "path": chosen["path"].to_numpy(),
            "rank": np.arange(1, len(chosen) + 1),
            "suggested_label": names[guesses.argmax(axis=1)],
            "confidence": guesses.max(axis=1).round(4),
            "score": ranked.scores.round(4),
            "reason": ranked.reasons,
            "location": chosen["location"].to_numpy(),
        }
    )
    seconds = time.perf_counter() - started
    logger.info(
        "label_next: %d of %d unlabelled images ranked by %s in %.1f s (%d near-duplicates passed "
        "over). Label them in data/08_reporting/label_next_manifest.csv, then run "
        '--params="data.source=manifest,data.manifest=<that file>,data.split_column=split".',
        len(table),
        len(pool),
        method,
        seconds,
        ranked.passed_over,
    )
    return Proposal(
        table, method, head.head_type, ranked.passed_over, len(pool), int(labelled.sum()), seconds
    )


def close_in_features(pool_features: np.ndarray, seed: int) -> NearDuplicates:
    """A check for any set of pool images (positions): the pairs closer in feature space than
    all but SIMILAR_SHARE of the pool's images are to their nearest neighbour."""
    unit = unit_rows(pool_features)
    if len(unit) < 2:
        return lambda positions: []
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(unit), size=min(len(unit), SIMILARITY_SAMPLE), replace=False)
    nearest = np.empty(len(sample))
    for start in range(0, len(sample), 256):  # (256, pool) blocks: memory stays bounded
        rows = sample[start : start + 256]
        similarity = unit[rows] @ unit.T
        similarity[np.arange(len(rows)), rows] = -np.inf  # not itself
        nearest[start : start + len(rows)] = similarity.max(axis=1)
    threshold = float(np.quantile(nearest, 1 - SIMILAR_SHARE))

    def close(positions: np.ndarray) -> list[tuple[int, int]]:
        positions = np.asarray(positions, dtype=int)
        similarity = unit[positions] @ unit[positions].T
        first, second = np.triu_indices(len(positions), k=1)
        hit = similarity[first, second] >= threshold
        return list(
            zip(positions[first[hit]].tolist(), positions[second[hit]].tolist(), strict=True)
        )

    return close


def labelling_manifest(
    image_features: Mapping[str, np.ndarray],
    classes: list[str],
    pool: pd.DataFrame,
    proposal: Proposal,
) -> pd.DataFrame:
    """A manifest (`path`, `label`, `split`) of every image: the batch to label first, with an
    empty label to fill in, then the labelled images as they are split now (the test split
    stays the test split), then the rest of the pool. Read back with data.source=manifest and
    data.split_column=split, the filled-in rows train, the empty ones stay the pool."""
    batch = pd.DataFrame({"path": proposal.table["location"], "label": "", "split": "train"})
    split = pd.Series(image_features["split"])
    # Images set aside as label issues were train or val images; ingestion sets them aside again.
    split = split.where(split.isin(["train", "val", "test"]), "train")
    labelled = pd.DataFrame(
        {
            "path": image_features["location"],
            "label": np.asarray(classes, dtype=object)[image_features["label"]],
            "split": split,
        }
    )
    rest = pool[~pool["location"].isin(proposal.table["location"])]
    unlabelled = pd.DataFrame({"path": rest["location"], "label": "", "split": ""})
    manifest = pd.concat([batch, labelled, unlabelled], ignore_index=True)
    # Absolute paths: a manifest's relative paths resolve against its own folder.
    manifest["path"] = [os.path.abspath(path) for path in manifest["path"]]
    return manifest
