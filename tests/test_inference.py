"""The TTA fold ensemble and the submission writer (petmonai.inference.predictor, scripts/predict.py).

A tiny run folder is made once per session by :func:`tiny_run_dir`: a synthetic cohort with a
strong MCI pattern, the package's own preprocessing at 8 mm, a small MONAI ResNet trained for a
few seconds per fold, and the files ``train3d.py`` writes that prediction reads (``config.yaml``,
``datalist.csv``, ``folds.csv``, ``fold_<k>/best_model.pt``, ``metrics.json``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from petmonai.data import read_header
from petmonai.errors import PetmonaiError
from petmonai.inference import collect_inputs, flips_form_group, load_run, parse_flips, predict, predict_out_of_fold, predict_views, preprocess_file, resolve_options, sha256_file, window_starts

REPO = Path(__file__).resolve().parents[1]

TINY_OVERRIDES = ["spacing=[8.0, 8.0, 8.0]", "spatial_size=[24, 28, 24]", "crop_size=[22, 26, 22]", "cv.folds=2"]
TINY_MODEL = {
    "_target_": "monai.networks.nets.ResNet", "block": "basic", "layers": [1, 1, 1, 1],
    "block_inplanes": [8, 16, 32, 64], "spatial_dims": 3, "n_input_channels": 1, "num_classes": 2,
    "conv1_t_size": 3, "conv1_t_stride": 1,
}


def _train_fold(x: torch.Tensor, y: torch.Tensor, crop, seed: int, steps: int = 80) -> dict:
    """A few AdamW steps on random crops and left-right flips (the run's augmentation, in short)."""
    from petmonai.models import build_model

    torch.manual_seed(seed)
    net = build_model(TINY_MODEL)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    margin = [s - c for s, c in zip(x.shape[2:], crop)]
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (8,), generator=gen)
        start = [int(torch.randint(0, m + 1, (1,), generator=gen)) for m in margin]
        xb = x[idx][:, :, start[0]:start[0] + crop[0], start[1]:start[1] + crop[1], start[2]:start[2] + crop[2]]
        if bool(torch.rand(1, generator=gen) < 0.5):
            xb = torch.flip(xb, [2])
        loss = torch.nn.functional.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.state_dict()


