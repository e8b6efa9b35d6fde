"""Project settings. See https://docs.kedro.org/en/stable/configure/configuration_basics/"""

from omegaconf.resolvers import oc

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # ${oc.env:...} lets mlflow.yml honour MLFLOW_TRACKING_URI.
    "custom_resolvers": {"oc.env": oc.env},
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]},
    # An environment (e.g. conf/seed) overrides parameters key by key, not whole top-level
    # blocks: `structure_transfer.finetune.lr` there keeps `structure_transfer.backbone` of base.
    "merge_strategy": {"parameters": "soft"},
}
