"""2D vs 3D on identical folds: the default 3D CNN (configs/train3d.yaml), the 3D ResNet-18 and a 2D
ResNet-18 on the same registered inputs and recipe, the challenge's native 2D models and the PCA + LR
reference.

>>> summary = compare(data_root, out_dir, protocols=["subject"], models=["3d", "2d", "reference"])  # doctest: +SKIP

Each model trains in its own process through ``train3d.py`` (so its peak memory is its own) into
``OUT/<protocol>/<model>/``, a complete run folder with its report; the first run's
``folds.csv`` is handed to every other run (``cv.folds_file``), so all models see the same
folds (every repeat). The reference model is the one the first CNN run fits on its folds.
``comparison.md``, ``comparison.png`` (ROC), ``comparison_loss.png`` (training loss) and
``comparison.json`` are read from those run folders, never recomputed differently, plus the paired
AUC differences (:data:`DIFFERENCES`) with one subject bootstrap over all splits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from petmonai import CLASS_NAMES
from petmonai.config import default_config_path, load_config
from petmonai.data import prob_column
from petmonai.errors import PetmonaiError
from petmonai.evaluation import classification_metrics, paired_auc_difference, spread
from petmonai.evaluation.report import _ci, _histories
from petmonai.runs import atomic_write_json, atomic_write_text, get_logger

log = get_logger("compare")


MODELS = {  # key -> (display name, config file); the order of training and of the tables
    "3d": ("3D CNN", "train3d.yaml"),                          # the default: SFCN on the 6 mm template grid
    "3d-resnet18": ("3D ResNet-18", "train3d_resnet18.yaml"),  # the default's inputs and recipe, MONAI's ResNet-18
    "2d": ("2D ResNet-18", "train2d_registered.yaml"),         # the same, a 2D ResNet-18 (axial slices as channels)
    "2d-native": ("2D native", "train2d.yaml"),                # the tuned 2D 50-slice model on its own grid
    "2d-baseline": ("2D baseline", "train2d_baseline.yaml"),   # the challenge baseline
}


REFERENCE = "reference"


DEFAULT_MODELS = (*MODELS, REFERENCE)


DIFFERENCES = (("3d", "2d"), ("3d", "2d-native"), ("3d", "2d-baseline"), ("3d-resnet18", "3d"))
"""Paired AUC differences (a - b) reported, the question first: 2D against 3D on the same inputs."""


PROTOCOLS = ("subject", "site-pair")


QUICK_NATIVE = ["spacing=[3.2,3.2,3.2]", "spatial_size=[96,96,48]", "crop_size=[88,88]"]
"""--quick inputs of a model on its own (native 2D) grid; models on the default's 6 mm template grid keep it."""


QUICK_EPOCHS = 8


def quick_overrides(config: str | Path) -> list[str]:
    """``--quick``: nothing for a config on the default's template grid (already small: 32x40x32 at
    6 mm), :data:`QUICK_NATIVE` for one on a grid of its own (the native 2D models' 2.4 mm).

    >>> quick_overrides(default_config_path("train2d_registered.yaml"))
    []
    >>> quick_overrides(default_config_path("train2d.yaml"))[0]
    'spacing=[3.2,3.2,3.2]'
    """
    cfg, default = load_config(config), load_config()
    grid = ("spacing", "spatial_size", "crop_size")
    return [] if all(cfg[k] == default[k] for k in grid) else list(QUICK_NATIVE)


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
    overrides = [*options.get("overrides", []), *(quick_overrides(config) if options.get("quick") else [])]
    check_run_model(run_dir, load_config(config, overrides)["model"], key)
    return train_run(config, run_dir, data_root, protocol, {**options, "overrides": overrides},
                     folds_file, with_reference, label=f"{protocol} / {key}")


