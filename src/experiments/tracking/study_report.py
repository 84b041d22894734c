"""The study report: one self-contained HTML file (`report.html`) that a person opens - the
paired verdict, the summary table, ROC curves with bootstrap bands, calibration, and a Grad-CAM
gallery of the images the models disagree on. Every figure is inlined (base64 PNG) and the
style is in the file, so the file alone is the report: mail it, or open it from the sweep's
parent run in the MLflow UI.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from experiments.evaluation import figures, gradcam, stats
from experiments.tracking import verdict
from experiments.tracking.verdict import Scored

matplotlib.use("Agg")

GALLERY_IMAGES = 8
BAND_RESAMPLES = 500
FPR_GRID = np.linspace(0.0, 1.0, 101)


def roc_band(truth: np.ndarray, score: np.ndarray, resamples: int = BAND_RESAMPLES,
             seed: int = 0, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """A pointwise bootstrap band of the ROC curve: the (low, high) true positive rate at each
    false positive rate of FPR_GRID over resamples of the images (resamples holding one class
    only are drawn again)."""
    rng = np.random.default_rng(seed)
    curves: list[np.ndarray] = []
    while len(curves) < resamples:
        pick = rng.integers(0, len(truth), len(truth))
        if truth[pick].all() or not truth[pick].any():
            continue
        fpr, tpr, _ = skm.roc_curve(truth[pick], score[pick])
        curves.append(np.interp(FPR_GRID, fpr, tpr))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(np.array(curves), [tail, 100 - tail], axis=0)
    return low, high


def plot_roc_bands(scored: Sequence[Scored], path: Path) -> Path:
    """Each group's ROC curve over its (pooled) test predictions with a 95% bootstrap band."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for group in scored:
        fpr, tpr, _ = skm.roc_curve(group.truth, group.score)
        line, = ax.plot(fpr, tpr, label=f"{group.key} (AUC {skm.auc(fpr, tpr):.3f})")
        low, high = roc_band(group.truth, group.score)
        ax.fill_between(FPR_GRID, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)",
           title=f"test ROC curves, 95% bootstrap bands ({BAND_RESAMPLES} resamples)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_calibration(scored: Sequence[Scored], path: Path, n_bins: int = 10) -> Path:
    """Each group's reliability diagram (top-class confidence against accuracy) and ECE."""
    curves = {group.key: stats.reliability_bins(
        group.truth.astype(int), np.stack([1 - group.score, group.score], axis=1), n_bins)
        for group in scored}
    return figures.plot_reliability(curves, path)


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


def scoring_run(client: MlflowClient, run: Run, predictions: Path, file: str) -> Run:
    """The run whose model scored `file` in `run`'s test predictions: the run itself, or for a
    cross-validation the fold run that had the image in its test fold (the first repeat)."""
    if "cv_folds" not in run.data.tags:
        return run
    _, assignment = verdict.read_predictions(predictions, run.data.tags["positive_class"])
    repeat, fold = min(((r, f) for name, r, f in assignment if name == file),
                       key=lambda where: (int(where[0]), int(where[1])))
    for candidate in verdict.fold_runs(client, run):
        tags = candidate.data.tags
        if (tags.get("cv_repeat", "1"), tags["cv_fold"]) == (repeat, fold):
            return candidate
    raise ValueError(f"Cross-validation run {run.info.run_id} has no fold run for repeat "
                     f"{repeat}, fold {fold} (the fold that tested {file})")


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
    """Logged models loaded once each (run id -> Predictor), downloaded into `folder`."""

    def __init__(self, client: MlflowClient, folder: Path) -> None:
        self.client = client  # the comparison's store, not the process default
        self.folder = folder
        self.loaded: dict[str, Any] = {}

    def get(self, run: Run) -> Any:
        import mlflow.artifacts

        from experiments.serving import inference

        run_id = run.info.run_id
        if run_id not in self.loaded:
            # MLflow resolves a models:/<id> URI in the process's default store whatever
            # tracking_uri says: look the logged model up in ours first.
            uri = run.data.tags["model_uri"]
            model_id = uri.removeprefix("models:/")
            if uri.startswith("models:/") and "/" not in model_id:
                uri = self.client.get_logged_model(model_id).artifact_location
            local = Path(mlflow.artifacts.download_artifacts(
                uri, dst_path=str(self.folder / run_id),
                tracking_uri=self.client.tracking_uri))
            self.loaded[run_id] = inference.Predictor.load(
                local / "artifacts" / inference.MODEL_FILE,
                local / "artifacts" / inference.MODEL_INFO)
        return self.loaded[run_id]


