"""Tests of the data audit (petmonai.audit.datalist) on hand-made datalists, and on the real data."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from petmonai.audit import NO_DB_NAME, audit_datalist, audit_markdown, audit_text, rank_auc, write_audit
from petmonai.errors import PetmonaiError

REAL_DATA = Path(__file__).parents[1] / "../shared/data/pet2023"

LABELS = {"NC": 0, "MCI": 1, "": -1}


def scan(uuid, split="train", cls="NC", subject=None, site="001", dtype=">u2", n_slices=63,
         vz=2.425, vx=2.06, source=None, **extra):
    """One datalist row; subject defaults to a unique id (one scan per subject)."""
    folder = f"Train/{cls}" if split == "train" else "Test"
    if subject is None:
        subject = f"{site}_S_{split[:2]}{cls}{uuid}"
    return {
        "image": f"/data/{folder}/{uuid}.nii.gz",
        "uuid": str(uuid),
        "split": split,
        "class_name": cls if split == "train" else "",
        "label": LABELS[cls] if split == "train" else -1,
        "subject": subject,
        "subject_source": source or ("header" if subject else "file"),
        "site": site,
        "dtype": dtype,
        "shape": f"128x128x{n_slices}x1",
        "n_slices": n_slices,
        "voxel_x": vx,
        "voxel_y": vx,
        "voxel_z": vz,
        **extra,
    }


def mixed_sites() -> pd.DataFrame:
    """Two sites, each with both classes; nothing in the header predicts the class."""
    rows = []
    for site in ("001", "002"):
        for i in range(3):
            rows.append(scan(f"{site}{i}", cls="NC", site=site))
            rows.append(scan(f"{site}{i}", cls="MCI", site=site))
    return pd.DataFrame(rows)


def confounded() -> pd.DataFrame:
    """NC only from site 005 (subject 005_S_0001 scanned 3 times), MCI only from 031/035;
    a Test scan of a Train subject and a Test scan from an unseen site."""
    rows = [
        scan(1, cls="NC", subject="005_S_0001", site="005"),
        scan(2, cls="NC", subject="005_S_0001", site="005"),
        scan(3, cls="NC", subject="005_S_0001", site="005"),
        scan(4, cls="NC", subject="005_S_0002", site="005"),
        scan(1, cls="MCI", subject="031_S_0001", site="031"),
        scan(2, cls="MCI", subject="031_S_0002", site="031"),
        scan(3, cls="MCI", subject="035_S_0001", site="035"),
        scan(10, split="test", cls="", subject="005_S_0001", site="005"),
        scan(11, split="test", cls="", subject="098_S_0001", site="098"),
        scan(12, split="test", cls="", subject="031_S_0009", site="031"),
    ]
    return pd.DataFrame(rows)


def site_warnings(report):
    return [w for w in report["warnings"] if "no site contributes both classes" in w]


def sep(report, prop):
    return next(e for e in report["separability"] if e["property"] == prop)


def test_counts_per_class():
    report = audit_datalist(confounded())
    nc, mci = report["train"]["classes"]["NC"], report["train"]["classes"]["MCI"]
    assert (nc["scans"], nc["subjects"]) == (4, 2)
    assert nc["scans_per_subject"] == {"min": 1, "mean": 2.0, "max": 3}
    assert (mci["scans"], mci["subjects"]) == (3, 3)
    assert mci["scans_per_subject"] == {"min": 1, "mean": 1.0, "max": 1}
    assert nc["sites"] == {"005": 4}
    assert mci["sites"] == {"031": 2, "035": 1}
    assert nc["dtypes"] == {">u2": 4}
    assert nc["shapes"] == {"128x128x63x1": 4}
    assert nc["voxel_sizes"]["voxel_z"] == {"min": 2.425, "max": 2.425, "values": [2.425]}
    assert list(report["train"]["classes"]) == ["NC", "MCI"]
    assert report["test"]["scans"] == 3 and report["test"]["subjects"] == 3
    assert report["test"]["sites"] == {"005": 1, "031": 1, "098": 1}
    assert report["n_scans"] == 10


def test_voxel_size_ranges():
    df = pd.DataFrame([scan(1, vz=2.43), scan(2, vz=3.375), scan(3, vz=3.375),
                       scan(4, cls="MCI", vz=2.43)])
    nc = audit_datalist(df)["train"]["classes"]["NC"]
    assert nc["voxel_sizes"]["voxel_z"] == {"min": 2.43, "max": 3.375, "values": [2.43, 3.375]}


def test_repeated_subjects():
    report = audit_datalist(confounded())
    repeated = {r["subject"]: r for r in report["repeated_subjects"]}
    assert set(repeated) == {"005_S_0001"}
    r = repeated["005_S_0001"]
    assert r["n_scans"] == 4
    assert r["splits"] == ["test", "train"]
    assert r["classes"] == ["NC"]
    files = [f["image"] for f in r["files"]]
    assert "/data/Train/NC/1.nii.gz" in files and "/data/Test/10.nii.gz" in files
    assert any("more than one Train scan" in n and n.startswith("NOTE: 1 subject") for n in report["notes"])


def test_subject_in_both_classes_is_a_warning():
    df = pd.DataFrame(mixed_sites().to_dict("records") + [
        scan(90, cls="NC", subject="001_S_0900", site="001"),
        scan(90, cls="MCI", subject="001_S_0900", site="001"),
    ])
    report = audit_datalist(df)
    assert any("001_S_0900" in w and w.startswith("WARNING") for w in report["warnings"])


def test_test_scans_whose_subject_is_in_train():
    report = audit_datalist(confounded())
    overlap = report["test_in_train"]
    assert [t["uuid"] for t in overlap] == ["10"]
    assert overlap[0]["subject"] == "005_S_0001"
    assert overlap[0]["train_classes"] == ["NC"]
    assert len(overlap[0]["train_files"]) == 3
    assert report["sites"]["test_absent_from_train"] == ["098"]


def test_site_confound_warned():
    report = audit_datalist(confounded())
    assert report["sites"]["with_both_classes"] == []
    assert report["sites"]["by_class"] == {"NC": ["005"], "MCI": ["031", "035"]}
    assert len(site_warnings(report)) == 1
    assert site_warnings(report)[0].startswith("WARNING")
    assert "scanner" in site_warnings(report)[0]
    site = sep(report, "site")
    assert site["auc"] == 1.0 and site["separates"] and site["warn"]
    # said once, not twice (the generic per-property warning is folded into the site one)
    assert not any("'site'" in w for w in report["warnings"])


def test_no_site_warning_when_sites_hold_both_classes():
    report = audit_datalist(mixed_sites())
    assert report["sites"]["with_both_classes"] == ["001", "002"]
    assert site_warnings(report) == []
    assert report["warnings"] == []
    for entry in report["separability"]:
        assert entry["auc"] == pytest.approx(0.5)
        assert not entry["warn"]


def test_one_mixed_site_is_enough_to_avoid_the_site_warning_but_site_auc_is_still_checked():
    # site 001 holds both classes (1 NC, 1 MCI); sites 002/003 are pure: site predicts strongly
    rows = [scan(1, cls="NC", site="001"), scan(2, cls="MCI", site="001")]
    rows += [scan(10 + i, cls="NC", site="002") for i in range(6)]
    rows += [scan(20 + i, cls="MCI", site="003") for i in range(6)]
    report = audit_datalist(pd.DataFrame(rows))
    assert report["sites"]["with_both_classes"] == ["001"]
    assert site_warnings(report) == []
    site = sep(report, "site")
    assert site["warn"] and not site["separates"]
    assert any("'site'" in w and "strongly predicts" in w for w in report["warnings"])


def test_dtype_that_separates_classes_is_warned():
    df = mixed_sites()
    df.loc[df["class_name"] == "MCI", "dtype"] = ">f4"
    report = audit_datalist(df)
    entry = sep(report, "dtype")
    assert entry["auc"] == 1.0 and entry["separates"] and entry["warn"]
    assert entry["values"] == {">f4": {"NC": 0, "MCI": 6}, ">u2": {"NC": 6, "MCI": 0}}
    dtype_warnings = [w for w in report["warnings"] if "'dtype'" in w]
    assert len(dtype_warnings) == 1 and dtype_warnings[0].startswith("WARNING")
    assert "SEPARATES" in dtype_warnings[0]
    assert site_warnings(report) == []


def test_dtype_that_predicts_weakly_is_not_warned_but_marker_value_is_noted():
    # like the real data: >f4 is almost only MCI, >u2 is 50/50
    rows = [scan(i, cls="NC", site=s) for i, s in enumerate(["001", "002"] * 5)]
    rows += [scan(20 + i, cls="MCI", site=s) for i, s in enumerate(["001", "002"] * 5)]
    rows += [scan(40 + i, cls="MCI", site="001", dtype=">f4") for i in range(9)]
    rows += [scan(60, cls="NC", site="002", dtype=">f4")]
    report = audit_datalist(pd.DataFrame(rows))
    entry = sep(report, "dtype")
    assert 0.5 < entry["auc"] < 0.8 and not entry["warn"]
    assert not any("'dtype'" in w for w in report["warnings"])
    assert entry["marker_values"][0]["value"] == ">f4"
    assert any(n.startswith("NOTE: dtype") and ">f4" in n for n in report["notes"])


def test_continuous_property_auc_and_direction():
    # voxel_z: NC 2.4 2.4 3.4, MCI 3.4 3.4 3.4  -> P(MCI > NC) + ties/2 = (3*2 + 3*1*0.5)/9
    rows = [scan(1, vz=2.4), scan(2, vz=2.4), scan(3, vz=3.4)]
    rows += [scan(i, cls="MCI", vz=3.4) for i in (1, 2, 3)]
    report = audit_datalist(pd.DataFrame(rows))
    entry = sep(report, "voxel_z")
    assert entry["auc"] == pytest.approx(7.5 / 9, abs=1e-4)
    assert entry["warn"] and not entry["separates"]
    assert entry["direction"] == "higher in MCI"
    assert entry["ranges"] == {"NC": [2.4, 3.4], "MCI": [3.4, 3.4]}
    assert any("'voxel_z'" in w for w in report["warnings"])


def test_auc_is_symmetric_for_a_property_lower_in_mci():
    rows = [scan(i, vz=3.4) for i in range(3)] + [scan(i, cls="MCI", vz=2.4) for i in range(3)]
    entry = sep(audit_datalist(pd.DataFrame(rows)), "voxel_z")
    assert entry["auc"] == 1.0 and entry["direction"] == "higher in NC"


def test_rank_auc_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    scores = [0.1, 0.4, 0.35, 0.8, 0.4, 0.2, 0.9]
    labels = [0, 0, 1, 1, 1, 0, 1]
    assert rank_auc(scores, labels) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores))
    assert rank_auc([1, 2], [1, 1]) is None


def test_custom_properties():
    df = mixed_sites()
    df["intensity_max"] = [100.0 if c == "NC" else 5000.0 for c in df["class_name"]]
    df["scanner"] = ["A" if c == "NC" else "B" for c in df["class_name"]]
    report = audit_datalist(df, properties=["intensity_max", "scanner"])
    assert [e["property"] for e in report["separability"]] == ["intensity_max", "scanner"]
    assert sep(report, "intensity_max")["kind"] == "continuous"
    assert sep(report, "scanner")["kind"] == "categorical"
    assert any("'intensity_max'" in w for w in report["warnings"])
    assert any("'scanner'" in w for w in report["warnings"])
    report = audit_datalist(df, properties={"intensity_max": "categorical"})
    assert sep(report, "intensity_max")["kind"] == "categorical"
    with pytest.raises(PetmonaiError, match="no_such_column"):
        audit_datalist(df, properties=["no_such_column"])
    with pytest.raises(PetmonaiError, match="kind"):
        audit_datalist(df, properties={"intensity_max": "ordinal"})


def test_threshold_is_configurable():
    rows = [scan(1, vz=2.4), scan(2, vz=2.4), scan(3, vz=3.4)]
    rows += [scan(i, cls="MCI", vz=3.4) for i in (1, 2, 3)]
    report = audit_datalist(pd.DataFrame(rows), auc_threshold=0.9)
    assert not sep(report, "voxel_z")["warn"]
    assert report["auc_threshold"] == 0.9


def test_unknown_subjects_warned():
    df = mixed_sites()
    df.loc[[0, 1], "subject"] = ["file:train/NC/0010", "file:train/MCI/0010"]
    df.loc[[0, 1], "subject_source"] = "file"
    report = audit_datalist(df)
    unknown = report["unknown_subjects"]
    assert unknown["count"] == 2 and unknown["warning"] == NO_DB_NAME
    assert len(unknown["files"]) == 2
    assert any(NO_DB_NAME in w and w.startswith("WARNING") for w in report["warnings"])
    assert report["train"]["classes"]["NC"]["subjects_unknown_id"] == 1


def test_unknown_site_is_not_a_site_confound():
    df = mixed_sites()
    df["site"] = ""
    report = audit_datalist(df)
    assert site_warnings(report) == []
    assert any("site of every Train scan is unknown" in w for w in report["warnings"])
    assert sep(report, "site")["auc"] is None
    assert report["train"]["classes"]["NC"]["sites"] == {"(unknown)": 6}


def test_bad_input():
    with pytest.raises(PetmonaiError, match="empty"):
        audit_datalist(confounded().iloc[0:0])
    with pytest.raises(PetmonaiError, match="subject"):
        audit_datalist(confounded().drop(columns=["subject"]))


def test_json_round_trip(tmp_path):
    report = audit_datalist(confounded())
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    paths = write_audit(report, tmp_path / "out")
    assert paths["json"].name == "audit.json" and paths["markdown"].name == "audit.md"
    assert json.loads(paths["json"].read_text()) == report
    assert paths["markdown"].read_text() == audit_markdown(report)
    # atomic writes leave no temporary files; a second write replaces the first
    write_audit(audit_datalist(mixed_sites()), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["audit.json", "audit.md"]
    assert json.loads(paths["json"].read_text())["warnings"] == []


def test_markdown_starts_with_the_warnings():
    report = audit_datalist(confounded())
    md = audit_markdown(report)
    assert md.startswith("# Data audit")
    first_table = md.index("\n|")
    assert md.index("## Warnings") < first_table
    for w in report["warnings"]:
        assert w in md
        assert md.index(w) < first_table
    assert "## Separability" in md and "| site | categorical | 1.000 | SEPARATES |" in md
    assert "No warnings" in audit_markdown(audit_datalist(mixed_sites()))


def test_text_summary():
    report = audit_datalist(confounded())
    text = audit_text(report)
    assert "Train NC: 4 scans, 2 subjects" in text
    assert site_warnings(report)[0] in text


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/data/pet2023 is absent")
def test_real_data_audit(tmp_path):
    from petmonai.data import discover

    report = audit_datalist(discover(REAL_DATA))
    mci, nc = report["train"]["classes"]["MCI"], report["train"]["classes"]["NC"]
    assert (mci["scans"], mci["subjects"]) == (25, 25)
    assert (nc["scans"], nc["subjects"]) == (16, 10)
    assert report["test"]["scans"] == 79
    assert report["sites"]["with_both_classes"] == []
    assert report["sites"]["by_class"]["NC"] == ["005", "009", "011"]
    assert report["sites"]["by_class"]["MCI"] == ["031", "035", "036", "041", "073", "094", "099", "100"]
    assert report["sites"]["test_absent_from_train"]
    assert len(report["test_in_train"]) == 15
    assert len(site_warnings(report)) == 1
    assert sep(report, "site")["auc"] == 1.0
    assert set(mci["dtypes"]) == {">u2", ">f4"}
    assert report["unknown_subjects"]["count"] == 0
    assert any(r["subject"] == "011_S_0016" and r["n_scans"] >= 3 for r in report["repeated_subjects"])
    md = audit_markdown(report)
    assert md.index(site_warnings(report)[0]) < md.index("\n|")
    paths = write_audit(report, tmp_path)
    assert json.loads(paths["json"].read_text()) == report
