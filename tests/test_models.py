"""Model registry and checkpoint choice: the small SFCN, Grad-CAM layer per model, ``train.keep``."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader

from petmonai.runs import BEST_CHECKPOINT
from petmonai.training import build_engines
from petmonai.config import load_config
from petmonai.errors import ConfigError
from petmonai.inference import resolve_options
from petmonai.models import build_model, count_parameters


def test_sfcn_is_small_and_takes_the_template_grid_and_a_crop():
    net = build_model({"name": "sfcn_3d"})
    assert count_parameters(net) < 1_000_000 < count_parameters(build_model({"name": "resnet18_3d"}))
    net.eval()
    for shape in ((48, 56, 48), (40, 48, 40), (32, 40, 32)):
        assert net(torch.zeros(2, 1, *shape)).shape == (2, 2)
    narrow = build_model({"name": "sfcn_3d", "channels": [8, 16, 8], "dropout": 0.0})
    assert count_parameters(narrow) < count_parameters(net)


def test_saliency_layer_follows_the_model():
    cfg = load_config()
    assert resolve_options(cfg)["saliency_layer"] == "features.block4"
    assert resolve_options(load_config(overrides=["model.name=resnet18_3d"]))["saliency_layer"] == "layer3"
    assert resolve_options(cfg, {"saliency_layer": "features.block3"})["saliency_layer"] == "features.block3"
    net = build_model({"name": "sfcn_3d"})
    assert "features.block4" in dict(net.named_modules())


def _engines(tmp_path, validate: bool = True, **options):
    """A tiny SFCN and its engines on 8 random volumes whose labels are unrelated to the images
    (so the validation AUC wanders and "best" and "last" differ)."""
    torch.manual_seed(0)
    net = build_model({"name": "sfcn_3d", "channels": [4, 8], "dropout": 0.0})
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(1, 8, 8, 8, generator=g), "label": i % 2} for i in range(8)]
    options = {"max_epochs": 4, "lr": 1e-2, "weight_decay": 0.0, "early_stop_patience": 1, "progress_bar": False,
               **options}
    cfg = load_config(overrides=[f"train.{key}={value}" for key, value in options.items()])["train"]
    trainer, _ = build_engines(net, DataLoader(data, batch_size=4, shuffle=True),
                               DataLoader(data[:6], batch_size=3) if validate else None,
                               tmp_path, cfg, torch.device("cpu"), progress_bar=False)
    return net, trainer


def _train(tmp_path, keep: str):
    net, trainer = _engines(tmp_path, keep=keep)
    trainer.run()
    saved = torch.load(tmp_path / BEST_CHECKPOINT, map_location="cpu")
    saved = saved.get("model", saved)
    return net, saved, trainer


def test_keep_last_trains_every_epoch_and_keeps_the_final_weights(tmp_path):
    net, saved, trainer = _train(tmp_path, "last")
    assert trainer.state.epoch == 4 and len(trainer.history.rows) == 4  # no early stop despite patience 1
    final = net.state_dict()
    assert all(torch.equal(saved[k], final[k]) for k in final)


def test_keep_must_be_best_or_last(tmp_path):
    with pytest.raises(ConfigError, match="train.keep"):
        _train(tmp_path, "final")


def test_onecycle_schedule_warms_up_then_anneals(tmp_path):
    net, trainer = _engines(tmp_path, validate=False, max_epochs=6, scheduler="onecycle", keep="last")
    lrs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: lrs.append(trainer.optimizer.param_groups[0]["lr"]))
    trainer.run()
    peak = lrs.index(max(lrs))
    assert len(lrs) == 12 and 0 < peak < 11 and lrs[0] < 0.5e-2 and lrs[-1] < 1e-3
    assert max(lrs) == pytest.approx(1e-2, rel=0.05)
    with pytest.raises(ConfigError, match="train.scheduler"):
        _engines(tmp_path, scheduler="step")


def test_unknown_keep_or_scheduler_fails_when_the_config_loads():
    for override in ("train.keep=final", "train.scheduler=onecylce", "cv.test_views=windows"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_config(overrides=[override])


def test_model_facts_live_in_the_registry_and_a_network_of_your_own_gets_defaults():
    from petmonai.inference import default_views
    from petmonai.models import MODEL_FACTS, model_facts, register, saliency_layer

    assert {name: (f.saliency_layer, f.views) for name, f in MODEL_FACTS.items()} == {
        "sfcn_3d": ("features.block4", "sliding_window_3d"), "resnet18_3d": ("layer3", "sliding_window_3d"),
        "resnet18_2d": ("layer3", "random_slices_2d"), "resnet18_2d_slices": ("layer3_map", "sliding_window_3d")}
    own = load_config(overrides=["model={_target_: monai.networks.nets.DenseNet121, spatial_dims: 3, "
                                 "in_channels: 1, out_channels: 2}"])
    assert model_facts(own["model"]).saliency_layer is None
    assert default_views(own) == "sliding_window_3d" and resolve_options(own)["views"] == "sliding_window_3d"
    net = build_model(own["model"], own)
    layer = saliency_layer(own["model"], net)
    assert layer == "features.denseblock4.denselayer16.layers.conv2"  # its last 3x3x3 convolution
    assert dict(net.named_modules())[layer].kernel_size == (3, 3, 3)
    flat = load_config(overrides=["model={_target_: my_net.Net}", "crop_size=[120, 120]", "allow_modules=[my_net]"])
    with pytest.raises(ConfigError, match="inference.views"):
        default_views(flat)
    with pytest.raises(ConfigError, match="inference.saliency_layer"):
        saliency_layer({"_target_": "my_net.Net"}, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))

    @register("tiny_test_net", saliency_layer="0", views="random_slices_2d")
    def tiny_test_net(**kwargs):
        return torch.nn.Sequential(torch.nn.Conv2d(50, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    try:
        mine = load_config("train2d", ["model={name: tiny_test_net}"])
        assert default_views(mine) == "random_slices_2d" and resolve_options(mine)["saliency_layer"] == "0"
    finally:
        from petmonai.models import MODELS

        MODELS.pop("tiny_test_net"), MODEL_FACTS.pop("tiny_test_net")
