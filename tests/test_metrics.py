"""Metrics, subject-bootstrap confidence intervals and decision thresholds."""

import numpy as np
import pandas as pd
import pytest

from petmonai.errors import ConfigError
from petmonai.evaluation import METRIC_KEYS, calibration_bins, classification_metrics, evaluate_cv, fold_thresholds, parse_threshold, spread, subject_bootstrap, tune_threshold, weighted_metrics


def test_classification_metrics_known_values():
    m = classification_metrics([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.4], threshold=0.5)
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["sensitivity"] == pytest.approx(0.5) and m["specificity"] == pytest.approx(0.5)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5) and m["macro_f1"] == pytest.approx(0.5)
    # per-scan thresholds (each fold its own)
    m2 = classification_metrics([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.4], threshold=[0.5, 0.65, 0.5, 0.3])
    assert m2["sensitivity"] == 1.0 and m2["specificity"] == 1.0


def test_weighted_metrics_equal_metrics_of_duplicated_scans():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 30)
    p = np.round(rng.uniform(size=30), 1)  # ties on purpose
    w = rng.integers(0, 4, 30)
    w[np.flatnonzero(y == 1)[0]] = 1
    w[np.flatnonzero(y == 0)[0]] = 1
    got = weighted_metrics(w[None, :], y, p, 0.5)
    want = classification_metrics(np.repeat(y, w), np.repeat(p, w), 0.5)
    for key in METRIC_KEYS:
        assert got[key][0] == pytest.approx(want[key]), key


def _repeated_subject_data():
    """10 MCI subjects with one scan each; NC: one subject scanned 20 times (all high-ish scores)
    and 5 subjects with one scan each."""
    rng = np.random.default_rng(0)
    labels = [1] * 10 + [0] * 20 + [0] * 5
    subjects = [f"m{i}" for i in range(10)] + ["nc-repeated"] * 20 + [f"n{i}" for i in range(5)]
    probs = list(rng.uniform(0.4, 0.9, 10)) + list(0.7 + rng.normal(0, 0.02, 20)) + list(rng.uniform(0.1, 0.5, 5))
    return np.array(labels), np.array(probs), np.array(subjects)


def test_bootstrap_resamples_subjects_not_scans():
    y, p, subjects = _repeated_subject_data()
    by_subject = subject_bootstrap(y, p, subjects, n_boot=1000, seed=0)
    by_scan = subject_bootstrap(y, p, None, n_boot=1000, seed=0)
    assert by_subject["unit"] == "subject" and by_subject["n_units"] == 16
    assert by_scan["unit"] == "scan" and by_scan["n_units"] == 35
    width = {name: r["roc_auc"]["ci_high"] - r["roc_auc"]["ci_low"] for name, r in
             (("subject", by_subject), ("scan", by_scan))}
    # 20 scans of one person are one piece of evidence: the honest interval is much wider
    assert width["subject"] > 1.2 * width["scan"], width
    # the point estimate is the plain metric of the data as observed
    assert by_subject["roc_auc"]["value"] == pytest.approx(classification_metrics(y, p)["roc_auc"])
    for key in METRIC_KEYS:
        r = by_subject[key]
        assert r["ci_low"] <= r["value"] + 1e-9 and r["value"] <= r["ci_high"] + 1e-9, key


def test_bootstrap_keeps_all_scans_of_a_drawn_subject():
    # two subjects, each with scans of identical score; any replicate is a mix of whole subjects
    y = np.array([1, 1, 1, 0, 0, 0])
    p = np.array([0.9, 0.9, 0.9, 0.2, 0.2, 0.2])
    out = subject_bootstrap(y, p, ["a", "a", "a", "b", "b", "b"], n_boot=200, seed=3)
    assert out["stratified"] and out["roc_auc"]["ci_low"] == 1.0 and out["roc_auc"]["n_valid"] == 200


def test_bootstrap_is_reproducible_and_groups_average():
    y, p, subjects = _repeated_subject_data()
    a = subject_bootstrap(y, p, subjects, n_boot=300, seed=5)
    b = subject_bootstrap(y, p, subjects, n_boot=300, seed=5)
    assert a == b
    groups = np.arange(len(y)) % 2
    g = subject_bootstrap(y, p, subjects, groups=groups, n_boot=50, seed=5)
    want = np.mean([classification_metrics(y[groups == k], p[groups == k])["roc_auc"] for k in (0, 1)])
    assert g["roc_auc"]["value"] == pytest.approx(want)


def test_tune_threshold_maximises_balanced_accuracy():
    thr, source = tune_threshold([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.35, 0.9])
    assert 0.3 < thr < 0.35 and source.startswith("tuned")
    assert tune_threshold([1, 1], [0.2, 0.9]) == (0.5, "default: validation scans hold one class only")
    assert tune_threshold([], [])[0] == 0.5
    # a perfectly separable validation set: the optimum nearest the default, not an extreme
    thr, _ = tune_threshold([0, 1], [0.05, 0.95])
    assert thr == 0.5


