"""A trained run as a MONAI bundle (the Model Zoo's layout), which MONAI's own tools run.

    >>> from petmonai.inference.bundle_export import export_bundle
    >>> export_bundle("runs/real", "bundles/fdg_nc_mci")        # doctest: +SKIP
    python -m monai.bundle run --config_file bundles/fdg_nc_mci/configs/inference.json \\
        --bundle_root bundles/fdg_nc_mci --dataset_dir ../shared/data/pet2023/Test --output_dir out

The bundle::

    configs/inference.json        the run's preprocessing, the fold ensemble with its test-time views
                                  as network_def (petmonai.inference.bundle.ViewEnsemble), softmax,
                                  and the probabilities.csv writer
    configs/metadata.json         versions, required packages, network_data_format, intended use
    configs/metadata_schema.json  the metadata schema, so that verify_metadata runs offline
    models/model.pt               the ensemble's weights (a state dict)
    resources/template.nii[.gz]   the run's own registration template, if it had one
    docs/README.md                the model card: data, audit warnings, CV figures, limits, usage
    LICENSE

It is written in a temporary folder beside ``output`` and renamed into place once complete: a
failed export leaves nothing. Before that, the ensemble the bundle builds (through MONAI's
ConfigParser, from the written config) is checked against ``predict``'s on a volume.
"""

from __future__ import annotations

import copy
import importlib.metadata
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from petmonai import __version__
from petmonai.config import pipeline_entries
from petmonai.errors import PetmonaiError
from petmonai.inference.bundle import ViewEnsemble
from petmonai.inference.bundle_card import (
    bundle_license,
    model_card,
    read_json_or_empty,
)
from petmonai.inference.predictor import (
    POSITIVE_INDEX,
    LoadedRun,
    load_models,
    load_run,
    predict_views,
    preprocess_path,
)
from petmonai.inference.views import SlidingWindowFlips3D
from petmonai.runs import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    get_logger,
    staged_folder,
)

log = get_logger("bundle")


SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
              "meta_schema_20240725.json")


"""The Model Zoo's metadata schema; ``metadata.json`` names it, as MONAI's ``verify_metadata`` expects."""


SCHEMA_FILE = Path(__file__).resolve().parent / "schema" / "bundle_metadata_schema.json"


"""petmonai's copy of the schema's requirements, shipped in every bundle as ``configs/metadata_schema.json``."""


BUNDLE_VERSION = "0.1.0"


CHECK_TOLERANCE = 1e-4


"""The bundle's ensemble must give ``predict``'s probabilities to this (on CPU)."""


BUNDLE_KEYS = ("imports", "bundle_root", "dataset_dir", "output_dir", "skip_bad", "device", "ckpt_path",
               "preprocessing", "dataset", "dataloader", "fold_network", "network_def", "network",
               "inferer", "postprocessing", "handlers", "evaluator", "run")


# what a bundle needs beyond MONAI: petmonai, its preprocessing's libraries, MONAI's engines and command line
REQUIRED_PACKAGES = ("petmonai", "pytorch-ignite", "nibabel", "SimpleITK", "nilearn", "scipy", "pandas", "fire")


def export_bundle(run_dir, output, *, overwrite: bool = False, options: dict | None = None,
                  version: str = BUNDLE_VERSION, authors: str | None = None, copyright: str | None = None,
                  license_text: str | None = None) -> Path:
    """Write the MONAI bundle of a finished run to the folder ``output``; returns it.

    ``options``: inference options as ``predict`` takes them (``flips``, ``windows``, ``overlap``,
    ``folds``...; default: the run config's). An existing ``output`` is an error unless ``overwrite``."""
    run_dir, output = Path(run_dir), Path(output)
    if output.exists() and not overwrite:
        raise PetmonaiError(f"{output}: exists; pass --overwrite to replace it or choose another --output")
    if output.exists() and not output.is_dir():
        raise PetmonaiError(f"{output}: is a file, not a bundle folder")
    if run_dir.resolve() == output.resolve() or output.resolve() in run_dir.resolve().parents:
        raise PetmonaiError(f"--output {output}: would replace the run folder {run_dir}; choose another folder")
    run = load_run(run_dir, {**(options or {}), "device": "cpu", "amp": False}, with_models=False)
    if not isinstance(run.strategy, SlidingWindowFlips3D) or run.cfg.get("evaluate"):
        raise PetmonaiError(f"{run_dir}: predicts with '{run.strategy.name}' views (a 2D slice model); a bundle "
                            "holds a 3D model's sliding-window ensemble")
    load_models(run)
    with staged_folder(output) as tmp:  # a failed export leaves no half-written bundle
        write_bundle(tmp, run, version=version, authors=authors, copyright=copyright, license_text=license_text)
    log.info("wrote bundle %s (%d fold models x %d views)", output, len(run.models),
             run.strategy.describe()["n_views"])
    return output


