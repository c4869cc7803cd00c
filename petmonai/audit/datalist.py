"""Data audit: what the datalist holds, and what could let a model cheat.

Small brain-PET data sets mix sites, scanners and protocols, repeat subjects, and reuse
Train subjects in Test. A model trained on such data can learn the scanner instead of the
disease. The audit makes these facts visible before any training. Here on a tiny synthetic
cohort (:mod:`petmonai.data.synthetic`, in a temporary folder) whose classes come from disjoint sites
and scanner protocols, as in the real data; pass your data folder instead::

    >>> import tempfile
    >>> from pathlib import Path
    >>> from petmonai.data.discover import discover
    >>> from petmonai.data.synthetic import generate_cohort
    >>> from petmonai.audit.datalist import audit_datalist, audit_markdown, write_audit
    >>> tmp = tempfile.TemporaryDirectory()
    >>> root = generate_cohort(Path(tmp.name) / "pet", n_nc=4, n_mci=4, n_test=2, seed=0, confounded=True)
    >>> report = audit_datalist(discover(root))   # e.g. discover("../shared/data/pet2023")
    >>> print(audit_markdown(report))             # doctest: +ELLIPSIS
    # Data audit
    <BLANKLINE>
    ## Warnings
    <BLANKLINE>
    > **WARNING: no site contributes both classes: site separates the classes (NC: 036 073 153; MCI: 013 132 146)...
    >>> sorted(write_audit(report, Path(tmp.name) / "audit"))   # audit.json + audit.md
    ['json', 'markdown']
    >>> tmp.cleanup()

The report is a plain, JSON-serialisable ``dict``. Its ``warnings`` list holds loud strings
(each begins with ``WARNING``) for problems that can invalidate a result: site/class
confounding, header properties that predict the class, subjects without id, one subject in
both classes. ``notes`` holds facts that constrain how to evaluate (repeated subjects,
Test subjects seen in Train, Test sites unseen in Train).

Separability: for every header property the in-sample ROC AUC of the property as a
predictor of the label (the positive class, MCI by default, = 1) is computed on the labelled Train
scans. A categorical property scores each value by its positive fraction; a continuous one uses the value
itself; the AUC is reported as ``max(auc, 1 - auc)`` so 0.5 means "uninformative" and 1.0
means "separates the classes". The property list is open: pass ``properties`` to add columns
(e.g. intensity statistics) to the check. A BIDS datalist's ``tracer`` is checked too, and its scans
are named by subject and session (the Test uuid check of the challenge's submission does not apply).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from petmonai import CLASS_NAMES
from petmonai.errors import PetmonaiError

AUDIT_VERSION = 1


AUC_WARN = 0.8


"""Separability AUC at or above which a property gets a warning."""


MARKER_FRACTION = 0.9


MARKER_MIN_SCANS = 3


"""A categorical value held by >= MARKER_MIN_SCANS Train scans of which >= MARKER_FRACTION are
one class is a *marker*: reported (as a note) even when the property's AUC is below the
warning level, e.g. a data type used almost only for MCI scans."""


UNKNOWN = "(unknown)"


"""Key used for an empty/missing site, dtype, ... in count tables."""


DEFAULT_PROPERTIES: dict[str, str] = {
    "site": "categorical",
    "dtype": "categorical",
    "shape": "categorical",
    "n_slices": "continuous",
    "voxel_x": "continuous",
    "voxel_y": "continuous",
    "voxel_z": "continuous",
}


"""Header properties checked by default: column name -> ``categorical`` or ``continuous``."""


OPTIONAL_PROPERTIES: dict[str, str] = {"tracer": "categorical"}


"""Checked by default when the datalist has the column (BIDS: :data:`petmonai.data.discover.BIDS_COLUMNS`)."""


REQUIRED_COLUMNS = ("image", "uuid", "split", "class_name", "label", "subject", "subject_source")


NO_DB_NAME = "no db_name: each such file is treated as its own subject"


_ROUND = 4  # decimals for voxel sizes and other floats in the report


def _py(value):
    """Plain Python scalar for JSON (numpy types, NaN -> None)."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _is_missing(value) -> bool:
    if value is None or value is pd.NA:
        return True
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _as_text(series: pd.Series) -> pd.Series:
    """Categorical values as stripped strings; missing -> ''."""
    return series.map(lambda v: "" if _is_missing(v) else str(v).strip()).astype(object)


