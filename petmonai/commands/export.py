"""Export scans as a config's ``preprocess`` leaves them, with a config that trains on them.

A machine without the registration stack (SimpleITK, nilearn), e.g. a GPU node, then trains on the
exported volumes with the same tensors the original run sees (same values, same grid):

    >>> from petmonai.config import load_config
    >>> cfg = load_config(overrides=["data.root=../shared/data/pet2023"])
    >>> export_preprocessed(cfg, "prep6")          # doctest: +SKIP
    python scripts/train3d.py --config prep6/train3d.yaml --data-root prep6/datalist.csv

The volumes are derived from patient data: keep them with the data, never in a repository.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from monai.transforms import Compose

from petmonai.config import build_component, dump_yaml
from petmonai.data import data_options, describe_failure, discover
from petmonai.errors import DataError, PetmonaiError
from petmonai.runs import (
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_text,
    get_logger,
)

EXPORTED_CONFIG = "train3d.yaml"


EXPORTED_DATALIST = "datalist.csv"


# the exported volumes are already preprocessed: read them as they are
LOAD_PREPROCESSED = [
    {"_target_": "LoadImaged", "keys": "image", "image_only": True, "dtype": "$np.float32"},
    {"_target_": "EnsureChannelFirstd", "keys": "image"},
    {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
    {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32", "track_meta": False},
]


def exported_path(out_dir: Path, row: dict) -> Path:
    """Competition layout, so :func:`petmonai.data.discover.discover` reads it: Train/<class>/<uuid>, Test/<uuid>."""
    if row["split"] == "train":
        return out_dir / "Train" / row["class_name"] / f"{row['uuid']}.nii.gz"
    return out_dir / "Test" / f"{row['uuid']}.nii.gz"


def nifti_bytes(volume: np.ndarray, spacing, db_name: str = "") -> bytes:
    """Gzipped NIfTI of a (1, X, Y, Z) volume on a RAS grid of ``spacing`` mm; ``db_name``: the
    subject id as the source header held it."""
    img = nib.Nifti1Image(np.asarray(volume[0], dtype=np.float32), np.diag([*map(float, spacing), 1.0]))
    img.header["db_name"] = db_name
    return gzip.compress(img.to_bytes(), compresslevel=6)


def exported_datalist(rows: list[dict]) -> pd.DataFrame:
    """The CSV datalist of the export (:func:`petmonai.data.discover.read_datalist_csv`): every exported scan
    with the subject and site the source datalist gave it, also where they came from a CSV or a
    file name rather than the header."""
    return pd.DataFrame([{"image": r["exported"], "label": r["class_name"], "subject": r["subject"],
                          "site": r["site"], "split": r["split"]} for r in rows],
                        columns=["image", "label", "subject", "site", "split"])


def exported_config(cfg: dict, out_dir: Path) -> dict:
    """``cfg`` with ``preprocess`` replaced by plain loading of the exported volumes."""
    new = {**cfg, "preprocess": LOAD_PREPROCESSED, "data": {**cfg["data"], "root": str(out_dir / EXPORTED_DATALIST)}}
    # the reference's raw-volume resampling would see exported volumes, not raw ones: a different model
    new["report"] = {**cfg["report"], "reference_model": False}
    # the exported volumes are already on the template grid: nothing registers them again
    new["template"] = {**cfg["template"], "image": None}
    return new


def export_preprocessed(cfg: dict, out_dir: str | Path, skip_bad: bool = False) -> pd.DataFrame:
    """Write every scan of ``cfg['data']['root']`` as ``cfg['preprocess']`` leaves it into ``out_dir``
    (NIfTI, float32, RAS grid of ``cfg['spacing']``), plus ``datalist.csv`` (the exported scans with
    their subjects and sites), ``train3d.yaml`` (the config on them) and ``exported.csv`` (source,
    exported file, status). Each file is written atomically. A scan the
    preprocessing rejects is an error naming it, or with ``skip_bad`` left out and listed."""
    log = get_logger()
    if not cfg["data"].get("root"):
        raise PetmonaiError("export needs --data-root: the synthetic cohort is generated, not exported")
    out_dir = Path(out_dir)
    source_root = Path(cfg["data"]["root"]).resolve()
    if out_dir.resolve() == source_root or source_root in out_dir.resolve().parents:
        raise PetmonaiError(f"{out_dir}: the export must not go into the data root {source_root}")
    unreadable: list[dict] = []
    datalist = discover(source_root, skip_bad=skip_bad, skipped=unreadable, **data_options(cfg))
    preprocess = Compose(build_component(cfg, "preprocess"))
    rows = [{"source": item["image"], "exported": "", "status": f"skipped: {item['problem']}"} for item in unreadable]
    files, exported = {}, []  # every scan is preprocessed before any is written: an error leaves no partial export
    for row in datalist.to_dict("records"):
        target = exported_path(out_dir, row)
        try:
            volume = preprocess({"image": row["image"]})["image"]
        except Exception as err:  # MONAI wraps the transform's own error: report its innermost message
            problem = describe_failure(err)
            if not skip_bad:
                raise DataError(row["image"], f"cannot be preprocessed: {problem}") from None
            rows.append({"source": row["image"], "exported": "", "status": f"skipped: {problem}"})
            log.warning("skipped %s: %s", row["image"], problem)
            continue
        db_name = row["subject"] if row["subject_source"] == "header" else ""
        files[target] = nifti_bytes(np.asarray(volume), cfg["spacing"], db_name)
        rows.append({"source": row["image"], "exported": str(target.relative_to(out_dir)), "status": "ok"})
        exported.append({**row, "exported": rows[-1]["exported"]})
    for target, data in files.items():
        atomic_write_bytes(target, data)
    table = pd.DataFrame(rows)
    atomic_write_csv(out_dir / "exported.csv", table)
    atomic_write_csv(out_dir / EXPORTED_DATALIST, exported_datalist(exported))
    atomic_write_text(out_dir / EXPORTED_CONFIG, dump_yaml(exported_config(cfg, out_dir)))
    log.info("exported %d volume(s) to %s (%d skipped); train with --config %s --data-root %s", len(files), out_dir,
             len(rows) - len(files), out_dir / EXPORTED_CONFIG, out_dir / EXPORTED_DATALIST)
    return table
