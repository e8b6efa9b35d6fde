"""The only Kedro and MLflow adapters: the project's datasets and tracking helpers."""
