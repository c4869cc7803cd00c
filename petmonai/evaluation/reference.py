"""The classical reference model: resample to 4 mm, flatten, PCA + logistic regression (no GPU).

It runs on the same folds (``folds.csv``) as the CNN and is evaluated on the same ``test`` scans.
It is fitted on all training subjects of a fold (roles ``train`` and ``val``: it has no epochs to
choose, so it needs no validation set). With ``train.threshold: tuned`` a twin fitted on ``train``
only predicts the ``val`` scans, and the threshold is tuned on those out-of-sample predictions.
Its outputs have the CNN's formats, in ``<run>/reference/``: ``oof_predictions.csv``,
``val_predictions.csv`` and ``metrics.json``, so every report shows both side by side::

    >>> from petmonai.evaluation.reference import run_reference_cv
    >>> result = run_reference_cv(cfg, train_datalist, folds, "runs/x/reference")  # doctest: +SKIP
    >>> result["metrics"]["headline"]["text"]  # doctest: +SKIP

Preprocessing (``reference.preprocessing`` in the config):

- ``resample`` (default): the plain resample the data README describes. Each raw volume is
  oriented to RAS, resampled to 4 mm voxels and centre padded/cropped to one grid that holds
  the largest field of view ([84, 84, 40] voxels = 336 x 336 x 160 mm); the intensities are left
  as stored. No brain crop and no intensity normalisation, so field of view, data type and
  calibration stay visible, as they are to any model that is not told to ignore them. This is
  the setting that reproduces the data README's figures (~0.84 subject-grouped, ~0.39
  site-pair): measured 0.86 (5-fold, seed 0) and 0.44 (mean of 24 site-pair folds); see
  docs/protocols.md.
- ``package``: the deterministic preprocessing of the config (what the CNN sees: brain-mean
  intensity scaling, brain crop, ``spatial_size`` grid). It scores 0.64 subject-grouped and 0.63
  site-pair on the same folds: less scanner signature, less in-distribution gain, no collapse.

Model: ``StandardScaler -> PCA(n_components) -> LogisticRegression(C)`` (scikit-learn); defaults
20 components, C=1. Standalone use, e.g. as one model of a comparison script::

    >>> features = reference_features(cfg, train)          # decode once, reuse for several fold tables  # doctest: +SKIP
    >>> run_reference_cv(cfg, train, load_folds("runs/a/folds.csv", train), "runs/b/reference",  # doctest: +SKIP
    ...                  features=features)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from petmonai.errors import ConfigError, PetmonaiError
from petmonai.evaluation.metrics import evaluate_cv, parse_threshold, scored_predictions
from petmonai.runs import atomic_write_csv, atomic_write_json, get_logger

log = get_logger("reference")


PREPROCESSING = ("resample", "package")


FEATURES = ("voxels", "regions")


MODEL_NAME = "PCA + logistic regression (reference)"


def reference_settings(cfg: dict | None = None, **overrides) -> dict:
    """The config's ``reference`` section (``None``: the base config's, ``configs/train3d.yaml``, where
    each setting is explained) with ``overrides``, checked."""
    from petmonai.config import SCHEMA, default_config

    settings = {**(cfg if cfg is not None else default_config())["reference"], **overrides}
    unknown = set(settings) - set(SCHEMA["reference"])
    if unknown:
        raise ConfigError(f"unknown config key(s) reference.{', reference.'.join(sorted(unknown))} "
                          f"(known: {', '.join(SCHEMA['reference'])})")
    if settings["preprocessing"] not in PREPROCESSING:
        raise ConfigError(f"config key 'reference.preprocessing': {settings['preprocessing']!r} "
                          f"(choose from {', '.join(PREPROCESSING)})")
    if settings["features"] not in FEATURES:
        raise ConfigError(f"config key 'reference.features': {settings['features']!r} (choose from {', '.join(FEATURES)})")
    if settings["features"] == "regions" and settings["preprocessing"] != "package":
        raise ConfigError("config key 'reference.features': regions are read on the template grid, so they need "
                          "reference.preprocessing=package and a config that registers (petmonai.transforms.spatial.registration.RegisterToTemplated)")
    k = settings["n_components"]
    if not ((isinstance(k, int) and k >= 1) or (isinstance(k, float) and 0 < k < 1)):
        raise ConfigError(f"config key 'reference.n_components': {k!r} (an integer >= 1 or a fraction in (0, 1))")
    if float(settings["C"]) <= 0:
        raise ConfigError(f"config key 'reference.C': {settings['C']!r} must be > 0")
    for key in ("spacing", "grid"):
        if len(settings[key]) != 3:
            raise ConfigError(f"config key 'reference.{key}': three values (x, y, z) expected")
    return settings


def resample_transforms(spacing, grid):
    """MONAI pipeline of the plain resample: load, RAS, ``spacing`` mm, centre pad/crop to ``grid``."""
    import torch
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        ResizeWithPadOrCropd,
        Spacingd,
    )

    from petmonai.transforms import CheckVolumed

    return Compose([
        LoadImaged(keys="image", image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys="image"),
        CheckVolumed(keys="image"),
        Orientationd(keys="image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys="image", pixdim=list(spacing), mode="bilinear"),
        ResizeWithPadOrCropd(keys="image", spatial_size=list(grid)),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
    ])


def reference_features(cfg: dict, datalist: pd.DataFrame, settings: dict | None = None) -> pd.DataFrame:
    """One row of flattened voxels per scan (index ``scan_id``), preprocessed as ``settings`` say."""
    from petmonai.data import VolumeCache

    settings = settings or reference_settings(cfg)
    if settings["preprocessing"] == "package":
        from petmonai.transforms import build_pipelines

        preprocess, _ = build_pipelines(cfg)
    else:
        preprocess = resample_transforms(settings["spacing"], settings["grid"])
    items = [{"image": r.image, "label": int(r.label), "scan_id": r.scan_id} for r in datalist.itertuples()]
    t0 = time.perf_counter()
    cache = VolumeCache(items, preprocess, num_workers=int(cfg["data"]["cache_workers"]),
                        skip_bad=bool(cfg["data"]["skip_bad"]))
    ids = cache.scan_ids
    X = np.stack([np.asarray(cache[s]["image"], dtype=np.float32).ravel() for s in ids])
    if settings["features"] == "regions":
        X = _region_features(preprocess, X, np.asarray(cache[ids[0]]["image"]).shape[1:], int(settings["regions"]))
    log.info("reference features: %d scans x %d %s (%s preprocessing) in %.1fs", X.shape[0], X.shape[1],
             settings["features"], settings["preprocessing"], time.perf_counter() - t0)
    return pd.DataFrame(X, index=pd.Index(ids, name="scan_id"))


def _region_features(preprocess, X: np.ndarray, grid, n_regions: int) -> np.ndarray:
    """Mean of each template grey-matter parcel, per scan (rows of ``X`` are flattened volumes)."""
    from petmonai.audit import find_registration
    from petmonai.transforms import parcel_means, template_parcels

    register = find_registration(preprocess)
    if register is None:
        raise ConfigError("config key 'reference.features': regions need a config whose preprocess registers the "
                          "scans to the template (petmonai.transforms.spatial.registration.RegisterToTemplated), e.g. "
                          "configs/experiments/register_suvr.yaml")
    labels = template_parcels(n_regions, register.voxel, register.fwhm, grid=grid)
    return np.stack([parcel_means(row, labels) for row in X]).astype(np.float32)


def build_reference_model(settings: dict | None = None, n_samples: int | None = None):
    """The scikit-learn pipeline: (StandardScaler) -> PCA -> LogisticRegression.

    ``n_samples``: the number of training scans; an integer ``n_components`` is capped at
    ``n_samples - 1`` (PCA cannot find more components than that after centring)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    settings = settings or reference_settings()
    steps = [StandardScaler()] if settings["standardize"] else []
    k = settings["n_components"]
    if isinstance(k, int) and n_samples is not None:
        k = max(1, min(k, n_samples - 1))
    steps += [PCA(n_components=k, svd_solver="full"),
              LogisticRegression(C=float(settings["C"]), max_iter=10000)]
    return make_pipeline(*steps)


