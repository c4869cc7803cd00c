"""The PCA + logistic-regression reference model: same folds, same output formats, README figures."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from petmonai.config import load_config
from petmonai.errors import ConfigError
from petmonai.evaluation import build_reference_model, reference_features, reference_settings, run_reference_cv
from petmonai.data import make_folds

REAL_DATA = Path(__file__).parents[1] / "../shared/data/pet2023"


def _cfg(**report):
    cfg = load_config()
    cfg["report"] = {**cfg.get("report", {}), "bootstrap": 100, **report}
    return cfg


def _toy(n_per_class=10, n_voxels=300, seed=0):
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    for label in (0, 1):
        for i in range(n_per_class):
            sid = f"{'MCI' if label else 'NC'}/{i}"
            subject = f"{'m' if label else 'n'}{i // 2 if not label else i}"  # NC subjects scanned twice
            rows.append({"scan_id": sid, "label": label, "subject": subject, "site": f"s{label}{i % 2}",
                         "uuid": str(i), "image": f"/nowhere/{sid}.nii.gz", "class_name": "MCI" if label else "NC"})
            feats.append(rng.normal(0, 1, n_voxels) + 0.8 * label * np.linspace(0, 1, n_voxels))
    datalist = pd.DataFrame(rows)
    features = pd.DataFrame(np.array(feats, dtype=np.float32), index=pd.Index(datalist["scan_id"], name="scan_id"))
    return datalist, features


@pytest.mark.parametrize("protocol", ["subject", "site-pair"])
def test_reference_cv_writes_the_cnn_formats(tmp_path, protocol):
    datalist, features = _toy()
    folds = make_folds(datalist, protocol, n_folds=3, seed=0)
    out = tmp_path / "reference"
    result = run_reference_cv(_cfg(), datalist, folds, out, protocol=protocol, features=features)
    oof = pd.read_csv(out / "oof_predictions.csv", dtype={"scan_id": str})
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "val_predictions.csv").is_file()
    for column in ("repeat", "fold", "scan_id", "prob_mci", "threshold", "pred_label", "label", "subject", "site"):
        assert column in oof.columns, column
    test = folds[folds["role"] == "test"]
    assert sorted(zip(oof["fold"], oof["scan_id"])) == sorted(zip(test["fold"], test["scan_id"]))
    assert metrics["protocol"] == protocol and metrics["model"].startswith("PCA + logistic regression")
    assert {"headline", "pooled", "pooled_ci", "fold_summary", "per_fold", "per_site"} <= set(metrics)
    assert len(metrics["per_fold"]) == folds[["repeat", "fold"]].drop_duplicates().shape[0]
    assert result["metrics"]["fold_summary"]["roc_auc"]["mean"] > 0.7  # a real signal is found


def test_reference_never_fits_on_test_scans():
    datalist, features = _toy()
    folds = make_folds(datalist, "subject", n_folds=3, seed=0)
    base = run_reference_cv(_cfg(), datalist, folds, None, features=features)["predictions"]
    fold0_test = folds[(folds["fold"] == 0) & (folds["role"] == "test")]["scan_id"].tolist()
    # the labels of a fold's test scans never reach its model
    flipped = datalist.copy()
    flipped.loc[flipped["scan_id"].isin(fold0_test), "label"] ^= 1
    after = run_reference_cv(_cfg(), flipped, folds, None, features=features)["predictions"]
    key = ["fold", "scan_id"]
    merged = base.merge(after, on=key, suffixes=("", "_after"))
    fold0 = merged[merged["fold"] == 0]
    assert np.allclose(fold0["prob_mci"], fold0["prob_mci_after"])
    # nor do their voxels: changing one test scan changes its own prediction only
    wrecked = features.copy()
    wrecked.loc[fold0_test[0]] += 5.0
    after = run_reference_cv(_cfg(), datalist, folds, None, features=wrecked)["predictions"]
    merged = base.merge(after, on=key, suffixes=("", "_after"))
    others = merged[(merged["fold"] == 0) & (merged["scan_id"] != fold0_test[0])]
    assert np.allclose(others["prob_mci"], others["prob_mci_after"])


def test_tuned_threshold_uses_a_twin_fitted_without_the_validation_scans():
    datalist, features = _toy()
    folds = make_folds(datalist, "subject", n_folds=3, seed=0, val_fraction=0.3)
    cfg = _cfg()
    cfg["train"]["threshold"] = "tuned"
    result = run_reference_cv(cfg, datalist, folds, None, features=features)
    assert result["metrics"]["threshold_mode"] == "tuned"
    val = result["val_predictions"]
    assert len(val) == (folds["role"] == "val").sum()
    assert all(v["source"].startswith(("tuned", "default")) for v in result["metrics"]["fold_thresholds"].values())


def test_settings_and_model():
    assert reference_settings(None)["preprocessing"] == "resample"
    with pytest.raises(ConfigError):
        reference_settings({"reference": {"preprocessing": "magic"}})
    with pytest.raises(ConfigError):
        reference_settings(load_config(overrides=["reference.n_components=0"]))
    model = build_reference_model(reference_settings(None), n_samples=8)
    assert model.named_steps["pca"].n_components == 7  # capped below the number of training scans


def test_resample_features_from_nifti_files(tmp_path):
    """Plain resample: .nii and .nii.gz, 3D and (X, Y, Z, 1), different voxel sizes -> one grid."""
    rows = []
    rng = np.random.default_rng(0)
    for i, (shape, zooms, suffix) in enumerate([((20, 20, 10), (2.0, 2.0, 3.0), ".nii.gz"),
                                                ((16, 16, 12, 1), (2.5, 2.5, 2.5), ".nii")]):
        data = rng.uniform(1, 100, shape).astype(np.float32)
        img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
        path = tmp_path / f"{i}{suffix}"
        nib.save(img, str(path))
        rows.append({"scan_id": f"NC/{i}", "image": str(path), "label": 0})
    cfg = _cfg()
    settings = reference_settings(cfg, grid=[12, 12, 10])
    features = reference_features(cfg, pd.DataFrame(rows), settings)
    assert features.shape == (2, 12 * 12 * 10)
    assert list(features.index) == ["NC/0", "NC/1"]
    assert np.isfinite(features.to_numpy()).all() and (features.to_numpy() > 0).any()


@pytest.fixture(scope="module")
def real_reference():
    from petmonai.data import discover, train_rows

    train = train_rows(discover(REAL_DATA))
    cfg = _cfg()
    features = reference_features(cfg, train)
    return cfg, train, features


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/data/pet2023 is absent")
@pytest.mark.parametrize("protocol, expected", [("subject", 0.84), ("site-pair", 0.39)])
def test_reference_reproduces_the_readme_figures(real_reference, protocol, expected, tmp_path):
    """Data README: ROC AUC ~0.84 subject-grouped 5-fold, ~0.39 site-pair (24 folds), +-0.05."""
    cfg, train, features = real_reference
    folds = make_folds(train, protocol, n_folds=5, seed=int(cfg["seed"]))
    result = run_reference_cv(cfg, train, folds, tmp_path, protocol=protocol, features=features)
    headline = result["metrics"]["headline"]
    if protocol == "site-pair":
        assert headline["n_folds"] == 24 and headline["statistic"] == "mean over folds"
    assert abs(headline["value"] - expected) <= 0.05, headline["text"]
