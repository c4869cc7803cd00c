"""``petmonai bench-predict``: benchmark the TTA ensemble (``petmonai predict``) and check that
test-time augmentation pays.

    petmonai bench-predict --run-dir RUN --data-root ../shared/data/pet2023

RUN: a finished 5-fold training run. Parts (each can be skipped):
  full    the real command, in a subprocess, on N synthetic volumes (default 100) with every fold
          model and 8 flips: wall time, volumes/s, peak resident memory;
  factors the cost of each factor (windows, flips, folds; threads, TorchScript) on a few volumes;
  oof     out-of-fold ROC AUC of each fold's model on its own held-out test scans, with and
          without TTA (every view predicted once, the variants are subsets of the views).
Writes docs/benchmarks_inference.md (and a JSON of the raw numbers next to it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import petmonai

# the checkout (or installation) this module runs from: the measured command runs the same code
PACKAGE_PARENT = Path(petmonai.__file__).resolve().parents[1]


FACTOR_CONFIGS = [
    # name, windows, flips, folds (None: all)
    ("1 view: centre window, no flip, 1 fold", "center", "none", [0]),
    ("windows: grid of 8", "grid", "none", [0]),
    ("flips: left-right (2)", "center", "lr", [0]),
    ("flips: all 8", "center", "all", [0]),
    ("folds: all fold models", "center", "none", None),
    ("default: 8 windows x 2 flips x all folds", "grid", "lr", None),
    ("centre window x 8 flips x all folds", "center", "all", None),
    ("everything: 8 windows x 8 flips x all folds", "grid", "all", None),
    ("whole volume, no flip, 1 fold", "whole", "none", [0]),
    ("whole volume x 8 flips x all folds", "whole", "all", None),
]

OOF_VARIANTS = [
    # name, source, windows, flip subset
    ("no TTA: whole volume (as the training evaluator)", "whole", "whole", [()]),
    ("whole volume x left-right flip", "whole", "whole", [(), (0,)]),
    ("whole volume x 8 flips", "whole", "whole", "all"),
    ("no TTA: centre window", "center", "center", [()]),
    ("centre window x left-right flip", "center", "center", [(), (0,)]),
    ("centre window x 8 flips", "center", "center", "all"),
    ("8 windows, no flip", "grid", "grid", [()]),
    ("8 windows x left-right flip (default)", "grid", "grid", [(), (0,)]),
    ("8 windows x 8 flips", "grid", "grid", "all"),
]


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def synthetic_inputs(n: int, folder: Path) -> Path:
    from petmonai.data import generate_cohort

    return generate_cohort(folder, n_nc=2, n_mci=2, n_test=n, seed=11) / "Test"


def full_run(run_dir: Path, inputs: Path, out_dir: Path, windows: str, flips: str, threads) -> dict:
    """The user's command in a subprocess: wall time and the child's peak resident memory."""
    from petmonai.inference import output_paths

    submission = out_dir / "submission.csv"
    cmd = [sys.executable, "-m", "petmonai.commands", "predict", "--run-dir", str(run_dir), "--input", str(inputs),
           "--output", str(submission), "--overwrite", "--windows", windows, "--flips", flips]
    if threads:
        cmd += ["--set", f"inference.threads={threads}"]
    load = load_average()
    log_path = out_dir.parent / f"{out_dir.name}.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        path = os.pathsep.join([str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": path})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak resident memory
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log_path.read_text()[-3000:]}")
    n = len(pd.read_csv(submission))
    prov = json.loads(output_paths(submission, saliency=False)["provenance"].read_text())
    return {"command": " ".join(["petmonai", *cmd[3:]]),
            "volumes": n, "wall_s": wall, "volumes_per_s": n / wall, "peak_rss_gb": usage.ru_maxrss / 1024**2,
            "views_per_volume": prov["views"]["n_views"] * len(prov["checkpoints"]),
            "models": len(prov["checkpoints"]), "load_average_before": load, "load_average_after": load_average(),
            "threads": threads or "torch default"}


def factor_costs(run_dir: Path, inputs: Path, n_volumes: int, threads, log) -> list[dict]:
    """Per-volume seconds of each configuration, in process, preprocessing timed apart."""
    from petmonai.inference import (
        collect_inputs,
        load_models,
        load_run,
        predict_views,
        prepare_all,
        torch_threads,
    )

    files = collect_inputs([inputs])[:n_volumes]
    rows = []
    base = load_run(run_dir, {"threads": threads}, with_models=False)
    with torch_threads(threads):
        t0 = time.perf_counter()
        prepared, _ = prepare_all(files, base, skip_bad=False)
        pre_s = (time.perf_counter() - t0) / len(files)
    rows.append({"config": "preprocessing only (read, resample, normalise, crop)", "views": 0,
                 "s_per_volume": pre_s, "ms_per_view": float("nan")})
    runs = {}
    for name, windows, flips, folds in FACTOR_CONFIGS:
        key = (folds is None, "jit")
        if key not in runs:
            t0 = time.perf_counter()
            runs[key] = load_models(load_run(run_dir, {"threads": threads, "folds": folds or "all"}, with_models=False))
            log(f"loaded {len(runs[key].models)} model(s) in {time.perf_counter() - t0:.1f}s")
        run = runs[key]
        run.strategy = type(run.strategy)(run.cfg, {**run.options, "windows": windows, "flips": flips})
        vols = prepared if "everything" not in name else prepared[:max(1, len(prepared) // 3)]
        with torch_threads(threads):
            predict_views(run, vols[0].volume)  # warm-up (oneDNN primitive creation)
            t0 = time.perf_counter()
            n_views = 0
            for prep in vols:
                n_views = predict_views(run, prep.volume).size
            sec = (time.perf_counter() - t0) / len(vols)
        rows.append({"config": name, "views": n_views, "s_per_volume": sec, "ms_per_view": 1000 * sec / n_views,
                     "volumes_timed": len(vols)})
        log(f"{name}: {sec:.2f} s/volume ({n_views} views)")
    # implementation choices, on the 8-flip centre-window configuration of one model
    for label, opts in (("plain PyTorch (no TorchScript), same threads", {"optimize": "none", "threads": threads}),
                        ("TorchScript, 1 thread", {"threads": 1}), ("TorchScript, 2 threads", {"threads": 2})):
        run = load_models(load_run(run_dir, {**opts, "folds": [0], "windows": "center", "flips": "all"},
                                   with_models=False))
        with torch_threads(opts["threads"]):
            predict_views(run, prepared[0].volume)
            t0 = time.perf_counter()
            for prep in prepared:
                n_views = predict_views(run, prep.volume).size
            sec = (time.perf_counter() - t0) / len(prepared)
        rows.append({"config": f"centre x 8 flips x 1 fold: {label}", "views": n_views, "s_per_volume": sec,
                     "ms_per_view": 1000 * sec / n_views, "volumes_timed": len(prepared)})
        log(f"{label}: {sec:.2f} s/volume")
    return rows


def _flip_index(labels: list[str], flips, windows_ok=True) -> np.ndarray:
    wanted = None if flips == "all" else {"+".join(map(str, f)) or "none" for f in flips}
    return np.array([wanted is None or lab.split()[0].split("=")[1] in wanted for lab in labels])


def paired_bootstrap(y, a, b, subjects, n_boot=2000, seed=0) -> tuple[float, float]:
    """95% CI of AUC(b) - AUC(a), resampling subjects (paired: the same scans for both)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    groups = pd.Series(np.arange(len(y))).groupby(np.asarray(subjects)).apply(list).tolist()
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        if len(np.unique(y[idx])) < 2:
            continue
        diffs.append(roc_auc_score(y[idx], b[idx]) - roc_auc_score(y[idx], a[idx]))
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def oof_auc(run_dir: Path, threads, log) -> dict:
    from sklearn.metrics import roc_auc_score

    from petmonai.inference import load_run, predict_out_of_fold

    t0 = time.perf_counter()
    per = {}
    for source in ("whole", "center", "grid"):
        opts = {"windows": source, "flips": "all", "threads": threads}
        table = predict_out_of_fold(run_dir, opts, progress=False)
        run = load_run(run_dir, opts, with_models=False)
        labels = run.strategy.labels([1, *run.cfg["spatial_size"]])
        per[source] = (table, labels)
        log(f"out-of-fold views ({source}) in {time.perf_counter() - t0:.0f}s")
    base = per["center"][0][["repeat", "fold", "scan_id", "subject", "label"]]
    for source, (table, _) in per.items():
        if not table["scan_id"].equals(base["scan_id"]):
            raise RuntimeError(f"held-out scans of the {source} pass are not in the same order")
    # the views the cross-validation scored held-out scans with (the whole volume without flips for
    # training's evaluator; cv.test_views: inference, the prediction views): the same preprocessing and
    # weights must give the same numbers as the run's oof_predictions.csv
    run_views = json.loads((run_dir / "metrics.json").read_text()).get("test_views") or {"mode": "evaluator"}
    if run_views.get("mode") == "inference":
        source, flips = str(run_views["windows"]), [tuple(f) for f in run_views["flips"]]
        check_views = f"the prediction views it scored held-out scans with ({source} windows x {len(flips)} flips)"
    else:
        source, flips, check_views = "whole", [()], "the whole volume without flips (training's evaluator)"
    oof = pd.read_csv(run_dir / "oof_predictions.csv", dtype={"scan_id": str})
    check = base.merge(oof[["repeat", "fold", "scan_id", "prob_mci"]], on=["repeat", "fold", "scan_id"], how="left")
    check_table, check_labels = per[source]
    mine = np.array([p[_flip_index(check_labels, flips)].mean() for p in check_table["probs"]])
    consistency = float(np.nanmax(np.abs(check["prob_mci"].to_numpy() - mine)))
    log(f"{check_views} vs the run's oof_predictions.csv: max |difference| {consistency:.2g}")
    y = base["label"].to_numpy()
    subjects = base["subject"].to_numpy()
    scores = {}
    for name, source, windows, flips in OOF_VARIANTS:
        table, labels = per[source]
        keep = _flip_index(labels, flips)
        p = np.array([probs[keep].mean() for probs in table["probs"]])
        n_views = int(keep.sum())
        fold_auc = [roc_auc_score(y[m], p[m]) for m in (base["fold"] == f for f in sorted(base["fold"].unique()))
                    if len(np.unique(y[m])) == 2]
        scores[name] = {"views": n_views, "probs": p, "pooled_auc": float(roc_auc_score(y, p)),
                        "mean_fold_auc": float(np.mean(fold_auc))}
    ref_name = OOF_VARIANTS[0][0]
    for name, s in scores.items():
        if name != ref_name:
            s["delta_ci"] = paired_bootstrap(y, scores[ref_name]["probs"], s["probs"], subjects)
    for s in scores.values():
        s.pop("probs")
    return {"n_scans": int(len(y)), "n_subjects": int(len(set(subjects))), "n_mci": int(y.sum()),
            "max_abs_diff_to_run_oof": consistency, "check_views": check_views,
            "reference": ref_name, "variants": scores, "seconds": time.perf_counter() - t0}


