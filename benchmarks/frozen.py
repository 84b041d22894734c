"""The frozen-feature fast path: a backbone comparison the way pathology papers make it.

    python benchmarks/frozen.py                        # DenseNet201 vs ResNet50, 224 px, 5 folds
    python benchmarks/frozen.py --weights imagenet     # with cached ImageNet weights

One command, timed end to end (features, heads, evaluation, report):
`python -m experiments.run -m backbone=densenet201,resnet50 finetune=frozen augmentation=dihedral
cv.folds=5` on the study's 200 images - every fold of a backbone reads the features its first
fold cached. Then, from the runs: the seconds of a head epoch on cached features against a full
fine-tuning epoch of the same backbone on the same 120 training images (one epoch of
`finetune=full`, measured in the same session).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "biopsy-seed" / "train"
BACKBONES = ("densenet201", "resnet50")


def experiments_run(args: list[str], work: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=work,
                            capture_output=True, text=True,
                            env={"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"})
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return time.perf_counter() - start


def epoch_seconds(client: MlflowClient, experiment: str, backbone: str) -> list[float]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id],
                              f"tags.backbone = '{backbone}' and tags.cv_fold != ''")
    return [m.value for r in runs for m in client.get_metric_history(r.info.run_id,
                                                                     "epoch_seconds")
            if m.step > 1]  # later epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--weights", default="null")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from overhead import cpu_line

    common = [f"data.root={args.data.resolve()}", f"data.image_size={args.image_size}",
              f"backbone.weights={args.weights}", "trainer.verbose=0",
              "trainer.batch_size=16"]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        sweep = experiments_run(["-m", f"backbone={','.join(BACKBONES)}", "finetune=frozen",
                                 "augmentation=dihedral", f"cv.folds={args.folds}",
                                 f"trainer.epochs={args.epochs}", f"paths.root={work}",
                                 "mlflow.experiment_name=frozen", *common], work)
        full = {}
        for backbone in BACKBONES:
            experiments_run([f"backbone={backbone}", "finetune=full", "augmentation=dihedral",
                             "trainer.epochs=2", "eval.tta=none", "eval.gradcam_images=0",
                             f"paths.root={work}", "mlflow.experiment_name=full", *common],
                            work)
        client = MlflowClient(f"sqlite:///{work}/mlruns/mlflow.db")
        for backbone in BACKBONES:
            full[backbone] = epoch_seconds_single(client, "full", backbone)
        print(cpu_line())
        print(f"{args.image_size} px, {args.folds}-fold CV x {len(BACKBONES)} backbones, "
              f"weights {args.weights}, {args.epochs} head epochs per fold\n")
        print(f"Whole comparison (one command, features + heads + evaluation + report): "
              f"{sweep / 60:.1f} min\n")
        print("| backbone | head epoch on cached features (s) | full fine-tuning epoch (s) | "
              "ratio |\n|---|---|---|---|")
        for backbone in BACKBONES:
            head = sorted(epoch_seconds(client, "frozen", backbone))
            median = head[len(head) // 2]
            print(f"| {backbone} | {median:.3f} | {full[backbone]:.1f} | "
                  f"{full[backbone] / median:.0f}x |")
        for report in (work / "outputs" / "multirun").glob("*/*/comparison/comparison.md"):
            print(f"\nThe sweep's comparison report (pooled out-of-fold metrics):\n\n"
                  f"{report.read_text()}")


def epoch_seconds_single(client: MlflowClient, experiment: str, backbone: str) -> float:
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id], f"tags.backbone = '{backbone}'")
    history = sorted(client.get_metric_history(run.info.run_id, "epoch_seconds"),
                     key=lambda m: m.step)
    return history[-1].value  # the second epoch: no graph tracing in it


if __name__ == "__main__":
    main()
