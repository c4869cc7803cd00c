import ast
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from ignite.engine import Events

from petmonai.config import (SCHEDULERS, apply_override, build_component, default_config, default_config_path,
                             dump_yaml, load_config, pipeline_entries, read_yaml, shipped_configs)
from petmonai.errors import ConfigError
from petmonai.transforms import build_pipelines

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _test_modules_allowed():
    """The stage tests name transforms of a module ``my`` (never imported: nothing is built from
    them); the trust check (petmonai.trust) would refuse them as a user's unconfirmed code."""
    from petmonai.trust import trust_policy

    with trust_policy(allow_modules=["my"]):
        yield


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
    assert cfg["augment"]["flip"]["prob"] == 0.25  # position 1 of the built augmentation: its flip stage
    assert cfg["cv"]["folds_file"] is None
    assert load_config(overrides=["augment.flip.prob=0.25"])["augment"] == cfg["augment"]


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
    assert cfg["augment"]["flip"]["lazy"] is False


def test_yaml_is_read_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


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


# --- one source of defaults --------------------------------------------------------------------


def test_a_config_names_only_what_it_changes(tmp_path):
    """No `_base_`: a file naming one value resolves to the default config with that one change."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("train: {lr: 0.002}\n")
    expected = default_config()
    expected["train"]["lr"] = 0.002
    assert load_config(mine) == expected
    based = tmp_path / "based.yaml"
    based.write_text(f"_base_: {default_config_path()}\ntrain: {{lr: 0.002}}\n")
    assert load_config(based) == expected
    assert load_config(mine) != default_config()


def test_a_config_without_the_recipe_keys_trains_the_default_recipe(tmp_path):
    """What code once fell back to on its own (keep: best, scheduler: cosine, test_views: evaluator)
    disagreed with configs/train3d.yaml: a config that leaves them out trains the default recipe."""
    from monai.data import DataLoader
    from petmonai.models import build_model
    from petmonai.training import build_engines, test_view_scorer, training_roles

    mine = tmp_path / "mine.yaml"
    mine.write_text("model: {name: sfcn_3d, channels: [4, 8]}\ntrain: {max_epochs: 2}\n")
    cfg = load_config(mine)
    assert cfg["train"]["keep"] == "last" and training_roles(cfg) == ("train", "val")
    assert test_view_scorer(cfg, torch.device("cpu")) is not None  # cv.test_views: inference
    data = [{"image": torch.randn(1, 8, 8, 8), "label": i % 2} for i in range(8)]
    trainer, evaluator = build_engines(build_model(cfg["model"]), DataLoader(data, batch_size=4),
                                       DataLoader(data, batch_size=4), tmp_path, cfg["train"], torch.device("cpu"),
                                       progress_bar=False)
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.optimizer.defaults["weight_decay"] == 0.01
    assert isinstance(trainer.optimizer_scheduler, torch.optim.lr_scheduler.OneCycleLR)
    assert trainer.optimizer_scheduler.total_steps == 2 * 2  # per iteration: 2 epochs x 2 batches
    assert isinstance(trainer.loss_function, torch.nn.CrossEntropyLoss)
    assert not hasattr(evaluator, "_handlers_for_resume")  # keep: last, no early stopping


_CONFIG_NAMES = re.compile(r"(cfg|config|train)", re.I)


def _is_literal(node) -> bool:
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return True


def test_no_literal_config_defaults_in_the_code():
    """`cfg[...].get("key", literal)` on a config section would be a second default beside
    configs/train3d.yaml: the code indexes resolved values instead."""
    from petmonai.config import SCHEMA

    def leaves(schema):
        for key, value in schema.items():
            yield key
            if isinstance(value, dict):
                yield from leaves(value)

    keys = set(leaves(SCHEMA))
    found = []
    for path in sorted((REPO / "petmonai").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and len(node.args) == 2 and isinstance(node.args[0], ast.Constant) and node.args[0].value in keys
                    and _is_literal(node.args[1])
                    and _CONFIG_NAMES.search(ast.unparse(node.func.value))):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_a_saved_resolved_config_loads_back_unchanged(tmp_path):
    """A run folder's config.yaml is the resolved config: loading it (over the base) changes nothing."""
    for name in shipped_configs():
        cfg = load_config(name)
        saved = tmp_path / "config.yaml"
        saved.write_text(dump_yaml(cfg))
        assert load_config(saved) == cfg, name


# --- named stages ------------------------------------------------------------------------------


def _names(cfg, key):
    return [entry["_target_"].rsplit(".", 1)[-1] for entry in pipeline_entries(cfg, key)]


