"""Data discovery: the competition folder layout, a CSV datalist or a BIDS dataset
(:mod:`petmonai.data.bids`), with header metadata.

One row per scan in a pandas DataFrame (the *datalist*). Here of a tiny synthetic cohort
(:mod:`petmonai.data.synthetic`) in a temporary folder; pass your data folder instead::

    >>> import tempfile
    >>> from pathlib import Path
    >>> from petmonai.data.discover import discover
    >>> from petmonai.data.synthetic import generate_cohort
    >>> tmp = tempfile.TemporaryDirectory()
    >>> root = generate_cohort(Path(tmp.name) / "pet", n_nc=2, n_mci=2, n_test=1, seed=0)
    >>> df = discover(root)                      # e.g. discover("../shared/data/pet2023")
    >>> df[["scan_id", "uuid", "split", "class_name", "label", "subject", "site"]]  # doctest: +NORMALIZE_WHITESPACE
      scan_id uuid  split class_name  label     subject site
    0   MCI/1    1  train        MCI      1  153_S_9667  153
    1   MCI/2    2  train        MCI      1  036_S_1154  036
    2    NC/1    1  train         NC      0  153_S_6478  153
    3    NC/2    2  train         NC      0  036_S_9555  036
    4  test/1    1   test                -1  105_S_1728  105
    >>> tmp.cleanup()

Columns: ``scan_id`` (``MCI/12``, ``test/7``: stable across machines), ``image`` (absolute path), ``uuid`` (file stem), ``split`` (train/test),
``class_name`` (one of the run's two ``classes``, NC/MCI by default; '' for test), ``label`` (the
second, positive class = 1, the first = 0, -1 unlabelled), ``subject``, ``subject_source``
(header/csv/file/bids), ``site``, ``dtype``, ``shape``, ``n_slices``, ``voxel_x``, ``voxel_y``,
``voxel_z``; a BIDS datalist adds ``session`` and ``tracer`` (:data:`BIDS_COLUMNS`).

The classes are the config's ``data.classes`` (:func:`data_options`): the challenge layout's class
folders are ``Train/<negative>`` and ``Train/<positive>``, a CSV's labels are class names or 0/1.

Only headers are read here; voxels are decoded later, once, by the cached preprocessing.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import zlib
from pathlib import Path

import nibabel as nib
import pandas as pd

from petmonai import CLASS_NAMES
from petmonai.data.bids import (
    LABEL_COLUMN,
    BidsLabels,
    is_bids,
    keeps_tracer,
    pet_files,
    read_sidecar,
    scan_tracer,
    sidecar_site,
)
from petmonai.data.classes import check_classes, parse_label, run_classes
from petmonai.errors import DataError, PetmonaiError
from petmonai.runs import get_logger, sha256_file

log = get_logger("data")


NIFTI_SUFFIXES = (".nii.gz", ".nii")


ADNI_SUBJECT = re.compile(r"^(\d{3})_S_(\d{4})$")


COLUMNS = [
    "scan_id", "image", "uuid", "split", "class_name", "label", "subject", "subject_source", "site",
    "dtype", "shape", "n_slices", "voxel_x", "voxel_y", "voxel_z",
]


BIDS_COLUMNS = ["session", "tracer"]
"""Columns a BIDS datalist adds to :data:`COLUMNS` (the ``ses-`` and ``trc-`` entities, '' when absent)."""


def data_options(cfg: dict | None) -> dict:
    """The discovery options of a config's ``data:`` section (``classes``, ``label_column``, ``tracer``), for
    :func:`discover`; a config saved before these keys existed reads the challenge's defaults."""
    data = (cfg or {}).get("data") or {}
    return {"classes": run_classes(cfg),
            "label_column": str(data.get("label_column") or LABEL_COLUMN), "tracer": data.get("tracer")}


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
    try:  # nibabel turns an unreadable file into "Could not read file", as if it were corrupt
        with open(path, "rb") as fh:
            fh.read(1)
    except PermissionError:
        raise DataError(path, "permission denied: the file cannot be read (check its owner and mode)") from None
    except OSError as err:
        raise DataError(path, f"cannot be read ({err.strerror or err})") from None
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
    check_file_size(path, img, shape)
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