def _fold_predictions():
    rows = []
    for fold in (0, 1):
        rows += [{"repeat": 0, "fold": fold, "role": "val", "scan_id": f"v{fold}{i}", "prob_mci": pv}
                 for i, pv in enumerate([0.1, 0.2, 0.25 + 0.1 * fold, 0.3 + 0.1 * fold])]
        rows += [{"repeat": 0, "fold": fold, "role": "test", "scan_id": f"t{fold}{i}", "prob_mci": pt}
                 for i, pt in enumerate([0.05, 0.6, 0.3, 0.95])]
    preds = pd.DataFrame(rows)
    labels = {s: lab for fold in (0, 1) for s, lab in zip([f"v{fold}{i}" for i in range(4)], [0, 0, 1, 1])}
    labels.update({s: lab for fold in (0, 1) for s, lab in zip([f"t{fold}{i}" for i in range(4)], [0, 0, 1, 1])})
    return preds, labels


def test_threshold_tuning_reads_only_validation_predictions():
    preds, labels = _fold_predictions()
    tuned = fold_thresholds(preds, labels, "tuned")
    assert tuned[(0, 0)]["threshold"] == pytest.approx(0.225)
    assert tuned[(0, 1)]["threshold"] == pytest.approx(0.275)
    # scrambling the test scans' scores and labels changes nothing
    scrambled = preds.copy()
    test = scrambled["role"] == "test"
    scrambled.loc[test, "prob_mci"] = scrambled.loc[test, "prob_mci"].to_numpy()[::-1]
    flipped = {s: (1 - v if s.startswith("t") else v) for s, v in labels.items()}
    assert fold_thresholds(scrambled, flipped, "tuned") == tuned
    # without validation rows there is nothing to tune on: the default, never the test scans
    only_test = preds[preds["role"] == "test"]
    assert all(v["threshold"] == 0.5 and v["source"].startswith("default")
               for v in fold_thresholds(only_test, labels, "tuned").values())
    assert all(v == {"threshold": 0.4, "source": "fixed"} for v in fold_thresholds(preds, labels, 0.4).values())


def test_evaluate_cv_applies_each_folds_tuned_threshold_to_its_test_scans():
    preds, labels = _fold_predictions()
    datalist = pd.DataFrame({"scan_id": list(labels), "label": list(labels.values()),
                             "subject": list(labels), "site": "s"})
    m = evaluate_cv(preds, datalist, "subject", "tuned", n_boot=50)
    assert m["threshold_mode"] == "tuned"
    assert m["fold_thresholds"]["0/0"]["threshold"] == pytest.approx(0.225)
    assert m["threshold"] == pytest.approx((0.225 + 0.275) / 2)
    fold0 = next(f for f in m["per_fold"] if f["fold"] == 0)
    # test scores 0.05, 0.6, 0.3, 0.95 (NC, NC, MCI, MCI) at 0.225: one NC wrongly called MCI
    assert fold0["specificity"] == 0.5 and fold0["sensitivity"] == 1.0
    fixed = evaluate_cv(preds, datalist, "subject", 0.5, n_boot=50)
    assert fixed["threshold"] == 0.5 and fixed["threshold_mode"] == "fixed"


def test_evaluate_cv_protocol_summaries():
    rng = np.random.default_rng(2)
    rows, data = [], []
    for fold in range(4):
        for i in range(6):
            sid = f"s{fold}_{i}"
            label = i % 2
            data.append({"scan_id": sid, "label": label, "subject": sid, "site": f"site{fold}{label}"})
            rows.append({"repeat": 0, "fold": fold, "role": "test", "scan_id": sid,
                         "prob_mci": float(np.clip(0.3 + 0.3 * label + rng.normal(0, 0.2), 0, 1))})
    preds, datalist = pd.DataFrame(rows), pd.DataFrame(data)
    sp = evaluate_cv(preds, datalist, "site-pair", 0.5, n_boot=100)
    assert sp["headline"]["statistic"] == "mean over folds" and not sp["pooled_meaningful"]
    assert sp["fold_auc"]["n"] == 4
    assert sp["headline"]["value"] == pytest.approx(np.mean([f["roc_auc"] for f in sp["per_fold"]]))
    assert any("not meaningful" in n for n in sp["notes"])
    scan = evaluate_cv(preds, datalist, "scan", 0.5, n_boot=100)
    assert scan["leaky"] and scan["headline"]["text"].startswith("LEAKY")
    subj = evaluate_cv(preds, datalist, "subject", 0.5, n_boot=100)
    assert not subj["leaky"] and subj["headline"]["statistic"] == "pooled out-of-fold"
    assert {s["site"] for s in subj["per_site"]} == set(datalist["site"])


def test_parse_threshold():
    assert parse_threshold(0.3) == 0.3 and parse_threshold("tuned") == "tuned" and parse_threshold("0.4") == 0.4
    for bad in ("best", 1.5, 0):
        with pytest.raises(ConfigError):
            parse_threshold(bad)


def test_spread_and_calibration():
    s = spread([0.2, 0.4, float("nan")])
    assert s["mean"] == pytest.approx(0.3) and s["min"] == 0.2 and s["n"] == 2 and s["n_undefined"] == 1
    table = calibration_bins([0, 0, 1, 1], [0.1, 0.15, 0.85, 0.95], n_bins=5)
    assert list(table["n"]) == [2, 2] and list(table["observed_fraction"]) == [0.0, 1.0]
