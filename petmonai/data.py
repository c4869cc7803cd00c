"""Data discovery: the competition folder layout or a CSV datalist, with header metadata.

One row per scan in a pandas DataFrame (the *datalist*)::

    >>> from petmonai.data import discover
    >>> df = discover("../shared/data/pet2023")
    >>> df[["uuid", "split", "class_name", "subject", "site"]].head()

Columns: ``scan_id`` (``MCI/12``, ``test/7``: stable across machines), ``image`` (absolute path), ``uuid`` (file stem), ``split`` (train/test),
``class_name`` (NC/MCI, '' for test), ``label`` (MCI = 1, NC = 0, -1 unlabelled),
``subject``, ``subject_source`` (header/csv/file), ``site``, ``dtype``, ``shape``,
``n_slices``, ``voxel_x``, ``voxel_y``, ``voxel_z``.

Only headers are read here; voxels are decoded later, once, by the cached preprocessing.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import nibabel as nib
import pandas as pd

from petmonai import CLASS_NAMES
from petmonai.errors import DataError, PetmonaiError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CLASS_TO_LABEL = {name: i for i, name in enumerate(CLASS_NAMES)}
ADNI_SUBJECT = re.compile(r"^(\d{3})_S_(\d{4})$")

COLUMNS = [
    "scan_id", "image", "uuid", "split", "class_name", "label", "subject", "subject_source", "site",
    "dtype", "shape", "n_slices", "voxel_x", "voxel_y", "voxel_z",
]


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """``'12.nii.gz' -> '12'``, ``'12.nii' -> '12'``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_header(path: str | Path) -> dict:
    """Header metadata of one NIfTI file, without decoding its voxels.

    Raises :class:`DataError` naming the file when it is not a readable 3D (or 4D with a
    trailing singleton axis) NIfTI volume.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        img = nib.load(str(path))
    except PermissionError:
        raise DataError(path, "permission denied: the file cannot be read") from None
    except Exception as err:  # nibabel raises many types for non-NIfTI or broken files
        raise DataError(path, f"not a readable NIfTI file ({type(err).__name__}: {err})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    header = img.header
    shape = tuple(int(s) for s in img.shape)
    check_shape(path, shape)
    zooms = [float(z) for z in header.get_zooms()[:3]]
    db_name = header["db_name"].item().decode("latin-1").strip("\x00 ").strip() if "db_name" in header else ""
    subject, source, site = "", "file", ""
    match = ADNI_SUBJECT.match(db_name)
    if match:
        subject, source, site = db_name, "header", match.group(1)
    elif db_name:
        subject, source = db_name, "header"
    return {
        "dtype": header.get_data_dtype().str,
        "shape": "x".join(str(s) for s in shape),
        "n_slices": shape[2],
        "voxel_x": zooms[0],
        "voxel_y": zooms[1],
        "voxel_z": zooms[2],
        "subject": subject,
        "subject_source": source,
        "site": site,
    }


def check_shape(path, shape: tuple[int, ...]) -> None:
    """A volume must be 3D, or 4D with a trailing singleton axis (one frame)."""
    if len(shape) < 3:
        raise DataError(path, f"{len(shape)}D image of shape {shape}: a 3D PET volume is expected")
    if len(shape) > 4 or (len(shape) == 4 and shape[3] != 1):
        raise DataError(
            path,
            f"image of shape {shape}: expected 3D, or 4D with one frame (X, Y, Z, 1); "
            "dynamic or multi-frame PET must be summed to one frame first",
        )
    if min(shape[:3]) < 2:
        raise DataError(path, f"image of shape {shape} is not a volume")


def _list_nifti(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if is_nifti(p)), key=_natural_key)


def _natural_key(path: Path):
    stem = nifti_stem(path)
    return (0, int(stem), path.name) if stem.isdigit() else (1, 0, path.name)


def _row(path: Path, split: str, class_name: str, skip_bad: bool, skipped: list) -> dict | None:
    try:
        meta = read_header(path)
    except DataError as err:
        if not skip_bad:
            raise
        skipped.append({"image": str(path), "problem": err.problem})
        return None
    if meta["subject_source"] == "file":
        meta["subject"] = f"file:{split}/{class_name + '/' if class_name else ''}{nifti_stem(path)}"
    return {
        "scan_id": f"{class_name or 'test'}/{nifti_stem(path)}",
        "image": str(path.resolve()),
        "uuid": nifti_stem(path),
        "split": split,
        "class_name": class_name,
        "label": CLASS_TO_LABEL[class_name] if class_name else -1,
        **meta,
    }


def discover_layout(root: str | Path, skip_bad: bool = False, skipped: list | None = None) -> pd.DataFrame:
    """Read the competition layout: ``Train/<NC|MCI>/*.nii[.gz]`` and optional ``Test/*.nii[.gz]``."""
    root = Path(root)
    skipped = [] if skipped is None else skipped
    train = root / "Train"
    if not train.is_dir():
        raise PetmonaiError(
            f"{root}: no Train/ folder. Expected Train/NC/*.nii[.gz], Train/MCI/*.nii[.gz] "
            "(and optionally Test/*.nii[.gz]), or pass a CSV datalist with columns image,label"
        )
    rows = []
    for folder in sorted(p for p in train.iterdir() if p.is_dir()):
        if folder.name not in CLASS_TO_LABEL:
            raise PetmonaiError(
                f"{folder}: label folder '{folder.name}' is neither of {list(CLASS_NAMES)}; "
                "rename it or move it out of Train/"
            )
        files = _list_nifti(folder)
        if not files:
            raise PetmonaiError(f"{folder}: class folder holds no .nii or .nii.gz file")
        rows += [_row(f, "train", folder.name, skip_bad, skipped) for f in files]
    for name in CLASS_NAMES:
        if not (train / name).is_dir():
            raise PetmonaiError(f"{train / name}: missing class folder (both NC and MCI are needed)")
    test = root / "Test"
    if test.is_dir():
        rows += [_row(f, "test", "", skip_bad, skipped) for f in _list_nifti(test)]
    df = pd.DataFrame([r for r in rows if r is not None], columns=COLUMNS)
    check_unique_uuids(df)
    return df


def read_datalist_csv(csv_path: str | Path, skip_bad: bool = False, skipped: list | None = None) -> pd.DataFrame:
    """Read a CSV datalist: columns ``image,label`` (label NC/MCI or 0/1; empty = test), optional
    ``subject,site,split``. Relative image paths are taken relative to the CSV file."""
    csv_path = Path(csv_path)
    skipped = [] if skipped is None else skipped
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise PetmonaiError(f"{csv_path}: cannot read CSV datalist ({err})") from None
    missing = {"image", "label"} - set(table.columns)
    if missing:
        raise PetmonaiError(f"{csv_path}: missing column(s) {sorted(missing)}; needs image,label")
    rows = []
    for i, rec in table.iterrows():
        path = Path(rec["image"])
        path = path if path.is_absolute() else (csv_path.parent / path)
        label = rec["label"].strip()
        class_name = {"0": "NC", "1": "MCI"}.get(label, label.upper() if label else "")
        if class_name and class_name not in CLASS_TO_LABEL:
            raise PetmonaiError(f"{csv_path}, row {i + 2}: label '{label}' is neither NC/MCI nor 0/1")
        split = rec.get("split", "") or ("train" if class_name else "test")
        row = _row(path, split, class_name, skip_bad, skipped)
        if row is None:
            continue
        if rec.get("subject", ""):
            row["subject"], row["subject_source"] = rec["subject"], "csv"
        if rec.get("site", ""):
            row["site"] = rec["site"]
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    if not (df["split"] == "train").any():
        raise PetmonaiError(f"{csv_path}: no labelled scan in the datalist")
    check_unique_uuids(df)
    return df


def discover(root: str | Path, skip_bad: bool = False, skipped: list | None = None) -> pd.DataFrame:
    """Datalist from a competition-layout folder or a CSV file (see module docstring)."""
    root = Path(root)
    if not root.exists():
        raise PetmonaiError(f"{root}: data root does not exist")
    if root.is_file():
        return read_datalist_csv(root, skip_bad, skipped)
    return discover_layout(root, skip_bad, skipped)


def check_unique_uuids(df: pd.DataFrame) -> None:
    """Two files with one uuid (``7.nii`` and ``7.nii.gz``) would make one submission row ambiguous."""
    for split, part in df.groupby("split"):
        dup = part[part["scan_id"].duplicated(keep=False)]
        if len(dup):
            files = ", ".join(dup["image"])
            raise PetmonaiError(f"duplicate uuid in {split}: {files} (one file per uuid)")


def train_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["split"] == "train"].reset_index(drop=True)


def fingerprint(paths) -> str:
    """SHA-256 over the contents of the given files (sorted by path): identifies the input data."""
    digest = hashlib.sha256()
    for path in sorted(str(p) for p in paths):
        digest.update(Path(path).name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def to_items(df: pd.DataFrame) -> list[dict]:
    """MONAI-style data dicts: ``{"image": path, "label": int, "uuid": str}``."""
    return [
        {"image": r.image, "label": int(r.label), "uuid": str(r.uuid)}
        for r in df.itertuples(index=False)
    ]


def label_name(label: int) -> str:
    return CLASS_NAMES[int(label)]


__all__ = [
    "COLUMNS", "CLASS_TO_LABEL", "discover", "discover_layout", "read_datalist_csv", "read_header",
    "fingerprint", "to_items", "train_rows", "nifti_stem", "label_name",
]
