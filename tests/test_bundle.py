"""A run as a MONAI bundle (petmonai.inference.bundle_export): MONAI's own runner and tools use it.

The tiny run of test_inference.py (2 fold models, the package's preprocessing at 8 mm) is exported;
``python -m monai.bundle run`` then predicts test volumes in a subprocess, and its probabilities
must equal ``predict``'s; MONAI's verify_metadata, verify_net_in_out and ckpt_export must pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from petmonai.errors import PetmonaiError
from petmonai.inference import export_bundle, predict

from test_inference import tiny_run_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory):
    run_dir, _ = tiny
    return export_bundle(run_dir, tmp_path_factory.mktemp("bundles") / "tiny_bundle", authors="petmonai tests")


@pytest.fixture(scope="module")
def inputs(tiny, tmp_path_factory):
    """Three test volumes of the tiny cohort and one file that is no NIfTI volume."""
    _, cohort = tiny
    folder = tmp_path_factory.mktemp("bundle_inputs")
    for name in ("1.nii.gz", "2.nii.gz", "5.nii.gz"):
        shutil.copy(cohort / "Test" / name, folder / name)
    (folder / "66.nii.gz").write_bytes(b"not a NIfTI volume")
    return folder


def test_bundle_layout(bundle, tiny):
    for name in ("configs/inference.json", "configs/metadata.json", "configs/metadata_schema.json",
                 "models/model.pt", "docs/README.md", "LICENSE"):
        assert (bundle / name).is_file(), name
    assert not list(bundle.parent.glob(".*partial*"))  # nothing left of the temporary folder
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["dataset_dir"] and config["output_dir"] and config["network_def"]["n_models"] == 2
    assert config["fold_network"]["_target_"] == "monai.networks.nets.ResNet"  # the run's own network entry
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 1 and fmt["inputs"]["image"]["spatial_shape"] == [24, 28, 24]
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "NC", "1": "MCI"} and fmt["outputs"]["pred"]["num_channels"] == 2
    assert meta["required_packages_version"]["petmonai"] and "NOT FOR CLINICAL USE" in meta["intended_use"]
    card = (bundle / "docs" / "README.md").read_text()
    assert "Not for clinical use" in card and "python -m monai.bundle run" in card and "Intended use and limits" in card
    assert "records no cross-validation figures" in card  # the tiny run has none: said so, not invented


def test_monai_runs_the_bundle_as_predict_does(bundle, inputs, tiny, tmp_path):
    out = tmp_path / "monai_out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle), "--dataset_dir", str(inputs), "--output_dir", str(out), "--skip_bad", "True"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = pd.read_csv(out / "probabilities.csv", dtype={"uuid": str})
    assert list(got.columns) == ["uuid", "file", "prob_nc", "prob_mci"] and list(got["uuid"]) == ["1", "2", "5"]
    skipped = pd.read_csv(out / "skipped.csv", dtype={"uuid": str})
    assert list(skipped["uuid"]) == ["66"] and "NIfTI" in skipped.loc[0, "problem"]

    good = [inputs / f"{u}.nii.gz" for u in ("1", "2", "5")]
    expected = predict(tiny[0], good, tmp_path / "pred" / "submission.csv",
                       options={"threads": 1}).table
    assert (got["prob_mci"] - expected["prob_mci"]).abs().max() < 1e-4
    assert (got["prob_nc"] + got["prob_mci"] - 1.0).abs().max() < 1e-6


def test_a_file_that_cannot_be_read_stops_the_bundle_run(bundle, inputs, tmp_path, capsys):
    from monai.bundle import run

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle),
            dataset_dir=str(inputs), output_dir=str(out))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "66.nii.gz" in err and "not a readable NIfTI" in err and "--skip_bad True" in err
    assert not out.exists()  # nothing written
    with pytest.raises(SystemExit):
        run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle),
            dataset_dir=str(tmp_path / "missing"), output_dir=str(out))
    assert "dataset_dir" in capsys.readouterr().err


def test_monai_tools_verify_and_export_the_bundle(bundle, tmp_path):
    from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out

    meta, config = str(bundle / "configs" / "metadata.json"), str(bundle / "configs" / "inference.json")
    verify_metadata(meta_file=meta, filepath=str(bundle / "configs" / "metadata_schema.json"))  # offline
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, device="cpu")
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(bundle / "models" / "model.pt"),
                meta_file=meta, config_file=config, bundle_root=str(bundle))
    scripted = torch.jit.load(str(ts))
    parser = ConfigParser()
    parser.read_config(config)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    x = torch.rand(2, 1, 24, 28, 24, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        assert torch.allclose(torch.softmax(scripted(x), 1), torch.softmax(net.eval()(x), 1), atol=1e-5)


def test_bad_exports_fail_clearly_and_leave_nothing(bundle, tiny, tmp_path, monkeypatch):
    from petmonai.commands import export_bundle_main
    import petmonai.inference.bundle_export as bundle_export

    run_dir, _ = tiny
    with pytest.raises(PetmonaiError, match="exists; pass --overwrite"):
        export_bundle(run_dir, bundle)
    broken = tmp_path / "broken_run"
    shutil.copytree(run_dir, broken)
    (broken / "fold_1" / "best_model.pt").unlink()
    with pytest.raises(PetmonaiError, match=r"missing checkpoint\(s\) fold_1/best_model.pt"):
        export_bundle(broken, tmp_path / "b1")
    assert not (tmp_path / "b1").exists()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_export, "model_card", fail)  # fails after the weights and configs are written
    with pytest.raises(OSError, match="disk full"):
        export_bundle(run_dir, tmp_path / "b2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken_run"]  # no bundle, no partial folder
    assert export_bundle_main(["--run-dir", str(run_dir), "--output", str(bundle)]) == 2  # one line, exit 2


def test_model_card_shows_the_figures_of_the_run():
    from petmonai.inference.bundle_card import _figures_section

    ci = {"value": 0.83, "ci_low": 0.67, "ci_high": 0.94}
    metrics = {"protocol": "subject", "pooled_ci": {"roc_auc": ci}, "headline": {"text": "pooled AUC 0.83"},
               "fold_summary": {"roc_auc": {"mean": 0.88, "sd": 0.11}},
               "fold_mean_ci": {"roc_auc": {"ci_low": 0.70, "ci_high": 1.0}}}
    reference = {"pooled_ci": {"roc_auc": {"value": 0.86, "ci_low": 0.73, "ci_high": 0.96}}}
    text = _figures_section(metrics, reference, "MCI")
    assert "| ROC AUC | 0.83 (0.67-0.94) | 0.88 ± 0.11 (0.70-1.00) |" in text
    assert "on P(MCI)" in text
    assert "| ROC AUC | 0.86 (0.73-0.96) | n/a |" in text and "PCA + LR reference" in text