def check_file_size(path: Path, img, shape: tuple[int, ...]) -> None:
    """An uncompressed ``.nii`` must hold every voxel its header promises (cheap: one ``stat``).

    A truncated copy or a header-only file otherwise passes the header read and fails later
    with an obscure decoding error. (A ``.nii.gz`` is checked when decoded: :func:`verify_gzip`.)
    """
    if not path.name.endswith(".nii"):
        return
    header = img.header
    try:  # nibabel keeps the voxel offset on the array proxy (the header's vox_offset reads 0 once loaded)
        offset = int(getattr(img.dataobj, "offset", None) or header.get_data_offset())
        itemsize = header.get_data_dtype().itemsize
    except Exception:  # an exotic header: leave it to the decoder
        return
    n_voxels = 1
    for s in shape:
        n_voxels *= s
    expected, size = offset + n_voxels * itemsize, path.stat().st_size
    if size >= expected:
        return
    dims = "x".join(map(str, shape))
    if size <= offset:
        raise DataError(path, f"header only: the file ends after the header ({size} bytes) and holds none of "
                              f"the {dims} voxels it declares; re-copy or re-export the volume")
    raise DataError(path, f"truncated: {size} bytes, but the header declares {dims} voxels of "
                          f"{header.get_data_dtype()} ({expected} bytes with the header); re-copy or re-export it")


def verify_gzip(path: str | Path) -> None:
    """Read a ``.gz`` file to its end, so that gzip checks its CRC and length.

    nibabel stops reading when it has the voxels, so a damaged deflate stream can decode into
    wrong voxels without any error; only reading to the end verifies the checksum.
    Raises :class:`DataError` naming the file. About 20 ms for a 2 MB volume.
    """
    path = Path(path)
    if not path.name.endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 22):
                pass
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(path, f"damaged compressed data ({type(err).__name__}: {err}): the file is corrupt or "
                              "truncated; re-copy or re-export it") from None
    except PermissionError:
        raise DataError(path, "permission denied: the file cannot be read") from None


def list_nifti(folder: Path) -> list[Path]:
    """The ``*.nii``/``*.nii.gz`` files of ``folder`` (not recursive) in natural order (2 before 10);
    anything else in it is named in a warning, not silently dropped."""
    files, ignored = [], []
    for p in folder.iterdir():
        (files if is_nifti(p) else ignored).append(p)
    ignored = [p.name for p in ignored if not p.name.startswith(".")]
    if ignored:  # said, not silently dropped: e.g. 7.NII.GZ, 7.nii.bz2, an Analyze .hdr/.img pair
        log.warning("%s: ignored %d entr%s not named *.nii or *.nii.gz: %s", folder, len(ignored),
                    "y" if len(ignored) == 1 else "ies",
                    ", ".join(sorted(ignored)[:5]) + (" ..." if len(ignored) > 5 else ""))
    return sorted(files, key=_natural_key)


def _natural_key(path: Path):
    stem = nifti_stem(path)
    return (0, int(stem), path.name) if stem.isdigit() else (1, 0, path.name)


def bad_files_error(bad: list[dict], limit: int = 10) -> DataError:
    """One error for every unusable file (``{"image", "problem"}`` rows): named by the first,
    listing the others, ending with the way out."""
    first, rest = bad[0], bad[1:]
    text = first["problem"] + "".join(f"; {b['image']}: {b['problem']}" for b in rest[: limit - 1])
    if len(rest) >= limit:
        text += f"; and {len(rest) - limit + 1} more"
    return DataError(first["image"], text + "; --skip-bad leaves such files out (and lists them)")


def _row(path: Path, split: str, class_name: str, skip_bad: bool, skipped: list, label: int = -1) -> dict | None:
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
        "label": label,
        **meta,
    }


def discover_layout(root: str | Path, skip_bad: bool = False, skipped: list | None = None,
                    classes=CLASS_NAMES) -> pd.DataFrame:
    """Read the competition layout: ``Train/<class>/*.nii[.gz]`` for both ``classes`` (``Train/NC``,
    ``Train/MCI``) and optional ``Test/*.nii[.gz]``."""
    root = Path(root)
    classes = check_classes(classes)
    skipped = [] if skipped is None else skipped
    bad: list[dict] = []  # every unreadable file, to name them all in one error
    train = root / "Train"
    if not train.is_dir():
        raise PetmonaiError(
            f"{root}: no Train/ folder. Expected Train/{classes[0]}/*.nii[.gz], Train/{classes[1]}/*.nii[.gz] "
            "(and optionally Test/*.nii[.gz]), a BIDS dataset (dataset_description.json and sub-*/ folders), "
            "or pass a CSV datalist with columns image,label"
        )
    rows = []
    for folder in sorted(p for p in train.iterdir() if p.is_dir()):
        if folder.name not in classes:
            raise PetmonaiError(
                f"{folder}: label folder '{folder.name}' is neither of the classes {list(classes)} "
                "(data.classes); rename it, move it out of Train/ or set --set data.classes=[NEGATIVE,POSITIVE]"
            )
        files = list_nifti(folder)
        if not files:
            raise PetmonaiError(f"{folder}: class folder holds no .nii or .nii.gz file")
        rows += [_row(f, "train", folder.name, True, bad, classes.index(folder.name)) for f in files]
    for name in classes:
        if not (train / name).is_dir():
            raise PetmonaiError(f"{train / name}: missing class folder (both {classes[0]} and {classes[1]} are needed)")
    test = root / "Test"
    if test.is_dir():
        rows += [_row(f, "test", "", True, bad) for f in list_nifti(test)]
    if bad and not skip_bad:
        raise bad_files_error(bad)
    skipped += bad
    df = pd.DataFrame([r for r in rows if r is not None], columns=COLUMNS)
    check_unique_uuids(df)
    return df


