"""Every config group option composes and builds; mistakes fail at composition."""

from __future__ import annotations

import dataclasses

import hydra
import keras
import numpy as np
import pytest
import tensorflow as tf
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    ValidationError,
)

from experiments.config.choices import views_to_cache
from experiments.config.instantiate import instantiate_callbacks
from experiments.config.schema import (
    CONFIG_MODULE,
    Config,
    DemoDataConfig,
    config_folder,
    register_configs,
)
from experiments.errors import ConfigError
from experiments.models import external
from experiments.models.backbones import BACKBONES, get_spec, resolve_image_size
from experiments.models.classifier import build_classifier
from experiments.orchestration import single
from tests.conftest import compose_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_folder() / group).glob("*.yaml"))


def test_required_groups_and_options_exist():
    assert {"densenet201", "resnet50", "densenet121", "efficientnetv2b0", "mobilenetv3large",
            "convnexttiny", "xception"} <= set(options("backbone"))
    assert set(options("backbone")) == set(BACKBONES) | set(external.KINDS)
    assert options("optimizer") == ["adam", "adamw", "sgd"]
    assert options("augmentation") == ["dihedral", "hed", "histology", "histology_strong", "none",
                                       "randaugment", "study"]
    assert options("callbacks") == ["default", "early_stopping", "fixed"]
    assert options("data") == ["demo", "folder"]
    assert options("finetune") == ["frozen", "full", "linear_probe", "two_stage"]
    assert options("eval") == ["default"]
    assert {"quickstart", "study_densenet201", "study_resnet50", "histology_cpu"} <= set(
        options("experiment"))


def test_defaults_are_the_study(tmp_path):
    cfg = compose_config(tmp_path, ["data.root=/somewhere"])
    settings = OmegaConf.to_object(cfg)
    assert isinstance(settings, Config)
    assert settings.backbone.name == "densenet201"
    assert settings.backbone.weights == "imagenet"
    assert settings.finetune.strategy == "full"
    assert cfg.optimizer._target_ == "keras.optimizers.Adam"
    assert settings.optimizer.learning_rate == pytest.approx(1e-4)
    assert cfg.augmentation._target_.endswith("StudyAugmentation")
    assert settings.trainer.epochs == 50
    assert settings.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert settings.mlflow.artifact_root == f"{tmp_path}/mlruns/artifacts"
    reduce_lr = cfg.callbacks.reduce_lr
    assert (reduce_lr.monitor, reduce_lr.factor, reduce_lr.patience, reduce_lr.min_lr) == (
        "val_accuracy", 0.2, 10, 1e-7)
    checkpoint = cfg.callbacks.model_checkpoint
    assert checkpoint.monitor == "val_accuracy" and checkpoint.save_best_only
    assert checkpoint.filepath == f"{tmp_path / 'out'}/checkpoints/best.keras"


@pytest.mark.parametrize("name", ["study_densenet201", "study_resnet50"])
def test_study_presets(tmp_path, name):
    cfg = compose_config(tmp_path, [f"experiment={name}", "data.root=/x"])
    settings = OmegaConf.to_object(cfg)
    assert settings.backbone.name == name.removeprefix("study_")
    assert settings.data.image_size == 224
    assert settings.trainer.batch_size == 2 and settings.trainer.epochs == 50
    assert cfg.optimizer._target_ == "keras.optimizers.Adam"
    assert settings.optimizer.learning_rate == pytest.approx(1e-4)
    assert cfg.augmentation._target_.endswith("StudyAugmentation")
    assert set(cfg.callbacks) == {"model_checkpoint", "reduce_lr"}


