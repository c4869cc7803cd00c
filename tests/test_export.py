"""scripts/export_preprocessed.py: the exported volumes, read by the exported config, are the tensors
the original preprocessing makes (so training on them is training on the original), and a scan that
cannot be preprocessed is an error naming it, with nothing written."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.transforms import Compose

from petmonai.commands import export_main
from petmonai.config import build_component, load_config, read_yaml
from petmonai.data import discover
from petmonai.errors import DataError
from petmonai.commands import export_preprocessed


@pytest.fixture(scope="module")
def exported(tiny_cohort, fast_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "prep"
    assert export_main(["--data-root", str(tiny_cohort), "--output-dir", str(out),
                        *[a for o in fast_config for a in ("--set", o)]]) == 0
    return out


def test_exported_volumes_are_the_preprocessed_tensors(tiny_cohort, fast_config, exported):
    original = load_config(overrides=[*fast_config, f"data.root={tiny_cohort}"])
    exported_cfg = load_config(exported / "train3d.yaml")
    assert exported_cfg["model"] == original["model"] and exported_cfg["augment"] == original["augment"]
    before, after = (Compose(build_component(c, "preprocess")) for c in (original, exported_cfg))
    source, export = discover(tiny_cohort), discover(exported / "datalist.csv")
    keys = ["uuid", "split", "class_name", "label", "subject", "site"]
    pd.testing.assert_frame_equal(source[keys].sort_values("uuid").reset_index(drop=True),
                                  export[keys].sort_values("uuid").reset_index(drop=True))
    folder = discover(exported)  # the folder alone too: the header's subject id is kept
    pd.testing.assert_frame_equal(source[keys].sort_values("uuid").reset_index(drop=True),
                                  folder[keys].sort_values("uuid").reset_index(drop=True))
    assert read_yaml(exported / "train3d.yaml")["data"]["root"] == str(exported / "datalist.csv")
    for src, dst in zip(source.sort_values("uuid")["image"], export.sort_values("uuid")["image"]):
        a, b = before({"image": src})["image"], after({"image": dst})["image"]
        assert tuple(a.shape) == tuple(b.shape) == (1, *original["spatial_size"])
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    table = pd.read_csv(exported / "exported.csv")
    assert (table["status"] == "ok").all() and len(table) == len(source)


def test_a_scan_that_cannot_be_preprocessed(tiny_cohort, fast_config, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort, data)
    victim = sorted((data / "Train" / "NC").iterdir())[0]
    broken = sorted((data / "Train" / "MCI").iterdir())[0]
    broken.write_bytes(b"not a NIfTI file")
    img = nib.load(str(victim))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine, img.header), str(victim))
    cfg = load_config(overrides=[*fast_config, f"data.root={data}"])
    with pytest.raises(DataError, match=f"{broken.name}.*not a readable NIfTI"):
        export_preprocessed(cfg, tmp_path / "out")
    broken_bytes = broken.read_bytes()
    shutil.copy(sorted((data / "Train" / "MCI").iterdir())[1], broken)
    with pytest.raises(DataError, match=f"{victim.name}.*cannot be preprocessed: volume is empty"):
        export_preprocessed(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    broken.write_bytes(broken_bytes)
    table = export_preprocessed(cfg, tmp_path / "out", skip_bad=True)
    skipped = table[table["status"] != "ok"].set_index("source")["status"]
    assert sorted(skipped.index) == sorted([str(victim), str(broken)])
    assert "volume is empty" in skipped[str(victim)] and "not a readable NIfTI" in skipped[str(broken)]
    assert not (tmp_path / "out" / "Train" / "NC" / victim.name).exists()
    with pytest.raises(Exception, match="must not go into the data root"):
        export_preprocessed(cfg, data / "inside")


def test_subjects_and_sites_of_a_csv_datalist_survive(tiny_cohort, fast_config, tmp_path):
    """Subjects and sites that only a CSV datalist gave (not the headers) are kept by the export."""
    source = discover(tiny_cohort)
    listing = pd.DataFrame({"image": source["image"], "label": source["class_name"],
                            "subject": [f"person{i // 2}" for i in range(len(source))],
                            "site": [f"hospital{i % 3}" for i in range(len(source))], "split": source["split"]})
    listing.to_csv(tmp_path / "list.csv", index=False)
    cfg = load_config(overrides=[*fast_config, f"data.root={tmp_path / 'list.csv'}"])
    export_preprocessed(cfg, tmp_path / "out")
    before, after = discover(tmp_path / "list.csv"), discover(tmp_path / "out" / "datalist.csv")
    keys = ["uuid", "split", "class_name", "subject", "site"]
    pd.testing.assert_frame_equal(before[keys].sort_values("uuid").reset_index(drop=True),
                                  after[keys].sort_values("uuid").reset_index(drop=True))


def test_an_export_made_with_a_template_of_your_own_trains_without_it(tmp_path):
    """The exported volumes are already registered: the exported config registers nothing, so it
    neither needs the template file nor trips the check that a set template.image is used."""
    from petmonai.commands import exported_config
    from petmonai.transforms import mni_fdg_template
    from petmonai.transforms import build_pipelines

    t = mni_fdg_template(4.0)
    own = tmp_path / "own.nii.gz"
    nib.save(nib.Nifti1Image(t.image, t.affine), str(own))
    cfg = load_config(None, [f"template.image={own}"])
    new = exported_config(cfg, tmp_path / "prep")
    own.unlink()
    assert new["template"]["image"] is None and cfg["template"]["image"] == str(own)
    preprocess, _ = build_pipelines(new)
    assert not any("Register" in type(t).__name__ for t in preprocess.transforms)
