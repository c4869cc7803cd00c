"""Cross-validation protocols and fold files.

A fold table has one row per (repeat, fold, scan) with the scan's ``role`` in that fold:
``train`` (fits the weights), ``val`` (inner validation: checkpoint choice, early stopping,
threshold tuning; drawn from the training subjects) or ``test`` (the held-out scans the fold is
evaluated on). Scans a fold does not use (e.g. other sites' scans in none of its roles) are absent.

>>> import pandas as pd
>>> train_df = pd.DataFrame({               # labelled datalist rows: 10 subjects, 2 scans each
...     "scan_id": [f"scan{i}" for i in range(20)],
...     "subject": [f"S{i // 2}" for i in range(20)],
...     "site": ["A", "B"] * 10,
...     "label": [0] * 10 + [1] * 10,
... })
>>> folds = make_folds(train_df, protocol="subject", n_folds=5, repeats=1, seed=0)
>>> folds.groupby(["fold", "role"]).size().unstack()  # doctest: +NORMALIZE_WHITESPACE
role  test  train  val
fold
0        4     12    4
1        4     12    4
2        4     12    4
3        4     12    4
4        4     12    4
>>> check_no_leak(folds)                    # raises if a subject is on both sides of a fold

Protocols
- ``subject``: stratified K-fold grouped by subject (no subject on both sides);
- ``site-pair``: each fold holds out one site with only MCI and one with only NC, for all such
  pairs; where sites hold both classes, plain leave-one-site-out;
- ``scan``: naive stratified K-fold by scan. Leaks repeated subjects; for showing the inflation.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from petmonai.errors import PetmonaiError

PROTOCOLS = ("subject", "site-pair", "scan")


LEAKY_PROTOCOLS = ("scan",)


FOLD_COLUMNS = ["repeat", "fold", "scan_id", "subject", "site", "label", "role", "protocol"]


def subject_groups(train: pd.DataFrame) -> np.ndarray:
    """Subjects as integers numbered by first appearance in ``train``: in
    :func:`petmonai.data.discover.content_order` the folds then do not depend on how a layout spells
    subject ids (``031_S_0294`` or ``sub-031S0294``)."""
    return pd.factorize(train["subject"])[0]


def _grouped_kfold(labels, groups, n_splits: int, seed: int):
    n_splits = min(n_splits, _max_splits(labels, groups))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, groups))


def _max_splits(labels, groups) -> int:
    per_class = pd.DataFrame({"y": labels, "g": groups}).drop_duplicates().groupby("y").size()
    if len(per_class) < 2:
        raise PetmonaiError("cross-validation needs scans of both classes (NC and MCI)")
    return int(per_class.min())


def inner_validation(train: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over ``train`` rows: subjects set aside for validation (grouped, stratified)."""
    if fraction <= 0:
        return np.zeros(len(train), dtype=bool)
    n_splits = max(2, int(round(1.0 / fraction)))
    labels, groups = train["label"].to_numpy(), subject_groups(train)
    if _max_splits(labels, groups) < 2:
        return np.zeros(len(train), dtype=bool)
    _, val_idx = _grouped_kfold(labels, groups, n_splits, seed)[0]
    mask = np.zeros(len(train), dtype=bool)
    mask[val_idx] = True
    return mask


def _site_pair_holdouts(df: pd.DataFrame) -> list[tuple[str, ...]]:
    if (df["site"] == "").any():
        missing = df.loc[df["site"] == "", "scan_id"].head(5).tolist()
        raise PetmonaiError(f"site-pair protocol needs a site for every scan; unknown for e.g. {missing}")
    classes = df.groupby("site")["label"].agg(lambda s: frozenset(s))
    mixed = [site for site, c in classes.items() if len(c) > 1]
    if mixed:
        return [(site,) for site in sorted(classes.index)]  # leave-one-site-out
    only_mci = sorted(site for site, c in classes.items() if c == frozenset({1}))
    only_nc = sorted(site for site, c in classes.items() if c == frozenset({0}))
    return list(itertools.product(only_mci, only_nc))


