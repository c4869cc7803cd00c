"""The test-time-augmented fold ensemble and the challenge submission writer.

    run folder + new volumes
      -> the run's own preprocessing (its saved ``config.yaml``)
      -> views (3D: sliding windows of the training crop x test-time flips)
      -> every fold model of the run -> softmax P(positive class, MCI by default) averaged over views and models
      -> the run's decision threshold -> ``submission.csv``, ``submission.probabilities.csv``, provenance
         (side files named after the submission: :func:`output_paths`)

>>> from petmonai.inference.predictor import predict
>>> result = predict("runs/real", ["../shared/data/pet2023/Test"], "out/submission.csv")  # doctest: +SKIP
>>> result.table[["uuid", "prob_mci", "label"]].head()  # doctest: +SKIP

The classes come from the run (its ``data.classes``): a CN vs AD run writes ``prob_ad`` and labels
CN/AD. Inputs are challenge files named ``<uuid>.nii[.gz]`` (the submission keys rows by that
integer), PET-BIDS files, or a BIDS dataset (every PET file of the run's ``data.tracer``), whose rows
are named by the BIDS file name (``sub-01_ses-02``).

How a volume is turned into network inputs is a *view strategy* (:mod:`petmonai.inference.views`),
chosen by ``inference.views`` in the run config (``auto``: from the model): sliding windows x
flips for the 3D models, random slice draws for the 2D slice model; a strategy of your own
registers with :func:`petmonai.inference.views.register_views` and predicts through the same command,
the same ensemble and the same writers.

Options come from :data:`COMMON_DEFAULTS` and the strategy's ``defaults``, then the run
config's ``inference:`` section, then the command line (``--set inference.overlap=0.25``,
``--flips all``...). Unknown keys are errors that name the key.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import MetaTensor

from petmonai import CLASS_NAMES
from petmonai.data import (
    data_options,
    discover_bids,
    is_bids,
    is_nifti,
    nifti_stem,
    parse_pet_name,
    prob_column,
    read_header,
    run_classes,
)
from petmonai.errors import ConfigError, DataError, PetmonaiError
from petmonai.inference.views import (
    VIEW_STRATEGIES,
    SlidingWindowFlips3D,
    ViewStrategy,
    default_views,
)
from petmonai.models import model_facts
from petmonai.runs import (
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    get_logger,
    read_run_config,
    sha256_file,
    sha256_text,
)

log = get_logger("predict")


POSITIVE_INDEX = 1


"""The network's output unit of the positive class (the second of ``data.classes``)."""


SUBMISSION = "submission.csv"


# the side files of a prediction are named after its --output (out/sub.csv -> out/sub.probabilities.csv ...),
# so that several predictions can share a folder: these suffixes replace the submission's own
PROBABILITIES = ".probabilities.csv"


PROVENANCE = ".provenance.json"


SKIPPED = ".skipped.csv"


SALIENCY_DIR = ".saliency"


def probability_columns(classes=CLASS_NAMES) -> list[str]:
    """The columns of ``probabilities.csv``: ``prob_<positive class>`` (``prob_mci``) is the mean probability."""
    return ["uuid", "file", prob_column(classes), "label", "prob_sd", "prob_sd_folds", "n_views", "n_models",
            "subject", "subject_in_training"]


PROBABILITY_COLUMNS = probability_columns()


COMMON_DEFAULTS: dict = {
    "views": "auto",          # view strategy (VIEW_STRATEGIES); auto: from the model
    "batch_size": 16,         # views per forward pass
    "device": "auto",         # auto | cpu | cuda
    "amp": "auto",            # auto: CUDA autocast (bf16, else fp16), fp32 on CPU; true: also bf16 on a CPU
                              # with native bf16; false: fp32 everywhere
    "threshold": None,        # null: the run's decision threshold (metrics.json)
    "folds": "all",           # all, or a list of fold numbers (every repeat) to use a subset of the models
    "workers": 2,             # threads that read and preprocess the input volumes
    "threads": None,          # torch CPU threads while predicting (null: torch's default)
    "optimize": "auto",       # auto: on CPU in fp32, TorchScript-freeze each model for oneDNN (~2x faster,
                              # checked against the plain model, which is used if anything differs); none
    "min_extent_fraction": 0.5,  # a volume must span this fraction of the crop's extent (mm) on each axis
    "saliency_layer": "auto",    # Grad-CAM target layer (a module name of the network); auto: the one the
                                 # model registered (petmonai.models.registry), else its last convolution
    "saliency_class": "predicted",  # predicted | one of the run's classes: the class whose evidence Grad-CAM maps
}


def strategy_name(cfg: dict, options: dict) -> str:
    name = options["views"]
    if name in (None, "auto"):
        name = default_views(cfg)
    if name not in VIEW_STRATEGIES:
        raise ConfigError(f"inference.views: unknown view strategy '{name}' (known: {', '.join(sorted(VIEW_STRATEGIES))})")
    return name


