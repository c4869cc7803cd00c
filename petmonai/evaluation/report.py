"""The evaluation report of a run folder: ``report.md`` and its figures, for a reader who is not
an engineer.

    >>> from petmonai.evaluation.report import build_report
    >>> build_report("runs/train3d-20240101-120000")      # -> Path of report.md  # doctest: +SKIP

What it reads (all written by training; only ``metrics.json`` and ``oof_predictions.csv`` are
required): ``metrics.json``, ``oof_predictions.csv``, ``reference/metrics.json`` and
``reference/oof_predictions.csv`` (the PCA + logistic-regression reference on the same folds),
``audit.json``, ``provenance.json``, ``config.yaml``, ``folds.csv`` and every fold's
``history.csv``. What it writes, atomically: ``report.md``, ``roc.png``, ``confusion.png``,
``calibration.png`` and ``training_curves.png``.

The report leads with what can invalidate the result (LEAKY protocol, synthetic data, the data
audit's warnings), then the protocol and the number to quote, then the CNN and the reference side
by side with 95% confidence intervals that resample subjects.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from petmonai.config import read_yaml
from petmonai.data import class_key, count_key, prob_column, run_classes
from petmonai.errors import PetmonaiError
from petmonai.evaluation.metrics import (
    METRIC_KEYS,
    calibration_bins,
    evaluate_cv,
    metric_labels,
)
from petmonai.runs import (
    _new_figure,
    atomic_write_text,
    check_run_folder,
    get_logger,
    read_run_config,
    save_figure,
)

log = get_logger("report")


CNN_NAME = "3D CNN"


REFERENCE_NAME = "PCA + LR reference"


COLOURS = {CNN_NAME: "#1f77b4", "2D CNN": "#7570b3", REFERENCE_NAME: "#d95f02"}


def colour(name: str) -> str:
    return COLOURS.get(name, "#1b9e77")


def run_model_name(run_dir: Path) -> str:
    """The display name of a run's network (``3D CNN``, ``2D CNN``...) from its config.yaml."""
    import yaml

    from petmonai.models import model_label

    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return CNN_NAME
    return model_label(cfg.get("model") or {"name": "resnet18_3d"})


CLASS_COLOURS = ("#2ca02c", "#9467bd")  # label 0 (negative class), label 1 (positive class)


FIGURES = {"roc": "roc.png", "confusion": "confusion.png", "calibration": "calibration.png",
           "curves": "training_curves.png"}


PROTOCOL_TITLES = {"subject": "subject-grouped CV", "site-pair": "cross-site (site-pair) CV",
                   "scan": "LEAKY scan-level CV"}


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PetmonaiError(f"{path}: cannot read ({err})") from None


def _read_csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, dtype={"scan_id": str, "subject": str, "site": str, "uuid": str},
                           keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as err:
        raise PetmonaiError(f"{path}: cannot read ({err})") from None


def _load_model(folder: Path, name: str, recompute: bool, n_boot: int | None,
                datalist: pd.DataFrame | None = None, classes=None) -> dict | None:
    """Metrics and scored test predictions of one model (CNN: the run folder; reference: reference/).

    The metrics come from ``metrics.json``; they are recomputed from the prediction files when
    ``recompute`` is set or the file predates confidence intervals (nothing is written back).
    ``classes``: the run's (default NC/MCI); the positive class's probability column is kept as ``prob``."""
    classes = run_classes(None) if classes is None else tuple(classes)
    column = prob_column(classes)
    metrics = _read_json(folder / "metrics.json")
    oof = _read_csv(folder / "oof_predictions.csv")
    if oof is None:
        return None
    needed = {"repeat", "fold", "scan_id", column, "label", "subject"}
    if not needed <= set(oof.columns):
        raise PetmonaiError(f"{folder / 'oof_predictions.csv'}: missing column(s) {sorted(needed - set(oof.columns))}")
    if "site" not in oof.columns:
        oof["site"] = ""
    oof["site"] = oof["site"].fillna("").astype(str)
    oof["label"] = oof["label"].astype(int)
    if metrics is None or "headline" not in metrics or recompute:
        metrics = metrics or {}
        protocol = metrics.get("protocol", "subject")
        mode = "tuned" if metrics.get("threshold_mode") == "tuned" else metrics.get("threshold", 0.5)
        preds = oof.assign(role="test")[["repeat", "fold", "role", "scan_id", column]]
        labels = oof[["scan_id", "label", "subject", "site"]]
        val = _read_csv(folder / "val_predictions.csv")
        if val is not None and len(val):
            preds = pd.concat([preds, val[["repeat", "fold", "role", "scan_id", column]]], ignore_index=True)
            if datalist is not None:
                labels = pd.concat([labels, datalist[["scan_id", "label", "subject", "site"]]])
        labels = labels.drop_duplicates("scan_id")
        if mode == "tuned" and not set(preds.loc[preds["role"] == "val", "scan_id"]) <= set(labels["scan_id"]):
            raise PetmonaiError(f"{folder}: recomputing a tuned threshold needs the validation scans' labels "
                                "(datalist.csv in the run folder)")
        metrics = {**metrics, **evaluate_cv(preds, labels, protocol, mode, n_boot=n_boot or 2000, classes=classes)}
        metrics["recomputed"] = True
    thr = metrics.get("fold_thresholds", {})
    if "threshold" not in oof.columns or oof["threshold"].isna().any():
        oof["threshold"] = [thr.get(f"{int(r)}/{int(f)}", {}).get("threshold", metrics.get("threshold", 0.5))
                            for r, f in zip(oof["repeat"], oof["fold"])]
    oof["prob"] = oof[column]
    oof["pred"] = (oof["prob"] >= oof["threshold"]).astype(int)
    return {"name": name, "metrics": metrics, "oof": oof, "classes": classes}


