"""`python -m experiments.ensemble --parent <sweep parent run id>`: one model from a sweep's jobs.

Averages the probabilities of every finished child run's model (e.g. a seed sweep: seeds
disagree about as much as recipes do, and their mean is steadier than any one of them) into one
MLflow model that `experiments.predict` and `mlflow models serve` use like any other. Its
temperature and decision threshold are fitted on the members' pooled validation predictions
(each member's own validation split; a cross-validation's pooled out-of-fold predictions), never
on a test split. When every member was tested on the same images (a fixed `data.split_seed`, or
`data.test_root`), the ensemble is evaluated on them too; members that are cross-validations are
evaluated on the mean of their out-of-fold predictions (their models trained on every image);
otherwise the run says why it has no test metrics.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from experiments.console import configure_logging
from experiments.data import decode
from experiments.errors import DataError, UserError, report_user_errors
from experiments.evaluation import evaluate, stats
from experiments.evaluation import metrics as metrics_lib
from experiments.evaluation.cohorts import patient_metrics, per_source_metrics
from experiments.evaluation.metrics import Predictions
from experiments.evaluation.tables import read_predictions
from experiments.serving import export, inference, views
from experiments.serving.cascade import Cascade
from experiments.tracking import model_registry, records, run_records, store


@dataclass(frozen=True)
class Member:
    run: Run
    predictor: inference.Predictor
    val: Predictions  # with TTA, no temperature
    test: Predictions  # without TTA or temperature; a cross-validation's out of fold
    # file -> the factor the run rescaled it by (a source's mpp; model_registry.logged_scales)
    scales: dict[str, float] | None = field(default_factory=dict)

    @property
    def test_files(self) -> tuple[str, ...]:
        return self.test.files

    @property
    def cross_validation(self) -> bool:
        return "cv_folds" in self.run.data.tags


def load_member(client: MlflowClient, run: Run, folder: Path) -> Member:
    predictor = model_registry.load_logged(client, run.data.tags["model_uri"], folder / "model")
    if isinstance(predictor, Cascade):
        raise UserError(f"Run {run.info.run_id} ({run.info.run_name}) logged a cascade of two "
                        "models; an ensemble averages single models' probabilities")
    names = predictor.info.class_names
    logged = {item.path for item in client.list_artifacts(run.info.run_id)}
    if "val_predictions.csv" not in logged:
        raise UserError(f"Run {run.info.run_id} ({run.info.run_name}) logged no "
                        "val_predictions.csv (the predictions its temperature and threshold "
                        "were fitted on; cross-validations log them since 2026-12-02): "
                        "run it again to ensemble it")
    val = read_predictions(Path(client.download_artifacts(
        run.info.run_id, "val_predictions.csv", str(folder))), names)
    test = read_predictions(Path(client.download_artifacts(
        run.info.run_id, "test_predictions.csv", str(folder))), names)
    return Member(run, predictor, val, test,
                  model_registry.logged_scales(client, run, folder / "splits"))


def sweep_members(client: MlflowClient, parent_id: str) -> list[Run]:
    """The parent's finished child runs that logged a model (cross-validation parents count as
    one member: their own ensemble or refit model)."""
    try:
        parent = client.get_run(parent_id)
    except MlflowException as error:
        raise UserError(f"No MLflow run {parent_id!r} in {client.tracking_uri} (pass the "
                        "sweep's parent run id, and --tracking-uri when it lives in another "
                        "store)") from error
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent_id}' "
                              "and attributes.status = 'FINISHED'", max_results=10000)
    members = [r for r in runs if "model_uri" in r.data.tags and "cv_fold" not in r.data.tags]
    if not members:
        raise UserError(f"Run {parent_id} has no finished child run with a model to ensemble")
    return members


def build(members: Sequence[Member], eval_params: dict[str, str]) -> tuple[object, dict]:
    """The ensemble model and its info, the operating point fitted on pooled validation."""
    infos = {(m.predictor.info.class_names, m.predictor.info.image_size,
              m.predictor.info.positive_class, m.predictor.info.resize) for m in members}
    if len(infos) != 1:
        raise DataError(f"The members disagree on classes, input size, positive class or "
                        "resize: "
                        f"{sorted(infos)}")
    first = members[0].predictor.info
    positive = list(first.class_names).index(first.positive_class or first.class_names[-1])
    labels = np.concatenate([m.val.labels for m in members])
    probabilities = np.concatenate([m.val.probabilities for m in members])
    temperature, threshold = stats.fit_operating_point(
        labels, probabilities, positive, eval_params.get("eval.threshold", "youden"),
        float(eval_params.get("eval.fixed_threshold", 0.5)),
        float(eval_params.get("eval.target_sensitivity", 0.95)),
        eval_params.get("eval.temperature_scaling", "True") == "True")
    model = export.ensemble([m.predictor.model for m in members])
    info = export.model_info(first.class_names, first.image_size, positive, first.tta,
                             temperature, threshold, kind="sweep_ensemble", resize=first.resize,
                             members=len(members),
                             member_runs=[m.run.info.run_id for m in members])
    return model, info


def evaluate_on_shared_test(predictor: inference.Predictor, members: Sequence[Member],
                            settings: evaluate.EvalSettings) -> dict[str, float] | str:
    """Test metrics of the ensemble when all members share one test split (of
    cross-validations: their out-of-fold predictions, `out_of_fold_metrics`), else the
    reason."""
    folds = {m.cross_validation for m in members}
    if folds == {True}:
        return out_of_fold_metrics(members, predictor.info, settings)
    if len(folds) > 1:
        return ("none: the members mix cross-validations, whose models trained on every image "
                "they predicted, with single runs; ensemble each kind apart")
    shared = shared_test_images(members, predictor.info)
    if isinstance(shared, str):
        return shared
    files, images = shared
    truth = per_file_mean(members[0].test)  # labels, groups and sources, in `files`' order

    def predictions(tta: str) -> Predictions:
        return dataclasses.replace(truth, probabilities=views.predict_probabilities(
            predictor.model, images, 32, tta))

    tta = predictor.info.tta
    return scored_metrics(predictions("none"),
                          None if tta == "none" else predictions(tta), predictor.info,
                          settings)


def shared_test_images(members: Sequence[Member], info: inference.ModelInfo
                       ) -> tuple[list[str], np.ndarray] | str:
    """The members' one test split, decoded as they decoded it (each file rescaled by the
    factor their splits.csv gives, a source's mpp), or why it cannot be."""
    shared = {tuple(sorted(m.test_files)) for m in members}
    if len(shared) != 1:
        return ("none: the members were tested on different images (fix data.split_seed to "
                "share one split); evaluate the ensemble on held-out images with "
                "experiments.predict")
    files = list(shared.pop())
    scales = [m.scales for m in members]
    if any(s is None for s in scales):
        rescaled = {key for m in members for key in model_registry.rescaled_sources(m.run)}
        return ("none: the members rescaled a source to the training scale "
                f"({', '.join(sorted(rescaled))}) and their splits.csv does not say by how "
                "much (logged before its scale column); each member's run has its own test "
                "metrics")
    factors = {tuple(s.get(f) for f in files) for s in scales if s is not None}
    if len(factors) != 1:
        return "none: the members rescaled their test images differently"
    if not all(Path(f).is_file() for f in files):
        return "none: the members' test images are not readable here"
    (factor,) = factors
    return files, np.stack([decode.load_image(f, info.image_size, resize=info.resize,
                                              scale=scale)
                            for f, scale in zip(files, factor, strict=True)])


