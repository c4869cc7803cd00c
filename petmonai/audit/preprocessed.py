"""Properties of the preprocessed volumes, and whether any of them separates the classes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from petmonai.transforms import brain_mask


def volume_properties(volume: torch.Tensor) -> dict:
    """Simple properties of one preprocessed volume that a scanner could leave its mark on."""
    vol = torch.as_tensor(volume).float()[0]
    core = brain_mask(torch.as_tensor(volume))[0]  # one mask for every property below
    v, inside = vol.flatten(), core.flatten()
    outside = v[~inside]
    q = torch.quantile(v[:: max(1, v.numel() // 200_000)], torch.tensor([0.01, 0.99]))
    # high-frequency energy inside the brain: resolution and noise texture, a scanner fingerprint
    lap = (6 * vol[1:-1, 1:-1, 1:-1] - vol[:-2, 1:-1, 1:-1] - vol[2:, 1:-1, 1:-1] - vol[1:-1, :-2, 1:-1]
           - vol[1:-1, 2:, 1:-1] - vol[1:-1, 1:-1, :-2] - vol[1:-1, 1:-1, 2:])
    inner = core[1:-1, 1:-1, 1:-1]
    texture = float(lap[inner].abs().mean() / vol[core].mean()) if bool(inner.any()) else 0.0
    return {
        "texture": texture,
        "max": float(v.max()), "p99": float(q[1]), "p01": float(q[0]), "brain_fraction": float(inside.float().mean()),
        "background_mean": float(outside.mean()) if len(outside) else 0.0,
        "background_sd": float(outside.std()) if len(outside) > 1 else 0.0,
        "nonzero_fraction": float((v != 0).float().mean()),
    }


def preprocessed_separability(properties: "pd.DataFrame", labels, warn_above: float = 0.8) -> dict:
    """ROC AUC of each property as a class score, folded to >= 0.5 (0.5: no information, 1: the
    property alone separates NC from MCI). Returns ``{"auc": {...}, "warnings": [...]}``."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, dtype=int)
    out, warnings = {}, []
    for col in properties.columns:
        x = pd.to_numeric(properties[col], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(x)
        if len(np.unique(y[ok])) < 2 or len(np.unique(x[ok])) < 2:
            out[col] = 0.5
            continue
        auc = roc_auc_score(y[ok], x[ok])
        out[col] = float(max(auc, 1 - auc))
        if out[col] >= warn_above:
            warnings.append(f"after preprocessing, '{col}' still separates the classes (AUC {out[col]:.2f}): "
                            "a model can use it instead of the disease")
    return {"auc": out, "warnings": warnings, "warn_above": warn_above}
