"""The synthetic phantom cohort: layout, headers, determinism, design, MCI effect, atomic writing."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import petmonai.data.synthetic as synthetic
from petmonai.errors import PetmonaiError
from petmonai.data import BRAIN_OFFSET_MM, MCI_REGIONS, TRUTH_COLUMNS, VERSION, default_cohort_dir, generate_cohort, make_phantom

SMALL = dict(n_nc=4, n_mci=4, n_test=3, seed=3)  # repeat_fraction 0.2: one second visit per class


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return generate_cohort(tmp_path_factory.mktemp("syn") / "cohort", **SMALL)


def read_truth(root) -> pd.DataFrame:
    return pd.read_csv(root / "synthetic_truth.csv", dtype=str, keep_default_na=False)


def voxels(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def region_ratio(vol: np.ndarray, zooms) -> float:
    """Mean uptake where the MCI regions weigh > 0.5 (nominal brain position) / mean brain uptake."""
    grid = [(np.arange(n) - (n - 1) / 2.0) * z - o for n, z, o in zip(vol.shape, zooms, BRAIN_OFFSET_MM)]
    x, y, z = np.meshgrid(*grid, indexing="ij")
    weight = np.zeros(vol.shape)
    for _, c, s in MCI_REGIONS:
        d2 = ((x - c[0]) / s[0]) ** 2 + ((y - c[1]) / s[1]) ** 2 + ((z - c[2]) / s[2]) ** 2
        weight = np.maximum(weight, np.exp(-0.5 * d2))
    brain = vol > 0.3 * vol.max()
    return float(vol[brain & (weight > 0.5)].mean() / vol[brain].mean())


def test_layout_and_counts(cohort):
    truth = read_truth(cohort)
    assert tuple(truth.columns) == TRUTH_COLUMNS
    for folder, n in (("Train/NC", 4), ("Train/MCI", 4), ("Test", 3)):
        names = sorted(p.name for p in (cohort / folder).iterdir())
        assert names == sorted(f"{i}.nii.gz" for i in range(1, n + 1))
    assert len(truth) == 11
    assert set(truth["split"]) == {"Train", "Test"}
    assert set(truth["class_name"]) == {"NC", "MCI"}  # Test rows carry their true class too
    for row in truth.itertuples():
        assert (cohort / row.file).is_file()
        folder = f"Train/{row.class_name}" if row.split == "Train" else "Test"
        assert row.file == f"{folder}/{row.uuid}.nii.gz"
    severity = truth["severity"].astype(float)
    assert (severity[truth["class_name"] == "MCI"] > 0.2).all()
    assert (severity[truth["class_name"] == "NC"] < 0.05).all()
    readme = (cohort / "README.txt").read_text()
    assert "SYNTHETIC" in readme and "NOT patient data" in readme and "seed: 3" in readme
    assert not list(cohort.parent.glob(".cohort.*"))  # no temporary folder left behind


def test_headers_like_the_real_data(cohort):
    truth = read_truth(cohort)
    for row in truth.itertuples():
        img = nib.load(str(cohort / row.file))
        header = img.header
        assert img.shape[:2] == (128, 128) and img.shape[2] in (47, 63) and img.shape[3] == 1
        assert header.get_data_dtype().str in (">u2", ">f4")
        assert header.endianness == ">"
        vx, vy, vz = (float(z) for z in header.get_zooms()[:3])
        assert vx == vy and 2.0 <= vx <= 2.6 and 2.4 <= vz <= 3.4
        assert 150.0 <= img.shape[2] * vz <= 160.0
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        db_name = header["db_name"].item().decode()
        assert re.fullmatch(r"\d{3}_S_\d{4}", db_name)
        assert db_name == row.subject and db_name[:3] == row.site
        assert b"SYNTHETIC" in header["descrip"].item()
        data = voxels(cohort / row.file)
        assert data.dtype.str == header.get_data_dtype().str
        if data.dtype.kind == "u":
            assert 20000 <= data.max() <= 30000
        assert data[0, 0, :, 0].max() == 0  # outside the reconstruction circle


def test_repeated_subjects(cohort):
    truth = read_truth(cohort)
    train = truth[truth["split"] == "Train"]
    for name in ("NC", "MCI"):
        part = train[train["class_name"] == name]
        assert part["subject"].nunique() < len(part)  # more scans than subjects
        assert part["subject"].nunique() == 3
    test = truth[truth["split"] == "Test"]
    revisits = test[test["subject"].isin(train["subject"])]
    assert len(revisits) == 1  # round(3 * 0.2)
    for row in revisits.itertuples():  # the true class of a revisit is the subject's class
        assert row.class_name == train.loc[train["subject"] == row.subject, "class_name"].iloc[0]
    assert truth.groupby("subject")["site"].nunique().max() == 1  # the site is part of the id


def test_same_seed_same_voxels_other_seed_other_voxels(tmp_path):
    params = dict(n_nc=2, n_mci=2, n_test=1, seed=5)
    a = generate_cohort(tmp_path / "a", **params)
    b = generate_cohort(tmp_path / "b", **params)
    c = generate_cohort(tmp_path / "c", **{**params, "seed": 6})
    assert read_truth(a).equals(read_truth(b))
    for row in read_truth(a).itertuples():
        va, vb = voxels(a / row.file), voxels(b / row.file)
        assert va.dtype == vb.dtype and np.array_equal(va, vb)
        header_a, header_b = (nib.load(str(root / row.file)).header for root in (a, b))
        assert header_a.binaryblock == header_b.binaryblock
    assert not read_truth(a)["subject"].equals(read_truth(c)["subject"])
    va, vc = voxels(a / "Train/NC/1.nii.gz"), voxels(c / "Train/NC/1.nii.gz")
    assert va.shape != vc.shape or not np.array_equal(va, vc)


def test_make_phantom_is_deterministic_and_shaped():
    a = make_phantom(7, mci=True, shape=(128, 128, 47), voxel_size=(2.1, 2.1, 3.3))
    b = make_phantom(7, mci=True, shape=(128, 128, 47), voxel_size=(2.1, 2.1, 3.3))
    assert a.shape == (128, 128, 47) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, make_phantom(8, mci=True, shape=(128, 128, 47), voxel_size=(2.1, 2.1, 3.3)))
    assert np.isfinite(a).all() and 1.5 < a.max() < 4.5  # cortex ~ 2.2-2.8 x white matter


def test_mci_lowers_parietal_and_posterior_cingulate_uptake():
    """Same subject, same scan; only the severity differs."""
    kw = dict(anatomy_seed=11, shape=(128, 128, 63), voxel_size=(2.06, 2.06, 2.43), noise=0.0)
    zooms = kw["voxel_size"]
    nc = region_ratio(make_phantom(5, severity=0.0, **kw), zooms)
    mci = region_ratio(make_phantom(5, severity=0.3, **kw), zooms)
    assert mci < nc - 0.1


def test_mci_effect_in_the_written_cohort(cohort):
    truth = read_truth(cohort)
    ratio = {"NC": [], "MCI": []}
    for row in truth.itertuples():
        img = nib.load(str(cohort / row.file))
        vol = np.asanyarray(img.dataobj)[..., 0].astype(float)
        ratio[row.class_name].append(region_ratio(vol, img.header.get_zooms()[:3]))
    assert np.mean(ratio["MCI"]) < np.mean(ratio["NC"]) - 0.05
    assert np.median(ratio["MCI"]) < min(ratio["NC"])


def test_acquisition_does_not_follow_class_by_default():
    plan = [s for s in synthetic._plan(20, 20, 12, 0.2, 0, False) if s.split == "Train"]
    for name in ("NC", "MCI"):
        mine = [s for s in plan if s.class_name == name]
        assert {s.protocol.dtype for s in mine} == {">u2", ">f4"}
        assert {s.protocol.n_slices for s in mine} == {47, 63}
    sites = {name: {s.site for s in plan if s.class_name == name} for name in ("NC", "MCI")}
    assert sites["NC"] == sites["MCI"]


def test_small_cohort_shares_sites_between_classes(cohort):
    truth = read_truth(cohort)
    train = truth[truth["split"] == "Train"]
    nc, mci = (set(train.loc[train["class_name"] == name, "site"]) for name in ("NC", "MCI"))
    assert nc == mci


def test_confounded_cohort_separates_sites_and_protocols(tmp_path):
    root = generate_cohort(tmp_path / "conf", n_nc=3, n_mci=3, n_test=2, seed=1, confounded=True)
    truth = read_truth(root)
    train = truth[truth["split"] == "Train"]
    nc, mci = (train[train["class_name"] == name] for name in ("NC", "MCI"))
    assert not set(nc["site"]) & set(mci["site"])
    for part, dtype, n_slices in ((nc, ">u2", 63), (mci, ">f4", 47)):
        for f in part["file"]:
            img = nib.load(str(root / f))
            assert img.header.get_data_dtype().str == dtype and img.shape[2] == n_slices


def test_complete_folder_is_reused_not_rewritten(tmp_path):
    params = dict(n_nc=1, n_mci=1, n_test=0, seed=2)
    root = generate_cohort(tmp_path / "c", **params)
    stamp = (root / "Train/NC/1.nii.gz").stat()
    assert generate_cohort(tmp_path / "c", **params) == root
    again = (root / "Train/NC/1.nii.gz").stat()
    assert (again.st_ino, again.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    with pytest.raises(PetmonaiError, match="made with"):
        generate_cohort(tmp_path / "c", **{**params, "seed": 9})
    generate_cohort(tmp_path / "c", **{**params, "seed": 9}, overwrite=True)
    assert read_truth(root)["subject"].tolist() != []
    assert "seed: 9" in (root / "README.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary or old folder left


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def fail_on_second(scan, path):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        path.write_bytes(b"")

    monkeypatch.setattr(synthetic, "_write_scan", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_cohort(tmp_path / "c", n_nc=2, n_mci=2, n_test=0)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(PetmonaiError, match="not a synthetic cohort"):
            generate_cohort(tmp_path / "mine", n_nc=1, n_mci=1, n_test=0, overwrite=overwrite)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_bad_parameters_are_refused(tmp_path):
    with pytest.raises(PetmonaiError, match="repeat_fraction"):
        generate_cohort(tmp_path / "x", repeat_fraction=1.5)
    with pytest.raises(PetmonaiError, match="n_nc"):
        generate_cohort(tmp_path / "x", n_nc=0)
    assert not (tmp_path / "x").exists()


def test_default_cohort_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PETMONAI_CACHE", str(tmp_path))
    d = default_cohort_dir()
    assert d.parent == tmp_path / "synthetic" and d.name.startswith(VERSION + "-")
    assert default_cohort_dir(seed=0, n_nc=20, confounded=False) == d  # defaults filled in
    assert default_cohort_dir(seed=1) != d and default_cohort_dir(n_test=5) != d
    with pytest.raises(TypeError, match="unknown"):
        default_cohort_dir(n_subjects=3)
    monkeypatch.delenv("PETMONAI_CACHE")
    assert ".cache" in default_cohort_dir().parts and "petmonai" in default_cohort_dir().parts