def write_bundle(root: Path, run: LoadedRun, *, version: str, authors, copyright, license_text) -> None:
    template = copy_template(root, run.cfg)
    config = inference_config(run, template)
    ensemble = bundle_network(root, config, run)
    volume, source = check_volume(run)
    diff = ensemble_difference(ensemble, run, volume)
    if diff > CHECK_TOLERANCE:
        raise PetmonaiError(f"the bundle's ensemble differs from predict's by {diff:.2g} on {source} "
                            f"(tolerance {CHECK_TOLERANCE:g}); nothing written")
    log.info("bundle ensemble checked against predict on %s: max |dP| = %.2g", source, diff)
    buffer = io.BytesIO()
    torch.save(ensemble.state_dict(), buffer)
    atomic_write_bytes(root / "models" / "model.pt", buffer.getvalue())
    atomic_write_text(root / "configs" / "inference.json", json.dumps(config, indent=2) + "\n")
    metadata = bundle_metadata(run, version, authors, copyright, value_range(volume))
    atomic_write_json(root / "configs" / "metadata.json", metadata)
    atomic_write_bytes(root / "configs" / "metadata_schema.json", SCHEMA_FILE.read_bytes())
    atomic_write_text(root / "docs" / "README.md", model_card(run, metadata, {"max_abs_difference": diff,
                                                                                "volume": source}))
    atomic_write_text(root / "LICENSE", license_text or bundle_license(run, metadata))


def copy_template(root: Path, cfg: dict) -> str | None:
    """The run's own registration template (``template.image``), copied to ``resources/``; its path
    in the bundle, or None when the run registers to the built-in MNI template."""
    image = (cfg.get("template") or {}).get("image")
    if not image:
        return None
    source = Path(image)
    if not source.is_file():
        raise PetmonaiError(f"{source}: the run's template image is missing")
    rel = f"resources/template{'.nii.gz' if source.name.endswith('.gz') else '.nii'}"
    atomic_write_bytes(root / rel, source.read_bytes())
    return rel


def referenced_keys(node, cfg: dict) -> set[str]:
    """Top-level keys of ``cfg`` that ``node`` refers to (``@spacing``, ``$@template#image``...),
    and the keys those refer to in turn."""
    found: set[str] = set()
    todo = [node]
    while todo:
        text = json.dumps(todo.pop())
        for key in re.findall(r"@([A-Za-z_]\w*)", text):
            if key in cfg and key not in found:
                found.add(key)
                todo.append(cfg[key])
    return found


def fold_network_entry(model_cfg: dict) -> dict:
    """A config entry that builds one fold network: the run's own ``_target_`` entry, or the
    registered factory (``petmonai.models.sfcn_3d``) with the run's options."""
    import petmonai.models as models

    if "_target_" in model_cfg:
        return copy.deepcopy(model_cfg)
    options = copy.deepcopy(model_cfg)
    name = str(options.pop("name", ""))
    if callable(getattr(models, name, None)):
        return {"_target_": f"petmonai.models.{name}", **options}
    return {"_target_": "petmonai.models.build_model", "model_cfg": copy.deepcopy(model_cfg)}


