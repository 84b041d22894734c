"""What each part of the out-of-distribution score sees: a run's logged model, its reference
refitted on its training folder from the pooled features alone, the stain statistics alone and
both (eval.ood_stain), and each scored against a foreign labeled folder (and a folder of new
same-source images, labels not needed: the share of them referred should be about 1 - coverage).

    python benchmarks/ood_components.py --model <run's model folder>/model.keras \\
        --train ../shared/data/biopsy-seed/train --foreign ../shared/data/breakhis-100x \
        [--same-source ../shared/data/biopsy-seed/unlabeled]

For an ensemble (a cross-validation's parent model), also the members' disagreement: the
spread of their logits (averaged over the model's test-time views) - its threshold and AUROC
from --same-source images, the members having trained on the reference's images.

For each score: the AUROC separating the foreign images from same-source images the reference
did not hold (its K-fold held-out scores, as the run's ext_<name>_ood_auroc), the share of
foreign images referred at the coverage, and the model's accuracy on the ones it accepts. The
model should be one trained on all of --train (a cross-validation's parent run, or a probe
refitted on the folder); its own decisions (threshold, temperature, TTA) are used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import keras
import numpy as np
from machine import cpu_line, print_table
from sklearn.metrics import roc_auc_score

from experiments.serving import export
from experiments.serving.inference import Predictor
from experiments.serving.ood import (
    StainReference,
    euclidean_knn_distance,
    fit_reference,
    held_out_distances,
    reference_folds,
    stain_statistics,
)
from experiments.serving.views import predict_probabilities

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


def image_files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES)


def labeled_files(root: Path) -> tuple[list[str], list[str]]:
    """Image files under root/<class>/ and their class names."""
    files = image_files(root, "*/*")
    return [str(p) for p in files], [p.parent.name for p in files]


def decoded(predictor: Predictor, files: list[str]) -> np.ndarray:
    images, errors = predictor.decode(files, files)
    if images is None or errors:
        raise SystemExit(f"unreadable images: {sorted(errors.values())[:3]}")
    return images


def stain_only(train: np.ndarray, foreign: np.ndarray, same: np.ndarray, coverage: float,
               k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Held-out and foreign distances of the stain statistics alone, their threshold (the
    folds `fit_reference` draws for the same seed), and the same-source images' distances."""
    reference = StainReference.of(stain_statistics(train))
    held_out = held_out_distances(reference.statistics, euclidean_knn_distance, k,
                                  reference_folds(len(train), seed=seed))
    scores = reference.distance(stain_statistics(foreign), k)
    return (held_out, scores, float(np.quantile(held_out, coverage)),
            reference.distance(stain_statistics(same), k))


def disagreement(predictor: Predictor, images: np.ndarray) -> np.ndarray | None:
    """The standard deviation over an ensemble's members of each image's logit p(positive)
    (each member's probabilities averaged over the model's test-time views); None for a
    model without members."""
    members = [layer for layer in predictor.model.layers if isinstance(layer, keras.Model)]
    if len(members) < 2:
        return None
    names = predictor.info.class_names
    positive = names.index(predictor.info.positive_class or names[-1])
    p = np.clip([predict_probabilities(m, images, 32, predictor.info.tta)[:, positive]
                 for m in members], 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p)).std(axis=0)


def row(name: str, held_out: np.ndarray, scores: np.ndarray, threshold: float,
        correct: np.ndarray, same: np.ndarray) -> list[str]:
    truth = np.r_[np.zeros(len(held_out)), np.ones(len(scores))]
    auroc = roc_auc_score(truth, np.r_[held_out, scores])
    accepted = scores <= threshold
    accuracy = f"{correct[accepted].mean():.3f}" if accepted.any() else "-"
    same_referred = f"{np.mean(same > threshold):.3f}" if len(same) else "-"
    return [name, f"{auroc:.3f}", f"{1 - accepted.mean():.3f}", str(int(accepted.sum())),
            accuracy, same_referred]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a logged model.keras")
    parser.add_argument("--train", type=Path, required=True, help="its training folder")
    parser.add_argument("--foreign", type=Path, required=True, help="a labeled folder")
    parser.add_argument("--same-source", type=Path, default=None,
                        help="new images of the training source (any folder layout)")
    parser.add_argument("--coverage", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    predictor = Predictor.load(args.model)
    train = decoded(predictor, labeled_files(args.train)[0])
    foreign_files, labels = labeled_files(args.foreign)
    foreign = decoded(predictor, foreign_files)
    same = (decoded(predictor, [str(p) for p in image_files(args.same_source, "**/*")])
            if args.same_source else train[:0])
    names = predictor.info.class_names
    positive = names.index(predictor.info.positive_class or names[-1])
    p = predictor.probabilities(foreign)[:, positive]
    threshold = predictor.info.threshold if predictor.info.threshold is not None else 0.5
    answers = np.where(p >= threshold, names[positive], names[1 - positive])
    correct = answers == np.array(labels)
    train_features, foreign_features, same_features = (
        export.pooled_features(predictor.model, images) for images in (train, foreign, same))
    if train_features is None or foreign_features is None:
        raise SystemExit(f"{args.model} has no pooled features to refer by")
    rows = []
    for label, stain in (("pooled features", None), ("features + stain", train)):
        reference = fit_reference(train_features, args.coverage, seed=args.seed, images=stain)
        same_scores = (reference.score(same_features, same) if len(same) else np.empty(0))
        rows.append(row(label, reference.held_out, reference.score(foreign_features, foreign),
                        reference.threshold, correct, same_scores))
    held_out, scores, threshold, same_scores = stain_only(train, foreign, same, args.coverage,
                                                          seed=args.seed)
    rows.insert(1, row("stain statistics", held_out, scores, threshold, correct, same_scores))
    spread_same = disagreement(predictor, same) if len(same) else None
    if spread_same is not None:
        spread = disagreement(predictor, foreign)
        rows.append(row("members' disagreement (against --same-source)", spread_same, spread,
                        float(np.quantile(spread_same, args.coverage)), correct, spread_same))
    print(cpu_line())
    print(f"\n{args.model}: reference {len(train)} images of {args.train}, foreign "
          f"{len(foreign)} of {args.foreign}; coverage {args.coverage}; accuracy of all "
          f"foreign images {correct.mean():.3f}\n")
    print_table(["score", "AUROC foreign vs held-out", "foreign referred", "accepted",
                 "accuracy on accepted", f"same source referred ({len(same)})"], rows)


if __name__ == "__main__":
    main()
