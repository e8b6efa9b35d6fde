"""The structure_transfer pipeline: the network-training template with its own parameters
(`structure_transfer.backbone.pretrained: false`, more epochs, a higher learning rate)."""

from kedro.pipeline import Pipeline

from transfer_learning.pipelines.templates.network_training import network_training_pipeline


def create_pipeline(**kwargs) -> Pipeline:
    return network_training_pipeline("structure_transfer")