def inference_config(run: LoadedRun, template: str | None) -> dict:
    """``configs/inference.json``: a MONAI bundle config (``_target_``, ``@`` references, ``$``
    expressions) that predicts a folder of volumes as ``predict`` does with the run."""
    cfg, opts = run.cfg, run.options
    keys = referenced_keys([pipeline_entries(cfg, "preprocess"), cfg["model"]], cfg)
    clash = sorted(keys & set(BUNDLE_KEYS))
    if clash:
        raise PetmonaiError(f"the run config's preprocess refers to {', '.join(clash)}, a name the bundle uses itself")
    shared = {k: copy.deepcopy(cfg[k]) for k in sorted(keys)}
    if template is not None:
        shared["template"]["image"] = f"$@bundle_root + '/{template}'"
    views = {k: opts[k] for k in ("windows", "overlap", "flips", "batch_size")}
    return {
        "imports": ["$import torch", "$from petmonai.inference import screen_inputs", *(cfg.get("imports") or [])],
        "bundle_root": ".",
        "dataset_dir": "/workspace/data",
        "output_dir": "$@bundle_root + '/eval'",
        "skip_bad": False,
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        **shared,
        "preprocessing": {"_target_": "Compose", "transforms": copy.deepcopy(pipeline_entries(cfg, "preprocess"))},
        "dataset": {"_target_": "petmonai.inference.ScreenedDataset", "data": "@dataset_dir", "transform": "@preprocessing",
                    "checks": {k: cfg[k] for k in ("spacing", "crop_size", "spatial_size") if k in cfg},
                    "skip_bad": "@skip_bad", "min_extent_fraction": float(opts["min_extent_fraction"]),
                    "workers": int(opts["workers"])},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "fold_network": {**fold_network_entry(cfg["model"]), "_mode_": "callable"},
        "network_def": {"_target_": "petmonai.inference.ViewEnsemble", "network": "@fold_network",
                        "n_models": len(run.checkpoints), "spatial_size": [int(s) for s in cfg["spatial_size"]],
                        "crop_size": [int(s) for s in cfg["crop_size"]], **views},
        "network": "$@network_def.to(@device)",
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose",
                           "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "@ckpt_path", "load_dict": {"model": "@network"},
             "map_location": "@device"},
            {"_target_": "petmonai.inference.ProbabilityWriter", "output_dir": "@output_dir", "dataset": "@dataset",
             "classes": list(run.classes)},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "run": ["$screen_inputs(@dataset)", "$@evaluator.run()"],
    }


def bundle_network(root: Path, config: dict, run: LoadedRun) -> ViewEnsemble:
    """``network_def`` as MONAI builds it from ``config``, with the run's fold weights loaded in order."""
    from monai.bundle import ConfigParser

    from petmonai.models import load_weights

    parser = ConfigParser(copy.deepcopy(config))
    parser["bundle_root"] = str(root)
    try:
        ensemble = parser.get_parsed_content("network_def")
    except Exception as err:  # the config's fold network cannot be built outside the run
        raise PetmonaiError(f"the bundle's network_def cannot be built: {err}") from None
    for net, (repeat, fold, path) in zip(ensemble.models, run.checkpoints):
        load_weights(net, path, torch.device("cpu"))
    return ensemble.eval()


def check_volume(run: LoadedRun) -> tuple[torch.Tensor, str]:
    """A volume to check the bundle with: the first training scan of the run that still preprocesses,
    else a seeded random one on the run's grid."""
    import pandas as pd

    from petmonai.errors import DataError

    datalist = run.run_dir / "datalist.csv"
    if datalist.is_file():
        table = pd.read_csv(datalist, dtype=str, keep_default_na=False)
        images = table.loc[table.get("split", "train") == "train", "image"] if "image" in table else []
        for image in list(images)[:3]:
            try:
                volume, _, _ = preprocess_path(Path(image), run.preprocess, run.cfg,
                                               float(run.options["min_extent_fraction"]))
                return volume, f"training scan {'/'.join(Path(image).parts[-3:])}"
            except DataError:
                continue
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, *[int(s) for s in run.cfg["spatial_size"]], generator=generator) * 2.0, "a random volume"


def ensemble_difference(ensemble: ViewEnsemble, run: LoadedRun, volume: torch.Tensor) -> float:
    """max |P(bundle) - P(predict)| over the classes for one preprocessed volume."""
    with torch.no_grad():
        bundle = torch.softmax(ensemble(volume[None].float()), dim=1)[0].double().numpy()
    p_mci = float(predict_views(run, volume).mean())
    expected = np.array([1.0 - p_mci, p_mci]) if POSITIVE_INDEX == 1 else np.array([p_mci, 1.0 - p_mci])
    return float(np.abs(bundle - expected).max())


def value_range(volume: torch.Tensor) -> list[float]:
    """The check volume's intensity range, rounded outward to 0.1 (the metadata's input ``value_range``)."""
    low, high = float(volume.min()), float(volume.max())
    return [float(np.floor(low * 10) / 10), float(np.ceil(high * 10) / 10)]


