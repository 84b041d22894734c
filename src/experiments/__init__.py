"""Config-driven transfer-learning experiments for histopathology image classification.

The package is laid out by responsibility, each layer importing only the ones below it
(tests/test_layers.py checks it):

- entry points: `run`, `predict`, `compare`, `ensemble`, `weights` (`python -m experiments.<name>`)
- `orchestration`: a job once its config has composed (`launch`), one training run,
  cross-validation, refit, resume
- `training`: build, fit loop, callbacks, fine-tuning, probes, distribution, runtime
- `evaluation`: metrics, statistics, calibration, figures, Grad-CAM
- `tracking`: MLflow store, run records, the sweep callback and comparison reports, the
  printed summary of a run
- `serving`: the one prediction path, the MLflow pyfunc model, the exported model
- `models`: backbones, classifier, fused BatchNorm, frozen features
- `data`: folders, splits, decoding, caches, augmentation, stain, patches, demo
- `config`: schemas, the accepted choices, validation, instantiation; `errors` and `console`
  beside it
"""

from experiments.console import quiet_start

__version__ = "0.1.0"

quiet_start()
