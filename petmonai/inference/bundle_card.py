"""The model card (``docs/README.md``) and ``LICENSE`` of a run's MONAI bundle.

The card is written from what the run folder recorded: ``audit.json`` (the training data and its
warnings), ``metrics.json`` and ``reference/metrics.json`` (the cross-validation figures with their
95% CIs), ``config.yaml`` (the preprocessing) and ``provenance.json``. What the run did not record is
said to be missing, never made up.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from petmonai.config import pipeline_entries
from petmonai.evaluation import METRIC_KEYS, METRIC_LABELS
from petmonai.inference.predictor import LoadedRun, sha256_file

NOT_FOR_CLINICAL_USE = ("**Not for clinical use.** A research model: not a medical device, not validated for "
                        "diagnosis or screening, and not to be used to make decisions about patients.")


def read_json_or_empty(path: Path) -> dict:
    """A JSON file of the run folder, or ``{}`` when it is missing or unreadable (the card says what is missing)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _num(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def model_card(run: LoadedRun, metadata: dict, check: dict) -> str:
    """The bundle's ``docs/README.md``."""
    metrics = read_json_or_empty(run.run_dir / "metrics.json")
    reference = read_json_or_empty(run.run_dir / "reference" / "metrics.json")
    sections = [
        f"# {metadata['name']}\n\n{NOT_FOR_CLINICAL_USE}\n\n{metadata['description']}\n",
        _data_section(run),
        _figures_section(metrics, reference, run.classes[1]),
        _preprocessing_section(run),
        _ensemble_section(run, check),
        _limits_section(run),
        _usage_section(run.classes),
        _provenance_section(run, metadata),
    ]
    return "\n".join(sections)


def _data_section(run: LoadedRun) -> str:
    audit = read_json_or_empty(run.run_dir / "audit.json")
    synthetic = bool(run.run_provenance.get("synthetic_data", audit.get("synthetic", False)))
    lines = ["## Training data\n"]
    if synthetic:
        lines.append("**SYNTHETIC data**: a generated phantom cohort. The figures below show that the pipeline "
                     "runs, nothing about patients.\n")
    lines.append(f"Source: `{(run.cfg.get('data') or {}).get('root') or 'synthetic cohort'}`. "
                 f"Classes: {', '.join(f'{i} = {c}' for i, c in enumerate(run.classes))} "
                 f"({run.classes[1]} is the positive class).\n")
    train = audit.get("train") or {}
    if train:
        per_class = "; ".join(f"{name}: {c.get('scans')} scans of {c.get('subjects')} subjects"
                              for name, c in (train.get("classes") or {}).items())
        lines.append(f"{train.get('scans')} training scans of {train.get('subjects')} subjects ({per_class}).\n")
    else:
        lines.append("The run folder holds no data audit (`audit.json`): the training data is not described here.\n")
    warnings, notes = audit.get("warnings") or [], audit.get("notes") or []
    if warnings or notes:
        lines.append("Data audit of the training data (petmonai's `audit.md` of the run):\n")
        lines += [f"- **{w}**" for w in warnings] + [f"- {n}" for n in notes]
        lines.append("")
    return "\n".join(lines)


def _metric_rows(m: dict) -> list[tuple[str, str, str]]:
    pooled_ci, fold_ci, folds = m.get("pooled_ci") or {}, m.get("fold_mean_ci") or {}, m.get("fold_summary") or {}
    rows = []
    for key in METRIC_KEYS:
        p, f, s = pooled_ci.get(key) or {}, fold_ci.get(key) or {}, folds.get(key) or {}
        pooled = f"{_num(p.get('value'))} ({_num(p.get('ci_low'))}-{_num(p.get('ci_high'))})" if p else "n/a"
        fold = (f"{_num(s.get('mean'))} ± {_num(s.get('sd'))} ({_num(f.get('ci_low'))}-{_num(f.get('ci_high'))})"
                if s else "n/a")
        rows.append((METRIC_LABELS[key], pooled, fold))
    return rows


def _figures_section(metrics: dict, reference: dict, positive: str) -> str:
    lines = ["## Cross-validation figures\n"]
    if not metrics.get("pooled_ci"):
        lines.append("The run folder records no cross-validation figures (`metrics.json` has none): this model "
                     "comes without an estimate of how well it classifies.\n")
        return "\n".join(lines)
    lines.append(f"Protocol: **{metrics.get('protocol', 'n/a')}**{' (LEAKY)' if metrics.get('leaky') else ''}. "
                 f"{metrics.get('protocol_description', '')}\n")
    boot = metrics.get("bootstrap") or {}
    lines.append(f"Out-of-fold test predictions; 95% CIs: percentile bootstrap, {boot.get('n_boot', 'n/a')} "
                 f"replicates resampling {boot.get('unit', 'subject')}s. Decision threshold of the figures: "
                 f"{metrics.get('threshold', 'n/a')} on P({positive}) ({metrics.get('threshold_mode', 'n/a')}); the bundle "
                 "itself writes probabilities, no labels.\n")
    models = [("This model", metrics)] + ([("PCA + LR reference", reference)] if reference.get("pooled_ci") else [])
    for name, m in models:
        lines += [f"**{name}**: {(m.get('headline') or {}).get('text', 'n/a')}.\n",
                  "| Metric | Pooled out-of-fold (95% CI) | Fold mean ± sd (95% CI) |", "|---|---|---|"]
        lines += [f"| {label} | {pooled} | {fold} |" for label, pooled, fold in _metric_rows(m)]
        lines.append("")
    if not reference.get("pooled_ci"):
        lines.append("No reference model was run with this run (`report.reference_model`); compare with one before "
                     "trusting the CNN's figures.\n")
    return "\n".join(lines)


def _describe_transform(entry: dict) -> str:
    args = ", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("_target_", "keys"))
    return f"`{entry.get('_target_', '?')}`" + (f" ({args})" if args else "")


def _preprocessing_section(run: LoadedRun) -> str:
    cfg = run.cfg
    lines = ["## Preprocessing\n",
             "The run's own preprocessing, in `configs/inference.json` (`preprocessing`), applied to every input "
             f"volume: the network sees a {'x'.join(map(str, cfg['spatial_size']))} grid of "
             f"{cfg['spacing'][0]} mm voxels.\n"]
    lines += [f"{i}. {_describe_transform(t)}" for i, t in enumerate(pipeline_entries(cfg, "preprocess"), 1)]
    template = cfg.get("template") or {}
    if template:
        lines.append(f"\nRegistration: {template.get('transform', 'n/a')} to "
                     f"{'the run’s own template (resources/)' if template.get('image') else 'the built-in MNI FDG template'}"
                     f"; a scan whose registered image correlates with the template below "
                     f"{template.get('min_correlation', 'n/a')} is rejected (named in the error, or in skipped.csv).")
    return "\n".join(lines) + "\n"


def _ensemble_section(run: LoadedRun, check: dict) -> str:
    desc = run.strategy.describe()
    lines = ["## Network\n",
             f"`network_def`: `petmonai.inference.ViewEnsemble` of {len(run.checkpoints)} fold models "
             f"(`fold_network`, weights in `models/model.pt`). Each preprocessed volume is cut into "
             f"{desc['n_windows']} windows of the training crop {desc['crop_size']} ({desc['windows']}, overlap "
             f"{desc['overlap']}) x {desc['n_flips']} flips {desc['flips']} = {desc['n_views']} views; every fold "
             "model scores every view, and the class probabilities are the mean softmax. The network returns their "
             "log; the bundle's postprocessing (softmax) gives the probabilities back.\n",
             f"Checked at export against `petmonai predict` on {check['volume']}: largest difference in a class "
             f"probability {check['max_abs_difference']:.2g}.\n",
             "| Repeat | Fold | Checkpoint sha256 |", "|---|---|---|"]
    lines += [f"| {r} | {f} | `{sha256_file(p)[:16]}…` |" for r, f, p in run.checkpoints]
    return "\n".join(lines) + "\n"


def _limits_section(run: LoadedRun) -> str:
    audit = read_json_or_empty(run.run_dir / "audit.json")
    confounded = any("site" in w.lower() for w in audit.get("warnings") or [])
    lines = ["## Intended use and limits\n", f"- {NOT_FOR_CLINICAL_USE}",
             "- Intended for research on brain FDG-PET of the population it was trained on; inputs are whole-brain "
             "FDG-PET NIfTI volumes. Other tracers, modalities, partial fields of view or other populations are "
             "outside its training.",
             "- The cross-validation figures are in-distribution estimates with wide confidence intervals from a small "
             "cohort; they do not transfer to other scanners or sites."]
    if confounded:
        lines.append("- **Site/class confound**: in the training data the acquisition site separates the classes "
                     "(see the audit above). The model may recognise the scanner instead of the disease; its "
                     "probabilities on scans from other sites are not evidence of " + run.classes[1] + ".")
    lines += ["- Scans of subjects who were in the training data get optimistic probabilities.",
              "- The probabilities are not calibrated for other cohorts, and the bundle applies no decision "
              "threshold."]
    return "\n".join(lines) + "\n"


def _usage_section(classes) -> str:
    return "\n".join([
        "## How to run\n",
        "Install petmonai (which brings MONAI and the packages of `configs/metadata.json`), then, from the "
        "folder that holds this bundle (`BUNDLE`):\n",
        "```bash",
        "python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE \\",
        "    --dataset_dir FOLDER_OF_NIFTI --output_dir OUT",
        "```\n",
        "`OUT/probabilities.csv`: one row per volume: `uuid` (the file stem), `file`, "
        + ", ".join(f"`prob_{c.lower()}`" for c in classes) + ". A volume that cannot be used (unreadable, "
        "wrong field of view, failed registration) stops the run naming it; add `--skip_bad True` to predict the "
        "others and list it in `OUT/skipped.csv`.\n",
        "Checks with MONAI's own tools (offline):\n",
        "```bash",
        "python -m monai.bundle verify_metadata --meta_file BUNDLE/configs/metadata.json \\",
        "    --filepath BUNDLE/configs/metadata_schema.json",
        "python -m monai.bundle verify_net_in_out network_def --meta_file BUNDLE/configs/metadata.json \\",
        "    --config_file BUNDLE/configs/inference.json",
        "python -m monai.bundle ckpt_export network_def --filepath BUNDLE/models/model.ts --bundle_root BUNDLE \\",
        "    --meta_file BUNDLE/configs/metadata.json --config_file BUNDLE/configs/inference.json",
        "```\n",
    ])


def _provenance_section(run: LoadedRun, metadata: dict) -> str:
    prov = run.run_provenance
    lines = ["## Provenance\n",
             f"- Run folder: `{run.run_dir.name}`; config sha256 `{sha256_file(run.run_dir / 'config.yaml')[:16]}…`",
             f"- petmonai git commit of the training: `{prov.get('git_commit', 'not recorded')}`",
             f"- Training data fingerprint (sha256): `{prov.get('data_fingerprint_sha256', 'not recorded')}`",
             f"- Exported with MONAI {metadata['monai_version']}, PyTorch {metadata['pytorch_version']}, "
             f"numpy {metadata['numpy_version']}; required packages: "
             + ", ".join(f"{k} {v}" for k, v in metadata["required_packages_version"].items())]
    return "\n".join(lines) + "\n"


def bundle_license(run: LoadedRun, metadata: dict) -> str:
    """The default ``LICENSE``: who holds the weights, and that the training data's terms apply."""
    return "\n".join([
        f"{metadata['name']}",
        "",
        f"{metadata['copyright']}. Authors: {metadata['authors']}.",
        "",
        "The model weights (models/model.pt) were trained with petmonai on the data named in",
        f"docs/README.md ({metadata.get('data_source', 'not recorded')}). Their use and redistribution are",
        "subject to that data's terms of use (for ADNI data, the ADNI Data Use Agreement): check them",
        "before sharing this bundle. No licence to the training data is granted.",
        "",
        "NOT FOR CLINICAL USE. THE BUNDLE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR",
        "IMPLIED. IN NO EVENT SHALL THE AUTHORS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY ARISING",
        "FROM ITS USE.",
        "",
        "Replace this file with your own terms: petmonai export-bundle --license FILE.",
        "",
    ])