def image_path(run: Run, file: str) -> Path:
    """Where a predictions row's image is: its path, or under the run's data.root."""
    path = Path(file)
    return path if path.is_absolute() else Path(run.data.params.get("data.root", ".")) / path


def _panel(client: MlflowClient, models: _Models, group: Scored, index: int,
           predictions: Mapping[str, Path]) -> Panel:
    from experiments.data.decode import load_image

    file, run = group.files[index], group.runs[0]
    negative, positive = group.classes
    p, decided = float(group.score[index]), positive if group.decision[index] else negative
    source = scoring_run(client, run, predictions[run.info.run_id], file)
    what = "its model" if source is run else (
        f"its fold model (repeat {source.data.tags.get('cv_repeat', '1')}, fold "
        f"{source.data.tags['cv_fold']})")
    if len(group.runs) > 1:
        what += f" (of the first of {len(group.runs)} runs)"
    path = image_path(source, file)
    if not path.is_file():
        return Panel(group.key, p, decided, None, f"no image at {path}")
    if "model_uri" not in source.data.tags:
        return Panel(group.key, p, decided, None, f"run {source.info.run_id} logged no model")
    predictor = models.get(source)
    image = load_image(path, predictor.info.image_size)
    try:
        heatmap = gradcam.gradcam(predictor.model, image[None].astype(np.float32))[0]
    except ValueError as error:  # a model that is not a chain of layers: say so in the tile
        return Panel(group.key, p, decided, None, f"no Grad-CAM: {error}")
    overlay = gradcam.overlay_image(image, heatmap, f"{group.key}: p({positive}) {p:.2f}")
    buffer = io.BytesIO()
    overlay.save(buffer, format="PNG")
    return Panel(group.key, p, decided, buffer.getvalue(),
                 f"Grad-CAM of {what}, for the class it predicts")


def gallery(client: MlflowClient, scored: Sequence[Scored], predictions: Mapping[str, Path],
            count: int, models_folder: Path, output: Path | None = None) -> list[Tile]:
    """Tiles of the images the paired groups (`paired_groups`) disagree on (`disagreements`),
    each with every such group's Grad-CAM; with `output`, each overlay is also written there
    as a PNG."""
    models = _Models(client, models_folder)
    scored = paired_groups(scored)
    tiles = []
    for index in disagreements(scored, count):
        first = scored[0]
        truth = first.classes[1] if first.truth[index] else first.classes[0]
        panels = tuple(_panel(client, models, group, index, predictions) for group in scored)
        tiles.append(Tile(first.files[index], truth, panels))
        if output is not None:
            output.mkdir(parents=True, exist_ok=True)
            for number, panel in enumerate(panels):
                if panel.png is not None:
                    (output / f"{len(tiles):02d}_{number}_{verdict.slug(panel.group)}.png"
                     ).write_bytes(panel.png)
    return tiles


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _interval(row: Mapping[str, Any], name: str) -> str:
    return (f"{row[name]:+.3f} [{row[f'{name}_low']:+.3f}, {row[f'{name}_high']:+.3f}]")


