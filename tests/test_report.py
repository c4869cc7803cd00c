"""report.md and figures from a small synthetic (fake) run folder."""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from petmonai.evaluation import evaluate_cv, scored_predictions
from petmonai.evaluation import build_report
from petmonai.data import make_folds

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ["## Data audit: read this first", "## Protocol", "## Results: 3D CNN and the reference model",
            "## Figures", "## Per-fold results", "## Per-site results", "## Training curves", "## How to read this"]


def _datalist() -> pd.DataFrame:
    rows = []
    for i in range(12):
        site = ["031", "035", "099"][i % 3]
        rows.append({"scan_id": f"MCI/{i}", "uuid": str(i), "image": f"/nowhere/MCI/{i}.nii.gz", "split": "train",
                     "class_name": "MCI", "label": 1, "subject": f"{site}_S_{i:04d}", "site": site})
    for i in range(10):
        site = ["005", "011"][i % 2]
        subj = i // 2 if i < 4 else i  # NC subjects 0 and 1 have two scans each
        rows.append({"scan_id": f"NC/{i}", "uuid": str(i), "image": f"/nowhere/NC/{i}.nii.gz", "split": "train",
                     "class_name": "NC", "label": 0, "subject": f"{site}_S_{subj:04d}", "site": site})
    return pd.DataFrame(rows)


def _write_model(folder: Path, datalist, folds, protocol, seed, threshold, with_history=False):
    rng = np.random.default_rng(seed)
    label = datalist.set_index("scan_id")["label"]
    rows, info = [], []
    for (repeat, fold), part in folds.groupby(["repeat", "fold"]):
        for role in ("val", "test"):
            ids = part.loc[part["role"] == role, "scan_id"].tolist()
            probs = np.clip(0.35 + 0.3 * label.loc[ids].to_numpy() + rng.normal(0, 0.2, len(ids)), 0.01, 0.99)
            rows.append(pd.DataFrame({"repeat": repeat, "fold": fold, "role": role, "scan_id": ids, "prob_mci": probs}))
        info.append({"repeat": repeat, "fold": fold, "best_epoch": 2, "epochs_run": 3})
        if with_history:
            fold_dir = folder / f"fold_{fold}"
            fold_dir.mkdir(parents=True)
            pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [0.7, 0.6, 0.5], "val_auc": [0.5, 0.7, 0.6],
                          "lr": [3e-4] * 3, "seconds": [1.0] * 3}).to_csv(fold_dir / "history.csv", index=False)
    preds = pd.concat(rows, ignore_index=True)
    metrics = evaluate_cv(preds, datalist, protocol, threshold, info if with_history else None, n_boot=100)
    test = scored_predictions(preds[preds["role"] == "test"], metrics).merge(datalist, on="scan_id")
    folder.mkdir(parents=True, exist_ok=True)
    test.drop(columns=["role"]).to_csv(folder / "oof_predictions.csv", index=False)
    preds[preds["role"] == "val"].to_csv(folder / "val_predictions.csv", index=False)
    (folder / "metrics.json").write_text(json.dumps(metrics))


def fake_run(run_dir: Path, protocol: str = "subject", threshold=0.5, reference: bool = True) -> Path:
    """A finished run folder as train3d.py leaves it, with made-up predictions (no training)."""
    datalist = _datalist()
    folds = make_folds(datalist, protocol, n_folds=3, seed=0, allow_leaky=True)
    run_dir.mkdir(parents=True)
    datalist.to_csv(run_dir / "datalist.csv", index=False)
    folds.to_csv(run_dir / "folds.csv", index=False)
    _write_model(run_dir, datalist, folds, protocol, 0, threshold, with_history=True)
    if reference:
        _write_model(run_dir / "reference", datalist, folds, protocol, 1, threshold)
    (run_dir / "audit.json").write_text(json.dumps({
        "train": {"scans": 22, "subjects": 20, "classes": {"NC": 10, "MCI": 12}},
        "warnings": ["WARNING: site and class are confounded: no site holds both NC and MCI"],
        "notes": ["NOTE: 2 subjects have more than one scan"]}))
    (run_dir / "provenance.json").write_text(json.dumps({"command": "train3d.py --fake", "synthetic_data": False}))
    return run_dir


def _check_pngs(run_dir: Path, names):
    for name in names:
        data = (run_dir / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
    assert not list(run_dir.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_report_of_a_subject_run(tmp_path):
    run = fake_run(tmp_path / "run")
    path = build_report(run)
    text = path.read_text()
    for section in SECTIONS:
        assert section in text, section
    assert text.index("WARNING: site and class are confounded") < text.index("## Results")  # audit first
    assert "3D CNN" in text and "PCA + LR reference" in text  # side by side
    assert "95% CI" in text and "resampling" in text
    assert "Macro F1 (challenge score)" in text
    assert "LEAKY PROTOCOL" not in text and "LEAKY pooled" not in text
    _check_pngs(run, ["roc.png", "confusion.png", "calibration.png", "training_curves.png"])
    for name in ("roc.png", "confusion.png", "calibration.png", "training_curves.png"):
        assert f"]({name})" in text


def test_report_of_a_site_pair_run_summarises_folds(tmp_path):
    run = fake_run(tmp_path / "run", "site-pair", threshold="tuned")
    text = build_report(run).read_text()
    assert "mean fold ROC AUC" in text and "not meaningful" in text
    assert "tuned in each fold on its validation subjects" in text
    assert text.count("| 0/") == 6  # 3 MCI sites x 2 NC sites, one row each
    _check_pngs(run, ["roc.png", "confusion.png", "calibration.png"])


def test_report_of_a_scan_run_is_labelled_leaky(tmp_path):
    run = fake_run(tmp_path / "run", "scan", reference=False)
    text = build_report(run).read_text()
    assert text.count("LEAKY") >= 3
    assert (pd.read_csv(run / "oof_predictions.csv")["cv_protocol"] == "scan (LEAKY)").all()
    assert json.loads((run / "metrics.json").read_text())["leaky"] is True
    assert "No reference-model results" in text


def test_report_rebuild_recomputes_old_metrics(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "metrics.json").write_text(json.dumps({"protocol": "subject", "threshold": 0.5}))  # pre-CI format
    text = build_report(run, n_boot=50).read_text()
    assert "recomputed from oof_predictions.csv" in text and "95% CI" in text


def test_report_script_user_errors(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("report_script", Path(__file__).parents[1] / "scripts/report.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "run folder not found" in err[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert script.main([str(empty)]) == 2
    assert "oof_predictions.csv" in capsys.readouterr().err
    run = fake_run(tmp_path / "run")
    assert script.main([str(run), "--no-figures"]) == 0
    assert (run / "report.md").is_file() and not (run / "roc.png").exists()
