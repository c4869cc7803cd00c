"""2D 50-slice ResNet-18 vs the default 3D CNN (configs/train3d.yaml; and the PCA + LR reference) on identical folds.

>>> summary = compare(data_root, out_dir, protocols=["subject"], models=["3d", "2d", "reference"])  # doctest: +SKIP

Each model trains in its own process through ``train3d.py`` (so its peak memory is its own) into
``OUT/<protocol>/<model>/``, a complete run folder with its report; the first run's
``folds.csv`` is handed to every other run (``cv.folds_file``), so all models see the same
folds. The reference model is the one every CNN run fits on its folds. ``comparison.md``,
``comparison.png`` and ``comparison.json`` are read from those run folders, never recomputed
differently, plus the paired 3D - 2D AUC difference with a subject bootstrap.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from petmonai import CLASS_NAMES
from petmonai.config import default_config_path
from petmonai.data import prob_column
from petmonai.errors import PetmonaiError
from petmonai.evaluation import paired_auc_difference
from petmonai.evaluation.report import _ci
from petmonai.runs import atomic_write_json, atomic_write_text, get_logger

log = get_logger("compare")


MODELS = {  # key -> (display name, config file)
    "3d": ("3D CNN", "train3d.yaml"),
    "2d": ("2D CNN", "train2d.yaml"),
    "2d-baseline": ("2D baseline", "train2d_baseline.yaml"),
}


REFERENCE = "reference"


DEFAULT_MODELS = ("3d", "2d", REFERENCE)


PROTOCOLS = ("subject", "site-pair")


QUICK = {  # --quick: fewer epochs, smaller inputs (see README); overrides per model
    "3d": ["spacing=[6.0,6.0,6.0]", "spatial_size=[32,40,32]", "crop_size=[28,36,28]"],  # = the default grid since issue 8
    "2d": ["spacing=[3.2,3.2,3.2]", "spatial_size=[96,96,48]", "crop_size=[88,88]"],
    "2d-baseline": ["spacing=[3.2,3.2,3.2]", "spatial_size=[96,96,48]", "crop_size=[88,88]"],
}


QUICK_EPOCHS = 8


_TRAIN = ("import sys; sys.argv[0] = 'scripts/train3d.py'; from petmonai.commands.cli import train3d_main; "
          "sys.exit(train3d_main(sys.argv[1:]))")  # provenance records the train3d.py command


def parse_models(spec) -> list[str]:
    """``"3d,2d"`` or a list -> model keys in a fixed order; unknown keys are errors."""
    keys = [k.strip() for k in (spec.split(",") if isinstance(spec, str) else spec) if k.strip()]
    unknown = [k for k in keys if k not in (*MODELS, REFERENCE)]
    if unknown or not keys:
        raise PetmonaiError(f"--models: unknown {unknown or 'empty list'} (choose from {', '.join([*MODELS, REFERENCE])})")
    if not any(k in MODELS for k in keys):
        raise PetmonaiError("--models: the reference model is fitted inside a CNN run; name at least one of "
                            + ", ".join(MODELS))
    return [k for k in (*MODELS, REFERENCE) if k in keys]


def run_complete(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file() and (run_dir / "resources.json").is_file()


def train_model(key: str, run_dir: Path, data_root: str | None, protocol: str, options: dict,
                folds_file: Path | None, with_reference: bool) -> Path:
    """Train one of :data:`MODELS` (its config, or ``options["configs"][key]``)."""
    config = options.get("configs", {}).get(key) or default_config_path(MODELS[key][1])
    overrides = QUICK[key] if options.get("quick") else []
    return train_run(config, run_dir, data_root, protocol, {**options, "overrides": [*options.get("overrides", []),
                                                                                     *overrides]},
                     folds_file, with_reference, label=f"{protocol} / {key}")


def train_run(config: str | Path, run_dir: Path, data_root: str | None, protocol: str, options: dict,
              folds_file: Path | None, with_reference: bool, label: str = "") -> Path:
    """One cross-validation with ``config`` in a child process (so its peak memory is its own);
    a finished run folder is reused, an unfinished one resumed."""
    label = label or f"{protocol} / {Path(config).stem}"
    if run_complete(run_dir):
        log.info("%s: finished run found in %s, reused", label, run_dir)
        return run_dir
    if run_dir.exists() and (run_dir / "config.yaml").is_file():
        args = ["--resume", str(run_dir)]
        log.info("%s: resuming %s", label, run_dir)
    else:
        args = ["--config", str(config), "--output-dir", str(run_dir), "--cv", protocol, "--overwrite"]
        if data_root:
            args += ["--data-root", str(data_root)]
        for flag in ("folds", "repeats", "max_epochs", "device", "seed"):
            if options.get(flag) is not None:
                args += [f"--{flag.replace('_', '-')}", str(options[flag])]
        overrides = [*options.get("overrides", []), f"report.reference_model={'true' if with_reference else 'false'}",
                     "train.progress_bar=false"]
        if folds_file is not None:
            overrides.append(f"cv.folds_file={folds_file}")
        for o in overrides:
            args += ["--set", o]
        log.info("%s: training into %s", label, run_dir)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _TRAIN, *args], check=False)
    if done.returncode != 0 or not run_complete(run_dir):
        raise PetmonaiError(f"{label}: training failed (exit {done.returncode}); see {run_dir / 'train.log'}"
                            f"; rerun the same command to resume")
    log.info("%s: done in %.1f min", label, (time.perf_counter() - t0) / 60)
    return run_dir


def _metric_block(metrics: dict) -> dict:
    """The headline statistic's metrics with CIs: pooled (subject) or mean over folds (site-pair)."""
    block = metrics["pooled_ci"] if metrics.get("pooled_meaningful", True) else metrics["fold_mean_ci"]
    out = {k: block[k] for k in ("roc_auc", "balanced_accuracy", "f1", "macro_f1")}
    out["statistic"] = metrics["headline"]["statistic"]
    out["fold_auc"] = metrics.get("fold_auc")
    return out


