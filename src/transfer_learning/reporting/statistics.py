"""How sure the comparison is: bootstrap intervals, paired tests between strategies, Holm's
adjustment, the smallest difference a test set can detect, and the recommendation.

Every strategy is scored on the same test images, so two strategies are compared *paired*: the
exact McNemar test on the images one gets right and the other wrong, and a paired bootstrap of
the accuracy difference (the same resampled images for both).

A strategy trained with several seeds (`evaluation.seeds`) has one prediction per seed and test
image. Its figures are then means over the seeds; every bootstrap resample draws the seeds with
replacement as well as the images, so the intervals cover both the training seed and the test
sample; and two strategies are compared by that bootstrap's two-sided p-value, since McNemar's
test is exact for one pair of models only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.stats import binomtest, norm

from transfer_learning.core.config import check_known_keys, positive_int

RESAMPLES = 2000
LEVEL = 0.95
ALPHA = 0.05
POWER = 0.8
INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
MCNEMAR = "mcnemar_exact"
SEEDS_BOOTSTRAP = "paired_bootstrap_over_seeds_and_images"
TEST_NAMES = {MCNEMAR: "McNemar", SEEDS_BOOTSTRAP: "paired-bootstrap (seeds × images)"}
# Elements of one block of resampled confusion matrices: bounds the memory whatever the classes.
_BLOCK_ELEMENTS = 4_000_000


def _resample_blocks(n_images: int, n_classes: int, resamples: int, seed: int):
    """Blocks of resampled image positions (resamples × n_images), seeded: the same for any
    metric and any strategy scored on these images."""
    rng = np.random.default_rng(seed)
    per_block = max(1, _BLOCK_ELEMENTS // max(n_images, n_classes * n_classes))
    for start in range(0, resamples, per_block):
        yield rng.integers(0, n_images, size=(min(per_block, resamples - start), n_images))


def _confusions(labels: np.ndarray, predicted: np.ndarray, n_classes: int, positions: np.ndarray):
    """One confusion matrix (true × predicted) per row of resampled `positions`."""
    codes = (labels * n_classes + predicted)[positions]
    offsets = np.arange(len(positions))[:, None] * n_classes * n_classes
    counts = np.bincount((codes + offsets).ravel(), minlength=len(positions) * n_classes**2)
    return counts.reshape(len(positions), n_classes, n_classes)


def metrics_of_confusions(confusions: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy (mean recall of the classes present) and macro-F1 (over every
    class, 0 for a class never predicted nor present) of each confusion matrix, as scikit-learn
    computes them in `reporting.evaluation`."""
    true_positive = np.diagonal(confusions, axis1=1, axis2=2).astype(np.float64)
    support = confusions.sum(axis=2)
    predicted = confusions.sum(axis=1)
    total = support.sum(axis=1)
    present = support > 0
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=present)
    denominator = support + predicted
    f1 = np.divide(
        2 * true_positive, denominator, out=np.zeros_like(true_positive), where=denominator > 0
    )
    return {
        "accuracy": true_positive.sum(axis=1) / total,
        "balanced_accuracy": recall.sum(axis=1) / present.sum(axis=1),
        "macro_f1": f1.mean(axis=1),
    }


def _seed_draws(n_seeds: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples × n_seeds) seed positions drawn with replacement; one seed needs no draw."""
    if n_seeds == 1:
        return np.zeros((resamples, 1), dtype=np.int64)
    return rng.integers(0, n_seeds, size=(resamples, n_seeds))


def _mean_over_drawn_seeds(per_seed: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """Each resample's mean over its drawn seeds, from per-seed values (seeds × resamples)."""
    return per_seed[drawn, np.arange(per_seed.shape[1])[:, None]].mean(axis=1)


def seed_predictions_matrix(predicted: np.ndarray) -> np.ndarray:
    """Predicted labels as (seeds × images): one model's (images,) becomes one row."""
    return np.atleast_2d(np.asarray(predicted, dtype=np.int64))


def metrics_by_seed(
    labels: np.ndarray, predicted: np.ndarray, n_classes: int
) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro-F1 of each seed's predictions (seeds × images)."""
    labels, predicted = np.asarray(labels, dtype=np.int64), seed_predictions_matrix(predicted)
    every_image = np.arange(len(labels))[None]
    per_seed = [
        metrics_of_confusions(_confusions(labels, row, n_classes, every_image)) for row in predicted
    ]
    return {name: np.concatenate([m[name] for m in per_seed]) for name in INTERVAL_METRICS}


