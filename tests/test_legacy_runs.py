"""Run folders written before petmonai's subpackages still predict and report.

``tests/data/config_before_subpackages.yaml`` is a run's ``config.yaml`` as petmonai 0.1 wrote it
(commit 37deefa): its transforms are named by the old modules (``petmonai.spatial.RegisterToTemplated``,
``petmonai.harmonise.SmoothToResolutiond``). ``petmonai.config.LEGACY_MODULES`` maps them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from petmonai.config import LEGACY_MODULES, load_config, upgrade_legacy_names

LEGACY_CONFIG = Path(__file__).parent / "data" / "config_before_subpackages.yaml"


def test_every_old_target_of_the_legacy_config_is_renamed_and_builds():
    from petmonai.transforms import build_pipelines

    text = LEGACY_CONFIG.read_text()
    assert "petmonai.spatial.RegisterToTemplated" in text and "petmonai.harmonise." in text
    cfg = load_config(LEGACY_CONFIG)
    assert not any(old + "." in str(cfg) for old in LEGACY_MODULES)
    preprocess, augment = build_pipelines(cfg)
    names = [type(t).__name__ for t in preprocess.transforms]
    assert "RegisterToTemplated" in names and "SmoothToResolutiond" in names


def test_new_names_are_left_alone():
    cfg = {"a": [{"_target_": "petmonai.transforms.CheckVolumed"}, "$@spacing[0]", "petmonai.spatialx.Y"]}
    assert upgrade_legacy_names(cfg) == cfg


@pytest.mark.slow
def test_a_run_folder_from_before_the_move_predicts_and_reports(tiny_cohort, fast_config, tmp_path):
    from petmonai.commands import train3d_main
    from petmonai.evaluation import build_report
    from petmonai.inference import predict

    run = tmp_path / "run"
    args = ["--config", "demo3d", "--data-root", str(tiny_cohort), "--output-dir", str(run),
            "--set", "report.reference_model=false"]
    for override in fast_config:
        args += ["--set", override]
    assert train3d_main(args) == 0
    legacy = tmp_path / "legacy_run"
    shutil.copytree(run, legacy)
    text = LEGACY_CONFIG.read_text().replace("root: null", f"root: {tiny_cohort}", 1)
    (legacy / "config.yaml").write_text(text)

    new = predict(run, [tiny_cohort / "Test"], tmp_path / "new" / "submission.csv")
    old = predict(legacy, [tiny_cohort / "Test"], tmp_path / "old" / "submission.csv")
    assert new.table.drop(columns=["file"]).equals(old.table.drop(columns=["file"]))
    assert (tmp_path / "old" / "submission.csv").read_text() == (tmp_path / "new" / "submission.csv").read_text()
    assert "ROC AUC" in build_report(legacy).read_text()