def tiny_run_dir(base: Path) -> tuple[Path, Path]:
    """``(run_dir, cohort)``: made on first call, reused afterwards (also by test_saliency.py)."""
    import petmonai.data.synthetic as synthetic
    from petmonai.config import default_config_path, dump_yaml, load_config
    from petmonai.data import discover
    from petmonai.transforms import build_pipelines

    run, cohort = base / "tiny_run", base / "tiny_cohort"
    if (run / "metrics.json").is_file():
        return run, cohort
    # a strong MCI pattern (45-60 % hypometabolism) so that a few seconds of training learn it
    saved = synthetic.MCI_SEVERITY
    synthetic.MCI_SEVERITY = (0.45, 0.60)
    try:
        synthetic.generate_cohort(cohort, n_nc=10, n_mci=10, n_test=12, seed=4)
    finally:
        synthetic.MCI_SEVERITY = saved

    cfg = load_config(default_config_path(), TINY_OVERRIDES)
    cfg["model"] = dict(TINY_MODEL)
    datalist = discover(cohort)
    train = datalist[datalist["split"] == "train"].reset_index(drop=True)
    subjects = train.drop_duplicates("subject").sort_values(["label", "subject"])["subject"].tolist()
    fold_of = {s: i % 2 for i, s in enumerate(subjects)}
    preprocess, _ = build_pipelines(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.stack([torch.as_tensor(preprocess({"image": p})["image"]).float() for p in train["image"]])
        y = torch.as_tensor(train["label"].to_numpy().copy(), dtype=torch.long)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=".tiny_run."))
        rows = []
        for fold in (0, 1):
            test_mask = train["subject"].map(fold_of).to_numpy() == fold
            state = _train_fold(x[~test_mask], y[~test_mask], cfg["crop_size"], seed=fold)
            (tmp / f"fold_{fold}").mkdir()
            torch.save(state, tmp / f"fold_{fold}" / "best_model.pt")
            for rec, is_test in zip(train.itertuples(), test_mask):
                rows.append({"repeat": 0, "fold": fold, "scan_id": rec.scan_id, "subject": rec.subject,
                             "site": rec.site, "label": rec.label, "role": "test" if is_test else "train"})
    finally:
        torch.set_num_threads(threads)
    (tmp / "config.yaml").write_text(dump_yaml(cfg))
    datalist.to_csv(tmp / "datalist.csv", index=False)
    pd.DataFrame(rows).to_csv(tmp / "folds.csv", index=False)
    (tmp / "metrics.json").write_text(json.dumps({"threshold": 0.5, "positive_class": "MCI"}))
    (tmp / "provenance.json").write_text(json.dumps({"git_commit": "test", "data_fingerprint_sha256": "x"}))
    tmp.rename(run)
    return run, cohort


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_run_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def tiny_prediction(tiny, tmp_path_factory):
    run, cohort = tiny
    out = tmp_path_factory.mktemp("pred") / "submission.csv"
    result = predict(run, [cohort / "Test"], out, options={"threads": 1})
    return result, out, cohort


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_script():
    spec = importlib.util.spec_from_file_location("predict_script", REPO / "scripts" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- views


@pytest.mark.parametrize("size,roi,overlap", [(48, 40, 0.5), (56, 48, 0.25), (100, 30, 0.5), (101, 30, 0.5),
                                              (57, 20, 0.0), (40, 40, 0.5), (30, 40, 0.5)])
def test_window_grid_covers_and_is_mirror_symmetric(size, roi, overlap):
    starts = window_starts(size, roi, overlap)
    span = max(0, size - roi)
    assert starts[0] == 0 and starts[-1] == span
    assert sorted(span - s for s in starts) == starts  # mirror-symmetric: flips and windows commute
    assert all(b - a <= max(1, int(roi * (1 - overlap))) for a, b in zip(starts, starts[1:]))  # no gap
    assert window_starts(size, roi, mode="center") == sorted({span // 2, span - span // 2})


def test_flip_sets():
    assert parse_flips("none") == [()]
    assert parse_flips("lr") == [(), (0,)]
    assert len(parse_flips("all")) == 8 and flips_form_group(parse_flips("all"))
    assert parse_flips([[0], [1], [0, 1]]) == [(), (0,), (1,), (0, 1)]
    assert not flips_form_group(parse_flips("0,1"))
    with pytest.raises(PetmonaiError, match="axis"):
        parse_flips("3")


def test_options_from_config_and_overrides():
    cfg = {"crop_size": [20, 24, 20], "spatial_size": [24, 28, 24], "model": {"name": "resnet18_3d"},
           "inference": {"overlap": 0.25, "flips": "all"}}
    opts = resolve_options(cfg, {"flips": "none"})
    assert opts["views"] == "sliding_window_3d" and opts["overlap"] == 0.25 and opts["flips"] == "none"
    with pytest.raises(PetmonaiError, match="inference.overlapp"):
        resolve_options(cfg, {"overlapp": 0.1})
    with pytest.raises(PetmonaiError, match="unknown view strategy"):
        resolve_options(cfg, {"views": "slices_2d_nonexistent"})


def test_another_view_strategy_plugs_in(tiny, tmp_path, monkeypatch):
    """The seam the 2D model uses: a registered strategy predicts through the same command."""
    import petmonai.inference.predictor as inference

    class RandomCrops(inference.ViewStrategy):
        name = "test_random_crops"
        defaults = {"passes": 3}

        def views(self, volume, rng):
            roi = self.cfg["crop_size"]
            out = []
            for _ in range(self.options["passes"]):
                s = [int(rng.integers(0, v - c + 1)) for v, c in zip(volume.shape[1:], roi)]
                out.append(volume[:, s[0]:s[0] + roi[0], s[1]:s[1] + roi[1], s[2]:s[2] + roi[2]])
            return torch.stack(out)

        def labels(self, volume_shape):
            return [f"pass={i}" for i in range(self.options["passes"])]

    monkeypatch.setitem(inference.VIEW_STRATEGIES, RandomCrops.name, RandomCrops)
    run_dir, cohort = tiny
    opts = {"views": "test_random_crops", "passes": 4, "threads": 1}
    first = predict(run_dir, [cohort / "Test" / "2.nii.gz"], tmp_path / "a" / "s.csv", options=opts)
    again = predict(run_dir, [cohort / "Test" / "2.nii.gz"], tmp_path / "b" / "s.csv", options=opts)
    assert first.table["n_views"].tolist() == [2 * 4]
    assert first.table["prob_mci"].tolist() == again.table["prob_mci"].tolist()  # random views, seeded per uuid
    assert first.provenance["views"] == {"views": "test_random_crops"}


# ---------------------------------------------------------------------------------------------- submission


def test_submission_format(tiny_prediction):
    result, out, cohort = tiny_prediction
    n_files = len(list((cohort / "Test").glob("*.nii*")))
    text = out.read_text()
    lines = text.strip().split("\n")
    assert lines[0] == "uuid,label"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == n_files == 12
    uuids = [int(u) for u, _ in rows]
    assert uuids == sorted(uuids) == list(range(1, 13))  # numeric order: 2 before 10
    assert {label for _, label in rows} <= {"NC", "MCI"}
    assert text.endswith("\n") and "\r" not in text

    probs = pd.read_csv(out.parent / "submission.probabilities.csv")  # side files named after --output
    assert result.paths["probabilities"] == out.parent / "submission.probabilities.csv"
    assert list(probs.columns[:4]) == ["uuid", "file", "prob_mci", "label"]
    assert {"prob_sd", "n_views", "subject_in_training"} <= set(probs.columns)
    assert probs["uuid"].tolist() == uuids and probs["prob_mci"].between(0, 1).all()
    assert (probs["n_views"] == 2 * 8 * 2).all()  # 2 folds x 8 windows x 2 flips (left-right)
    assert ((probs["prob_mci"] >= 0.5) == (probs["label"] == "MCI")).all()

    # scans of subjects that are in the training data are flagged, the others not
    truth = pd.read_csv(cohort / "synthetic_truth.csv", dtype=str)
    train_subjects = set(truth.loc[truth["split"] == "Train", "subject"])
    test = truth[truth["split"] == "Test"].assign(uuid=lambda t: t["uuid"].astype(int)).set_index("uuid")
    expected = [test.loc[u, "subject"] in train_subjects for u in probs["uuid"]]
    assert probs["subject_in_training"].tolist() == expected and any(expected)

    prov = json.loads(result.paths["provenance"].read_text())
    assert len(prov["checkpoints"]) == 2
    for ckpt in prov["checkpoints"]:
        assert ckpt["sha256"] == sha256_file(ckpt["path"])
    assert prov["threshold"] == 0.5 and prov["predicted"] == 12 and prov["skipped"] == 0
    assert prov["views"]["n_windows"] == 8 and prov["views"]["n_flips"] == 2
    assert not result.paths["skipped"].exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary files left


def test_label_mapping_as_trained(tiny_prediction):
    """Trained on synthetic data where the class is known: the Test labels match the truth."""
    from sklearn.metrics import roc_auc_score

    result, out, cohort = tiny_prediction
    truth = pd.read_csv(cohort / "synthetic_truth.csv", dtype=str)
    truth = truth[truth["split"] == "Test"].assign(uuid=lambda t: t["uuid"].astype(int))
    merged = pd.read_csv(out).merge(truth[["uuid", "class_name"]], on="uuid")
    probs = pd.read_csv(result.paths["probabilities"]).merge(truth[["uuid", "class_name"]], on="uuid")
    assert len(merged) == 12 and merged["class_name"].nunique() == 2
    accuracy = float((merged["label"] == merged["class_name"]).mean())
    auc = roc_auc_score(probs["class_name"] == "MCI", probs["prob_mci"])
    assert accuracy >= 0.75, merged
    assert auc >= 0.8  # swapped labels or P(NC) read as P(MCI) would give ~0.0-0.2


def test_ensemble_is_flip_invariant(tiny, one_thread):
    run_dir, cohort = tiny
    run = load_run(run_dir, {"flips": "all", "optimize": "none"})
    prep = preprocess_file(collect_inputs([cohort / "Test" / "3.nii.gz"])[0], run)
    reference = predict_views(run, prep.volume).mean()
    for dims in ([1], [2], [3], [1, 2], [1, 2, 3]):
        flipped = predict_views(run, torch.flip(prep.volume, dims)).mean()
        assert flipped == pytest.approx(reference, abs=1e-6), dims

    lr = load_run(run_dir, {"flips": "lr", "optimize": "none"})
    assert predict_views(lr, torch.flip(prep.volume, [1])).mean() == pytest.approx(
        predict_views(lr, prep.volume).mean(), abs=1e-6)
    # the test can fail: without flips in the set the prediction of a flipped volume changes
    none = load_run(run_dir, {"flips": "none", "optimize": "none"})
    a, b = predict_views(none, prep.volume).mean(), predict_views(none, torch.flip(prep.volume, [1])).mean()
    assert abs(a - b) > 1e-6


def test_flipped_file_gives_nearly_the_same_probability(tiny, tmp_path, one_thread):
    """Flipping the NIfTI voxels left-right (same affine): the ensemble is exactly invariant, the
    resampling of the preprocessing only nearly (its voxel grid is anchored at one corner)."""
    run_dir, cohort = tiny
    src = nib.load(str(cohort / "Test" / "5.nii.gz"))
    data = np.asarray(src.dataobj)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data[::-1]), src.affine, src.header), str(tmp_path / "5.nii.gz"))
    run = load_run(run_dir, {"flips": "lr"})
    p_orig = predict_views(run, preprocess_file(collect_inputs([cohort / "Test" / "5.nii.gz"])[0], run).volume)
    p_flip = predict_views(run, preprocess_file(collect_inputs([tmp_path / "5.nii.gz"])[0], run).volume)
    assert abs(p_orig.mean() - p_flip.mean()) < 0.02