def model_entry(name: str, folder: Path) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    oof = pd.read_csv(folder / "oof_predictions.csv", dtype={"scan_id": str})
    oof["prob"] = oof[prob_column(metrics.get("classes") or CLASS_NAMES)]  # the positive class's probability
    entry = {"name": name, "folder": str(folder), **_metric_block(metrics),
             "headline": metrics["headline"]["text"]}
    resources = folder / "resources.json"
    if resources.is_file():
        r = json.loads(resources.read_text())
        entry.update({k: r.get(k) for k in ("train_seconds", "train_volumes_per_s", "parameters", "peak_rss_gb",
                                            "peak_gpu_memory_gb", "cv_wall_seconds")})
    entry["oof"] = oof
    return entry


def paired_difference(a: dict, b: dict, protocol: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """AUC(a) - AUC(b) on the scans both predicted out of fold, one subject bootstrap for both."""
    cols = ["repeat", "fold", "scan_id", "label", "subject", "prob"]
    merged = a["oof"][cols].merge(b["oof"][cols], on=["repeat", "fold", "scan_id", "label", "subject"],
                                  suffixes=("_a", "_b"))
    if len(merged) != len(a["oof"]) or len(merged) != len(b["oof"]):
        raise PetmonaiError(f"{a['name']} and {b['name']} did not predict the same scans in the same folds: "
                            "the runs do not share their folds")
    groups = merged["repeat"].astype(str) + ("/" + merged["fold"].astype(str) if protocol == "site-pair" else "")
    d = paired_auc_difference(merged["label"], merged["prob_a"], merged["prob_b"], merged["subject"],
                              groups=groups, n_boot=n_boot, seed=seed)
    return {"a": a["name"], "b": b["name"], **d,
            "statistic": "mean per-fold AUC" if protocol == "site-pair" else "pooled out-of-fold AUC"}


def compare(data_root: str | None, out_dir: str | Path, protocols=("subject",), models=DEFAULT_MODELS,
            options: dict | None = None) -> dict:
    """Train every model under every protocol on shared folds; write comparison.{md,png,json}."""
    out_dir, options = Path(out_dir), dict(options or {})
    models = parse_models(models)
    cnns = [k for k in models if k in MODELS]
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for protocol in protocols:
        folds_file = None
        entries = []
        for i, key in enumerate(cnns):
            run_dir = out_dir / protocol / key
            with_reference = REFERENCE in models and i == 0
            train_model(key, run_dir, data_root, protocol, options, folds_file, with_reference)
            folds_file = folds_file or (run_dir / "folds.csv").resolve()
            entries.append(model_entry(MODELS[key][0], run_dir))
            if with_reference:
                entries.append(model_entry("PCA + LR reference", run_dir / "reference"))
        by_name = {e["name"]: e for e in entries}
        diffs = []
        if "3D CNN" in by_name:
            for other in ("2D CNN", "2D baseline"):
                if other in by_name:
                    diffs.append(paired_difference(by_name["3D CNN"], by_name[other], protocol))
        results[protocol] = {"models": entries, "differences": diffs, "folds_file": str(folds_file)}
    summary = {"protocols": list(protocols), "models": models, "options": {k: v for k, v in options.items()
                                                                           if k != "configs"},
               "results": {p: {"models": [{k: v for k, v in e.items() if k != "oof"} for e in r["models"]],
                               "differences": r["differences"], "folds_file": r["folds_file"]}
                           for p, r in results.items()}}
    figure = plot_comparison(results, out_dir / "comparison.png")
    atomic_write_json(out_dir / "comparison.json", summary)
    atomic_write_text(out_dir / "comparison.md", comparison_markdown(summary, options, figure.name))
    return summary


def _num(x, fmt: str, unit: str = "") -> str:
    return format(x, fmt) + unit if isinstance(x, (int, float)) and np.isfinite(x) else "-"


def comparison_markdown(summary: dict, options: dict, figure: str) -> str:
    lines = ["# 2D vs 3D comparison", "",
             f"Models: {', '.join(summary['models'])}; protocols: {', '.join(summary['protocols'])}"
             + (" (QUICK mode: fewer epochs, smaller inputs; see README)" if options.get("quick") else "") + ".",
             "Every model of a protocol was trained and tested on the same folds (`folds_file` below). "
             "Each figure is read from the model's own run folder (its `metrics.json`, `resources.json`).", ""]
    for protocol, r in summary["results"].items():
        lines += [f"## Protocol: {protocol}", "",
                  f"Statistic: {r['models'][0]['statistic']} with 95% CIs resampling subjects. "
                  f"Folds: `{r['folds_file']}`.", "",
                  "| model | ROC AUC | balanced accuracy | F1 (MCI) | macro F1 | fold AUC mean (sd, min) | "
                  "training time | volumes/s | parameters | peak memory |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m in r["models"]:
            fa = m.get("fold_auc") or {}
            fold = (f"{fa['mean']:.2f} ({fa['sd']:.2f}, {fa['min']:.2f})" if fa.get("mean") is not None else "-")
            minutes = m.get("train_seconds")
            lines.append(f"| {m['name']} | {_ci(m['roc_auc'])} | {_ci(m['balanced_accuracy'])} | {_ci(m['f1'])} | "
                         f"{_ci(m['macro_f1'])} | {fold} | "
                         f"{_num(minutes / 60 if minutes else None, '.1f', ' min')} | "
                         f"{_num(m.get('train_volumes_per_s'), '.1f')} | {_num(m.get('parameters'), ',d')} | "
                         f"{_num(m.get('peak_rss_gb'), '.2f', ' GB')} |")
        lines.append("")
        for d in r["differences"]:
            verdict = ("the CI excludes 0" if d["ci_low"] > 0 or d["ci_high"] < 0 else "the CI includes 0: "
                       "no difference shown")
            lines.append(f"**{d['a']} - {d['b']}** ({d['statistic']}): {d['value']:+.3f} "
                         f"(95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}, {d['n_units']} subjects resampled "
                         f"within class, {d['n_boot']} replicates; {verdict}).")
        lines.append("")
    lines += [f"![ROC curves]({figure})", "",
              "Training time is the folds' training loops (validation included, preprocessing and reference "
              "excluded); volumes/s counts training scans x epochs per second; peak memory is the resident "
              "memory of the model's own training process. The reference model is fitted inside the first CNN "
              "run, so it has no separate time or memory.", ""]
    return "\n".join(lines)


def plot_comparison(results: dict, path: Path) -> Path:
    """Pooled out-of-fold ROC curves of every model, one panel per protocol."""
    from sklearn.metrics import roc_curve

    from petmonai.evaluation import colour
    from petmonai.runs import _new_figure, save_figure

    fig, axes = _new_figure(4.6 * len(results), 4.4, ncols=len(results))
    axes = axes.ravel()
    for ax, (protocol, r) in zip(axes, results.items()):
        for m in r["models"]:
            oof = m["oof"]
            fpr, tpr, _ = roc_curve(oof["label"], oof["prob"])
            auc = m["roc_auc"]["value"]
            ax.plot(fpr, tpr, color=colour(m["name"]), lw=2, label=f"{m['name']} ({m['statistic']} AUC {auc:.2f})")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{protocol}: pooled out-of-fold ROC",
               xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=7)
    return save_figure(fig, path)
