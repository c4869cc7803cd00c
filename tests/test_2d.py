"""The 2D 50-slice model: slice transforms, network, evaluation stage, views, and a run end to end."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from petmonai.config import default_config_path, load_config
from petmonai.training import memory_format
from petmonai.models import build_model, model_label, spatial_dims
from petmonai.transforms import AxialSlices, RandAxialSlicesd, build_evaluation, build_pipelines, slice_indices

CPU = torch.device("cpu")
SMALL_2D = ["spacing=[4.8, 4.8, 4.8]", "spatial_size=[40, 40, 32]", "crop_size=[36, 36]", "num_slices=8",
            "model.in_channels=8", "cv.folds=2", "train.progress_bar=false"]


def volume_with_slice_numbers(depth: int = 20) -> torch.Tensor:
    """(1, 6, 5, depth) where every voxel of axial slice k holds k."""
    return torch.arange(depth, dtype=torch.float32).expand(1, 6, 5, depth).clone()


def test_even_slices_span_the_volume():
    idx = slice_indices(64, 50)
    assert len(idx) == 50 and idx[0] == 0 and idx[-1] == 63 and np.all(np.diff(idx) >= 1)
    assert slice_indices(20, 50).max() == 19  # more slices than the volume has: repeats, never out of range
    out = AxialSlices(4)(volume_with_slice_numbers())
    assert out.shape == (4, 6, 5) and out[:, 0, 0].tolist() == [2.0, 7.0, 12.0, 17.0]


def test_random_slices_are_drawn_with_replacement_and_reproducible():
    a = RandAxialSlicesd("image", num_slices=50).set_random_state(3)
    b = RandAxialSlicesd("image", num_slices=50).set_random_state(3)
    vol = volume_with_slice_numbers(20)
    first, again = a({"image": vol})["image"], b({"image": vol})["image"]
    assert first.shape == (50, 6, 5) and torch.equal(first, again)
    drawn = first[:, 0, 0].numpy()
    assert len(np.unique(drawn)) < 50  # 50 draws from 20 slices: repeats (with replacement)
    assert not np.all(np.diff(drawn) >= 0)  # the baseline's draws are unsorted
    second = a({"image": vol})["image"][:, 0, 0].numpy()
    assert not np.array_equal(drawn, second)  # a new draw each call
    ordered = RandAxialSlicesd("image", num_slices=50, sort=True).set_random_state(3)({"image": vol})["image"]
    assert np.all(np.diff(ordered[:, 0, 0].numpy()) >= 0)
    with pytest.raises(ValueError, match="distinct"):
        RandAxialSlicesd("image", num_slices=50, replace=False)({"image": vol})


def test_resnet18_2d_and_layout():
    net = build_model({"name": "resnet18_2d"})
    assert net(torch.zeros(2, 50, 120, 120)).shape == (2, 2)
    assert spatial_dims(net) == 2 and spatial_dims(build_model({"name": "resnet18_3d"})) == 3
    assert model_label({"name": "resnet18_2d"}) == "2D CNN" and model_label({"name": "resnet18_3d"}) == "3D CNN"
    assert memory_format(torch.device("cuda"), {"channels_last": "auto"}, dims=2) == torch.channels_last
    assert memory_format(CPU, {"channels_last": True}, dims=3) == torch.channels_last_3d


@pytest.mark.parametrize("name", ["train2d_baseline.yaml", "train2d.yaml"])
def test_2d_configs_build_and_feed_the_network(name):
    cfg = load_config(default_config_path(name))
    assert cfg["num_slices"] == cfg["model"]["in_channels"] == 50 and cfg["crop_size"] == [120, 120]
    _, augment = build_pipelines(cfg)
    evaluate = build_evaluation(cfg)
    cached = {"image": torch.rand(1, *cfg["spatial_size"]), "label": 1}
    augment.set_random_state(0)
    train_view, eval_view = augment(dict(cached))["image"], evaluate(dict(cached))["image"]
    assert train_view.shape == eval_view.shape == (50, 120, 120)
    assert torch.equal(evaluate(dict(cached))["image"], eval_view)  # evaluation is deterministic
    baseline = load_config(default_config_path("train2d_baseline.yaml"))["train"]
    assert (baseline["batch_size"], baseline["lr"], baseline["max_epochs"]) == (2, 1e-3, 3)
    assert build_evaluation(load_config(default_config_path("train3d.yaml"))) is None  # 3D: the cached volume


def test_2d_views_random_and_even():
    from petmonai.inference import RandomSlices2D, resolve_options

    cfg = load_config(default_config_path("train2d.yaml"), SMALL_2D)
    opts = resolve_options(cfg)
    assert opts["views"] == "random_slices_2d" and opts["passes"] == 10
    vol = torch.rand(1, 40, 40, 32)
    views = RandomSlices2D(cfg, opts)
    a = views.views(vol, np.random.default_rng(5))
    assert a.shape == (10, 8, 36, 36) and torch.equal(a, views.views(vol, np.random.default_rng(5)))
    assert not torch.equal(a[0], a[1])
    even = RandomSlices2D(cfg, resolve_options(cfg, {"slices": "even", "crop": "center", "passes": 1}))
    assert torch.equal(even.views(vol)[0], build_evaluation(cfg)({"image": vol})["image"])  # = the CV's view


@pytest.mark.slow
def test_2d_run_end_to_end_and_predict(tiny_cohort, tmp_path):
    """train3d.py with the 2D config, then predict.py through the 2D views; saliency is 3D only."""
    from petmonai.commands import train3d_main
    from petmonai.inference import predict

    run = tmp_path / "run2d"
    args = ["--config", str(default_config_path("train2d_baseline.yaml")), "--data-root", str(tiny_cohort),
            "--output-dir", str(run), "--device", "cpu"]
    for o in [*SMALL_2D, "train.max_epochs=2", "report.reference_model=false"]:
        args += ["--set", o]
    assert train3d_main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["per_fold"]) == 2 and "2D CNN" in (run / "report.md").read_text()
    resources = json.loads((run / "resources.json").read_text())
    assert resources["parameters"] == sum(p.numel() for p in build_model({"name": "resnet18_2d", "in_channels": 8}).parameters())
    out = tmp_path / "pred" / "submission.csv"
    result = predict(run, [tiny_cohort / "Test"], out, options={"passes": 3})
    sub = pd.read_csv(out)
    assert list(sub.columns) == ["uuid", "label"] and len(sub) == 3 and set(sub["label"]) <= {"NC", "MCI"}
    assert (result.table["n_views"] == 3 * result.table["n_models"]).all() and (result.table["n_models"] == 2).all()
    from petmonai.errors import ConfigError

    with pytest.raises(ConfigError, match="3D model"):
        predict(run, [tiny_cohort / "Test"], tmp_path / "p2" / "submission.csv", saliency=True)
