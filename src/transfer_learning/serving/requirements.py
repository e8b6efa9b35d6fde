"""The pip requirements of the models this project saves to MLflow, stated rather than inferred.

Without them MLflow infers a model's requirements by loading it in a subprocess that imports
torch: several seconds for every saved model, in every run. Here they come from the installed
distributions' own metadata, pinned to the installed versions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import cache
from importlib import metadata

from packaging.requirements import Requirement

logger = logging.getLogger(__name__)

PROJECT = "transfer_learning"
# The project's runtime dependencies that a loaded model never imports: Kedro's tooling.
NOT_NEEDED_TO_SERVE = frozenset({"kedro-datasets", "kedro-mlflow", "kedro-viz"})
# What MLflow's scikit-learn copy of a head needs (the project's head types live in heads.py,
# which imports scikit-learn and numpy alone).
HEAD_DISTRIBUTIONS = ("mlflow", "scikit-learn", "skops", "numpy", "scipy")


def pinned_requirements(names: Iterable[str]) -> tuple[str, ...]:
    """`name==installed version` for each distribution in `names` (in order, once each)."""
    return tuple(f"{name}=={metadata.version(name)}" for name in dict.fromkeys(names))


def image_model_requirements() -> list[str] | None:
    """The packaged image model's: MLflow and the project's runtime dependencies, pinned
    (None, and MLflow infers them, when the project is not installed: no metadata to read)."""
    pinned = _image_model_requirements()
    return list(pinned) if pinned is not None else None


@cache
def _image_model_requirements() -> tuple[str, ...] | None:
    try:
        declared = [Requirement(line) for line in metadata.requires(PROJECT) or []]
    except metadata.PackageNotFoundError:
        logger.warning(
            "%s is not installed (pip install -e .): MLflow will infer the model's pip "
            "requirements, which takes a few seconds.",
            PROJECT,
        )
        return None
    runtime = [r.name for r in declared if r.marker is None and r.name not in NOT_NEEDED_TO_SERVE]
    return pinned_requirements(["mlflow", *runtime])


def head_requirements() -> list[str]:
    """MLflow's scikit-learn copy of a frozen-features head's (the catalog's
    `<strategy>.mlflow_model`, through the `head_requirements` config resolver)."""
    return list(pinned_requirements(HEAD_DISTRIBUTIONS))