def bootstrap_intervals(
    labels: np.ndarray,
    predicted: np.ndarray,
    n_classes: int,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, list[float]]:
    """Percentile-bootstrap `level` intervals of accuracy, balanced accuracy and macro-F1 over
    the test images (resampled with replacement, seeded).

    `predicted` is one model's labels (images,) or one per training seed (seeds × images): then
    each resample also draws the seeds with replacement and takes the mean over them.
    """
    labels, predicted = np.asarray(labels, dtype=np.int64), seed_predictions_matrix(predicted)
    seed_rng = np.random.default_rng([seed, len(predicted)])
    draws: dict[str, list[np.ndarray]] = {name: [] for name in INTERVAL_METRICS}
    for positions in _resample_blocks(len(labels), n_classes, resamples, seed):
        per_seed = [
            metrics_of_confusions(_confusions(labels, row, n_classes, positions))
            for row in predicted
        ]
        drawn = _seed_draws(len(predicted), len(positions), seed_rng)
        for name in INTERVAL_METRICS:
            values = np.stack([metrics[name] for metrics in per_seed])
            draws[name].append(_mean_over_drawn_seeds(values, drawn))
    tail = (1 - level) / 2 * 100
    return {
        name: [float(v) for v in np.percentile(np.concatenate(values), [tail, 100 - tail])]
        for name, values in draws.items()
    }


@dataclass(frozen=True)
class EvaluationSettings:
    """The `evaluation` parameter block."""

    seeds: int = 1  # train every strategy with this many seeds: seed, seed + 1, …

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> EvaluationSettings:
        params = dict(params or {})
        check_known_keys(cls, params, "evaluation", ValueError)
        settings = cls(**params)
        if not positive_int(settings.seeds):
            raise ValueError(
                f"evaluation.seeds must be a whole number ≥ 1, got {settings.seeds!r}; 1 trains "
                "each strategy once, N trains it N times and the intervals cover the seeds."
            )
        return settings

    def other_seeds(self, seed: int) -> list[int]:
        """The seeds of a strategy's extra trainings, after its own `seed`."""
        return [seed + k for k in range(1, self.seeds)]


@dataclass(frozen=True)
class PairedComparison:
    a: str
    b: str
    accuracy_difference: float  # accuracy of a − accuracy of b
    interval: list[float]  # paired-bootstrap interval of the difference
    a_only_right: int  # images a gets right and b wrong (the first seed's models)
    b_only_right: int
    p_value: float  # exact McNemar; with several seeds, the paired bootstrap's two-sided p
    p_value_holm: float = math.nan
    test: str = MCNEMAR

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "accuracy_difference": self.accuracy_difference,
            "interval": self.interval,
            "a_only_right": self.a_only_right,
            "b_only_right": self.b_only_right,
            "p_value": self.p_value,
            "p_value_holm": self.p_value_holm,
            "test": self.test,
        }

    @property
    def test_name(self) -> str:
        return TEST_NAMES[self.test]


