"""data.sources: several labeled folders trained on together, splits grouped by patient and
stratified by source, per-source test metrics, leave-one-source-out cross-validation, and a
source of another scale rescaled to data.root's (data.sources.<name>.mpp)."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from experiments.data.image_store import cache_key, file_key
from experiments.errors import ConfigError, DataError
from experiments.orchestration.single import load_run_data
from experiments.run import run
from tests.conftest import all_runs, client_for, compose_config, read_csv, write_image
from tests.data.test_layouts import breakhis_tree

PATIENT = "SOB_[BM]_[A-Z]+-(\\d+-\\d+)-"


def with_breakhis(tmp_path, make_config, *overrides: str):
    root = tmp_path / "bh"
    breakhis_tree(root, patients_per_tumour=3, images=2)  # 12 patients, 24 images at 200X
    return make_config(f"+data.sources.bh.root={root}", "+data.sources.bh.include_pattern=/200X/",
                       f"+data.sources.bh.group_pattern='{PATIENT}'", "trainer.epochs=1",
                       "eval.tta=none", "mlflow.experiment_name=sources", *overrides)


def test_a_second_source_is_trained_on_with_patients_kept_together(tmp_path, make_config):
    run(with_breakhis(tmp_path, make_config))
    client = client_for(tmp_path)
    (finished,) = all_runs(client, "sources")
    rows = read_csv(client, finished.info.run_id, "splits.csv", tmp_path / "dl")
    by = collections.Counter((r["split"], r["source"]) for r in rows)
    assert sum(n for (_, source), n in by.items() if source == "bh") == 24
    assert sum(n for (_, source), n in by.items() if source == "main") == 40
    for split in ("train", "val", "test"):  # every split holds both sources
        assert by[split, "bh"] > 0 and by[split, "main"] > 0
    split_of = {}
    for row in rows:  # bh patients whole; demo images each their own group
        assert split_of.setdefault(row["group"], row["split"]) == row["split"]
        assert row["group"].startswith(row["source"] + ":")
    metrics = finished.data.metrics
    for source in ("main", "bh"):
        key = f"test_source_{source}_accuracy"
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"]
    assert metrics["test_source_bh_n_patients"] == len(
        {r["group"] for r in rows if r["split"] == "test" and r["source"] == "bh"})
    assert "test_source_main_n_patients" not in metrics or metrics[
        "test_source_main_n_patients"] == metrics["test_source_main_n_images"]
    patients = read_csv(client, finished.info.run_id, "test_patients.csv", tmp_path / "dl_p")
    bh = [r for r in patients if r["patient"].startswith("bh:")]
    assert len(bh) == metrics["test_source_bh_n_patients"]
    assert sum(r["correct"] == "1" for r in bh) / len(bh) == pytest.approx(
        metrics["test_source_bh_patient_accuracy"])


def test_leave_one_source_out_tests_each_source_on_a_model_that_never_saw_it(tmp_path,
                                                                              make_config):
    run(with_breakhis(tmp_path, make_config, "cv.leave_source_out=true"))
    client = client_for(tmp_path)
    runs = all_runs(client, "sources")
    (parent,) = [r for r in runs if "cv_fold" not in r.data.tags]
    folds = {r.data.tags["cv_test_source"]: r for r in runs if "cv_fold" in r.data.tags}
    assert set(folds) == {"bh", "main"} and parent.data.tags["cv_folds"] == "2"
    for source, fold in folds.items():
        rows = read_csv(client, fold.info.run_id, "splits.csv", tmp_path / source)
        assert {r["source"] for r in rows if r["split"] == "test"} == {source}
        assert {r["source"] for r in rows if r["split"] != "test"} == {"bh", "main"} - {source}
    assert {"test_source_bh_roc_auc", "test_source_main_roc_auc",
            "test_source_bh_patient_accuracy", "test_patient_accuracy"} <= set(
        parent.data.metrics)
    splits = read_csv(client, folds["bh"].info.run_id, "splits.csv", tmp_path / "bh")
    check_an_ensemble_counts_the_members_patients_and_sources(client, parent, splits, tmp_path)


def check_an_ensemble_counts_the_members_patients_and_sources(client, parent, splits, tmp_path):
    """The out-of-fold tables name each image's patient and source, so an ensemble of such
    cross-validations (here the parent twice) reports per source and per patient as they do,
    its intervals resampling patients: 12 BreakHis patients, 40 images of data.root, each
    its own group."""
    from sklearn.metrics import roc_auc_score

    from experiments import ensemble
    from experiments.evaluation.cohorts import per_patient
    from experiments.serving.inference import apply_temperature

    member = ensemble.load_member(client, parent, tmp_path / "member")
    by_file = {r["file"]: r for r in splits}
    for table in (member.test, member.val):
        assert table.groups == tuple(by_file[f]["group"] for f in table.files)
        assert table.sources == tuple(by_file[f]["source"] for f in table.files)
    info = member.predictor.info
    metrics = ensemble.out_of_fold_metrics([member, member], info,
                                           ensemble.eval_settings(parent.data.params))
    assert metrics["test_source_bh_n_patients"] == 12 and metrics["test_n_patients"] == 52
    assert metrics["test_source_main_n_images"] == 40
    bh = ensemble.per_file_mean(member.val)
    bh = bh.subset(np.flatnonzero(np.asarray(bh.sources) == "bh"))
    patients = per_patient(dataclasses.replace(bh, probabilities=apply_temperature(
        bh.probabilities, info.temperature)))
    assert metrics["test_source_bh_patient_roc_auc"] == pytest.approx(
        roc_auc_score(patients.labels, patients.probabilities[:, 1]))


@pytest.mark.parametrize(("overrides", "error", "message"), [
    (["+data.sources.main=/x"], ConfigError, "data.sources.main"),
    (["+data.sources.b.root=/x", "+data.sources.b.mpp=0.5"], ConfigError,
     r"needs data.mpp.*data.sources.b.mpp=0.5"),
    (["data.mpp=0.5", "+data.sources.b.root=/x", "+data.sources.b.mpp=0"], ConfigError,
     "data.sources.b.mpp"),
    (["data.mpp=0.5", "+data.sources.b.root=/x", "+data.sources.b.adapt=true"], ConfigError,
     "data.sources.b.adapt"),
    (["cv.leave_source_out=true"], ConfigError, "data.sources"),
    (["cv.leave_source_out=true", "cv.folds=5", "+data.sources.b=/x"], ConfigError, "cv.folds"),
    (["cv.folds=3", "cv.refit=true", "cv.cascade=true", "eval.threshold=fixed"], ConfigError,
     r"cv.cascade.*data.sources"),
    (["cv.folds=3", "cv.cascade=true", "eval.threshold=fixed", "+data.sources.b=/x"],
     ConfigError, r"cv.cascade.*cv.refit=False"),
    (["cv.folds=3", "cv.refit=true", "cv.cascade=true", "+data.sources.b=/x"], ConfigError,
     r"cv.cascade.*eval.threshold='youden'"),
    (["cv.folds=3", "cv.refit=true", "cv.cascade=true", "eval.threshold=fixed",
      "eval.ood_coverage=null", "+data.sources.b=/x"], ConfigError,
     r"cv.cascade.*eval.ood_coverage=None"),
])
def test_source_mistakes_name_the_key(tmp_path, overrides, error, message):
    cfg = compose_config(tmp_path, ["data.root=/x", *overrides])
    with pytest.raises(error, match=message):
        OmegaConf.to_object(cfg)


def test_a_source_with_a_foreign_class_fails_before_training(tmp_path, make_config):
    write_image(tmp_path / "lab" / "normal" / "n.png")
    with pytest.raises(DataError, match=r"data.sources.lab.root.*\['normal'\]"):
        run(make_config(f"+data.sources.lab={tmp_path / 'lab'}"))
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() or not all_runs_named(tmp_path)


def all_runs_named(tmp_path):
    client = client_for(tmp_path)
    return [e for e in client.search_experiments() if e.name != "Default"]


def test_a_cascade_cross_validation_ships_the_home_model_first_with_its_own_estimate(
        tmp_path, make_config, capsys):
    """cv.cascade: every fold also trains a home model on its home images (tested on the whole
    test split); each out-of-fold prediction is the home model's where its referral accepts
    the image, else the all-source model's; the parent's model is the cascade of the home
    refit and the all-source refit, and cohorts are scored by it."""
    from experiments import predict
    from experiments.tracking import verdict

    cohort = f"+eval.external.lab.root={tmp_path / 'bh'}"
    run(with_breakhis(tmp_path, make_config, "cv.folds=2", "cv.refit=true", "cv.cascade=true",
                      "eval.threshold=fixed", cohort, "+eval.external.lab.include_pattern=/200X/",
                      "+eval.external.lab.adapt=true", "eval.temperature_scaling=false",
                      "cv.home_temperature=true"))  # the preset's temperatures
    assert "answered by the home model (the rest by the all-source model): bh " in (
        capsys.readouterr().out)
    client = client_for(tmp_path)
    runs = {r.info.run_name.removeprefix("simplecnn cv2 "): r for r in all_runs(client, "sources")}
    assert set(runs) == {"simplecnn cv2", "fold 1", "fold 2", "fold 1 home", "fold 2 home",
                         "refit", "home refit"}
    parent = runs["simplecnn cv2"]
    pooled = read_csv(client, parent.info.run_id, "test_predictions.csv", tmp_path / "parent")
    oof = {r["file"]: float(r["final_p_malignant"]) for r in pooled}
    answered_by = {r["file"]: r["answered_by"] for r in pooled}
    from_home = []
    for number in ("1", "2"):
        home, alone = runs[f"fold {number} home"], runs[f"fold {number}"]
        assert home.data.tags["cv_model"] == "home"
        # the home model fits a temperature, the all-source model none
        assert (home.data.params["eval.temperature_scaling"],
                alone.data.params["eval.temperature_scaling"]) == ("True", "False")
        assert "temperature" in home.data.metrics and "temperature" not in alone.data.metrics
        rows = read_csv(client, home.info.run_id, "splits.csv", tmp_path / number)
        assert {r["source"] for r in rows if r["split"] != "test"} == {"main"}
        assert {r["source"] for r in rows if r["split"] == "test"} == {"main", "bh"}
        source = {r["file"]: r["source"] for r in rows}
        answers = [{r["file"]: float(r["final_p_malignant"]) for r in read_csv(
            client, run.info.run_id, "test_predictions.csv", tmp_path / run.info.run_id)}
            for run in (home, alone)]
        for file, p_home in answers[0].items():
            p_alone = answers[1][file]
            assert oof[file] == pytest.approx(p_home if answered_by[file] == "first"
                                              else p_alone)
            if p_home != pytest.approx(p_alone):
                from_home.append((source[file], oof[file] == pytest.approx(p_home)))
    metrics = parent.data.metrics
    assert from_home and all(0 <= metrics[f"test_{s}answered_by_first"] <= 1
                             for s in ("", "source_main_", "source_bh_"))
    assert metrics["test_answered_by_first"] == pytest.approx(
        sum(a == "first" for a in answered_by.values()) / len(answered_by))
    assert {"fallback_test_accuracy", "fallback_test_source_bh_accuracy",
            "fallback_model_temperature", "ext_lab_answered_by_first",
            "ext_lab_adabn_accuracy", "fallback_test_source_bh_shipped_ece"} <= set(metrics)
    assert "test_shipped_ece" not in metrics  # a cascade ships two temperatures, not one
    scored = read_csv(client, parent.info.run_id, "external/lab/predictions.csv", tmp_path / "x")
    assert len(scored) == 24 and metrics["ext_lab_answered_by_first"] == pytest.approx(
        sum(r["answered_by"] == "first" for r in scored) / 24)
    patients = read_csv(client, parent.info.run_id, "test_patients.csv", tmp_path / "pp")
    assert "test_patients.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    bh = [r for r in patients if r["patient"].startswith("bh:")]  # the cascade's answers
    assert len(bh) == 12 and sum(r["correct"] == "1" for r in bh) / 12 == pytest.approx(
        metrics["test_source_bh_patient_accuracy"])
    rows = read_csv(client, runs["home refit"].info.run_id, "splits.csv", tmp_path / "refit")
    assert {r["source"] for r in rows} == {"main"} and len(rows) == 40
    assert parent.data.tags["model_kind"] == "cv_cascade"
    # one run per fold where a comparison pairs folds (the fold's two-source model)
    assert sorted(r.info.run_name for r in verdict.fold_runs(client, parent)) == [
        "simplecnn cv2 fold 1", "simplecnn cv2 fold 2"]

    predictor = predict.load_predictor(parent.info.run_id,
                                       f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    some = sorted(oof)[:3]
    answered = predictor.score(some)
    assert all(row["answered_by"] in ("first", "fallback") for row in answered)
    assert predictor.info.temperature == pytest.approx(metrics["model_temperature"])
    assert predictor.fallback.info.temperature == metrics["fallback_model_temperature"] == 1.0
    assert runs["home refit"].data.params["eval.temperature_scaling"] == "True"


def smooth_image(seed: int, size: int = 64) -> Image.Image:
    """Tissue-like low-frequency colour (random 8x8 colours, bicubic-enlarged): resizing it
    changes little but its scale."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return small.resize((size, size), Image.Resampling.BICUBIC)


