"""The MLflow model's entry point ("models from code"): MLflow copies this file into the logged
model and runs it when the model loads, with this package on the path (`code_paths`), instead of
unpickling a Python object. See `experiments.serving`."""

import mlflow.models

from experiments.serving.pyfunc import ImageClassifier

mlflow.models.set_model(ImageClassifier())
