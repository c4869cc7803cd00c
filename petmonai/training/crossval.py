"""Cross-validated training: one model per fold, out-of-fold predictions, pooled metrics.

>>> result = run_cross_validation(cfg, datalist, run_dir, device)  # doctest: +SKIP
>>> result["metrics"]["pooled"]["roc_auc"]  # doctest: +SKIP

Per fold the model trains on the ``train`` scans; with ``train.keep: best`` it picks its best
epoch and stops early on the ``val`` scans (training subjects set aside), with ``train.keep: last``
it keeps its final weights (and ``train.train_on_val`` lets the ``val`` scans train too). It is
then evaluated once on the ``test`` scans, which it never influenced.

Under torchrun every process runs this same code (:mod:`petmonai.training.distributed`): the training
scans of each epoch are split between the ranks, validation and test predictions are gathered,
and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import DataLoader, DistributedSampler, ThreadDataLoader
from monai.utils import set_determinism
from torch.utils.data import RandomSampler

import petmonai.training.distributed as dist
from petmonai.data import (
    LEAKY_PROTOCOLS,
    UntrackedDataset,
    VolumeCache,
    content_order,
    fold_ids,
    fold_members,
    load_folds,
    make_folds,
    prob_column,
    run_classes,
    to_items,
    train_rows,
)
from petmonai.evaluation import evaluate_cv, scored_predictions
from petmonai.models import (
    build_model,
    count_parameters,
    load_weights,
    model_label,
    spatial_dims,
)
from petmonai.runs import (
    BEST_CHECKPOINT,
    FILE_ONLY,
    FOLD_PREDICTIONS,
    FOLD_RESULT,
    RESUME_CHECKPOINT,
    atomic_write_csv,
    atomic_write_json,
    fold_dir_name,
    get_logger,
    record_checkpoint_hash,
)
from petmonai.training.engine import (
    TrainingState,
    build_engines,
    configure_backends,
    cuda_auto_switch,
    memory_format,
    predict_probabilities,
)
from petmonai.training.tracking import attach_fold
from petmonai.transforms import build_evaluation, build_pipelines

log = get_logger("cv")


def volume_store(cfg: dict, preprocess_entries=None):
    """The on-disk volume cache of the config's preprocessing (``data.cache_dir``), keyed by its
    :func:`petmonai.data.volume_store.preprocessing_digest`."""
    from petmonai.config import resolved_entries
    from petmonai.data.volume_store import (
        VolumeStore,
        default_volume_dir,
        preprocessing_digest,
    )

    entries = resolved_entries(cfg, "preprocess") if preprocess_entries is None else preprocess_entries
    digest, description = preprocessing_digest(entries)
    folder = cfg["data"]["cache_dir"]
    root = default_volume_dir() if folder in (None, "default") else Path(folder)
    return VolumeStore(root, digest, description)


def build_cache(cfg: dict, datalist: pd.DataFrame, preprocess) -> VolumeCache:
    """Every scan of ``datalist`` preprocessed once (``data.preprocess_workers`` processes), kept in
    memory or, with ``data.cache: disk``, in the on-disk volume cache and read per step.

    Under torchrun the ranks split the scans: each preprocesses its share into the shared on-disk
    cache, the failures are gathered, and after a barrier every rank reads the others' scans from
    disk (into memory with ``data.cache: memory``): each scan is preprocessed (registered) once."""
    from petmonai.data.volume_store import preprocess_scans, resolve_workers

    items, data = to_items(datalist), cfg["data"]
    workers = resolve_workers(data["preprocess_workers"])
    world = dist.world_size()
    store = volume_store(cfg) if data["cache"] == "disk" or world > 1 else None
    show = bool(cfg["train"]["progress_bar"]) and sys.stderr.isatty() and dist.is_main()
    t0 = time.perf_counter()
    failures, computed = None, 0
    if world > 1:  # this rank's share into the shared store, then every rank knows every failure
        share = dist.shard(list(range(len(items))))
        fill = preprocess_scans([items[i] for i in share], preprocess, workers, store, show,
                                threads=data["cache_workers"])
        mine = {share[i]: problem for i, problem in fill.failures.items()}
        failures = {i: p for part in dist.all_gather_object(mine) for i, p in part.items()}
        computed = sum(dist.all_gather_object(fill.computed))
        dist.barrier()  # every share written before any rank reads the others'
    cache = VolumeCache(items, preprocess, num_workers=data["cache_workers"], skip_bad=data["skip_bad"],
                        workers=workers, store=store, in_memory=data["cache"] == "memory", failures=failures,
                        progress=show)
    cache.computed += computed  # the scans preprocessed now, by every rank
    used = cache.workers if world == 1 else workers
    log.info("preprocessed %d volumes (%d computed now, %d from the %s cache) in %.1fs, %d worker process%s "
             "(%d skipped)", len(cache), cache.computed, len(cache) - cache.computed,
             data["cache"], time.perf_counter() - t0, used, "" if used == 1 else "es", len(cache.skipped))
    return cache


class EpochRandomSampler(RandomSampler):
    """torch's ``RandomSampler`` (no replacement) whose random draws for an epoch all happen when the
    epoch's iteration starts: the same permutations from the same generator, so the same order.

    torch's sampler draws one more permutation (for the ``num_samples % n`` remainder, empty here)
    lazily, when the loader asks past the last index. When the epoch's batches end exactly there
    (``n`` a multiple of the batch size, or one over it with ``drop_last``) that happens only at the
    *next* epoch's start, after the end-of-epoch resumable checkpoint has saved the generator: a
    resumed run skipped that draw and shuffled every later epoch differently. Drawing it up front
    leaves the generator in its final state for the epoch once the first batch is taken (also with
    a prefetch thread, which would otherwise draw it at a moment that races the checkpoint).

    >>> g = torch.Generator().manual_seed(0)
    >>> list(EpochRandomSampler(range(4), generator=g)) == torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()
    True
    """

    def __init__(self, data_source, generator: torch.Generator):
        super().__init__(data_source, replacement=False, generator=generator)

    def __iter__(self):
        n = len(self.data_source)
        order = [i for _ in range(self.num_samples // n) for i in torch.randperm(n, generator=self.generator).tolist()]
        order += torch.randperm(n, generator=self.generator).tolist()[: self.num_samples % n]
        return iter(order)


def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int, device: torch.device, seed: int = 0,
                distributed: bool = False, pin_memory: bool | None = None, prefetch: bool = False):
    """A loader; with ``distributed`` and several processes, this rank's part of ``dataset``:
    training (``shuffle``) through :class:`petmonai.training.distributed.DistributedBatchSampler` (every
    item once per epoch across ranks), evaluation split without padding duplicates.

    ``prefetch`` (with ``num_workers=0``): MONAI's ``ThreadDataLoader``, which builds the next batch
    (the random augmentation of cached volumes) in a background thread while the network trains on
    the current one; same items, same order, same random draws as the plain loader."""
    pin = device.type == "cuda" if pin_memory is None else pin_memory
    world = dist.world_size() if distributed else 1
    loader_class = ThreadDataLoader if prefetch and num_workers == 0 else DataLoader
    if world > 1 and shuffle:
        sampler = dist.DistributedBatchSampler(len(dataset), batch_size, world, dist.rank(), seed)
        # the generator only seeds the loader's workers (their random transforms): different per rank
        workers_seed = torch.Generator().manual_seed(seed + dist.RANK_SEED_STRIDE * dist.rank())
        return loader_class(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin,
                            generator=workers_seed, persistent_workers=False)
    sampler = None
    if world > 1 and len(dataset) >= world:  # (fewer items than ranks: every rank takes them all,
        # which leaves a gathered ROC AUC unchanged: each positive-negative pair counted world^2 times)
        sampler = DistributedSampler(dataset, shuffle=False, even_divisible=False)
    generator = torch.Generator().manual_seed(seed)
    if shuffle:  # torch's shuffling order, with every draw of an epoch made at its start (exact resume)
        sampler = EpochRandomSampler(dataset, generator)
    return loader_class(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin, generator=generator if shuffle else None,
                      persistent_workers=False,  # new workers each epoch, seeded from the loader generator: exact resume
                      drop_last=shuffle and len(dataset) % batch_size == 1)  # batch norm needs 2+ samples


def prefetch_thread(train_cfg: dict, device: torch.device) -> bool:
    """``train.prefetch_thread``: auto = on CUDA only (where the main thread mostly waits for the GPU;
    on a small CPU the thread's augmentation competes with the training step for the cores)."""
    return cuda_auto_switch(train_cfg, "prefetch_thread", device)


class _DeviceView(Sequence):
    """Cached items with their image already on ``device`` (copied there once per fold), each
    returned as a shallow copy: the random augmentation then runs on that device."""

    def __init__(self, cache: VolumeCache, scan_ids, device: torch.device):
        self.items = []
        for sid in scan_ids:
            item = dict(cache[sid])
            item["image"] = torch.as_tensor(item["image"]).to(device)
            self.items.append(item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return dict(self.items[i])


def training_dataset(cache: VolumeCache, scan_ids, augment, device: torch.device, on_device: bool):
    """The augmented training set: random transforms in the loader (CPU, workers), or with
    ``on_device`` (``train.augment_on_device``) on the training device, in the main process.
    The augmentation runs without MONAI's meta-data tracking (:class:`UntrackedDataset`)."""
    if not on_device:
        return cache.subset(scan_ids, augment, track_meta=False)
    missing = [s for s in scan_ids if s not in cache.index]
    if missing:
        cache.subset(missing)  # raises the cache's own error
    return UntrackedDataset(_DeviceView(cache, scan_ids, device), transform=augment)


def training_loader(cache: VolumeCache, scan_ids, augment, train_cfg: dict, device: torch.device, seed: int = 0):
    """The training loader as ``train:`` asks for it: augmentation in the loader (workers, pinned
    memory and a prefetch thread on CUDA) or on the device (``augment_on_device``); this rank's share
    under torchrun."""
    on_device = bool(train_cfg["augment_on_device"])
    dataset = training_dataset(cache, scan_ids, augment, device, on_device)
    workers = 0 if on_device else int(train_cfg["num_workers"])
    return make_loader(dataset, int(train_cfg["batch_size"]), True, workers, device, seed, distributed=True,
                       pin_memory=False if on_device else None, prefetch=prefetch_thread(train_cfg, device))


def test_view_scorer(cfg: dict, device: torch.device):
    """``cv.test_views``: ``evaluator`` scores a held-out scan once, as the training
    evaluator sees it (the whole cached volume; 2D: the ``evaluate`` slices); ``inference`` scores it
    with the prediction views of ``predict.py`` (:class:`petmonai.inference.predictor.HeldOutViews`), so
    out-of-fold metrics describe the predictor users run, one fold model at a time (the setting of
    ``configs/train3d.yaml``)."""
    mode = str(cfg["cv"]["test_views"])
    if mode == "evaluator":
        return None
    from petmonai.inference import HeldOutViews

    return HeldOutViews(cfg, device, amp=bool(cfg["train"]["amp"]))


def _finished_fold(out_dir: Path) -> dict | None:
    if (out_dir / FOLD_PREDICTIONS).is_file() and (out_dir / FOLD_RESULT).is_file():
        return json.loads((out_dir / FOLD_RESULT).read_text())
    return None


def training_roles(cfg: dict) -> tuple[str, ...]:
    """The fold roles (folds.csv) a fold's model trains on: ``train``, and ``val`` too when the run keeps
    its last epoch (``train.keep: last``) with ``train.train_on_val`` (the default config)."""
    train_cfg = cfg["train"]
    keep_last = str(train_cfg["keep"]) == "last"
    return ("train", "val") if keep_last and bool(train_cfg["train_on_val"]) else ("train",)


def train_fold(cfg: dict, cache: VolumeCache, augment, folds: pd.DataFrame, repeat: int, fold: int,
               run_dir: Path, device: torch.device) -> dict:
    """Train one fold (or continue it from its resumable checkpoint); returns its test/val
    predictions and training facts. A finished fold is read back from its folder, not retrained."""
    out_dir = run_dir / fold_dir_name(repeat, fold)
    done = dist.on_main(_finished_fold, out_dir)  # rank 0 reads the run folder
    if done is not None:
        log.info("repeat %d fold %d: already finished, read from %s", repeat, fold, out_dir)
        preds = pd.read_csv(out_dir / FOLD_PREDICTIONS, dtype={"scan_id": str}) if dist.is_main() else None
        return {**done, "predictions": preds}
    seed = int(cfg["seed"]) + 100 * repeat + fold
    set_determinism(seed=seed)
    configure_backends(device, cfg["train"])
    augment.set_random_state(seed=seed + dist.RANK_SEED_STRIDE * dist.rank())  # rank 0: seed
    ids = {role: fold_members(folds, repeat, fold, role) for role in ("train", "val", "test")}
    if "val" in training_roles(cfg):  # nothing needs them: the val scans train too
        ids["train"], ids["val"] = ids["train"] + ids["val"], []
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    net, trainer, evaluator, seconds = _fit_fold(cfg, cache, augment, ids, out_dir, device, seed, (repeat, fold))
    predictions = _held_out_predictions(cfg, cache, net, ids, device, (repeat, fold))
    info = {**_kept_epoch(trainer, evaluator, cfg["train"]), "parameters": count_parameters(net)}
    if dist.is_main():
        _write_fold(run_dir, out_dir, predictions, info, seconds, len(ids["train"]), cfg["train"])
    return {**info, "predictions": predictions}


def _fit_fold(cfg: dict, cache: VolumeCache, augment, ids: dict, out_dir: Path, device: torch.device, seed: int,
              where: tuple[int, int]):
    """Build the fold's loaders, network and engines, restore its resumable state, train what is left and
    load the kept weights (rank 0's on every rank). Returns ``(net, trainer, evaluator, train seconds)``."""
    tcfg = cfg["train"]
    bs = int(tcfg["batch_size"])
    train_loader = training_loader(cache, ids["train"], augment, tcfg, device, seed)
    evaluate = build_evaluation(cfg)  # 2D: evenly spaced slices + centre crop; 3D: None (the cached volume)
    val_loader = (make_loader(cache.subset(ids["val"], evaluate), bs, False, 0, device, distributed=True)
                  if ids["val"] else None)
    net = build_model(cfg["model"], cfg).to(device)
    trainer, evaluator = build_engines(net, train_loader, val_loader, out_dir, tcfg, device)
    attach_fold(trainer, evaluator, *where)  # MLflow, with tracking.mlflow (petmonai.training.tracking)
    state = TrainingState(out_dir / RESUME_CHECKPOINT, trainer, evaluator, augment, train_loader.generator,
                          trainer.history)
    finished = state.restore()
    state.attach(trainer)
    trace = dist.RankTrace.from_env({"repeat": where[0], "fold": where[1]})
    if trace is not None:
        trace.attach(trainer, evaluator)
    log.info("repeat %d fold %d: %d train / %d val / %d test scans%s", *where, len(ids["train"]),
             len(ids["val"]), len(ids["test"]),
             f", resumed after epoch {trainer.state.epoch}" if trainer.state.epoch else "", extra=FILE_ONLY)
    t0 = time.perf_counter()
    if not finished:
        trainer.run()
    seconds = time.perf_counter() - t0
    if dist.is_main():
        load_weights(net, out_dir / BEST_CHECKPOINT, device)
    dist.broadcast_module(net)  # rank 0's best weights on every rank
    if trace is not None:
        trace.record("best", digest=dist.state_digest(net))
    return net, trainer, evaluator, seconds


def _held_out_predictions(cfg: dict, cache: VolumeCache, net: torch.nn.Module, ids: dict, device: torch.device,
                          where: tuple[int, int]) -> pd.DataFrame:
    """P(MCI) of the fold's ``test`` and ``val`` scans by its kept network, as ``cv.test_views`` says
    (each rank scores its share; the shares are gathered)."""
    tcfg = cfg["train"]
    fmt = memory_format(device, tcfg, spatial_dims(net))
    held_out_views = test_view_scorer(cfg, device)
    evaluate = build_evaluation(cfg)
    preds, column = [], prob_column(run_classes(cfg))
    for role in ("test", "val"):
        if not ids[role]:
            continue
        share = dist.shard(ids[role])  # this rank's share
        if held_out_views is not None:  # predict.py's views (windows x flips), by this fold's network
            probs = held_out_views(net, cache.volumes(share))
        else:
            loader = make_loader(cache.subset(share, evaluate), int(tcfg["batch_size"]), False, 0, device)
            # float64 so that predictions read back from predictions.csv (resume) are bit-identical
            probs = predict_probabilities(net, loader, device, bool(tcfg["amp"]), fmt).astype(np.float64)
        if dist.world_size() > 1:
            probs = np.asarray(dist.gather_sharded(probs.tolist()), dtype=np.float64)
        preds.append(pd.DataFrame({"repeat": where[0], "fold": where[1], "role": role, "scan_id": ids[role],
                                   column: probs}))
    return pd.concat(preds, ignore_index=True)


def _kept_epoch(trainer, evaluator, train_cfg: dict) -> dict:
    """The kept epoch and its validation AUC: the best one (``keep: best``), or the final one."""
    kept_epoch, kept_auc = trainer.state.epoch, float("nan")
    if evaluator is not None and str(train_cfg["keep"]) == "best":
        kept_epoch = getattr(evaluator.state, "best_metric_epoch", kept_epoch)
        kept_auc = float(evaluator.state.best_metric)
    elif evaluator is not None:
        kept_auc = float(evaluator.state.metrics.get("val_auc", float("nan")))
    return {"epochs_run": int(trainer.state.epoch), "best_epoch": int(kept_epoch), "best_val_auc": kept_auc}


def _write_fold(run_dir: Path, out_dir: Path, predictions: pd.DataFrame, info: dict, seconds: float, n_train: int,
                train_cfg: dict) -> None:
    """The fold's predictions, timing, its checkpoint's hash (tamper evidence in ``provenance.json``) and
    (last: it marks the fold finished) result; the resumable checkpoint goes unless
    ``train.keep_resume_checkpoint``."""
    atomic_write_csv(out_dir / FOLD_PREDICTIONS, predictions)
    atomic_write_json(out_dir / "timing.json", {"train_seconds": seconds, "processes": dist.world_size(),
                                                "train_volumes": n_train * info["epochs_run"]})
    record_checkpoint_hash(run_dir, out_dir / BEST_CHECKPOINT)
    atomic_write_json(out_dir / FOLD_RESULT, info)  # written last: marks the fold as finished
    if not bool(train_cfg["keep_resume_checkpoint"]):  # ~0.4 GB a fold; a finished fold needs none
        (out_dir / RESUME_CHECKPOINT).unlink(missing_ok=True)


def fold_summary(info: dict, fold_dir: Path, seconds: float) -> str:
    """The console's one line about a finished fold: epochs, final training loss (its ``history.csv``),
    the kept epoch's validation AUC only where one was computed, the held-out scans and the time."""
    epochs = info["epochs_run"]
    parts = [f"repeat {info['repeat']} fold {info['fold']}: {epochs} epoch{'' if epochs == 1 else 's'}"]
    history = fold_dir / "history.csv"
    if history.is_file():
        losses = pd.read_csv(history)["train_loss"].dropna()
        if len(losses):
            parts.append(f"final train loss {losses.iloc[-1]:.3f}")
    if info["best_epoch"] != info["epochs_run"]:
        parts.append(f"kept epoch {info['best_epoch']}")
    if np.isfinite(info.get("best_val_auc", float("nan"))):
        parts.append(f"val AUC {info['best_val_auc']:.3f}")
    preds = info.get("predictions")
    if preds is not None:
        parts.append(f"{int((preds['role'] == 'test').sum())} test scans")
    return ", ".join(parts) + f" ({seconds:.0f}s)"


def summarise(predictions: pd.DataFrame, datalist: pd.DataFrame, protocol: str, threshold,
              fold_info: list[dict], n_boot: int = 2000, seed: int = 0, classes=None) -> dict:
    """Pooled out-of-fold metrics (per repeat, then averaged), per-fold and per-site metrics, each
    with a 95% CI resampling subjects; ``threshold`` a number or ``'tuned'`` (on each fold's ``val``
    predictions); ``classes``: the run's (:func:`petmonai.data.classes.run_classes`). See
    :func:`petmonai.evaluation.metrics.evaluate_cv` for the layout of the result."""
    return evaluate_cv(predictions, datalist, protocol, threshold, fold_info, n_boot=n_boot, seed=seed,
                       leaky_protocols=LEAKY_PROTOCOLS, classes=run_classes(None) if classes is None else classes)


def preprocessed_check(cache: VolumeCache, train: pd.DataFrame, run_dir: Path, preprocess=None,
                       classes=None) -> dict:
    """The audit after preprocessing: does any property of the volumes the network will see (shape,
    intensity range, background, brain fraction) still separate the classes? Writes
    ``preprocessed_check.json`` and warns loudly when one does (the audit did the same for the
    headers before preprocessing). A ``preprocess`` that registers to the template also gets each
    scan's correlation with the template checked and ``registration.png`` (QC montage) written."""
    from petmonai.audit import (
        find_registration,
        preprocessed_separability,
        registration_montage,
        template_correlations,
        volume_properties,
    )

    rows = []
    for sid in cache.scan_ids:
        image = cache[sid]["image"]
        rows.append({"scan_id": sid, "shape": "x".join(map(str, image.shape[1:])), "dtype": str(image.dtype),
                     **volume_properties(image)})
    table = pd.DataFrame(rows)
    labels = train.set_index("scan_id").loc[table["scan_id"], "label"].to_numpy()
    register = find_registration(preprocess)
    registration = None
    if register is not None:
        volumes = cache.volumes()  # read one at a time (data.cache: disk)
        corr = template_correlations(volumes, register)
        table["template_correlation"] = table["scan_id"].map(corr)
        negative, positive = run_classes(None) if classes is None else classes
        names = dict(zip(table["scan_id"], np.where(labels == 1, positive, negative)))
        registration_montage(volumes, register, run_dir / "registration.png", corr, names)
        registration = {"template_correlation": corr, "min": min(corr.values()), "montage": "registration.png"}
    props = table.drop(columns=["scan_id"]).assign(shape=lambda t: pd.factorize(t["shape"])[0],
                                                   dtype=lambda t: pd.factorize(t["dtype"])[0])
    result = preprocessed_separability(props, labels)
    result["n_scans"] = len(table)
    if registration is not None:
        result["registration"] = registration
    atomic_write_json(run_dir / "preprocessed_check.json", result)
    for warning in result["warnings"]:
        log.warning("PREPROCESSED-DATA CHECK: %s", warning)
    worst = max(result["auc"].items(), key=lambda kv: kv[1])
    log.info("preprocessed-data check: the most class-separating volume property is '%s' (AUC %.2f)", *worst)
    return result


def run_cross_validation(cfg: dict, datalist: pd.DataFrame, run_dir: str | Path, device: torch.device,
                         resume: bool = False) -> dict:
    """Preprocess once, make (or reuse) folds, train every fold, write predictions and metrics.

    ``resume=True`` continues a run folder: its own folds, finished folds read back, an
    unfinished fold continued from its resumable checkpoint."""
    run_dir, classes = Path(run_dir), run_classes(cfg)
    train = content_order(train_rows(datalist))  # the same folds and shuffles whatever the layout
    preprocess, augment = build_pipelines(cfg)
    cache = build_cache(cfg, train, preprocess)  # each scan preprocessed once across ranks; each reads them all
    if cache.skipped:
        if dist.is_main():
            atomic_write_csv(run_dir / "skipped.csv", pd.DataFrame(cache.skipped))
        log.warning("skipped %d unreadable volume(s), listed in skipped.csv", len(cache.skipped))
        train = train[train["scan_id"].isin(cache.scan_ids)].reset_index(drop=True)

    if dist.is_main() and not resume:
        preprocessed_check(cache, train, run_dir, preprocess, classes)

    cv = cfg["cv"]

    def decide_folds():
        folds_file = run_dir / "folds.csv" if resume else cv["folds_file"]
        if folds_file:
            folds = load_folds(folds_file, train)
            protocol = str(folds.attrs.get("protocol", cv["protocol"]))
        else:
            protocol = cv["protocol"]
            folds = make_folds(train, protocol, int(cv["folds"]), int(cv["repeats"]), int(cfg["seed"]),
                               float(cfg["train"]["val_fraction"]), bool(cv["allow_leaky"]))
        atomic_write_csv(run_dir / "folds.csv", folds)
        return folds, protocol

    folds, protocol = dist.on_main(decide_folds)  # rank 0 reads and writes; every rank gets its folds
    if dist.world_size() > 1:
        log.info("%d processes (%s): each trains on its share of every epoch's scans", dist.world_size(),
                 torch.distributed.get_backend())
    if protocol in LEAKY_PROTOCOLS:
        log.warning("CV protocol '%s' is LEAKY: scans of one subject can sit on both sides of a fold", protocol)

    fold_info, predictions = [], []
    for repeat, fold in fold_ids(folds):
        t0 = time.perf_counter()
        info = train_fold(cfg, cache, augment, folds, repeat, fold, run_dir, device)
        # the fold's engines, handlers and network reference each other: free their ~0.5 GB (model,
        # optimiser, gradients) now rather than whenever Python's cycle collector happens to run
        gc.collect()
        info.update(repeat=repeat, fold=fold)
        predictions.append(info["predictions"])
        fold_info.append(info)
        log.info(fold_summary(info, run_dir / fold_dir_name(repeat, fold), time.perf_counter() - t0))
    if not dist.is_main():  # rank 0 summarises and writes the results
        return {"metrics": None, "folds": folds, "predictions": None, "reference": None}

    preds = pd.concat(predictions, ignore_index=True)
    n_boot, threshold = int(cfg["report"]["bootstrap"]), cfg["train"]["threshold"]
    metrics = summarise(preds, train, protocol, threshold, fold_info, n_boot=n_boot, seed=int(cfg["seed"]),
                        classes=classes)
    scorer = test_view_scorer(cfg, device)
    metrics["test_views"] = ({"mode": "inference", **scorer.describe(cache[cache.scan_ids[0]]["image"].shape)}
                             if scorer is not None else {"mode": "evaluator"})
    test_preds = scored_predictions(preds[preds["role"] == "test"], metrics).merge(
        train[["scan_id", "uuid", "image", "subject", "site", "label", "class_name"]], on="scan_id")
    atomic_write_csv(run_dir / "oof_predictions.csv", test_preds.drop(columns=["role"]))
    atomic_write_csv(run_dir / "val_predictions.csv", preds[preds["role"] == "val"])
    atomic_write_json(run_dir / "metrics.json", metrics)
    log.info("%s: %s", model_label(cfg["model"]), metrics["headline"]["text"])

    reference = None
    if cfg["report"]["reference_model"]:
        from petmonai.evaluation import run_reference_cv

        try:  # the CNN's results are written; a failing reference must not lose them
            reference = run_reference_cv(cfg, train, folds, run_dir / "reference", protocol=protocol)
        except Exception as err:  # reported, and the report says the reference is missing
            log.error("reference model failed (%s: %s); add it later with: python scripts/report.py %s --reference",
                      type(err).__name__, err, run_dir)
    return {"metrics": metrics, "folds": folds, "predictions": test_preds, "reference": reference}
