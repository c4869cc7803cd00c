"""Preprocessing experiments: one row per configuration, site-pair and subject-grouped AUC side by side.

>>> rows = run_experiments(["configs/train3d.yaml", "configs/experiments/mask.yaml"], data_root, out_dir)  # doctest: +SKIP

Every configuration is cross-validated under each protocol on the same folds (the first run's
``folds.csv``) with the same options; the reference model of each run is fitted on that run's own
preprocessed inputs (``reference.preprocessing=package``), so it gets a row of its own per
configuration. ``experiments.md`` / ``experiments.json`` are read from the run folders.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from petmonai.runs import atomic_write_json, atomic_write_text, get_logger
from petmonai.studies.compare import train_run

log = get_logger("experiments")


PROTOCOL_ORDER = ("site-pair", "subject")


def _summary(metrics: dict) -> dict:
    fold = metrics.get("fold_auc") or {}
    pooled = (metrics.get("pooled_ci") or {}).get("roc_auc") or {}
    return {"fold_mean": fold.get("mean"), "fold_sd": fold.get("sd"), "fold_min": fold.get("min"),
            "n_folds": fold.get("n"), "pooled": pooled.get("value"), "pooled_low": pooled.get("ci_low"),
            "pooled_high": pooled.get("ci_high"), "headline": metrics["headline"]["text"]}


def run_experiments(configs, data_root, out_dir, protocols=PROTOCOL_ORDER, options: dict | None = None) -> list[dict]:
    out_dir, options = Path(out_dir), dict(options or {})
    overrides = [*options.get("overrides", []), "reference.preprocessing=package"]
    rows, folds_files = [], {}
    for config in configs:
        name = Path(config).stem
        row = {"configuration": name, "config": str(config), "results": {}, "reference": {}}
        for protocol in protocols:
            run_dir = out_dir / protocol / name
            train_run(config, run_dir, data_root, protocol, {**options, "overrides": overrides},
                      folds_files.get(protocol), with_reference=True, label=f"{protocol} / {name}")
            folds_files.setdefault(protocol, (run_dir / "folds.csv").resolve())
            row["results"][protocol] = _summary(json.loads((run_dir / "metrics.json").read_text()))
            ref = run_dir / "reference" / "metrics.json"
            if ref.is_file():
                row["reference"][protocol] = _summary(json.loads(ref.read_text()))
            row.setdefault("seed", json.loads((run_dir / "provenance.json").read_text()).get("seed"))
        rows.append(row)
        write_table(rows, out_dir, options)  # after every configuration: partial results survive
    return rows


def _fmt(x, digits=2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"


def write_table(rows: list[dict], out_dir: Path, options: dict) -> None:
    lines = ["# Preprocessing experiments", "",
             "Command: `" + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]) + "`", "",
             "| configuration | model | site-pair mean fold AUC (sd, min; folds) | subject pooled AUC (95% CI) | seed |",
             "|---|---|---|---|---|"]
    for row in rows:
        for model, results in (("3D CNN", row["results"]), ("PCA + LR reference (same inputs)", row["reference"])):
            sp, sj = results.get("site-pair", {}), results.get("subject", {})
            site = (f"{_fmt(sp.get('fold_mean'))} ({_fmt(sp.get('fold_sd'))}, {_fmt(sp.get('fold_min'))}; "
                    f"{sp.get('n_folds', '-')})" if sp else "-")
            subj = (f"{_fmt(sj.get('pooled'))} ({_fmt(sj.get('pooled_low'))}-{_fmt(sj.get('pooled_high'))})"
                    if sj else "-")
            lines.append(f"| `{row['config']}` | {model} | {site} | {subj} | {row.get('seed', '-')} |")
    atomic_write_text(out_dir / "experiments.md", "\n".join(lines) + "\n")
    atomic_write_json(out_dir / "experiments.json", {"rows": rows, "options": options})