def read_datalist_csv(csv_path: str | Path, skip_bad: bool = False, skipped: list | None = None,
                      classes=CLASS_NAMES) -> pd.DataFrame:
    """Read a CSV datalist: columns ``image,label`` (label one of ``classes`` or 0/1; empty = test), optional
    ``subject,site,split``. Relative image paths are taken relative to the CSV file."""
    csv_path = Path(csv_path)
    classes = check_classes(classes)
    skipped = [] if skipped is None else skipped
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise PetmonaiError(f"{csv_path}: cannot read CSV datalist ({err})") from None
    missing = {"image", "label"} - set(table.columns)
    if missing:
        raise PetmonaiError(f"{csv_path}: missing column(s) {sorted(missing)}; needs image,label")
    rows, bad = [], []
    for i, rec in table.iterrows():
        path = Path(rec["image"])
        path = path if path.is_absolute() else (csv_path.parent / path)
        label = parse_label(rec["label"], classes, f"{csv_path}, row {i + 2}")
        class_name = "" if label is None else classes[label]
        split = rec.get("split", "") or ("train" if class_name else "test")
        row = _row(path, split, class_name, True, bad, -1 if label is None else label)
        if row is None:
            continue
        if rec.get("subject", ""):
            row["subject"], row["subject_source"] = rec["subject"], "csv"
        if rec.get("site", ""):
            row["site"] = rec["site"]
        rows.append(row)
    if bad and not skip_bad:
        raise bad_files_error(bad)
    skipped += bad
    df = pd.DataFrame(rows, columns=COLUMNS)
    if not (df["split"] == "train").any():
        raise PetmonaiError(f"{csv_path}: no labelled scan in the datalist")
    check_unique_uuids(df)
    return df


def _scan_row(path: Path, entities: dict, labels: BidsLabels | None, sidecar: dict | None, classes) -> dict:
    """One datalist row (without the header metadata) of a PET file."""
    subject, session = f"sub-{entities['sub']}", entities.get("ses")
    found = labels.row(subject, session, path) if labels is not None else {"label": None, "site": ""}
    label = found["label"]
    return {
        "scan_id": entities["stem"], "image": str(path.resolve()), "uuid": entities["stem"],
        "split": "test" if label is None else "train", "class_name": "" if label is None else classes[label],
        "label": -1 if label is None else label, "subject": subject, "subject_source": "bids",
        "site": found["site"] or sidecar_site(sidecar), "session": session or "",
        "tracer": scan_tracer(entities, sidecar),
    }


def discover_bids(root: str | Path, skip_bad: bool = False, skipped: list | None = None, *, classes=CLASS_NAMES,
                  label_column: str = LABEL_COLUMN, tracer: str | None = None, labels: bool = True) -> pd.DataFrame:
    """The datalist of a BIDS dataset (:mod:`petmonai.data.bids` says what is read from where), with
    :data:`BIDS_COLUMNS`; ``labels=False`` reads no label (every scan unlabelled: what
    :func:`petmonai.inference.predictor.predict` scores). Sessions without a label are the ``test`` split."""
    root, classes = Path(root), check_classes(classes)
    skipped = [] if skipped is None else skipped
    files = pet_files(root)
    if not files:
        raise DataError(root, "BIDS dataset without PET files (sub-<id>/[ses-<id>/]pet/sub-<id>..._pet.nii[.gz])")
    table = BidsLabels(root, classes, label_column, needed=labels) if labels else None
    rows, bad, no_sidecar, tracers = [], [], [], set()
    for path, entities in files:
        sidecar = read_sidecar(path)
        tracers.add(scan_tracer(entities, sidecar) or "(none)")
        if not keeps_tracer(entities, sidecar, tracer):
            continue
        if sidecar is None:
            no_sidecar.append(path.name)
        row = _scan_row(path, entities, table, sidecar, classes)
        try:
            meta = read_header(path)
        except DataError as err:
            bad.append({"image": str(path), "problem": err.problem})
            continue
        rows.append({**row, **{k: v for k, v in meta.items() if k not in ("subject", "subject_source", "site")}})
    if not rows and not bad:
        raise DataError(root, f"no PET file with tracer '{tracer}' (data.tracer); the dataset's tracers: "
                              f"{', '.join(sorted(tracers))}")
    _warn_incomplete(root, table, {r["subject"] for r in rows}, no_sidecar)
    if bad and not skip_bad:
        raise bad_files_error(bad)
    skipped += bad
    df = pd.DataFrame(rows, columns=COLUMNS + BIDS_COLUMNS)
    if labels and not (df["split"] == "train").any():
        raise PetmonaiError(f"{root}: no PET file has a label in column '{label_column}' (data.label_column): "
                            "nothing to train on")
    check_unique_uuids(df)
    return df