def resolve_options(cfg: dict, overrides: dict | None = None) -> dict:
    """Inference options: defaults <- the run config's ``inference:`` section <- ``overrides``."""
    from_cfg = dict(cfg["inference"])
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    merged = {**COMMON_DEFAULTS, **from_cfg, **overrides}
    name = strategy_name(cfg, merged)
    defaults = {**COMMON_DEFAULTS, **VIEW_STRATEGIES[name].defaults}
    for source, entries in (("run config inference", from_cfg), ("option", overrides)):
        for key in entries:
            if key not in defaults:
                close = difflib.get_close_matches(key, list(defaults), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(defaults)})"
                raise ConfigError(f"unknown {source} key 'inference.{key}' for views '{name}'{hint}")
    options = {**defaults, **from_cfg, **overrides}
    options["views"] = name
    if options["saliency_layer"] in (None, "auto"):  # the model's own; still auto for a network of your own
        options["saliency_layer"] = model_facts(cfg["model"]).saliency_layer or "auto"
    if int(options["batch_size"]) < 1:
        raise ConfigError("inference.batch_size must be at least 1")
    choices = [*run_classes(cfg), "predicted"]
    if str(options["saliency_class"]) not in choices:
        raise ConfigError(f"inference.saliency_class: '{options['saliency_class']}' is not one of {choices}")
    return options


def parse_set_overrides(assignments: Iterable[str]) -> dict:
    """``["inference.overlap=0.25", "flips=all"]`` -> ``{"overlap": 0.25, "flips": "all"}`` (YAML values)."""
    import yaml

    out = {}
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"--set '{assignment}': expected key=value")
        key, raw = assignment.split("=", 1)
        key = key.strip()
        key = key[len("inference."):] if key.startswith("inference.") else key
        if "." in key:
            raise ConfigError(f"--set '{assignment}': only inference.<key> entries can be set when predicting")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set '{assignment}': value is not valid YAML ({err})") from None
    return out


@dataclass
class FoldModel:
    repeat: int
    fold: int
    path: Path
    sha256: str
    net: torch.nn.Module                  # the plain network (Grad-CAM needs it)
    fast: torch.nn.Module | None = None   # an inference-optimised twin with the same outputs, if any

    @property
    def predictor(self) -> torch.nn.Module:
        return self.fast if self.fast is not None else self.net


@dataclass
class LoadedRun:
    """A training run ready to predict: its config, preprocessing, fold models and threshold."""

    run_dir: Path
    cfg: dict
    options: dict
    preprocess: object
    strategy: ViewStrategy
    models: list[FoldModel]
    threshold: float
    threshold_source: str
    training_subjects: set[str]
    device: torch.device
    amp: bool
    amp_dtype: torch.dtype | None
    run_provenance: dict = field(default_factory=dict)
    checkpoints: list = field(default_factory=list)   # (repeat, fold, path) of the models to load
    classes: tuple = CLASS_NAMES                       # the run's data.classes (negative, positive)


def fold_checkpoints(run_dir: Path, folds: str | Sequence[int] = "all") -> list[tuple[int, int, Path]]:
    """``(repeat, fold, path)`` of every fold's best checkpoint listed by the run's ``folds.csv``."""
    from petmonai.runs import BEST_CHECKPOINT, fold_dir_name

    folds_csv = run_dir / "folds.csv"
    if not folds_csv.is_file():
        raise PetmonaiError(f"{run_dir}: no folds.csv; is this a finished training run folder?")
    table = pd.read_csv(folds_csv, usecols=["repeat", "fold"]).drop_duplicates().sort_values(["repeat", "fold"])
    pairs = [(int(r), int(f)) for r, f in table.itertuples(index=False)]
    if folds not in (None, "all"):
        wanted = [int(f) for f in ([folds] if isinstance(folds, (int, str)) else folds)]
        unknown = sorted(set(wanted) - {f for _, f in pairs})
        if unknown:
            raise PetmonaiError(f"--folds {wanted}: fold(s) {unknown} are not in {folds_csv}")
        pairs = [(r, f) for r, f in pairs if f in wanted]
    out, missing = [], []
    for repeat, fold in pairs:
        path = run_dir / fold_dir_name(repeat, fold) / BEST_CHECKPOINT
        (out if path.is_file() else missing).append((repeat, fold, path))
    if missing:
        names = ", ".join(str(p.relative_to(run_dir)) for _, _, p in missing)
        raise PetmonaiError(f"{run_dir}: missing checkpoint(s) {names}; has the training run finished?")
    if not out:
        raise PetmonaiError(f"{run_dir}: no fold checkpoints found")
    return out


