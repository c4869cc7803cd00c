"""Classification metrics (the run's second class, MCI by default, is the positive one), subject-bootstrap
confidence intervals, thresholds.

>>> classification_metrics([0, 1, 1], [0.2, 0.7, 0.4])["roc_auc"]
1.0
>>> labels   = [0, 0, 0, 0, 1, 1, 1, 1]
>>> probs    = [0.1, 0.3, 0.2, 0.6, 0.7, 0.4, 0.9, 0.8]
>>> subjects = ["a", "a", "b", "c", "d", "e", "e", "f"]     # a and e were scanned twice
>>> ci = subject_bootstrap(labels, probs, subjects, threshold=0.5, n_boot=1000)
>>> ci["unit"], ci["n_units"]
('subject', 6)
>>> {key: round(value, 2) for key, value in ci["roc_auc"].items()}
{'value': 0.94, 'ci_low': 0.73, 'ci_high': 1.0, 'n_valid': 1000}

Why subjects, not scans: repeated scans of one person are not independent observations. A
bootstrap that resamples scans treats three visits of one healthy volunteer as three pieces of
evidence and gives a confidence interval that is too narrow. :func:`subject_bootstrap` draws
*subjects* with replacement (stratified by class, so every replicate holds both classes) and
keeps all scans of each drawn subject.

Decision threshold: 0.5, or *tuned* per fold on that fold's ``val`` predictions (training
subjects set aside) by :func:`tune_threshold`, then applied to the fold's ``test`` scans.
:func:`fold_thresholds` never looks at ``test`` rows.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import (
    balanced_accuracy_score,
    f1_score,
    recall_score,
    roc_auc_score,
)

from petmonai import CLASS_NAMES
from petmonai.data import class_key, count_key, prob_column
from petmonai.errors import ConfigError, PetmonaiError

METRIC_KEYS = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "f1", "macro_f1")


def metric_labels(classes=CLASS_NAMES) -> dict[str, str]:
    """How a report names each of :data:`METRIC_KEYS` for a run's ``classes`` (negative, positive)."""
    negative, positive = classes
    return {
        "roc_auc": "ROC AUC",
        "balanced_accuracy": "Balanced accuracy",
        "sensitivity": f"Sensitivity ({positive} recall)",
        "specificity": f"Specificity ({negative} recall)",
        "f1": f"F1 ({positive} positive)",
        "macro_f1": "Macro F1 (challenge score)",
    }


METRIC_LABELS = metric_labels()


THRESHOLD_MODES = ("tuned",)


"""Non-numeric values of ``train.threshold``; a number is a fixed threshold."""


