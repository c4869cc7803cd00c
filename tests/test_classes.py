"""Any two groups (data.classes): the names flow from the config into every output, a label outside them is
one error naming the file or row and the allowed values."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from petmonai.commands import train3d_main
from petmonai.commands import to_bids_main
from petmonai.config import ConfigError, load_config
from petmonai.data import check_classes, data_options, discover, prob_column, run_classes
from petmonai.errors import PetmonaiError
from petmonai.inference import predict


def test_classes_checked_and_defaulted():
    assert data_options(load_config())["classes"] == ("NC", "MCI")
    assert run_classes({"data": {}}) == ("NC", "MCI")  # a run saved before data.classes
    assert run_classes(load_config(None, ["data.classes=[CN,AD]"])) == ("CN", "AD")
    assert prob_column(("amyloid negative", "amyloid positive")) == "prob_amyloid_positive"
    for bad in (["AD"], ["AD", "ad"], ["CN", "AD", "MCI"], "CN,AD", ["CN", "n/a"]):
        with pytest.raises(ConfigError, match="data.classes"):
            check_classes(bad)


def test_challenge_layout_with_other_class_folders(tiny_cohort, tmp_path):
    root = tmp_path / "pet"
    shutil.copytree(tiny_cohort / "Train" / "NC", root / "Train" / "CN")
    shutil.copytree(tiny_cohort / "Train" / "MCI", root / "Train" / "AD")
    df = discover(root, classes=["CN", "AD"])
    assert set(zip(df["class_name"], df["label"])) == {("CN", 0), ("AD", 1)}
    with pytest.raises(PetmonaiError, match=r"Train/AD: label folder 'AD' is neither of the classes \['NC', 'MCI'\]"):
        discover(root)


def test_csv_label_outside_the_classes_names_the_row(tiny_cohort, tmp_path):
    csv = tmp_path / "list.csv"
    pd.DataFrame({"image": [str(tiny_cohort / "Train" / "NC" / "1.nii.gz"), str(tiny_cohort / "Train" / "MCI" / "1.nii.gz")],
                  "label": ["cn", "AD"]}).to_csv(csv, index=False)
    assert list(discover(csv, classes=["CN", "AD"])["class_name"]) == ["CN", "AD"]
    with pytest.raises(PetmonaiError, match=r"list\.csv, row 2: label 'cn' is not one of the run's classes "
                                            r"\['NC', 'MCI'\]"):
        discover(csv)


FAST_RUN = ["train.max_epochs=1", "report.reference_model=false",
            "model={_target_: monai.networks.nets.ResNet, block: basic, layers: [1, 1, 1, 1], "
            "block_inplanes: [8, 16, 32, 64], spatial_dims: 3, n_input_channels: 1, num_classes: 2, "
            "conv1_t_size: 3, conv1_t_stride: 2}"]


@pytest.mark.slow
def test_cn_ad_run_says_cn_and_ad_everywhere(tiny_cohort, fast_config, tmp_path):
    bids = tmp_path / "bids"
    assert to_bids_main([str(tiny_cohort), "--output", str(bids), "--link", "--rename", "NC=CN",
                         "--rename", "MCI=AD"]) == 0
    run = tmp_path / "run"
    args = ["--data-root", str(bids), "--output-dir", str(run), "--device", "cpu", "--set", "data.classes=[CN,AD]"]
    for override in [*fast_config, *FAST_RUN]:
        args += ["--set", override]
    assert train3d_main(args) == 0
    oof = pd.read_csv(run / "oof_predictions.csv")
    assert "prob_ad" in oof.columns and "prob_mci" not in oof.columns
    assert set(oof["pred_label"]) <= {"CN", "AD"} and set(oof["class_name"]) == {"CN", "AD"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["positive_class"] == "AD" and {"n_ad", "n_cn"} <= set(metrics["per_fold"][0])
    assert "mean_prob_ad" in metrics["per_site"][0] and "called_ad" in metrics["per_site"][0]
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["class_mapping"] == {"CN": 0, "AD": 1} and provenance["positive_class"] == "AD"
    for text in ((run / "report.md").read_text(), (run / "audit.md").read_text()):
        assert "MCI" not in text and " NC" not in text
    report = (run / "report.md").read_text()
    assert "CN vs AD from brain FDG-PET" in report and "Sensitivity (AD recall)" in report
    assert "predictor of AD vs CN" in (run / "audit.md").read_text()
    for png in ("roc.png", "confusion.png", "calibration.png"):
        assert (run / png).stat().st_size > 5000
    # predict takes the classes from the run; a BIDS dataset as input: every PET file, named by BIDS
    result = predict(run, [bids], tmp_path / "pred" / "submission.csv", options={"threads": 1})
    table = pd.read_csv(result.paths["probabilities"])
    assert "prob_ad" in table.columns and set(table["label"]) <= {"CN", "AD"}
    assert len(table) == len(discover(bids, classes=["CN", "AD"])) and table["uuid"].str.startswith("sub-").all()
    submission = (tmp_path / "pred" / "submission.csv").read_text().splitlines()
    assert submission[0] == "uuid,label" and submission[1:] == sorted(submission[1:])
    datalist = discover(bids, classes=["CN", "AD"])
    trained = set(datalist.loc[datalist["split"] == "train", "subject"])
    expected = datalist.set_index("scan_id")["subject"].isin(trained)
    assert (result.table.set_index("uuid")["subject_in_training"] == expected.loc[result.table["uuid"]]).all()
    assert not expected.all()  # the BIDS subjects flag the scans of training subjects, not every scan