def _counts(series: pd.Series) -> dict[str, int]:
    """Value -> count, most frequent first (ties by value); '' shown as ``(unknown)``."""
    text = _as_text(series).replace("", UNKNOWN)
    counts = text.value_counts()
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return {str(k): int(v) for k, v in items}


def _round(x):
    x = _py(x)
    return None if x is None else round(float(x), _ROUND)


def _numeric(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series, errors="coerce").astype(float)


def _range(series: pd.Series) -> dict:
    values = _numeric(series).dropna()
    if values.empty:
        return {"min": None, "max": None, "values": []}
    distinct = sorted({round(float(v), _ROUND) for v in values})
    return {"min": _round(values.min()), "max": _round(values.max()), "values": distinct}


def rank_auc(scores, labels) -> float | None:
    """ROC AUC of ``scores`` for binary ``labels`` (1 positive), ties counted half
    (Mann-Whitney U). ``None`` when a class is absent."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=int)
    n_pos = int((labels == 1).sum())
    n_neg = int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    u = ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _normalise_properties(df: pd.DataFrame, properties) -> tuple[dict[str, str], list[str]]:
    """``{column: kind}`` and the default columns skipped because the datalist lacks them."""
    skipped: list[str] = []
    if properties is None:
        props = {c: k for c, k in {**DEFAULT_PROPERTIES, **OPTIONAL_PROPERTIES}.items() if c in df.columns}
        skipped = [c for c in DEFAULT_PROPERTIES if c not in df.columns]
        return props, skipped
    if isinstance(properties, str):
        properties = [properties]
    if isinstance(properties, Mapping):
        props = {str(c): str(k) for c, k in properties.items()}
    elif isinstance(properties, Sequence):
        props = {}
        for col in properties:
            col = str(col)
            if col in DEFAULT_PROPERTIES:
                props[col] = DEFAULT_PROPERTIES[col]
            elif col in df.columns and pd.api.types.is_numeric_dtype(df[col]) \
                    and not pd.api.types.is_bool_dtype(df[col]):
                props[col] = "continuous"
            else:
                props[col] = "categorical"
    else:
        raise PetmonaiError(
            f"audit properties must be a list of column names or a mapping column -> kind, "
            f"not {type(properties).__name__}"
        )
    missing = [c for c in props if c not in df.columns]
    if missing:
        raise PetmonaiError(
            f"audit: the datalist has no column(s) {missing}; available: {list(df.columns)}"
        )
    bad = {c: k for c, k in props.items() if k not in ("categorical", "continuous")}
    if bad:
        raise PetmonaiError(f"audit: property kind must be 'categorical' or 'continuous', got {bad}")
    return props, skipped


def property_separability(df: pd.DataFrame, column: str, kind: str, threshold: float = AUC_WARN,
                          classes=None) -> dict:
    """In-sample ROC AUC of one property as a predictor of the label, on labelled rows.

    ``df`` holds the labelled Train rows (``label`` 0/1). Rows where the property is missing
    are left out (``n_scans`` says how many were used). ``classes``: the names of labels 0 and 1
    (default: :func:`datalist_classes` of ``df``).
    """
    classes = datalist_classes(df) if classes is None else tuple(classes)
    labels = pd.to_numeric(df["label"], errors="coerce")
    keep = labels.isin([0, 1])
    entry: dict = {"property": column, "kind": kind}
    if kind == "categorical":
        values = _as_text(df[column])
        keep &= values != ""
        values, y = values[keep], labels[keep].astype(int)
        frac = y.groupby(values).mean()
        scores = values.map(frac).astype(float)
        auc = rank_auc(scores, y)
        table = {}
        for value in sorted(values.unique(), key=lambda v: (-int((values == v).sum()), v)):
            sel = values == value
            table[str(value)] = {
                name: int(((y == i) & sel).sum()) for i, name in enumerate(classes)
            }
        entry["values"] = table
        entry["n_values"] = len(table)
        markers = []
        for value, counts in table.items():
            total = sum(counts.values())
            name, top = max(counts.items(), key=lambda kv: kv[1])
            if total >= MARKER_MIN_SCANS and top / total >= MARKER_FRACTION:
                markers.append({"value": value, "class_name": name, "scans": total,
                                "class_scans": top, "fraction": round(top / total, 3)})
        entry["marker_values"] = markers
    else:
        values = _numeric(df[column])
        keep &= values.notna()
        values, y = values[keep], labels[keep].astype(int)
        auc = rank_auc(values, y)
        entry["ranges"] = {
            name: ([_round(values[y == i].min()), _round(values[y == i].max())]
                   if (y == i).any() else None)
            for i, name in enumerate(classes)
        }
        if auc is not None:
            entry["direction"] = f"higher in {classes[1] if auc >= 0.5 else classes[0]}"
    entry["n_scans"] = int(keep.sum())
    if auc is None:
        entry.update(auc=None, separates=False, warn=False)
        entry["reason"] = "needs labelled scans of both classes with a known value"
        return entry
    auc = max(auc, 1.0 - auc)
    entry["auc"] = round(auc, _ROUND)
    entry["separates"] = bool(auc >= 1.0 - 1e-9)
    entry["warn"] = bool(auc >= threshold - 1e-12)
    return entry


def _property_warning(entry: dict) -> str:
    col, auc = entry["property"], entry["auc"]
    if entry["kind"] == "categorical":
        parts = "; ".join(
            f"{v}: " + ", ".join(f"{n} {c}" for c, n in counts.items())
            for v, counts in entry["values"].items()
        )
        detail = f" (Train scans per value: {parts})"
    else:
        ranges = "; ".join(
            f"{c} {r[0]}-{r[1]}" for c, r in entry["ranges"].items() if r is not None
        )
        detail = f" (Train ranges: {ranges})"
    if entry["separates"]:
        what = f"header property '{col}' SEPARATES the classes (AUC {auc:.2f})"
    else:
        what = f"header property '{col}' strongly predicts the class (AUC {auc:.2f})"
    return (
        f"WARNING: {what}{detail}: a model can learn the acquisition protocol instead of the "
        "disease; harmonise it in preprocessing and validate across sites"
    )


def _normalised(df: pd.DataFrame) -> pd.DataFrame:
    """The datalist with text columns stripped, labels as integers (-1 unlabelled) and every scan without
    a subject id as its own subject (``subject_source`` ``file``)."""
    df = df.reset_index(drop=True).copy()
    df["split"] = _as_text(df["split"]).str.lower()
    df["class_name"] = _as_text(df["class_name"])
    df["subject"] = _as_text(df["subject"])
    df["subject_source"] = _as_text(df["subject_source"])
    df["label"] = pd.to_numeric(df["label"], errors="coerce").fillna(-1).astype(int)
    df["site"] = _as_text(df["site"]) if "site" in df.columns else ""
    no_id = (df["subject"] == "") | (df["subject_source"] == "file")
    df.loc[df["subject"] == "", "subject"] = "file:" + df["image"].astype(str)
    df["subject_source"] = df["subject_source"].where(~no_id, "file")
    return df


def _header_counts(part: pd.DataFrame, entry: dict) -> dict:
    """``entry`` with the data types, shapes, slice counts and voxel sizes of ``part`` added."""
    for col, key in (("dtype", "dtypes"), ("shape", "shapes"), ("n_slices", "n_slices"), ("tracer", "tracers"),
                     ("session", "sessions")):
        if col in part.columns and len(part):
            entry[key] = _counts(part[col])
    voxels = {c: _range(part[c]) for c in ("voxel_x", "voxel_y", "voxel_z") if c in part.columns}
    if voxels and len(part):
        entry["voxel_sizes"] = voxels
    return entry


def _class_entries(train: pd.DataFrame, class_names: list[str], warnings: list[str]) -> dict:
    """Per class: scans, subjects, scans per subject, sites and header properties."""
    classes = {}
    for name in class_names:
        part = train[train["class_name"] == name]
        per_subject = part.groupby("subject").size()
        classes[name] = _header_counts(part, {
            "scans": int(len(part)),
            "subjects": int(part["subject"].nunique()),
            "subjects_unknown_id": int((part["subject_source"] == "file").sum()),
            "scans_per_subject": {
                "min": int(per_subject.min()),
                "mean": round(float(per_subject.mean()), 2),
                "max": int(per_subject.max()),
            },
            "sites": _counts(part["site"]),
        })
    unlabelled_train = train[~train["label"].isin([0, 1])]
    if len(unlabelled_train):
        warnings.append(
            f"WARNING: {len(unlabelled_train)} Train scan(s) have no label "
            f"(e.g. {unlabelled_train['image'].iloc[0]}); they are left out of the audit of classes"
        )
    return classes


def _test_entry(df: pd.DataFrame, test: pd.DataFrame, warnings: list[str], notes: list[str]) -> dict:
    """The Test scans: counts, sites, header properties, file names that are no integer uuid."""
    entry = _header_counts(test, {
        "scans": int(len(test)),
        "subjects": int(test["subject"].nunique()),
        "subjects_unknown_id": int((test["subject_source"] == "file").sum()),
        "sites": _counts(test["site"]) if len(test) else {},
    })
    # the challenge's submission has one row per Test file, keyed by the integer uuid of its name (BIDS scans
    # are named by subject and session instead)
    bad_uuid = [] if "session" in df.columns else [
        str(i) for u, i in zip(_as_text(test["uuid"]), test["image"]) if not (u.isascii() and u.isdigit())]
    entry["non_integer_uuid"] = bad_uuid
    if bad_uuid:
        warnings.append(
            f"WARNING: {len(bad_uuid)} Test file(s) are not named <integer uuid>.nii[.gz] "
            f"({', '.join(bad_uuid[:5])}{' ...' if len(bad_uuid) > 5 else ''}): the submission is keyed by "
            "that uuid, so predict.py refuses them; rename them"
        )
    if not len(test):
        notes.append("NOTE: no Test scans (no Test/ folder, or it is empty): nothing to predict")
    other_splits = sorted(set(df["split"]) - {"train", "test"})
    if other_splits:
        notes.append(f"NOTE: rows with split {other_splits} are neither train nor test and are "
                     "only counted in the subject checks")
    return entry


def _repeated_subjects(df: pd.DataFrame, warnings: list[str], notes: list[str]) -> list[dict]:
    """Subjects (with a known id) that have more than one scan, most scans first."""
    repeated = []
    for subject, part in df[df["subject_source"] != "file"].groupby("subject", sort=True):
        if len(part) < 2:
            continue
        repeated.append({
            "subject": str(subject),
            "site": str(part["site"].iloc[0]),
            "n_scans": int(len(part)),
            "splits": sorted(set(part["split"])),
            "classes": sorted(set(part["class_name"]) - {""}),
            "files": [
                {"split": s, "class_name": c, "uuid": str(u), "image": str(i)}
                for s, c, u, i in zip(part["split"], part["class_name"], part["uuid"], part["image"])
            ],
        })
    repeated.sort(key=lambda r: (-r["n_scans"], r["subject"]))
    n_train_repeated = sum(1 for r in repeated if sum(f["split"] == "train" for f in r["files"]) > 1)
    if n_train_repeated:
        notes.append(
            f"NOTE: {n_train_repeated} subject(s) have more than one Train scan: cross-validation "
            "must group folds by subject, or the same person is in training and validation"
        )
    for r in repeated:
        if len(r["classes"]) > 1:
            warnings.append(
                f"WARNING: subject {r['subject']} has Train scans in several classes "
                f"({', '.join(r['classes'])}): conflicting labels for one person"
            )
    return repeated


def _test_in_train(train: pd.DataFrame, test: pd.DataFrame, notes: list[str]) -> list[dict]:
    """Test scans whose subject (a known id) also has Train scans."""
    train_known = train[train["subject_source"] != "file"]
    train_by_subject = {s: part for s, part in train_known.groupby("subject", sort=False)}
    test_in_train = []
    for row in test[test["subject_source"] != "file"].itertuples(index=False):
        part = train_by_subject.get(row.subject)
        if part is None:
            continue
        test_in_train.append({
            "uuid": str(row.uuid),
            "image": str(row.image),
            "subject": str(row.subject),
            "train_classes": sorted(set(part["class_name"]) - {""}),
            "train_files": [str(i) for i in part["image"]],
        })
    if test_in_train:
        notes.append(
            f"NOTE: {len(test_in_train)} Test scan(s) belong to subjects that are in Train "
            "(other visits of the same person): Test results on them overstate generalisation"
        )
    return test_in_train


def _sites(labelled: pd.DataFrame, train: pd.DataFrame, test: pd.DataFrame, class_names: list[str],
           warnings: list[str], notes: list[str]) -> tuple[dict, bool]:
    """Sites per class, sites with both classes, Test-only sites; ``(entry, site_confounded)``."""
    site_known = labelled[labelled["site"] != ""]
    site_classes = site_known.groupby("site")["label"].agg(lambda s: set(s))
    sites_both = sorted(str(s) for s, labs in site_classes.items() if labs >= {0, 1})
    sites_by_class = {
        name: sorted(set(site_known.loc[site_known["class_name"] == name, "site"]))
        for name in class_names
    }
    train_sites = set(train.loc[train["site"] != "", "site"])
    test_sites = set(test.loc[test["site"] != "", "site"])
    test_only_sites = sorted(test_sites - train_sites)
    n_site_unknown = int((labelled["site"] == "").sum())
    has_both_classes = set(site_known["label"]) >= {0, 1}
    site_confounded = has_both_classes and not sites_both
    if site_confounded:
        per_class = "; ".join(f"{c}: {' '.join(s)}" for c, s in sites_by_class.items())
        warnings.append(
            "WARNING: no site contributes both classes: site separates the classes "
            f"({per_class}). A model can learn the scanner instead of the disease; "
            "an in-distribution cross-validation score is not evidence of disease detection"
        )
    if len(labelled) and n_site_unknown == len(labelled):
        warnings.append(
            "WARNING: the site of every Train scan is unknown: the site/class confound "
            "cannot be checked"
        )
    elif n_site_unknown:
        notes.append(f"NOTE: {n_site_unknown} Train scan(s) have no known site")
    if test_only_sites:
        notes.append(
            f"NOTE: Test holds site(s) absent from Train: {' '.join(test_only_sites)} "
            f"({int(test['site'].isin(test_only_sites).sum())} Test scans)"
        )
    entry = {"by_class": sites_by_class, "with_both_classes": sites_both,
             "test_absent_from_train": test_only_sites, "train_unknown": n_site_unknown}
    return entry, site_confounded


def _unknown_subjects(df: pd.DataFrame, warnings: list[str]) -> dict:
    unknown = df[df["subject_source"] == "file"]
    if len(unknown):
        warnings.append(
            f"WARNING: {len(unknown)} scan(s) have no subject id ({NO_DB_NAME}); repeated scans "
            "of one person cannot be grouped and may leak between folds. Give a CSV datalist "
            "with a subject column"
        )
    return {
        "count": int(len(unknown)),
        "by_split": {str(k): int(v) for k, v in unknown["split"].value_counts().sort_index().items()},
        "files": [str(i) for i in unknown["image"]],
        "warning": NO_DB_NAME if len(unknown) else "",
    }


def _separability(labelled: pd.DataFrame, train: pd.DataFrame, test: pd.DataFrame, props: dict,
                  threshold: float, site_confounded: bool, warnings: list[str], notes: list[str],
                  classes: tuple[str, str]) -> list[dict]:
    """:func:`property_separability` of every property, with its warnings and notes."""
    separability = []
    for col, kind in props.items():
        entry = property_separability(labelled, col, kind, threshold, classes)
        separability.append(entry)
        if entry["warn"]:
            if not (col == "site" and site_confounded):  # else already said, louder, above
                warnings.append(_property_warning(entry))
        elif col != "site" and entry.get("marker_values"):
            said = "; ".join(
                f"'{m['value']}' is {m['class_name']} in {m['class_scans']} of {m['scans']} Train scans"
                for m in entry["marker_values"]
            )
            notes.append(
                f"NOTE: {col}: {said}: a shortcut for those scans, although {col} overall "
                f"predicts the class only weakly (AUC {entry['auc']:.2f})"
            )
        if kind == "categorical" and col != "site" and col in test.columns and len(test):
            unseen = sorted(set(_as_text(test[col])) - set(_as_text(train[col])) - {""})
            if unseen:
                n = int(_as_text(test[col]).isin(unseen).sum())
                notes.append(f"NOTE: {col}: Test holds value(s) absent from Train: "
                             f"{' '.join(unseen)} ({n} Test scans)")
    return separability


def datalist_classes(df: pd.DataFrame) -> tuple[str, str]:
    """The names of labels 0 and 1 as the datalist's rows give them (``class N`` for a label no row has)."""
    names = {}
    for label, name in zip(pd.to_numeric(df["label"], errors="coerce"), df["class_name"]):
        if label in (0, 1) and not _is_missing(name):
            names.setdefault(int(label), str(name).strip())
    return names.get(0, "class 0"), names.get(1, "class 1")