def classification_metrics(labels, probs, threshold=0.5) -> dict:
    """ROC AUC, balanced accuracy, sensitivity, specificity, F1 (label 1 positive), macro F1.

    ``threshold`` is one number or one per scan (e.g. each fold's tuned threshold);
    a scan is called positive (label 1, MCI by default) when ``prob >= threshold``.

    >>> classification_metrics([0, 1, 1], [0.2, 0.7, 0.4])["roc_auc"]
    1.0
    """
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probs, dtype=float)
    t = np.broadcast_to(np.asarray(threshold, dtype=float), p.shape)
    pred = (p >= t).astype(int)
    both = len(np.unique(y)) == 2
    return {
        "n": int(len(y)),
        "roc_auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if both else float("nan"),
        "sensitivity": float(recall_score(y, pred, pos_label=1, zero_division=0)) if (y == 1).any() else float("nan"),
        "specificity": float(recall_score(y, pred, pos_label=0, zero_division=0)) if (y == 0).any() else float("nan"),
        "f1": float(f1_score(y, pred, pos_label=1, zero_division=0)),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=[0, 1], zero_division=0)),
        "threshold": float(np.mean(t)) if len(t) else float("nan"),
    }


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _weighted_threshold_metrics(w: np.ndarray, y: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Threshold metrics for every row of the weight matrix ``w`` (replicates x scans)."""
    tp = w @ ((y == 1) & (pred == 1)).astype(float)
    fn = w @ ((y == 1) & (pred == 0)).astype(float)
    tn = w @ ((y == 0) & (pred == 0)).astype(float)
    fp = w @ ((y == 0) & (pred == 1)).astype(float)
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    # sklearn's zero_division=0 convention: an F1 with no predicted and no true positives is 0
    f1_pos = np.nan_to_num(_ratio(2 * tp, 2 * tp + fp + fn), nan=0.0)
    f1_neg = np.nan_to_num(_ratio(2 * tn, 2 * tn + fn + fp), nan=0.0)
    return {
        "balanced_accuracy": (sens + spec) / 2,
        "sensitivity": sens,
        "specificity": spec,
        "f1": f1_pos,
        "macro_f1": (f1_pos + f1_neg) / 2,
    }


def _weighted_auc(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUC per replicate; equals the AUC of the resampled (duplicated) scans."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        return np.full(w.shape[0], np.nan)
    if len(pos) * len(neg) <= 4_000_000:
        diff = p[pos][:, None] - p[neg][None, :]
        pair = (diff > 0).astype(float) + 0.5 * (diff == 0)
        wp, wn = w[:, pos], w[:, neg]
        num = np.einsum("bi,ij,bj->b", wp, pair, wn)
        den = wp.sum(1) * wn.sum(1)
        return _ratio(num, den)
    out = np.full(w.shape[0], np.nan)  # large data: per replicate via sklearn
    for b in range(w.shape[0]):
        keep = w[b] > 0
        if len(np.unique(y[keep])) == 2:
            out[b] = roc_auc_score(y[keep], p[keep], sample_weight=w[b, keep])
    return out


def weighted_metrics(w: np.ndarray, labels, probs, threshold=0.5) -> dict[str, np.ndarray]:
    """All :data:`METRIC_KEYS` for each row of ``w`` (replicates x scans). Weight 0 drops a scan."""
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probs, dtype=float)
    t = np.broadcast_to(np.asarray(threshold, dtype=float), p.shape)
    w = np.atleast_2d(np.asarray(w, dtype=float))
    out = {"roc_auc": _weighted_auc(w, y, p)}
    out.update(_weighted_threshold_metrics(w, y, (p >= t).astype(int)))
    has_pos, has_neg = w @ (y == 1).astype(float) > 0, w @ (y == 0).astype(float) > 0
    out["balanced_accuracy"] = np.where(has_pos & has_neg, out["balanced_accuracy"], np.nan)
    return out


def _unit_counts(units: np.ndarray, unit_labels: np.ndarray | None, n_boot: int, rng) -> np.ndarray:
    """(n_boot x n_units) draw counts: units drawn with replacement, per class when stratified."""
    n = len(units)
    counts = np.zeros((n_boot, n))
    if unit_labels is None:
        counts[:] = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)
        return counts
    for cls in np.unique(unit_labels):
        idx = np.flatnonzero(unit_labels == cls)
        counts[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_boot)
    return counts


def subject_bootstrap(labels, probs, subjects=None, threshold=0.5, groups=None, n_boot: int = 2000,
                      seed: int = 0, confidence: float = 0.95, stratify: bool = True) -> dict:
    """Point estimate and percentile bootstrap CI of every metric, resampling ``subjects``.

    Each replicate draws the subjects with replacement and keeps all scans of a drawn subject
    (a subject drawn twice counts twice). ``subjects=None`` resamples scans instead (each scan its
    own unit; for comparison only). ``stratify``: draw the subjects of each class separately, keeping the
    class sizes, so every replicate has both classes (only when no subject holds both labels).

    ``groups`` (optional, one value per scan, e.g. the repeat or the fold): the statistic is the
    metric computed inside each group, averaged over the groups (NaN groups ignored). This is how
    repeated K-fold (pooled per repeat, averaged) and site-pair (per fold, averaged) summarise.

    Returns ``{metric: {"value", "ci_low", "ci_high", "n_valid"}, "n_boot", "confidence", "unit",
    "n_units"}``; ``n_valid`` counts the replicates where the metric was defined.
    """
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probs, dtype=float)
    t = np.broadcast_to(np.asarray(threshold, dtype=float), p.shape).copy()
    if len(y) != len(p):
        raise PetmonaiError(f"bootstrap: {len(y)} labels but {len(p)} probabilities")
    if len(y) == 0:
        raise PetmonaiError("bootstrap: no predictions to evaluate")
    unit = "subject" if subjects is not None else "scan"
    units_per_scan = np.asarray(subjects).astype(str) if subjects is not None else np.arange(len(y)).astype(str)
    units, inverse = np.unique(units_per_scan, return_inverse=True)
    unit_labels = None
    if stratify:
        per_unit = pd.Series(y).groupby(inverse).agg(lambda s: s.nunique() == 1)
        if per_unit.all():
            unit_labels = pd.Series(y).groupby(inverse).first().to_numpy()
    rng = np.random.default_rng(seed)
    counts = _unit_counts(units, unit_labels, int(n_boot), rng)
    weights = np.vstack([np.ones((1, len(units))), counts])[:, inverse]  # row 0: the data as observed

    group_values = np.zeros(len(y), dtype=int) if groups is None else pd.factorize(np.asarray(groups))[0]
    per_group = []
    for g in np.unique(group_values):
        rows = np.flatnonzero(group_values == g)
        per_group.append(weighted_metrics(weights[:, rows], y[rows], p[rows], t[rows]))
    alpha = (1.0 - confidence) / 2
    out = {"n_boot": int(n_boot), "confidence": confidence, "unit": unit, "n_units": int(len(units)),
           "stratified": unit_labels is not None}
    for key in METRIC_KEYS:
        stacked = np.vstack([g[key] for g in per_group])  # groups x (1 + n_boot)
        with np.errstate(invalid="ignore"), _quiet_nanmean():
            stat = np.nanmean(stacked, axis=0)
        value, reps = stat[0], stat[1:]
        valid = reps[np.isfinite(reps)]
        low, high = (np.quantile(valid, [alpha, 1 - alpha]) if len(valid) >= 10 else (np.nan, np.nan))
        out[key] = {"value": _f(value), "ci_low": _f(low), "ci_high": _f(high), "n_valid": int(len(valid))}
    return out


def paired_auc_difference(labels, probs_a, probs_b, subjects, groups=None, n_boot: int = 2000, seed: int = 0,
                          confidence: float = 0.95) -> dict:
    """AUC(a) - AUC(b) on the same scans, with a percentile CI from one subject bootstrap applied
    to both models (each replicate draws subjects with replacement, within class, and both AUCs
    are computed on that same draw: the pairing removes the variation the models share).

    ``groups`` as in :func:`subject_bootstrap`: the AUC inside each group (repeat, or fold for
    site-pair), averaged over groups, for each model.

    >>> d = paired_auc_difference([0, 0, 1, 1], [.1, .2, .8, .9], [.4, .6, .5, .7], ["a", "b", "c", "d"])
    >>> round(d["value"], 2)
    0.25
    """
    y = np.asarray(labels, dtype=int)
    pa, pb = np.asarray(probs_a, dtype=float), np.asarray(probs_b, dtype=float)
    if not (len(y) == len(pa) == len(pb) == len(subjects)):
        raise PetmonaiError("paired AUC difference: labels, both models' probabilities and subjects differ in length")
    units, inverse = np.unique(np.asarray(subjects).astype(str), return_inverse=True)
    per_unit = pd.Series(y).groupby(inverse)
    unit_labels = per_unit.first().to_numpy() if per_unit.nunique().eq(1).all() else None
    counts = _unit_counts(units, unit_labels, int(n_boot), np.random.default_rng(seed))
    weights = np.vstack([np.ones((1, len(units))), counts])[:, inverse]
    group_values = np.zeros(len(y), dtype=int) if groups is None else pd.factorize(np.asarray(groups))[0]
    a, b = [], []
    for g in np.unique(group_values):
        rows = np.flatnonzero(group_values == g)
        a.append(_weighted_auc(weights[:, rows], y[rows], pa[rows]))
        b.append(_weighted_auc(weights[:, rows], y[rows], pb[rows]))
    with np.errstate(invalid="ignore"), _quiet_nanmean():
        diff = np.nanmean(np.vstack(a), axis=0) - np.nanmean(np.vstack(b), axis=0)
    reps = diff[1:][np.isfinite(diff[1:])]
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha]) if len(reps) >= 10 else (np.nan, np.nan)
    return {"value": _f(diff[0]), "ci_low": _f(low), "ci_high": _f(high), "n_valid": int(len(reps)),
            "n_boot": int(n_boot), "confidence": confidence, "unit": "subject", "n_units": int(len(units)),
            "p_a_not_better": _f(np.mean(reps <= 0)) if len(reps) else float("nan")}


class _quiet_nanmean:
    """Silence numpy's 'Mean of empty slice' (all-NaN columns are expected here)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _f(x) -> float:
    return float(x) if x is not None and np.isfinite(x) else float("nan")


def spread(values) -> dict:
    """Mean, sd, min, max and count of the finite values (e.g. fold AUCs)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    return {
        "mean": float(v.mean()) if len(v) else float("nan"),
        "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
        "min": float(v.min()) if len(v) else float("nan"),
        "max": float(v.max()) if len(v) else float("nan"),
        "n": int(len(v)),
        "n_undefined": int(len(values) - len(v)),
    }


def parse_threshold(value) -> float | str:
    """``train.threshold``: a number in (0, 1) or ``'tuned'``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in THRESHOLD_MODES:
            return text
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"config key 'train.threshold': {value!r} is neither a number in (0, 1) nor "
                              f"'tuned' (chosen on each fold's validation subjects)") from None
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ConfigError(f"config key 'train.threshold': {value} is outside (0, 1)")
    return value