def inference_device(options: dict) -> tuple[torch.device, bool, torch.dtype | None]:
    """``(device, amp, dtype)``: CUDA autocast (bf16 where supported, else fp16) when a GPU is
    used; on CPU fp32 unless ``amp: true`` and the CPU computes bf16 natively."""
    from petmonai.device import resolve_device

    device = resolve_device(str(options["device"]))
    amp = options["amp"]
    if isinstance(amp, str) and amp.lower() not in ("auto", "true", "false"):
        raise ConfigError(f"inference.amp: '{amp}' is not auto, true or false")
    amp = {"auto": "auto", "true": True, "false": False}.get(str(amp).lower(), amp)
    if amp is False:
        return device, False, None
    if device.type == "cuda":
        return device, True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp is True:
        if cpu_has_bf16():
            return device, True, torch.bfloat16
        log.warning("amp: this CPU has no native bf16; predicting in fp32")
    return device, False, None


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def optimise_network(net: torch.nn.Module, strategy: ViewStrategy, device: torch.device, options: dict,
                     amp: bool) -> torch.nn.Module | None:
    """On CPU in fp32, a TorchScript-frozen twin of ``net`` (``torch.jit.optimize_for_inference``:
    batch norm folded into the convolutions, oneDNN layouts kept between layers; about twice as
    fast on CPU). It is used only if it gives the plain network's softmax on a test batch to 1e-4;
    otherwise, or with ``optimize: none``, on CUDA, under autocast, or where torch no longer
    offers TorchScript, the plain network predicts."""
    mode = str(options.get("optimize", "auto")).lower()
    if mode not in ("auto", "jit", "none"):
        raise ConfigError(f"inference.optimize: '{mode}' is not auto, jit or none")
    if mode == "none" or (mode == "auto" and (device.type != "cpu" or amp)):
        return None
    import warnings

    try:
        example = strategy.example_input().to(device)
    except NotImplementedError:
        return None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript is deprecated in favour of torch.compile, which
            # compiles for minutes on a CPU and was no faster here; keep it while torch still has it
            plain = copy.deepcopy(net).to(memory_format=torch.contiguous_format).eval()
            fast = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(plain, example)))
            ref = torch.softmax(net(example).float(), dim=1)
            got = torch.softmax(fast(example).float(), dim=1)
            got_one = torch.softmax(fast(example[:1]).float(), dim=1)
    except Exception as err:  # noqa: BLE001 - any failure means: predict with the plain network
        log.info("inference-optimised model unavailable (%s: %s); using the plain network", type(err).__name__, err)
        return None
    diff = max(float((ref - got).abs().max()), float((ref[:1] - got_one).abs().max()))
    if diff > 1e-4:
        log.warning("inference-optimised model differs from the plain network by %.2g; using the plain network", diff)
        return None
    return fast


