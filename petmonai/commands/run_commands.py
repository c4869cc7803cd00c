"""Commands on training runs: ``petmonai train``, ``predict``, ``report``, ``anchor-folds``."""

from __future__ import annotations

from pathlib import Path

from petmonai.commands import options
from petmonai.commands.registry import command


def add_training_options(parser) -> None:
    options.add_config(parser, help="YAML config (default: train3d; demo3d without --data-root); a file or "
                                    "a shipped name")
    options.add_data_root(parser, help=options.DATA_ROOT_HELP + "; omitted: a synthetic phantom cohort")
    options.add_output_dir(parser, help="run folder (default: runs/<name>-<time>)",
                           overwrite="replace an existing run folder")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue a killed run where it stopped (its own config, data and folds)")
    parser.add_argument("--cv", choices=["subject", "site-pair", "scan"], default=None, help="CV protocol")
    parser.add_argument("--folds", type=int, default=None, help="number of CV folds")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of subject-grouped K-fold (new seeds)")
    parser.add_argument("--folds-file", default=None, help="reuse the folds.csv of an earlier run")
    parser.add_argument("--allow-leaky", action="store_true", help="permit the leaky scan-level protocol")
    parser.add_argument("--max-epochs", type=int, default=None)
    options.add_device(parser)
    options.add_seed(parser)
    options.add_skip_bad(parser, help="skip unreadable volumes, listing them in the run folder")


def training_overrides(args) -> list[str]:
    """``--set`` entries, then the named options that map onto config entries (they win)."""
    pairs = {"cv.protocol": args.cv, "cv.folds": args.folds, "cv.repeats": args.repeats,
             "cv.folds_file": args.folds_file, "train.max_epochs": args.max_epochs, "seed": args.seed}
    named = [f"{k}={v}" for k, v in pairs.items() if v is not None]
    named += ["data.skip_bad=true"] * args.skip_bad + ["cv.allow_leaky=true"] * args.allow_leaky
    return [*args.overrides, *named]


@command("train", "Train and cross-validate the 3D CNN of a config (without --data-root: a synthetic demo).",
         add_training_options,
         description="Train and cross-validate the 3D CNN of the config (default: the small 3D SFCN of "
                     "configs/train3d.yaml), NC vs MCI on brain FDG-PET. Without --data-root it runs a demo on a "
                     "generated SYNTHETIC phantom cohort.")
def train_command(args) -> None:
    from petmonai.commands.workflows import train

    train(config=args.config, data_root=args.data_root, overrides=training_overrides(args),
          output_dir=args.output_dir, overwrite=args.overwrite, resume=args.resume, device=args.device)


def predict_options(p) -> None:
    p.add_argument("--run-dir", type=Path, required=True, help="training run folder (petmonai train --output-dir)")
    options.add_inputs(p)
    options.add_output(p, default=Path("submission.csv"),
                       help="submission CSV (default: ./submission.csv); its side files are named after it: for "
                            "out/sub.csv, out/sub.probabilities.csv, out/sub.provenance.json, out/sub.skipped.csv "
                            "(with --skip-bad) and out/sub.saliency/ (with --saliency)",
                       overwrite="replace existing output files")
    options.add_skip_bad(p, help="leave out volumes that cannot be used (listed in <output>.skipped.csv) "
                                 "instead of stopping")
    p.add_argument("--saliency", action="store_true",
                   help="also write Grad-CAM maps per volume (NIfTI on the input grid + PNG montage) to "
                        "<output>.saliency/")
    g = p.add_argument_group("test-time augmentation (defaults: the run config's inference: section)")
    g.add_argument("--windows", choices=["grid", "center", "whole"], default=None,
                   help="grid: sliding windows of the training crop covering the volume (default); center: one "
                        "centred window; whole: the whole preprocessed volume, as the training evaluator")
    g.add_argument("--overlap", type=float, default=None, help="overlap of neighbouring windows, 0 <= o < 1 (0.5)")
    g.add_argument("--flips", default=None,
                   help="test-time flips: none, lr (left-right, default), all (8), or axis combinations like 0,1,0+1")
    g.add_argument("--folds", default=None, help="comma-separated fold numbers to use (default: all)")
    g.add_argument("--threshold", type=float, default=None, help="decision threshold on the positive class's probability (default: the run's)")
    g.add_argument("--batch-size", type=int, default=None, help="views per forward pass")
    options.add_device(g)
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is often faster on a CPU shared with other jobs")
    g.add_argument("--amp", choices=["auto", "true", "false"], default=None,
                   help="auto: autocast on CUDA, fp32 on CPU; true: also bf16 on a CPU that has it; false: fp32")
    g.add_argument("--saliency-class", default=None,
                   help="class whose evidence Grad-CAM maps: one of the run's classes, or predicted (the default)")
    g.add_argument("--saliency-layer", default=None,
                   help="Grad-CAM target layer (default: by model, features.block4 of the 3D SFCN, layer3 of a ResNet)")
    options.add_set(g, metavar="inference.KEY=VALUE",
                    help="any inference option, e.g. --set inference.workers=1 (repeatable)")