def tune_threshold(labels, probs, default: float = 0.5) -> tuple[float, str]:
    """Threshold maximising balanced accuracy (Youden's J) on validation predictions.

    Candidates are the midpoints between consecutive distinct probabilities (and the default);
    among equally good ones the one closest to ``default`` wins, so a perfectly separated
    validation set does not push the threshold to an extreme. Returns ``(threshold, source)``;
    when the validation scans lack a class it returns ``(default, reason)``.

    >>> threshold, source = tune_threshold([0, 0, 1, 1], [0.1, 0.3, 0.35, 0.9])
    >>> round(threshold, 6), source     # the midpoint of 0.3 and 0.35 (0.32499999999999996 as a float)
    (0.325, 'tuned on validation subjects (max balanced accuracy)')
    >>> tune_threshold([0, 0], [0.1, 0.3])
    (0.5, 'default: validation scans hold one class only')
    """
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probs, dtype=float)
    if len(y) == 0:
        return float(default), "default: no validation scans"
    if len(np.unique(y)) < 2:
        return float(default), "default: validation scans hold one class only"
    values = np.unique(p)
    candidates = np.unique(np.concatenate([(values[:-1] + values[1:]) / 2, [default],
                                           [values[0] - 1e-6, values[-1] + 1e-6]]))
    pred = p[None, :] >= candidates[:, None]
    sens = (pred & (y == 1)).sum(1) / (y == 1).sum()
    spec = (~pred & (y == 0)).sum(1) / (y == 0).sum()
    score = sens + spec
    best = np.flatnonzero(np.isclose(score, score.max()))
    choice = best[np.argmin(np.abs(candidates[best] - default))]
    return float(np.clip(candidates[choice], 1e-6, 1 - 1e-6)), "tuned on validation subjects (max balanced accuracy)"


