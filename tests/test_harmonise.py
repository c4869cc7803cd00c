"""Harmonisation transforms (issue 8) and the after-preprocessing property check."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import MetaTensor

from petmonai.config import default_config_path, load_config
from petmonai.transforms import FWHM_PER_SIGMA, MaskToBraind, SmoothToResolutiond, smoothing_sigma
from petmonai.audit import preprocessed_separability, volume_properties
from petmonai.transforms import build_pipelines

EXPERIMENTS = ["experiments/mask.yaml", "experiments/smooth.yaml", "experiments/smooth_mask.yaml",
               "experiments/smooth_mask_invariance.yaml", "experiments/register.yaml", "experiments/register_suvr.yaml",
               "experiments/register_parcels.yaml"]


def impulse(voxels) -> MetaTensor:
    img = torch.zeros(1, 41, 41, 41)
    img[0, 20, 20, 20] = 1.0
    return MetaTensor(img, affine=torch.diag(torch.tensor([*voxels, 1.0])))


def second_moment_sd(profile: torch.Tensor) -> float:
    x = torch.arange(len(profile), dtype=torch.float64) - len(profile) // 2
    p = profile.double() / profile.sum()
    return float(torch.sqrt((p * x**2).sum()))


def test_smoothing_sigma():
    assert smoothing_sigma([2.0], 9.0, 7.0)[0] == pytest.approx(math.sqrt(81 - 49 - 4) / FWHM_PER_SIGMA / 2.0)
    assert smoothing_sigma([4.0], 6.0, 7.0) == [0.0]  # already coarser than the target: left alone


def test_smooth_to_resolution_adds_the_missing_blur_per_axis():
    voxels = [2.0, 2.5, 3.3]
    out = SmoothToResolutiond("image", target_fwhm=9.0, native_fwhm=7.0)({"image": impulse(voxels)})["image"][0]
    expected = smoothing_sigma(voxels, 9.0, 7.0)
    measured = [second_moment_sd(out.sum(dim=(1, 2))), second_moment_sd(out.sum(dim=(0, 2))),
                second_moment_sd(out.sum(dim=(0, 1)))]
    for m, e in zip(measured, expected):  # MONAI's kernel integrates over a voxel: + 1/12 voxel^2 variance
        assert m == pytest.approx(math.sqrt(e**2 + 1 / 12), rel=0.05)
    # in mm, finer axes get more blur: every axis ends near the same effective resolution
    effective = [math.hypot(7.0, v, FWHM_PER_SIGMA * e * v) for e, v in zip(expected, voxels)]
    assert effective == pytest.approx([9.0] * 3, abs=1e-6)
    assert measured[0] * voxels[0] > measured[2] * voxels[2]


def test_mask_to_brain_zeroes_the_background():
    img = torch.rand(1, 30, 30, 30) * 0.1  # background noise
    img[0, 8:22, 8:22, 8:22] = 1.0 + torch.rand(14, 14, 14) * 0.1
    out = MaskToBraind("image", margin=1)({"image": img})["image"]
    assert float(out[0, :6].abs().max()) == 0.0 and torch.equal(out[0, 8:22, 8:22, 8:22], img[0, 8:22, 8:22, 8:22])
    props = volume_properties(out)
    assert props["background_sd"] < volume_properties(img)["background_sd"]


def test_property_separability_flags_a_shortcut():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    table = pd.DataFrame({"shortcut": y + rng.normal(0, 0.1, 40), "noise": rng.random(40), "constant": 1.0})
    result = preprocessed_separability(table, y)
    assert result["auc"]["shortcut"] == 1.0 and result["auc"]["constant"] == 0.5 and result["auc"]["noise"] < 0.8
    assert len(result["warnings"]) == 1 and "shortcut" in result["warnings"][0]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_configs_preprocess_a_phantom(name, tiny_cohort):
    overrides = ["spacing=[8.0, 8.0, 8.0]", "spatial_size=[24, 28, 24]"]
    cfg = load_config(default_config_path(name), overrides)
    preprocess, _ = build_pipelines(cfg)
    path = sorted((tiny_cohort / "Train" / "MCI").iterdir())[0]
    out = preprocess({"image": str(path), "label": 1})["image"]
    assert tuple(out.shape) == (1, 24, 28, 24) and torch.isfinite(out).all()
    if "mask" in name or "register" in name:
        assert float((out == 0).float().mean()) > 0.2  # the background is gone


def test_audit_checks_the_preprocessed_volumes(tiny_cohort, tmp_path, capsys):
    """scripts/audit.py --config: the header audit, then the same question after preprocessing."""
    import json

    from petmonai.commands import audit_main

    assert audit_main(["--data-root", str(tiny_cohort), "--output-dir", str(tmp_path),
                       "--config", str(default_config_path("experiments/smooth_mask.yaml")),
                       "--set", "spacing=[8.0, 8.0, 8.0]", "--set", "spatial_size=[24, 28, 24]"]) == 0
    printed = capsys.readouterr().out
    assert "After preprocessing with" in printed
    after = json.loads((tmp_path / "audit.json").read_text())["after_preprocessing"]
    assert after["auc"]["shape"] == 0.5 and after["auc"]["dtype"] == 0.5  # one grid, one data type for all
    assert {"texture", "p99", "background_sd"} <= set(after["auc"]) and after["n_scans"] == 12
    assert "## After preprocessing" in (tmp_path / "audit.md").read_text()
    assert "registration" not in after and not (tmp_path / "registration.png").exists()


def test_audit_of_a_registering_config_checks_the_registration(tiny_cohort, tmp_path, capsys):
    """audit.py --config with spatial normalisation: each scan's match with the template is a property
    the classes must not differ in, and registration.png shows every registration."""
    import json

    from petmonai.commands import audit_main

    assert audit_main(["--data-root", str(tiny_cohort), "--output-dir", str(tmp_path),
                       "--config", str(default_config_path("experiments/register_suvr.yaml")),
                       "--set", "spacing=[6.0, 6.0, 6.0]", "--set", "spatial_size=[32, 40, 32]"]) == 0
    printed = capsys.readouterr().out
    assert "Registration to the template: correlation" in printed
    after = json.loads((tmp_path / "audit.json").read_text())["after_preprocessing"]
    assert "template_correlation" in after["auc"] and after["registration"]["min"] > 0.25
    assert len(after["registration"]["template_correlation"]) == 12
    assert after["auc"]["shape"] == 0.5
    png = tmp_path / "registration.png"
    assert png.is_file() and png.stat().st_size > 20_000
    assert "montage `registration.png`" in (tmp_path / "audit.md").read_text()


@pytest.mark.slow
def test_experiment_table_reads_the_runs(tiny_cohort, tmp_path):
    """scripts/experiments.py: one row per configuration and model, numbers from the run folders."""
    import json

    from petmonai.studies import run_experiments

    configs = [default_config_path("train3d.yaml"), default_config_path("experiments/mask.yaml")]
    small = ["spacing=[8.0, 8.0, 8.0]", "spatial_size=[24, 28, 24]", "crop_size=[20, 24, 20]", "cv.folds=2"]
    rows = run_experiments(configs, str(tiny_cohort), tmp_path, protocols=["subject"],
                           options={"max_epochs": 1, "device": "cpu", "overrides": small})
    assert [r["configuration"] for r in rows] == ["train3d", "mask"]
    for row in rows:
        run = tmp_path / "subject" / row["configuration"]
        metrics = json.loads((run / "metrics.json").read_text())
        assert row["results"]["subject"]["pooled"] == metrics["pooled_ci"]["roc_auc"]["value"]
        ref_cfg = (run / "config.yaml").read_text()
        assert "preprocessing: package" in ref_cfg  # the reference sees the same (harmonised) inputs
        assert row["reference"]["subject"]["pooled"] is not None
    folds = [(tmp_path / "subject" / n / "folds.csv").read_text() for n in ("train3d", "mask")]
    assert folds[0] == folds[1]  # same folds for every configuration
    table = (tmp_path / "experiments.md").read_text()
    assert table.count("| `") == 4 and "PCA + LR reference (same inputs)" in table


@pytest.mark.parametrize("path", sorted(default_config_path("experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_experiment_configs_augment_a_preprocessed_volume(path):
    """Every experiment config's training augmentation runs on a volume of its preprocessed size and
    gives a finite crop of ``crop_size``."""
    cfg = load_config(path)
    _, augment = build_pipelines(cfg)
    augment.set_random_state(seed=0)
    volume = 1.0 + 0.1 * torch.rand(1, *cfg["spatial_size"])
    for _ in range(3):  # several draws: the probabilistic transforms fire in some of them
        out = augment({"image": volume.clone(), "label": 1})["image"]
        assert tuple(out.shape[1:]) == tuple(cfg["crop_size"]) and torch.isfinite(torch.as_tensor(out)).all()


def test_the_registration_montage_of_a_large_cohort_draws_the_worst_scans(tmp_path):
    """A cohort of thousands would need thousands of tiles: beyond the limit the montage draws the scans
    least like the template, and its title says so."""
    from petmonai.audit import find_registration, registration_montage, template_correlations
    from petmonai.audit.registration import montage_scans
    from petmonai.transforms import on_grid

    register = find_registration(build_pipelines(load_config(None))[0])
    shape = (32, 40, 32)
    template = on_grid(register.template.image, shape).astype(np.float32)
    rng = np.random.default_rng(0)
    volumes = {f"s{i}": (template + rng.normal(0, 0.1 * i, shape).astype(np.float32))[None] for i in range(8)}
    corr = template_correlations(volumes, register)
    assert montage_scans(volumes, corr, limit=3) == ["s5", "s6", "s7"]  # the noisiest: least like it
    assert montage_scans(volumes, corr, limit=8) == list(volumes)
    small = registration_montage(volumes, register, tmp_path / "all.png", corr, limit=8)
    large = registration_montage(volumes, register, tmp_path / "worst.png", corr, limit=3)
    assert large.is_file() and small.is_file() and large.stat().st_size < small.stat().st_size
