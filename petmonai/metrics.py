"""Classification metrics with MCI as the positive class."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score, roc_auc_score


def classification_metrics(labels, probs, threshold: float = 0.5) -> dict:
    """ROC AUC, balanced accuracy, sensitivity, specificity, F1 (MCI positive), macro F1.

    >>> classification_metrics([0, 1, 1], [0.2, 0.7, 0.4])["roc_auc"]
    1.0
    """
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probs, dtype=float)
    pred = (p >= threshold).astype(int)
    both = len(np.unique(y)) == 2
    return {
        "n": int(len(y)),
        "roc_auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if both else float("nan"),
        "sensitivity": float(recall_score(y, pred, pos_label=1, zero_division=0)),
        "specificity": float(recall_score(y, pred, pos_label=0, zero_division=0)),
        "f1": float(f1_score(y, pred, pos_label=1, zero_division=0)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "threshold": float(threshold),
    }
