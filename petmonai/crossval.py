"""Cross-validated training: one model per fold, out-of-fold predictions, pooled metrics.

>>> result = run_cross_validation(cfg, datalist, run_dir, device)
>>> result["metrics"]["pooled"]["roc_auc"]

Per fold the model trains on the ``train`` scans, picks its best epoch and stops early on the
``val`` scans (training subjects set aside), and is then evaluated once on the ``test`` scans,
which it never influenced.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import DataLoader
from monai.utils import set_determinism

from petmonai.data import train_rows
from petmonai.datasets import VolumeCache
from petmonai.engine import BEST_CHECKPOINT, build_engines, load_weights, predict_probabilities
from petmonai.metrics import classification_metrics
from petmonai.models import build_model, count_parameters
from petmonai.runs import atomic_write_csv, atomic_write_json, get_logger
from petmonai.splits import LEAKY_PROTOCOLS, fold_ids, fold_members, load_folds, make_folds
from petmonai.transforms import build_pipelines

log = get_logger("cv")


def fold_dir_name(repeat: int, fold: int) -> str:
    return f"fold_{fold}" if repeat == 0 else f"repeat_{repeat}/fold_{fold}"


def build_cache(cfg: dict, datalist: pd.DataFrame, preprocess) -> VolumeCache:
    items = [{"image": r.image, "label": int(r.label), "scan_id": r.scan_id} for r in datalist.itertuples()]
    t0 = time.perf_counter()
    cache = VolumeCache(items, preprocess, num_workers=cfg["data"].get("cache_workers", 2),
                        skip_bad=cfg["data"].get("skip_bad", False))
    log.info("preprocessed %d volumes once into the cache in %.1fs (%d skipped)",
             len(cache), time.perf_counter() - t0, len(cache.skipped))
    return cache


def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      pin_memory=device.type == "cuda", generator=generator if shuffle else None,
                      persistent_workers=num_workers > 0,
                      drop_last=shuffle and len(dataset) % batch_size == 1)  # batch norm needs 2+ samples


def train_fold(cfg: dict, cache: VolumeCache, augment, folds: pd.DataFrame, repeat: int, fold: int,
               run_dir: Path, device: torch.device) -> dict:
    """Train one fold; returns its test/val predictions and timing."""
    tcfg = cfg["train"]
    seed = int(cfg["seed"]) + 100 * repeat + fold
    set_determinism(seed=seed)
    augment.set_random_state(seed=seed)
    ids = {role: fold_members(folds, repeat, fold, role) for role in ("train", "val", "test")}
    out_dir = run_dir / fold_dir_name(repeat, fold)
    out_dir.mkdir(parents=True, exist_ok=True)

    workers = int(tcfg.get("num_workers", 0))
    train_loader = make_loader(cache.subset(ids["train"], augment), int(tcfg["batch_size"]), True, workers, device, seed)
    val_loader = (make_loader(cache.subset(ids["val"]), int(tcfg["batch_size"]), False, 0, device)
                  if ids["val"] else None)
    net = build_model(cfg["model"], cfg).to(device)
    trainer, evaluator = build_engines(net, train_loader, val_loader, out_dir, tcfg, device)
    log.info("repeat %d fold %d: %d train / %d val / %d test scans", repeat, fold,
             len(ids["train"]), len(ids["val"]), len(ids["test"]))
    t0 = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - t0

    load_weights(net, out_dir / BEST_CHECKPOINT, device)
    preds = []
    for role in ("test", "val"):
        if not ids[role]:
            continue
        loader = make_loader(cache.subset(ids[role]), int(tcfg["batch_size"]), False, 0, device)
        probs = predict_probabilities(net, loader, device, bool(tcfg.get("amp", True)))
        preds.append(pd.DataFrame({"repeat": repeat, "fold": fold, "role": role, "scan_id": ids[role],
                                   "prob_mci": probs}))
    best_epoch = getattr(evaluator.state, "best_metric_epoch", trainer.state.epoch) if evaluator else trainer.state.epoch
    best_val_auc = float(evaluator.state.best_metric) if evaluator else float("nan")
    return {
        "predictions": pd.concat(preds, ignore_index=True),
        "epochs_run": int(trainer.state.epoch),
        "best_epoch": int(best_epoch),
        "best_val_auc": best_val_auc,
        "train_seconds": seconds,
        "train_volumes": len(ids["train"]) * int(trainer.state.epoch),
        "parameters": count_parameters(net),
    }


def summarise(predictions: pd.DataFrame, datalist: pd.DataFrame, protocol: str, threshold: float,
              fold_info: list[dict]) -> dict:
    """Pooled out-of-fold metrics (per repeat, then averaged) and per-fold metrics."""
    test = predictions[predictions["role"] == "test"].merge(
        datalist[["scan_id", "label", "subject", "site"]], on="scan_id")
    per_fold = []
    for info in fold_info:
        part = test[(test["repeat"] == info["repeat"]) & (test["fold"] == info["fold"])]
        per_fold.append({**{k: v for k, v in info.items() if k != "predictions"},
                         **classification_metrics(part["label"], part["prob_mci"], threshold)})
    pooled_by_repeat = [classification_metrics(p["label"], p["prob_mci"], threshold) for _, p in test.groupby("repeat")]
    keys = ["roc_auc", "balanced_accuracy", "sensitivity", "specificity", "f1", "macro_f1"]
    pooled = {k: float(np.mean([m[k] for m in pooled_by_repeat])) for k in keys}
    pooled["n"] = int(len(test) / max(1, test["repeat"].nunique()))
    fold_auc = [f["roc_auc"] for f in per_fold if not np.isnan(f["roc_auc"])]
    return {
        "protocol": protocol,
        "leaky": protocol in LEAKY_PROTOCOLS,
        "positive_class": "MCI",
        "threshold": threshold,
        "pooled": pooled,
        "fold_auc": {"mean": float(np.mean(fold_auc)) if fold_auc else float("nan"),
                     "sd": float(np.std(fold_auc, ddof=1)) if len(fold_auc) > 1 else float("nan"),
                     "min": float(np.min(fold_auc)) if fold_auc else float("nan")},
        "per_fold": per_fold,
    }


def run_cross_validation(cfg: dict, datalist: pd.DataFrame, run_dir: str | Path, device: torch.device) -> dict:
    """Preprocess once, make (or reuse) folds, train every fold, write predictions and metrics."""
    run_dir = Path(run_dir)
    train = train_rows(datalist)
    preprocess, augment = build_pipelines(cfg)
    cache = build_cache(cfg, train, preprocess)
    if cache.skipped:
        atomic_write_csv(run_dir / "skipped.csv", pd.DataFrame(cache.skipped))
        log.warning("skipped %d unreadable volume(s), listed in skipped.csv", len(cache.skipped))
        train = train[train["scan_id"].isin(cache.scan_ids)].reset_index(drop=True)

    cv = cfg["cv"]
    if cv.get("folds_file"):
        folds = load_folds(cv["folds_file"], train)
        protocol = str(folds.attrs.get("protocol", cv["protocol"]))
    else:
        protocol = cv["protocol"]
        folds = make_folds(train, protocol, int(cv["folds"]), int(cv["repeats"]), int(cfg["seed"]),
                           float(cfg["train"]["val_fraction"]), bool(cv.get("allow_leaky", False)))
    atomic_write_csv(run_dir / "folds.csv", folds)
    if protocol in LEAKY_PROTOCOLS:
        log.warning("CV protocol '%s' is LEAKY: scans of one subject can sit on both sides of a fold", protocol)

    fold_info, predictions = [], []
    for repeat, fold in fold_ids(folds):
        info = train_fold(cfg, cache, augment, folds, repeat, fold, run_dir, device)
        info.update(repeat=repeat, fold=fold)
        predictions.append(info["predictions"])
        fold_info.append(info)
        log.info("repeat %d fold %d: best epoch %d of %d, val AUC %.3f, %.0fs", repeat, fold, info["best_epoch"],
                 info["epochs_run"], info["best_val_auc"], info["train_seconds"])

    preds = pd.concat(predictions, ignore_index=True)
    threshold = float(cfg["train"]["threshold"])
    metrics = summarise(preds, train, protocol, threshold, fold_info)
    test_preds = preds[preds["role"] == "test"].merge(
        train[["scan_id", "uuid", "image", "subject", "site", "label", "class_name"]], on="scan_id")
    test_preds["pred_label"] = np.where(test_preds["prob_mci"] >= threshold, "MCI", "NC")
    atomic_write_csv(run_dir / "oof_predictions.csv", test_preds.drop(columns=["role"]))
    atomic_write_csv(run_dir / "val_predictions.csv", preds[preds["role"] == "val"])
    atomic_write_json(run_dir / "metrics.json", metrics)
    return {"metrics": metrics, "folds": folds, "predictions": test_preds}