def two_scales(tmp_path, per_class: int = 3):
    """data.root: 64-px images at 0.5 um/px; the lab: the same images at twice the
    magnification (0.25 um/px, 128 px) inside 256-px fields of grey - a lab whose camera
    sees a wider field at a finer scale."""
    for label in ("benign", "malignant"):
        for index in range(per_class):
            image = smooth_image(index + 10 * (label == "malignant"))
            (tmp_path / "home" / label).mkdir(parents=True, exist_ok=True)
            image.save(tmp_path / "home" / label / f"{index}.png")
            field = Image.new("RGB", (256, 256), (128, 128, 128))
            field.paste(image.resize((128, 128), Image.Resampling.BICUBIC), (64, 64))
            (tmp_path / "lab" / label).mkdir(parents=True, exist_ok=True)
            field.save(tmp_path / "lab" / label / f"{index}.png")


def decoded(tmp_path, make_config, *overrides):
    """file name -> (home image, lab image) as a run decodes them at 32 px."""
    settings = OmegaConf.to_object(make_config(
        "data=folder", f"data.root={tmp_path / 'home'}", "data.mpp=0.5",
        f"+data.sources.lab.root={tmp_path / 'lab'}", *overrides))
    pool = load_run_data(settings).pool
    images = np.asarray(pool.images, dtype=np.float64)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for index, (file, source) in enumerate(zip(pool.files, pool.sources, strict=True)):
        pairs.setdefault(f"{file.split('/')[-2]}/{file.split('/')[-1]}", {})[source] = \
            images[index]
    return pool, {name: (both["main"], both["lab"]) for name, both in pairs.items()}