def fold_thresholds(predictions: pd.DataFrame, labels: pd.DataFrame | pd.Series | dict, mode,
                    classes=CLASS_NAMES) -> dict:
    """Decision threshold of every (repeat, fold) in ``predictions``.

    ``predictions``: rows ``repeat, fold, role, scan_id, prob_<positive>`` (``prob_mci``; test and/or val rows).
    ``labels``: scan_id -> label (a Series/dict, or a frame with ``scan_id, label``).
    ``mode``: a fixed number, or ``'tuned'``: tuned on the fold's ``val`` rows only (the
    fold's ``test`` rows are never read). Returns ``{(repeat, fold): {"threshold", "source"}}``.
    """
    mode = parse_threshold(mode)
    if isinstance(labels, pd.DataFrame):
        labels = labels.set_index("scan_id")["label"]
    labels = pd.Series(labels)
    out = {}
    keys = sorted(set(zip(predictions["repeat"].astype(int), predictions["fold"].astype(int))))
    val = predictions[predictions["role"] == "val"]
    for repeat, fold in keys:
        if mode != "tuned":
            out[(repeat, fold)] = {"threshold": float(mode), "source": "fixed"}
            continue
        part = val[(val["repeat"] == repeat) & (val["fold"] == fold)]
        y = labels.reindex(part["scan_id"]).to_numpy()
        if np.isnan(y.astype(float)).any():
            raise PetmonaiError(f"repeat {repeat} fold {fold}: validation scans without a label")
        thr, source = tune_threshold(y.astype(int), part[prob_column(classes)].to_numpy())
        out[(repeat, fold)] = {"threshold": thr, "source": source}
    return out


