import gzip
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from petmonai.data import discover, read_header, train_rows
from petmonai.errors import DataError, PetmonaiError


def copy_layout(src, dst, per_class=3):
    for cls in ("NC", "MCI"):
        (dst / "Train" / cls).mkdir(parents=True)
        for f in sorted((src / "Train" / cls).iterdir())[:per_class]:
            shutil.copy(f, dst / "Train" / cls / f.name)
    return dst


def test_discover_synthetic_layout(tiny_cohort):
    df = discover(tiny_cohort)
    train = train_rows(df)
    assert (train["class_name"] == "NC").sum() == 6 and (train["class_name"] == "MCI").sum() == 6
    assert set(train["label"]) == {0, 1}
    assert (train.loc[train["class_name"] == "MCI", "label"] == 1).all()
    assert (df["split"] == "test").sum() == 3
    assert (df["subject_source"] == "header").all()
    assert df["site"].str.fullmatch(r"\d{3}").all()
    assert set(df["dtype"]) <= {">u2", ">f4"}
    assert df["scan_id"].is_unique


@pytest.mark.realdata
def test_discover_real_data(real_data_root):
    df = discover(real_data_root)
    train = train_rows(df)
    assert (train["class_name"] == "MCI").sum() == 25
    assert (train["class_name"] == "NC").sum() == 16
    assert train.loc[train["class_name"] == "NC", "subject"].nunique() == 10
    assert (df["split"] == "test").sum() == 79
    row = df[df["scan_id"] == "MCI/1"].iloc[0]
    assert row["subject"] == "031_S_0294" and row["site"] == "031" and row["dtype"] == ">u2"
    assert row["shape"] == "128x128x63x1"


def test_csv_datalist(tiny_cohort, tmp_path):
    df = discover(tiny_cohort)
    csv = tmp_path / "list.csv"
    train = train_rows(df)
    pd.DataFrame({"image": train["image"], "label": train["class_name"], "subject": "S" + train["uuid"],
                  "site": "999"}).to_csv(csv, index=False)
    got = discover(csv)
    assert len(got) == len(train)
    assert (got["subject_source"] == "csv").all() and (got["site"] == "999").all()
    assert list(got["label"]) == list(train["label"])


def test_plain_nii_and_4d_and_3d(tmp_path):
    vol = np.random.default_rng(0).random((16, 16, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "a.nii")
    nib.save(nib.Nifti1Image(vol[..., None], np.eye(4)), tmp_path / "b.nii.gz")
    assert read_header(tmp_path / "a.nii")["shape"] == "16x16x12"
    meta = read_header(tmp_path / "b.nii.gz")
    assert meta["shape"] == "16x16x12x1" and meta["subject_source"] == "file"


@pytest.mark.parametrize("shape,problem", [((16, 16), "2D image"), ((8, 8, 8, 3), "one frame"),
                                           ((8, 8, 8, 1, 2), "expected 3D")])
def test_bad_shapes_named(tmp_path, shape, problem):
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), path)
    with pytest.raises(DataError, match=problem) as err:
        read_header(path)
    assert "bad.nii.gz" in str(err.value)


def test_layout_errors(tiny_cohort, tmp_path):
    with pytest.raises(PetmonaiError, match="does not exist"):
        discover(tmp_path / "nowhere")
    with pytest.raises(PetmonaiError, match="no Train"):
        discover(tmp_path)
    root = copy_layout(tiny_cohort, tmp_path / "a")
    (root / "Train" / "AD").mkdir()
    with pytest.raises(PetmonaiError, match="neither"):
        discover(root)
    root = copy_layout(tiny_cohort, tmp_path / "b")
    for f in (root / "Train" / "NC").iterdir():
        f.unlink()
    with pytest.raises(PetmonaiError, match="no .nii"):
        discover(root)


def test_not_nifti_named_and_skippable(tiny_cohort, tmp_path):
    root = copy_layout(tiny_cohort, tmp_path / "c")
    (root / "Train" / "MCI" / "99.nii.gz").write_bytes(gzip.compress(b"this is not an image" * 20))
    with pytest.raises(DataError, match="99.nii.gz"):
        discover(root)
    skipped = []
    df = discover(root, skip_bad=True, skipped=skipped)
    assert len(df) == 6 and len(skipped) == 1 and skipped[0]["image"].endswith("99.nii.gz")