def out_of_fold_metrics(members: Sequence[Member], info: inference.ModelInfo,
                        settings: evaluate.EvalSettings) -> dict[str, float] | str:
    """An ensemble of cross-validations, measured as each of them is: on the mean of their
    out-of-fold predictions, every image predicted by models that did not train on it (its
    final models trained on every image, so predicting them again would score training
    images). Its temperature and threshold come from the same predictions, as a
    cross-validation's own do."""
    plain = [per_file_mean(m.test) for m in members]
    raw = [per_file_mean(m.val) for m in members]
    if len({p.files for p in [*plain, *raw]}) != 1:
        return ("none: the cross-validations predicted different images out of fold (other "
                "data.root or sources)")
    return scored_metrics(mean_of(plain), None if info.tta == "none" else mean_of(raw), info,
                          settings)


def per_file_mean(pred: Predictions) -> Predictions:
    """One row per file, in file order: the mean of its rows (a cross-validation's repeats),
    with its label, group and source."""
    files, first, inverse = np.unique(np.asarray(pred.files), return_index=True,
                                      return_inverse=True)
    sums = np.zeros((len(files), pred.probabilities.shape[1]))
    np.add.at(sums, inverse, pred.probabilities)
    return dataclasses.replace(pred.subset(first),
                               probabilities=sums / np.bincount(inverse)[:, None])