def test_stages_are_inserted_replaced_changed_and_removed_by_name(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(textwrap.dedent("""
        preprocess:
          smooth: null
          clip: {_target_: my.Clipd, _after_: intensity, keys: image}
          first: {_target_: my.Firstd, _before_: load}
          intensity: {region: pons}
        augment:
          noise: {_target_: RandGaussianNoised, keys: image}
          early: {_target_: my.Earlyd, _after_: crop}
          earlier: {_target_: my.Earlierd, _after_: crop}
    """))
    cfg = load_config(mine)
    assert _names(cfg, "preprocess") == [
        "Firstd", "LoadImaged", "EnsureChannelFirstd", "CheckVolumed", "Orientationd", "RegisterToTemplated",
        "ReferenceRegionNormalised", "Clipd", "MaskToTemplateBraind", "ResizeWithPadOrCropd", "EnsureTyped"]
    assert pipeline_entries(cfg, "preprocess")[6] == {**default_config()["preprocess"]["intensity"], "region": "pons"}
    assert "_after_" not in pipeline_entries(cfg, "preprocess")[7]  # petmonai's key, not the transform's
    # several after one stage keep their own order; a new stage without a place goes last
    assert _names(cfg, "augment") == ["FastRandSpatialCropd", "Earlyd", "Earlierd", "FastRandFlipd",
                                      "RandGaussianNoised"]


def test_stages_from_the_command_line():
    cfg = load_config(overrides=["preprocess.mask=null", "augment.flip.prob=0.3",
                                 "preprocess.clip={_target_: my.Clipd, _before_: pad, keys: image}"])
    assert "MaskToTemplateBraind" not in _names(cfg, "preprocess")
    assert _names(cfg, "preprocess")[-3:] == ["Clipd", "ResizeWithPadOrCropd", "EnsureTyped"]
    assert cfg["augment"]["flip"]["prob"] == 0.3
    with pytest.raises(ConfigError, match="augment has 2 stages"):
        load_config(overrides=["augment.2.prob=0.3"])
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(overrides=["train.lrr=1"])  # new keys only for stages and _target_ arguments


@pytest.mark.parametrize("text, message", [
    ("preprocess: {clip: {_target_: my.Clipd, _after_: intensty}}", r"preprocess.clip._after_.*no stage 'intensty'.*intensity"),
    ("preprocess: {intensty: {region: pons}}", r"preprocess.intensty.*no _target_.*did you mean intensity"),
    ("augment: {a: {_target_: A, _after_: b}, b: {_target_: B, _after_: a}}", r"augment.a._after_.*circle"),
    ("augment: {a: {_target_: A, _after_: crop, _before_: flip}}", r"augment.a.*not both"),
    ("augment: {flip: 3}", r"augment.flip.*null"),
    ("evaluate: 3", r"evaluate"),
])
def test_bad_stages_are_named(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(bad)


def test_a_plain_transform_list_of_an_earlier_version_still_builds(tmp_path, tiny_cohort):
    """Run folders written before named stages hold plain lists (and scheduler names): they build."""
    old = default_config()
    old["preprocess"] = pipeline_entries(old, "preprocess")
    old["augment"] = pipeline_entries(old, "augment")[::-1]
    old["train"]["scheduler"] = "onecycle"
    del old["evaluate"], old["inference"], old["train"]["optimizer"], old["train"]["loss"]
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(old, sort_keys=False))
    cfg = load_config(saved, ["spacing=[8.0, 8.0, 8.0]", "spatial_size=[24, 28, 24]", "augment.0.prob=1.0"])
    assert cfg["train"] == default_config()["train"] and cfg["evaluate"] == {}
    preprocess, augment = build_pipelines(cfg)
    assert [type(t).__name__ for t in augment.transforms] == ["FastRandFlipd", "FastRandSpatialCropd"]
    image = next((tiny_cohort / "Train" / "NC").iterdir())
    assert tuple(preprocess({"image": str(image)})["image"].shape) == (1, 24, 28, 24)


# --- optimiser, schedule and loss entries ------------------------------------------------------


def _engines(tmp_path, overrides, batches=2):
    from monai.data import DataLoader
    from petmonai.training import build_engines

    cfg = load_config(overrides=["train.max_epochs=3", *overrides])
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(),
                              torch.nn.Linear(2, 2))
    data = [{"image": torch.randn(1, 6, 6, 6), "label": i % 2} for i in range(2 * batches)]
    trainer, _ = build_engines(net, DataLoader(data, batch_size=2), None, tmp_path, cfg["train"],
                               torch.device("cpu"), progress_bar=False)
    return trainer, cfg