def run_threshold(run_dir: Path, override: float | None) -> tuple[float, str]:
    if override is not None:
        return float(override), "option"
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
        return float(metrics["threshold"]), "metrics.json"
    except FileNotFoundError:
        raise PetmonaiError(f"{path}: not found, so the run's decision threshold is unknown; "
                            "has training finished? (or pass --threshold)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise PetmonaiError(f"{path}: no numeric 'threshold' ({err}); pass --threshold") from None


def training_subjects(run_dir: Path) -> set[str]:
    path = run_dir / "datalist.csv"
    if not path.is_file():
        log.warning("%s not found: cannot flag test scans of training subjects", path)
        return set()
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "subject" not in table.columns:
        return set()
    train = table[table["split"] == "train"] if "split" in table.columns else table
    return {s for s in train["subject"] if s and not s.startswith("file:")}


def load_run(run_dir: str | Path, overrides: dict | None = None, with_models: bool = True) -> LoadedRun:
    """Read a training run folder: config, preprocessing, threshold and (``with_models``) every
    fold's best model; without them, :func:`load_models` adds them later."""
    from petmonai.transforms import build_pipelines

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    options = resolve_options(cfg, overrides)
    strategy = VIEW_STRATEGIES[options["views"]](cfg, options)
    threshold, source = run_threshold(run_dir, options["threshold"])
    device, amp, amp_dtype = inference_device(options)
    checkpoints = fold_checkpoints(run_dir, options["folds"])  # fail early if the run is incomplete
    try:
        run_prov = json.loads((run_dir / "provenance.json").read_text())
    except (OSError, ValueError):
        run_prov = {}
    run = LoadedRun(run_dir=run_dir.resolve(), cfg=cfg, options=options, preprocess=build_pipelines(cfg)[0],
                    strategy=strategy, models=[], threshold=threshold, threshold_source=source,
                    training_subjects=training_subjects(run_dir), device=device, amp=amp, amp_dtype=amp_dtype,
                    run_provenance=run_prov, classes=run_classes(cfg))
    run.checkpoints = checkpoints
    if with_models:
        load_models(run)
    return run


def load_models(run: LoadedRun) -> LoadedRun:
    """Build the run's network once per fold checkpoint, load its weights, and optimise it for inference."""
    from petmonai.models import build_model, load_weights

    if run.models:
        return run
    with torch_threads(run.options["threads"]):
        for repeat, fold, path in run.checkpoints:
            net = build_model(run.cfg["model"], run.cfg).to(run.device)
            load_weights(net, path, run.device)
            net = run.strategy.prepare_network(net.eval(), run.device)
            fast = optimise_network(net, run.strategy, run.device, run.options, run.amp)
            run.models.append(FoldModel(repeat, fold, path, sha256_file(path), net, fast))
    return run


@dataclass
class InputFile:
    path: Path
    uuid: int | str         # the challenge's integer file stem, or a BIDS scan name (sub-01_ses-02)
    subject: str = ""       # a BIDS file's subject (sub-01); '' reads it from the header's db_name

    @property
    def seed(self) -> int:
        """Seeds the views of random view strategies: the uuid, or a checksum of a BIDS name."""
        return self.uuid if isinstance(self.uuid, int) else zlib.crc32(self.uuid.encode())


def collect_inputs(inputs: Sequence[str | Path], cfg: dict | None = None) -> list[InputFile]:
    """The NIfTI files named by ``inputs`` (folders: their ``*.nii``/``*.nii.gz``, not recursive; a BIDS
    dataset: every PET file of ``cfg``'s ``data.tracer``), sorted by uuid. Empty input, a file stem that is
    neither an integer nor a PET-BIDS name, two files with one uuid (``7.nii`` and ``7.nii.gz``), and
    challenge files mixed with BIDS files are errors."""
    if not inputs:
        raise PetmonaiError("no input given (--input FOLDER or FILES)")
    files: list[Path] = []
    bids: list[InputFile] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and is_bids(path):
            table = discover_bids(path, labels=False, tracer=data_options(cfg)["tracer"])
            bids += [InputFile(Path(i), u, s) for i, u, s in zip(table["image"], table["uuid"], table["subject"])]
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p))
            if not found:
                raise PetmonaiError(f"{path}: input folder holds no .nii or .nii.gz file")
            files += found
        elif path.is_file():
            if not is_nifti(path):
                raise PetmonaiError(f"{path}: not a .nii or .nii.gz file")
            files.append(path)
        else:
            raise PetmonaiError(f"{path}: input not found")
    seen, unique = set(), []
    for path in files:  # one file named twice (its folder and itself) counts once
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    named = [p for p in unique if parse_pet_name(p.name) is not None]
    bids += [InputFile(p, parse_pet_name(p.name)["stem"], f"sub-{parse_pet_name(p.name)['sub']}") for p in named]
    unique = [p for p in unique if p not in named]
    bad = [p for p in unique if not (nifti_stem(p).isascii() and nifti_stem(p).isdigit())]
    if bad:
        names = ", ".join(str(p) for p in bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        raise PetmonaiError(f"file name(s) without an integer uuid stem: {names}; the submission needs "
                            "files named <uuid>.nii or <uuid>.nii.gz (or PET-BIDS files, or a BIDS dataset)")
    if bids:
        return _bids_inputs(bids, unique)
    by_uuid: dict[int, list[Path]] = {}
    for path in unique:
        by_uuid.setdefault(int(nifti_stem(path)), []).append(path)
    dups = {u: ps for u, ps in by_uuid.items() if len(ps) > 1}
    if dups:
        text = "; ".join(f"uuid {u}: {', '.join(map(str, ps))}" for u, ps in sorted(dups.items()))
        raise PetmonaiError(f"duplicate uuid(s): {text} (one file per uuid)")
    return [InputFile(ps[0], u) for u, ps in sorted(by_uuid.items())]


def _bids_inputs(bids: list[InputFile], challenge: list[Path]) -> list[InputFile]:
    """BIDS inputs sorted by name; one scan named twice counts once, two files of one name are an error."""
    if challenge:
        raise PetmonaiError(f"challenge files ({challenge[0]}, ...) mixed with BIDS files ({bids[0].path}, ...): "
                            "predict them in two runs (their rows are keyed differently)")
    by_name: dict[str, InputFile] = {}
    for item in bids:
        other = by_name.setdefault(item.uuid, item)
        if other.path.resolve() != item.path.resolve():
            raise PetmonaiError(f"two BIDS files named {item.uuid}: {other.path}, {item.path} (one file per scan)")
    return [by_name[name] for name in sorted(by_name)]


@dataclass
class Prepared:
    """One preprocessed input volume."""

    item: InputFile
    volume: torch.Tensor          # (C, X, Y, Z) as the network's training data
    affine: np.ndarray | None     # voxel -> world (mm) of ``volume``, None if the pipeline hides it
    subject: str


def check_extent(path: Path, header: dict, cfg: dict, fraction: float) -> None:
    """A field of view far smaller than the training crop is not a whole-brain PET volume."""
    if fraction <= 0 or "crop_size" not in cfg or "spacing" not in cfg:
        return
    dims = [int(s) for s in header["shape"].split("x")[:3]]
    zooms = [header["voxel_x"], header["voxel_y"], header["voxel_z"]]
    need = [fraction * c * s for c, s in zip(cfg["crop_size"], cfg["spacing"])]
    extent = [d * z for d, z in zip(dims, zooms)]
    if any(e < n for e, n in zip(extent, need)):
        raise DataError(path, f"unexpected shape {tuple(dims)} with voxels {tuple(round(z, 2) for z in zooms)} mm: "
                              f"field of view {tuple(round(e) for e in extent)} mm, smaller than a brain "
                              f"(at least {tuple(round(n) for n in need)} mm expected)")


def preprocess_file(item: InputFile, run: LoadedRun) -> Prepared:
    """Read and preprocess one input exactly as the run's training data; :class:`DataError` names
    the file when it cannot be read, has NaN/Inf, is empty or has an unexpected shape."""
    volume, affine, header = preprocess_path(item.path, run.preprocess, run.cfg, float(run.options["min_extent_fraction"]))
    return Prepared(item, volume, affine, item.subject or header["subject"])


def preprocess_path(path: Path, preprocess, cfg: dict, min_extent_fraction: float) -> tuple[torch.Tensor, np.ndarray | None, dict]:
    """``(volume, affine, header)`` of one NIfTI file through a run's ``preprocess`` Compose, with the
    checks every prediction makes (the field of view, finite values, the run's ``spatial_size``):
    :class:`DataError` names the file and the problem. ``predict`` and a MONAI bundle's dataset
    (:class:`petmonai.inference.bundle.ScreenedDataset`) both preprocess through here."""
    from petmonai.data import describe_failure

    path = Path(path)
    header = read_header(path)
    check_extent(path, header, cfg, min_extent_fraction)
    try:
        data, affine = apply_tracking_affine(preprocess, {"image": str(path)})
    except DataError:
        raise
    except Exception as err:  # MONAI wraps the transform's error; report its innermost message
        raise DataError(path, describe_failure(err)) from None
    image = data["image"]
    volume = torch.as_tensor(image.as_tensor() if isinstance(image, MetaTensor) else image, dtype=torch.float32)
    if volume.ndim < 3 or not torch.isfinite(volume).all():
        raise DataError(path, "preprocessing produced non-finite values or no volume")
    if "spatial_size" in cfg and volume.ndim == 4 and list(volume.shape[1:]) != [int(s) for s in cfg["spatial_size"]]:
        raise DataError(path, f"preprocessed shape {tuple(volume.shape[1:])} differs from the run's spatial_size "
                              f"{tuple(cfg['spatial_size'])}")
    return volume.contiguous(), affine, header


def apply_tracking_affine(preprocess, data: dict, key: str = "image") -> tuple[dict, np.ndarray | None]:
    """Run a MONAI Compose one transform at a time (its own machinery: ``Compose(start, end)``)
    and keep the voxel-to-world affine of ``data[key]`` from the last step that still had it.

    The run's pipeline usually ends with ``EnsureTyped(track_meta=False)``, which drops the
    metadata but not the geometry; a spatial change after that point makes the affine unknown.
    """
    affine, shape = None, None
    n = len(preprocess.transforms)
    for i in range(n):
        data = preprocess(data, start=i, end=i + 1)
        img = data[key]
        if isinstance(img, MetaTensor):
            affine, shape = np.asarray(img.affine, dtype=np.float64), tuple(img.shape[1:])
        elif shape is not None and tuple(img.shape[1:]) != shape:
            affine = None
    return data, affine


def prepare_all(files: Sequence[InputFile], run: LoadedRun, skip_bad: bool) -> tuple[list[Prepared], list[dict]]:
    """Preprocess every input (a few threads); fail naming every bad file unless ``skip_bad``."""
    def work(item):
        try:
            return preprocess_file(item, run)
        except DataError as err:
            return {"uuid": item.uuid, "file": str(item.path), "problem": err.problem}

    return screen_all(files, work, run.options["workers"], skip_bad, "pass --skip-bad to predict the others")


def screen_all(items: Sequence, work, workers, skip_bad: bool, skip_hint: str) -> tuple[list, list[dict]]:
    """``work`` on every item (``workers`` threads), which returns the prepared item or, for one that
    cannot be used, a dict with its ``uuid``, ``file`` and ``problem``: ``(prepared, bad)`` in input
    order. Unless ``skip_bad``, any bad item is an error naming every one (``skip_hint``: how to skip
    them). ``predict`` (:func:`prepare_all`) and a bundle's dataset both screen their inputs here."""
    workers = max(1, int(workers))
    if workers > 1 and len(items) > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(work, items))
    else:
        results = [work(item) for item in items]
    is_bad = [isinstance(r, dict) and "problem" in r for r in results]
    good = [r for r, b in zip(results, is_bad) if not b]
    bad = [r for r, b in zip(results, is_bad) if b]
    if bad and not skip_bad:
        lines = "; ".join(f"{b['file']}: {b['problem']}" for b in bad)
        raise PetmonaiError(f"{len(bad)} of {len(items)} input volume(s) cannot be used, nothing written: {lines}. "
                            f"Fix or remove them, or {skip_hint}")
    return good, bad


