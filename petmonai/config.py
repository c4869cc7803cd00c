"""Configuration: YAML files in MONAI bundle style, overrides, validation, component building.

Anything a user may swap (transforms, the network) is a ``_target_`` entry that
:class:`monai.bundle.ConfigParser` instantiates, so a transform from the user's own module
plugs in from YAML without touching petmonai::

    >>> cfg = load_config("configs/train3d.yaml", overrides=["train.lr=1e-3"])
    >>> preprocess = build_component(cfg, "preprocess")   # list of MONAI transforms

A file may start from another with ``_base_: other.yaml`` (path relative to the file); its
entries are merged into the base, dictionaries key by key, everything else replaced.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from petmonai.errors import ConfigError

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # inside the package: found from any folder

# Known entries and their types. Sections in FREE_FORM are MONAI bundle content
# (transform lists, networks) checked when ConfigParser builds them.
_NUM = (int, float)
_OPT_STR = (str, type(None))


class Choice:
    """A string entry with a fixed set of values: a wrong value fails when the config loads."""

    def __init__(self, *values: str):
        self.values = values


SCHEMA: dict[str, Any] = {
    "seed": int,
    "data": {
        "root": _OPT_STR,
        "skip_bad": bool,
        "cache_workers": int,
        "synthetic": {"n_nc": int, "n_mci": int, "n_test": int, "seed": int, "confounded": bool},
    },
    "cv": {
        "protocol": str,
        "folds": int,
        "repeats": int,
        "folds_file": _OPT_STR,
        "allow_leaky": bool,
        "test_views": Choice("evaluator", "inference"),  # how held-out scans are scored (petmonai.training.crossval)
    },
    "spacing": list,
    "template": {                 # spatial normalisation (petmonai.transforms.spatial.registration.RegisterToTemplated)
        "transform": str,
        "min_correlation": _NUM,
        "cache_dir": _OPT_STR,
        "image": _OPT_STR,        # an FDG template of your own in MNI space (petmonai.transforms.spatial.study_template)
    },
    "spatial_size": list,
    "crop_size": list,
    "num_slices": int,            # 2D slice models: axial slices stacked as input channels
    "train": {
        "max_epochs": int,
        "batch_size": int,
        "lr": _NUM,
        "weight_decay": _NUM,
        "val_fraction": _NUM,
        "early_stop_patience": int,
        "keep": Choice("best", "last"),  # which epoch's weights a fold keeps (petmonai.training.engine)
        "scheduler": Choice("cosine", "onecycle"),  # petmonai.training.engine.build_engines
        "train_on_val": bool,           # with keep=last, a fold's validation scans join its training scans
        "label_smoothing": _NUM,        # cross-entropy label smoothing (petmonai.training.engine.training_loss)
        "mixup_alpha": _NUM,            # mixup of training batches, Beta(alpha, alpha); 0 = off (MixUpBatch)
        "amp": bool,
        "num_workers": int,
        "prefetch_thread": (bool, str),  # auto | true | false: num_workers 0, augment in a background thread
        "device": str,
        "threshold": (_NUM, str),
        "progress_bar": bool,
        "channels_last": (bool, str),   # auto | true | false (petmonai.training.engine.channels_last)
        "cudnn_benchmark": bool,
        "cpu_allocator": str,           # tuned | default (petmonai.training.engine.tune_cpu_allocator)
        "compile": bool,
        "compile_kwargs": dict,
        "augment_on_device": bool,
        "sync_bn": bool,
        "keep_resume_checkpoint": bool,
    },
    "report": {                   # evaluation report (petmonai.evaluation.report) and its reference model
        "write": bool,
        "reference_model": bool,
        "bootstrap": int,
    },
    "reference": {                # PCA + logistic regression reference (petmonai.evaluation.reference)
        "preprocessing": str,
        "spacing": list,
        "grid": list,
        "standardize": bool,
        "n_components": (int, float),
        "C": _NUM,
        "features": str,
        "regions": int,
    },
    "preprocess": list,
    "augment": list,
    "evaluate": list,             # optional: deterministic transforms before evaluation (2D slices)
    "model": dict,
    "imports": list,
    "inference": dict,
    "allow_modules": list,        # modules of the user's own that the config names (petmonai.trust)
}
FREE_FORM = {"preprocess", "augment", "evaluate", "model", "imports", "inference"}


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def default_config_path(name: str = "train3d.yaml") -> Path:
    return SHIPPED_CONFIGS / name


def shipped_configs() -> list[str]:
    """Names of the configs that ship with petmonai (``train3d.yaml``, ``experiments/mask.yaml``, ...)."""
    return sorted(p.relative_to(SHIPPED_CONFIGS).as_posix() for p in SHIPPED_CONFIGS.rglob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A config file by path, or a shipped config by name.

    ``my.yaml`` is read where it is; a name that is no file is looked up among the shipped
    configs, with or without ``.yaml`` and a leading ``configs/`` (``train2d_baseline``,
    ``experiments/resnet18.yaml``, ``configs/train3d.yaml``).
    """
    path = Path(path)
    if path.is_file():
        return path
    name = path.as_posix()
    name = name[len("configs/"):] if name.startswith("configs/") else name
    for candidate in (name, f"{name}.yaml"):
        if (SHIPPED_CONFIGS / candidate).is_file():
            return SHIPPED_CONFIGS / candidate
    raise ConfigError(f"{path}: config file not found (shipped configs: {', '.join(shipped_configs())})")


