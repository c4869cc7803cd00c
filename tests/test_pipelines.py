"""Named pipeline stages build exactly the transforms the copied lists built.

``tests/data/pipelines_45d4667.json`` holds, for every shipped config and each of its pipelines
(``preprocess``, ``augment``, ``evaluate``), the sequence of transform classes with all their
constructor arguments (references and expressions resolved; those equal to the class's default
left out, so an argument spelled out with its default value and one left out compare equal) as petmonai
built them at commit 45d4667, when every config carried its own copy of the transform lists.
It was written by ``python tests/test_pipelines.py --write`` run against that commit.
"""

from __future__ import annotations

import enum
import inspect
import json
import sys
from pathlib import Path


FIXTURE = Path(__file__).parent / "data" / "pipelines_45d4667.json"
PIPELINES = ("preprocess", "augment", "evaluate")


def _plain(value):
    """A JSON form of a resolved argument: numbers, strings, lists, dicts; types and functions by name."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value):
        return f"{value.__module__}.{value.__qualname__}"
    return str(value)  # dtypes (torch.float32), numpy scalars


def _records(node):
    """Each ``_target_`` entry (nested ones too) as an entry that builds the dict of its arguments."""
    if isinstance(node, dict):
        inner = {k: _records(v) for k, v in node.items() if k != "_target_"}
        return {"_target_": "builtins.dict", "_class_": node["_target_"], **inner} if "_target_" in node else inner
    if isinstance(node, list):
        return [_records(v) for v in node]
    return node


def _with_defaults(record: dict) -> dict:
    from monai.bundle import ConfigComponent
    from monai.utils.module import locate

    cls = locate(ConfigComponent({"_target_": record.pop("_class_")}).resolve_module_name())
    args = {k: (_with_defaults(v) if isinstance(v, dict) and "_class_" in v else v) for k, v in record.items()}
    params = inspect.signature(cls).parameters
    inspect.signature(cls).bind_partial(**args)  # every argument is one the class takes
    # an argument given with its default value is the same transform as one left out
    args = {k: v for k, v in _plain(args).items() if _plain(params[k].default) != v}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "args": args}


def describe(cfg: dict, entries_of) -> dict:
    """``{pipeline: [{class, args}, ...]}`` of a resolved config; ``entries_of(cfg, key)``: its entry list."""
    from monai.bundle import ConfigParser

    out = {}
    for key in PIPELINES:
        entries = entries_of(cfg, key)
        content = {k: v for k, v in cfg.items() if k not in PIPELINES}
        parser = ConfigParser({**content, key: _records(entries)})
        out[key] = [_with_defaults(r) for r in parser.get_parsed_content(key, instantiate=True)] if entries else []
    return out


def describe_shipped(entries_of) -> dict:
    from petmonai.config import load_config, shipped_configs

    return {name: describe(load_config(name), entries_of) for name in shipped_configs()}


# configs shipped after the fixture was written (issue 24's comparison), each with the config whose
# preprocessing and augmentation it shares
ADDED_SINCE = {"train2d_registered.yaml": "train3d.yaml", "train3d_resnet18.yaml": "train3d.yaml"}


def test_every_shipped_config_builds_the_transforms_it_built_before_named_stages():
    from petmonai.config import pipeline_entries, shipped_configs

    expected = json.loads(FIXTURE.read_text())
    assert sorted([*expected, *ADDED_SINCE]) == shipped_configs()  # that commit's 18 configs and the added ones
    actual = describe_shipped(pipeline_entries)
    for name in expected:
        for key in PIPELINES:
            assert actual[name][key] == expected[name][key], f"{name}: {key}"
    for name, base in ADDED_SINCE.items():  # they change the model only: their base's transforms
        for key in PIPELINES:
            assert actual[name][key] == expected[base][key], f"{name}: {key}"


def test_the_fixture_tells_the_pipelines_apart():
    """The comparison above can fail: the configs differ in classes, order and arguments."""
    expected = json.loads(FIXTURE.read_text())
    default = expected["train3d.yaml"]
    assert expected["experiments/register_suvr.yaml"]["preprocess"] != default["preprocess"]  # one argument
    assert [t["class"] for t in expected["train2d.yaml"]["augment"]][:2] == [
        "petmonai.transforms.slices.RandAxialSlicesd", "monai.transforms.croppad.dictionary.RandSpatialCropd"]
    assert len(expected["train2d.yaml"]["evaluate"]) == 2 and default["evaluate"] == []


if __name__ == "__main__":  # regenerate from the checkout on sys.path (done once, at commit 45d4667)
    if "--write" not in sys.argv:
        sys.exit("usage: python tests/test_pipelines.py --write")
    try:
        from petmonai.config import pipeline_entries as entries_of
    except ImportError:  # before named stages: every pipeline a list, evaluate optional
        def entries_of(cfg, key):
            return cfg.get(key) or []
    FIXTURE.parent.mkdir(exist_ok=True)
    table = describe_shipped(entries_of)
    lines = [f" {json.dumps(name)}: {{" + ",".join(  # one transform a line
        f"\n  {json.dumps(key)}: [" + ",".join(f"\n   {json.dumps(t, sort_keys=True)}" for t in table[name][key]) + "]"
        for key in PIPELINES) + "}" for name in sorted(table)]
    FIXTURE.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {FIXTURE}")
