"""The parameter_transfer pipeline: the network-training template from the pretrained weights."""

from kedro.pipeline import Pipeline

from transfer_learning.pipelines.templates.network_training import network_training_pipeline


def create_pipeline(**kwargs) -> Pipeline:
    return network_training_pipeline("parameter_transfer")
