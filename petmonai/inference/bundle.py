"""What a petmonai MONAI bundle runs: the parts its ``configs/inference.json`` names.

A bundle written by :func:`petmonai.inference.bundle_export.export_bundle` predicts with MONAI's
own runner (``python -m monai.bundle run``) as ``predict.py`` does with the run folder:

    dataset       :class:`ScreenedDataset`: the NIfTI files of ``dataset_dir`` (:func:`bundle_inputs`)
                  through the run's preprocessing and predict's checks, every input first
                  (:func:`screen_inputs`); a file that cannot be used stops the run naming it (or,
                  with ``skip_bad``, is listed in ``skipped.csv``)
    network_def   :class:`ViewEnsemble`: every fold model x the run's test-time views
                  (sliding windows x flips) as one ``nn.Module``; it returns the log of the mean
                  class probabilities, so the bundle's softmax postprocessing gives them back
    handlers      :class:`ProbabilityWriter`: ``probabilities.csv`` in ``output_dir``

>>> fold_net = lambda: torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten())
>>> ens = ViewEnsemble(fold_net, n_models=2, spatial_size=[12, 12, 12], crop_size=[10, 10, 10])
>>> len(ens.starts) * len(ens.flips)                 # views per volume: 2 x 2 x 2 windows x 2 flips
16
>>> probs = torch.softmax(ens(torch.rand(3, 1, 12, 12, 12)), dim=1)   # P(NC), P(MCI) of 3 volumes
>>> probs.shape, bool(torch.allclose(probs.sum(dim=1), torch.ones(3)))
(torch.Size([3, 2]), True)
"""

import copy
import sys
from pathlib import Path
from typing import List

import pandas as pd
import torch

from petmonai import CLASS_NAMES
from petmonai.data import is_nifti, nifti_stem
from petmonai.errors import ConfigError, DataError, PetmonaiError
from petmonai.inference.predictor import preprocess_path, screen_all
from petmonai.inference.views import SlidingWindowFlips3D
from petmonai.runs import atomic_write_csv, get_logger

PROBABILITIES = "probabilities.csv"   # in the bundle run's output_dir (predict names its side files after --output)
SKIPPED = "skipped.csv"


log = get_logger("bundle")


def bundle_columns(classes=CLASS_NAMES) -> list[str]:
    """The columns of a bundle run's ``probabilities.csv``: uuid, file and P of each of the run's classes."""
    return ["uuid", "file", *[f"prob_{name.lower()}" for name in classes]]


BUNDLE_COLUMNS = bundle_columns()


"""``probabilities.csv`` of a bundle run: the file stem (the challenge's uuid), the file, P of each class."""


def stem_order(stem: str) -> tuple:
    """Sort key of file stems: integer uuids by value, before any other name."""
    return (0, int(stem), "") if stem.isascii() and stem.isdigit() else (1, 0, stem)


def bundle_inputs(dataset_dir) -> list[dict]:
    """The volumes a bundle run predicts: ``dataset_dir`` is a folder (its ``.nii``/``.nii.gz``
    files, not recursive) or one file. One item per file: ``image`` (its path, which the
    preprocessing replaces by the volume), ``uuid`` (the file stem) and ``file``, sorted by stem."""
    path = Path(str(dataset_dir)).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p))
        if not files:
            raise PetmonaiError(f"dataset_dir {path}: holds no .nii or .nii.gz file")
    elif path.is_file():
        if not is_nifti(path):
            raise PetmonaiError(f"dataset_dir {path}: not a .nii or .nii.gz file")
        files = [path]
    else:
        raise PetmonaiError(f"dataset_dir {path}: not found (give the folder of volumes with --dataset_dir)")
    by_stem: dict[str, list[Path]] = {}
    for file in files:
        by_stem.setdefault(nifti_stem(file), []).append(file)
    dups = {s: fs for s, fs in by_stem.items() if len(fs) > 1}
    if dups:
        text = "; ".join(f"{s}: {', '.join(f.name for f in fs)}" for s, fs in sorted(dups.items()))
        raise PetmonaiError(f"dataset_dir {path}: two files with one name stem ({text}); keep one of each")
    return [{"image": str(fs[0].resolve()), "uuid": stem, "file": str(fs[0].resolve())}
            for stem, fs in sorted(by_stem.items(), key=lambda kv: stem_order(kv[0]))]


