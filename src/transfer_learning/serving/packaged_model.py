"""MLflow's entry to a packaged image model (a "model from code", see transfer_learning.serving.packaging).

MLflow copies this file into the model folder and runs it on load; the learned state is read by
`PackagedImageClassifier.load_context` from files that cannot run code.
"""

from mlflow.models import set_model

from transfer_learning.serving.packaging import PackagedImageClassifier

set_model(PackagedImageClassifier())