def calibration_bins(labels, probs, n_bins: int = 5) -> pd.DataFrame:
    """Reliability table: per probability bin, the mean predicted probability of the positive class, the
    observed fraction of positive scans and the number of scans (equal-width bins over [0, 1]; empty bins dropped)."""
    y = np.asarray(labels, dtype=float)
    p = np.asarray(probs, dtype=float)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = idx == b
        if m.any():
            rows.append({"bin_low": edges[b], "bin_high": edges[b + 1], "mean_predicted": float(p[m].mean()),
                         "observed_fraction": float(y[m].mean()), "n": int(m.sum())})
    return pd.DataFrame(rows, columns=["bin_low", "bin_high", "mean_predicted", "observed_fraction", "n"])


def brier_score(labels, probs) -> float:
    y = np.asarray(labels, dtype=float)
    p = np.asarray(probs, dtype=float)
    return float(np.mean((p - y) ** 2)) if len(y) else math.nan


PROTOCOL_TEXT = {
    "subject": (
        "Subject-grouped stratified K-fold: all scans of one person are on the same side of every fold. "
        "The pooled out-of-fold ROC AUC (95% CI resampling subjects) is the number to quote, with the "
        "caveat that every test site was also seen in training, so a model may still win by recognising "
        "the scanner."),
    "site-pair": (
        "Cross-site: each fold holds out one site that has only {positive} scans and one that has only {negative} "
        "scans "
        "(all such pairs), and trains on the other sites. The model never saw the test scanners. ROC AUC is "
        "computed inside each fold and summarised as mean, sd and min over folds; pooling predictions "
        "across site-pair folds is not meaningful (a scan is tested in several folds, and scores from "
        "different fold models are not on one scale). Quote the mean fold AUC beside the subject-grouped "
        "figure: the gap is how much of that figure was scanner recognition."),
    "scan": (
        "LEAKY naive split by scan: scans of one subject can sit in training and test at once, so the "
        "model is tested on people it has seen. Never quote this number; it exists to show how much "
        "leakage inflates results."),
}