def audit_datalist(df: pd.DataFrame, properties=None, auc_threshold: float | None = None, classes=None) -> dict:
    """Audit a datalist (see :mod:`petmonai.data.discover`). Returns a JSON-serialisable ``dict``.

    ``properties``: columns to test for class separability, a list of names (kind inferred)
    or a mapping ``{column: 'categorical' | 'continuous'}``; default
    :data:`DEFAULT_PROPERTIES` (and :data:`OPTIONAL_PROPERTIES` present). ``auc_threshold``: warning
    level (default 0.8). ``classes``: the run's two classes, negative first (default: as the datalist names them).
    """
    if not isinstance(df, pd.DataFrame):
        raise PetmonaiError(f"audit: expected a pandas DataFrame datalist, got {type(df).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise PetmonaiError(f"audit: the datalist lacks column(s) {missing}")
    if df.empty:
        raise PetmonaiError("audit: the datalist is empty (no scan found)")
    props, skipped_props = _normalise_properties(df, properties)
    threshold = AUC_WARN if auc_threshold is None else float(auc_threshold)
    df = _normalised(df)
    train = df[df["split"] == "train"]
    labelled = train[train["label"].isin([0, 1])]
    test = df[df["split"] == "test"]
    warnings: list[str] = []
    notes: list[str] = []
    classes = datalist_classes(df) if classes is None else tuple(classes)
    class_names = [c for c in classes if (train["class_name"] == c).any()]
    class_names += sorted(set(train["class_name"]) - set(classes) - {""})
    class_entries = _class_entries(train, class_names, warnings)
    test_entry = _test_entry(df, test, warnings, notes)
    repeated = _repeated_subjects(df, warnings, notes)
    test_in_train = _test_in_train(train, test, notes)
    sites, site_confounded = _sites(labelled, train, test, class_names, warnings, notes)
    unknown_entry = _unknown_subjects(df, warnings)
    separability = _separability(labelled, train, test, props, threshold, site_confounded, warnings, notes, classes)
    return {
        "audit_version": AUDIT_VERSION,
        "n_scans": int(len(df)),
        "classes": list(classes),
        "train": {
            "scans": int(len(train)),
            "subjects": int(train["subject"].nunique()),
            "classes": class_entries,
        },
        "test": test_entry,
        "repeated_subjects": repeated,
        "test_in_train": test_in_train,
        "sites": sites,
        "unknown_subjects": unknown_entry,
        "separability": separability,
        "auc_threshold": threshold,
        "properties_skipped": skipped_props,
        "warnings": warnings,
        "notes": notes,
    }


def _md_escape(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_md_escape("" if v is None else v) for v in row) + " |")
    return lines