def make_folds(
    train: pd.DataFrame,
    protocol: str = "subject",
    n_folds: int = 5,
    repeats: int = 1,
    seed: int = 0,
    val_fraction: float = 0.2,
    allow_leaky: bool = False,
) -> pd.DataFrame:
    """Fold table for the labelled scans in ``train`` (datalist rows, see :mod:`petmonai.data.discover`)."""
    if protocol not in PROTOCOLS:
        raise PetmonaiError(f"unknown CV protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")
    if protocol in LEAKY_PROTOCOLS and not allow_leaky:
        raise PetmonaiError(
            f"CV protocol '{protocol}' puts scans of one subject on both sides of a fold (leaky); "
            "pass --allow-leaky (cv.allow_leaky=true) to run it anyway, for comparison only"
        )
    train = train.reset_index(drop=True)
    labels, subjects = train["label"].to_numpy(), subject_groups(train)
    rows = []
    for repeat in range(repeats if protocol != "site-pair" else 1):
        rseed = seed + 1000 * repeat
        if protocol == "subject":
            splits = _grouped_kfold(labels, subjects, n_folds, rseed)
        elif protocol == "scan":
            splitter = StratifiedKFold(n_splits=min(n_folds, int(np.bincount(labels).min())), shuffle=True,
                                       random_state=rseed)
            splits = list(splitter.split(np.zeros(len(train)), labels))
        else:
            splits = []
            for held_out in _site_pair_holdouts(train):
                test_mask = train["site"].isin(held_out).to_numpy()
                splits.append((np.flatnonzero(~test_mask), np.flatnonzero(test_mask)))
        for fold, (train_idx, test_idx) in enumerate(splits):
            fit = train.iloc[train_idx]
            val_mask = inner_validation(fit, val_fraction, rseed + fold)
            for idx, role in ((fit.index[~val_mask], "train"), (fit.index[val_mask], "val"), (test_idx, "test")):
                part = train.loc[idx, ["scan_id", "subject", "site", "label"]].assign(
                    repeat=repeat, fold=fold, role=role, protocol=protocol)
                rows.append(part)
    table = pd.concat(rows, ignore_index=True)[FOLD_COLUMNS]
    table.attrs["protocol"] = protocol
    return table


def fold_ids(folds: pd.DataFrame) -> list[tuple[int, int]]:
    return sorted(set(zip(folds["repeat"], folds["fold"])))


def fold_members(folds: pd.DataFrame, repeat: int, fold: int, role: str) -> list[str]:
    part = folds[(folds["repeat"] == repeat) & (folds["fold"] == fold) & (folds["role"] == role)]
    return part["scan_id"].tolist()


def load_folds(path: str | Path, train: pd.DataFrame) -> pd.DataFrame:
    """Read a saved fold table and check it matches this data set's scans."""
    path = Path(path)
    if not path.is_file():
        raise PetmonaiError(f"{path}: folds file not found")
    table = pd.read_csv(path, dtype={"scan_id": str, "subject": str, "site": str}, keep_default_na=False)
    missing = set(FOLD_COLUMNS) - set(table.columns)
    if missing:
        raise PetmonaiError(f"{path}: not a folds file (missing columns {sorted(missing)})")
    if table["protocol"].nunique() != 1:
        raise PetmonaiError(f"{path}: folds file mixes protocols {sorted(table['protocol'].unique())}")
    table.attrs["protocol"] = str(table["protocol"].iloc[0])
    unknown = set(table["scan_id"]) - set(train["scan_id"])
    if unknown:
        raise PetmonaiError(f"{path}: folds name scans that are not in this data set, e.g. {sorted(unknown)[:3]}")
    return table


def check_no_leak(folds: pd.DataFrame, column: str = "subject") -> None:
    """Raise if a ``column`` value (subject, site) is on both the fitting and test side of a fold."""
    for (repeat, fold), part in folds.groupby(["repeat", "fold"]):
        fit = set(part.loc[part["role"] != "test", column])
        test = set(part.loc[part["role"] == "test", column])
        shared = fit & test
        if shared:
            raise PetmonaiError(f"repeat {repeat} fold {fold}: {column} on both sides: {sorted(shared)[:5]}")