def test_optimised_network_matches_plain(tiny, one_thread):
    run_dir, cohort = tiny
    fast = load_run(run_dir, {"optimize": "auto"})
    plain = load_run(run_dir, {"optimize": "none"})
    prep = preprocess_file(collect_inputs([cohort / "Test" / "1.nii.gz"])[0], plain)
    np.testing.assert_allclose(predict_views(fast, prep.volume), predict_views(plain, prep.volume), atol=1e-5)


def test_out_of_fold_views(tiny, one_thread):
    run_dir, _ = tiny
    oof = predict_out_of_fold(run_dir, {"flips": "lr"}, progress=False)
    folds = pd.read_csv(run_dir / "folds.csv")
    assert sorted(oof["scan_id"]) == sorted(folds.loc[folds["role"] == "test", "scan_id"])
    assert all(len(p) == 16 for p in oof["probs"])


# ---------------------------------------------------------------------------------------------- bad input


def _bad_inputs(cohort: Path, folder: Path) -> dict[str, Path]:
    """Good copies of three Test scans plus one volume of each kind of bad input."""
    folder.mkdir(parents=True, exist_ok=True)
    for uuid in (1, 2, 3):
        shutil.copy(cohort / "Test" / f"{uuid}.nii.gz", folder / f"{uuid}.nii.gz")
    ref = nib.load(str(cohort / "Test" / "1.nii.gz"))
    affine = ref.affine
    data = np.asarray(ref.dataobj, dtype=np.float32)
    with_nan = data.copy()
    with_nan[60:64, 60:64, 20] = np.nan
    bad = {
        "nan": folder / "21.nii.gz",
        "unreadable": folder / "22.nii.gz",
        "empty": folder / "23.nii",
        "shape": folder / "24.nii.gz",
    }
    nib.save(nib.Nifti1Image(with_nan, affine), str(bad["nan"]))
    bad["unreadable"].write_bytes(b"this is not a NIfTI volume")
    nib.save(nib.Nifti1Image(np.zeros((128, 128, 47), np.float32), affine), str(bad["empty"]))
    nib.save(nib.Nifti1Image(np.ones((64, 64, 40, 3), np.float32), affine), str(bad["shape"]))
    return bad


