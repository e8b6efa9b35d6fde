"""Domain adaptation: a model trained on labelled source images, made to work on target images
that look different (another camera, site, season, scanner), using unlabelled target images.

Two families, by where the model changes:
- feature level, on feature_transfer's head: `target_standardisation` gives the head's
  per-dimension standardisation the target features' mean and spread; `coral` (Sun et al. 2016)
  moves the source features' whole covariance to the target's before the head is refitted.
- network level, on parameter_transfer's fine-tuned network: `adabn` re-estimates BatchNorm
  statistics on target images (Li et al. 2017); `tent` (Wang et al. 2021) also minimises the
  entropy of its target predictions, updating only the normalisation layers' scale and shift;
  `mcc` (Jin et al. 2020) continues fine-tuning on labelled source batches with the Minimum Class
  Confusion loss on unlabelled target batches.

Target images reach this module as locations or features only, never with labels.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import Dataset

from transfer_learning.config import check_known_keys
from transfer_learning.extraction import (
    EvalCollate,
    ImageDataset,
    Normaliser,
    image_loader,
    shuffled,
)
from transfer_learning.finetune import (
    LabelledImages,
    Recipe,
    isolated_randomness_and_threads,
    network_from_checkpoint,
    parameter_groups,
    train_augmentation,
)

logger = logging.getLogger(__name__)

FEATURE_METHODS = ("target_standardisation", "coral")  # on feature_transfer's head
NETWORK_METHODS = ("adabn", "tent", "mcc")  # on parameter_transfer's network
METHODS = FEATURE_METHODS + NETWORK_METHODS
BATCHNORM_METHODS = frozenset({"adabn", "tent"})  # apply only to networks with BatchNorm


def base_strategy(method: str) -> str:
    """The strategy whose model `method` adapts."""
    return "feature_transfer" if method in FEATURE_METHODS else "parameter_transfer"


def adapted_model_name(method: str) -> str:
    """How the adapted model is called in data/06_models, MLflow and `predict.strategy`."""
    return f"{base_strategy(method)}_{method}"


ADAPTED_MODEL_NAMES: tuple[str, ...] = tuple(adapted_model_name(m) for m in METHODS)


class AdaptationError(ValueError):
    """Domain adaptation cannot run as configured."""


# ---- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TentSettings:
    epochs: int = 1  # passes over the target images; TENT's own setting is one online pass
    batch_size: int = 64
    lr: float = 1e-3  # Adam, as TENT on CIFAR-10-C


@dataclass(frozen=True)
class MccSettings:
    steps: int = 100  # continued fine-tuning steps from the source-only network
    lr: float = 1e-4
    temperature: float = 2.5  # MCC's (and TLlib's) default
    weight: float = 1.0  # of the MCC loss next to the source cross-entropy


@dataclass(frozen=True)
class AdaptationSettings:
    """The `adaptation` block of parameters_domain_adaptation.yml."""

    methods: tuple[str, ...] | str = "auto"  # auto: every method that applies
    coral_regularisation: float = 1.0  # added to both standardised covariances (CORAL's λ)
    shift_max_images: int = 2000  # per domain, for the domain classifier
    tent: TentSettings = field(default_factory=TentSettings)
    mcc: MccSettings = field(default_factory=MccSettings)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> AdaptationSettings:
        check_known_keys(cls, params, "adaptation", AdaptationError)
        values = dict(params)
        for key, settings_class in (("tent", TentSettings), ("mcc", MccSettings)):
            block = values.get(key) or {}
            check_known_keys(settings_class, block, f"adaptation.{key}", AdaptationError)
            values[key] = settings_class(**block)
        methods = values.get("methods", "auto")
        if methods != "auto":
            methods = (methods,) if isinstance(methods, str) else tuple(methods)
            unknown = [m for m in methods if m not in METHODS]
            if unknown or not methods:
                raise AdaptationError(
                    f"adaptation.methods={list(methods)!r}: {', '.join(unknown) or 'empty'} is not "
                    f"a method; use 'auto' or a list of {', '.join(METHODS)}."
                )
            values["methods"] = methods
        settings = cls(**values)
        settings._check_numbers()
        return settings

    def _check_numbers(self) -> None:
        checks = {
            "coral_regularisation": self.coral_regularisation > 0,
            "shift_max_images": _positive_int(self.shift_max_images),
            "tent.epochs": _positive_int(self.tent.epochs),
            "tent.batch_size": _positive_int(self.tent.batch_size),
            "tent.lr": self.tent.lr > 0,
            "mcc.steps": _positive_int(self.mcc.steps),
            "mcc.lr": self.mcc.lr > 0,
            "mcc.temperature": self.mcc.temperature > 0,
            "mcc.weight": self.mcc.weight >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            section, _, key = bad[0].rpartition(".")
            value = getattr(getattr(self, section) if section else self, key)
            raise AdaptationError(
                f"adaptation.{bad[0]}={value!r} is not valid; see "
                "conf/base/parameters_domain_adaptation.yml for the allowed values."
            )

    def runs(self, method: str) -> bool:
        """Whether `method` was asked for (explicitly, or by `auto`)."""
        return self.methods == "auto" or method in self.methods


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# ---- how different are the domains? ----------------------------------------------------------


def domain_shift(
    source_features: np.ndarray, target_features: np.ndarray, max_images: int, seed: int
) -> dict[str, float]:
    """A domain classifier's held-out accuracy on source vs target features, and the proxy
    A-distance 2(1 − 2·error) (Ben-David et al. 2007): 0 = indistinguishable, 2 = disjoint.

    Equal numbers of each domain (at most `max_images`), half to fit, half to score, so 0.5 is
    chance whatever the folder sizes.
    """
    rng = np.random.default_rng(seed)
    per_domain = min(len(source_features), len(target_features), max_images)
    if per_domain < 4:
        raise AdaptationError(
            f"Measuring the domain shift needs at least 4 images of each domain; there are "
            f"{len(source_features)} source and {len(target_features)} target images."
        )
    source = source_features[rng.choice(len(source_features), per_domain, replace=False)]
    target = target_features[rng.choice(len(target_features), per_domain, replace=False)]
    features = np.concatenate([source, target]).astype(np.float64)
    domains = np.repeat([0, 1], per_domain)
    fit_x, held_x, fit_y, held_y = train_test_split(
        features, domains, test_size=0.5, stratify=domains, random_state=seed
    )
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    accuracy = float(classifier.fit(fit_x, fit_y).score(held_x, held_y))
    error = 1.0 - accuracy
    return {
        "domain_classifier_accuracy": accuracy,
        "proxy_a_distance": float(max(0.0, 2.0 * (1.0 - 2.0 * error))),
        "images_per_domain": int(per_domain),
    }


# ---- feature level ---------------------------------------------------------------------------


def with_target_standardisation(head: Pipeline, target_features: np.ndarray) -> Pipeline:
    """The fitted head with its standardisation (first step) taking the target's per-dimension
    mean and spread: target features reach the classifier as source features did."""
    scaler = head.steps[0][1]
    if not isinstance(scaler, StandardScaler):
        raise AdaptationError(
            f"target_standardisation needs a head that starts with a StandardScaler; this one "
            f"starts with {type(scaler).__name__}."
        )
    adapted = clone(scaler).fit(np.asarray(target_features, dtype=np.float64))
    # Dimensions constant on the target keep the source's spread (sklearn would use 1).
    if scaler.scale_ is not None:  # the prototype head only centres
        constant = np.asarray(target_features).std(axis=0) == 0
        adapted.scale_ = np.where(constant, scaler.scale_, adapted.scale_)
    return Pipeline([(head.steps[0][0], adapted), *head.steps[1:]])


@dataclass(frozen=True)
class CoralTransform:
    """Source features → features with the target's mean, spread and correlations (CORAL).

    Each domain is standardised by its own statistics, the source is whitened with its
    regularised correlation (C_s + λI)^-1/2 and re-coloured with the target's (C_t + λI)^1/2,
    then put back on the target's scale. λ keeps small target samples from collapsing it.
    """

    source_mean: np.ndarray
    source_scale: np.ndarray
    target_mean: np.ndarray
    target_scale: np.ndarray
    mapping: np.ndarray  # (d, d): (C_s + λI)^-1/2 (C_t + λI)^1/2

    @classmethod
    def fit(cls, source: np.ndarray, target: np.ndarray, regularisation: float) -> CoralTransform:
        source_mean, source_scale = _mean_and_scale(source)
        target_mean, target_scale = _mean_and_scale(target)
        source_corr = _covariance((source - source_mean) / source_scale, regularisation)
        target_corr = _covariance((target - target_mean) / target_scale, regularisation)
        mapping = _matrix_power(source_corr, -0.5) @ _matrix_power(target_corr, 0.5)
        return cls(source_mean, source_scale, target_mean, target_scale, mapping)

    def __call__(self, source: np.ndarray) -> np.ndarray:
        standardised = (np.asarray(source, dtype=np.float64) - self.source_mean) / self.source_scale
        return (standardised @ self.mapping) * self.target_scale + self.target_mean


def _mean_and_scale(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    scale = features.std(axis=0)
    return features.mean(axis=0), np.where(scale > 0, scale, 1.0)


def _covariance(standardised: np.ndarray, regularisation: float) -> np.ndarray:
    n = max(1, len(standardised) - 1)
    return standardised.T @ standardised / n + regularisation * np.eye(standardised.shape[1])


def _matrix_power(symmetric: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(symmetric)
    return (vectors * np.clip(values, 1e-12, None) ** power) @ vectors.T


# ---- network level ---------------------------------------------------------------------------


def batchnorm_layers(network: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The network's BatchNorm layers (timm's BatchNormAct2d is one)."""
    return [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@dataclass(frozen=True)
class TargetImages:
    """The unlabelled target images and how the network wants them (no labels exist here)."""

    locations: Sequence[str]
    collate: EvalCollate
    normalise: Normaliser
    device: torch.device

    def loader(self, batch_size: int, seed: int | None = None, drop_last: bool = False):
        """Batches of normalised target images, shuffled by `seed` (in order when None)."""
        dataset = ImageDataset(self.locations, min_size=self.collate.transform.size)
        return image_loader(
            dataset,
            batch_size,
            0,  # adaptation is short: worker start-up would cost more than decoding
            self.device,
            sampler=None if seed is None else shuffled(dataset, seed),
            drop_last=drop_last and len(dataset) >= 2 * batch_size,
            collate_fn=self.collate,
        )


@torch.no_grad()
def adapt_batchnorm(network: nn.Module, images: TargetImages, batch_size: int = 64) -> nn.Module:
    """AdaBN: every BatchNorm layer's running mean and variance re-estimated on the target images
    (an equal-weight average over full batches); no weight changes, dropout stays off."""
    layers = batchnorm_layers(network)
    if not layers:
        raise AdaptationError("adabn needs a network with BatchNorm layers; this one has none.")
    momenta = [layer.momentum for layer in layers]
    network.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches seen
        layer.train()
    for batch in images.loader(batch_size, drop_last=True):
        network(images.normalise(batch))
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    return network.eval()


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax predictions."""
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def tent(network: nn.Module, images: TargetImages, settings: TentSettings, seed: int) -> nn.Module:
    """TENT: minimise the entropy of target predictions made with target batch statistics,
    updating only the BatchNorm scale and shift; then AdaBN, so the served network needs no batch.
    """
    layers = batchnorm_layers(network)
    if not layers:
        raise AdaptationError("tent needs a network with BatchNorm layers; this one has none.")
    network.eval().requires_grad_(False)
    affine = []
    for layer in layers:
        layer.train()  # batch statistics, as at test time in TENT
        for parameter in (layer.weight, layer.bias):
            if parameter is not None:
                parameter.requires_grad_(True)
                affine.append(parameter)
    optimizer = torch.optim.Adam(affine, lr=settings.lr, betas=(0.9, 0.999))
    losses = []
    for epoch in range(settings.epochs):
        for batch in images.loader(settings.batch_size, seed=seed * 1000 + epoch, drop_last=True):
            loss = prediction_entropy(network(images.normalise(batch)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    logger.info("tent: %d steps, entropy %.4f → %.4f", len(losses), losses[0], losses[-1])
    network.requires_grad_(True)
    return adapt_batchnorm(network, images, settings.batch_size)


def mcc_loss(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Minimum Class Confusion (Jin et al. 2020): the off-diagonal mass of the batch's
    class-confusion matrix, samples weighted by certainty, rows normalised, divided by the
    number of classes (as TLlib's reference implementation)."""
    batch, classes = logits.shape
    probabilities = torch.softmax(logits / temperature, dim=1)
    entropy = -(probabilities * torch.log(probabilities + 1e-5)).sum(dim=1).detach()
    weight = 1.0 + torch.exp(-entropy)
    weight = (batch * weight / weight.sum()).unsqueeze(1)
    confusion = (probabilities * weight).T @ probabilities
    confusion = confusion / confusion.sum(dim=1, keepdim=True)
    return (confusion.sum() - confusion.trace()) / classes


@dataclass(frozen=True)
class SourceBatches:
    """Labelled, augmented source training batches, reshuffled each pass by (seed, pass)."""

    dataset: Dataset  # yields (uint8 image, label), augmented as in fine-tuning
    batch_size: int
    device: torch.device

    def forever(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return _batches_forever(self.dataset, self.batch_size, self.device, seed)


def train_mcc(
    network: nn.Module,
    source: SourceBatches,
    target: TargetImages,
    target_augment: Callable[[torch.Tensor], torch.Tensor],
    settings: MccSettings,
    seed: int,
    make_parameter_groups: Callable[[float], list[dict[str, Any]]],
    label_smoothing: float = 0.0,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Continue fine-tuning the source network: cross-entropy on source batches plus
    `weight` × MCC on equally many augmented target batches, through the network together (as
    TLlib does, so BatchNorm sees both domains), AdamW with a cosine decay over `steps`.

    `make_parameter_groups(lr)` gives the optimiser groups (no weight decay on 1-D tensors, as
    in fine-tuning). Returns the network and the per-step losses.
    """
    optimizer = torch.optim.AdamW(make_parameter_groups(settings.lr))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / settings.steps))
    )
    target_data = ImageDataset(target.locations, target_augment, target.collate.transform.size)
    target_batches = _batches_forever(target_data, source.batch_size, target.device, seed + 1)
    source_batches = source.forever(seed)
    history = []
    network.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # augmentation and dropout
        for step in range(settings.steps):
            images, labels = next(source_batches)
            target_images = next(target_batches)
            logits = network(target.normalise(torch.cat([images, target_images])))
            labels = labels.to(target.device)
            source_loss = nn.functional.cross_entropy(
                logits[: len(labels)], labels, label_smoothing=label_smoothing
            )
            confusion = mcc_loss(logits[len(labels) :], settings.temperature)
            loss = source_loss + settings.weight * confusion
            if not torch.isfinite(loss):
                raise AdaptationError(
                    f"mcc: non-finite loss at step {step + 1}; lower adaptation.mcc.lr "
                    f"(now {settings.lr})."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            history.append(
                {"step": step + 1, "source_loss": source_loss.item(), "mcc_loss": confusion.item()}
            )
    return network.eval(), history


def _batches_forever(dataset: Dataset, batch_size: int, device: torch.device, seed: int):
    """Full batches, reshuffled on every pass by (seed, pass), without end."""
    batch_size = min(batch_size, len(dataset))
    for repeat in itertools.count():
        order = shuffled(dataset, seed * 1000 + repeat)
        yield from image_loader(dataset, batch_size, 0, device, sampler=order, drop_last=True)


def should_run(method: str, settings: AdaptationSettings, has_batchnorm: bool = True) -> bool:
    """Whether `method` runs: asked for (explicitly or by `auto`) and applicable — BatchNorm
    methods need a network with BatchNorm. Named explicitly where it cannot apply, it is an
    error; under `auto` it is left out with a log line."""
    if not settings.runs(method):
        return False
    if method in BATCHNORM_METHODS and not has_batchnorm:
        if settings.methods != "auto":
            raise AdaptationError(
                f"adaptation.methods names {method}, which needs BatchNorm layers; the fine-tuned "
                "network has none. Leave it out or use adaptation.methods=auto."
            )
        logger.info("%s left out: the fine-tuned network has no BatchNorm layers", method)
        return False
    return True


def has_batchnorm(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a fine-tuned checkpoint's network has BatchNorm layers (running statistics)."""
    return any(key.endswith("running_mean") for key in checkpoint["state_dict"])


# ---- on a fine-tuned checkpoint (what the nodes call) ------------------------------------------


@dataclass
class SourceNetwork:
    """parameter_transfer's fine-tuned network, rebuilt from its checkpoint (no download)."""

    network: nn.Module
    checkpoint: Mapping[str, Any]
    collate: EvalCollate
    normalise: Normaliser
    device: torch.device

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any], device: torch.device) -> SourceNetwork:
        network, backbone = network_from_checkpoint(checkpoint)
        network = network.to(device).to(memory_format=torch.channels_last)
        preprocessing = backbone.preprocessing
        return cls(
            network,
            checkpoint,
            EvalCollate(preprocessing),
            Normaliser(preprocessing).to(device),
            device,
        )

    def target_images(self, locations: Sequence[str]) -> TargetImages:
        if not len(locations):
            raise AdaptationError("There are no target images to adapt to (data.target_path).")
        return TargetImages(list(locations), self.collate, self.normalise, self.device)

    def adapted_checkpoint(self) -> dict[str, Any]:
        """The checkpoint with the adapted weights (and BatchNorm statistics), on the CPU."""
        state = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        return {**self.checkpoint, "state_dict": state}


def adabn_checkpoint(
    checkpoint: Mapping[str, Any], target_locations: Sequence[str], device: torch.device
) -> dict[str, Any]:
    """The fine-tuned checkpoint with BatchNorm statistics of the target images (AdaBN)."""
    source = SourceNetwork.from_checkpoint(checkpoint, device)
    with isolated_randomness_and_threads(device):
        adapt_batchnorm(source.network, source.target_images(target_locations))
    return source.adapted_checkpoint()


def tent_checkpoint(
    checkpoint: Mapping[str, Any],
    target_locations: Sequence[str],
    settings: TentSettings,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """The fine-tuned checkpoint after TENT on the target images (see `tent`)."""
    source = SourceNetwork.from_checkpoint(checkpoint, device)
    with isolated_randomness_and_threads(device):
        tent(source.network, source.target_images(target_locations), settings, seed)
    return source.adapted_checkpoint()


def mcc_checkpoint(  # noqa: PLR0913 (source data, target data, recipe, settings, seed, device)
    checkpoint: Mapping[str, Any],
    recipe: Recipe,
    source_locations: Sequence[str],
    source_labels: np.ndarray,
    target_locations: Sequence[str],
    settings: MccSettings,
    seed: int,
    device: torch.device,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """The fine-tuned checkpoint after MCC training (see `train_mcc`), and its loss history.

    Source batches are the fine-tuning recipe's (batch size, crops, flips, label smoothing).
    """
    source = SourceNetwork.from_checkpoint(checkpoint, device)
    size = source.collate.transform.size
    augment = train_augmentation(recipe.finetune, size)
    labelled = LabelledImages(
        ImageDataset(source_locations, augment, min_size=size),
        torch.tensor(np.array(source_labels), dtype=torch.long),
    )
    network = source.network
    with isolated_randomness_and_threads(device):
        _, history = train_mcc(
            network,
            SourceBatches(labelled, int(recipe.finetune.batch_size), device),
            source.target_images(target_locations),
            augment,
            settings,
            seed,
            lambda lr: parameter_groups(network, replace(recipe.finetune, lr=lr), "all"),
            label_smoothing=recipe.finetune.label_smoothing,
        )
    return source.adapted_checkpoint(), history