def reading(o: dict) -> str:
    """What the out-of-fold table says, in words computed from it."""
    v = o["variants"]
    ref = v[o["reference"]]
    best_pooled = max(v, key=lambda k: v[k]["pooled_auc"])
    best_fold = max(v, key=lambda k: v[k]["mean_fold_auc"])
    significant = [k for k, s in v.items() if s.get("delta_ci") and (s["delta_ci"][0] > 0 or s["delta_ci"][1] < 0)]
    default = next(k for k in v if "(default)" in k)
    return (f"Reading: best pooled AUC '{best_pooled}' ({v[best_pooled]['pooled_auc']:.3f}), best mean fold AUC "
            f"'{best_fold}' ({v[best_fold]['mean_fold_auc']:.3f}); the default ensemble "
            f"{v[default]['pooled_auc'] - ref['pooled_auc']:+.3f} pooled and "
            f"{v[default]['mean_fold_auc'] - ref['mean_fold_auc']:+.3f} mean-fold AUC against no TTA. "
            + ("No difference to no TTA is outside its 95% CI." if not significant else
               f"Outside the 95% CI: {', '.join(significant)}."))


def render(r: dict) -> str:
    m, v = r["machine"], r["versions"]
    lines = [
        "# Inference benchmark: the TTA fold ensemble (`petmonai predict`)",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Machine: {m['cpu']}, {m.get('cpu_count', '?')} CPU cores, {m['memory_gb']} GB RAM, GPU: {m['gpu'] or 'none'}; "
        f"torch {v['torch']}, MONAI {v['monai']}, Python {v['python']}; petmonai at {r['git_commit']}.",
        f"Run: `{r['run_dir']}` ({r['models']} fold models, {r['model']}, crop {r['crop_size']} of "
        f"{r['spatial_size']} voxels at {r['spacing']} mm)"
        + (f", trained by `{r['run_command']}`" if r.get("run_command") else "") + f". Date: {r['date']}.",
        "",
        f"The CPU was shared with other jobs while these numbers were taken (load average "
        f"{r['load_average_start']} at the start, {r['load_average_end']} at the end, on 2 cores): "
        "times are upper bounds for an idle machine.",
        "",
    ]
    if r.get("full"):
        lines += ["## The full submission", "",
                  "| configuration | volumes | forward passes per volume (views x models) | wall time | volumes/s | "
                  "peak resident memory | target |",
                  "|---|---|---|---|---|---|---|"]
        for f in r["full"]:
            target = "< 10 min" if "--flips all" in f["command"] and f["models"] >= 5 else ""
            ok = "" if not target else (" (met)" if f["wall_s"] < 600 else " (NOT met)")
            lines.append(f"| `{f['command'].split('--overwrite ')[-1]}` | {f['volumes']} | {f['views_per_volume']} | "
                         f"{f['wall_s'] / 60:.1f} min | {f['volumes_per_s']:.2f} | {f['peak_rss_gb']:.2f} GB | "
                         f"{target}{ok} |")
        lines += ["", "Wall time includes start-up, loading the fold models, reading and preprocessing every volume "
                  "and writing the outputs (full commands in the JSON next to this file). Load average during the "
                  "runs: " + "; ".join(f"{f['load_average_before']} -> {f['load_average_after']}" for f in r["full"]),
                  ""]
    if r.get("factors"):
        lines += ["## Cost of each factor", "",
                  f"In process, on {r['factor_volumes']} synthetic volumes (the 'everything' row on a third of them), "
                  "after one warm-up volume; preprocessing timed apart.", "",
                  "| configuration | forward passes per volume (views x models) | s per volume | ms per pass | "
                  "100 volumes |", "|---|---|---|---|---|"]
        pre = r["factors"][0]["s_per_volume"]
        for f in r["factors"]:
            total = 100 * (f["s_per_volume"] + (pre if f["views"] else 0))
            per_view = f"{f['ms_per_view']:.0f}" if f["views"] else ""
            lines.append(f"| {f['config']} | {f['views'] or '-'} | {f['s_per_volume']:.2f} | {per_view} | "
                         f"{total / 60:.1f} min |")
        lines += ["", "Time is proportional to views x models: each factor multiplies it (windows x8, flips x2 or "
                  "x8, folds x5; a whole-volume view costs ~1.7 windows); '100 volumes' adds the preprocessing per "
                  "volume, not start-up or model loading. Single-view rows include fixed per-call overhead.", ""]
    if r.get("oof"):
        o = r["oof"]
        lines += ["## Does test-time augmentation pay? Out-of-fold ROC AUC on the shared data", "",
                  f"Each fold's model on its own held-out `test` scans (folds.csv of the run): {o['n_scans']} scans of "
                  f"{o['n_subjects']} subjects ({o['n_mci']} MCI), pooled over folds, and the mean of the per-fold AUCs. "
                  f"Delta: paired subject-bootstrap 95% CI of the AUC difference to '{o['reference']}'.", "",
                  "| test-time views | views per scan | pooled OOF AUC | mean fold AUC | delta AUC 95% CI |",
                  "|---|---|---|---|---|"]
        for name, s in o["variants"].items():
            ci = s.get("delta_ci")
            ci_text = "reference" if ci is None else f"{ci[0]:+.3f} to {ci[1]:+.3f}"
            lines.append(f"| {name} | {s['views']} | {s['pooled_auc']:.3f} | {s['mean_fold_auc']:.3f} | {ci_text} |")
        check_views = o.get("check_views", "the whole volume without flips (training's evaluator)")
        lines += ["", f"Check: {check_views} reproduce the run's own `oof_predictions.csv` to "
                  f"{o['max_abs_diff_to_run_oof']:.1g} (max |difference| in P(MCI)): prediction feeds the models "
                  "exactly as the cross-validation did.", "",
                  reading(o), "", r.get("note") or "", ""]
    return "\n".join(lines).rstrip() + "\n"