def test_bad_input_fails_before_writing(tiny, tmp_path):
    run_dir, cohort = tiny
    bad = _bad_inputs(cohort, tmp_path / "in")
    out = tmp_path / "out" / "submission.csv"
    with pytest.raises(PetmonaiError) as err:
        predict(run_dir, [tmp_path / "in"], out, options={"threads": 1})
    message = str(err.value)
    for path in bad.values():
        assert path.name in message
    assert "NaN" in message and "empty" in message and "--skip-bad" in message
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_skip_bad_writes_the_rest(tiny, tmp_path):
    run_dir, cohort = tiny
    bad = _bad_inputs(cohort, tmp_path / "in")
    out = tmp_path / "out" / "submission.csv"
    result = predict(run_dir, [tmp_path / "in"], out, skip_bad=True, options={"threads": 1})
    submission = pd.read_csv(out)
    skipped = pd.read_csv(result.paths["skipped"])
    assert submission["uuid"].tolist() == [1, 2, 3]
    assert sorted(skipped["uuid"]) == [21, 22, 23, 24]
    assert set(Path(f).name for f in skipped["file"]) == {p.name for p in bad.values()}
    assert len(submission) + len(skipped) == 7 == len(result.table) + len(result.skipped)
    assert json.loads(result.paths["provenance"].read_text())["skipped"] == 4


