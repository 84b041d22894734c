"""Serving: the one prediction path (`inference`: decode, test-time augmentation, temperature,
threshold) shared by evaluation, `experiments.predict` and the MLflow model (`pyfunc`, entered
through `mlflow_model`), and the model a run hands over (`export`).
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """`experiments.serving.ImageClassifier`, where MLflow models logged before the package had
    rooms (2026-11-29) look for it when they load in a Python that imported this package
    (in a fresh one they load their own copy of the code)."""
    if name == "ImageClassifier":
        from experiments.serving.pyfunc import ImageClassifier

        return ImageClassifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