def mcnemar_exact(a_only_right: int, b_only_right: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against ½."""
    discordant = a_only_right + b_only_right
    if discordant == 0:
        return 1.0
    return float(binomtest(a_only_right, discordant, 0.5).pvalue)


def paired_comparison(
    names: tuple[str, str],
    labels: np.ndarray,
    predicted_a: np.ndarray,
    predicted_b: np.ndarray,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> PairedComparison:
    """Strategy a against b on the same test images (in the same order).

    `predicted_a` and `predicted_b` are one model's labels each, or one row per training seed
    (seeds × images). With one seed each: the exact McNemar test. With more: the difference of
    the means over the seeds, and the p-value of the bootstrap that draws images (the same for
    both) and each strategy's seeds (independently: seed k of one is unrelated to seed k of
    the other). The discordant counts are always the first seed's (the deployed) models'.
    """
    labels = np.asarray(labels)
    right_a = seed_predictions_matrix(predicted_a) == labels
    right_b = seed_predictions_matrix(predicted_b) == labels
    seed_rng = np.random.default_rng([seed, len(right_a), len(right_b)])
    draws = []
    for positions in _resample_blocks(len(labels), 1, resamples, seed):
        means = []
        for right in (right_a, right_b):
            per_seed = np.stack([row[positions].mean(axis=1) for row in right])
            drawn = _seed_draws(len(right), len(positions), seed_rng)
            means.append(_mean_over_drawn_seeds(per_seed, drawn))
        draws.append(means[0] - means[1])
    draws = np.concatenate(draws)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    a_only = int((right_a[0] & ~right_b[0]).sum())
    b_only = int((right_b[0] & ~right_a[0]).sum())
    one_seed = len(right_a) == len(right_b) == 1
    return PairedComparison(
        names[0],
        names[1],
        float(right_a.mean() - right_b.mean()),
        [float(low), float(high)],
        a_only,
        b_only,
        mcnemar_exact(a_only, b_only) if one_seed else bootstrap_p_value(draws),
        test=MCNEMAR if one_seed else SEEDS_BOOTSTRAP,
    )


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided p-value of "no difference" from bootstrap draws of a difference: twice the
    smaller share of draws on either side of 0 (each count plus one, so never 0)."""
    below, above = int((differences <= 0).sum()), int((differences >= 0).sum())
    return min(1.0, 2 * (min(below, above) + 1) / (len(differences) + 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: controls the chance of any false "significant" among them."""
    order = np.argsort(p_values, kind="stable")
    adjusted = np.empty(len(p_values))
    running = 0.0
    for rank, position in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[position]))
        adjusted[position] = running
    return [float(value) for value in adjusted]


def images_needed(difference: float, discordant: float, alpha: float = ALPHA, power: float = POWER):
    """Test images a paired (McNemar) comparison needs to detect an accuracy `difference` when
    the two strategies disagree on a share `discordant` of the images (Connor 1987); None when
    such a difference cannot arise (it exceeds the disagreement)."""
    if not 0 < difference < discordant:
        return None
    z_alpha, z_beta = norm.ppf(1 - alpha / 2), norm.ppf(power)
    root = z_alpha * math.sqrt(discordant) + z_beta * math.sqrt(discordant - difference**2)
    return math.ceil(root**2 / difference**2)


def detectable_difference(
    n_images: int, discordant: float, alpha: float = ALPHA, power: float = POWER
) -> float | None:
    """The smallest accuracy difference `n_images` test images detect with `power` when the two
    strategies disagree on a share `discordant` of them; None when no possible one is."""
    largest = discordant * (1 - 1e-9)  # a difference cannot exceed the disagreement
    if discordant <= 0 or images_needed(largest, discordant, alpha, power) > n_images:
        return None
    low, high = 0.0, largest
    for _ in range(60):  # bisection: the images needed fall as the difference grows
        middle = (low + high) / 2
        if images_needed(middle, discordant, alpha, power) > n_images:
            low = middle
        else:
            high = middle
    return high


def recommendation(
    summaries: Mapping[str, Mapping[str, Any]], pairwise: Sequence[PairedComparison]
) -> dict[str, Any]:
    """The cheapest strategy (training + scoring seconds) whose accuracy is not significantly
    below the most accurate one's (Holm-adjusted p ≥ ALPHA), with the reason in words."""
    best = max(summaries, key=lambda name: summaries[name]["accuracy"])

    def pair_with_best(name: str) -> PairedComparison | None:
        return next((p for p in pairwise if {p.a, p.b} == {best, name}), None)

    def cost(name: str) -> float:
        return float(summaries[name].get("fit_seconds", 0)) + float(
            summaries[name].get("predict_seconds", 0)
        )

    tied = [
        name
        for name in summaries
        if name == best or (pair_with_best(name) and pair_with_best(name).p_value_holm >= ALPHA)
    ]
    chosen = min(tied, key=cost)
    accuracy = summaries[best]["accuracy"]
    if chosen == best:
        others = [name for name in summaries if name != best]
        reason = f"{best} is the most accurate ({accuracy * 100:.1f} %)" + (
            " and every cheaper strategy is significantly less accurate on this test set."
            if any(cost(name) < cost(best) for name in others)
            else " and the cheapest of those not significantly below it."
        )
    else:
        pair = pair_with_best(chosen)
        own = summaries[chosen]["accuracy"]
        reason = (
            f"{chosen} costs least ({cost(chosen):.0f} s to train and score against "
            f"{cost(best):.0f} s for {best}) and its accuracy, {own * 100:.1f} %, is not "
            f"significantly below {best}'s {accuracy * 100:.1f} % (difference "
            f"{(own - accuracy) * 100:+.1f} points, Holm-adjusted {pair.test_name} p = "
            f"{pair.p_value_holm:.2g})."
        )
    return {"strategy": chosen, "most_accurate": best, "reason": reason}


def pairwise_comparisons(
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]], seed: int = 0
) -> list[PairedComparison]:
    """Every pair of strategies (in the order given) on the same test images, `predictions`
    being name → (labels, predicted labels: one model's, or seeds × images); Holm-adjusted over
    all the pairs."""
    names = list(predictions)
    first_labels = predictions[names[0]][0]
    for name in names[1:]:
        if not np.array_equal(predictions[name][0], first_labels):
            raise ValueError(
                f"{name} and {names[0]} were not scored on the same test images in the same "
                "order; re-run their evaluation on the same image index."
            )
    pairs = [
        paired_comparison((a, b), first_labels, predictions[a][1], predictions[b][1], seed=seed)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]
    adjusted = holm([pair.p_value for pair in pairs])
    return [replace(pair, p_value_holm=p) for pair, p in zip(pairs, adjusted, strict=True)]


def detectability(
    summaries: Mapping[str, Mapping[str, Any]], pairwise: Sequence[PairedComparison], n_images: int
) -> dict[str, Any]:
    """How fine a difference this test set resolves, for the most accurate strategy against its
    closest competitor: the smallest detectable difference (80 % power) and the test images a
    1-point difference would need, at their observed disagreement."""
    ranked = sorted(summaries, key=lambda name: summaries[name]["accuracy"], reverse=True)
    if len(ranked) < 2:
        return {}
    pair = next(p for p in pairwise if {p.a, p.b} == set(ranked[:2]))
    disagreement = (pair.a_only_right + pair.b_only_right) / n_images
    return {
        "between": ranked[:2],
        "disagreement": disagreement,
        "n_test": n_images,
        "detectable_difference": detectable_difference(n_images, disagreement),
        "images_for_one_point": images_needed(0.01, disagreement),
    }