"""Plain-language description of each CV protocol (reports and metrics.json): :func:`protocol_text`."""


def protocol_text(protocol: str, classes=CLASS_NAMES) -> str:
    return PROTOCOL_TEXT.get(protocol, protocol).format(negative=classes[0], positive=classes[1])


def _fold_key(repeat, fold) -> str:
    return f"{int(repeat)}/{int(fold)}"


def _scored_test(predictions: pd.DataFrame, labels: pd.DataFrame, thresholds: dict, column: str) -> pd.DataFrame:
    """The test rows with their labels, subjects and sites, the probability ``column`` as ``prob``, each
    fold's threshold and the call (``pred``)."""
    test = predictions[predictions["role"] == "test"].merge(labels, on="scan_id", how="inner")
    if test.empty:
        raise PetmonaiError("no out-of-fold test predictions to evaluate")
    test["prob"] = test[column]
    test["threshold"] = [thresholds[(int(r), int(f))]["threshold"] for r, f in zip(test["repeat"], test["fold"])]
    test["pred"] = (test["prob"] >= test["threshold"]).astype(int)
    return test


def _per_fold(test: pd.DataFrame, thresholds: dict, fold_info: list[dict] | None, classes) -> list[dict]:
    """Metrics inside each (repeat, fold), with its test sites, class counts and ``fold_info`` extras."""
    info_by_fold = {(int(i["repeat"]), int(i["fold"])): i for i in (fold_info or [])}
    per_fold = []
    for (repeat, fold), part in test.groupby(["repeat", "fold"], sort=True):
        key = (int(repeat), int(fold))
        extra = {k: v for k, v in info_by_fold.get(key, {}).items() if k not in ("predictions", "repeat", "fold")}
        m = classification_metrics(part["label"], part["prob"], part["threshold"])
        per_fold.append({
            "repeat": key[0], "fold": key[1],
            "test_sites": " ".join(sorted(set(part["site"].astype(str)) - {""})),
            "n_subjects": int(part["subject"].nunique()),
            count_key(classes, 1): int((part["label"] == 1).sum()),
            count_key(classes, 0): int((part["label"] == 0).sum()),
            **m, "threshold_source": thresholds[key]["source"], **extra,
        })
    return per_fold


def _pooled(test: pd.DataFrame, per_fold: list[dict], n_boot: int,
            seed: int) -> tuple[dict, dict, dict, dict, list[dict]]:
    """Pooled metrics (per repeat, averaged over repeats), the per-fold summary, both subject-bootstrap
    CIs and the pooled metrics of each repeat: ``(pooled, pooled_ci, fold_summary, fold_mean_ci, per_repeat)``."""
    repeats = [(int(r), p) for r, p in test.groupby("repeat", sort=True)]
    by_repeat = [classification_metrics(p["label"], p["prob"], p["threshold"]) for _, p in repeats]
    pooled = {k: float(np.nanmean([m[k] for m in by_repeat])) if not all(np.isnan(m[k]) for m in by_repeat)
              else float("nan") for k in METRIC_KEYS}
    pooled["n"] = int(round(len(test) / max(1, test["repeat"].nunique())))
    pooled["brier"] = float(np.mean([brier_score(p["label"], p["prob"]) for _, p in test.groupby("repeat")]))
    pooled_ci = subject_bootstrap(test["label"], test["prob"], test["subject"], test["threshold"],
                                  groups=test["repeat"], n_boot=n_boot, seed=seed)
    fold_groups = [_fold_key(r, f) for r, f in zip(test["repeat"], test["fold"])]
    fold_mean_ci = subject_bootstrap(test["label"], test["prob"], test["subject"], test["threshold"],
                                     groups=fold_groups, n_boot=n_boot, seed=seed)
    fold_summary = {k: spread([f[k] for f in per_fold]) for k in METRIC_KEYS}
    for key in METRIC_KEYS:  # the same point estimates everywhere (the bootstrap's own agree up to rounding)
        pooled_ci[key]["value"] = pooled[key]
        fold_mean_ci[key]["value"] = fold_summary[key]["mean"]
    per_repeat = [{"repeat": r, **m} for (r, _), m in zip(repeats, by_repeat)]
    return pooled, pooled_ci, fold_summary, fold_mean_ci, per_repeat


