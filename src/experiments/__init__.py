"""Config-driven transfer-learning experiments for histopathology image classification."""

__version__ = "0.1.0"