def test_duplicate_uuid(tiny_cohort, tmp_path):
    root = copy_layout(tiny_cohort, tmp_path / "d")
    (root / "Test").mkdir()
    src = next((root / "Train" / "NC").iterdir())
    shutil.copy(src, root / "Test" / "7.nii.gz")
    nib.save(nib.load(src), root / "Test" / "7.nii")
    with pytest.raises(PetmonaiError, match="duplicate uuid"):
        discover(root)


@pytest.mark.parametrize("roi, axis", [([6, 7, 6], 0), ([8, 5, 3], [0, 2]), ([7, 9, 8], None)])
def test_fast_augmentation_is_monais_draw_for_draw(roi, axis):
    """The default's FastRandSpatialCropd / FastRandFlipd give MONAI's crops and flips, draw for
    draw, on the plain tensors training augments; MetaTensors go through MONAI itself."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose, RandFlipd, RandSpatialCropd

    from petmonai.data import UntrackedDataset
    from petmonai.transforms import FastRandFlipd, FastRandSpatialCropd

    def pipeline(crop, flip):
        return Compose([crop(keys="image", roi_size=roi, random_size=False),
                        flip(keys="image", spatial_axis=axis, prob=0.5)]).set_random_state(seed=7)

    monai, fast = pipeline(RandSpatialCropd, RandFlipd), pipeline(FastRandSpatialCropd, FastRandFlipd)
    items = [{"image": torch.rand(1, 8, 9, 8, generator=torch.Generator().manual_seed(i))} for i in range(60)]
    flips, corners = 0, set()
    for a, b in zip(UntrackedDataset(items, transform=monai), UntrackedDataset(items, transform=fast)):
        assert type(b["image"]) is torch.Tensor and torch.equal(a["image"], b["image"])
        flips += bool(fast.transforms[1]._do_transform)
        corners.add(tuple(s.start for s in fast.transforms[0].cropper._slices))
    assert 10 < flips < 50 and len(corners) > 1  # flips and several crop positions were compared
    meta = MetaTensor(items[0]["image"])
    out = pipeline(FastRandSpatialCropd, FastRandFlipd)({"image": meta})["image"]
    ref = pipeline(RandSpatialCropd, RandFlipd)({"image": MetaTensor(items[0]["image"])})["image"]
    assert isinstance(out, MetaTensor) and torch.equal(out.as_tensor(), ref.as_tensor())
    assert len(out.applied_operations) == len(ref.applied_operations)


def test_augmentation_without_meta_tracking_same_values():
    """Training augments with MONAI's meta tracking off: plain tensors, the same random draws and
    values as with tracking when a MONAI loader seeds the pipeline (as training does), and the
    global setting restored (also after an error)."""
    import torch
    from monai.data import DataLoader, Dataset, get_track_meta
    from monai.transforms import Compose, RandFlipd, RandSpatialCropd

    from petmonai.data import UntrackedDataset

    augment = Compose([RandSpatialCropd(keys="image", roi_size=[6, 7, 6], random_size=False),
                       RandFlipd(keys="image", spatial_axis=0, prob=0.5)])
    items = [{"image": torch.rand(1, 8, 9, 8, generator=torch.Generator().manual_seed(i))} for i in range(8)]

    def batches(dataset_class):
        loader = DataLoader(dataset_class(items, transform=augment), batch_size=4, shuffle=True, num_workers=0,
                            generator=torch.Generator().manual_seed(5))  # seeds the pipeline's random state
        return [b["image"] for epoch in range(3) for b in loader]

    tracked, untracked = batches(Dataset), batches(UntrackedDataset)
    assert len(tracked) == len(untracked) == 6
    for a, b in zip(tracked, untracked):
        assert type(b) is torch.Tensor and torch.equal(torch.as_tensor(a), b)
    assert get_track_meta()
    with pytest.raises(Exception):
        UntrackedDataset([{"label": 1}], transform=augment)[0]  # no "image" key: the pipeline fails
    assert get_track_meta()