@pytest.mark.parametrize("cache", ["memory", "disk", "none"])
def test_a_source_of_another_scale_is_seen_at_data_roots_scale(tmp_path, make_config, cache):
    two_scales(tmp_path)
    pool, pairs = decoded(tmp_path, make_config, "+data.sources.lab.mpp=0.25",
                          f"data.cache={cache}")
    assert len(pairs) == 6
    for home, lab in pairs.values():  # the lab's image cut to the home field and scale
        assert np.abs(home - lab).mean() < 4
    scales = dict(zip(pool.files, pool.scales or (), strict=True))  # input: 0.5 * 64 / 32
    assert [scales[f] for f, s in zip(pool.files, pool.sources, strict=True)
            if s == "lab"] == pytest.approx([0.25 / 1.0] * 6)
    assert {scales[f] for f, s in zip(pool.files, pool.sources, strict=True)
            if s == "main"} == {None}
    _, unscaled = decoded(tmp_path, make_config, f"data.cache={cache}")  # without its mpp
    assert all(np.abs(home - lab).mean() > 20 for home, lab in unscaled.values())


def test_an_unreadable_file_beside_a_rescaled_source_is_skipped_not_fatal(tmp_path,
                                                                           make_config):
    """The model input's scale is read from data.root's headers before decoding: a broken
    file there is left to the decoding, which skips it by name (data.on_invalid=skip)."""
    two_scales(tmp_path)
    (tmp_path / "home" / "benign" / "broken.png").write_bytes(b"not an image")
    settings = OmegaConf.to_object(make_config(
        "data=folder", f"data.root={tmp_path / 'home'}", "data.mpp=0.5", "data.on_invalid=skip",
        f"+data.sources.lab.root={tmp_path / 'lab'}", "+data.sources.lab.mpp=0.25"))
    loaded = load_run_data(settings)
    assert [invalid.file.split("/")[-1] for invalid in loaded.skipped] == ["broken.png"]
    assert loaded.input_mpp == pytest.approx(0.5 * 64 / 32)
    scales = [s for s in loaded.pool.scales or () if s is not None]
    assert len(loaded.pool) == 12 and scales == pytest.approx([0.25] * 6)


