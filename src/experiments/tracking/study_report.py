"""The study report: one self-contained HTML file (`report.html`) that a person opens - the
paired verdict, the summary table, ROC curves with bootstrap bands, calibration, and a Grad-CAM
gallery of the images the models disagree on. Every figure is inlined (base64 PNG) and the
style is in the file, so the file alone is the report: mail it, or open it from the sweep's
parent run in the MLflow UI.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from experiments.evaluation import figures, stats
from experiments.tracking import gallery, verdict
from experiments.tracking.verdict import Scored

matplotlib.use("Agg")

GALLERY_IMAGES = gallery.IMAGES
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
               plots: Sequence[tuple[str, Path]], tiles: Sequence[gallery.Tile],
               groups: Sequence[Scored], warnings: Sequence[str]) -> Path:
    """report.html: the verdict, the summary table, the figures and the gallery, one file;
    `warnings` (runs that rank a cohort backwards) first."""
    names = ", ".join(group.key for group in groups) or "none"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='muted'>Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
             f"Configurations: {html.escape(names)}.</p>",
             *([("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(line)}</li>"
                                                  for line in warnings) + "</ul>")]
               if warnings else []),
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