@torch.no_grad()
def network_view_probabilities(net: torch.nn.Module, views: torch.Tensor, device: torch.device, batch_size: int,
                               amp: bool = False, amp_dtype: torch.dtype | None = None,
                               channels_last: bool = False) -> np.ndarray:
    """P(positive class) of one network for every view of a batch ``(N, C, ...)``, ``batch_size`` views a pass."""
    out = np.empty(len(views), dtype=np.float64)
    for start in range(0, len(views), batch_size):
        batch = views[start:start + batch_size].to(device, non_blocking=True)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            logits = net(batch)
        if logits.ndim != 2 or logits.shape[1] != 2:
            raise PetmonaiError(f"model output of shape {tuple(logits.shape)}: expected (batch, 2), one unit per class")
        out[start:start + len(batch)] = torch.softmax(logits.float(), dim=1)[:, POSITIVE_INDEX].cpu().numpy()
    return out


def predict_views(run: LoadedRun, volume: torch.Tensor, seed: int = 0) -> np.ndarray:
    """P(positive class) of every (model, view) pair for one preprocessed volume: shape ``(n_models, n_views)``."""
    rng = np.random.default_rng(seed)
    views = run.strategy.views(volume, rng)
    batch_size = int(run.options["batch_size"])
    out = np.empty((len(run.models), len(views)), dtype=np.float64)
    for m, model in enumerate(run.models):
        channels_last = views.ndim == 5 and run.device.type == "cpu" and model.fast is None
        out[m] = network_view_probabilities(model.predictor, views, run.device, batch_size, run.amp, run.amp_dtype,
                                            channels_last)
    return out


