"""scripts/compare_2d_3d.py: identical folds, numbers read from the run folders, the paired difference."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from petmonai.config import default_config_path, load_config
from petmonai.errors import PetmonaiError
from petmonai.evaluation import paired_auc_difference
from petmonai.models import build_model, count_parameters


def test_paired_difference_of_a_model_with_itself_is_zero():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    p = rng.random(40)
    d = paired_auc_difference(y, p, p, [f"s{i}" for i in range(40)], n_boot=200)
    assert d["value"] == 0 and d["ci_low"] == 0 and d["ci_high"] == 0


def test_paired_difference_sign_and_grouping():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 30)
    good, noise = y + rng.normal(0, 0.5, 60), rng.random(60)
    subjects = [f"s{i // 2}" for i in range(60)]  # two scans per subject
    d = paired_auc_difference(y, good, noise, subjects, n_boot=500)
    assert d["value"] == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, noise))
    assert d["ci_low"] > 0 and d["n_units"] == 30
    back = paired_auc_difference(y, noise, good, subjects, n_boot=500)
    assert back["value"] == pytest.approx(-d["value"]) and back["ci_high"] < 0
    folds = np.tile([0, 1], 30)
    g = paired_auc_difference(y, good, noise, subjects, groups=folds, n_boot=50)
    per_fold = [roc_auc_score(y[folds == f], good[folds == f]) - roc_auc_score(y[folds == f], noise[folds == f])
                for f in (0, 1)]
    assert g["value"] == pytest.approx(np.mean(per_fold))


def test_models_option():
    from petmonai.studies import DEFAULT_MODELS, parse_models

    assert parse_models("reference,2d,3d") == ["3d", "2d", "reference"]
    assert parse_models("2d-native,3d-resnet18,3d") == ["3d", "3d-resnet18", "2d-native"]
    assert list(DEFAULT_MODELS) == ["3d", "3d-resnet18", "2d", "2d-native", "2d-baseline", "reference"]
    with pytest.raises(PetmonaiError, match="unknown"):
        parse_models("3d,4d")
    with pytest.raises(PetmonaiError, match="at least one"):
        parse_models("reference")


def test_quick_keeps_the_template_grid_and_shrinks_the_native_2d_grid():
    from petmonai.studies import MODELS, QUICK_NATIVE, quick_overrides

    quick = {k: quick_overrides(default_config_path(config)) for k, (_, config) in MODELS.items()}
    assert quick == {"3d": [], "3d-resnet18": [], "2d": [], "2d-native": QUICK_NATIVE, "2d-baseline": QUICK_NATIVE}


def test_registered_2d_and_3d_configs_differ_only_in_the_model():
    configs = {name: load_config(default_config_path(name))
               for name in ("train3d.yaml", "train2d_registered.yaml", "train3d_resnet18.yaml")}
    base = {k: v for k, v in configs["train3d.yaml"].items() if k != "model"}
    for name in ("train2d_registered.yaml", "train3d_resnet18.yaml"):
        assert {k: v for k, v in configs[name].items() if k != "model"} == base, name
    assert configs["train3d_resnet18.yaml"]["model"] == {"name": "resnet18_3d", "widen_factor": 0.5}
    assert configs["train2d_registered.yaml"]["model"]["name"] == "resnet18_2d_slices"
    for name, cfg in configs.items():  # each builds from its config, widen_factor and the crop depth included
        net = build_model(cfg["model"], cfg)
        assert net(torch.zeros(2, 1, *cfg["crop_size"])).shape == (2, 2), name
    wide = build_model({"name": "resnet18_3d"})
    assert count_parameters(build_model(configs["train3d_resnet18.yaml"]["model"])) < count_parameters(wide) / 3


def test_2d_resnet_on_axial_slices_takes_the_3d_crop_and_learns():
    from petmonai.models import AxialSlices2D, spatial_dims

    cfg = load_config(default_config_path("train2d_registered.yaml"), ["crop_size=[20,24,20]"])
    net = build_model(cfg["model"], cfg)  # in_channels: "$@crop_size[2]" follows the crop
    assert isinstance(net, AxialSlices2D) and net.depth == 20 and net.net.conv1.in_channels == 20
    assert spatial_dims(net) == 2
    x = torch.rand(3, 1, 20, 24, 20)
    logits = net(x)
    assert logits.shape == (3, 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1])).backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["net.conv1.weight"].abs().sum() > 0 and grads["net.fc.weight"].abs().sum() > 0
    # each axial slice is one input channel: (B, 1, X, Y, Z) -> (B, Z, X, Y)
    seen = {}
    net.net.conv1.register_forward_hook(lambda m, inp, out: seen.update(input=inp[0]))
    net.eval()(x)
    assert torch.equal(seen["input"], x[:, 0].permute(0, 3, 1, 2))
    assert net(torch.rand(1, 1, 24, 28, 24)).shape == (1, 2)  # a deeper (whole) volume: centre slices
    with pytest.raises(PetmonaiError, match="input depth 16"):
        net(torch.rand(1, 1, 20, 24, 16))
    with pytest.raises(PetmonaiError, match="the whole config"):
        build_model(cfg["model"])


def test_2d_resnet_on_axial_slices_gives_a_gradcam_map_on_the_volume():
    from petmonai.inference.saliency import gradcam_maps
    from petmonai.models import saliency_layer

    cfg = load_config(default_config_path("train2d_registered.yaml"), ["crop_size=[20,24,20]"])
    torch.manual_seed(0)
    net = build_model(cfg["model"], cfg)
    layer = saliency_layer(cfg["model"], net)
    assert layer == "layer3_map"
    (cam,) = gradcam_maps([net], [torch.rand(1, 24, 28, 24) * 2], layer, [1], flips=[(), (0,)])
    assert cam.shape == (24, 28, 24) and np.isfinite(cam).all() and cam.max() <= 1.0


def _run_numbers(folder):
    """What a run folder holds: its metrics.json and out-of-fold predictions (P(positive) as ``prob``)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    oof = pd.read_csv(folder / "oof_predictions.csv", dtype={"scan_id": str})
    oof["prob"] = oof["prob_mci"]
    return metrics, oof