def rerender(from_json: str | Path, output: str | Path, note: str | None = None) -> None:
    """Measure nothing: the Markdown again from a JSON :func:`bench_predict` wrote (with a new ``note``)."""
    from petmonai.runs import atomic_write_json, atomic_write_text

    r = json.loads(Path(from_json).read_text())
    r["note"] = note if note is not None else r.get("note")
    atomic_write_json(Path(output).with_suffix(".json"), r)
    atomic_write_text(output, render(r))


def bench_predict(run_dir: str | Path, inputs=None, volumes: int = 100, factor_volumes: int = 6, threads=None,
                  full: str = "center:all,whole:all,grid:lr,grid:all", factors: bool = True, oof: bool = True,
                  output: str | Path = "docs/benchmarks_inference.md", note: str | None = None,
                  command: str = "petmonai bench-predict") -> dict:
    """Everything ``petmonai bench-predict`` does (the parts in the module docstring); returns the
    figures, written to ``output`` (Markdown) and its JSON."""
    from petmonai.inference import load_run
    from petmonai.runs import atomic_write_json, atomic_write_text, git_commit, versions
    from petmonai.studies import machine

    def log(msg):
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    run_dir, output = Path(run_dir), Path(output)
    run = load_run(run_dir, with_models=False)
    r = {"command": command, "machine": {**machine(), "cpu_count": os.cpu_count()}, "versions": versions(),
         "git_commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M"), "run_dir": str(run_dir),
         "models": len(run.checkpoints), "model": run.cfg["model"].get("name", run.cfg["model"].get("_target_")),
         "crop_size": run.cfg["crop_size"], "spatial_size": run.cfg["spatial_size"], "spacing": run.cfg["spacing"],
         "load_average_start": load_average(), "note": note, "run_command": run.run_provenance.get("command")}
    with tempfile.TemporaryDirectory(prefix="bench_predict.") as tmp:
        tmp = Path(tmp)
        inputs = inputs or synthetic_inputs(volumes, tmp / "synthetic")
        log(f"inputs: {inputs}")
        if full:
            r["full"] = []
            for spec in full.split(","):
                windows, flips = spec.split(":")
                res = full_run(run_dir, inputs, tmp / f"out_{windows}_{flips}", windows, flips, threads)
                log(f"full run {spec}: {res['wall_s']:.0f}s, {res['volumes_per_s']:.2f} volumes/s, "
                    f"{res['peak_rss_gb']:.2f} GB")
                r["full"].append(res)
        if factors:
            r["factor_volumes"] = factor_volumes
            r["factors"] = factor_costs(run_dir, inputs, factor_volumes, threads, log)
    if oof:
        r["oof"] = oof_auc(run_dir, threads, log)
    r["load_average_end"] = load_average()
    atomic_write_json(output.with_suffix(".json"), r)
    atomic_write_text(output, render(r))
    log(f"wrote {output}")
    return r