def test_transfer_cpu_preset_cuts_densenet121_and_the_readme_cuts_exist(tmp_path):
    settings = OmegaConf.to_object(compose_config(tmp_path, ["experiment=transfer_cpu",
                                                             "data.root=/x"]))
    assert (settings.backbone.name, settings.backbone.feature_layer) == ("densenet121",
                                                                         "pool4_relu")
    assert settings.backbone.global_pool == "gem"
    assert settings.finetune.strategy == "linear_probe" and settings.cv.refit
    # trained on 24 views (dihedral, at three scales), tested on 6 of them
    assert settings.eval.tta == "rot90_multiscale" and views_to_cache(settings.eval.tta) == 24
    # the cut as the preset uses it, and those the README suggests for other backbones
    for name, layer, width in (("densenet121", "pool4_relu", 1024),
                               ("densenet201", "pool4_relu", 1792),
                               ("resnet50", "conv4_block6_out", 1024)):
        model = build_classifier(name, None, False, 64, 2, feature_layer=layer)
        assert model.get_layer("gap").output.shape[-1] == width


def test_transfer_multisource_is_transfer_cpu_with_a_second_source_and_a_cascade(tmp_path):
    from experiments.config.validation import validated

    single = OmegaConf.to_object(compose_config(tmp_path, ["experiment=transfer_cpu",
                                                           "data.root=/x"]))
    with pytest.raises(ConfigError, match=r"`data\.sources\.second\.root` must be set - "
                                          "experiment=transfer_multisource"):
        validated(compose_config(tmp_path, ["experiment=transfer_multisource", "data.root=/x"]))
    both = validated(compose_config(tmp_path, [
        "experiment=transfer_multisource", "data.root=/x", "data.sources.second.root=/y",
        "data.sources.second.group_pattern='(P\\d+)'"]))
    assert [(s.name, s.root, s.group_pattern) for s in both.data.source_folders] == [
        ("second", "/y", r"(P\d+)")]
    for part in ("backbone", "finetune", "augmentation"):
        assert getattr(both, part) == getattr(single, part), part
    # its model: a cascade, whose home model alone fits a temperature
    assert both.cv == dataclasses.replace(single.cv, cascade=True, home_temperature=True)
    assert both.eval == dataclasses.replace(single.eval, temperature_scaling=False)
    assert both.mlflow.experiment_name == "transfer_multisource"
    # nothing of it is chosen on a fold's validation split: its probes train on more images
    assert (single.data.val_fraction, both.data.val_fraction) == (0.2, 0.05)


def test_histology_cpu_preset_selects_on_validation_loss_without_imagenet(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=histology_cpu", "data.root=/x"])
    settings = OmegaConf.to_object(cfg)
    assert settings.backbone.weights is None and settings.backbone.bn_momentum == 0.9
    assert settings.backbone.global_pool == "gem"
    assert {cb.monitor for cb in instantiate_callbacks(cfg.callbacks)} == {"val_loss"}
    assert settings.eval.tta == "dihedral"
    assert settings.cv.folds == 5 and not settings.cv.refit  # the model: the fold ensemble
    assert settings.data.stain_normalization == "macenko"


def test_quickstart_is_offline(tmp_path):
    settings = OmegaConf.to_object(compose_config(tmp_path, ["experiment=quickstart"]))
    assert settings.backbone.weights is None
    assert isinstance(settings.data, DemoDataConfig)
    assert settings.data.root.startswith(str(tmp_path))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_and_predicts(name):
    size = max(get_spec(name).min_size, 32) if name != "xception" else 71
    model = build_classifier(name, None, True, resolve_image_size(name, size), 2)
    # One eager call: predict() would spend most of the time tracing a graph.
    out = np.asarray(model(np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)),
                           training=False))
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


def test_frozen_backbone_trains_head_only():
    model = build_classifier("simplecnn", None, False, 32, 2)
    trainable = {w.path.split("/")[0] for w in model.trainable_weights}
    assert trainable == {"head_bn", "predictions"}


@pytest.mark.parametrize("name", options("optimizer"))
def test_every_optimizer_instantiates(tmp_path, name):
    cfg = compose_config(tmp_path, [f"optimizer={name}", "data.root=/x"])
    optimizer = hydra.utils.instantiate(cfg.optimizer, _convert_="all")
    assert isinstance(optimizer, keras.optimizers.Optimizer)
    assert float(optimizer.learning_rate) == pytest.approx(cfg.optimizer.learning_rate)