def _warn_incomplete(root: Path, labels: BidsLabels | None, subjects: set[str], no_sidecar: list[str]) -> None:
    if no_sidecar:
        log.warning("%s: %d PET file(s) have no _pet.json sidecar (PET-BIDS requires one; site and tracer then come "
                    "from the tables only): %s", root, len(no_sidecar),
                    ", ".join(no_sidecar[:5]) + (" ..." if len(no_sidecar) > 5 else ""))
    missing = labels.subjects_without_files(subjects) if labels is not None else []
    if missing:
        log.warning("%s: %d subject(s) of participants.tsv have no PET file: %s", labels.participants_path,
                    len(missing), ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))


def discover(root: str | Path, skip_bad: bool = False, skipped: list | None = None, *, classes=CLASS_NAMES,
             label_column: str = LABEL_COLUMN, tracer: str | None = None) -> pd.DataFrame:
    """Datalist from a competition-layout folder, a CSV file or a BIDS dataset (see module docstring).

    ``classes``: the two groups, negative first (``data.classes``); ``label_column`` and ``tracer``
    (``data.label_column``, ``data.tracer``) apply to BIDS. :func:`data_options` reads all three from a config."""
    root = Path(root)
    if not root.exists():
        raise PetmonaiError(f"{root}: data root does not exist")
    if root.is_file():
        return read_datalist_csv(root, skip_bad, skipped, classes)
    if is_bids(root):
        return discover_bids(root, skip_bad, skipped, classes=classes, label_column=label_column, tracer=tracer)
    return discover_layout(root, skip_bad, skipped, classes)


def check_unique_uuids(df: pd.DataFrame) -> None:
    """Two files with one uuid (``7.nii`` and ``7.nii.gz``) would make one submission row ambiguous."""
    for split, part in df.groupby("split"):
        dup = part[part["scan_id"].duplicated(keep=False)]
        if len(dup):
            files = ", ".join(dup["image"])
            raise PetmonaiError(f"duplicate uuid in {split}: {files} (one file per uuid)")


def train_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["split"] == "train"].reset_index(drop=True)


def content_order(df: pd.DataFrame) -> pd.DataFrame:
    """The rows sorted by the SHA-256 of their image file (then ``scan_id``): an order that depends on
    the scans alone, not on the layout, the file names or the listing order. Cross-validation works in
    this order, so the challenge layout, its BIDS copy and a CSV datalist of the same files make the
    same folds and the same seeded training shuffles (identical out-of-fold probabilities on CPU)."""
    if df.empty:
        return df.reset_index(drop=True)
    keys = df["image"].map(lambda path: sha256_file(path) if Path(path).is_file() else "")
    order = pd.DataFrame({"key": keys, "scan_id": df["scan_id"].astype(str)}).sort_values(["key", "scan_id"]).index
    return df.loc[order].reset_index(drop=True)


def fingerprint(paths) -> str:
    """SHA-256 over the contents of the given files (sorted by path): identifies the input data.

    A file that cannot be read (e.g. one left out with ``--skip-bad`` for that reason) counts by
    its name and the kind of error, instead of ending the command with a traceback."""
    digest = hashlib.sha256()
    for path in sorted(str(p) for p in paths):
        digest.update(Path(path).name.encode())
        try:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        except OSError as err:
            digest.update(f"\0unreadable:{type(err).__name__}\0".encode())
    return digest.hexdigest()


def to_items(df: pd.DataFrame) -> list[dict]:
    """MONAI-style data dicts: ``{"image": path, "label": int, "scan_id": str}``."""
    return [{"image": r.image, "label": int(r.label), "scan_id": r.scan_id} for r in df.itertuples(index=False)]