def _fmt_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in counts.items()) if counts else "-"


def _fmt_range(r: Mapping | None) -> str:
    if not r or r.get("min") is None:
        return "-"
    if r["min"] == r["max"]:
        return f"{r['min']:g}"
    return f"{r['min']:g}-{r['max']:g} ({len(r['values'])} values)"


def _md_warnings(report: dict) -> list[str]:
    out = ["## Warnings", ""]
    warnings = report.get("warnings", [])
    if warnings:
        for w in warnings:
            out += [f"> **{_md_escape(w)}**", ">"]
        out[-1] = ""
    else:
        out += ["No warnings: no site/class confound and no header property predicts the class "
                f"(AUC < {report.get('auc_threshold', AUC_WARN):g}).", ""]
    notes = report.get("notes", [])
    if notes:
        out += ["## Notes", ""] + [f"- {_md_escape(n)}" for n in notes] + [""]
    return out


def _md_counts(report: dict) -> list[str]:
    """Scans and subjects per class and in Test, then their header properties."""
    classes, test = report["train"]["classes"], report["test"]
    out = ["## Scans and subjects", ""]
    rows = []
    for name, c in classes.items():
        sps = c["scans_per_subject"]
        rows.append([f"Train {name}", c["scans"], c["subjects"],
                     f"{sps['min']} / {sps['mean']:g} / {sps['max']}", _fmt_counts(c["sites"])])
    rows.append(["Test", test["scans"], test["subjects"], "", _fmt_counts(test["sites"])])
    out += _md_table(["Split", "Scans", "Subjects", "Scans per subject (min/mean/max)", "Sites (scans)"], rows)
    out += ["", "## Header properties per class", ""]
    rows = []
    for name, c in [*((f"Train {n}", c) for n, c in classes.items()), ("Test", test)]:
        vs = c.get("voxel_sizes", {})
        rows.append([name, _fmt_counts(c.get("dtypes", {})), _fmt_counts(c.get("shapes", {})),
                     _fmt_range(vs.get("voxel_x")), _fmt_range(vs.get("voxel_y")), _fmt_range(vs.get("voxel_z"))])
    out += _md_table(["Split", "Data types", "Shapes", "Voxel x (mm)", "Voxel y (mm)", "Voxel z (mm)"], rows)
    if any("tracers" in c for c in [*classes.values(), test]):
        out += ["", "Tracers (BIDS `trc-`) and sessions: " + "; ".join(
            f"{name}: {_fmt_counts(c.get('tracers', {}))}, {len(c.get('sessions', {}))} session label(s)"
            for name, c in [*((f"Train {n}", c) for n, c in classes.items()), ("Test", test)])]
    return out + [""]