def check_run_model(run_dir: Path, model: dict, key: str) -> None:
    """A run folder of an earlier comparison is reused or resumed only if it trained the same network
    (the key ``2d`` named the native 2D model before the registered one)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    found = (yaml.safe_load(saved.read_text()) or {}).get("model") or {}
    if found.get("name", found.get("_target_")) != model.get("name", model.get("_target_")):
        raise PetmonaiError(f"{run_dir} holds a run of model {found.get('name', found.get('_target_'))!r}, but "
                            f"'{key}' trains {model.get('name', model.get('_target_'))!r}: use another --output-dir "
                            "(or move that folder away)")


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


def split_spread(metrics: dict, oof: pd.DataFrame) -> dict:
    """The AUC's spread over splits, from metrics.json: the pooled AUC of each repeat (subject: its
    ``per_repeat``) or the AUC of each fold (site-pair: ``per_fold``). A metrics.json written before
    ``per_repeat`` existed gets the same per-repeat computation on its out-of-fold predictions."""
    if not metrics.get("pooled_meaningful", True):
        values, over = [f["roc_auc"] for f in metrics["per_fold"]], "folds"
    elif "per_repeat" in metrics:
        values, over = [r["roc_auc"] for r in metrics["per_repeat"]], "repeats"
    else:
        values = [classification_metrics(g["label"], g["prob"], 0.5)["roc_auc"] for _, g in oof.groupby("repeat")]
        over = "repeats"
    return {"over": over, **{k: v for k, v in spread(values).items() if k != "n_undefined"}, "values": values}


def model_entry(name: str, folder: Path, key: str | None = None) -> dict:
    """One model's row, read from its run folder: headline metrics with CIs, spread over splits,
    resources, and (``oof``, not written to comparison.json) its out-of-fold predictions."""
    metrics = json.loads((folder / "metrics.json").read_text())
    oof = pd.read_csv(folder / "oof_predictions.csv", dtype={"scan_id": str})
    oof["prob"] = oof[prob_column(metrics.get("classes") or CLASS_NAMES)]  # the positive class's probability
    entry = {"key": key or name, "name": name, "folder": str(folder), **_metric_block(metrics),
             "spread": split_spread(metrics, oof), "headline": metrics["headline"]["text"]}
    resources = folder / "resources.json"
    if resources.is_file():
        r = json.loads(resources.read_text())
        entry.update({k: r.get(k) for k in ("train_seconds", "train_volumes_per_s", "parameters", "peak_rss_gb",
                                            "peak_gpu_memory_gb", "cv_wall_seconds")})
    entry["oof"] = oof
    return entry


def paired_difference(a: dict, b: dict, protocol: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """AUC(a) - AUC(b) on the scans both predicted out of fold, over all splits: the AUC inside each
    repeat (subject: pooled) or each repeat/fold (site-pair), averaged, as each run's headline; one
    subject bootstrap for both models, a subject drawn once for all its splits."""
    cols = ["repeat", "fold", "scan_id", "label", "subject", "prob"]
    merged = a["oof"][cols].merge(b["oof"][cols], on=["repeat", "fold", "scan_id", "label", "subject"],
                                  suffixes=("_a", "_b"))
    if len(merged) != len(a["oof"]) or len(merged) != len(b["oof"]):
        raise PetmonaiError(f"{a['name']} and {b['name']} did not predict the same scans in the same folds: "
                            "the runs do not share their folds")
    groups = merged["repeat"].astype(str) + ("/" + merged["fold"].astype(str) if protocol == "site-pair" else "")
    d = paired_auc_difference(merged["label"], merged["prob_a"], merged["prob_b"], merged["subject"],
                              groups=groups, n_boot=n_boot, seed=seed)
    return {"a": a["name"], "b": b["name"], "a_key": a["key"], "b_key": b["key"], **d,
            "n_splits": int(groups.nunique()),
            "statistic": "mean per-fold AUC" if protocol == "site-pair" else "pooled out-of-fold AUC"}


def protocol_results(protocol: str, models: list[str], out_dir: Path, data_root: str | None, options: dict) -> dict:
    """Train (or reuse) every CNN of ``models`` under ``protocol`` on the first run's folds; read their rows
    and the paired differences of :data:`DIFFERENCES`."""
    folds_file, entries = None, []
    for i, key in enumerate(k for k in models if k in MODELS):
        run_dir = out_dir / protocol / key
        with_reference = REFERENCE in models and i == 0
        train_model(key, run_dir, data_root, protocol, options, folds_file, with_reference)
        folds_file = folds_file or (run_dir / "folds.csv").resolve()
        entries.append(model_entry(MODELS[key][0], run_dir, key))
        if with_reference:
            entries.append(model_entry("PCA + LR reference", run_dir / "reference", REFERENCE))
    by_key = {e["key"]: e for e in entries}
    diffs = [paired_difference(by_key[a], by_key[b], protocol) for a, b in DIFFERENCES if a in by_key and b in by_key]
    return {"models": entries, "differences": diffs, "folds_file": str(folds_file)}


def compare(data_root: str | None, out_dir: str | Path, protocols=("subject",), models=DEFAULT_MODELS,
            options: dict | None = None) -> dict:
    """Train every model under every protocol on shared folds; write comparison.{md,png,json} and
    comparison_loss.png."""
    out_dir, options = Path(out_dir), dict(options or {})
    models = parse_models(models)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {protocol: protocol_results(protocol, models, out_dir, data_root, options) for protocol in protocols}
    summary = {"protocols": list(protocols), "models": models, "options": {k: v for k, v in options.items()
                                                                           if k != "configs"},
               "results": {p: {"models": [{k: v for k, v in e.items() if k != "oof"} for e in r["models"]],
                               "differences": r["differences"], "folds_file": r["folds_file"]}
                           for p, r in results.items()}}
    figure = plot_comparison(results, out_dir / "comparison.png")
    loss = plot_losses(results, out_dir / "comparison_loss.png")
    atomic_write_json(out_dir / "comparison.json", summary)
    atomic_write_text(out_dir / "comparison.md", comparison_markdown(summary, options, figure.name, loss.name))
    return summary


def _num(x, fmt: str, unit: str = "") -> str:
    return format(x, fmt) + unit if isinstance(x, (int, float)) and np.isfinite(x) else "-"


def _spread_text(sp: dict) -> str:
    """``mean (sd, min-max; n)`` of the AUC over splits."""
    if not sp or not sp.get("n"):
        return "-"
    return f"{sp['mean']:.2f} ({_num(sp['sd'], '.2f')}, {sp['min']:.2f}-{sp['max']:.2f}; {sp['n']})"


def _model_table(r: dict) -> list[str]:
    over = r["models"][0]["spread"]["over"]
    lines = [f"| model | ROC AUC (95% CI) | AUC over {over}: mean (sd, min-max; n) | balanced accuracy | F1 "
             "(positive) | macro F1 | training time | CV wall time | volumes/s | parameters | peak memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in r["models"]:
        minutes, wall = m.get("train_seconds"), m.get("cv_wall_seconds")
        lines.append(f"| {m['name']} | {_ci(m['roc_auc'])} | {_spread_text(m.get('spread'))} | "
                     f"{_ci(m['balanced_accuracy'])} | {_ci(m['f1'])} | {_ci(m['macro_f1'])} | "
                     f"{_num(minutes / 60 if minutes else None, '.1f', ' min')} | "
                     f"{_num(wall / 60 if wall else None, '.1f', ' min')} | "
                     f"{_num(m.get('train_volumes_per_s'), '.1f')} | {_num(m.get('parameters'), ',d')} | "
                     f"{_num(m.get('peak_rss_gb'), '.2f', ' GB')} |")
    return lines


def _difference_line(d: dict) -> str:
    verdict = ("the CI excludes 0" if d["ci_low"] > 0 or d["ci_high"] < 0 else "the CI includes 0: no difference shown")
    return (f"- **{d['a']} - {d['b']}** ({d['statistic']}, {d['n_splits']} splits): {d['value']:+.3f} "
            f"(95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}, {d['n_units']} subjects resampled within class "
            f"jointly over all splits, {d['n_boot']} replicates; {verdict}).")


def comparison_markdown(summary: dict, options: dict, figure: str, loss_figure: str = "comparison_loss.png") -> str:
    """comparison.md: per protocol, each model's headline AUC with its CI, its spread over splits, the
    other metrics and resources, then the paired differences; the figures."""
    lines = ["# 2D vs 3D comparison", "",
             f"Models: {', '.join(summary['models'])}; protocols: {', '.join(summary['protocols'])}"
             + (" (QUICK mode: fewer epochs, smaller inputs; see README)" if options.get("quick") else "") + ".",
             "Every model of a protocol was trained and tested on the same folds, every repeat (`folds_file` "
             "below). Each figure is read from the model's own run folder (its `metrics.json`, `resources.json`).", ""]
    for protocol, r in summary["results"].items():
        over = r["models"][0]["spread"]["over"]
        lines += [f"## Protocol: {protocol}", "",
                  f"Statistic: {r['models'][0]['statistic']} with 95% CIs resampling subjects; the spread is over "
                  + ("the pooled out-of-fold AUC of each repeat." if over == "repeats" else "the AUC of each fold.")
                  + f" Folds: `{r['folds_file']}`.", "", *_model_table(r), ""]
        lines += [_difference_line(d) for d in r["differences"]] + [""]
    lines += [f"![ROC curves]({figure})", "", f"![Training loss]({loss_figure})", "",
              "Training loss: the mean over folds (all repeats) of each epoch's mean training loss, from the runs' "
              "`history.csv`. Training time is the folds' training loops (validation included, preprocessing and "
              "reference excluded); CV wall time the whole cross-validation; volumes/s counts training scans x "
              "epochs per second; peak memory is the resident memory of the model's own training process. The "
              "reference model is fitted inside the first CNN run, so it has no separate time or memory.", ""]
    return "\n".join(lines)


def _colours(results: dict) -> dict:
    """One colour per model name, the same in every figure."""
    import matplotlib

    names = list(dict.fromkeys(m["name"] for r in results.values() for m in r["models"]))
    return {name: matplotlib.colormaps["tab10"](i % 10) for i, name in enumerate(names)}


def plot_comparison(results: dict, path: Path) -> Path:
    """Pooled out-of-fold ROC curves of every model, one panel per protocol."""
    from sklearn.metrics import roc_curve

    from petmonai.runs import _new_figure, save_figure

    colours = _colours(results)
    fig, axes = _new_figure(4.6 * len(results), 4.4, ncols=len(results))
    for ax, (protocol, r) in zip(axes.ravel(), results.items()):
        for m in r["models"]:
            oof = m["oof"]
            fpr, tpr, _ = roc_curve(oof["label"], oof["prob"])
            auc = m["roc_auc"]["value"]
            ax.plot(fpr, tpr, color=colours[m["name"]], lw=2, label=f"{m['name']} ({m['statistic']} AUC {auc:.2f})")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{protocol}: pooled out-of-fold ROC",
               xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=7)
    return save_figure(fig, path)


def mean_training_loss(run_dir: str | Path) -> pd.Series:
    """The mean over folds (all repeats) of each epoch's training loss (``train_loss`` of ``history.csv``)."""
    history = _histories(Path(run_dir))
    if history.empty or "train_loss" not in history.columns:
        return pd.Series(dtype=float)
    return history.groupby("epoch")["train_loss"].mean()


def plot_losses(results: dict, path: Path) -> Path:
    """Mean training loss per epoch of every CNN, one panel per protocol."""
    from petmonai.runs import _new_figure, save_figure

    colours = _colours(results)
    fig, axes = _new_figure(4.6 * len(results), 4.0, ncols=len(results))
    for ax, (protocol, r) in zip(axes.ravel(), results.items()):
        for m in r["models"]:
            loss = mean_training_loss(m["folder"]) if m["key"] in MODELS else pd.Series(dtype=float)
            if len(loss):
                ax.plot(loss.index, loss.to_numpy(), color=colours[m["name"]], lw=2,
                        marker="o" if len(loss) < 3 else None, label=m["name"])
        ax.set(xlabel="epoch", ylabel="training loss (mean over folds)", title=f"{protocol}: training loss")
        ax.legend(loc="upper right", fontsize=7)
    return save_figure(fig, path)