@pytest.mark.parametrize("name", options("augmentation"))
def test_every_augmentation_keeps_shape_dtype_range(tmp_path, name):
    cfg = compose_config(tmp_path, [f"augmentation={name}", "data.root=/x"])
    augment = hydra.utils.instantiate(cfg.augmentation, _convert_="all")
    batch = tf.random.uniform((4, 32, 32, 3), 0, 255, seed=1)
    ds = tf.data.Dataset.from_tensors(batch).map(augment)  # as the training pipeline runs it
    out = next(iter(ds))
    assert out.shape == batch.shape and out.dtype == tf.float32
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0 + 1e-3
    if name != "none":
        assert not np.allclose(out.numpy(), batch.numpy())
    # Inference: a no-op.
    np.testing.assert_array_equal(augment(batch, training=False).numpy(), batch.numpy())


@pytest.mark.parametrize("name", options("callbacks"))
def test_every_callbacks_option_instantiates(tmp_path, name):
    cfg = compose_config(tmp_path, [f"callbacks={name}", "data.root=/x"])
    callbacks = instantiate_callbacks(cfg.callbacks)
    kinds = {type(cb).__name__ for cb in callbacks}
    assert "ModelCheckpoint" in kinds
    assert ("ReduceLROnPlateau" in kinds) == (name != "fixed")
    assert ("EarlyStopping" in kinds) == (name == "early_stopping")
    (checkpoint,) = [cb for cb in callbacks if isinstance(cb, keras.callbacks.ModelCheckpoint)]
    assert checkpoint.save_best_only == (name != "fixed")  # fixed: the last epoch's model


def test_callback_added_from_the_command_line(tmp_path):
    cfg = compose_config(tmp_path, ["data.root=/x", "~callbacks.reduce_lr",
                                    "+callbacks.csv._target_=keras.callbacks.CSVLogger",
                                    f"+callbacks.csv.filename={tmp_path / 'log.csv'}"])
    kinds = [type(cb).__name__ for cb in instantiate_callbacks(cfg.callbacks)]
    assert kinds == ["ModelCheckpoint", "CSVLogger"]


@pytest.mark.parametrize("name", options("finetune"))
def test_every_finetune_option_composes(tmp_path, name):
    cfg = compose_config(tmp_path, [f"finetune={name}", "data.root=/x"])
    assert OmegaConf.to_object(cfg).finetune.strategy == name


@pytest.mark.parametrize("name", options("data"))
def test_every_data_option_composes(tmp_path, name):
    cfg = compose_config(tmp_path, [f"data={name}", "data.root=/x"])
    assert OmegaConf.to_object(cfg).data.root == "/x"


def test_typo_in_key_fails_at_composition(tmp_path):
    with pytest.raises(ConfigCompositionException, match="epocs"):
        compose_config(tmp_path, ["trainer.epocs=3"])


def test_wrong_type_fails_at_composition(tmp_path):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(tmp_path, ["trainer.epochs=ten"])
    assert isinstance(info.value.__cause__, ValidationError)
    assert "ten" in str(info.value.__cause__) and "epochs" in str(info.value.__cause__)


def test_unknown_key_in_optimizer_option_fails(tmp_path):
    """Adam has no momentum: its schema refuses the key."""
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(tmp_path, ["optimizer=adam", "optimizer.momentum=0.9"])
    assert isinstance(info.value.__cause__, (ConfigKeyError, ConfigAttributeError))
    assert "momentum" in str(info.value.__cause__) and "AdamConfig" in str(info.value.__cause__)


def test_missing_data_root_names_the_key(tmp_path):
    cfg = compose_config(tmp_path)
    with pytest.raises(MissingMandatoryValue, match="data.root"):
        OmegaConf.to_object(cfg)