class HeldOutViews:
    """Scores a fold's held-out scans the way ``predict.py`` scores new ones: the mean P(positive class) over
    the run config's prediction views (``inference:`` section; e.g. sliding windows of the crop
    size x left-right flips), by that fold's network alone. Cross-validation uses it with
    ``cv.test_views: inference``, so its out-of-fold metrics describe the predictor users run.

    >>> import torch
    >>> from petmonai.config import load_config
    >>> from petmonai.models.registry import build_model
    >>> cfg = load_config()                  # the run's config (configs/train3d.yaml here)
    >>> scorer = HeldOutViews(cfg, torch.device("cpu"), amp=False)
    >>> scorer.describe(cfg["spatial_size"])["n_views"]   # 8 sliding windows x 2 flips
    16
    >>> net = build_model(cfg["model"])      # a fold's network (untrained here)
    >>> volume = torch.rand(1, *cfg["spatial_size"])     # a preprocessed held-out scan
    >>> probs = scorer(net, {"scan_7": volume})          # one mean P(positive class) per scan
    >>> probs.shape, bool(0.0 < probs[0] < 1.0)
    ((1,), True)
    """

    def __init__(self, cfg: dict, device: torch.device, amp: bool = True):
        self.options = resolve_options(cfg)
        self.strategy = VIEW_STRATEGIES[self.options["views"]](cfg, self.options)
        self.device = device
        _, self.amp, self.amp_dtype = inference_device({**self.options, "device": device.type,
                                                        "amp": self.options["amp"] if amp else False})

    def describe(self, volume_shape: Sequence[int] | None = None) -> dict:
        return self.strategy.describe(volume_shape)

    @torch.no_grad()
    def __call__(self, net: torch.nn.Module, volumes: dict) -> np.ndarray:
        was_training = net.training
        net.eval()
        out = []
        for scan_id, volume in volumes.items():
            # seeded by the scan, as predict_out_of_fold: random view strategies repeat their views
            views = self.strategy.views(torch.as_tensor(volume), np.random.default_rng(zlib.crc32(scan_id.encode())))
            out.append(network_view_probabilities(net, views, self.device, int(self.options["batch_size"]),
                                                  self.amp, self.amp_dtype).mean())
        net.train(was_training)
        return np.asarray(out, dtype=np.float64)


def summarise_views(probs: np.ndarray, classes=CLASS_NAMES) -> dict:
    """Mean P(positive class) over all views and models (``prob_<positive>``), its spread (sd over all),
    the sd of the model means."""
    return {
        prob_column(classes): float(probs.mean()),
        "prob_sd": float(probs.std()),
        "prob_sd_folds": float(probs.mean(axis=1).std()) if probs.shape[0] > 1 else 0.0,
        "n_views": int(probs.size),
        "n_models": int(probs.shape[0]),
    }


@contextlib.contextmanager
def torch_threads(n):
    """Run with ``n`` torch CPU threads (None: leave torch's setting), restoring it afterwards.
    On a CPU shared with other busy processes one thread is often faster than two."""
    if n in (None, "auto", 0):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def label_of(prob: float, threshold: float, classes=CLASS_NAMES) -> str:
    return classes[1] if prob >= threshold else classes[0]


@dataclass
class PredictionResult:
    table: pd.DataFrame           # <output>.probabilities.csv rows
    submission: pd.DataFrame      # uuid,label
    skipped: pd.DataFrame         # uuid,file,problem
    paths: dict
    provenance: dict
    seconds: float
    views: dict = field(default_factory=dict)   # uuid -> P(positive class) per (model, view)


def output_paths(output: str | Path, saliency: bool) -> dict:
    """The files of a prediction: the submission ``output`` and its side files named after it, e.g.
    ``out/sub.csv``: ``out/sub.probabilities.csv``, ``out/sub.provenance.json``, ``out/sub.skipped.csv``
    (only when volumes were skipped) and ``out/sub.saliency/`` (with ``saliency``).

    >>> sorted(p.name for p in output_paths("out/sub_a.csv", saliency=False).values())
    ['sub_a.csv', 'sub_a.probabilities.csv', 'sub_a.provenance.json', 'sub_a.skipped.csv']
    """
    output = Path(output)
    if output.is_dir():
        raise PetmonaiError(f"--output {output}: is a folder; give the submission file, e.g. {output / SUBMISSION}")
    stem = output.with_suffix("").name
    side = {"probabilities": PROBABILITIES, "provenance": PROVENANCE, "skipped": SKIPPED,
            **({"saliency": SALIENCY_DIR} if saliency else {})}
    paths = {"submission": output, **{k: output.parent / f"{stem}{suffix}" for k, suffix in side.items()}}
    if len({p.resolve() for p in paths.values()}) < len(paths):
        raise PetmonaiError(f"--output {output}: collides with another output file name; choose another name")
    return paths


def check_outputs(paths: dict, overwrite: bool) -> None:
    existing = [p for p in paths.values() if p.exists() and (p.is_file() or any(p.iterdir()))]
    if existing and not overwrite:
        raise PetmonaiError(f"output exists: {', '.join(map(str, existing))}; pass --overwrite to replace")