def verdict_table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The verdict rows as table cells: effects with intervals first, p-values beside."""
    header = ["a - b", "images", "AUC a", "AUC b", "ΔAUC [95% CI]", "p DeLong (Holm)",
              "accuracy a", "accuracy b", "Δaccuracy [95% CI]", "p McNemar (Holm)",
              "only a right / only b right", "p corrected t (per-fold AUC)"]
    cells = [[f"{row['a']} - {row['b']}", str(row["n_images"]), f"{row['auc_a']:.3f}",
              f"{row['auc_b']:.3f}", _interval(row, "delta_roc_auc"),
              f"{row['p_delong']:.3g} ({row['p_delong_holm']:.3g})",
              f"{row['accuracy_a']:.3f}", f"{row['accuracy_b']:.3f}",
              _interval(row, "delta_accuracy"),
              f"{row['p_mcnemar']:.3g} ({row['p_mcnemar_holm']:.3g})",
              f"{row['only_a_right']} / {row['only_b_right']}",
              f"{row['p_corrected_roc_auc']:.3g}" if "p_corrected_roc_auc" in row else "-"]
             for row in rows]
    return header, cells


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; }
th { background: #f3f3f3; }
.figures img { max-width: 48%; margin: .5em 1% .5em 0; vertical-align: top; }
.tile { border: 1px solid #ddd; margin: 1em 0; padding: .5em; }
.panels { display: flex; flex-wrap: wrap; gap: 1em; }
.panel img { max-width: 100%; } .panel { max-width: 480px; font-size: .85em; }
.muted { color: #666; font-size: .9em; }
"""


def write_html(path: Path, title: str, summary: tuple[Sequence[str], Sequence[Sequence[str]]],
               rows: Sequence[Mapping[str, Any]], refused: Sequence[str],
               plots: Sequence[tuple[str, Path]], tiles: Sequence[Tile],
               groups: Sequence[Scored]) -> Path:
    """report.html: the verdict, the summary table, the figures and the gallery, one file."""
    names = ", ".join(group.key for group in groups) or "none"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='muted'>Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
             f"Configurations: {html.escape(names)}.</p>",
             "<h2>Paired verdict</h2>",
             "<p>Every two configurations tested on the same images, paired image by image: "
             f"the effect (a - b) with a 95% paired bootstrap interval ({verdict.RESAMPLES} "
             "resamples), DeLong's test for ROC-AUC, McNemar's exact test for accuracy at each "
             "model's decisions; p-values Holm-corrected over all pairs in brackets.</p>",
             "<ul>" + "".join(f"<li>{html.escape(verdict.sentence(dict(row)))}</li>"
                              for row in rows)
             + "".join(f"<li>not paired: {html.escape(reason)}</li>" for reason in refused)
             + ("" if rows or refused else "<li>fewer than two configurations</li>") + "</ul>"]
    if rows:
        parts.append(_table(*verdict_table(rows)))
    parts += ["<h2>Each configuration</h2>",
              "<p>Test metrics of each run's model (a cross-validation: its pooled out-of-fold "
              "predictions); mean ± std over the runs of a configuration.</p>",
              _table(*summary), "<h2>Figures</h2><div class='figures'>"]
    parts += [_img(plot.read_bytes(), caption) for caption, plot in plots if plot.is_file()]
    parts.append("</div><h2>Where the models disagree</h2>")
    if not tiles:
        parts.append("<p>No image on which the configurations' decisions differ (or fewer "
                     "than two configurations tested on the same images).</p>")
    for tile in tiles:
        parts.append(f"<div class='tile'><b>{html.escape(tile.file)}</b>: true class "
                     f"<b>{html.escape(tile.truth)}</b><div class='panels'>")
        for panel in tile.panels:
            picture = _img(panel.png, f"{panel.group} Grad-CAM") if panel.png else ""
            parts.append(f"<div class='panel'>{picture}<br><b>{html.escape(panel.group)}</b>: "
                         f"p = {panel.p_positive:.3f}, decides "
                         f"<b>{html.escape(panel.decision)}</b><br><span class='muted'>"
                         f"{html.escape(panel.note)}</span></div>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
