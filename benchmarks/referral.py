"""What the out-of-distribution referral costs a prediction: `Predictor.score` images per
second with and without the model's ood reference, with and without dihedral TTA, for a
backbone at its input size (random weights: the cost depends on the architecture only).

    python benchmarks/referral.py                          # densenet121 at 224 px, 64 images
    python benchmarks/referral.py --backbone simplecnn --size 64 --images 32   # seconds

The reference needs the pooled features of each image's plain view and a nearest-neighbour
search against the training images' features; the features come with the probabilities from
the same pass (a model with two outputs), so the search is all it adds.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from machine import cpu_line

from experiments.models.classifier import build_classifier
from experiments.serving import export
from experiments.serving.inference import ModelInfo, Predictor, in_memory


def images_per_second(predictor: Predictor, images: np.ndarray, repeats: int) -> float:
    """`Predictor.score`'s model work: probabilities and, with a reference, the scores (one
    pass over the views for both when the model allows, `probabilities_and_scores`)."""
    predictor.probabilities_and_scores(images)  # trace and warm up, at the size timed
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.probabilities_and_scores(images)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="densenet121")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--reference", type=int, default=200, help="training images")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    model = in_memory(build_classifier(args.backbone, None, False, args.size, 2))
    images = rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    training = rng.integers(0, 256, (args.reference, args.size, args.size, 3), dtype=np.uint8)
    reference = export.ood_reference(model, training, 0.95, seed=0)
    print(cpu_line())
    print(f"\n{args.backbone} at {args.size} px, {args.images} images, reference of "
          f"{args.reference} training images; best of {args.repeats}\n")
    print("| TTA | without referral (img/s) | with referral (img/s) | ratio |")
    print("|---|---|---|---|")
    for tta in ("none", "dihedral"):
        plain = Predictor(model, ModelInfo(("benign", "malignant"), args.size, tta))
        referred = dataclasses.replace(plain, ood=reference)
        without = images_per_second(plain, images, args.repeats)
        with_ood = images_per_second(referred, images, args.repeats)
        print(f"| {tta} | {without:.1f} | {with_ood:.1f} | {with_ood / without:.2f} |")


if __name__ == "__main__":
    main()
