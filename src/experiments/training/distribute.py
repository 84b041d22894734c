"""`trainer.distribute`: one training on several devices, with tf.distribute.

mirrored: MirroredStrategy over this machine's GPUs (or, without GPUs, its logical CPU devices:
`trainer.logical_cpus` splits the CPU into several, which is how it is tested). The model and its
optimizer are built in the strategy's scope; `trainer.batch_size` is the global batch, split
across the replicas; the checkpoint, backup, evaluation and MLflow logging do not change.

multi_worker: MultiWorkerMirroredStrategy across processes or machines, described by the
TF_CONFIG environment variable that each worker gets (the cluster's worker addresses and this
worker's index). Every worker runs the same command; batches are split across all of them and
gradients all-reduced, so every worker holds the same weights. Only the chief (the `chief` task,
else worker 0) writes where users look: its output folder and the MLflow run. The other workers
run the same steps (their collectives need it) but write to a scratch folder and scratch store
that are deleted at the end. Keras 3's `fit` needs two repairs under this strategy
(keras-team/keras#20585): see `repair_keras_for_multi_worker`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import keras
import tensorflow as tf

from experiments.config.choices import DISTRIBUTE_KINDS
from experiments.errors import ConfigError

log = logging.getLogger(__name__)
KINDS = DISTRIBUTE_KINDS
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
        log.info("trainer.distribute=mirrored: %d replicas on %s", len(devices),
                 ", ".join(d.name for d in devices))
    elif kind == "multi_worker":
        worker_role()  # a clear error when TF_CONFIG is missing or malformed
        repair_keras_for_multi_worker()
        _strategy = tf.distribute.MultiWorkerMirroredStrategy()
        log.info("trainer.distribute=multi_worker: %d replicas in the TF_CONFIG cluster",
                 _strategy.num_replicas_in_sync)
    else:
        raise ConfigError(f"`trainer.distribute` must be null or one of {KINDS}. "
                          f"Received: trainer.distribute={kind!r}")
    return _strategy


def scope() -> contextlib.AbstractContextManager:
    """The strategy's scope (models and optimizers built in it are replicated), or nothing."""
    return _strategy.scope() if _strategy is not None else contextlib.nullcontext()


def worker_role() -> tuple[str, int, bool]:
    """(task type, index, is chief) of this process in the TF_CONFIG cluster."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError(
            "trainer.distribute=multi_worker needs the TF_CONFIG environment variable on every "
            "worker, e.g. TF_CONFIG='{\"cluster\": {\"worker\": [\"host1:12345\", "
            "\"host2:12345\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}' "
            "(README, 'Scaling out'). Received: TF_CONFIG is not set")
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        kind, index = str(task["type"]), int(task["index"])
        if kind not in cluster or not 0 <= index < len(cluster[kind]):
            raise KeyError(f"task {kind}:{index} is not in the cluster")
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError("TF_CONFIG must be JSON with a `cluster` of address lists and this "
                          f"process's `task` (type, index) in it ({error}). "
                          f"Received: TF_CONFIG={raw!r}") from error
    chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)
    return kind, index, chief


def is_chief(kind: str | None) -> bool:
    """Whether this process writes the run's outputs: always, unless it is a non-chief worker
    of a multi_worker training."""
    return kind != "multi_worker" or worker_role()[2]


def repair_keras_for_multi_worker() -> None:
    """Two repairs to Keras 3's TensorFlow trainer, only under MultiWorkerMirroredStrategy
    (keras-team/keras#20585, open; Keras 3.15, TF 2.21):
    - it builds the model from a batch reduced across workers with `strategy.reduce`, which
      fails on a distributed batch: build from this worker's own part of the batch instead;
    - it reduces each step's scalar logs with `strategy.reduce(..., axis=0)`, which fails on a
      scalar: reduce over workers only (axis=None), the mean Keras means.
    `predict` keeps Keras' own ordered gather across workers."""
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_experiments_repaired", False):
        return
    original_reduce = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if not trainer._collective_all_reduce_multi_worker(strategy) or reduction in (
                "concat", "first"):
            return original_reduce(values, strategy, reduction)
        how = "SUM" if reduction == "sum" else "MEAN"  # "auto" is "mean" off TPUs
        return keras.tree.map_structure(lambda v: strategy.reduce(how, v, axis=None), values)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(_local_part, next(batches))
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def _local_part(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return _strategy.experimental_local_results(value)[0]
        return value

    trainer.reduce_per_replica = reduce_per_replica
    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    trainer._experiments_repaired = True
