"""Every parameter shipped in conf/ passes the same checks a user's `--params` goes through."""

from __future__ import annotations

import pytest
from kedro.config import OmegaConfigLoader

from tests.conftest import PROJECT_ROOT
from transfer_learning.adaptation.registry import AdaptationSettings
from transfer_learning.data.settings import DataSettings
from transfer_learning.features.extraction import ExtractionSettings
from transfer_learning.models.backbones import BackboneSettings
from transfer_learning.models.heads import HeadSettings
from transfer_learning.reporting.curves import CurveSettings
from transfer_learning.settings import CONFIG_LOADER_ARGS
from transfer_learning.training.recipe import Recipe, TrainingRunSettings


def parameters(env: str) -> dict:
    arguments = {k: v for k, v in CONFIG_LOADER_ARGS.items() if k != "default_run_env"}
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), default_run_env=env, **arguments)
    return loader["parameters"]


@pytest.mark.parametrize("env", ["local", "seed"])
def test_shipped_parameters_are_all_known_and_valid(env):
    params = parameters(env)
    DataSettings.from_params(params["data"])
    BackboneSettings.from_params(params["backbone"])
    ExtractionSettings.from_params(params["extraction"])
    HeadSettings.from_params(params["head"])
    TrainingRunSettings.from_params(params["training"])
    assert AdaptationSettings.from_params(params["adaptation"]) == AdaptationSettings.from_params(
        {}
    )
    assert CurveSettings.from_params(params["curve"]) == CurveSettings()
    assert HeadSettings.from_params(params["head"]).type == HeadSettings().type == "auto"
    for strategy in ("parameter_transfer", "structure_transfer"):
        Recipe.from_params(params["backbone"], params["finetune"], params[strategy], strategy)


def test_structure_transfer_starts_from_random_weights_in_every_environment():
    for env in ("local", "seed"):
        params = parameters(env)
        recipe = Recipe.from_params(
            params["backbone"],
            params["finetune"],
            params["structure_transfer"],
            "structure_transfer",
        )
        assert recipe.backbone.pretrained is False, env
    seed = parameters("seed")
    recipe = Recipe.from_params(
        seed["backbone"], seed["finetune"], seed["structure_transfer"], "structure_transfer"
    )
    assert recipe.backbone.image_size == 224 and recipe.finetune.lr == 0.05