def _limit_threads():
    """BLAS threads: one per core is fastest for these small matrices and fair to a shared machine."""
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=1)
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        import contextlib

        return contextlib.nullcontext()


def _predict(model, features: pd.DataFrame, ids: list[str], repeat: int, fold: int, role: str,
             column: str) -> pd.DataFrame:
    prob = model.predict_proba(features.loc[ids].to_numpy())[:, 1] if ids else np.zeros(0)
    return pd.DataFrame({"repeat": repeat, "fold": fold, "role": role, "scan_id": ids, column: prob})


def run_reference_cv(cfg: dict, datalist: pd.DataFrame, folds: pd.DataFrame, out_dir: str | Path | None = None,
                     protocol: str | None = None, features: pd.DataFrame | None = None,
                     settings: dict | None = None) -> dict:
    """Fit and evaluate the reference model on every fold of ``folds``; write its outputs to ``out_dir``.

    ``datalist``: the labelled scans (``scan_id, image, label, subject, site``); ``folds``: a fold
    table (:mod:`petmonai.data.splits`). ``features`` (optional): precomputed :func:`reference_features`.
    Returns ``{"metrics", "predictions" (scored test rows), "val_predictions", "settings"}``.
    """
    from petmonai.data import (
        LEAKY_PROTOCOLS,
        fold_ids,
        fold_members,
        prob_column,
        run_classes,
    )

    settings = settings or reference_settings(cfg)
    protocol = protocol or str(folds.attrs.get("protocol", cfg["cv"]["protocol"]))
    labelled = datalist[datalist["scan_id"].isin(folds["scan_id"])]
    if features is None:
        features = reference_features(cfg, labelled, settings)
    label_of = labelled.set_index("scan_id")["label"].astype(int)
    threshold = cfg["train"]["threshold"]
    tuned = parse_threshold(threshold) == "tuned"
    classes = run_classes(cfg)
    column = prob_column(classes)
    t_all = time.perf_counter()
    rows, fold_info = [], []
    with _limit_threads():
        for repeat, fold in fold_ids(folds):
            ids = {role: [s for s in fold_members(folds, repeat, fold, role) if s in features.index]
                   for role in ("train", "val", "test")}
            fit_ids = ids["train"] + ids["val"]  # every training subject of the fold; never a test scan
            y = label_of.reindex(fit_ids).to_numpy()
            if len(np.unique(y)) < 2:
                raise PetmonaiError(f"reference model, repeat {repeat} fold {fold}: training scans hold one class only")
            t0 = time.perf_counter()
            model = build_reference_model(settings, len(fit_ids)).fit(features.loc[fit_ids].to_numpy(), y)
            rows.append(_predict(model, features, ids["test"], repeat, fold, "test", column))
            if tuned and ids["val"]:
                # out-of-sample validation predictions for the threshold: a twin fitted on 'train' only
                twin_y = label_of.reindex(ids["train"]).to_numpy()
                if len(np.unique(twin_y)) == 2:
                    twin = build_reference_model(settings, len(twin_y))
                    twin.fit(features.loc[ids["train"]].to_numpy(), twin_y)
                    rows.append(_predict(twin, features, ids["val"], repeat, fold, "val", column))
            pca = model.named_steps["pca"]
            fold_info.append({"repeat": repeat, "fold": fold, "train_seconds": time.perf_counter() - t0,
                              "n_fit": len(fit_ids), "pca_components": int(pca.n_components_),
                              "pca_variance_explained": float(pca.explained_variance_ratio_.sum())})
    preds = pd.concat(rows, ignore_index=True)
    metrics = evaluate_cv(preds, labelled, protocol, threshold, fold_info,
                          n_boot=int(cfg["report"]["bootstrap"]), seed=int(cfg["seed"]),
                          leaky_protocols=LEAKY_PROTOCOLS, classes=classes)
    metrics["model"] = MODEL_NAME
    metrics["reference_settings"] = settings
    metrics["fit_seconds"] = time.perf_counter() - t_all
    test = scored_predictions(preds[preds["role"] == "test"], metrics).merge(
        labelled[[c for c in ("scan_id", "uuid", "image", "subject", "site", "label", "class_name")
                  if c in labelled.columns]], on="scan_id")
    log.info("reference %s: %s", MODEL_NAME, metrics["headline"]["text"])
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_csv(out_dir / "oof_predictions.csv", test.drop(columns=["role"]))
        atomic_write_csv(out_dir / "val_predictions.csv", preds[preds["role"] == "val"])
        atomic_write_json(out_dir / "metrics.json", metrics)
    return {"metrics": metrics, "predictions": test, "val_predictions": preds[preds["role"] == "val"],
            "settings": settings}