def _expected_difference(a, b, protocol):
    """AUC(a) - AUC(b) as each run's own headline: per repeat (subject) or repeat/fold, averaged."""
    keys = ["repeat"] if protocol == "subject" else ["repeat", "fold"]
    merged = a.merge(b, on=["repeat", "fold", "scan_id", "label"], suffixes=("_a", "_b"))
    per = [roc_auc_score(g["label"], g["prob_a"]) - roc_auc_score(g["label"], g["prob_b"])
           for _, g in merged.groupby(keys)]
    return float(np.mean(per))


@pytest.mark.slow
def test_comparison_of_every_model_end_to_end(tiny_cohort, tmp_path, capsys, fast_config):
    from petmonai.commands import compare_main
    from petmonai.studies import DIFFERENCES, MODELS

    out = tmp_path / "cmp"
    fast = [o for o in fast_config if not o.startswith(("cv.folds", "train.max_epochs"))]
    args = ["--data-root", str(tiny_cohort), "--quick", "--max-epochs", "1", "--folds", "2", "--repeats", "2",
            "--output-dir", str(out), "--device", "cpu", "--set", "report.write=false", "--set", "report.bootstrap=200",
            *[a for o in fast for a in ("--set", o)]]
    assert compare_main(args) == 0  # no --models: all five and the reference
    assert "# 2D vs 3D comparison" in capsys.readouterr().out
    runs = {k: out / "subject" / k for k in MODELS}
    cols = ["repeat", "fold", "scan_id", "role"]
    first = pd.read_csv(runs["3d"] / "folds.csv", dtype={"scan_id": str})[cols]
    assert first["repeat"].nunique() == 2
    for key, run in runs.items():  # identical folds, every repeat
        pd.testing.assert_frame_equal(pd.read_csv(run / "folds.csv", dtype={"scan_id": str})[cols], first, obj=key)
        assert key == "3d" or not (run / "reference").exists()  # the reference is fitted once per protocol
    summary = json.loads((out / "comparison.json").read_text())["results"]["subject"]
    table = {m["key"]: m for m in summary["models"]}
    assert set(table) == {*MODELS, "reference"} and list(table)[:2] == ["3d", "reference"]
    oofs = {}
    for key, folder in {**runs, "reference": runs["3d"] / "reference"}.items():
        metrics, oofs[key] = _run_numbers(folder)
        row = table[key]
        assert row["roc_auc"] == metrics["pooled_ci"]["roc_auc"]  # headline + CI: the run folder's own numbers
        per_repeat = [roc_auc_score(g["label"], g["prob"]) for _, g in oofs[key].groupby("repeat")]
        assert row["spread"]["values"] == pytest.approx(per_repeat) and row["spread"]["n"] == 2
        assert row["spread"]["mean"] == pytest.approx(np.mean(per_repeat)) == pytest.approx(row["roc_auc"]["value"])
        assert row["spread"]["sd"] == pytest.approx(np.std(per_repeat, ddof=1))
        assert (row["spread"]["min"], row["spread"]["max"]) == pytest.approx((min(per_repeat), max(per_repeat)))
    for key in MODELS:  # each run's own network, its time from its resources.json
        resources = json.loads((runs[key] / "resources.json").read_text())
        assert table[key]["parameters"] == resources["parameters"]
        assert table[key]["cv_wall_seconds"] == resources["cv_wall_seconds"]
    diffs = summary["differences"]
    assert [(d["a_key"], d["b_key"]) for d in diffs] == list(DIFFERENCES)
    for d in diffs:
        assert d["value"] == pytest.approx(_expected_difference(oofs[d["a_key"]], oofs[d["b_key"]], "subject"))
        assert d["n_splits"] == 2 and d["n_units"] == oofs["3d"]["subject"].nunique()
    md = (out / "comparison.md").read_text()
    for row in table.values():
        assert f"| {row['name']} | {row['roc_auc']['value']:.2f} " in md
        assert f"{row['spread']['mean']:.2f} (" in md
    for d in diffs:
        assert f"**{d['a']} - {d['b']}** (pooled out-of-fold AUC, 2 splits): {d['value']:+.3f}" in md
    assert "![Training loss](comparison_loss.png)" in md
    assert (out / "comparison.png").stat().st_size > 1000 and (out / "comparison_loss.png").stat().st_size > 1000
    # a second call reuses the finished runs (resumable comparison); another network in a run folder is refused
    mtime = (runs["3d"] / "metrics.json").stat().st_mtime
    assert compare_main(args) == 0
    assert (runs["3d"] / "metrics.json").stat().st_mtime == mtime
    capsys.readouterr()
    assert compare_main([*args, "--config-2d", str(default_config_path("train2d.yaml")), "--models", "2d"]) != 0
    assert "use another --output-dir" in "".join(capsys.readouterr())