def predict(run_dir: str | Path, inputs: Sequence[str | Path], output: str | Path, *, overwrite: bool = False,
            skip_bad: bool = False, saliency: bool = False, options: dict | None = None) -> PredictionResult:
    """Everything ``petmonai predict`` does. Returns the tables written and their paths.

    Nothing is written unless every input can be used (or ``skip_bad``); each file is written
    atomically, the submission after its ``.probabilities.csv``; :func:`output_paths` names them.
    """
    t0 = time.perf_counter()
    paths = output_paths(output, saliency)
    check_outputs(paths, overwrite)
    run = load_run(run_dir, options, with_models=False)
    files = collect_inputs(inputs, run.cfg)
    if saliency and not isinstance(run.strategy, SlidingWindowFlips3D):
        raise ConfigError(f"--saliency maps volumes of a 3D model; run {run_dir} predicts with "
                          f"'{run.strategy.name}' views (a 2D slice model): predict without --saliency")
    desc = run.strategy.describe()
    log.info("run %s: %d fold model(s) x %s views per volume (%s) on %s%s; threshold %.3f (%s)",
             run.run_dir, len(run.checkpoints), desc.get("n_views", "?"),
             ", ".join(f"{k} {desc[k]}" for k in ("n_windows", "n_flips") if k in desc), run.device,
             f" with {str(run.amp_dtype).replace('torch.', '')} autocast" if run.amp else "",
             run.threshold, run.threshold_source)

    with torch_threads(run.options["threads"]):
        prepared, bad = prepare_all(files, run, skip_bad)
        for b in bad:
            log.warning("skipped %s: %s", b["file"], b["problem"])
        if not prepared:
            raise PetmonaiError(f"none of the {len(files)} input volume(s) can be used; nothing written")
        load_models(run)
        log.info("preprocessed %d volume(s) in %.1fs; predicting", len(prepared), time.perf_counter() - t0)

        rows, per_view = [], {}
        for i, prep in enumerate(prepared):
            probs = predict_views(run, prep.volume, seed=prep.item.seed)
            per_view[prep.item.uuid] = probs
            summary = summarise_views(probs, run.classes)
            rows.append({"uuid": prep.item.uuid, "file": str(prep.item.path.resolve()), **summary,
                         "label": label_of(summary[prob_column(run.classes)], run.threshold, run.classes),
                         "subject": prep.subject,
                         "subject_in_training": bool(prep.subject) and prep.subject in run.training_subjects})
            if (i + 1) % 10 == 0 or i + 1 == len(prepared):
                log.info("predicted %d/%d (%.1fs)", i + 1, len(prepared), time.perf_counter() - t0)

        table = pd.DataFrame(rows, columns=probability_columns(run.classes)).sort_values("uuid").reset_index(drop=True)
        submission = table[["uuid", "label"]]
        skipped = pd.DataFrame(bad, columns=["uuid", "file", "problem"]).sort_values("uuid").reset_index(drop=True)
        if len(table) + len(skipped) != len(files):  # every input is either predicted or listed as skipped
            raise AssertionError(f"{len(files)} inputs, {len(table)} predicted, {len(skipped)} skipped")

        submission_text = submission.to_csv(index=False)
        check_submission_text(submission_text, expected=len(table), classes=run.classes)
        prov = prediction_provenance(run, files, table, skipped, paths, submission_text, skip_bad)
        atomic_write_csv(paths["probabilities"], table)
        if len(skipped):
            atomic_write_csv(paths["skipped"], skipped)
        elif paths["skipped"].exists():
            paths["skipped"].unlink()  # a stale list from an earlier --overwrite'd prediction
        atomic_write_text(paths["submission"], submission_text)
        atomic_write_json(paths["provenance"], prov)
        log.info("wrote %s: %d scans (%d %s, %d %s), %d of them subjects of the training data; %d skipped%s",
                 paths["submission"], len(table), int((table["label"] == run.classes[1]).sum()), run.classes[1],
                 int((table["label"] == run.classes[0]).sum()), run.classes[0],
                 int(table["subject_in_training"].sum()), len(skipped),
                 f" (listed in {paths['skipped']})" if len(skipped) else "")

        if saliency:
            from petmonai.inference.saliency import write_saliency

            written = write_saliency(run, prepared, table, paths["saliency"], overwrite=overwrite)
            prov["saliency"] = {"folder": str(paths["saliency"].resolve()), "files": len(written),
                                "target_layer": run.options["saliency_layer"], "class": run.options["saliency_class"]}
            atomic_write_json(paths["provenance"], prov)
            log.info("wrote Grad-CAM maps and montages of %d volume(s) to %s", len(prepared), paths["saliency"])
        return PredictionResult(table, submission, skipped, paths, prov, time.perf_counter() - t0, per_view)