def read_yaml(path: str | Path) -> dict:
    """Safe YAML read (no Python object tags) with ``_base_`` inheritance."""
    path = resolve_config_path(path)
    try:
        data = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values")
    base = data.pop("_base_", None)
    if base:
        data = deep_merge(read_yaml(path.parent / base), data)
    return data


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and "_target_" not in value:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(cfg: dict, assignment: str) -> None:
    """Apply ``key.path=value`` in place; the value is parsed as YAML (``1e-3``, ``[1,2]``, ``null``).

    List items are addressed by index (``augment.0.prob=0.3``). A key that does not exist is an
    error, except inside a ``_target_`` entry, where it becomes a new keyword argument.
    """
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}': expected key.path=value")
    key_path, raw = assignment.split("=", 1)
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{assignment}': value is not valid YAML ({err})") from None
    parts = key_path.strip().replace("#", ".").split(".")
    node: Any = cfg
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise ConfigError(f"override '{key_path}': '{where}' is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key_path}': '{'.'.join(parts[:depth])}' is not a section")
        if part not in node and not (last and "_target_" in node):
            raise ConfigError(f"unknown config key '{where}'{_suggest(part, node)}")
        if last:
            node[part] = value
        node = node.get(part)


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, [str(o) for o in options], n=3)
    return f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(map(str, options))})"


def validate(cfg: dict, schema: dict = SCHEMA, prefix: str = "") -> None:
    """Unknown keys and wrong types fail with a message that names the key."""
    for key, value in cfg.items():
        where = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"unknown config key '{where}'{_suggest(key, schema)}")
        expected = schema[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}' must be a section (mapping), got {value!r}")
            validate(value, expected, f"{where}.")
        elif prefix == "" and key in FREE_FORM:
            continue
        elif isinstance(expected, Choice):
            if value not in expected.values:
                raise ConfigError(f"config key '{where}': {value!r} is not a known value"
                                  f"{_suggest(str(value), expected.values)}")
        elif not _is_instance(value, expected):
            raise ConfigError(f"config key '{where}' has the wrong type: {value!r} ({_type_names(expected)} expected)")


def _is_instance(value, expected) -> bool:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    flat = []
    for k in kinds:
        flat += list(k) if isinstance(k, tuple) else [k]
    if isinstance(value, bool) and bool not in flat:
        return False
    return isinstance(value, tuple(flat))


def _type_names(expected) -> str:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    names = []
    for k in kinds:
        names += [t.__name__ for t in (k if isinstance(k, tuple) else (k,))]
    return " or ".join(n.replace("NoneType", "null") for n in names)


# Modules of petmonai before its subpackages (0.1): configs saved in run folders of that time name
# their transforms by these paths. Each maps to the subpackage that exports the same names now.
LEGACY_MODULES = {
    "petmonai.harmonise": "petmonai.transforms", "petmonai.spatial": "petmonai.transforms",
    "petmonai.study_template": "petmonai.transforms",
    "petmonai.splits": "petmonai.data", "petmonai.datasets": "petmonai.data", "petmonai.synthetic": "petmonai.data",
    "petmonai.metrics": "petmonai.evaluation", "petmonai.reference": "petmonai.evaluation",
    "petmonai.report": "petmonai.evaluation",
    "petmonai.views": "petmonai.inference", "petmonai.saliency": "petmonai.inference",
    "petmonai.engine": "petmonai.training", "petmonai.crossval": "petmonai.training",
    "petmonai.distributed": "petmonai.training",
    "petmonai.compare": "petmonai.studies", "petmonai.experiments": "petmonai.studies",
    "petmonai.calibration": "petmonai.studies", "petmonai.bench": "petmonai.studies",
    "petmonai.workflows": "petmonai.commands", "petmonai.cli": "petmonai.commands", "petmonai.export": "petmonai.commands",
}
_LEGACY = re.compile(r"\b(" + "|".join(re.escape(m) for m in LEGACY_MODULES) + r")\.(?=[A-Za-z_])")


def upgrade_legacy_names(node):
    """``_target_`` paths and ``$`` expressions of a config written before the subpackages, renamed
    (``petmonai.spatial.RegisterToTemplated`` -> ``petmonai.transforms.RegisterToTemplated``)."""
    if isinstance(node, dict):
        return {k: upgrade_legacy_names(v) for k, v in node.items()}
    if isinstance(node, list):
        return [upgrade_legacy_names(v) for v in node]
    if isinstance(node, str) and "petmonai." in node:
        return _LEGACY.sub(lambda m: LEGACY_MODULES[m.group(1)] + ".", node)
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, own: bool = True) -> dict:
    """Read, override, validate and check a config; returns a plain dict (the *resolved* config).

    The check (:func:`petmonai.trust.check_config`) refuses what the config would run beyond the
    allowed modules and ``$`` forms before anything is built. ``own``: the user's own file, whose
    ``allow_modules:`` list counts as the user's word; ``own=False``: a config from elsewhere (a run
    folder's), whose list the user must confirm (``--allow-module``)."""
    from petmonai.trust import check_config

    path = path or default_config_path()
    cfg = upgrade_legacy_names(read_yaml(path))
    for assignment in overrides or []:
        apply_override(cfg, assignment)
    validate(cfg)
    check_config(cfg, path, own=own)
    return cfg


def build_component(cfg: dict, key: str):
    """Instantiate ``cfg[key]`` (``_target_`` entries, ``@`` references, ``$`` expressions)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(copy.deepcopy(cfg))
    try:
        return parser.get_parsed_content(key, instantiate=True)
    except Exception as err:
        # MONAI reports the failing component in the message chain; keep it, drop the traceback
        chain, cause = [str(err)], err.__cause__
        while cause is not None:
            chain.append(f"{type(cause).__name__}: {cause}")
            cause = cause.__cause__
        raise ConfigError(f"cannot build config entry '{key}': " + " <- ".join(chain)) from None


def dump_yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