def _md_separability(report: dict) -> list[str]:
    negative, positive = report.get("classes") or CLASS_NAMES  # an audit.json written before "classes"
    out = ["## Separability of the classes by header property", "",
           f"In-sample ROC AUC of the property alone as a predictor of {positive} vs {negative} on the Train "
           "scans (0.5 = uninformative, 1.0 = separates). Categorical values are scored by their "
           f"{positive} fraction. Warning at AUC >= {report.get('auc_threshold', AUC_WARN):g}.", ""]
    rows = []
    for e in report["separability"]:
        if e["kind"] == "categorical":
            detail = "; ".join(
                f"{v}: " + " ".join(f"{c} {n}" for c, n in cnt.items())
                for v, cnt in e.get("values", {}).items()
            )
        else:
            detail = "; ".join(f"{c} {r[0]:g}-{r[1]:g}" for c, r in e.get("ranges", {}).items() if r)
        auc = "n/a" if e["auc"] is None else f"{e['auc']:.3f}"
        flag = "SEPARATES" if e["separates"] else ("WARNING" if e["warn"] else "")
        rows.append([e["property"], e["kind"], auc, flag, e["n_scans"], detail])
    out += _md_table(["Property", "Kind", "AUC", "Flag", "Scans", "Train scans per value / range"], rows)
    out.append("")
    sites = report["sites"]
    out += ["## Sites", ""]
    out.append(f"- Sites with both classes: {' '.join(sites['with_both_classes']) or 'none'}")
    for name, s in sites["by_class"].items():
        out.append(f"- Train {name} sites: {' '.join(s) or '-'}")
    out.append(f"- Test sites absent from Train: {' '.join(sites['test_absent_from_train']) or 'none'}")
    return out + [""]


