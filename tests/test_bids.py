"""BIDS in and out (petmonai.data.bids, discover_bids): the challenge layout round trip, labels per subject
or session, sites, tracers, and every bad input as one error naming the file or row."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from petmonai.audit import audit_datalist
from petmonai.commands import audit_main
from petmonai.commands import to_bids_main
from petmonai.data import content_order, discover, make_folds, train_rows, write_bids
from petmonai.errors import PetmonaiError


@pytest.fixture(scope="module")
def bids_copy(tiny_cohort, tmp_path_factory) -> Path:
    """The tiny synthetic cohort written as BIDS (copies)."""
    return write_bids(discover(tiny_cohort), tmp_path_factory.mktemp("bids") / "ds")


def _source_map(bids: Path) -> dict:
    """Original file -> BIDS scan id, from the subjects' scans.tsv."""
    out = {}
    for tsv in bids.glob("sub-*/sub-*_scans.tsv"):
        table = pd.read_csv(tsv, sep="\t", dtype=str)
        out.update({src: Path(f).name.replace("_pet.nii.gz", "") for f, src in zip(table["filename"], table["source"])})
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_bids_copy_has_the_challenge_datalist(tiny_cohort, bids_copy):
    chal, bids = discover(tiny_cohort), discover(bids_copy)
    to_bids = _source_map(bids_copy)
    chal["bids_id"] = chal["image"].map(to_bids)
    merged = chal.merge(bids, left_on="bids_id", right_on="scan_id", suffixes=("", "_b"))
    assert len(merged) == len(chal) == len(bids)
    for col in ("split", "class_name", "label", "site", "dtype", "shape", "voxel_x", "voxel_z"):
        assert (merged[col] == merged[f"{col}_b"]).all(), col
    # the subject is the header's db_name as a BIDS label: one BIDS subject per challenge subject
    assert (merged["subject_b"] == "sub-" + merged["subject"].str.replace("_", "")).all()
    assert set(bids["tracer"]) == {"FDG"} and bids["session"].str.fullmatch(r"\d\d").all()
    assert (bids.loc[bids["split"] == "test", "label"] == -1).all()  # the Test scans: n/a in sessions.tsv


def test_bids_copy_makes_the_same_folds(tiny_cohort, bids_copy):
    """In content order (what cross-validation uses), fold membership depends on the scans only."""
    to_bids = _source_map(bids_copy)
    chal = content_order(train_rows(discover(tiny_cohort)))
    bids = content_order(train_rows(discover(bids_copy)))
    assert chal["image"].map(to_bids).tolist() == bids["scan_id"].tolist()  # one order for both layouts
    for protocol in ("subject", "site-pair"):
        a = make_folds(chal, protocol, n_folds=3, seed=0)
        b = make_folds(bids, protocol, n_folds=3, seed=0)
        a["scan_id"] = a["scan_id"].map(dict(zip(chal["scan_id"], chal["image"].map(to_bids))))
        key = ["repeat", "fold", "scan_id", "role"]
        assert a[key].sort_values(key).values.tolist() == b[key].sort_values(key).values.tolist(), protocol


def test_bids_copy_trains_to_the_same_probabilities(tiny_cohort, bids_copy, fast_config, tmp_path):
    """The issue's acceptance on the phantoms: the BIDS copy lists its scans in another order (by
    subject, the challenge layout by class folder), yet trains to identical out-of-fold probabilities."""
    from petmonai.commands import train3d_main

    runs = {}
    for name, root in (("challenge", tiny_cohort), ("bids", bids_copy)):
        out = tmp_path / name
        args = ["--data-root", str(root), "--output-dir", str(out), "--device", "cpu"]
        for o in [*fast_config, "report.write=false", "report.reference_model=false"]:
            args += ["--set", o]
        assert train3d_main(args) == 0
        runs[name] = pd.read_csv(out / "oof_predictions.csv", dtype={"scan_id": str})
    assert discover(tiny_cohort)["image"].map(_source_map(bids_copy)).tolist() != \
        discover(bids_copy)["scan_id"].tolist()  # the two datalists do list the scans in different orders
    chal, bids = runs["challenge"], runs["bids"]
    chal["scan_id"] = chal["image"].map(_source_map(bids_copy))
    key = ["repeat", "fold", "scan_id"]
    chal, bids = chal.sort_values(key).reset_index(drop=True), bids.sort_values(key).reset_index(drop=True)
    assert chal[key].values.tolist() == bids[key].values.tolist()
    assert (chal["prob_mci"] == bids["prob_mci"]).all()  # bit for bit, on CPU