def test_duplicate_and_non_numeric_and_empty_inputs(tiny, tmp_path):
    run_dir, cohort = tiny
    dup = tmp_path / "dup"
    dup.mkdir()
    shutil.copy(cohort / "Test" / "7.nii.gz", dup / "7.nii.gz")
    nib.save(nib.load(str(cohort / "Test" / "7.nii.gz")), str(dup / "7.nii"))
    with pytest.raises(PetmonaiError, match="duplicate uuid.*7"):
        collect_inputs([dup])
    named = tmp_path / "named"
    named.mkdir()
    shutil.copy(cohort / "Test" / "7.nii.gz", named / "scan_a.nii.gz")
    with pytest.raises(PetmonaiError, match="scan_a.nii.gz"):
        collect_inputs([named])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PetmonaiError, match="no .nii"):
        collect_inputs([empty])
    with pytest.raises(PetmonaiError, match="not found"):
        collect_inputs([tmp_path / "missing"])
    assert not list((tmp_path).glob("**/submission.csv"))


def test_existing_output_needs_overwrite(tiny, tmp_path):
    run_dir, cohort = tiny
    out = tmp_path / "submission.csv"
    out.write_text("old\n")
    with pytest.raises(PetmonaiError, match="--overwrite"):
        predict(run_dir, [cohort / "Test" / "1.nii.gz"], out, options={"threads": 1})
    assert out.read_text() == "old\n"
    predict(run_dir, [cohort / "Test" / "1.nii.gz"], out, overwrite=True, options={"threads": 1})
    assert out.read_text().startswith("uuid,label\n1,")


def test_script_reports_errors_in_one_line(tiny, tmp_path, capsys):
    run_dir, cohort = tiny
    script = load_script()
    (tmp_path / "empty").mkdir()
    code = script.main(["--run-dir", str(run_dir), "--input", str(tmp_path / "empty"),
                        "--output", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    code = script.main(["--run-dir", str(tmp_path / "norun"), "--input", str(cohort / "Test"),
                        "--output", str(tmp_path / "s.csv")])
    assert code == 2 and "run folder not found" in capsys.readouterr().err


def test_script_end_to_end(tiny, tmp_path, capsys):
    run_dir, cohort = tiny
    script = load_script()
    out = tmp_path / "sub.csv"
    code = script.main(["--run-dir", str(run_dir), "--input", str(cohort / "Test" / "2.nii.gz"),
                        str(cohort / "Test" / "10.nii.gz"), "--output", str(out), "--flips", "none",
                        "--windows", "center", "--folds", "1", "--threads", "1", "--set", "inference.batch_size=4"])
    assert code == 0
    assert "2 input volume(s): 2 predicted, 0 skipped" in capsys.readouterr().out
    assert pd.read_csv(out)["uuid"].tolist() == [2, 10]
    probs = pd.read_csv(tmp_path / "sub.probabilities.csv")
    assert (probs["n_views"] == 1).all() and (probs["n_models"] == 1).all()

    # a second prediction under another name into the same folder: its own side files, the first one's kept
    other = tmp_path / "sub_b.csv"
    code = script.main(["--run-dir", str(run_dir), "--input", str(cohort / "Test" / "3.nii.gz"), "--output", str(other),
                        "--flips", "none", "--windows", "center", "--folds", "1", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    assert pd.read_csv(other)["uuid"].tolist() == [3] and pd.read_csv(out)["uuid"].tolist() == [2, 10]
    assert pd.read_csv(tmp_path / "sub_b.probabilities.csv")["uuid"].tolist() == [3]
    assert pd.read_csv(tmp_path / "sub.probabilities.csv")["uuid"].tolist() == [2, 10]
    for name in ("sub", "sub_b"):
        prov = json.loads((tmp_path / f"{name}.provenance.json").read_text())
        assert prov["outputs"]["submission"] == str((tmp_path / f"{name}.csv").resolve())
    # the same name again is refused (nothing replaced) unless --overwrite
    code = script.main(["--run-dir", str(run_dir), "--input", str(cohort / "Test" / "3.nii.gz"), "--output", str(out),
                        "--flips", "none", "--windows", "center", "--folds", "1", "--threads", "1"])
    assert code == 2 and "output exists" in capsys.readouterr().err
    assert pd.read_csv(out)["uuid"].tolist() == [2, 10]


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_test_files_predict(tiny, real_data_root, tmp_path):
    """A few real Test volumes (uint16 and float32, 47 and 63 slices) through the whole command."""
    run_dir, _ = tiny
    files = sorted((real_data_root / "Test").glob("*.nii*"))
    assert files
    headers = pd.DataFrame([{"file": f, **read_header(f)} for f in files])
    chosen = pd.concat([headers.groupby("dtype").head(2), headers.groupby("n_slices").head(2)]).drop_duplicates("file")
    out = tmp_path / "submission.csv"
    result = predict(run_dir, list(chosen["file"]), out, options={"threads": 1, "flips": "none"})
    assert len(pd.read_csv(out)) == len(chosen) and result.skipped.empty
