"""The study report's gallery: the images the configurations decide differently, each with
every configuration's probability, decision and Grad-CAM - from the model that scored that
image (for a cross-validation, the fold model whose test fold held it; the refit model when
the folds logged none, cv.fold_models=false), loaded from the comparison's own tracking store.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from experiments.evaluation import gradcam
from experiments.serving.cascade import Cascade
from experiments.serving.inference import Predictor
from experiments.tracking import model_registry, verdict
from experiments.tracking.verdict import Scored

IMAGES = 8


def paired_groups(scored: Sequence[Scored]) -> list[Scored]:
    """The largest set of groups tested on the same images (none when no two were)."""
    sets: dict[tuple[str, ...], list[Scored]] = {}
    for group in scored:
        sets.setdefault(group.files, []).append(group)
    largest = max(sets.values(), key=len, default=[])
    return largest if len(largest) > 1 else []


def disagreements(scored: Sequence[Scored], count: int) -> list[int]:
    """Up to `count` images (indices into the groups' shared files) on which the groups'
    decisions differ, the widest spread of their probabilities first."""
    if len(scored) < 2 or count <= 0 or any(g.files != scored[0].files for g in scored):
        return []
    decisions = np.stack([group.decision for group in scored])
    differ = np.flatnonzero(decisions.min(axis=0) != decisions.max(axis=0))
    spread = np.ptp(np.stack([group.score for group in scored]), axis=0)
    return [int(i) for i in differ[np.argsort(-spread[differ], kind="stable")][:count]]


def scoring_runs(client: MlflowClient, run: Run, predictions: Path) -> dict[str, Run]:
    """file -> the run whose model scored it in `run`'s test predictions: the run itself, or
    for a cross-validation the fold run that had the image in its test fold (the first
    repeat). Read once per run: one predictions file, one search for the fold runs."""
    table, assignment = verdict.read_predictions(predictions, run.data.tags["positive_class"])
    if "cv_folds" not in run.data.tags:
        return dict.fromkeys(table, run)
    folds = {(r.data.tags.get("cv_repeat", "1"), r.data.tags["cv_fold"]): r
             for r in verdict.fold_runs(client, run)}
    first: dict[str, tuple[str, str]] = {}
    for file, repeat, fold in assignment:
        if file not in first or (int(repeat), int(fold)) < tuple(map(int, first[file])):
            first[file] = (repeat, fold)
    missing = sorted(set(first.values()) - set(folds))
    if missing:
        raise ValueError(f"Cross-validation run {run.info.run_id} has no fold run for "
                         f"(repeat, fold) {missing}")
    return {file: folds[where] for file, where in first.items()}


@dataclass(frozen=True)
class Panel:
    """One group's view of a gallery image: its probability and decision, and the Grad-CAM
    overlay of the model that scored it (or why there is none)."""

    group: str
    p_positive: float
    decision: str
    png: bytes | None
    note: str


@dataclass(frozen=True)
class Tile:
    file: str
    truth: str
    panels: tuple[Panel, ...]


class _Models:
    """Logged models loaded once each (run id -> Predictor), downloaded into `folder` from the
    comparison's store (not the process default)."""

    def __init__(self, client: MlflowClient, folder: Path) -> None:
        self.client = client
        self.folder = folder
        self.loaded: dict[str, Predictor | Cascade] = {}

    def get(self, run: Run) -> Predictor | Cascade:
        run_id = run.info.run_id
        if run_id not in self.loaded:
            self.loaded[run_id] = model_registry.load_logged(
                self.client, run.data.tags["model_uri"], self.folder / run_id)
        return self.loaded[run_id]

    def scales(self, run: Run) -> dict[str, float] | None:
        """file -> the factor `run` rescaled it by (`model_registry.logged_scales`)."""
        return model_registry.logged_scales(self.client, run,
                                            self.folder / run.info.run_id / "splits")


def image_path(run: Run, file: str) -> Path:
    """Where a predictions row's image is: its path, or under the run's data.root."""
    path = Path(file)
    return path if path.is_absolute() else Path(run.data.params.get("data.root", ".")) / path


@dataclass(frozen=True)
class _Pending:
    """A panel whose Grad-CAM is still to draw, from `source`'s model."""

    group: Scored
    index: int
    source: Run
    what: str
    path: Path


def _plan(group: Scored, index: int, sources: Mapping[str, Run]) -> Panel | _Pending:
    """The panel of one group for one image: what to draw it from, or (no image, no model)
    the finished panel saying why there is no map."""
    file, run = group.files[index], group.runs[0]
    source = sources[file]
    what = "its model" if source is run else (
        f"its fold model (repeat {source.data.tags.get('cv_repeat', '1')}, fold "
        f"{source.data.tags['cv_fold']})")
    if len(group.runs) > 1:
        what += f" (of the first of {len(group.runs)} runs)"
    path = image_path(source, file)
    if not path.is_file():
        return _finished(group, index, None, f"no image at {path}")
    if "model_uri" not in source.data.tags and source is not run \
            and "model_uri" in run.data.tags:  # cv.fold_models=false: the refit stands in
        source, what = run, ("the refit model (trained on every image, this one included: "
                             "the fold models were not logged)")
    if "model_uri" not in source.data.tags:
        return _finished(group, index, None, f"run {source.info.run_id} logged no model")
    return _Pending(group, index, source, what, path)


def _finished(group: Scored, index: int, png: bytes | None, note: str) -> Panel:
    negative, positive = group.classes
    decided = positive if group.decision[index] else negative
    return Panel(group.key, float(group.score[index]), decided, png, note)


def _draw(models: _Models, pending: Sequence[_Pending]) -> dict[tuple[str, int], Panel]:
    """(group key, image index) -> panel, with one batched Grad-CAM per model: the maps of
    every image a model explains come from one pass (one image at a time cost 2 s each for
    a DenseNet201, mostly running its layers one by one)."""
    from experiments.data.decode import load_image

    by_model: dict[str, list[_Pending]] = {}
    for item in pending:
        by_model.setdefault(item.source.info.run_id, []).append(item)
    panels = {}
    for batch in by_model.values():
        predictor = models.get(batch[0].source)
        scales = models.scales(batch[0].source)  # a rescaled source's images, as it saw them
        if scales is None:
            for item in batch:
                panels[item.group.key, item.index] = _finished(
                    item.group, item.index, None, "no Grad-CAM: the run rescaled a source "
                    f"({', '.join(model_registry.rescaled_sources(item.source))}) and its "
                    "splits.csv does not say by how much")
            continue
        images = np.stack([load_image(item.path, predictor.info.image_size,
                                      resize=predictor.info.resize,
                                      scale=scales.get(item.group.files[item.index]))
                           for item in batch])
        why = "a cascade of two models" if isinstance(predictor, Cascade) else None
        if isinstance(predictor, Predictor):
            try:
                heatmaps = gradcam.gradcam(predictor.model, images.astype(np.float32))
            except ValueError as error:  # not a chain of layers: say so in the tile
                why = str(error)
        if why is not None:
            for item in batch:
                panels[item.group.key, item.index] = _finished(
                    item.group, item.index, None, f"no Grad-CAM: {why}")
            continue
        for item, image, heatmap in zip(batch, images, heatmaps, strict=True):
            p = float(item.group.score[item.index])
            overlay = gradcam.overlay_image(
                image, heatmap, f"{item.group.key}: p({item.group.classes[1]}) {p:.2f}")
            buffer = io.BytesIO()
            overlay.save(buffer, format="PNG")
            panels[item.group.key, item.index] = _finished(
                item.group, item.index, buffer.getvalue(),
                f"Grad-CAM of {item.what}, for the class it predicts")
    return panels


def gallery(client: MlflowClient, scored: Sequence[Scored], predictions: Mapping[str, Path],
            count: int, models_folder: Path, output: Path | None = None) -> list[Tile]:
    """Tiles of the images the paired groups (`paired_groups`) disagree on (`disagreements`),
    each with every such group's Grad-CAM; with `output`, each overlay is also written there
    as a PNG."""
    models = _Models(client, models_folder)
    scored = paired_groups(scored)
    tiles: list[Tile] = []
    chosen = disagreements(scored, count)
    if not chosen:
        return tiles
    sources = [scoring_runs(client, group.runs[0], predictions[group.runs[0].info.run_id])
               for group in scored]  # the first run of each group: its models are shown
    plans = {(group.key, index): _plan(group, index, source)
             for index in chosen for group, source in zip(scored, sources, strict=True)}
    drawn = _draw(models, [plan for plan in plans.values() if isinstance(plan, _Pending)])
    for index in chosen:
        first = scored[0]
        truth = first.classes[1] if first.truth[index] else first.classes[0]
        panels = tuple(plan if isinstance(plan, Panel) else drawn[group.key, index]
                       for group in scored for plan in [plans[group.key, index]])
        tiles.append(Tile(first.files[index], truth, panels))
        if output is not None:
            output.mkdir(parents=True, exist_ok=True)
            for number, panel in enumerate(panels):
                if panel.png is not None:
                    (output / f"{len(tiles):02d}_{number}_{verdict.slug(panel.group)}.png"
                     ).write_bytes(panel.png)
    return tiles
