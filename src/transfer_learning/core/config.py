"""Turning parameter blocks (dicts from conf/) into settings dataclasses, with clear errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any


def check_known_keys(
    settings_class: type, params: Mapping[str, Any], block: str, error: type[Exception]
) -> None:
    """Raise `error` naming every key of `params` that `settings_class` does not have."""
    require_known_keys(params, [field.name for field in fields(settings_class)], block, error)


def require_known_keys(
    params: Mapping[str, Any], known: list[str], block: str, error: type[Exception]
) -> None:
    """Raise `error` naming every key of `params` outside `known`, as `<block>.<key>`."""
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise error(
            f"Unknown parameter(s) {', '.join(f'{block}.{key}' for key in unknown)}; "
            f"known: {', '.join(f'{block}.{key}' for key in sorted(known))}."
        )


def with_overrides(
    settings_class: type,
    shared: Mapping[str, Any],
    overrides: Mapping[str, Any] | None,
    blocks: tuple[str, str],
    error: type[Exception],
) -> dict[str, Any]:
    """The shared block with a strategy's own keys over it, each side checked for typos.

    `blocks` names both sides as users write them, e.g. ("finetune", "<strategy>.finetune"),
    so an error points at the line to fix.
    """
    shared_block, override_block = blocks
    check_known_keys(settings_class, shared, shared_block, error)
    check_known_keys(settings_class, overrides or {}, override_block, error)
    return {**shared, **(overrides or {})}


def positive_int(value: Any) -> bool:
    """A whole number ≥ 1 (a bool is not a number here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