def _md_subjects(report: dict) -> list[str]:
    """Repeated subjects, Test subjects seen in Train, scans without subject id."""
    out = [f"## Subjects with more than one scan ({len(report['repeated_subjects'])})", ""]
    if report["repeated_subjects"]:
        rows = [[r["subject"], r["n_scans"], " ".join(r["splits"]), " ".join(r["classes"]),
                 ", ".join(f"{f['split']}/{f['class_name'] + '/' if f['class_name'] else ''}{f['uuid']}"
                           for f in r["files"])]
                for r in report["repeated_subjects"]]
        out += _md_table(["Subject", "Scans", "Splits", "Classes", "Files"], rows)
    else:
        out.append("None.")
    out += ["", f"## Test scans whose subject is in Train ({len(report['test_in_train'])})", ""]
    if report["test_in_train"]:
        rows = [[t["uuid"], t["subject"], " ".join(t["train_classes"]),
                 ", ".join(Path(p).name for p in t["train_files"])]
                for t in report["test_in_train"]]
        out += _md_table(["Test uuid", "Subject", "Train class", "Train files"], rows)
    else:
        out.append("None.")
    unk = report["unknown_subjects"]
    out += ["", f"## Scans without subject id ({unk['count']})", ""]
    if unk["count"]:
        out += [f"{unk['warning']}.", ""] + [f"- {f}" for f in unk["files"][:50]]
        if unk["count"] > 50:
            out.append(f"- ... and {unk['count'] - 50} more (see audit.json)")
    else:
        out.append("None: every scan has a subject id.")
    return out + [""]


