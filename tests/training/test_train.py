"""Precision policies and model selection bookkeeping."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from experiments.models.classifier import build_classifier, compile_classifier
from experiments.training.runtime import (
    BF16_CPU_FLAGS,
    cpu_flags,
    resolve_precision,
    set_precision,
    usable_cores,
)


@pytest.fixture(autouse=True)
def _float32_afterwards():
    yield
    set_precision("float32")


def test_usable_cores_are_the_affinity_where_there_is_one_else_every_core(monkeypatch):
    """Linux counts what taskset, a container or SLURM allows; macOS and Windows, which have
    no sched_getaffinity, every core (a run's thread budget must not crash there)."""
    if hasattr(os, "sched_getaffinity"):
        assert usable_cores() == len(os.sched_getaffinity(0))
        monkeypatch.delattr(os, "sched_getaffinity")
    assert usable_cores() == (os.cpu_count() or 1)


def test_explicit_precision_is_kept_and_auto_follows_the_hardware():
    for name in ("float32", "mixed_bfloat16", "mixed_float16"):
        assert resolve_precision(name) == name
    expected = "mixed_bfloat16" if BF16_CPU_FLAGS & cpu_flags() else "float32"
    assert resolve_precision("auto") == expected  # no GPU on the CI machines


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_and_outputs_finite_float32(policy):
    set_precision(policy)
    model = build_classifier("simplecnn", None, True, 16, 2, bn_momentum=0.9)
    compile_classifier(model, keras.optimizers.Adam(1e-3), 2)
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 16, 16, 3)).astype("float32")
    y = np.eye(2, dtype="float32")[rng.integers(0, 2, 8)]
    history = model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    out = model.predict(x, verbose=0)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-3)
    assert model.get_layer("preprocess").compute_dtype == "float32"
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert model.get_layer("simplecnn").get_layer("block1_conv1").compute_dtype == \
        policy.removeprefix("mixed_")


@pytest.mark.parametrize("accumulate", [1, 3])
def test_gradient_accumulation_applies_updates_every_n_batches(tmp_path, accumulate):
    from experiments.config.instantiate import components
    from experiments.training.build import optimizer as make_optimizer
    from tests.conftest import compose_config

    cfg = compose_config(tmp_path, ["data.root=/x", f"trainer.accumulate={accumulate}"])
    optimizer = make_optimizer(components(cfg), 1e-4, cfg.trainer.accumulate, None)
    assert optimizer.gradient_accumulation_steps == (accumulate if accumulate > 1 else None)
    model = build_classifier("simplecnn", None, True, 16, 2)
    compile_classifier(model, optimizer, 2)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (12, 16, 16, 3)).astype("float32")
    y = np.eye(2, dtype="float32")[rng.integers(0, 2, 12)]
    kernel = model.get_layer("predictions").kernel
    changed = []

    class WatchKernel(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.before = kernel.numpy().copy()

        def on_train_batch_end(self, batch, logs=None):
            changed.append(not np.array_equal(self.before, kernel.numpy()))

    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[WatchKernel()])
    assert changed == [(i + 1) % accumulate == 0 for i in range(6)]  # 6 batches