@pytest.mark.parametrize(("override", "key"), [
    ("optimizer.learning_rate=-0.1", "optimizer.learning_rate"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.epochs=0", "trainer.epochs"),
    ("data.test_fraction=0.85", "data.val_fraction"),
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("eval.tta=rotate", "eval.tta"),
    ("eval.threshold=median", "eval.threshold"),
    ("eval.bootstrap_resamples=10", "eval.bootstrap_resamples"),
    ("finetune.strategy=partial", "finetune.strategy"),
    ("trainer.lr_schedule=cosine", "trainer.lr_schedule"),
    ("data.stain_normalization=vahadane", "data.stain_normalization"),
    ("cv.folds=0", "cv.folds"),
    ("data.mpp=-0.5", "data.mpp"),
    ("data.resize=pad", "data.resize"),
    ("backbone.global_pool=max", "backbone.global_pool"),
    ("eval.ood_coverage=1.5", "eval.ood_coverage"),
])
def test_out_of_range_values_name_key_and_value(tmp_path, override, key):
    cfg = compose_config(tmp_path, ["data.root=/x", override])
    with pytest.raises(ValueError, match=key) as info:
        OmegaConf.to_object(cfg)
    assert override.split("=")[1] in str(info.value)


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(ValueError, match="densenet201.*resnet50.*Received: backbone.name='vgg'"):
        get_spec("vgg")


@pytest.mark.parametrize("name", sorted(BACKBONES))  # backbones from files: test_external.py
def test_demo_data_serves_every_backbone_at_its_input_size(tmp_path, name):
    """`data=demo backbone=<any>`: the demo tiles are large enough for each default size."""


    cfg = compose_config(tmp_path, ["data=demo", f"backbone={name}", "backbone.weights=null",
                                    "data.images_per_class=10"])
    settings = OmegaConf.to_object(cfg)
    loaded = single.load_run_data(settings)
    assert loaded.image_size == get_spec(name).default_size
    assert loaded.pool.images.shape[1:] == (loaded.image_size, loaded.image_size, 3)
    assert not loaded.skipped


@pytest.mark.slow  # ~30 s: DenseNet at 224 px
def test_demo_data_trains_a_large_input_backbone(tmp_path):
    """One tiny epoch of a 224 px backbone on the demo set, end to end."""
    from experiments.run import run

    cfg = compose_config(tmp_path, ["data=demo", "backbone=mobilenetv3large",
                                    "backbone.weights=null", "data.images_per_class=10",
                                    "trainer.epochs=1", "trainer.batch_size=8",
                                    "trainer.verbose=0", "eval.tta=none",
                                    "eval.gradcam_images=0", "eval.bootstrap_resamples=100",
                                    "mlflow.experiment_name=demo224"])
    assert 0.0 <= run(cfg) <= 1.0


@pytest.mark.parametrize("name", options("hparams_search"))
def test_every_hparams_search_preset_composes_into_an_optuna_multirun(tmp_path, name):
    from hydra import compose as compose_with_hydra
    from hydra import initialize_config_module

    base = "experiment=histology_cpu" if name == "histology_cpu" else "backbone=resnet50"
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose_with_hydra("config", overrides=[
            f"paths.root={tmp_path}", "data.root=/x", base, f"hparams_search={name}"],
            return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert sweeper.direction == ("minimize" if cfg.callbacks.model_checkpoint.mode == "min"
                                 else "maximize")
    for key in sweeper.params:  # every searched key exists in the composed config
        assert OmegaConf.select(cfg, key) is not None or key == "finetune.unfreeze_layers", key


def test_compare_backbones_preset_sweeps_backbones_on_folds_fixed_by_the_split(tmp_path):
    """One command for the backbone study: a multirun over backbones (the study's two unless
    named), frozen ImageNet features and a probe, 5 folds x 2 repeats seeded by the split."""
    register_configs()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["experiment=compare_backbones", "data.root=/x",
                                 f"paths.root={tmp_path}"])
    assert str(cfg.hydra.mode) in ("MULTIRUN", "RunMode.MULTIRUN")
    assert cfg.hydra.sweeper.params.backbone == "densenet201,resnet50"
    assert cfg.backbone.weights == "imagenet" and cfg.finetune.strategy == "linear_probe"
    assert (cfg.cv.folds, cfg.cv.repeats, cfg.cv.refit) == (5, 2, True)
    assert cfg.data.split_seed == 0  # not the model seed: sweeping trainer.seed keeps folds
    assert cfg.augmentation.dihedral and cfg.data.image_size == 224


@pytest.mark.parametrize(("overrides", "message"), [
    (["+eval.external.bad-name=/x"], "eval.external.bad-name"),
    (["+eval.external.bh.rooot=/x"], "eval.external.bh.rooot"),
    (["+eval.external.bh.group_pattern=P"], "eval.external.bh.root"),
    (["+eval.external.bh.root=/x", "+eval.external.bh.group_pattern='(P'"],
     r"eval.external.bh.group_pattern.*'\(P'"),
    (["+eval.external.bh.root=/x", "+eval.external.bh.mpp=-1"], "eval.external.bh.mpp=-1"),
    (["+eval.external.bh.root=/x", "+eval.external.bh.adapt=maybe"], "eval.external.bh.adapt"),
])
def test_external_cohort_mistakes_name_the_key(tmp_path, overrides, message):
    cfg = compose_config(tmp_path, ["data.root=/x", *overrides])
    with pytest.raises(ValueError, match=message):
        OmegaConf.to_object(cfg)


def test_fold_models_can_be_left_out_only_when_a_refit_is_the_model(tmp_path):
    cfg = compose_config(tmp_path, ["data.root=/x", "cv.folds=5", "cv.fold_models=false"])
    with pytest.raises(ValueError, match="cv.fold_models=false. needs cv.refit=true.*Received: "
                                         "cv.fold_models=False, cv.refit=False"):
        OmegaConf.to_object(cfg)
    cfg = compose_config(tmp_path, ["data.root=/x", "experiment=compare_backbones"])
    assert OmegaConf.to_object(cfg).cv.fold_models is False


def test_external_cohorts_as_folders_or_with_options(tmp_path):
    cfg = compose_config(tmp_path, [
        "data.root=/x", "+eval.external.lab_b=/data/b", "+eval.external.bh.root=/data/bh",
        "+eval.external.bh.group_pattern='SOB_[BM]_([^-]+-\\d+-[^-]+)-'"])
    cohorts = OmegaConf.to_object(cfg).eval.cohorts
    assert [(c.name, c.root, c.group_pattern) for c in cohorts] == [
        ("bh", "/data/bh", "SOB_[BM]_([^-]+-\\d+-[^-]+)-"), ("lab_b", "/data/b", None)]


@pytest.mark.parametrize(("missing", "overrides", "says"), [
    ("root", [], "Data folder does not exist: {missing} (set data.root)"),
    ("test", ["data.test_root={missing}"], "Data folder does not exist: {missing} (set "
     "data.test_root)"),
    ("lab2", ["+data.sources.lab2={missing}"], "Data folder does not exist: {missing} (set "
     "data.sources.lab2.root)"),
    ("bh", ["+eval.external.bh.root={missing}"], "Data folder does not exist: {missing} (set "
     "eval.external.bh.root)"),
    ("w.h5", ["backbone.weights={missing}"], "backbone.weights file not found: {missing}"),
])
def test_a_folder_or_weights_file_that_is_not_there_names_its_key(tmp_path, image_folder,
                                                                   missing, overrides, says):
    """Checked before the training stack loads (`experiments.run`): each named location, with
    the key that set it; with every one present the check passes, the demo set's folder
    (generated on first use) and `imagenet` included."""
    from experiments.config.validation import check_locations, validated

    missing_path = tmp_path / "not-there" / missing
    root = missing_path if missing == "root" else image_folder
    present = compose_config(tmp_path, [f"data.root={image_folder}"])
    check_locations(validated(present))
    cfg = compose_config(tmp_path, [f"data.root={root}",
                                    *(o.format(missing=missing_path) for o in overrides)])
    with pytest.raises(FileNotFoundError) as raised:
        check_locations(validated(cfg))
    assert str(raised.value) == says.format(missing=missing_path)
    check_locations(validated(compose_config(tmp_path, ["data=demo"])))
