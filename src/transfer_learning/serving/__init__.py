"""The packaged model: the image classifier, its MLflow packaging and requirements."""
