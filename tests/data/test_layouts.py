"""Data sets laid out like BreakHis: class folders several levels deep, magnification in the
path, the patient in the file name."""

from __future__ import annotations

from pathlib import Path

from experiments.run import run
from tests.conftest import all_runs, client_for, read_csv, write_image

TUMOURS = {"benign": ("B", ["adenosis", "fibroadenoma"]),
           "malignant": ("M", ["ductal_carcinoma", "lobular_carcinoma"])}


def breakhis_tree(root: Path, patients_per_tumour: int = 2, images: int = 3) -> None:
    """<class>/SOB/<tumour>/SOB_<B|M>_<T>_14-<id>/<mag>X/SOB_<B|M>_<T>-14-<id>-<mag>-<n>.png"""
    seed = 0
    for label, (letter, tumours) in TUMOURS.items():
        for tumour in tumours:
            code = "".join(word[0].upper() for word in tumour.split("_"))
            for _ in range(patients_per_tumour):
                pid = f"14-{1000 + seed}"
                folder = root / label / "SOB" / tumour / f"SOB_{letter}_{code}_{pid}"
                for magnification in (40, 200):
                    for n in range(images):
                        seed += 1
                        write_image(folder / f"{magnification}X" /
                                    f"SOB_{letter}_{code}-{pid}-{magnification}-{n:03d}.png",
                                    seed=seed)


def test_breakhis_layout_one_magnification_patients_kept_together(tmp_path, make_config):
    root = tmp_path / "BreaKHis"
    breakhis_tree(root)
    run(make_config("data=folder", f"data.root={root}", "data.include_pattern=/200X/",
                    "data.group_pattern='SOB_[BM]_[A-Z]+-(\\d+-\\d+)-'", "trainer.epochs=1",
                    "eval.tta=none", "mlflow.experiment_name=breakhis"))
    client = client_for(tmp_path)
    (finished,) = all_runs(client, "breakhis")
    assert finished.data.tags["classes"] == "benign,malignant"
    rows = read_csv(client, finished.info.run_id, "splits.csv", tmp_path / "dl")
    assert len(rows) == 24  # 2 classes x 2 tumours x 2 patients x 3 images, 200X only
    assert all("/200X/" in r["file"] and "-200-" in r["file"] for r in rows)
    assert {r["label"] for r in rows if "/benign/" in r["file"]} == {"benign"}
    split_of = {}
    for row in rows:  # a patient's images all sit in one split
        assert split_of.setdefault(row["group"], row["split"]) == row["split"]
    assert len(split_of) == 8
    # patient-level test metrics: the mean probability of each test patient's images
    metrics = finished.data.metrics
    test_patients = {r["group"] for r in rows if r["split"] == "test"}
    assert metrics["test_n_patients"] == len(test_patients)
    assert (metrics["test_patient_accuracy_ci_low"] <= metrics["test_patient_accuracy"]
            <= metrics["test_patient_accuracy_ci_high"])
