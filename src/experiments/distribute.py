"""`trainer.distribute`: one training on several devices, with tf.distribute.

mirrored: MirroredStrategy over this machine's GPUs (or, without GPUs, its logical CPU devices:
`trainer.logical_cpus` splits the CPU into several, which is how it is tested). The model and its
optimizer are built in the strategy's scope; `trainer.batch_size` is the global batch, split
across the replicas; the checkpoint, backup, evaluation and MLflow logging do not change.

multi_worker (MultiWorkerMirroredStrategy across machines) is refused with the reason: Keras
3.15's `fit` cannot train under it (keras-team/keras#20585: it reduces distributed batches and
per-replica logs the single-worker way; measured here with two local workers, TF 2.21).
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

from experiments.errors import ConfigError

KINDS = ("mirrored", "multi_worker")
MULTI_WORKER_BLOCKED = (
    "trainer.distribute=multi_worker: Keras {keras}'s fit cannot train under TensorFlow's "
    "MultiWorkerMirroredStrategy (keras-team/keras#20585; with two workers it fails building "
    "the model from a distributed batch, then reducing per-replica logs). Use "
    "trainer.distribute=mirrored for the devices of one machine, and a Hydra launcher (Ray, "
    "SLURM) for many runs across machines (README, 'Scaling out').")
_strategy: tf.distribute.Strategy | None = None


def configure(kind: str | None, logical_cpus: int | None) -> tf.distribute.Strategy | None:
    """Set up this process's devices and strategy (before TensorFlow runs anything)."""
    global _strategy
    if logical_cpus and logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
        except RuntimeError:  # already initialised (a second run in this process)
            pass
    if kind is None:
        _strategy = None
    elif kind == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        _strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
    elif kind == "multi_worker":
        import keras

        raise ConfigError(MULTI_WORKER_BLOCKED.format(keras=keras.__version__))
    else:
        raise ConfigError(f"`trainer.distribute` must be null or one of {KINDS}. "
                          f"Received: trainer.distribute={kind!r}")
    return _strategy


def scope() -> contextlib.AbstractContextManager:
    """The strategy's scope (models and optimizers built in it are replicated), or nothing."""
    return _strategy.scope() if _strategy is not None else contextlib.nullcontext()