def test_bids_audit_says_what_the_challenge_audit_says(tiny_cohort, bids_copy):
    a, b = audit_datalist(discover(tiny_cohort)), audit_datalist(discover(bids_copy))
    assert a["warnings"] == b["warnings"] and a["notes"] == b["notes"]
    assert b["train"]["classes"]["NC"]["tracers"] == {"FDG": a["train"]["classes"]["NC"]["scans"]}
    assert [e["property"] for e in b["separability"]][-1] == "tracer"


def _dataset(root: Path, src: Path, scans: list[tuple[str, str | None, str | None]], participants=None,
             sessions=None, sidecar=None) -> Path:
    """A small BIDS dataset of copies of ``src``: ``scans`` = (sub, ses, trc); tables as given."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    for sub, ses, trc in scans:
        folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "pet"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + (f"_trc-{trc}" if trc else "") + "_pet"
        shutil.copyfile(src, folder / f"{stem}.nii.gz")
        if sidecar is not False:
            (folder / f"{stem}.json").write_text(json.dumps(sidecar or {"TracerName": trc or "FDG"}))
    if participants is not None:
        participants.to_csv(root / "participants.tsv", sep="\t", index=False)
    for sub, table in (sessions or {}).items():
        table.to_csv(root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv", sep="\t", index=False)
    return root


@pytest.fixture
def volume(tiny_cohort) -> Path:
    return tiny_cohort / "Train" / "NC" / "1.nii.gz"


def test_labels_per_subject_and_per_session(volume, tmp_path):
    participants = pd.DataFrame({"participant_id": ["sub-a", "sub-b", "sub-c", "sub-d"],
                                 "diagnosis": ["CN", "AD", "n/a", "CN"], "site": ["s1", "s2", "n/a", "s1"]})
    sessions = {"c": pd.DataFrame({"session_id": ["ses-1", "ses-2"], "diagnosis": ["AD", ""]})}
    root = _dataset(tmp_path / "ds", volume, [("a", "1", None), ("a", "2", None), ("b", None, None),
                                               ("c", "1", None), ("c", "2", None), ("d", None, None)],
                    participants, sessions, sidecar={"InstitutionName": "Hospital X"})
    df = discover(root, classes=["CN", "AD"]).set_index("scan_id")
    assert df.loc["sub-a_ses-1", "class_name"] == df.loc["sub-a_ses-2", "class_name"] == "CN"
    assert df.loc["sub-b", "label"] == 1 and df.loc["sub-c_ses-1", "class_name"] == "AD"
    assert df.loc["sub-c_ses-2", "split"] == "test"      # unlabelled session: the prediction set
    assert df.loc["sub-a_ses-1", "site"] == "s1"
    assert df.loc["sub-c_ses-1", "site"] == "Hospital X"  # no site in the tables: the sidecar's institution
    folds = make_folds(train_rows(df.reset_index()), "subject", n_folds=2, seed=0)
    sides = folds[folds["subject"] == "sub-a"].groupby(["fold"])["role"].apply(lambda r: set(r) == {"test"} or
                                                                             "test" not in set(r))
    assert sides.all()  # both sessions of a subject on one side of every fold


def test_site_from_scanner_and_tracer_filter(volume, tmp_path):
    participants = pd.DataFrame({"participant_id": ["sub-a", "sub-b"], "diagnosis": ["NC", "MCI"]})
    root = _dataset(tmp_path / "ds", volume, [("a", None, "FDG"), ("a", None, "PiB"), ("b", None, "FDG")],
                    participants, sidecar={"Manufacturer": "Siemens", "ManufacturersModelName": "Biograph"})
    df = discover(root, tracer="FDG")
    assert list(df["scan_id"]) == ["sub-a_trc-FDG", "sub-b_trc-FDG"] and set(df["site"]) == {"Siemens Biograph"}
    assert len(discover(root)) == 3
    with pytest.raises(PetmonaiError, match=r"no PET file with tracer 'AV45'.*FDG, PiB"):
        discover(root, tracer="AV45")


def test_missing_sidecar_and_subject_without_file_warn(volume, tmp_path, caplog):
    participants = pd.DataFrame({"participant_id": ["sub-a", "sub-b", "sub-z"], "diagnosis": ["NC", "MCI", "NC"]})
    root = _dataset(tmp_path / "ds", volume, [("a", None, None), ("b", None, None)], participants, sidecar=False)
    with caplog.at_level(logging.WARNING, logger="petmonai"):
        df = discover(root)
    assert len(df) == 2
    assert "no _pet.json sidecar" in caplog.text and "sub-a_pet.nii.gz" in caplog.text
    assert "have no PET file: sub-z" in caplog.text


BAD = {  # name: (participants, sessions, scans, text the one error line must hold)
    "no participants.tsv": (None, None, [("a", None, None)], r"participants\.tsv: not found.*'diagnosis'"),
    "no label column": (pd.DataFrame({"participant_id": ["sub-a"], "age": ["70"]}), None, [("a", None, None)],
                        r"participants\.tsv: no 'diagnosis' column \(columns: participant_id, age\)"),
    "file without row": (pd.DataFrame({"participant_id": ["sub-a"], "diagnosis": ["NC"]}), None,
                         [("a", None, None), ("b", None, None)], r"sub-b_pet\.nii\.gz: subject sub-b has no row in"),
    "label outside classes": (pd.DataFrame({"participant_id": ["sub-a"], "diagnosis": ["AD"]}), None,
                              [("a", None, None)], r"participants\.tsv, row 2: label 'AD' is not one of the run's "
                                                   r"classes \['NC', 'MCI'\]"),
    "two labels for one subject": (
        pd.DataFrame({"participant_id": ["sub-a"], "diagnosis": ["NC"]}),
        {"a": pd.DataFrame({"session_id": ["ses-1", "ses-2"], "diagnosis": ["NC", "MCI"]})},
        [("a", "1", None), ("a", "2", None)],
        r"sub-a_sessions\.tsv, row 3: diagnosis 'MCI' of sub-a ses-2 differs from the subject's 'NC'"),
    "subject listed twice": (pd.DataFrame({"participant_id": ["sub-a", "sub-a"], "diagnosis": ["NC", "MCI"]}), None,
                             [("a", None, None)], r"participants\.tsv, row 3: sub-a is listed again"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bids_input_is_one_error_and_nothing_written(case, volume, tmp_path, capsys):
    participants, sessions, scans, text = BAD[case]
    root = _dataset(tmp_path / "ds", volume, scans, participants, sessions)
    out = tmp_path / "audit"
    code = audit_main(["--data-root", str(root), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert pytest.importorskip("re").search(text, err[0]), err[0]
    assert not out.exists()


def test_to_bids_command_renames_classes_and_refuses_a_full_folder(tiny_cohort, tmp_path, capsys):
    out = tmp_path / "cnad"
    assert to_bids_main([str(tiny_cohort), "--output", str(out), "--link", "--rename", "NC=CN",
                         "--rename", "MCI=AD"]) == 0
    df = discover(out, classes=["CN", "AD"])
    assert set(df["class_name"]) == {"CN", "AD", ""}
    assert all(p.is_symlink() for p in out.rglob("*_pet.nii.gz"))
    with pytest.raises(PetmonaiError, match=r"sessions.tsv, row 2: label '(CN|AD)' is not one of the run's classes \['NC', 'MCI'\]"):
        discover(out)
    capsys.readouterr()
    assert to_bids_main([str(tiny_cohort), "--output", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert to_bids_main(["--synthetic", "--output", str(tmp_path / "syn"), "--set", "data.synthetic.n_nc=2",
                         "--set", "data.synthetic.n_mci=2", "--set", "data.synthetic.n_test=1"]) == 0
    syn = discover(tmp_path / "syn")
    assert (syn["split"] == "train").sum() == 4 and (syn["split"] == "test").sum() == 1
    assert not list(tmp_path.glob(".*"))  # no staging folder left behind
