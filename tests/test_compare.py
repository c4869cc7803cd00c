"""scripts/compare_2d_3d.py: identical folds, numbers read from the run folders, the paired difference."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from petmonai.config import default_config_path, load_config
from petmonai.errors import PetmonaiError
from petmonai.evaluation import paired_auc_difference
from petmonai.models import build_model, count_parameters


def test_paired_difference_of_a_model_with_itself_is_zero():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    p = rng.random(40)
    d = paired_auc_difference(y, p, p, [f"s{i}" for i in range(40)], n_boot=200)
    assert d["value"] == 0 and d["ci_low"] == 0 and d["ci_high"] == 0


def test_paired_difference_sign_and_grouping():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 30)
    good, noise = y + rng.normal(0, 0.5, 60), rng.random(60)
    subjects = [f"s{i // 2}" for i in range(60)]  # two scans per subject
    d = paired_auc_difference(y, good, noise, subjects, n_boot=500)
    assert d["value"] == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, noise))
    assert d["ci_low"] > 0 and d["n_units"] == 30
    back = paired_auc_difference(y, noise, good, subjects, n_boot=500)
    assert back["value"] == pytest.approx(-d["value"]) and back["ci_high"] < 0
    folds = np.tile([0, 1], 30)
    g = paired_auc_difference(y, good, noise, subjects, groups=folds, n_boot=50)
    per_fold = [roc_auc_score(y[folds == f], good[folds == f]) - roc_auc_score(y[folds == f], noise[folds == f])
                for f in (0, 1)]
    assert g["value"] == pytest.approx(np.mean(per_fold))


def test_models_option():
    from petmonai.studies import parse_models

    assert parse_models("reference,2d,3d") == ["3d", "2d", "reference"]
    with pytest.raises(PetmonaiError, match="unknown"):
        parse_models("3d,4d")
    with pytest.raises(PetmonaiError, match="at least one"):
        parse_models("reference")


@pytest.mark.slow
def test_quick_comparison_end_to_end(tiny_cohort, tmp_path, capsys):
    from petmonai.commands import compare_main

    out = tmp_path / "cmp"
    assert compare_main(["--data-root", str(tiny_cohort), "--quick", "--max-epochs", "1", "--folds", "2",
                         "--models", "3d,2d,reference", "--output-dir", str(out), "--device", "cpu"]) == 0
    assert "# 2D vs 3D comparison" in capsys.readouterr().out
    runs = {k: out / "subject" / k for k in ("3d", "2d")}
    folds = {k: pd.read_csv(r / "folds.csv", dtype={"scan_id": str}) for k, r in runs.items()}
    cols = ["repeat", "fold", "scan_id", "role"]
    pd.testing.assert_frame_equal(folds["3d"][cols], folds["2d"][cols])  # identical folds
    summary = json.loads((out / "comparison.json").read_text())
    table = {m["name"]: m for m in summary["results"]["subject"]["models"]}
    assert set(table) == {"3D CNN", "2D CNN", "PCA + LR reference"}
    for name, folder in (("3D CNN", runs["3d"]), ("2D CNN", runs["2d"]), ("PCA + LR reference", runs["3d"] / "reference")):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert table[name]["roc_auc"] == metrics["pooled_ci"]["roc_auc"]  # the run folder's own numbers
    for name, config in (("3D CNN", "train3d.yaml"), ("2D CNN", "train2d.yaml")):  # each run's own network
        assert table[name]["parameters"] == count_parameters(build_model(load_config(default_config_path(config))["model"]))
    assert not (runs["2d"] / "reference").exists()  # the reference is fitted once per protocol
    diff = summary["results"]["subject"]["differences"][0]
    a = pd.read_csv(runs["3d"] / "oof_predictions.csv", dtype={"scan_id": str})
    b = pd.read_csv(runs["2d"] / "oof_predictions.csv", dtype={"scan_id": str}).set_index("scan_id").loc[a["scan_id"]]
    assert diff["value"] == pytest.approx(roc_auc_score(a["label"], a["prob_mci"]) - roc_auc_score(b["label"], b["prob_mci"]))
    md = (out / "comparison.md").read_text()
    assert f"{table['3D CNN']['roc_auc']['value']:.2f}" in md and "3D CNN - 2D CNN" in md
    assert (out / "comparison.png").stat().st_size > 1000
    # a second call reuses the finished runs (resumable comparison)
    mtime = (runs["3d"] / "metrics.json").stat().st_mtime
    assert compare_main(["--data-root", str(tiny_cohort), "--quick", "--max-epochs", "1", "--folds", "2",
                         "--models", "3d,2d,reference", "--output-dir", str(out), "--device", "cpu"]) == 0
    assert (runs["3d"] / "metrics.json").stat().st_mtime == mtime
