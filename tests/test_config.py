import sys
import textwrap

import pytest
import torch

from petmonai.config import apply_override, build_component, default_config_path, load_config, read_yaml
from petmonai.errors import ConfigError
from petmonai.transforms import build_pipelines


def test_default_and_demo_configs_load():
    cfg = load_config(default_config_path("train3d.yaml"))
    demo = load_config(default_config_path("demo3d.yaml"))
    assert demo["cv"]["folds"] == 3 and demo["train"]["batch_size"] == cfg["train"]["batch_size"]  # merged key by key
    assert demo["preprocess"] == cfg["preprocess"]
    assert cfg["model"]["name"] == "sfcn_3d" and cfg["train"]["keep"] == "last"
    # the earlier default, the base of the experiment configs: the ResNet-18 recipe
    resnet = load_config(default_config_path("experiments/resnet18.yaml"))
    assert resnet["model"]["name"] == "resnet18_3d" and resnet["train"]["keep"] == "best"
    assert resnet["preprocess"] == cfg["preprocess"]


def test_overrides_parse_yaml_values():
    cfg = load_config(overrides=["train.lr=1e-3", "spacing=[3, 3, 3]", "augment.1.prob=0.25", "cv.folds_file=null"])
    assert cfg["train"]["lr"] == pytest.approx(1e-3)
    assert cfg["spacing"] == [3, 3, 3]
    assert cfg["augment"][1]["prob"] == 0.25
    assert cfg["cv"]["folds_file"] is None


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match="did you mean lr"):
        load_config(overrides=["train.lrr=1"])


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match="train.max_epochs"):
        load_config(overrides=["train.max_epochs=lots"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {default_config_path()}\ntrain:\n  amp: 3\n")
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(bad)
    extra = tmp_path / "extra.yaml"
    extra.write_text(f"_base_: {default_config_path()}\nmystery: 1\n")
    with pytest.raises(ConfigError, match="mystery"):
        load_config(extra)


def test_new_kwarg_allowed_inside_target_entry():
    cfg = read_yaml(default_config_path())
    apply_override(cfg, "augment.1.lazy=false")
    assert cfg["augment"][1]["lazy"] is False


def test_yaml_is_read_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_user_transform_plugs_in_from_yaml(tmp_path, monkeypatch, tiny_cohort):
    """A transform defined outside petmonai, named only in YAML, runs inside the pipeline."""
    (tmp_path / "my_scanner.py").write_text(textwrap.dedent('''
        import torch
        from monai.transforms import MapTransform

        class ClipHotVoxelsd(MapTransform):
            """Clip intensities above a ceiling (e.g. a scanner's hot-spot artefacts)."""
            def __init__(self, keys, ceiling):
                super().__init__(keys)
                self.ceiling = ceiling
            def __call__(self, data):
                d = dict(data)
                for k in self.key_iterator(d):
                    d[k] = torch.clamp(d[k], max=self.ceiling)
                    d["clipped_by_user_transform"] = True
                return d
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "mine.yaml"
    config.write_text(textwrap.dedent(f"""
        _base_: {default_config_path()}
        spacing: [8.0, 8.0, 8.0]
        spatial_size: [24, 28, 24]
    """))
    cfg = load_config(config)
    cfg["preprocess"].insert(-1, {"_target_": "my_scanner.ClipHotVoxelsd", "keys": "image", "ceiling": 1.5})
    preprocess, _ = build_pipelines(cfg)
    image = next((tiny_cohort / "Train" / "MCI").iterdir())
    out = preprocess({"image": str(image), "label": 1})
    assert out["clipped_by_user_transform"] is True
    assert float(out["image"].max()) <= 1.5 + 1e-6
    assert tuple(out["image"].shape) == (1, 24, 28, 24)
    sys.modules.pop("my_scanner", None)


def test_unknown_target_is_a_config_error():
    cfg = load_config()
    cfg["augment"] = [{"_target_": "NoSuchTransformd", "keys": "image"}]
    with pytest.raises(ConfigError, match="augment"):
        build_component(cfg, "augment")


def test_model_from_registry_and_target():
    from petmonai.models import build_model

    net = build_model({"name": "resnet18_3d"})
    assert net.eval()(torch.zeros(1, 1, 24, 28, 24)).shape == (1, 2)
    custom = build_model({"_target_": "monai.networks.nets.DenseNet121", "spatial_dims": 3, "in_channels": 1,
                          "out_channels": 2})
    assert custom.eval()(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 2)
    with pytest.raises(ConfigError, match="model.name"):
        build_model({"name": "vgg"})