def _histories(run_dir: Path) -> pd.DataFrame:
    """Every fold's ``history.csv`` (epoch, train_loss, val_auc, lr, seconds), with repeat and fold."""
    frames = []
    for path in sorted(run_dir.glob("fold_*/history.csv")) + sorted(run_dir.glob("repeat_*/fold_*/history.csv")):
        try:
            h = pd.read_csv(path)
        except (OSError, ValueError):
            continue
        if h.empty or "epoch" not in h.columns:
            continue
        fold = int(path.parent.name.split("_")[-1])
        repeat = int(path.parent.parent.name.split("_")[-1]) if path.parent.parent.name.startswith("repeat_") else 0
        frames.append(h.assign(repeat=repeat, fold=fold))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _num(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _ci(entry: dict | None, digits: int = 2) -> str:
    if not entry:
        return "n/a"
    value = _num(entry.get("value"), digits)
    low, high = entry.get("ci_low"), entry.get("ci_high")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return value
    return f"{value} ({_num(low, digits)}-{_num(high, digits)})"


def _spread(entry: dict | None, digits: int = 2) -> str:
    if not entry or not entry.get("n"):
        return "n/a"
    return f"{_num(entry['mean'], digits)} ± {_num(entry['sd'], digits)} [min {_num(entry['min'], digits)}]"


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    esc = [str(h).replace("|", "\\|") for h in header]
    lines = ["| " + " | ".join(esc) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |")
    return lines


def _threshold_text(metrics: dict, classes) -> str:
    if metrics.get("threshold_mode") == "tuned":
        values = [v["threshold"] for v in metrics.get("fold_thresholds", {}).values()]
        rng = f", range {min(values):.2f}-{max(values):.2f}" if values else ""
        return (f"tuned in each fold on its validation subjects (training subjects set aside; maximum balanced "
                f"accuracy), mean {metrics['threshold']:.2f}{rng}; never tuned on the evaluated fold")
    return f"fixed at {metrics.get('threshold', 0.5):.2f} (P({classes[1]}) >= threshold: called {classes[1]})"


def _roc_curve(y, p):
    from sklearn.metrics import roc_curve

    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, _ = roc_curve(y, p)
    return fpr, tpr


def _chance(ax, classes):
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="chance (AUC 0.5)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(f"1 - specificity (false-positive rate: {classes[0]} called {classes[1]})")
    ax.set_ylabel(f"Sensitivity (true-positive rate: {classes[1]} called {classes[1]})")
    ax.grid(alpha=0.3)


def plot_roc(models: list[dict], protocol: str, path: Path) -> Path:
    """ROC curves. Subject/scan CV: pooled out-of-fold curve per model (one per repeat), with the
    operating point. Site-pair: the per-fold curves averaged at fixed false-positive rates (± 1 sd
    band), and every fold's AUC beside them."""
    title = f"ROC curves, {PROTOCOL_TITLES.get(protocol, protocol)}"
    negative, positive = classes = models[0]["classes"]
    if protocol == "site-pair":
        fig, axes = _new_figure(12, 5.6, ncols=2)
        ax, ax2 = axes[0]
        grid = np.linspace(0, 1, 101)
        for m in models:
            line_colour = colour(m["name"])
            curves = []
            for _, part in m["oof"].groupby(["repeat", "fold"]):
                curve = _roc_curve(part["label"], part["prob"])
                if curve is not None:
                    curves.append(np.interp(grid, *curve))
            if not curves:
                continue
            curves = np.array(curves)
            mean, sd = curves.mean(0), curves.std(0)
            fa = m["metrics"]["fold_summary"]["roc_auc"]
            ax.plot(grid, mean, color=line_colour, lw=2,
                    label=f"{m['name']}: mean of {len(curves)} fold curves (mean fold AUC {_num(fa['mean'])})")
            ax.fill_between(grid, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color=line_colour, alpha=0.15,
                            label=f"{m['name']}: ± 1 sd over folds")
        _chance(ax, classes)
        ax.set_title(f"ROC inside each fold, averaged over folds\n(each fold: one unseen {positive} site + one unseen "
                     f"{negative} site)", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
        for i, m in enumerate(models):
            aucs = [f["roc_auc"] for f in m["metrics"]["per_fold"] if np.isfinite(f["roc_auc"])]
            jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(aucs))
            ax2.scatter(np.full(len(aucs), i) + jitter, aucs, color=colour(m["name"]), alpha=0.7, s=22)
            fa = m["metrics"]["fold_summary"]["roc_auc"]
            ax2.errorbar(i + 0.3, fa["mean"], yerr=fa["sd"] if np.isfinite(fa["sd"]) else None, fmt="D",
                         color="black", capsize=4)
            ax2.annotate(f"mean {_num(fa['mean'])}\nsd {_num(fa['sd'])}\nmin {_num(fa['min'])}",
                         (i + 0.36, fa["mean"]), fontsize=8, va="center")
        ax2.axhline(0.5, ls="--", color="grey", lw=1, label="chance (AUC 0.5)")
        ax2.set_xticks(range(len(models)), [m["name"] for m in models])
        ax2.set_xlim(-0.5, len(models) - 0.1)
        ax2.set_ylim(-0.03, 1.03)
        ax2.set_ylabel("ROC AUC inside the fold")
        ax2.set_title("Fold AUCs (dots), mean ± sd (diamond)")
        ax2.legend(loc="lower right", fontsize=8)
        ax2.grid(axis="y", alpha=0.3)
        fig.suptitle(title + ": AUC computed inside each fold (pooling across folds is not meaningful)")
    else:
        fig, axes = _new_figure(6.4, 6.2)
        ax = axes[0][0]
        for m in models:
            line_colour = colour(m["name"])
            ci = m["metrics"].get("pooled_ci", {}).get("roc_auc")
            for j, (_, part) in enumerate(m["oof"].groupby("repeat")):
                curve = _roc_curve(part["label"], part["prob"])
                if curve is None:
                    continue
                ax.plot(*curve, color=line_colour, lw=2 if j == 0 else 1, alpha=1 if j == 0 else 0.4,
                        label=f"{m['name']}: AUC {_ci(ci)}" if j == 0 else None)
                if j == 0:
                    sens = float((part["pred"][part["label"] == 1] == 1).mean())
                    spec = float((part["pred"][part["label"] == 0] == 0).mean())
                    ax.plot(1 - spec, sens, "o", color=line_colour, ms=8, mec="black",
                            label=f"{m['name']}: operating point (threshold)")
        _chance(ax, classes)
        leaky = " (LEAKY: subjects on both sides)" if protocol == "scan" else ""
        ax.set_title(f"{title}{leaky}\npooled out-of-fold test predictions; AUC with 95% CI (subjects)", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_confusion(models: list[dict], protocol: str, path: Path) -> Path:
    """Confusion matrices at the applied threshold, counts and row percentages."""
    fig, axes = _new_figure(5.2 * len(models), 4.6, ncols=len(models))
    unit = "scan x fold evaluations" if protocol == "site-pair" else "scans"
    classes = models[0]["classes"]
    for ax, m in zip(axes[0], models):
        oof = m["oof"] if protocol == "site-pair" else m["oof"][m["oof"]["repeat"] == m["oof"]["repeat"].min()]
        mat = np.zeros((2, 2), dtype=int)
        for t in (0, 1):
            for q in (0, 1):
                mat[t, q] = int(((oof["label"] == t) & (oof["pred"] == q)).sum())
        rows = mat.sum(1, keepdims=True)
        frac = np.divide(mat, rows, out=np.zeros_like(mat, dtype=float), where=rows > 0)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for t in (0, 1):
            for q in (0, 1):
                ax.text(q, t, f"{mat[t, q]}\n({100 * frac[t, q]:.0f}% of true {classes[t]})",
                        ha="center", va="center", fontsize=10, color="white" if frac[t, q] > 0.6 else "black")
        ax.set_xticks([0, 1], list(classes))
        ax.set_yticks([0, 1], list(classes))
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
        thr = m["metrics"]
        thr_text = (f"threshold tuned per fold (mean {thr['threshold']:.2f})" if thr.get("threshold_mode") == "tuned"
                    else f"threshold {thr.get('threshold', 0.5):.2f}")
        ax.set_title(f"{m['name']}\n{thr_text}; counts of {unit}", fontsize=10)
    fig.suptitle(f"Confusion matrices, {PROTOCOL_TITLES.get(protocol, protocol)}")
    return save_figure(fig, path)


def plot_calibration(models: list[dict], protocol: str, path: Path, n_bins: int = 5) -> Path:
    """Reliability diagram (predicted vs observed fraction of the positive class) and the distribution of
    P(positive) by class."""
    negative, positive = models[0]["classes"]
    fig, axes = _new_figure(5.0 * (1 + len(models)), 4.8, ncols=1 + len(models))
    ax = axes[0][0]
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for m in models:
        table = calibration_bins(m["oof"]["label"], m["oof"]["prob"], n_bins)
        ax.plot(table["mean_predicted"], table["observed_fraction"], "o-", color=colour(m["name"]), label=m["name"])
        for r in table.itertuples():
            ax.annotate(f"n={r.n}", (r.mean_predicted, r.observed_fraction), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=colour(m["name"]))
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel(f"Mean predicted P({positive}) in the bin")
    ax.set_ylabel(f"Observed fraction of {positive} scans in the bin")
    ax.set_title(f"Reliability ({n_bins} equal-width bins)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    bins = np.linspace(0, 1, 11)
    for ax, m in zip(axes[0][1:], models):
        ax.hist([m["oof"].loc[m["oof"]["label"] == lab, "prob"] for lab in (0, 1)], bins=bins,
                color=list(CLASS_COLOURS), label=[f"true {negative}", f"true {positive}"], edgecolor="white")
        met = m["metrics"]
        ax.axvline(met.get("threshold", 0.5), color="black", ls=":",
                   label="threshold" + (" (mean of folds)" if met.get("threshold_mode") == "tuned" else ""))
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"Predicted P({positive})")
        ax.set_ylabel("Number of test " + ("evaluations" if protocol == "site-pair" else "scans"))
        ax.set_title(f"{m['name']}: predicted P({positive}) by true class", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"Calibration, {PROTOCOL_TITLES.get(protocol, protocol)}")
    return save_figure(fig, path)


def plot_training_curves(history: pd.DataFrame, path: Path, best_epochs: dict | None = None,
                         name: str = CNN_NAME) -> Path:
    """Training loss and validation ROC AUC per epoch: one thin line per fold, the mean in bold."""
    fig, axes = _new_figure(12, 4.6, ncols=2)
    ax_loss, ax_auc = axes[0]
    for (repeat, fold), h in history.groupby(["repeat", "fold"]):
        h = h.sort_values("epoch")
        ax_loss.plot(h["epoch"], h["train_loss"], color=colour(name), lw=0.8, alpha=0.35)
        if "val_auc" in h and h["val_auc"].notna().any():
            ax_auc.plot(h["epoch"], h["val_auc"], color=colour(name), lw=0.8, alpha=0.35)
        best = (best_epochs or {}).get((int(repeat), int(fold)))
        if best is not None and "val_auc" in h:
            row = h[h["epoch"] == best]
            if len(row):
                ax_auc.plot(best, row["val_auc"].iloc[0], "*", color="black", ms=7)
    mean = history.groupby("epoch")[["train_loss", "val_auc"]].mean()
    n_folds = history.groupby(["repeat", "fold"]).ngroups
    ax_loss.plot(mean.index, mean["train_loss"], color="black", lw=2, label=f"mean of {n_folds} folds")
    ax_loss.plot([], [], color=colour(name), lw=0.8, alpha=0.5, label="one fold")
    ax_auc.plot(mean.index, mean["val_auc"], color="black", lw=2, label=f"mean of {n_folds} folds")
    ax_auc.plot([], [], color=colour(name), lw=0.8, alpha=0.5, label="one fold")
    if best_epochs:
        ax_auc.plot([], [], "*", color="black", label="epoch kept (best validation AUC)")
    ax_auc.axhline(0.5, ls="--", color="grey", lw=1, label="chance (0.5)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_auc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_xlabel("Epoch")
    ax_loss.set_ylabel("Training loss (cross-entropy, per scan)")
    ax_loss.set_title("Training loss", fontsize=10)
    ax_auc.set_xlabel("Epoch")
    ax_auc.set_ylabel("Validation ROC AUC")
    ax_auc.set_ylim(-0.03, 1.03)
    ax_auc.set_title("Validation ROC AUC (training subjects set aside; not the test folds)", fontsize=10)
    for ax in (ax_loss, ax_auc):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{name} training curves, every fold")
    return save_figure(fig, path)


def _banners(protocol: str, synthetic: bool, cnn: dict) -> list[str]:
    out = []
    if protocol == "scan":
        out.append("> **LEAKY PROTOCOL.** These folds split by scan, so scans of one subject sit in training and "
                   "test at once. Every number below is inflated by leakage. Do not quote it; it exists to show "
                   "how much leakage inflates results.")
    if synthetic:
        out.append("> **SYNTHETIC DATA.** This run trained on a generated phantom cohort, not on patient scans. "
                   "The numbers show that the pipeline works and nothing about patients.")
    if cnn["metrics"].get("recomputed"):
        out.append("> Note: metrics.json of this run predates confidence intervals; the metrics below were "
                   "recomputed from oof_predictions.csv.")
    return out


def _audit_section(audit: dict | None) -> list[str]:
    lines = ["## Data audit: read this first", ""]
    if audit is None:
        return lines + ["No `audit.json` in this run folder: the data were not audited. "
                        "Run `python scripts/audit.py --data-root ...` before trusting any number.", ""]
    warnings, notes = audit.get("warnings", []), audit.get("notes", [])
    train = audit.get("train", {})
    if train:
        parts = []
        for name, entry in (train.get("classes") or {}).items():
            if isinstance(entry, dict):
                parts.append(f"{name}: {entry.get('scans', '?')} scans of {entry.get('subjects', '?')} subjects")
            else:
                parts.append(f"{name}: {entry} scans")
        lines += [f"Training data: {train.get('scans', '?')} scans of {train.get('subjects', '?')} subjects"
                  + (f" ({'; '.join(parts)})" if parts else "") + ".", ""]
    if warnings:
        lines += [f"- **{w}**" for w in warnings]
    else:
        lines.append("- No audit warning.")
    lines += [f"- {n}" for n in notes]
    return lines + ["", "Details: `audit.md` in this folder.", ""]


def _protocol_section(protocol: str, cnn: dict, folds: pd.DataFrame | None, config: dict | None) -> list[str]:
    m = cnn["metrics"]
    per_fold = m.get("per_fold", [])
    n_folds = len({(f["repeat"], f["fold"]) for f in per_fold})
    repeats = len({f["repeat"] for f in per_fold})
    lines = ["## Protocol", "",
             f"**{PROTOCOL_TITLES.get(protocol, protocol)}** (`--cv {protocol}`): "
             + (f"{repeats} repeats (different seeds) x {n_folds // repeats} folds" if repeats > 1
                else f"{n_folds} folds") + ".", "",
             m.get("protocol_description", ""), ""]
    if folds is not None and "role" in folds.columns:
        sizes = folds.groupby(["repeat", "fold", "role"]).size().unstack(fill_value=0)
        parts = [f"{role} {int(sizes[role].min())}-{int(sizes[role].max())}" for role in ("train", "val", "test")
                 if role in sizes]
        tcfg = (config or {}).get("train") or {}
        val_role = ("training subjects that train too (`train.keep: last` with `train.train_on_val`: no epoch is "
                    "chosen, the last one is kept)" if tcfg.get("keep") == "last" and tcfg.get("train_on_val")
                    else "training subjects set aside for choosing the epoch")
        lines += [f"Scans per fold: {', '.join(parts)} (train fits the weights; val = {val_role}; test = the "
                  "held-out scans scored below). Fold assignments: `folds.csv` "
                  "(reuse with `--folds-file` to compare models on identical folds).", ""]
    views = m.get("test_views") or {"mode": "evaluator"}
    if views.get("mode") == "inference":
        detail = f" ({views['n_windows']} windows x {views['n_flips']} flips)" if "n_windows" in views else ""
        lines += [f"Each held-out scan is scored as `predict.py` scores a new one (`cv.test_views: inference`): the "
                  f"mean P({cnn['classes'][1]}) over {views.get('n_views', '?')} `{views.get('views')}` views{detail}, "
                  "by its fold's "
                  "model alone.", ""]
    else:
        lines += ["Each held-out scan is scored once, as the training evaluator sees it (`cv.test_views: evaluator`; "
                  "`predict.py` averages its prediction views instead).", ""]
    lines += [f"Decision threshold: {_threshold_text(m, cnn['classes'])}.", ""]
    lines += ["**Which number to quote.** " + {
        "subject": "The pooled out-of-fold ROC AUC with its 95% CI, *together with* the site-pair figure of the "
                   "same model (run `--cv site-pair`): here every test site was also seen in training, so this "
                   "number can still be scanner recognition.",
        "site-pair": "The mean fold ROC AUC (with sd and min): the model never saw the test scanners. Quote it "
                     "beside the subject-grouped figure; the gap is what scanner recognition was worth.",
        "scan": "None. This protocol is LEAKY; quote the subject-grouped and site-pair figures instead.",
    }.get(protocol, "See the protocol description."), ""]
    return lines


def _results_section(protocol: str, models: list[dict]) -> list[str]:
    lines = [f"## Results: {models[0]['name']} and the reference model, same folds", ""]
    names = [m["name"] for m in models]
    negative, positive = models[0]["classes"]
    labels = metric_labels(models[0]["classes"])
    if protocol == "site-pair":
        lines += [f"Each metric is computed inside each fold (one unseen {positive} site + one unseen {negative} site) and "
                  "summarised over folds as mean ± sd [min]; in brackets after it, the 95% CI of the fold mean "
                  "from a bootstrap that resamples subjects.", ""]
        rows = []
        for key in METRIC_KEYS:
            rows.append([labels[key]] + [
                f"{_spread(m['metrics']['fold_summary'][key])} (CI {_num(m['metrics']['fold_mean_ci'][key]['ci_low'])}"
                f"-{_num(m['metrics']['fold_mean_ci'][key]['ci_high'])})" for m in models])
        lines += _md_table(["Metric"] + names, rows)
    else:
        leaky = "LEAKY " if protocol == "scan" else ""
        boot = models[0]["metrics"].get("pooled_ci", {})
        who = ("a fold model that may have trained on other scans of the same subject" if protocol == "scan"
               else "the fold model that never saw its subject")
        lines += [f"{leaky}Pooled out-of-fold test predictions (each scan scored once per repeat, by {who}), "
                  f"value (95% CI). CIs: percentile bootstrap, "
                  f"{boot.get('n_boot', '?')} replicates resampling the {boot.get('n_units', '?')} subjects "
                  "(all scans of a drawn subject; stratified by class), not scans.", ""]
        rows = [[labels[key]] + [_ci(m["metrics"].get("pooled_ci", {}).get(key)) for m in models]
                for key in METRIC_KEYS]
        rows.append(["Fold ROC AUC, mean ± sd [min]"] + [_spread(m["metrics"]["fold_summary"]["roc_auc"])
                                                         for m in models])
        lines += _md_table(["Metric"] + names, rows)
    lines.append("")
    for m in models:
        oof = m["oof"] if protocol == "site-pair" else m["oof"][m["oof"]["repeat"] == m["oof"]["repeat"].min()]
        pos, neg = oof[oof["label"] == 1], oof[oof["label"] == 0]
        unit = "evaluations" if protocol == "site-pair" else "scans"
        called_pos, called_neg = int(pos["pred"].sum()), int((neg["pred"] == 0).sum())
        lines.append(f"- **{m['name']}**: {m['metrics']['headline']['text']}. Of {len(pos)} {positive} {unit} it called "
                     f"{called_pos} {positive}; of {len(neg)} {negative} {unit} it called {called_neg} {negative}.")
    lines.append("")
    if len(models) > 1:
        cnn, ref = models[0]["metrics"]["headline"], models[1]["metrics"]["headline"]
        if np.isfinite(cnn["value"]) and np.isfinite(ref["value"]):
            better = cnn["value"] - ref["value"]
            lines += [f"The CNN's ROC AUC is {abs(better):.2f} {'above' if better >= 0 else 'below'} the reference's "
                      "on identical folds. The reference (4 mm voxels, PCA + logistic regression) is a scanner-"
                      "sensitive baseline: a CNN that does not beat it has not shown it learned more than the "
                      "reference did.", ""]
    else:
        lines += ["(No reference-model results in this run folder: `reference/` is missing. "
                  "`petmonai report RUN_DIR --reference` runs it on this run's folds.)", ""]
    for note in models[0]["metrics"].get("notes", []):
        lines.append(f"- Note: {note}")
    return lines + [""]


def _per_fold_section(models: list[dict]) -> list[str]:
    lines = ["## Per-fold results", ""]
    cnn = models[0]["metrics"]["per_fold"]
    ref = {(f["repeat"], f["fold"]): f for f in models[1]["metrics"]["per_fold"]} if len(models) > 1 else {}
    name, classes = models[0]["name"], models[0]["classes"]
    header = ["Repeat/fold", "Test sites", f"Test {classes[1]}/{classes[0]}", f"{name} AUC", f"{name} bal. acc.",
              "Threshold"]
    if any("best_epoch" in f for f in cnn):
        header.append("Epoch kept / run")
    if ref:
        header += [f"{REFERENCE_NAME} AUC", f"{REFERENCE_NAME} bal. acc."]
    rows = []
    for f in cnn:
        row = [f"{f['repeat']}/{f['fold']}", f.get("test_sites", ""),
               f"{f.get(count_key(classes, 1), '?')}/{f.get(count_key(classes, 0), '?')}",
               _num(f["roc_auc"]), _num(f["balanced_accuracy"]), _num(f.get("threshold"))]
        if "Epoch kept / run" in header:
            row.append(f"{f.get('best_epoch', '?')} / {f.get('epochs_run', '?')}")
        if ref:
            r = ref.get((f["repeat"], f["fold"]), {})
            row += [_num(r.get("roc_auc")), _num(r.get("balanced_accuracy"))]
        rows.append(row)
    lines += _md_table(header, rows)
    return lines + ["", "AUC is n/a in a fold whose test scans hold one class only.", ""]


def _per_site_section(models: list[dict], protocol: str) -> list[str]:
    positive = models[0]["classes"][1]
    called, mean = f"called_{class_key(positive)}", f"mean_prob_{class_key(positive)}"
    lines = ["## Per-site results", "",
             "Every training site holds one class only, so a per-site AUC is undefined; the table shows how "
             f"often each site's scans were called {positive} and how often the call was right"
             + (" (over all folds that tested the site)." if protocol == "site-pair" else "."), ""]
    ref = {s["site"]: s for s in models[1]["metrics"]["per_site"]} if len(models) > 1 else {}
    name = models[0]["name"]
    header = ["Site", "Class", "Scans", "Subjects", f"{name} mean P({positive})", f"{name} called {positive}",
              f"{name} correct"]
    if ref:
        header += [f"{REFERENCE_NAME} called {positive}", f"{REFERENCE_NAME} correct"]
    rows = []
    for s in models[0]["metrics"]["per_site"]:
        row = [s["site"], s["classes"], s["n_scans"], s["n_subjects"], _num(s[mean]),
               f"{100 * s[called]:.0f}%", f"{100 * s['accuracy']:.0f}%"]
        if ref:
            r = ref.get(s["site"])
            row += [f"{100 * r[called]:.0f}%" if r else "n/a", f"{100 * r['accuracy']:.0f}%" if r else "n/a"]
        rows.append(row)
    return lines + _md_table(header, rows) + [""]


def _glossary(classes) -> list[str]:
    neg, pos = classes
    return ["## How to read this", "",
            f"- **ROC AUC**: the chance that a randomly chosen {pos} scan gets a higher P({pos}) than a randomly chosen "
            f"{neg} scan. 0.5 is guessing, 1.0 perfect; below 0.5 is worse than guessing.",
            f"- **Sensitivity**: fraction of {pos} scans called {pos}. **Specificity**: fraction of {neg} scans called "
            f"{neg}. **Balanced accuracy**: their mean.",
            f"- **F1 ({pos} positive)**: harmonic mean of precision and sensitivity for {pos}. **Macro F1**: mean of "
            f"the F1 of {pos} and of {neg}; the 2023 challenge's score.",
            "- **95% CI**: the range that would cover the true value in 95% of repetitions of this study with new "
            "subjects drawn like these; wide intervals mean few subjects.",
            "- **Out-of-fold**: every scan is scored by a model that did not train on that scan (and, except "
            "under the LEAKY scan protocol, on no scan of that subject).", ""]


def _run_datalist(run_dir: Path) -> pd.DataFrame | None:
    """The labelled rows of the run's ``datalist.csv`` (for recomputing tuned thresholds), or None."""
    datalist = _read_csv(run_dir / "datalist.csv")
    if datalist is None or not {"scan_id", "label", "subject", "site"} <= set(datalist.columns):
        return None
    return datalist[datalist["label"].astype(float) >= 0].assign(
        label=lambda d: d["label"].astype(int), site=lambda d: d["site"].fillna("").astype(str))


def _run_models(run_dir: Path, recompute: bool, n_boot: int | None, classes) -> list[dict]:
    """The CNN and, when the run has one, the reference model (see :func:`_load_model`)."""
    datalist = _run_datalist(run_dir)
    cnn = _load_model(run_dir, run_model_name(run_dir), recompute, n_boot, datalist, classes)
    if cnn is None:
        raise PetmonaiError(f"{run_dir}: no oof_predictions.csv; has training finished? (a report needs the "
                            "out-of-fold predictions of a finished run)")
    reference = _load_model(run_dir / "reference", REFERENCE_NAME, recompute, n_boot, datalist, classes)
    return [cnn] + ([reference] if reference is not None else [])


def _write_figures(run_dir: Path, models: list[dict], protocol: str, history: pd.DataFrame) -> dict:
    """Every figure of the report, written; returns ``{key: path}``."""
    written = {
        "roc": plot_roc(models, protocol, run_dir / FIGURES["roc"]),
        "confusion": plot_confusion(models, protocol, run_dir / FIGURES["confusion"]),
        "calibration": plot_calibration(models, protocol, run_dir / FIGURES["calibration"]),
    }
    if not history.empty:
        cnn = models[0]
        best = {(f["repeat"], f["fold"]): f["best_epoch"] for f in cnn["metrics"]["per_fold"] if "best_epoch" in f}
        written["curves"] = plot_training_curves(history, run_dir / FIGURES["curves"], best, cnn["name"])
    return written


def _figures_section(written: dict, classes) -> list[str]:
    lines = ["## Figures", ""]
    captions = {
        "roc": "ROC curves: sensitivity against false-positive rate as the threshold moves; the dot is the "
               "threshold actually applied.",
        "confusion": "Confusion matrices at the applied threshold.",
        "calibration": f"Calibration: does a predicted P({classes[1]}) of 0.8 mean 80% of such scans are {classes[1]}? "
                       "Points on the diagonal are well calibrated; the histograms show how the classes' scores overlap.",
    }
    for key in ("roc", "confusion", "calibration"):
        if key in written:
            lines += [f"![{key}]({FIGURES[key]})", "", captions[key], ""]
    return lines


def _curves_section(history: pd.DataFrame, written: dict) -> list[str]:
    lines = ["## Training curves", ""]
    if history.empty:
        return lines + ["No per-fold `history.csv` found in this run folder.", ""]
    epochs = history.groupby(["repeat", "fold"])["epoch"].max()
    return lines + [f"![training curves]({FIGURES['curves']})" if "curves" in written else "", "",
                    f"{len(epochs)} folds trained {int(epochs.min())}-{int(epochs.max())} epochs; each fold keeps the "
                    "epoch with the best validation ROC AUC (star). Validation subjects come from the training side "
                    "of the fold, never from its test scans. A validation AUC far above the test AUC means the epoch "
                    "choice overfitted the small validation set.", ""]


def _provenance_section(provenance: dict, reference: dict | None) -> list[str]:
    lines = ["## Provenance", ""]
    for key in ("created", "command", "git_commit", "data_fingerprint_sha256", "device"):
        if provenance.get(key):
            lines.append(f"- {key}: `{provenance[key]}`")
    settings = reference["metrics"].get("reference_settings") if reference is not None else None
    if settings:
        lines.append(f"- reference model: {settings.get('preprocessing', '?')} preprocessing, "
                     f"PCA {settings.get('n_components', '?')} components, "
                     f"logistic regression C={settings.get('C', '?')}; "
                     "fitted on each fold's training subjects")
    return lines + ["- files: `metrics.json`, `oof_predictions.csv`, `val_predictions.csv`, `folds.csv`"
                    + (", `reference/`" if reference is not None else ""), ""]


def build_report(run_dir: str | Path, recompute: bool = False, n_boot: int | None = None,
                 figures: bool = True, check: bool = True) -> Path:
    """Write ``report.md`` and the figures into ``run_dir``; returns the report's path.

    ``recompute``: recompute the metrics from the prediction files instead of reading
    ``metrics.json`` (with ``n_boot`` bootstrap replicates). ``figures=False`` writes the Markdown only.
    ``check``: a run folder from elsewhere is checked first (:func:`petmonai.runs.check_run_folder`:
    its config's trust check, its recorded hashes); off for the run that training has just written.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PetmonaiError(f"{run_dir}: run folder not found")
    if check:
        check_run_folder(run_dir)
    config = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    classes = run_classes(config)
    models = _run_models(run_dir, recompute, n_boot, classes)
    cnn, reference = models[0], (models[1] if len(models) > 1 else None)
    protocol = cnn["metrics"].get("protocol", "subject")
    audit = _read_json(run_dir / "audit.json")
    provenance = _read_json(run_dir / "provenance.json") or {}
    synthetic = bool(provenance.get("synthetic_data") or (audit or {}).get("synthetic"))
    history = _histories(run_dir)
    written = _write_figures(run_dir, models, protocol, history) if figures else {}

    lines = [f"# Evaluation report: {run_dir.name}", "",
             f"{classes[0]} vs {classes[1]} from brain FDG-PET, {PROTOCOL_TITLES.get(protocol, protocol)}. "
             f"{classes[1]} is the positive class.",
             ""]
    for b in _banners(protocol, synthetic, cnn):
        lines += [b, ""]
    lines += [f"**Bottom line.** {cnn['name']}: {cnn['metrics']['headline']['text']}."]
    if reference is not None:
        lines[-1] += f" {REFERENCE_NAME}: {reference['metrics']['headline']['text']}."
    lines.append("")
    lines += _audit_section(audit)
    lines += _protocol_section(protocol, cnn, _read_csv(run_dir / "folds.csv"), config)
    lines += _results_section(protocol, models)
    lines += _figures_section(written, classes)
    lines += _per_fold_section(models)
    lines += _per_site_section(models, protocol)
    lines += _curves_section(history, written)
    lines += _glossary(classes)
    lines += _provenance_section(provenance, reference)
    path = atomic_write_text(run_dir / "report.md", "\n".join(lines))
    log.info("report written: %s", path)
    return path


def add_reference(run_dir: str | Path, data_root: str | Path | None = None, overrides: list[str] | None = None,
                  name: str = "reference") -> Path:
    """Run the reference model on a finished run's own folds and write ``<run>/<name>/`` (``reference/``
    is the one the report shows).

    The run's ``config.yaml``, ``datalist.csv`` and ``folds.csv`` are used; the image paths in the
    datalist must still exist (or give ``data_root`` to rediscover them). ``overrides``: config
    assignments for this fit, e.g. ``["reference.features=regions"]`` (region-level features)."""
    from petmonai.data import data_options, discover, load_folds, train_rows
    from petmonai.evaluation.reference import run_reference_cv

    run_dir = Path(run_dir)
    for needed in ("config.yaml", "folds.csv"):
        if not (run_dir / needed).is_file():
            raise PetmonaiError(f"{run_dir}: no {needed}; the reference model needs the run's config and folds")
    from petmonai.config import apply_override

    cfg = read_run_config(run_dir)  # over the base config: a run saved before a reference option existed takes its default
    for assignment in overrides or []:
        apply_override(cfg, assignment)
    if data_root is not None:
        datalist = train_rows(discover(data_root, **data_options(cfg)))
    else:
        datalist = _read_csv(run_dir / "datalist.csv")
        if datalist is None:
            raise PetmonaiError(f"{run_dir}: no datalist.csv; pass --data-root")
        datalist = datalist[datalist["split"] == "train"].reset_index(drop=True)
        datalist["label"] = datalist["label"].astype(int)
        missing = [p for p in datalist["image"] if not Path(p).is_file()]
        if missing:
            raise PetmonaiError(f"{missing[0]}: image of the run's datalist not found ({len(missing)} missing); "
                                "pass --data-root")
    datalist["site"] = datalist["site"].fillna("").astype(str)
    folds = load_folds(run_dir / "folds.csv", datalist)
    metrics = _read_json(run_dir / "metrics.json") or {}
    protocol = metrics.get("protocol") or folds.attrs.get("protocol") or cfg["cv"]["protocol"]
    run_reference_cv(cfg, datalist, folds, run_dir / name, protocol=protocol)
    return run_dir / name
