"""Fold models anchored on unlabeled scans: an analysis of the pooled out-of-fold AUC.

Each fold model of a cross-validation ends on its own probability scale, and the pooled out-of-fold
AUC mixes those scales: a fold whose model calls everyone a little more MCI-like lowers it even when
that fold ranks its own scans perfectly. Scoring one set of *unlabeled* scans (for the challenge, its
Test folder) with every fold model gives each model a reference distribution. Its held-out scores,
expressed relative to that distribution (the logit minus its median, or its z-score), are then on a
common scale, and no label is used.

    >>> table = anchored_out_of_fold("runs/real", ["../shared/data/pet2023/Test"])   # doctest: +SKIP
    >>> anchored_auc(table)["z"]["pooled"]                                            # doctest: +SKIP
    0.897

Without an external cohort, each fold model can also be anchored on the scans it was trained on
(:func:`training_scores`; ``anchor_folds.py --training-reference``): a reference every model has,
though one it has fitted.

``scripts/anchor_folds.py`` runs it on a finished run (docs/experiments.md, section "Anchoring").
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from petmonai.inference import (
    LoadedRun,
    collect_inputs,
    load_run,
    model_view_probabilities,
    predict_out_of_fold,
    prepare_all,
    torch_threads,
)
from petmonai.training import training_roles

SCORES = ("probability", "centred", "z")


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def reference_scores(run: LoadedRun, inputs: Sequence[str | Path]) -> pd.DataFrame:
    """P(MCI) of every usable reference scan by every fold model of a loaded ``run`` alone (the mean
    over the run's prediction views): one row per (repeat, fold, uuid). Unusable scans are left out,
    as ``predict.py --skip-bad`` would. Each scan is preprocessed once."""
    prepared, _ = prepare_all(collect_inputs(inputs), run, skip_bad=True)
    rows = []
    with torch_threads(run.options["threads"]):
        for model in run.models:
            for prep in prepared:
                probs = model_view_probabilities(run, model, prep.volume, seed=zlib.crc32(str(prep.item.uuid).encode()))
                rows.append({"repeat": model.repeat, "fold": model.fold, "uuid": prep.item.uuid,
                             "prob_mci": float(probs.mean())})
    return pd.DataFrame(rows)


def mean_view_scores(table: pd.DataFrame) -> pd.DataFrame:
    """``predict_out_of_fold``'s per-view ``probs`` replaced by their mean, ``prob_mci``."""
    table["prob_mci"] = [float(np.mean(p)) for p in table.pop("probs")]
    return table


def training_scores(run_dir: str | Path, run: LoadedRun) -> pd.DataFrame:
    """P(MCI) of every fold model's own training scans (the mean over the run's prediction views):
    one row per (repeat, fold, scan_id), the reference of ``anchored_out_of_fold(..., inputs=None)``."""
    return mean_view_scores(predict_out_of_fold(run_dir, progress=False, run=run, role=training_roles(run.cfg)))


def anchor(held_out: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """``held_out`` (repeat, fold, prob_mci, ...) with ``centred`` (logit minus the fold model's median
    reference logit) and ``z`` (logit standardised by the fold model's reference logits) added."""
    ref = reference.assign(logit=logit(reference["prob_mci"]))
    stats = ref.groupby(["repeat", "fold"])["logit"].agg(median="median", mean="mean", sd="std").reset_index()
    out = held_out.merge(stats, on=["repeat", "fold"], how="left", validate="many_to_one")
    if out["median"].isna().any():
        missing = out.loc[out["median"].isna(), ["repeat", "fold"]].drop_duplicates().values.tolist()
        raise ValueError(f"no reference scores for fold model(s) {missing}")
    held_logit = logit(out["prob_mci"])
    out["probability"] = out["prob_mci"]
    out["centred"] = held_logit - out["median"]
    out["z"] = (held_logit - out["mean"]) / out["sd"]
    return out.drop(columns=["median", "mean", "sd"])


def anchored_out_of_fold(run_dir: str | Path, inputs: Sequence[str | Path] | None,
                         options: dict | None = None) -> pd.DataFrame:
    """Held-out scans of every fold scored by that fold's model (the run's prediction views), with
    the anchored scores of :func:`anchor` on the reference scans ``inputs``, or, with ``inputs=None``,
    on each fold model's own training scans (:func:`training_scores`)."""
    run = load_run(run_dir, {**(options or {}), "folds": "all"}, with_models=True)  # once, for both passes
    oof = mean_view_scores(predict_out_of_fold(run_dir, progress=False, run=run))
    reference = training_scores(run_dir, run) if inputs is None else reference_scores(run, inputs)
    return anchor(oof, reference)


def anchored_auc(table: pd.DataFrame) -> dict:
    """Pooled and per-repeat ROC AUC of each score: the run's probability and the two anchored ones.
    Within one fold every score ranks the scans alike; only the pooling across folds differs."""
    result = {}
    for score in SCORES:
        per_repeat = [float(roc_auc_score(g["label"], g[score])) for _, g in table.groupby("repeat")]
        result[score] = {"pooled": float(roc_auc_score(table["label"], table[score])), "per_repeat": per_repeat}
    return result
