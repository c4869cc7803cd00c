"""CV protocols: no subject on both sides (subject), no held-out site in training (site-pair)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from petmonai.errors import PetmonaiError
from petmonai.data import check_no_leak, fold_ids, load_folds, make_folds

REAL_DATA = Path(__file__).parents[1] / "../shared/data/pet2023"


def confounded_datalist() -> pd.DataFrame:
    """Like the shared data: repeated NC subjects, every site holds one class only."""
    rows = []
    mci_sites = ["031", "035", "036", "041"]
    for i in range(16):
        site = mci_sites[i % 4]
        rows.append({"scan_id": f"MCI/{i}", "subject": f"{site}_S_{i:04d}", "site": site, "label": 1})
    nc_subjects = [("005", 1, 2), ("009", 2, 3), ("009", 3, 1), ("011", 4, 3), ("011", 5, 1), ("011", 6, 1),
                   ("005", 7, 1)]
    k = 0
    for site, subj, n_scans in nc_subjects:
        for _ in range(n_scans):
            rows.append({"scan_id": f"NC/{k}", "subject": f"{site}_S_{subj:04d}", "site": site, "label": 0})
            k += 1
    return pd.DataFrame(rows)


def _sides(part: pd.DataFrame, column: str):
    return set(part.loc[part["role"] != "test", column]), set(part.loc[part["role"] == "test", column])


@pytest.mark.parametrize("repeats", [1, 3])
def test_subject_protocol_never_splits_a_subject(repeats):
    df = confounded_datalist()
    assert df["subject"].duplicated().any()  # the data do repeat subjects
    folds = make_folds(df, "subject", n_folds=4, repeats=repeats, seed=7)
    check_no_leak(folds, "subject")
    for (repeat, fold), part in folds.groupby(["repeat", "fold"]):
        fit, test = _sides(part, "subject")
        assert not fit & test, (repeat, fold)
        assert part["scan_id"].is_unique  # every scan has one role in a fold
        assert set(part["scan_id"]) == set(df["scan_id"])
    # every scan is tested exactly once per repeat
    tested = folds[folds["role"] == "test"].groupby("repeat")["scan_id"]
    for _, ids in tested:
        assert sorted(ids) == sorted(df["scan_id"])
    assert folds["repeat"].nunique() == repeats
    if repeats > 1:  # repeats use new seeds: different fold assignments
        assign = {r: dict(zip(p["scan_id"], p["fold"])) for r, p in folds[folds["role"] == "test"].groupby("repeat")}
        assert assign[0] != assign[1]


def test_validation_subjects_come_from_the_training_side():
    folds = make_folds(confounded_datalist(), "subject", n_folds=4, seed=0, val_fraction=0.25)
    for _, part in folds.groupby(["repeat", "fold"]):
        train = set(part.loc[part["role"] == "train", "subject"])
        val = set(part.loc[part["role"] == "val", "subject"])
        test = set(part.loc[part["role"] == "test", "subject"])
        assert val and not val & train and not val & test


def test_site_pair_never_shows_a_held_out_site_in_training():
    df = confounded_datalist()
    folds = make_folds(df, "site-pair")
    n_mci_sites = df.loc[df["label"] == 1, "site"].nunique()
    n_nc_sites = df.loc[df["label"] == 0, "site"].nunique()
    assert len(fold_ids(folds)) == n_mci_sites * n_nc_sites
    check_no_leak(folds, "site")
    check_no_leak(folds, "subject")
    pairs = set()
    for _, part in folds.groupby(["repeat", "fold"]):
        fit, test = _sides(part, "site")
        assert not fit & test
        test_part = part[part["role"] == "test"]
        # one MCI-only site and one NC-only site, all their scans
        assert sorted(test_part.groupby("site")["label"].first()) == [0, 1]
        assert len(test) == 2
        assert set(test_part["scan_id"]) == set(df.loc[df["site"].isin(test), "scan_id"])
        pairs.add(tuple(sorted(test)))
    assert len(pairs) == n_mci_sites * n_nc_sites  # all pairs, each once


def test_site_pair_with_mixed_sites_is_leave_one_site_out():
    df = confounded_datalist()
    df.loc[df["scan_id"] == "MCI/0", "site"] = "005"  # a site with both classes
    folds = make_folds(df, "site-pair")
    assert len(fold_ids(folds)) == df["site"].nunique()
    check_no_leak(folds, "site")
    for _, part in folds.groupby(["repeat", "fold"]):
        assert part.loc[part["role"] == "test", "site"].nunique() == 1


def test_scan_protocol_is_refused_unless_allowed_and_leaks():
    df = confounded_datalist()
    with pytest.raises(PetmonaiError, match="leaky"):
        make_folds(df, "scan")
    folds = make_folds(df, "scan", n_folds=4, allow_leaky=True, seed=0)
    with pytest.raises(PetmonaiError, match="subject on both sides"):
        check_no_leak(folds, "subject")


def test_folds_file_round_trip(tmp_path):
    df = confounded_datalist()
    folds = make_folds(df, "site-pair")
    path = tmp_path / "folds.csv"
    folds.to_csv(path, index=False)
    back = load_folds(path, df)
    assert back.attrs["protocol"] == "site-pair"
    pd.testing.assert_frame_equal(back[["repeat", "fold", "scan_id", "role"]],
                                  folds[["repeat", "fold", "scan_id", "role"]])
    with pytest.raises(PetmonaiError, match="not in this data set"):
        load_folds(path, df[df["scan_id"] != "NC/0"])


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/data/pet2023 is absent")
def test_protocols_on_the_shared_data():
    from petmonai.data import discover, train_rows

    train = train_rows(discover(REAL_DATA))
    site_pair = make_folds(train, "site-pair")
    assert len(fold_ids(site_pair)) == 24  # 8 MCI-only sites x 3 NC-only sites
    check_no_leak(site_pair, "site")
    subject = make_folds(train, "subject", n_folds=5, seed=0)
    assert len(fold_ids(subject)) == 5
    check_no_leak(subject, "subject")
    # NC subject 011_S_0016 has three scans (NC 12, 13, 14): always tested together
    rows = subject[(subject["subject"] == "011_S_0016") & (subject["role"] == "test")]
    assert len(rows) == 3 and rows["fold"].nunique() == 1
    test = subject[subject["role"] == "test"]
    assert np.all(test.groupby("fold")["label"].nunique() == 2)  # stratified: both classes in every test fold