def mean_of(parts: Sequence[Predictions]) -> Predictions:
    """The members' mean probabilities of the same files."""
    return dataclasses.replace(parts[0], probabilities=np.mean([p.probabilities for p in parts],
                                                               axis=0))


def scored_metrics(plain: Predictions, tta: Predictions | None, info: inference.ModelInfo,
                   settings: evaluate.EvalSettings) -> dict[str, float]:
    """test_* of the plain predictions, test_tta_* with TTA, and test_op_* at the ensemble's
    temperature and threshold, each with bootstrap intervals (over patients when the members'
    tables name them); at that operating point also test_patient_* and test_source_<name>_*,
    as the members' runs report them."""
    positive = list(info.class_names).index(info.positive_class or info.class_names[-1])
    metrics = {**metrics_lib.classification_metrics(plain, positive, "test_"),
               **metrics_lib.interval_metrics(plain, positive, settings, "test_")}
    raw = plain if tta is None else tta
    if tta is not None:
        metrics.update({**metrics_lib.classification_metrics(tta, positive, "test_tta_"),
                        **metrics_lib.interval_metrics(tta, positive, settings, "test_tta_")})
    final = dataclasses.replace(raw, probabilities=inference.apply_temperature(
        raw.probabilities, info.temperature))
    if info.threshold is not None:
        metrics.update(metrics_lib.interval_metrics(final, positive, settings, "test_op_",
                                                    info.threshold))
    return {**metrics, **per_source_metrics(final, positive, info.threshold, settings),
            **patient_metrics(final, positive, info.threshold, settings, "test_")}


def eval_settings(params: dict[str, str]) -> evaluate.EvalSettings:
    return evaluate.EvalSettings(seed=int(params.get("eval.seed", 0)),
                                 bootstrap_resamples=int(params.get("eval.bootstrap_resamples",
                                                                    2000)))


def ensemble_sweep(tracking_uri: str, parent_id: str, register_as: str | None = None) -> str:
    """Build, evaluate (when possible) and log the ensemble of a sweep; returns its run id."""
    client = MlflowClient(tracking_uri)
    store.use_store(tracking_uri)
    runs = sweep_members(client, parent_id)
    with tempfile.TemporaryDirectory() as folder:
        members = [load_member(client, run, Path(folder) / run.info.run_id) for run in runs]
        params = runs[0].data.params
        model, info = build(members, params)
        model_dir = Path(folder) / "ensemble"
        inference.save_model(model, info, model_dir)
        predictor = inference.Predictor.load(model_dir / inference.MODEL_FILE)
        outcome = evaluate_on_shared_test(predictor, members, eval_settings(params))
        experiment_id = runs[0].info.experiment_id
        tags = {"ensemble_of": parent_id, "model_kind": "sweep_ensemble",
                "members": ",".join(m.run.info.run_id for m in members)}
        if isinstance(outcome, str):
            tags["test_metrics"] = outcome
        parent_name = client.get_run(parent_id).info.run_name
        with store.open_run(experiment_id, f"ensemble of {parent_name}", tags) as run_id:
            records.log_params({"members": len(members), "ensemble_of": parent_id})
            if not isinstance(outcome, str):
                records.log_metrics(outcome)
            run_records.log_operating_point("model_", info["temperature"], info["threshold"])
            model_uri = run_records.publish_model(model_dir, info, register_as)
    print(f"Ensemble of {len(members)} models from {parent_id}: MLflow run {run_id}, model "
          f"{model_uri}")
    if isinstance(outcome, str):
        print(f"Test metrics: {outcome}")
    else:
        for name in ("test_accuracy", "test_roc_auc", "test_op_accuracy",
                     "test_patient_accuracy", "test_patient_roc_auc"):
            if name in outcome:
                print(f"  {name:<21} {outcome[name]:.4f}  [{outcome[f'{name}_ci_low']:.3f}, "
                      f"{outcome[f'{name}_ci_high']:.3f}]")
    return run_id


@report_user_errors
def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    parser = store.model_command(__doc__, "the ensemble's model")
    parser.add_argument("--parent", required=True, help="the sweep's parent run id")
    args = parser.parse_args(argv)
    store.check_server(args.tracking_uri)
    ensemble_sweep(args.tracking_uri, args.parent, args.register_as)


if __name__ == "__main__":
    main()
