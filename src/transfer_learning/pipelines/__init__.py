"""The project's pipelines, one folder each, and what their wiring shares."""

from collections.abc import Callable
from functools import partial, update_wrapper
from typing import Any


def bind(function: Callable, **fixed: Any) -> Callable:
    """`function` with keyword arguments fixed at wiring time (a strategy name, the registry).

    The result keeps the function's name and docstring, which Kedro and kedro-viz show.
    """
    return update_wrapper(partial(function, **fixed), function)
