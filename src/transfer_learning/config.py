"""Turning a parameter block (a dict from conf/) into a settings dataclass, with clear errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any


def check_known_keys(
    settings_class: type, params: Mapping[str, Any], block: str, error: type[Exception]
) -> None:
    """Raise `error` naming every key of `params` that `settings_class` does not have."""
    known = sorted(field.name for field in fields(settings_class))
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise error(
            f"Unknown parameter(s) {', '.join(f'{block}.{key}' for key in unknown)}; "
            f"known: {', '.join(f'{block}.{key}' for key in known)}."
        )