def package_versions(names=REQUIRED_PACKAGES) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "petmonai":
                out[name] = __version__
    return out


def bundle_metadata(run: LoadedRun, version: str, authors, copyright, input_range: list[float]) -> dict:
    """``configs/metadata.json`` (the Model Zoo's fields; :data:`SCHEMA_URL`)."""
    import monai

    from petmonai.models import model_label

    desc = run.strategy.describe()
    grid = [int(s) for s in run.cfg["spatial_size"]]
    spacing = run.cfg["spacing"][0]
    metrics = read_json_or_empty(run.run_dir / "metrics.json")
    pooled = (metrics.get("pooled_ci") or {}).get("roc_auc") or {}
    synthetic = bool(run.run_provenance.get("synthetic_data", False))
    classes = ", ".join(f"{i}: {c}" for i, c in enumerate(run.classes))
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"exported by petmonai {__version__} from run {run.run_dir.name} "
                               f"({time.strftime('%Y-%m-%d')})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": package_versions(),
        "supported_apps": {},
        "name": f"petmonai brain FDG-PET NC vs MCI ({run.run_dir.name})",
        "task": "Classification of brain FDG-PET volumes: NC (cognitively normal) vs MCI (mild cognitive impairment)",
        "description": (f"{model_label(run.cfg['model'])} ensemble of {len(run.checkpoints)} cross-validation fold "
                        f"models trained with petmonai, each scoring {desc['n_views']} test-time views "
                        f"({desc['n_windows']} windows x {desc['n_flips']} flips); the class probabilities are the "
                        "mean softmax over fold models and views. The network takes a volume preprocessed by "
                        "this bundle's own pipeline (configs/inference.json)."),
        "authors": authors or "petmonai user (set with export-bundle --authors)",
        "copyright": copyright or f"Copyright (c) {time.strftime('%Y')} the authors",
        "data_source": "synthetic phantom cohort (petmonai)" if synthetic else str(
            (run.cfg.get("data") or {}).get("root") or "not recorded"),
        "data_type": "nibabel",
        "image_classes": f"one channel: brain FDG-PET uptake after the bundle's preprocessing, on a "
                         f"{'x'.join(map(str, grid))} grid of {spacing} mm voxels",
        "label_classes": classes,
        "pred_classes": f"{classes} (probabilities summing to 1)",
        "eval_metrics": {f"pooled_oof_{k}": v for k, v in (metrics.get("pooled") or {}).items()
                         if isinstance(v, (int, float)) and k != "n"} | (
            {"pooled_oof_roc_auc_ci_low": pooled["ci_low"], "pooled_oof_roc_auc_ci_high": pooled["ci_high"]}
            if pooled else {}),
        "intended_use": "Research only: NOT FOR CLINICAL USE. Not a medical device; not validated for diagnosis. "
                        "See docs/README.md for the training data, its confounds and the limits of the figures.",
        "references": [*(["Peng et al. 2021, Medical Image Analysis 68:101871 (SFCN)"]
                         if run.cfg["model"].get("name") == "sfcn_3d" else []),
                       "MONAI bundle specification: https://docs.monai.io/en/stable/mb_specification.html"],
        "network_data_format": network_data_format(grid, input_range, run.classes),
    }


def network_data_format(grid: list[int], input_range: list[float], classes) -> dict:
    channels = {str(i): c for i, c in enumerate(classes)}
    probabilities = {"type": "probabilities", "format": "classes", "num_channels": len(classes),
                     "spatial_shape": [1], "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                     "channel_def": channels}
    return {
        "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "PT", "num_channels": 1,
                             "spatial_shape": grid, "dtype": "float32", "value_range": input_range,
                             "is_patch_data": False, "channel_def": {"0": "FDG-PET"},
                             "description": "a volume as the bundle's preprocessing leaves it (value_range: "
                                            "that of a training scan)"}},
        "outputs": {"pred": {**probabilities, "type": "logits", "value_range": [-87.4, 0.0],
                             "description": "log of the ensemble's mean class probabilities: logits whose "
                                            "softmax (the bundle's postprocessing) gives the probabilities"}},
        "post_processed_outputs": {"pred": probabilities},
    }
