"""petmonai.studies.calibration: fold models anchored on unlabeled reference scans."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata

from petmonai.studies import anchor, anchored_auc, anchored_out_of_fold, logit, reference_scores, training_scores
from petmonai.training import training_roles
from petmonai.inference import load_run, predict_out_of_fold

from test_inference import tiny  # noqa: F401  (the trained tiny run, a session fixture)


def test_anchor_puts_fold_models_on_one_scale():
    # fold 1's model says "more MCI" by a constant 2 on the logit scale: pooling penalises it
    ref = pd.DataFrame({"repeat": 0, "fold": [0, 0, 0, 1, 1, 1], "prob_mci": 0.0})
    ref["prob_mci"] = 1 / (1 + np.exp(-np.array([-1.0, 0.0, 1.0, 1.0, 2.0, 3.0])))
    held = pd.DataFrame({"repeat": 0, "fold": [0, 0, 1, 1], "label": [0, 1, 0, 1]})
    held["prob_mci"] = 1 / (1 + np.exp(-np.array([-0.5, 0.5, 1.5, 2.5])))
    out = anchor(held, ref)
    assert np.allclose(out["centred"], [-0.5, 0.5, -0.5, 0.5])
    assert np.allclose(out["z"], [-0.5, 0.5, -0.5, 0.5])
    auc = anchored_auc(out)
    assert auc["probability"]["pooled"] == pytest.approx(0.75) and auc["centred"]["pooled"] == 1.0
    with pytest.raises(ValueError, match=r"no reference scores for fold model\(s\) \[\[0, 2\]\]"):
        anchor(pd.concat([held, held.assign(fold=2)]), ref)


def test_anchored_out_of_fold_on_a_run(tiny):
    run, cohort = tiny
    table = anchored_out_of_fold(run, [cohort / "Test"], {"threads": 1})
    oof = predict_out_of_fold(run, {"threads": 1}, progress=False)
    assert np.allclose(table["probability"], [np.mean(p) for p in oof["probs"]])
    for _, fold in table.groupby(["repeat", "fold"]):  # within a fold only the scale changes, not the order
        assert (rankdata(fold["centred"]) == rankdata(fold["probability"])).all()
        assert (rankdata(fold["z"]) == rankdata(fold["probability"])).all()
    ref = reference_scores(load_run(run, {"threads": 1, "folds": "all"}), [cohort / "Test"])
    assert len(ref) == 2 * 12 and set(ref["fold"]) == {0, 1}
    for _, scores in ref.groupby("fold"):  # the reference scans themselves, z-scored: mean 0, sd 1
        z = anchor(scores.assign(label=0), scores)["z"]
        assert z.mean() == pytest.approx(0, abs=1e-9) and z.std() == pytest.approx(1)
    assert np.allclose(logit([0.5, 0.75]), [0.0, np.log(3)])


def test_anchored_on_each_fold_models_training_scans(tiny):
    run, _ = tiny
    table = anchored_out_of_fold(run, None, {"threads": 1})
    for _, fold in table.groupby(["repeat", "fold"]):
        assert (rankdata(fold["z"]) == rankdata(fold["probability"])).all()
    loaded = load_run(run, {"threads": 1, "folds": "all"})
    ref = training_scores(run, loaded)
    folds = pd.read_csv(run / "folds.csv", dtype={"scan_id": str})
    trained = folds[folds["role"] == "train"].sort_values(["fold", "scan_id"])
    assert ref.sort_values(["fold", "scan_id"])[["fold", "scan_id"]].values.tolist() == \
        trained[["fold", "scan_id"]].values.tolist()  # each model's own training scans, none held out
    for fold, scores in ref.groupby("fold"):  # each model's held-out z: relative to its training logits
        held = table[table["fold"] == fold]
        expected = (logit(held["probability"]) - logit(scores["prob_mci"]).mean()) / logit(scores["prob_mci"]).std(ddof=1)
        assert np.allclose(held["z"], expected)
    assert training_roles({"train": {"keep": "last", "train_on_val": True}}) == ("train", "val")
    assert training_roles({"train": {"keep": "best", "train_on_val": True}}) == ("train",)