def as_bool(value, key: str) -> bool:
    """A switch given in a config or on MONAI's command line (``--skip_bad True``, ``true``, ``1``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "none", ""):
        return False
    raise ConfigError(f"{key}: {value!r} is not true or false")


class ScreenedDataset(torch.utils.data.Dataset):
    """The bundle's dataset: every input preprocessed and checked as ``predict`` does
    (:func:`petmonai.inference.predictor.preprocess_path`) before the first prediction, so a file
    that cannot be used stops the run before anything is written, with one message naming every
    such file and its problem. With ``skip_bad`` those files are left out and listed in
    :attr:`skipped` (which :class:`ProbabilityWriter` writes to ``skipped.csv``).

    Args:
        data: items of :func:`bundle_inputs` (``image``: a file path, ``uuid``, ``file``), or the folder
            (or file) to list with it when the dataset is first used.
        transform: the run's preprocessing (a MONAI ``Compose``).
        checks: the run config's ``spacing``, ``crop_size`` and ``spatial_size`` (the field-of-view
            and grid checks of ``predict``).
        skip_bad: leave out unusable files instead of stopping.
        min_extent_fraction: a volume must span this fraction of the crop's extent (mm) per axis.
        workers: threads that preprocess the inputs.

    Example::

        ds = ScreenedDataset(bundle_inputs("Test"), preprocess, {"spacing": [6] * 3, "crop_size": [28, 36, 28]})
        len(ds), ds.skipped
    """

    def __init__(self, data, transform, checks: dict | None = None, skip_bad=False,
                 min_extent_fraction: float = 0.5, workers: int = 2):
        self.source = data
        self._data: list[dict] | None = None if isinstance(data, (str, Path)) else list(data)
        self.transform = transform
        self.checks = dict(checks or {})
        self.skip_bad = as_bool(skip_bad, "skip_bad")
        self.min_extent_fraction = float(min_extent_fraction)
        self.workers = max(1, int(workers))
        self.skipped: list[dict] = []
        self._items: list[dict] | None = None

    @property
    def data(self) -> list[dict]:
        """The input items (a folder given as ``data`` is listed on first use)."""
        if self._data is None:
            self._data = bundle_inputs(self.source)
        return self._data

    def _prepare(self, entry: dict):
        try:
            volume, _, _ = preprocess_path(Path(entry["image"]), self.transform, self.checks, self.min_extent_fraction)
        except DataError as err:
            return {"uuid": entry["uuid"], "file": entry["file"], "problem": err.problem}
        return {**entry, "image": volume}

    def screen(self) -> list[dict]:
        """Preprocess every input once (on first use); the usable items."""
        if self._items is not None:
            return self._items
        good, bad = screen_all(self.data, self._prepare, self.workers, self.skip_bad,
                               f"run with --skip_bad True to predict the others (listed in {SKIPPED})")
        if not good:
            raise PetmonaiError(f"none of the {len(self.data)} input volume(s) can be used: "
                                + "; ".join(f"{b['file']}: {b['problem']}" for b in bad))
        for b in bad:
            log.warning("skipped %s: %s", b["file"], b["problem"])
        self.skipped, self._items = bad, good
        return good

    def __len__(self) -> int:
        return len(self.screen())

    def __getitem__(self, index: int) -> dict:
        return self.screen()[index]


def screen_inputs(dataset: ScreenedDataset) -> int:
    """The first step of a bundle's ``run``: list and preprocess every input before the evaluator is
    built. On MONAI's command line a user error (no such folder, a file that cannot be used) ends
    the run here with one line on stderr and exit status 2, as petmonai's own commands do, instead
    of a traceback that MONAI's config machinery wraps. Returns the number of usable volumes."""
    try:
        return len(dataset.screen())
    except PetmonaiError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