def _md_after_preprocessing(after: dict | None) -> list[str]:
    if not after:
        return []
    out = [f"## After preprocessing (`{after['config']}`)", "",
           "Class separability (ROC AUC folded to >= 0.5; 0.5 = no information) of simple properties of the "
           "preprocessed volumes the network sees:", ""]
    out += _md_table(["Property", "AUC"], [[k, f"{v:.2f}"] for k, v in after["auc"].items()])
    out.append("")
    out += [f"**WARNING**: {w}" for w in after["warnings"]] or [
        f"No property separates the classes (every AUC < {after['warn_above']})."]
    out.append("")
    reg = after.get("registration")
    if reg:
        corr = reg["template_correlation"]
        worst = sorted(corr.items(), key=lambda kv: kv[1])[:3]
        out += [f"Registration to the template: correlation with the template {min(corr.values()):.2f}-"
                f"{max(corr.values()):.2f} over {len(corr)} scans (lowest: "
                + ", ".join(f"{k} {v:.2f}" for k, v in worst) + f"); montage `{reg['montage']}`.", ""]
    return out


def audit_markdown(report: dict) -> str:
    """The report as a Markdown document: warnings first, then tables."""
    out = ["# Data audit", ""] + _md_warnings(report) + _md_counts(report) + _md_separability(report)
    out += _md_subjects(report) + _md_after_preprocessing(report.get("after_preprocessing"))
    return "\n".join(out)


