"""Project settings. See https://docs.kedro.org/en/stable/configure/configuration_basics/"""

from omegaconf.resolvers import oc

from transfer_learning.kedro_io.run_metadata import RunMetadataHooks
from transfer_learning.serving.requirements import head_requirements

# Every MLflow run's experiment kind, name, tags and the images it used (MLflow datasets).
HOOKS = (RunMetadataHooks(),)

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # ${oc.env:...} lets mlflow.yml honour MLFLOW_TRACKING_URI.
    # ${head_requirements:} states the MLflow head copy's pip requirements (none inferred).
    "custom_resolvers": {"oc.env": oc.env, "head_requirements": head_requirements},
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]},
    # An environment (e.g. conf/seed) overrides parameters key by key, not whole top-level
    # blocks: `<strategy>.finetune.lr` there keeps `<strategy>.backbone` of base.
    "merge_strategy": {"parameters": "soft"},
}