@pytest.mark.slow  # a frozen run, about 35 s
def test_a_rescaled_source_trains_on_cached_features_of_its_rescaled_images(tmp_path,
                                                                             make_config):
    two_scales(tmp_path, per_class=5)
    config = make_config("data=folder", f"data.root={tmp_path / 'home'}", "data.mpp=0.5",
                         f"+data.sources.lab.root={tmp_path / 'lab'}",
                         "+data.sources.lab.mpp=0.25", "finetune=frozen",
                         "augmentation=dihedral", "trainer.epochs=1", "eval.tta=none",
                         "mlflow.experiment_name=scaled")
    run(config)
    (finished,) = all_runs(client_for(tmp_path), "scaled")
    assert finished.data.metrics["features_computed"] == 20
    assert "test_source_lab_accuracy" in finished.data.metrics
    (stored,) = (tmp_path / ".cache" / "features").glob("*.npz")
    keys = [str(k) for k in np.load(stored)["keys"]]
    assert sum(k.endswith("|x0.25") for k in keys) == 10 and len(keys) == 20


def test_a_rescaled_sources_test_images_are_decoded_again_as_the_run_saw_them(tmp_path,
                                                                             make_config):
    """splits.csv records each image's rescaling factor, so what reads a run's images again -
    an ensemble of a sweep, the comparison's Grad-CAM gallery (a fold's model, or the refit's
    through its cross-validation's parent) - decodes a rescaled source as the run did: its
    model then gives the probabilities the run logged, where the files as they are give
    others."""
    from experiments import ensemble
    from experiments.data.decode import load_image
    from experiments.serving import views
    from experiments.tracking import model_registry

    two_scales(tmp_path, per_class=5)
    run(make_config("data=folder", f"data.root={tmp_path / 'home'}", "data.mpp=0.5",
                    f"+data.sources.lab.root={tmp_path / 'lab'}", "+data.sources.lab.mpp=0.25",
                    "trainer.epochs=1", "eval.tta=none", "cv.folds=2", "cv.refit=true",
                    "eval.ood_coverage=null",
                    "mlflow.experiment_name=scaled"))
    client = client_for(tmp_path)
    runs = all_runs(client, "scaled")
    (parent,) = [r for r in runs if "cv_folds" in r.data.tags]
    fold = next(r for r in runs if "cv_fold" in r.data.tags)
    for logged_by in (parent, fold):
        scales = model_registry.logged_scales(client, logged_by, tmp_path / "dl")
        assert scales is not None and len(scales) == 10  # the lab's images, each x0.25
        assert all(f.startswith(str(tmp_path / "lab")) and s == pytest.approx(0.25)
                   for f, s in scales.items())
    member = ensemble.load_member(client, fold, tmp_path / "member")
    files, images = ensemble.shared_test_images([member], member.predictor.info)
    assert any(f in (member.scales or {}) for f in files)
    logged = dict(zip(member.test.files, member.test.probabilities, strict=True))
    again = views.predict_probabilities(member.predictor.model, images, 32, "none")
    np.testing.assert_allclose(again, [logged[f] for f in files], atol=2e-6)  # 6 decimals
    as_they_are = views.predict_probabilities(member.predictor.model, np.stack(
        [load_image(f, 32, resize="crop") for f in files]), 32, "none")
    assert np.abs(as_they_are - again).max() > 1e-4  # a model of one epoch: near 0.5


def test_a_rescaled_image_is_cached_apart_from_the_image_itself(tmp_path):
    file = write_image(tmp_path / "a.png")
    assert file_key(str(file), 0.125) != file_key(str(file))
    assert cache_key([str(file)], 32, False, "crop", [0.125]) != cache_key(
        [str(file)], 32, False, "crop") == cache_key([str(file)], 32, False, "crop", [None])