def audit_text(report: dict) -> str:
    """Short console summary: counts, then every warning and note."""
    lines = []
    for name, c in report["train"]["classes"].items():
        sps = c["scans_per_subject"]
        lines.append(f"Train {name}: {c['scans']} scans, {c['subjects']} subjects "
                     f"(scans/subject {sps['min']}-{sps['max']}), sites {' '.join(c['sites'])}")
    t = report["test"]
    lines.append(f"Test: {t['scans']} scans, {t['subjects']} subjects, "
                 f"{len(report['test_in_train'])} with a subject in Train")
    seps = [f"{e['property']} {e['auc']:.2f}" for e in report["separability"] if e["auc"] is not None]
    if seps:
        lines.append("Separability AUC: " + ", ".join(seps))
    lines += report["warnings"] + report["notes"]
    if not report["warnings"]:
        lines.append("No warnings.")
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_audit(report: dict, out_dir) -> dict[str, Path]:
    """Write ``audit.json`` and ``audit.md`` into ``out_dir`` (created), each atomically.
    Returns ``{"json": path, "markdown": path}``."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PetmonaiError(f"{out_dir}: cannot create the audit folder ({err.strerror})") from None
    json_path, md_path = out_dir / "audit.json", out_dir / "audit.md"
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    try:
        _atomic_write(json_path, text)
        _atomic_write(md_path, audit_markdown(report))
    except OSError as err:
        raise PetmonaiError(f"{out_dir}: cannot write the audit ({err})") from None
    return {"json": json_path, "markdown": md_path}
