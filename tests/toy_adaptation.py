"""A sixth adaptation method, added the way the registry says: this one module plus one line in
the registry's METHODS (the test passes `(*METHODS, METHOD)`).

unchanged_copy: the source network as it is — so its scores must equal source-only's exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transfer_learning.adaptation.base import AdaptationMethod, NetworkSource, invalid_fields
from transfer_learning.core.strategies import NETWORK


@dataclass(frozen=True)
class CopySettings:
    copies: int = 1  # a setting, so that its block `adaptation.unchanged_copy` is checked

    def invalid(self) -> list[str]:
        return invalid_fields(self, {"copies": lambda value: value == 1})


def adapt(source: NetworkSource, settings: CopySettings, seed: int) -> dict[str, Any]:
    return {**source.checkpoint}


METHOD = AdaptationMethod("unchanged_copy", NETWORK, adapt, CopySettings)
