"""The structure_transfer pipeline: parameter_transfer's template with its own parameters
(`structure_transfer.backbone.pretrained: false`, more epochs, a higher learning rate)."""

from kedro.pipeline import Pipeline

from transfer_learning.pipelines.parameter_transfer import finetuning_pipeline


def create_pipeline(**kwargs) -> Pipeline:
    return finetuning_pipeline("structure_transfer")