def _per_site(test: pd.DataFrame, classes) -> list[dict]:
    """Per test site: its classes, counts, mean probability (``mean_prob_<positive>``), how often it was called
    positive (``called_<positive>``) and was right."""
    positive = class_key(classes[1])
    per_site = []
    for site, part in test.groupby("site", sort=True):
        per_site.append({
            "site": str(site) or "(unknown)",
            "classes": "/".join(c for v, c in enumerate(classes) if (part["label"] == v).any()),
            "n_scans": int(part["scan_id"].nunique()), "n_subjects": int(part["subject"].nunique()),
            "n_evaluations": int(len(part)),
            f"mean_prob_{positive}": float(part["prob"].mean()),
            f"called_{positive}": float(part["pred"].mean()),
            "accuracy": float((part["pred"] == part["label"]).mean()),
            **({"roc_auc": float(roc_auc_score(part["label"], part["prob"]))}
               if part["label"].nunique() == 2 else {"roc_auc": float("nan")}),
        })
    return per_site


def _headline(protocol: str, leaky: bool, pooled: dict, pooled_ci: dict, fold_summary: dict,
              fold_mean_ci: dict) -> dict:
    """The number to quote for the protocol: the mean fold AUC (site-pair) or the pooled AUC, with its CI."""
    if protocol == "site-pair":
        fa = fold_summary["roc_auc"]
        ci = fold_mean_ci["roc_auc"]
        return {
            "metric": "roc_auc", "statistic": "mean over folds", "value": fa["mean"], "sd": fa["sd"],
            "min": fa["min"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "n_folds": fa["n"],
            "text": f"mean fold ROC AUC {fa['mean']:.2f} (sd {fa['sd']:.2f}, min {fa['min']:.2f}, "
                    f"{fa['n']} site-pair folds; subject-bootstrap 95% CI of the mean "
                    f"{ci['ci_low']:.2f}-{ci['ci_high']:.2f})",
        }
    ci = pooled_ci["roc_auc"]
    return {
        "metric": "roc_auc", "statistic": "pooled out-of-fold", "value": pooled["roc_auc"],
        "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
        "text": ("LEAKY " if leaky else "") + f"pooled out-of-fold ROC AUC {pooled['roc_auc']:.2f} "
                f"(95% CI {ci['ci_low']:.2f}-{ci['ci_high']:.2f}, resampling "
                f"{pooled_ci['n_units']} subjects)",
    }


def _cv_notes(protocol: str, leaky: bool, mode, thresholds: dict) -> list[str]:
    notes = []
    if leaky:
        notes.append("LEAKY: scan-level split; scans of one subject are on both sides of folds. Do not quote.")
    if protocol == "site-pair":
        notes.append("Pooled metrics across site-pair folds are not meaningful (scans are tested in several folds; "
                     "scores of different fold models are not on one scale); use the per-fold summary.")
    if mode == "tuned":
        fallback = [f"{k[0]}/{k[1]}" for k, v in thresholds.items() if v["source"].startswith("default")]
        if fallback:
            notes.append(f"threshold fell back to 0.5 in fold(s) {', '.join(fallback)}: their validation "
                         "scans held one class only")
    return notes


def evaluate_cv(predictions: pd.DataFrame, datalist: pd.DataFrame, protocol: str, threshold=0.5,
                fold_info: list[dict] | None = None, n_boot: int = 2000, seed: int = 0,
                leaky_protocols=("scan",), classes=CLASS_NAMES) -> dict:
    """Everything ``metrics.json`` holds, from out-of-fold predictions.

    ``classes``: the run's two classes, negative first; they name the probability column
    (:func:`petmonai.data.classes.prob_column`) and the per-class entries.
    ``predictions``: rows ``repeat, fold, role, scan_id, prob_<positive>`` with ``role`` ``test`` (the
    evaluated scans) and optionally ``val`` (needed when ``threshold='tuned'``).
    ``datalist``: ``scan_id, label, subject, site`` of the labelled scans.
    ``fold_info``: optional per-fold extras (epochs, timings) merged into ``per_fold``.

    Pooled metrics are computed per repeat over all out-of-fold test predictions and averaged
    over repeats (each repeat's in ``per_repeat``, their AUCs' spread in ``repeat_auc``); per-fold metrics
    inside each fold. CIs: :func:`subject_bootstrap` (subjects,
    stratified by class). ``headline`` names the number to quote for the protocol.
    """
    leaky = protocol in leaky_protocols
    mode = parse_threshold(threshold)
    labels = datalist[["scan_id", "label", "subject", "site"]].drop_duplicates("scan_id")
    thresholds = fold_thresholds(predictions, labels, mode, classes)
    test = _scored_test(predictions, labels, thresholds, prob_column(classes))
    per_fold = _per_fold(test, thresholds, fold_info, classes)
    pooled, pooled_ci, fold_summary, fold_mean_ci, per_repeat = _pooled(test, per_fold, n_boot, seed)
    fold_thr = [thresholds[k]["threshold"] for k in sorted(thresholds)]
    return {
        "protocol": protocol,
        "protocol_description": protocol_text(protocol, classes),
        "leaky": leaky,
        "classes": list(classes),
        "positive_class": classes[1],
        "threshold": float(mode) if mode != "tuned" else float(np.mean(fold_thr)),
        "threshold_mode": "tuned" if mode == "tuned" else "fixed",
        "fold_thresholds": {_fold_key(*k): v for k, v in sorted(thresholds.items())},
        "headline": _headline(protocol, leaky, pooled, pooled_ci, fold_summary, fold_mean_ci),
        "pooled": pooled,
        "pooled_meaningful": protocol != "site-pair",
        "pooled_ci": pooled_ci,
        "fold_auc": {k: fold_summary["roc_auc"][k] for k in ("mean", "sd", "min", "max", "n")},
        "fold_summary": fold_summary,
        "fold_mean_ci": fold_mean_ci,
        "repeat_auc": {k: v for k, v in spread([m["roc_auc"] for m in per_repeat]).items() if k != "n_undefined"},
        "per_repeat": per_repeat,  # pooled out-of-fold metrics of each repeat ("pooled": their mean)
        "per_fold": per_fold,
        "per_site": _per_site(test, classes),
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "unit": "subject", "stratified_by_class":
                      bool(pooled_ci.get("stratified")), "confidence": 0.95, "method": "percentile"},
        "notes": _cv_notes(protocol, leaky, mode, thresholds),
    }


def scored_predictions(predictions: pd.DataFrame, metrics: dict) -> pd.DataFrame:
    """Test predictions with the threshold each fold applied, the called label (``pred_label``) and
    the CV protocol (``cv_protocol``; ``scan (LEAKY)`` for the leaky one, so no file hides it)."""
    thr = metrics.get("fold_thresholds", {})
    out = predictions.copy()
    out["threshold"] = [thr.get(_fold_key(r, f), {}).get("threshold", metrics["threshold"])
                        for r, f in zip(out["repeat"], out["fold"])]
    negative, positive = metrics.get("classes") or CLASS_NAMES  # metrics.json written before "classes": NC/MCI
    out["pred_label"] = np.where(out[prob_column((negative, positive))] >= out["threshold"], positive, negative)
    out["cv_protocol"] = metrics["protocol"] + (" (LEAKY)" if metrics.get("leaky") else "")
    return out
