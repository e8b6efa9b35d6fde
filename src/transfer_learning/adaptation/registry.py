"""The adaptation-method registry: every domain adaptation method, listed once.

A model trained on labelled source images is made to work on target images that look different
(another camera, site, season, scanner), using unlabelled target images. Each method is one
module declaring an `AdaptationMethod` (name, the strategy kind it applies to, its settings
block `adaptation.<name>`, whether it needs BatchNorm, `adapt()`); the domain_adaptation pipeline
gets one node per method below, and evaluation and the report iterate over what ran. Adding a
method is its module plus one line in `METHODS`.

- features kind (the pretrained strategy's head): `target_standardisation`, `coral`;
- network kind (the pretrained strategy's fine-tuned network): `adabn`, `tent`, `mcc`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transfer_learning.adaptation import adabn, coral, mcc, standardise, tent
from transfer_learning.adaptation.base import AdaptationError, AdaptationMethod
from transfer_learning.core.config import check_known_keys, positive_int
from transfer_learning.core.strategies import pretrained_of_kind

logger = logging.getLogger(__name__)

METHODS: tuple[AdaptationMethod, ...] = (
    standardise.METHOD,
    coral.METHOD,
    adabn.METHOD,
    tent.METHOD,
    mcc.METHOD,
)


def base_strategy(method: AdaptationMethod) -> str:
    """The strategy whose model `method` adapts: the pretrained one of the method's kind."""
    return pretrained_of_kind(method.kind)


def adapted_model_name(method: AdaptationMethod) -> str:
    """How the adapted model is called in data/06_models, MLflow and `predict.strategy`."""
    return f"{base_strategy(method)}_{method.name}"


def adapted_model_names(methods: Sequence[AdaptationMethod] = METHODS) -> tuple[str, ...]:
    return tuple(adapted_model_name(method) for method in methods)


@dataclass(frozen=True)
class AdaptationSettings:
    """The `adaptation` block of parameters_domain_adaptation.yml: which methods run, the shift
    measurement, and one settings block per method that has settings."""

    methods: tuple[str, ...] | str = "auto"  # auto: every method that applies
    shift_max_images: int = 2000  # per domain, for the domain classifier
    blocks: Mapping[str, Any] = field(default_factory=dict)  # method name → its settings

    @classmethod
    def from_params(
        cls, params: Mapping[str, Any], registry: Sequence[AdaptationMethod] = METHODS
    ) -> AdaptationSettings:
        names = [method.name for method in registry]
        with_settings = {m.name: m.settings_class for m in registry if m.settings_class}
        allowed = {"methods", "shift_max_images", *with_settings}
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise AdaptationError(
                f"adaptation.{unknown[0]} is not a setting; the adaptation block takes "
                f"{', '.join(sorted(allowed))}."
            )
        blocks = {}
        for name, settings_class in with_settings.items():
            block = params.get(name) or {}
            check_known_keys(settings_class, block, f"adaptation.{name}", AdaptationError)
            blocks[name] = settings_class(**block)
            bad = blocks[name].invalid()
            if bad:
                raise AdaptationError(
                    f"adaptation.{name}.{bad[0]}={getattr(blocks[name], bad[0])!r} is not valid; "
                    "see conf/base/parameters_domain_adaptation.yml for the allowed values."
                )
        methods = params.get("methods", "auto")
        if methods != "auto":
            methods = (methods,) if isinstance(methods, str) else tuple(methods)
            wrong = [m for m in methods if m not in names]
            if wrong or not methods:
                raise AdaptationError(
                    f"adaptation.methods={list(methods)!r}: {', '.join(wrong) or 'empty'} is not "
                    f"a method; use 'auto' or a list of {', '.join(names)}."
                )
        shift_max_images = params.get("shift_max_images", 2000)
        if not positive_int(shift_max_images):
            raise AdaptationError(
                f"adaptation.shift_max_images={shift_max_images!r} is not valid; it must be a "
                "whole number ≥ 1."
            )
        return cls(methods, shift_max_images, blocks)

    def runs(self, method: str) -> bool:
        """Whether `method` was asked for (explicitly, or by `auto`)."""
        return self.methods == "auto" or method in self.methods

    def of(self, method: AdaptationMethod) -> Any:
        """`method`'s settings block (None for a method without settings)."""
        return self.blocks.get(method.name)


def should_run(
    method: AdaptationMethod, settings: AdaptationSettings, has_batchnorm: bool = True
) -> bool:
    """Whether `method` runs: asked for (explicitly or by `auto`) and applicable — BatchNorm
    methods need a network with BatchNorm. Named explicitly where it cannot apply, it is an
    error; under `auto` it is left out with a log line."""
    if not settings.runs(method.name):
        return False
    if method.needs_batchnorm and not has_batchnorm:
        if settings.methods != "auto":
            raise AdaptationError(
                f"adaptation.methods names {method.name}, which needs BatchNorm layers; the "
                "fine-tuned network has none. Leave it out or use adaptation.methods=auto."
            )
        logger.info("%s left out: the fine-tuned network has no BatchNorm layers", method.name)
        return False
    return True
