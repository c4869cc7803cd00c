"""End-to-end training through the command-line entry point, on a tiny synthetic cohort."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from petmonai.commands import train3d_main
from petmonai.config import load_config
from petmonai.data import VolumeCache
from petmonai.training import amp_settings
from petmonai.device import resolve_device
from petmonai.errors import DataError
from petmonai.transforms import build_pipelines


@pytest.fixture(scope="module")
def tiny_run(tiny_cohort, fast_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    args = ["--data-root", str(tiny_cohort), "--output-dir", str(out), "--device", "cpu", "--seed", "1"]
    for o in fast_config:
        args += ["--set", o]
    assert train3d_main(args) == 0
    return out


def test_run_folder_contents(tiny_run):
    for name in ("config.yaml", "provenance.json", "datalist.csv", "audit.md", "audit.json", "folds.csv",
                 "metrics.json", "oof_predictions.csv", "train.log", "fold_0/best_model.pt", "fold_1/best_model.pt",
                 "fold_0/history.csv"):
        assert (tiny_run / name).is_file(), name
    assert any((tiny_run / "fold_0" / "tensorboard").iterdir())
    prov = json.loads((tiny_run / "provenance.json").read_text())
    assert prov["class_mapping"] == {"NC": 0, "MCI": 1}
    assert prov["versions"]["monai"] and prov["versions"]["torch"] and len(prov["data_fingerprint_sha256"]) == 64
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["protocol"] == "subject" and len(metrics["per_fold"]) == 2
    for key in ("roc_auc", "balanced_accuracy", "f1"):
        assert 0.0 <= metrics["pooled"][key] <= 1.0
    oof = pd.read_csv(tiny_run / "oof_predictions.csv")
    assert len(oof) == 12 and oof["scan_id"].is_unique  # every training scan predicted once, out of fold
    assert set(oof["pred_label"]) <= {"NC", "MCI"}
    history = pd.read_csv(tiny_run / "fold_0" / "history.csv")
    assert list(history["epoch"]) == [1, 2]


def test_out_of_fold_scores_are_the_prediction_views(tiny_run):
    """cv.test_views: inference (the default): a held-out scan's out-of-fold P(MCI) is the mean over
    predict.py's views (windows x left-right flips) with its fold's model alone."""
    from petmonai.inference import predict_out_of_fold

    views = json.loads((tiny_run / "metrics.json").read_text())["test_views"]
    assert views["mode"] == "inference" and views["n_flips"] == 2 and views["n_views"] == 2 * views["n_windows"] > 2
    oof = pd.read_csv(tiny_run / "oof_predictions.csv", dtype={"scan_id": str}).set_index("scan_id")
    again = predict_out_of_fold(tiny_run, {"threads": 1, "optimize": "none"}, progress=False)
    means = again.set_index("scan_id")["probs"].apply(np.mean)
    assert len(means) == len(oof)
    np.testing.assert_allclose(oof.loc[means.index, "prob_mci"], means, atol=1e-5)
    report = (tiny_run / "report.md").read_text()
    assert "as `predict.py` scores a new one" in report
    assert "val = training subjects that train too" in report  # keep=last + train_on_val: no epoch chosen


def test_folds_are_subject_grouped(tiny_run):
    folds = pd.read_csv(tiny_run / "folds.csv", dtype=str)
    for _, part in folds.groupby(["repeat", "fold"]):
        fit = set(part.loc[part["role"] != "test", "subject"])
        assert not fit & set(part.loc[part["role"] == "test", "subject"])


def test_existing_run_not_overwritten(tiny_run, tiny_cohort, capsys):
    code = train3d_main(["--data-root", str(tiny_cohort), "--output-dir", str(tiny_run)])
    assert code == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err and "Traceback" not in err
    assert (tiny_run / "metrics.json").is_file()


def test_overwrite_keeps_the_earlier_run_until_the_new_one_finishes(tiny_cohort, fast_config, tmp_path, capsys):
    from petmonai.runs import replaced_run_path

    run, empty = tmp_path / "run", tmp_path / "no_scans"
    run.mkdir()
    empty.mkdir()
    (run / "metrics.json").write_text("{}")  # an earlier run
    code = train3d_main(["--data-root", str(empty), "--output-dir", str(run), "--overwrite", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert "back as it was" in captured.out + captured.err  # the new run failed after setting the old one aside
    assert (run / "metrics.json").read_text() == "{}" and not replaced_run_path(run).exists()
    args = ["--data-root", str(tiny_cohort), "--output-dir", str(run), "--overwrite", "--device", "cpu"]
    for o in [*fast_config, "train.max_epochs=1", "report.reference_model=false"]:
        args += ["--set", o]
    assert train3d_main(args) == 0
    assert json.loads((run / "metrics.json").read_text())["protocol"] == "subject"
    assert not replaced_run_path(run).exists()


def test_bad_option_is_one_line_error(tiny_cohort, tmp_path, capsys):
    code = train3d_main(["--data-root", str(tiny_cohort), "--output-dir", str(tmp_path / "x"),
                         "--set", "train.nonsense=1"])
    assert code == 2
    assert "train.nonsense" in capsys.readouterr().err


def test_corrupt_volume_named_or_skipped(tiny_cohort, tmp_path, fast_config):
    """A truncated .nii.gz passes the header read but fails decoding: named, or skipped and listed."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_cohort / "Train", root / "Train")
    victim = sorted((root / "Train" / "MCI").iterdir())[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    cfg = load_config(overrides=fast_config)
    preprocess, _ = build_pipelines(cfg)
    items = [{"image": str(p), "label": 1, "scan_id": p.name} for p in sorted((root / "Train" / "MCI").iterdir())]
    with pytest.raises(DataError, match=victim.name):
        VolumeCache(items, preprocess)
    cache = VolumeCache(items, preprocess, skip_bad=True)
    assert len(cache) == len(items) - 1 and cache.skipped[0]["image"] == str(victim)

    out = tmp_path / "run"
    args = ["--data-root", str(root), "--output-dir", str(out), "--skip-bad"]
    for o in fast_config:
        args += ["--set", o]
    assert train3d_main(args) == 0
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped["image"].tolist() == [str(victim)]
    assert len(pd.read_csv(out / "oof_predictions.csv")) == 11


def test_cache_is_not_modified_by_augmentation(tiny_cohort, fast_config):
    cfg = load_config(overrides=fast_config)
    preprocess, augment = build_pipelines(cfg)
    items = [{"image": str(p), "label": 0, "scan_id": p.name} for p in sorted((tiny_cohort / "Train" / "NC").iterdir())]
    cache = VolumeCache(items, preprocess)
    before = cache[items[0]["scan_id"]]["image"].clone()
    ds = cache.subset([items[0]["scan_id"]] * 4, augment)
    for i in range(len(ds)):
        assert tuple(ds[i]["image"].shape[1:]) == tuple(cfg["crop_size"])
    assert torch.equal(cache[items[0]["scan_id"]]["image"], before)


def test_amp_off_on_cpu():
    assert resolve_device("cpu").type == "cpu"
    assert amp_settings(torch.device("cpu"), True) == (False, {})