def test_schedule_names_expand_into_target_entries(tmp_path):
    assert default_config()["train"]["scheduler"] == SCHEDULERS["onecycle"]
    trainer, cfg = _engines(tmp_path, ["train.scheduler=cosine"])
    assert cfg["train"]["scheduler"]["_target_"].endswith("CosineAnnealingLR")
    assert trainer.optimizer_scheduler.T_max == 3  # per epoch
    resnet = load_config("experiments/resnet18.yaml")["train"]
    assert resnet["scheduler"] == SCHEDULERS["cosine"] and resnet["lr"] == 0.0003  # its recipe kept
    assert load_config("train2d_baseline")["train"]["scheduler"] == SCHEDULERS["cosine"]


def test_optimizer_schedule_and_loss_of_your_own(tmp_path):
    trainer, _ = _engines(tmp_path, [
        "train.optimizer={_target_: torch.optim.SGD, lr: '@train#lr', momentum: 0.9}",
        "train.scheduler={_target_: torch.optim.lr_scheduler.StepLR, step_size: 1, gamma: 0.5, _interval_: epoch}",
        "train.loss={_target_: torch.nn.CrossEntropyLoss, label_smoothing: 0.2}",
    ])
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.defaults["momentum"] == 0.9
    assert trainer.loss_function.label_smoothing == 0.2
    lrs = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: lrs.append(trainer.optimizer.param_groups[0]["lr"]))
    trainer.run()
    assert lrs == pytest.approx([5e-4, 2.5e-4, 1.25e-4])  # halved once per epoch, not per batch
    with pytest.raises(ConfigError, match="train.scheduler._interval_"):
        load_config(overrides=["train.scheduler={_target_: torch.optim.lr_scheduler.StepLR, step_size: 1}"])
    with pytest.raises(ConfigError, match="train.optimizer"):
        _engines(tmp_path, ["train.optimizer={_target_: torch.optim.SGD, lr: '@train#lr', momentun: 0.9}"])


# --- the "your own transform" example of docs/extending.md, exactly as written -----------------


def _doc_block(first_line: str) -> str:
    text = (REPO / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```\w*\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if b.startswith(first_line + "\n"))


@pytest.mark.slow
def test_the_documented_transform_example_builds_and_trains(tmp_path, monkeypatch, tiny_cohort, fast_config):
    from petmonai.commands import train3d_main

    (tmp_path / "my_scanner.py").write_text(_doc_block("# my_scanner.py"))
    config = tmp_path / "my_config.yaml"
    config.write_text(_doc_block("# my_config.yaml: the default recipe, plus one preprocessing stage"))
    assert len(config.read_text().splitlines()) <= 10
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(config, fast_config)
    preprocess, _ = build_pipelines(cfg)
    names = [type(t).__name__ for t in preprocess.transforms]
    at = names.index("ReferenceRegionNormalised") + 1
    assert names[at] == "ClipHotVoxelsd" and len(names) == len(build_pipelines(load_config())[0].transforms) + 1
    hot = preprocess.transforms[at]({"image": torch.tensor([[0.5, 2.0, 7.5]])})["image"]
    assert hot.tolist() == [[0.5, 2.0, 3.0]]
    image = next((tiny_cohort / "Train" / "MCI").iterdir())
    out = preprocess({"image": str(image)})["image"]  # a synthetic volume through the whole pipeline
    assert tuple(out.shape) == (1, 24, 28, 24) and float(out.max()) <= 3.0
    run = tmp_path / "run"
    args = ["--config", str(config), "--data-root", str(tiny_cohort), "--output-dir", str(run), "--device", "cpu",
            "--set", "train.max_epochs=1", "--set", "report.reference_model=false"]
    for override in fast_config:
        args += ["--set", override]
    assert train3d_main(args) == 0
    assert (run / "oof_predictions.csv").is_file()
    assert load_config(run / "config.yaml")["preprocess"]["clip"]["_target_"] == "my_scanner.ClipHotVoxelsd"
    sys.modules.pop("my_scanner", None)


def test_every_yaml_example_of_docs_extending_loads_and_builds(tmp_path, monkeypatch):
    from petmonai.models import build_model

    (tmp_path / "my_scanner.py").write_text(_doc_block("# my_scanner.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    text = (REPO / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 4
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(block)
        cfg = load_config(path)
        assert cfg != default_config()
        build_pipelines(cfg)
        if "_target_" in cfg["model"]:
            assert build_model(cfg["model"], cfg).eval()(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 2)
    sys.modules.pop("my_scanner", None)