@command("predict", "Predict the run's two classes for new volumes with its fold ensemble (the challenge submission).",
         predict_options,
         description="Write the challenge submission (uuid,label) for NIfTI volumes with every fold model of a "
                     "training run, its own preprocessing and test-time augmentation (sliding windows x flips).")
def predict_command(args) -> None:
    from petmonai.inference import parse_set_overrides, predict
    from petmonai.runs import setup_logging

    setup_logging(None)
    named = {"windows": args.windows, "overlap": args.overlap, "flips": args.flips, "threshold": args.threshold,
             "batch_size": args.batch_size, "device": args.device, "amp": args.amp, "threads": args.threads,
             "saliency_class": args.saliency_class, "saliency_layer": args.saliency_layer,
             "folds": options.comma_list(args.folds, int)}
    inference = {**parse_set_overrides(args.overrides), **{k: v for k, v in named.items() if v is not None}}
    result = predict(args.run_dir, args.input, args.output, overwrite=args.overwrite, skip_bad=args.skip_bad,
                     saliency=args.saliency, options=inference)
    print(f"{len(result.table) + len(result.skipped)} input volume(s): {len(result.table)} predicted, "
          f"{len(result.skipped)} skipped ({result.seconds:.1f}s) -> {result.paths['submission']}")
    for rec in result.skipped.itertuples(index=False):
        print(f"skipped: {rec.file}: {rec.problem}")


def report_options(parser) -> None:
    parser.add_argument("run_dir", type=Path, help="run folder written by petmonai train")
    parser.add_argument("--reference", action="store_true",
                        help="run the PCA + logistic-regression reference on the run's folds first "
                             "(when reference/ is missing or should be redone; needs the image files)")
    options.add_data_root(parser, help="with --reference: where the images are now, if they moved since training")
    options.add_set(parser, flag="--reference-set", dest="reference_overrides",
                    help="with --reference: config override for the reference fit (repeatable), "
                         "e.g. reference.features=regions")
    parser.add_argument("--reference-name", default="reference",
                        help="with --reference: sub-folder for its outputs (default reference/, the one "
                             "report.md shows)")
    parser.add_argument("--recompute", action="store_true",
                        help="recompute metrics and CIs from the prediction files instead of metrics.json")
    parser.add_argument("--bootstrap", type=int, default=None, help="bootstrap replicates with --recompute")
    parser.add_argument("--no-figures", action="store_true", help="write report.md only")


@command("report", "Rebuild the evaluation report (report.md + figures) of a finished run.", report_options,
         description="Write report.md, roc.png, confusion.png, calibration.png and training_curves.png into a "
                     "finished run folder, from its predictions and metrics.")
def report_command(args) -> None:
    from petmonai.commands.workflows import report

    print(report(args.run_dir, reference=args.reference, data_root=args.data_root,
                 reference_overrides=args.reference_overrides, reference_name=args.reference_name,
                 recompute=args.recompute, n_boot=args.bootstrap, figures=not args.no_figures))


def anchor_options(parser) -> None:
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished petmonai train run")
    source = parser.add_mutually_exclusive_group(required=True)
    options.add_inputs(source, flag="--reference", required=False,
                       help="unlabeled scans every fold model scores, e.g. the challenge's Test folder")
    source.add_argument("--training-reference", action="store_true",
                        help="anchor each fold model on its own training scans instead (no external scans)")
    options.add_output(parser, help="JSON of the AUCs (and a CSV of the scores beside it)")


@command("anchor-folds", "Pooled out-of-fold AUC of a run with each fold model anchored on unlabeled scans.",
         anchor_options,
         description="Pooled out-of-fold AUC of a run with each fold model's scores anchored on unlabeled "
                     "reference scans (an analysis).")
def anchor_command(args) -> None:
    from petmonai.commands.workflows import anchor_folds

    anchor_folds(args.run_dir, None if args.training_reference else args.reference, args.output)