class ViewEnsemble(torch.nn.Module):
    """Every fold model of a run and its test-time views as one network: for each preprocessed
    volume, the mean softmax over (fold model x view), the views being ``predict``'s sliding
    windows of the training crop x flips (:class:`petmonai.inference.views.SlidingWindowFlips3D`).
    It returns the *log* of those mean probabilities (shape ``(B, n_classes)``): logits whose
    softmax is the ensemble's probabilities, so a bundle's ``Activationsd(softmax=True)`` gives them
    exactly. TorchScript-scriptable when the fold network is.

    Args:
        network: the fold network: a callable that builds one (e.g. a ``_mode_: callable`` config
            entry) or a module (copied).
        n_models: fold models in the ensemble (their weights come from the bundle's ``model.pt``).
        spatial_size: the preprocessed grid (the run's ``spatial_size``); inputs must have it.
        crop_size: the training crop: the size of each window.
        windows: ``grid`` | ``center`` | ``whole`` (as ``inference.windows``).
        overlap: overlap of neighbouring windows.
        flips: test-time flips (``none``, ``lr``, ``all``, or axis lists).
        batch_size: views per forward pass of a fold model.

    Example::

        ens = ViewEnsemble(lambda: petmonai.models.sfcn_3d(), 5, [32, 40, 32], [28, 36, 28])
        probs = torch.softmax(ens(volumes), dim=1)
    """

    pad: List[int]
    spatial_size: List[int]
    size: List[int]
    starts: List[List[int]]
    flips: List[List[int]]

    def __init__(self, network, n_models: int, spatial_size, crop_size, windows: str = "grid",
                 overlap: float = 0.5, flips="lr", batch_size: int = 16):
        super().__init__()
        if int(n_models) < 1:
            raise ConfigError(f"ViewEnsemble: n_models must be at least 1, got {n_models}")
        build = (lambda: copy.deepcopy(network)) if isinstance(network, torch.nn.Module) else network
        self.models = torch.nn.ModuleList([build() for _ in range(int(n_models))])
        strategy = SlidingWindowFlips3D({"crop_size": list(crop_size)},
                                        {"windows": windows, "overlap": overlap, "flips": flips})
        self.spatial_size = [int(s) for s in spatial_size]
        if len(self.spatial_size) != 3:
            raise ConfigError(f"ViewEnsemble: spatial_size {spatial_size} is not 3D")
        self.pad = strategy.pad_widths(self.spatial_size)
        padded = (self.spatial_size if strategy.mode == "whole"
                  else [max(s, r) for s, r in zip(self.spatial_size, strategy.roi)])
        windows_ = strategy.window_slices(padded)
        self.size = [w.stop - w.start for w in windows_[0]]
        self.starts = [[w[i].start for i in range(3)] for w in windows_]
        self.flips = [[a + 1 for a in flip] for flip in strategy.flips]  # axes of a (C, X, Y, Z) volume
        self.batch_size = int(batch_size)
        self.n_classes = len(CLASS_NAMES)

    def views(self, volume: torch.Tensor) -> torch.Tensor:
        """Every view of one volume ``(C, X, Y, Z)``: ``(n_flips * n_windows, C, *crop)``."""
        if len(self.pad) > 0:
            volume = torch.nn.functional.pad(volume, self.pad)
        out: List[torch.Tensor] = []
        for flip in self.flips:
            flipped = torch.flip(volume, flip) if len(flip) > 0 else volume
            for s in self.starts:
                out.append(flipped[:, s[0]:s[0] + self.size[0], s[1]:s[1] + self.size[1], s[2]:s[2] + self.size[2]])
        return torch.stack(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or list(x.shape[2:]) != self.spatial_size:
            raise ValueError(f"ViewEnsemble: expected preprocessed volumes (B, C, {self.spatial_size}), "
                             f"got shape {list(x.shape)}")
        means: List[torch.Tensor] = []
        for b in range(x.shape[0]):
            views = self.views(x[b])
            total = torch.zeros(self.n_classes, dtype=torch.float64, device=x.device)
            for net in self.models:
                for start in range(0, views.shape[0], self.batch_size):
                    logits = net(views[start:start + self.batch_size])
                    if logits.dim() != 2 or logits.shape[1] != self.n_classes:
                        raise ValueError(f"ViewEnsemble: a fold model returned shape {list(logits.shape)}, "
                                         f"expected (batch, {self.n_classes})")
                    total = total + torch.softmax(logits.float(), dim=1).double().sum(0)
            means.append(total / float(views.shape[0] * len(self.models)))
        probs = torch.stack(means)
        # the smallest normal float32: a probability that underflowed stays finite as a logit
        return torch.log(probs.clamp_min(1.1754943508222875e-38)).float()


class ProbabilityWriter:
    """Ignite handler of a bundle's evaluator: collects each volume's post-processed class
    probabilities and, when the run completes, writes ``probabilities.csv`` (:data:`BUNDLE_COLUMNS`,
    one row per volume, sorted by uuid) and ``skipped.csv`` (the files the dataset left out)
    to ``output_dir``, each atomically.

    Args:
        output_dir: where the CSV files go (created).
        dataset: the bundle's :class:`ScreenedDataset` (for the skipped files and the input count).
        filename: name of the probabilities file.

    Example::

        ProbabilityWriter("out", dataset).attach(evaluator)
        evaluator.run()          # -> out/probabilities.csv
    """

    def __init__(self, output_dir, dataset=None, filename: str = PROBABILITIES, classes=CLASS_NAMES):
        self.columns = bundle_columns(list(classes))
        self.output_dir = Path(str(output_dir)).expanduser()
        self.dataset = dataset
        self.filename = filename
        self.rows: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine) -> None:
        self.rows = []

    def _collect(self, engine) -> None:
        from monai.data import decollate_batch

        batch, output = engine.state.batch, engine.state.output
        batch = decollate_batch(batch) if isinstance(batch, dict) else batch
        output = decollate_batch(output) if isinstance(output, dict) else output
        for item, out in zip(batch, output):
            probs = torch.as_tensor(out["pred"]).detach().float().flatten().cpu()
            if probs.numel() != len(CLASS_NAMES):
                raise PetmonaiError(f"{item['file']}: the network gave {probs.numel()} values, "
                                    f"expected {len(CLASS_NAMES)} class probabilities")
            self.rows.append({"uuid": str(item["uuid"]), "file": str(item["file"]),
                              **{col: float(p) for col, p in zip(self.columns[2:], probs.tolist())}})

    def _write(self, engine) -> None:
        skipped = list(getattr(self.dataset, "skipped", []) or [])
        inputs = len(getattr(self.dataset, "data", [])) if self.dataset is not None else None
        if inputs is not None and len(self.rows) + len(skipped) != inputs:
            raise AssertionError(f"{inputs} inputs, {len(self.rows)} predicted, {len(skipped)} skipped")
        table = pd.DataFrame(sorted(self.rows, key=lambda r: stem_order(r["uuid"])), columns=self.columns)
        path = atomic_write_csv(self.output_dir / self.filename, table)
        skipped_path = self.output_dir / SKIPPED
        if skipped:
            atomic_write_csv(skipped_path, pd.DataFrame(skipped, columns=["uuid", "file", "problem"]))
        elif skipped_path.exists():
            skipped_path.unlink()  # a stale list from an earlier run into this folder
        log.info("wrote %s: %d volume(s)%s", path, len(table),
                 f"; {len(skipped)} skipped, listed in {skipped_path}" if skipped else "")
