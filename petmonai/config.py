"""Configuration: YAML files in MONAI bundle style, overrides, validation, component building.

Anything a user may swap (transforms, the network, optimiser, schedule, loss) is a ``_target_``
entry that :class:`monai.bundle.ConfigParser` instantiates, so code from the user's own module
plugs in from YAML without touching petmonai::

    >>> cfg = load_config("configs/train3d.yaml", overrides=["train.lr=1e-3"])
    >>> preprocess = build_component(cfg, "preprocess")   # list of MONAI transforms, in stage order

**One source of defaults.** The shipped ``configs/train3d.yaml`` is the base of every config:
:func:`load_config` merges the user's file over it, so a file names only what it changes and the
code reads resolved values only (``cfg["train"]["keep"]``), never a default of its own. A file
may also start from another with ``_base_: other.yaml`` (path relative to the file). Entries are
merged into the base, dictionaries key by key, a ``_target_`` entry and everything else replaced.

**Named stages.** ``preprocess``, ``augment`` and ``evaluate`` are mappings of named stages, built
in order (:func:`pipeline_entries`). A config replaces one stage by naming it, changes one of its
arguments by naming only that (``augment: {flip: {prob: 0.3}}``), removes it with ``null`` and
adds one of its own at the end or at a named step (``_after_: intensity`` or ``_before_: pad``
inside the new stage). A plain list (run folders of earlier versions) is built as it is.
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
BASE_CONFIG = "train3d.yaml"  # the defaults: every config is merged over it (load_config)
PIPELINES = ("preprocess", "augment", "evaluate")  # named transform stages (pipeline_entries)
PLACEMENT = ("_after_", "_before_")  # where a stage goes; petmonai's own keys, never passed to the transform

# Known entries and their types. Sections in FREE_FORM are MONAI bundle content
# (transform lists, networks) checked when ConfigParser builds them.
_NUM = (int, float)
_OPT_STR = (str, type(None))


class Choice:
    """A string entry with a fixed set of values: a wrong value fails when the config loads."""

    def __init__(self, *values: str):
        self.values = values


class Entry:
    """A MONAI bundle ``_target_`` entry (a mapping with ``_target_``), built by the code that uses it."""


SCHEMA: dict[str, Any] = {
    "seed": int,
    "data": {
        "root": _OPT_STR,
        "skip_bad": bool,
        "cache_workers": int,
        "preprocess_workers": (int, str),  # auto | N: processes preprocessing the scans (petmonai.data.volume_store)
        "cache": Choice("memory", "disk"),  # where the preprocessed volumes are kept (petmonai.data.datasets)
        "cache_dir": _OPT_STR,              # the on-disk volume cache; default: $PETMONAI_CACHE/volumes
        "classes": list,          # the two groups, negative first (petmonai.data.classes)
        "label_column": str,      # BIDS: participants.tsv / sessions.tsv column of the class (petmonai.data.bids)
        "tracer": _OPT_STR,       # BIDS: keep the PET files of this trc- entity; null = all
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
        "optimizer": Entry(),           # built with the network's parameters (petmonai.training.engine)
        "scheduler": Entry(),           # built with the optimiser; a name of SCHEDULERS is expanded on load
        "loss": Entry(),
        "train_on_val": bool,           # with keep=last, a fold's validation scans join its training scans
        "label_smoothing": _NUM,        # cross-entropy label smoothing (the default train.loss refers to it)
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
    "tracking": {                 # experiment tracking (petmonai.training.tracking)
        "mlflow": bool,           # log config, losses, metrics and the report to MLflow (extra: petmonai[mlflow])
        "experiment": str,        # the MLflow experiment the run is logged in
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
    "preprocess": (dict, list),   # named stages (or a plain list), checked by pipeline_entries
    "augment": (dict, list),
    "evaluate": (dict, list),     # deterministic transforms before evaluation (2D slices); empty: none
    "model": dict,
    "imports": list,
    "inference": dict,
    "allow_modules": list,        # modules of the user's own that the config names (petmonai.trust)
}
FREE_FORM = {"preprocess", "augment", "evaluate", "model", "imports", "inference"}

# Learning-rate schedules by name (``train.scheduler: cosine``, as configs of earlier versions say):
# each name is expanded into its ``_target_`` entry when the config loads. ``_interval_`` (petmonai's
# key, required in a schedule entry): ``epoch`` steps it once per epoch, ``iteration`` once per batch.
# Besides the ``train`` entries, a schedule may refer to ``@steps_per_epoch`` (the fold's batches per epoch).
SCHEDULERS: dict[str, dict] = {
    "onecycle": {  # per batch: warm up to lr over the first 30 % of the steps, then anneal
        "_target_": "torch.optim.lr_scheduler.OneCycleLR", "_interval_": "iteration",
        "max_lr": "@train#lr", "total_steps": "$@train#max_epochs * @steps_per_epoch",
    },
    "cosine": {  # per epoch, from lr down to 0
        "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_interval_": "epoch", "T_max": "@train#max_epochs",
    },
}
INTERVALS = ("epoch", "iteration")


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def default_config_path(name: str = BASE_CONFIG) -> Path:
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
    expand_shorthands(data)
    base = data.pop("_base_", None)
    if base:
        data = deep_merge(read_yaml(path.parent / base), data)
    return data


def expand_shorthands(cfg: dict) -> None:
    """``train.scheduler: cosine`` (a name of :data:`SCHEDULERS`) becomes its ``_target_`` entry, in place."""
    train = cfg.get("train")
    value = train.get("scheduler") if isinstance(train, dict) else None
    if isinstance(value, str):
        if value not in SCHEDULERS:
            raise ConfigError(f"config key 'train.scheduler': {value!r} is neither a known schedule"
                              f"{_suggest(value, SCHEDULERS)} nor a `_target_` entry")
        train["scheduler"] = copy.deepcopy(SCHEDULERS[value])


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

    List items are addressed by index, named stages by name or by their position in the built
    pipeline (``augment.flip.prob=0.3`` and ``augment.1.prob=0.3`` alike). A key that does not exist
    is an error, except inside a ``_target_`` entry, where it becomes a new keyword argument, and a
    new stage of a pipeline (``preprocess.clip={_target_: my.Clipd, keys: image, _after_: intensity}``).
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
        stages = depth == 1 and parts[0] in PIPELINES  # named stages: also by position, and new ones allowed
        if stages and part not in node and part.isdigit():
            part = _stage_at(node, parts[0], int(part), key_path)
        if part not in node and not (last and ("_target_" in node or stages)):
            raise ConfigError(f"unknown config key '{where}'{_suggest(part, node)}")
        if last:
            node[part] = value
        node = node.get(part)


def _stage_at(stages: dict, key: str, index: int, key_path: str) -> str:
    names = [name for name in stage_order(stages, key) if stages[name] is not None]
    if index >= len(names):
        raise ConfigError(f"override '{key_path}': {key} has {len(names)} stages ({', '.join(names)})")
    return names[index]


def stage_order(stages: dict, key: str) -> list[str]:
    """The stage names of pipeline ``key`` in build order: the mapping's own order (the base config's
    stages first, in its order, then new ones), except that a stage with ``_after_: name`` or
    ``_before_: name`` goes next to that stage (several after one stage keep their own order).
    ``null`` stages keep their place (others may name them) and are left out when building."""
    placed = {name: _placement(stage, key, name, stages) for name, stage in stages.items()}
    order = [name for name, where in placed.items() if where is None]
    pending = [name for name, where in placed.items() if where is not None]
    last_after: dict[str, str] = {}
    while pending:
        ready = [name for name in pending if placed[name][1] in order]
        if not ready:
            name = pending[0]
            how, anchor = placed[name]
            problem = ("its _after_/_before_ references go round in a circle" if anchor in stages
                       else f"no stage '{anchor}' in {key}{_suggest(anchor, list(stages))}")
            raise ConfigError(f"config key '{key}.{name}.{how}': {problem}")
        for name in ready:
            how, anchor = placed[name]
            if how == "_after_":
                at = order.index(last_after.get(anchor, anchor)) + 1
                last_after[anchor] = name
            else:
                at = order.index(anchor)
            order.insert(at, name)
            pending.remove(name)
    return order


def _placement(stage, key: str, name: str, stages: dict) -> tuple[str, str] | None:
    """``(_after_ | _before_, stage name)`` of a stage that says where it goes, else None; checks the stage."""
    where = f"{key}.{name}"
    if stage is None:
        return None
    if not isinstance(stage, dict):
        raise ConfigError(f"config key '{where}': a transform entry (a mapping with _target_) or null, got {stage!r}")
    if "_target_" not in stage:
        raise ConfigError(f"config key '{where}': no _target_; a new stage names its transform, an existing one "
                          f"is changed by its own name{_suggest(name, [s for s in stages if s != name])}")
    how = [k for k in PLACEMENT if k in stage]
    if len(how) > 1:
        raise ConfigError(f"config key '{where}': _after_ or _before_, not both")
    if not how:
        return None
    if not isinstance(stage[how[0]], str):
        raise ConfigError(f"config key '{where}.{how[0]}': a stage name, got {stage[how[0]]!r}")
    return how[0], stage[how[0]]


def pipeline_entries(cfg: dict, key: str) -> list:
    """The transform entries of pipeline ``key`` (``preprocess``, ``augment``, ``evaluate``) in build
    order: named stages ordered by :func:`stage_order`, ``null`` stages left out, ``_after_`` and
    ``_before_`` removed; a plain list (run folders of earlier versions) as it is.

    >>> pipeline_entries({"augment": {"crop": {"_target_": "A"}, "flip": None,
    ...                               "noise": {"_target_": "B", "_before_": "crop"}}}, "augment")
    [{'_target_': 'B'}, {'_target_': 'A'}]
    """
    section = cfg[key]
    if isinstance(section, list):
        return section
    if not isinstance(section, dict):
        raise ConfigError(f"config key '{key}': a mapping of named stages (or a list of transforms), got {section!r}")
    return [{k: v for k, v in section[name].items() if k not in PLACEMENT}
            for name in stage_order(section, key) if section[name] is not None]


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
            if not _is_instance(value, expected):
                raise ConfigError(f"config key '{where}' has the wrong type: {value!r} ({_type_names(expected)} expected)")
        elif isinstance(expected, Entry):
            if not (isinstance(value, dict) and "_target_" in value):
                raise ConfigError(f"config key '{where}' must be a `_target_` entry (a mapping with _target_), got {value!r}")
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
    """Read ``path`` over the base config (``configs/train3d.yaml``), apply ``overrides``, validate and
    check; returns a plain dict, the *resolved* config: every key of the base is there.

    A run folder's saved ``config.yaml`` is complete; merging it over the base only adds keys
    that petmonai has gained since (with their defaults). The check
    (:func:`petmonai.trust.check_config`) refuses what the config would run beyond the allowed
    modules and ``$`` forms before anything is built. ``own``: the user's own file, whose
    ``allow_modules:`` list counts as the user's word; ``own=False``: a config from elsewhere (a run
    folder's), whose list the user must confirm (``--allow-module``).
    """
    from petmonai.trust import check_config

    path = path or default_config_path()
    cfg = upgrade_legacy_names(deep_merge(read_yaml(default_config_path()), read_yaml(path)))
    for assignment in overrides or []:
        apply_override(cfg, assignment)
    expand_shorthands(cfg)
    validate(cfg)
    check_entries(cfg)
    check_config(cfg, path, own=own)
    return cfg


def default_config() -> dict:
    """The resolved base config (a fresh copy): what a config naming nothing trains."""
    return load_config(default_config_path())


def check_entries(cfg: dict) -> None:
    """What :func:`validate` cannot see in the free-form entries: every pipeline's stages, and when
    the learning-rate schedule steps (``train.scheduler._interval_``)."""
    for key in PIPELINES:
        pipeline_entries(cfg, key)
    interval = cfg["train"]["scheduler"].get("_interval_")
    if interval not in INTERVALS:
        raise ConfigError(f"config key 'train.scheduler._interval_': say when the schedule steps: epoch (once per "
                          f"epoch) or iteration (once per training batch), got {interval!r}")


def build_component(cfg: dict, key: str, runtime: dict | None = None):
    """Instantiate ``cfg[key]`` (``_target_`` entries, ``@`` references, ``$`` expressions).

    A pipeline (``preprocess``, ``augment``, ``evaluate``) is built as the list of its stages'
    transforms, in order (:func:`pipeline_entries`). ``runtime``: values known only while training
    that entries may refer to (``{"steps_per_epoch": 12}``: ``@steps_per_epoch``).
    """
    from monai.bundle import ConfigParser

    content = copy.deepcopy(cfg)
    for name in PIPELINES:
        if name in content:
            content[name] = pipeline_entries(content, name)
    parser = ConfigParser({**content, **(runtime or {})})
    try:
        return parser.get_parsed_content(key, instantiate=True)
    except Exception as err:
        # MONAI reports the failing component in the message chain; keep it, drop the traceback
        chain, cause = [str(err)], err.__cause__
        while cause is not None:
            chain.append(f"{type(cause).__name__}: {cause}")
            cause = cause.__cause__
        raise ConfigError(f"cannot build config entry '{key}': " + " <- ".join(chain)) from None


def resolved_entries(cfg: dict, key: str) -> list:
    """The entries of pipeline ``key`` with every ``@`` reference and ``$`` expression resolved but nothing
    instantiated: what the stages will be built with (the on-disk volume cache keys on it).

    >>> cfg = {"spacing": [6.0], "preprocess": {"pad": {"_target_": "Pad", "voxel": "$@spacing[0]"}}}
    >>> resolved_entries(cfg, "preprocess")
    [{'_target_': 'Pad', 'voxel': 6.0}]
    """
    from monai.bundle import ConfigParser

    content = copy.deepcopy(cfg)
    for name in PIPELINES:
        if name in content:
            content[name] = pipeline_entries(content, name)
    parsed = ConfigParser(content).get_parsed_content(key, instantiate=False)
    return [entry.get_config() if hasattr(entry, "get_config") else entry for entry in parsed]


def dump_yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