def test_ema_weights_are_what_validation_and_the_checkpoint_see(tmp_path):
    """trainer.ema: the checkpoint holds the averaged weights, not the raw ones, and the
    logged validation loss is that of the averaged weights."""
    from experiments.serving.inference import load_model
    from experiments.training.loop import TrainPlan, train

    model = build_classifier("simplecnn", None, True, 16, 2, bn_momentum=0.9)
    compile_classifier(model, keras.optimizers.Adam(1e-2, use_ema=True, ema_momentum=0.5), 2)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 16, 16, 3)).astype("float32")
    y = np.eye(2, dtype="float32")[rng.integers(0, 2, 16)]
    kernel = model.get_layer("predictions").kernel
    raw = {}

    class LastRawWeights(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raw["kernel"] = kernel.numpy().copy()

    path = tmp_path / "final.keras"
    checkpoint = keras.callbacks.ModelCheckpoint(str(path), monitor="val_loss",
                                                 save_best_only=False)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    result = train(model, data, data, TrainPlan(3, [checkpoint], tmp_path / "backup",
                                                [LastRawWeights()], verbose=0))
    assert result.best_epoch == 3  # save_best_only=false: the last epoch's model
    saved = load_model(path).get_layer("predictions").kernel.numpy()
    assert not np.allclose(saved, raw["kernel"])  # not the raw weights ...
    np.testing.assert_allclose(saved, kernel.numpy(), atol=1e-6)  # ... the averaged ones
    val_loss = model.evaluate(data, verbose=0, return_dict=True)["loss"]
    assert result.history["val_loss"][-1] == pytest.approx(val_loss, rel=1e-4)


def test_backup_restores_weights_optimizer_state_and_epoch(tmp_path):
    """The per-epoch backup (written in the background) brings a new process's model to
    exactly where the interrupted one was after its last completed epoch."""
    from experiments.training.state import Backup

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 16, 16, 3)).astype("float32")
    y = np.eye(2, dtype="float32")[rng.integers(0, 2, 16)]
    folder = tmp_path / "backup"

    def fresh(seed: int) -> keras.Model:
        keras.utils.set_random_seed(seed)
        model = build_classifier("simplecnn", None, True, 16, 2, bn_momentum=0.9)
        compile_classifier(model, keras.optimizers.Adam(1e-2, use_ema=True), 2)
        return model

    saved = {}

    class Remember(keras.callbacks.Callback):  # runs after Backup took its copy
        def on_epoch_end(self, epoch, logs=None):
            saved[epoch] = ([w.numpy().copy() for w in self.model.weights],
                            [v.numpy().copy() for v in self.model.optimizer.variables])

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt  # killed during epoch 2's bookkeeping

    first = fresh(0)
    with pytest.raises(KeyboardInterrupt):
        first.fit(x, y, batch_size=4, epochs=4, verbose=0,
                  callbacks=[Interrupt(), Backup(folder), Remember()])
    assert (folder / Backup.FILE).is_file()
    second = fresh(1)  # other initial weights: all of them must come from the backup
    started = []

    class FirstEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            started.append(epoch)
            if len(started) == 1:
                weights, variables = saved[0]
                for a, b in zip(self.model.weights, weights, strict=True):
                    np.testing.assert_array_equal(a.numpy(), b)
                for a, b in zip(self.model.optimizer.variables, variables, strict=True):
                    np.testing.assert_array_equal(a.numpy(), b)

    second.fit(x, y, batch_size=4, epochs=4, verbose=0, callbacks=[Backup(folder), FirstEpoch()])
    assert started == [1, 2, 3]  # continues after the last epoch backed up
    assert not folder.exists()  # removed when training ends


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_fused_batchnorm_computes_what_keras_does(policy):
    """The fused op gives Keras' outputs, gradients and moving statistics (a conv bias in front
    of BatchNorm has no gradient in theory: only noise to compare, so it is left out)."""
    from experiments.models.fused_bn import fuse_batchnorm

    set_precision(policy)
    x = np.random.default_rng(0).normal(0, 1, (6, 8, 8, 4)).astype("float32")

    def network() -> keras.Model:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 4))
        h = keras.layers.Conv2D(5, 3, padding="same", use_bias=False)(inputs)
        h = keras.layers.BatchNormalization(momentum=0.9, name="bn")(h)
        h = keras.layers.GlobalAveragePooling2D()(keras.layers.Activation("relu")(h))
        return keras.Model(inputs, keras.layers.Dense(2, dtype="float32")(h))

    keras_bn, fused = network(), network()
    assert fuse_batchnorm(fused) == 1
    grads = []
    for model in (keras_bn, fused):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.reduce_sum(out ** 2)
        grads.append((out.numpy(), tape.gradient(loss, model.trainable_variables)))
    np.testing.assert_allclose(grads[1][0], grads[0][0], atol=1e-5)
    # bfloat16 keeps 8 significant bits: the two ops sum the kernel's gradient in different
    # orders (more apart on one thread than on two), so they may round one bf16 step apart,
    # up to 2**-7 relative; a wrong gradient is off by far more
    rtol = 1e-3 if policy == "float32" else 2.0 ** -6
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=rtol, atol=1e-5)
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(getattr(fused.get_layer("bn"), name).numpy(),
                                   getattr(keras_bn.get_layer("bn"), name).numpy(), rtol=1e-5)
    np.testing.assert_allclose(fused(x, training=False), keras_bn(x, training=False), atol=1e-5)