def check_submission_text(text: str, expected: int | None = None, classes=CLASS_NAMES) -> None:
    """The challenge format: header ``uuid,label``, integer uuids sorted ascending (BIDS scan names: sorted
    names), labels of the run's ``classes``."""
    lines = text.strip("\n").split("\n")
    if lines[0] != "uuid,label":
        raise AssertionError(f"submission header is {lines[0]!r}")
    uuids = []
    for line in lines[1:]:
        uuid, label = line.split(",")
        if not (uuid.isdigit() or parse_pet_name(f"{uuid}_pet.nii")) or label not in classes:
            raise AssertionError(f"bad submission row {line!r}")
        uuids.append(int(uuid) if uuid.isdigit() else uuid)
    if uuids != sorted(set(uuids)):
        raise AssertionError("submission uuids are not unique and sorted")
    if expected is not None and len(uuids) != expected:
        raise AssertionError(f"submission has {len(uuids)} rows, expected {expected}")


def prediction_provenance(run: LoadedRun, files, table, skipped, paths, submission_text: str, skip_bad: bool) -> dict:
    from petmonai.data import fingerprint
    from petmonai.runs import provenance

    prov = provenance(int(run.cfg["seed"]), fingerprint([f.path for f in files]), {
        "run_dir": str(run.run_dir),
        "run_git_commit": run.run_provenance.get("git_commit"),
        "run_data_fingerprint_sha256": run.run_provenance.get("data_fingerprint_sha256"),
        "run_config_sha256": sha256_file(run.run_dir / "config.yaml"),
        "checkpoints": [{"repeat": m.repeat, "fold": m.fold, "path": str(m.path.resolve()), "sha256": m.sha256}
                        for m in run.models],
        "threshold": run.threshold,
        "threshold_source": run.threshold_source,
        "inference": {k: v for k, v in run.options.items()},
        "views": run.strategy.describe(),
        "device": str(run.device),
        "amp": str(run.amp_dtype).replace("torch.", "") if run.amp else False,
        "inputs": len(files),
        "predicted": int(len(table)),
        "skipped": int(len(skipped)),
        "skip_bad": skip_bad,
        "outputs": {k: str(Path(v).resolve()) for k, v in paths.items()
                    if k not in ("skipped", "saliency") or (k == "skipped" and len(skipped))},
        "submission_sha256": sha256_text(submission_text),
    })
    prov.pop("seed", None)
    prov["input_fingerprint_sha256"] = prov.pop("data_fingerprint_sha256")
    return prov


def model_view_probabilities(run: LoadedRun, model: FoldModel, volume: torch.Tensor, seed: int) -> np.ndarray:
    """P(positive class) of every view of one preprocessed volume by one fold model of ``run`` alone."""
    single = copy.copy(run)
    single.models = [model]
    return predict_views(single, volume, seed=seed)[0]


def predict_out_of_fold(run_dir: str | Path, options: dict | None = None, role: str | Sequence[str] = "test",
                        progress: bool = True, run: LoadedRun | None = None) -> pd.DataFrame:
    """Per-view P(positive class) of every held-out scan of the run, by that fold's model only (``role``: another
    folds.csv role, or several in one pass, e.g. ``("train", "val")``: each fold's training scans).

    Returns one row per (repeat, fold, scan) with ``label``, ``subject`` and ``probs`` (an array
    over the strategy's views, labelled by ``run.strategy.labels``): summarise any subset of the
    views (no flips, one window...) from one pass. ``run``: the run already loaded with every fold
    model (``options`` are then its own).
    """
    run_dir = Path(run_dir)
    run = run or load_run(run_dir, {**(options or {}), "folds": "all"}, with_models=True)
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"scan_id": str})
    datalist = pd.read_csv(run_dir / "datalist.csv", dtype={"scan_id": str, "uuid": str}, keep_default_na=False)
    images = dict(zip(datalist["scan_id"], datalist["image"]))
    rows = []
    models = {(m.repeat, m.fold): m for m in run.models}
    # a scan is held out once per repeat: preprocess it once, keep it until its last use
    roles = (role,) if isinstance(role, str) else tuple(role)
    uses = Counter(folds.loc[folds["role"].isin(roles), "scan_id"])
    volumes: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    with torch_threads(run.options["threads"]):
        for (repeat, fold), model in models.items():
            rows += _fold_out_of_fold(run, model, folds, images, roles, volumes, uses)
            if progress:
                log.info("out-of-fold: repeat %d fold %d done (%.0fs)", repeat, fold, time.perf_counter() - t0)
    return pd.DataFrame(rows)


def _fold_out_of_fold(run: LoadedRun, model: FoldModel, folds: pd.DataFrame, images: dict, roles: tuple[str, ...],
                      volumes: dict, uses: Counter) -> list[dict]:
    members = folds[(folds["repeat"] == model.repeat) & (folds["fold"] == model.fold) & folds["role"].isin(roles)]
    rows = []
    for rec in members.itertuples(index=False):
        if rec.scan_id not in volumes:
            volumes[rec.scan_id] = preprocess_file(InputFile(Path(images[rec.scan_id]), 0), run).volume
        uses[rec.scan_id] -= 1
        volume = volumes[rec.scan_id] if uses[rec.scan_id] > 0 else volumes.pop(rec.scan_id)
        probs = model_view_probabilities(run, model, volume, seed=zlib.crc32(rec.scan_id.encode()))
        rows.append({"repeat": model.repeat, "fold": model.fold, "scan_id": rec.scan_id, "subject": rec.subject,
                     "label": int(rec.label), "probs": probs})
    return rows
